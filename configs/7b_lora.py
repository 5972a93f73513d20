"""LLaMA 7B LoRA fine-tuning on Alpaca conversations (MindFormers' run_llama_7b_lora.yaml, 2023): rank 16, alpha 16,
dropout 0.05 on wq/wk/wv/wo, lr 1e-4 -> 0, batch 2, one epoch, loss scale 65536. The base stays frozen; only the
adapters train, and the base is held in float16. LoRA is a toggle on any preset: --config.lora.rank=16 (0 = off).
"""
import importlib


def get_config():
    c = importlib.import_module('configs.7b').get_config()
    c.mode = 'finetune'
    c.load_checkpoint = 'llama_7b.ckpt'
    c.data.train = 'alpaca-fastchat2048.mindrecord'
    c.lora.update(rank=16, alpha=16.0, dropout=0.05, targets='.*wq|.*wk|.*wv|.*wo')
    c.model.frozen_dtype = 'float16'  # the frozen base in 16 bits, as MindFormers holds its weights
    c.train.update(out_dir='out/7b_lora', lr=1e-4, lr_end=0.0, batch_size=2, epochs=1, loss_scale=65536.0)
    c.parallel.update(data_parallel=8, model_parallel=1, pipeline_stage=1, micro_batch_num=1, optimizer_shard=False)
    return c
