"""LLaMA 7B full fine-tuning on Alpaca conversations (MindFormers' fine-tune recipe: AdamW beta2 0.999, lr 1e-5 -> 0).

    python data.py --dataset_type alpaca ... && python data.py --dataset_type qa ... (see README)
    python train.py --config configs/7b_finetune.py --config.load_checkpoint=llama_7b.ckpt
"""
import importlib


def get_config():
    c = importlib.import_module('configs.7b').get_config()
    c.mode = 'finetune'
    c.load_checkpoint = 'llama_7b.ckpt'
    c.data.train = 'alpaca-fastchat2048.mindrecord'
    c.train.update(out_dir='out/7b_finetune', lr=1e-5, lr_end=0.0, beta2=0.999)
    return c
