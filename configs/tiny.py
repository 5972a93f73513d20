"""The testing preset: a 2-layer model that CI really trains, on bundled WikiText-2 with the bundled 512-piece tokenizer."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=128,
                   norm_eps=1e-5)
    c.data.train = 'assets/wikitext-2/wiki.valid.tokens'
    c.data.eval = 'assets/wikitext-2/wiki.test.tokens'
    c.data.tokenizer = 'assets/stories260K/tok512.model'
    c.train.update(out_dir='out/tiny', batch_size=8, total_steps=200, lr=3e-3, lr_end=3e-4, warmup_ratio=0.05,
                   log_interval=20, eval_interval=100, eval_batches=8, ckpt_interval=100, beta2=0.99)
    return c
