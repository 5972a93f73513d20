"""LLaMA 13B with MindFormers' pre-training recipe (run_llama_13b.yaml)."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.update(dim=5120, n_layers=40, n_heads=40)
    c.model.compute_dtype = 'float16'  # as MindFormers on Ascend (fp32 master weights here); float32 on CPU
    c.train.loss_scale = 2.0 ** 32     # MindFormers' DynamicLossScaleUpdateCell start value
    c.train.bias_correction = False    # MindFormers' FP32StateAdamWeightDecay applies none
    c.data.tokenizer = 'tokenizer.model'
    c.data.train = 'wiki2048.mindrecord'
    c.train.update(out_dir='out/13b', batch_size=2)
    c.parallel.update(data_parallel=2, model_parallel=4, pipeline_stage=2, micro_batch_num=16, optimizer_shard=True,
                      vocab_emb_dp=True, gradient_aggregation_group=4, recompute=True)  # the seed's 16 devices
    return c
