"""Exactly llama2.c's stories260K model (the bundled assets/stories260K/stories260K.bin), for fine-tuning it."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.update(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, ffn_hidden=172, vocab_size=512, max_seq_len=512,
                   norm_eps=1e-5, tie_embeddings=True)
    c.data.tokenizer = 'assets/stories260K/tok512.model'
    c.load_checkpoint = 'assets/stories260K/stories260K.bin'
    c.train.update(out_dir='out/stories260k', batch_size=8, lr=1e-3, lr_end=1e-4, beta2=0.99)
    return c
