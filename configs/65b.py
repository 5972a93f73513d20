"""LLaMA 65B with MindFormers' pre-training recipe (run_llama_65b.yaml)."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.update(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-5)
    c.model.compute_dtype = 'float16'  # as MindFormers on Ascend (fp32 master weights here); float32 on CPU
    c.train.loss_scale = 2.0 ** 32     # MindFormers' DynamicLossScaleUpdateCell start value
    c.train.bias_correction = False    # MindFormers' FP32StateAdamWeightDecay applies none
    c.data.tokenizer = 'tokenizer.model'
    c.data.train = 'wiki2048.mindrecord'
    c.train.update(out_dir='out/65b', batch_size=2, lr=1.5e-4, lr_end=1.5e-5)
    c.parallel.update(data_parallel=4, model_parallel=2, pipeline_stage=16, micro_batch_num=64, optimizer_shard=True,
                      vocab_emb_dp=True, gradient_aggregation_group=4, recompute=True)  # the seed's 128 devices
    return c
