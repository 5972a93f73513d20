"""OpenLLaMA 3B (Hugging Face config; MindFormers has no 3B). Its FFN width is not a multiple of 256: given explicitly."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.update(dim=3200, n_layers=26, n_heads=32, ffn_hidden=8640)
    c.model.compute_dtype = 'float16'  # as the 7B preset; float32 on CPU
    c.train.loss_scale = 2.0 ** 32
    c.data.tokenizer = 'tokenizer.model'
    c.train.out_dir = 'out/3b'
    return c
