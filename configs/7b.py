"""LLaMA 7B with MindFormers' pre-training recipe (run_llama_7b.yaml)."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.compute_dtype = 'float16'  # as MindFormers on Ascend (fp32 master weights here); float32 on CPU
    c.train.loss_scale = 2.0 ** 32     # MindFormers' DynamicLossScaleUpdateCell start value
    c.data.tokenizer = 'tokenizer.model'
    c.data.train = 'wiki2048.mindrecord'
    c.train.out_dir = 'out/7b'
    return c
