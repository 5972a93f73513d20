"""Every field a run reads, with its default. Presets start from here and change only what differs.

Override any field on the command line: python train.py --config configs/tiny.py --config.train.lr=1e-3
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.mode = 'pretrain'               # pretrain | finetune (from load_checkpoint, qa data with labels) | eval
    c.load_checkpoint = ''            # weights to start from or evaluate (any format convert.py reads); '' = random init
    c.resume = False                  # continue from the newest checkpoint in train.out_dir

    c.model = ml_collections.ConfigDict()
    c.model.dim = 4096                # hidden size
    c.model.n_layers = 32             # transformer blocks
    c.model.n_heads = 32              # query heads; head_dim = dim / n_heads
    c.model.n_kv_heads = 0            # key/value heads for grouped-query attention; 0 = n_heads
    c.model.vocab_size = 32000        # embedding rows; must cover the tokenizer
    c.model.multiple_of = 256         # FFN width rounds up to a multiple of this
    c.model.ffn_dim_multiplier = 0.0  # scales the FFN width before rounding; 0 = off
    c.model.ffn_hidden = 0            # explicit FFN width, overriding the rule; 0 = use the rule
    c.model.max_seq_len = 2048        # longest sequence (RoPE table, generation limit)
    c.model.norm_eps = 1e-6           # RMSNorm epsilon
    c.model.rope_theta = 10000.0      # RoPE base
    c.model.tie_embeddings = False    # lm_head shares the embedding matrix (llama2.c models do, LLaMA does not)
    c.model.compute_dtype = 'float32'  # float32 | float16 | bfloat16; trained weights stay float32 (CPU: float32 only)
    c.model.frozen_dtype = ''         # weights no optimizer updates (LoRA's base, eval): float16 | bfloat16 | float32,
    #                                   '' = as the checkpoint stores them (16 bits stay 16); widened where used
    c.model.pad_id = 0                # padding token; positions whose input is pad are not scored
    c.model.ignore_id = -100          # label value that is not scored

    c.data = ml_collections.ConfigDict()
    c.data.train = ''                 # a .mindrecord, or text files (path or glob) preprocessed on first use
    c.data.eval = ''                  # same, for the periodic eval loss; '' = no eval
    c.data.tokenizer = ''             # sentencepiece .model used to preprocess text
    c.data.seq_length = 0             # tokens per training row (+1 for the shifted target); 0 = max_seq_len

    c.train = ml_collections.ConfigDict()
    c.train.out_dir = 'out'           # checkpoints and logs go here
    c.train.batch_size = 4            # rows per micro-batch (per data-parallel rank)
    c.train.grad_accum = 1            # micro-batches per optimizer step
    c.train.epochs = 2                # passes over the data when total_steps is -1
    c.train.total_steps = -1          # optimizer steps; -1 = epochs x steps per epoch
    c.train.lr = 3e-4                 # peak learning rate
    c.train.lr_end = 3e-5             # learning rate at the end of the cosine
    c.train.warmup_ratio = 0.03       # fraction of total_steps spent in linear warmup
    c.train.beta1 = 0.9               # AdamW
    c.train.beta2 = 0.95              # AdamW
    c.train.eps = 1e-8                # AdamW
    c.train.weight_decay = 0.0        # decoupled; never applied to norm weights
    c.train.bias_correction = True    # Adam bias correction; False reproduces MindFormers exactly
    c.train.grad_clip = 1.0           # global-norm clipping threshold; 0 = off
    c.train.seed = 0                  # weight init and data order
    c.train.log_interval = 10         # steps between log lines
    c.train.eval_interval = 0         # steps between eval losses; 0 = only at the end
    c.train.eval_batches = 20         # batches per eval
    c.train.ckpt_interval = 100       # steps between checkpoints (one is always written at the end)
    c.train.keep_checkpoints = 3      # keep only the newest K checkpoints
    c.train.layerwise_from = 9        # models with at least this many layers compile one layer and loop over layers on
    #                                   the host (compile time independent of depth); 0 = never
    c.train.loss_scale = 0.0          # initial dynamic loss scale (fp16 compute); 0 = no loss scaling
    c.train.loss_scale_window = 1000  # clean steps before the loss scale doubles (it halves on overflow)
    c.train.peak_tflops = 0.0         # device peak for MFU; 0 = measure this machine's fp32 matmul throughput
    c.train.max_memory_gb = 0.0       # refuse to start if the estimate exceeds this; 0 = this machine's free RAM
    c.train.tensorboard = False       # also write the logged scalars as TensorBoard events in out_dir
    c.train.graph_cache = True        # keep the compiled step for the next run of the same model and batch shape
    #                                   ($XDG_CACHE_HOME or ~/.cache /llama-mindspore; one process, one micro-batch)
    c.train.cpu_kernels = True        # on CPU, kernels.cc's C++ kernels (built once by $CXX or g++): AdamW in one pass,
    #                                   the softmax gradient, RMSNorm; MindSpore's ops where they cannot be built
    c.train.log_grad_norms = False    # log.jsonl records each layer's gradient norm (where fp16 overflows start)

    c.parallel = ml_collections.ConfigDict()  # MindFormers' parallel_config; see layout.SHARDING and --plan
    c.parallel.data_parallel = 0      # data-parallel replicas; 0 = all processes / (model_parallel x pipeline_stage)
    c.parallel.model_parallel = 1     # tensor-parallel split of heads, FFN and (unless vocab_emb_dp) vocabulary
    c.parallel.pipeline_stage = 1     # pipeline stages (layers split in order)
    c.parallel.micro_batch_num = 1    # pipeline micro-batches per step (at least pipeline_stage)
    c.parallel.optimizer_shard = False  # AdamW's moments split over data-parallel ranks
    c.parallel.vocab_emb_dp = True    # embedding and lm_head replicated over model_parallel (False: vocab split)
    c.parallel.gradient_aggregation_group = 4  # data-parallel gradients all-reduced in this many fused buffers
    c.parallel.recompute = False      # keep only each layer's input; recompute the rest in the backward
    c.parallel.device_memory_gb = 32.0  # --plan: memory per device (Ascend 910: 32 GB)
    c.parallel.device_tflops = 256.0  # --plan: peak per device (Ascend 910A fp16: 256 TFLOPS)
    c.parallel.mfu = 0.2              # --plan: assumed model FLOPs utilisation for its tokens/s

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0                   # LoRA rank; 0 = LoRA off. On: the base is frozen, only adapters train
    c.lora.alpha = 16.0               # the LoRA branch is scaled by alpha / rank
    c.lora.dropout = 0.05             # dropout on the LoRA branch's input, in training
    c.lora.targets = '.*wq|.*wk|.*wv|.*wo'  # regex over linear names like model.layers.0.attention.wq
    c.lora.adapter = ''               # mode=eval: the adapter to evaluate on top of load_checkpoint
    return c
