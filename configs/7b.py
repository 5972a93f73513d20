"""LLaMA 7B with MindFormers' pre-training recipe (run_llama_7b.yaml)."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.compute_dtype = 'float16'  # as MindFormers on Ascend (fp32 master weights here); float32 on CPU
    c.train.loss_scale = 2.0 ** 32     # MindFormers' DynamicLossScaleUpdateCell start value
    c.train.bias_correction = False    # MindFormers' FP32StateAdamWeightDecay applies none
    c.data.tokenizer = 'tokenizer.model'
    c.data.train = 'wiki2048.mindrecord'
    c.train.out_dir = 'out/7b'
    c.parallel.update(data_parallel=2, model_parallel=1, pipeline_stage=4, micro_batch_num=16, optimizer_shard=True,
                      vocab_emb_dp=True, gradient_aggregation_group=4, recompute=True)  # the seed's 8 devices
    return c
