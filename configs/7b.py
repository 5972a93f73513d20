"""LLaMA 7B with MindFormers' pre-training recipe (run_llama_7b.yaml)."""
from configs import base


def get_config():
    c = base.get_config()
    c.data.tokenizer = 'tokenizer.model'
    c.data.train = 'wiki2048.mindrecord'
    c.train.out_dir = 'out/7b'
    return c
