"""LLaMA as pure functions over a flat dict of named tensors.

Parameters are keyed by MindFormers' checkpoint names (layout.py), so a dict saved with `ms.save_checkpoint` is a
MindFormers checkpoint. The model is three pieces, each a pure function: `embed`, `layer` (one decoder layer, its
weights under layer-independent names such as 'attention.wq.weight') and `head`; `transformer` is their loop and
`forward(params, tokens, args) -> logits`. Training, LoRA, sharding and conversion are small dict -> dict functions
around them.

Layout conventions (the converter maps every other convention onto these):
  * Linear weights are stored [out_features, in_features], as in PyTorch and MindFormers.
  * RoPE uses Hugging Face's half-split layout (rotate_half), as MindFormers r0.7+ does.
  * Query head h attends with key/value head h // (n_heads // n_kv_heads), as HF's repeat_kv does.

Tensor parallelism (Megatron-LM's): a process may hold only its slices of the weights (layout.SHARDING). The layers
read their head and FFN counts off the weights' shapes, and `args.tp` (a comm.ModelParallel) supplies the collectives
the split implies. One process has layout.SOLO, a group of one whose collectives are identities: it runs exactly the
unsplit model, through the same code. `args.kernels` (kernels.build's value, or None) says whether C++ kernels
replace some of MindSpore's ops; the model reads nothing else.
"""
import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from layout import EMBEDDING, LAYER, LM_HEAD, LORA_A, LORA_B, NORM_OUT, lora_shapes, param_shapes

MASK_VALUE = -1e9  # added to masked attention scores in fp32; finite so a fully masked (padding) row stays finite
LINEAR16_ROWS = 16  # up to this many rows (a decoding step's), 16-bit weights go through the linear16 kernel
MATMUL = ops.MatMul(transpose_b=True)  # x @ W.T with W [out, in], without a transpose kernel
SCORES = ops.BatchMatMul(transpose_b=True)
MIX = ops.BatchMatMul()
LINEARS = ('attention.wq', 'attention.wk', 'attention.wv', 'attention.wo', 'feed_forward.w1', 'feed_forward.w2',
           'feed_forward.w3')
DROPOUT_STREAM = {name: i for i, name in enumerate(LINEARS)}  # LoRA dropout draws one stream per linear


# ----------------------------------------------------------------------------------------------------------------------
# Parameters

def init_params(args, seed=0, take=None):
    """Normal(0, 0.02) weights, residual projections scaled by 1/sqrt(2 * n_layers) (GPT-2 / llama2.c), unit norms.
    take(name, array) keeps what this process holds of each (layout.local_layout's slice, or None to drop it): the
    tensors are drawn whole, one at a time and in order, so every process draws the same numbers and none holds the
    whole model."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(args).items():
        if name.endswith('norm.weight') or name == NORM_OUT:
            value = np.ones(shape, np.float32)
        else:
            std = 0.02 / math.sqrt(2 * args.n_layers) if name.endswith(('wo.weight', 'w2.weight')) else 0.02
            value = rng.standard_normal(shape, dtype=np.float32) * std
        value = value if take is None else take(name, value)
        if value is not None:
            params[name] = Tensor(np.ascontiguousarray(value))
    return params


def init_lora(args, rank, targets, seed=0, take=None):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform), B = 0: the adapted model starts equal to the base.
    take: as init_params'."""
    rng = np.random.default_rng(seed)
    lora = {}
    for name, shape in lora_shapes(args, rank, targets).items():
        if name.endswith(LORA_A):
            value = rng.uniform(-1, 1, shape).astype(np.float32) / math.sqrt(shape[1])
        else:
            value = np.zeros(shape, np.float32)
        value = value if take is None else take(name, value)
        if value is not None:
            lora[name] = Tensor(np.ascontiguousarray(value))
    return lora


def split_layers(params, n_layers):
    """A flat {MindFormers name: tensor} -> (the embedding / final norm / lm_head tensors, one dict per layer under
    layer-independent names such as 'attention.wq.weight', LoRA adapters alike). Every layer then has the same names,
    so one compiled layer serves all, and the differentiated graphs index only dicts they were given: MindSpore
    2.10 fails to compile, or drops gradients, through dicts built inside a graph (measured with LoRA dropout)."""
    rest, layers = {}, [{} for _ in range(n_layers)]
    for name, tensor in params.items():
        match = LAYER.fullmatch(name)
        if match:
            layers[int(match.group(1))][match.group(2)] = tensor
        else:
            rest[name] = tensor
    return rest, layers


def join_layers(rest, layers, first=0):
    """split_layers' inverse; first: the index of layers[0] (a pipeline stage's first layer)."""
    joined = dict(rest)
    for i, layer_tensors in enumerate(layers, first):
        joined.update({f'model.layers.{i}.{name}': tensor for name, tensor in layer_tensors.items()})
    return joined


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks

def linear(x, w, args):
    """x @ w.T over x's last axis, w [out, in] as it is held: in the compute dtype, or in 16 bits (frozen weights),
    widened where it is used and never kept widened: by the linear16 kernel for the few rows of a decoding step
    (one pass over the 16-bit weight), else cast before the matmul (a temporary of the graph)."""
    lead, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
    fast = kernel(args.kernels, 'linear16')
    if fast is not None and w.dtype in (ms.float16, ms.bfloat16) and x.dtype == ms.float32 and \
            flat.shape[0] <= LINEAR16_ROWS:
        return fast(flat, w).reshape(*lead, w.shape[0])
    return MATMUL(flat, w if w.dtype == x.dtype else w.astype(x.dtype)).reshape(*lead, w.shape[0])


def hash_uniform(shape, seed, index=None):
    """Uniform [0, 1) numbers from an integer hash of (seed, element index); index: an int32 tensor of `shape`, by
    default 0, 1, ... in order.

    MindSpore's in-graph RNG state cannot be saved or reset, so a resumed run would draw other dropout masks; this
    counter-based hash (two rounds of multiply-xorshift, int32 arithmetic wrapping) gives the same masks for the same
    seed in any run."""
    x = (ops.arange(math.prod(shape), dtype=ms.int32).reshape(shape) if index is None else index) + seed * 0x2545F491
    for _ in range(2):
        x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, 16)) * 0x45D9F3B
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, 16))
    return ops.bitwise_and(x, 0xFFFFFF).astype(ms.float32) * (1.0 / (1 << 24))


def whole_index(shape, rows, columns=(0, None)):
    """Each element's index in the whole micro-batch's tensor of which this process holds a part of `shape`
    [B, ..., W]: columns (first, whole width) of a tensor-parallel rank's slice, and the rows of data-parallel rank d
    of D (rows = (d, D), from the call's context), which are whole rows d, d + D, ... (the loader deals rows out in
    turn). So dropout draws the numbers one process would, on any mesh."""
    (first, width), (d, D) = (columns[0], columns[1] or shape[-1]), rows
    inner = math.prod(shape[1:-1])
    rows = ops.arange(shape[0], dtype=ms.int32).reshape(-1, 1, 1) * D + d
    within = ops.arange(inner, dtype=ms.int32).reshape(1, -1, 1)
    cols = ops.arange(shape[-1], dtype=ms.int32).reshape(1, 1, -1) + first
    return ((rows * inner + within) * width + cols).reshape(shape)


def spread(y, x):
    """y broadcast to x's shape, as its own kernel. MindSpore 2.10's CPU arithmetic kernels, when they broadcast an
    operand themselves, take output-sized buffers that the graph never reuses: 20 such multiplies of a 32 MB tensor
    held 1.4 GB, the same with spread() 0.1 GB. Every broadcast onto activations in the layers goes through here
    (masks and positions built once per call are small and broadcast directly)."""
    return ops.broadcast_to(y, x.shape)


def kernel(kernel_ops, name):
    """The C++ kernel `name` of kernel_ops (args.kernels: kernels.build's value), or None: MindSpore's ops then run.
    Any of them may be None (the tests switch them one by one)."""
    return None if kernel_ops is None else getattr(kernel_ops, name)


def rms_norm(x, weight, eps, kernel_ops=None):
    """Computed in fp32 whatever the compute dtype, as HF and MindFormers do. weight None: already folded into the
    next matmul (fuse_for_decoding). By the C++ kernels when given them (fp32): one kernel for six, and for the
    gradient's ~14."""
    fast = kernel(kernel_ops, 'rms_norm' if weight is None else 'rms_norm_weighted')
    if fast is not None and x.dtype == ms.float32:
        eps = Tensor([eps], ms.float32)
        return fast(x, eps) if weight is None else fast(x, weight, eps)
    x32 = x.astype(ms.float32)
    x32 = x32 * spread(ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + eps), x32)
    y = x32.astype(x.dtype)
    return y if weight is None else y * spread(weight, y)


def held(w, name):
    """w[name] as it is held (fp32 masters, or a frozen weight's 16 bits), or None when w has none (a norm folded
    into the next matmul, a linear without LoRA). Not w.get(): MindSpore 2.10 can drop gradients through dict.get."""
    return None if w is None or name not in w else w[name]


def weight(w, name, args):
    """held(w, name) in the compute dtype."""
    value, dtype = held(w, name), getattr(ms, args.compute_dtype)
    return value if value is None or value.dtype == dtype else value.astype(dtype)


def rope_table(args):
    """cos, sin of shape [max_seq_len, head_dim/2] (numpy; made constants of the graph)."""
    inv_freq = 1.0 / (args.rope_theta ** (np.arange(0, args.head_dim, 2, dtype=np.float64) / args.head_dim))
    angles = np.outer(np.arange(args.max_seq_len, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_half_matrix(head_dim):
    """R with x @ R = concat(-x[half:], x[:half]): HF's rotate_half as one small matmul (exact: entries are 0, ±1)."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def apply_rope(x, cos, sin):
    """Half-split rotation of x [B, T, heads, head_dim] by full-width cos/sin [B, T, 1, head_dim]:
    x·cos + rotate_half(x)·sin, with rotate_half one matmul instead of slicing and concatenating halves."""
    rotated = ops.matmul(x.reshape(-1, x.shape[-1]), Tensor(rotate_half_matrix(x.shape[-1]), x.dtype))
    return x * spread(cos, x) + rotated.reshape(x.shape) * spread(sin, x)


def lora_input(x, name, args, ctx, columns=(0, None)):
    """The LoRA branch's input: x, with dropout in training (ctx holds a seed, unique per step and layer); columns:
    where x's columns sit in the whole input (see whole_index)."""
    if ctx[SEED] is None or args.lora_dropout <= 0:
        return x
    seed = ctx[SEED] * 8 + DROPOUT_STREAM[name]
    keep = (hash_uniform(x.shape, seed, whole_index(x.shape, ctx[ROWS], columns)) >= args.lora_dropout).astype(x.dtype)
    return x * keep * (1.0 / (1.0 - args.lora_dropout))


def linear_weights(w, lora, name, args):
    """(W, LoRA A, LoRA B) of a linear, A and B None without an adapter."""
    return held(w, name + '.weight'), weight(lora, name + LORA_A, args), weight(lora, name + LORA_B, args)


def column_parallel(x, w, lora, names, args, ctx):
    """x @ W.T for each named linear that reads x (wq, wk, wv, or w1, w3), plus its LoRA branch
    (x·Aᵀ)·Bᵀ·alpha/rank when w holds one. Split over a tensor-parallel group, each W holds this rank's output rows
    and x enters through tp.copy (its gradient is summed over the group); a LoRA branch takes x before the copy
    and copies its small x·Aᵀ instead, so that every gradient comes out whole."""
    shared = args.tp.copy(x)
    return [column_linear(shared, x, linear_weights(w, lora, name, args), name, args, ctx) for name in names]


def column_linear(shared, x, weights, name, args, ctx):
    matrix, a, b = weights
    y = linear(shared, matrix, args)
    if a is None:
        return y
    down = linear(lora_input(x, name, args, ctx), a, args)
    down = args.tp.copy(down)
    return y + linear(down, b, args) * (args.lora_alpha / a.shape[0])


def row_parallel(x, w, lora, name, args, ctx):
    """x @ W.T (wo, w2) plus its LoRA branch. Split over a tensor-parallel group, x and W hold this rank's input
    columns and the partial products are summed over the group (tp.reduce); so is a LoRA branch's x·Aᵀ."""
    tp = args.tp
    matrix, a, b = linear_weights(w, lora, name, args)
    y = tp.reduce(linear(x, matrix, args))
    if a is None:
        return y
    # dropout draws the numbers of this rank's columns of the whole input
    down = tp.reduce(linear(lora_input(x, name, args, ctx, (tp.rank * x.shape[-1], tp.size * x.shape[-1])), a, args))
    return y + linear(down, b, args) * (args.lora_alpha / a.shape[0])


def attention(x, w, lora, args, ctx, cache=None):
    """Grouped-query attention over this process's heads. x [B, T, D]; ctx (see context): cos, sin
    [B, T, 1, hd], the additive mask [B, 1, 1, T, S] and in decoding the cache slots [T] that this call's keys and
    values are written into, in place, in cache (k, v): Parameters [B, KV, S, hd].

    Returns the output and this call's k, v (the whole cache when there is one).
    """
    B, T, _ = x.shape
    hd, group = args.head_dim, args.n_heads // args.n_kv_heads
    scale = 1.0 / math.sqrt(hd)
    if 'attention.wqkv.weight' in w:  # fused for decoding: one matmul, one rotation for q and k together
        qkv = linear(args.tp.copy(x), held(w, 'attention.wqkv.weight'), args)
        qkv = qkv.reshape(B, T, -1, hd)
        KV = qkv.shape[2] // (group + 2)
        scale = 1.0  # already in wqkv's q rows
        qkv_rope = kernel(args.kernels, 'qkv_rope')
        if qkv_rope is not None and qkv.dtype == ms.float32:  # decoding needs no gradient: one kernel
            q, k, v = qkv_rope(qkv, ctx[COS], ctx[SIN], ops.zeros(KV, ms.float32))
        else:
            qk, v = ops.split(qkv, [group * KV + KV, KV], 2)
            q, k = ops.split(apply_rope(qk, ctx[COS], ctx[SIN]), [group * KV, KV], 2)
            q, k, v = heads_first(q, k, v, group)
    else:
        q, k, v = column_parallel(x, w, lora, ('attention.wq', 'attention.wk', 'attention.wv'), args, ctx)
        q = apply_rope(q.reshape(B, T, -1, hd), ctx[COS], ctx[SIN])
        k = apply_rope(k.reshape(B, T, -1, hd), ctx[COS], ctx[SIN])
        q, k, v = heads_first(q, k, v.reshape(B, T, -1, hd), group)
    KV = k.shape[1]
    if cache is not None:
        # Added into slots that hold zeros (the cache is cleared before each prompt), so this writes k and v, in
        # place. On CPU, scatter_nd_update copies the whole cache per call instead (measured: time grows with S).
        k, v = ops.index_add(cache[0], ctx[SLOTS], k, 2), ops.index_add(cache[1], ctx[SLOTS], v, 2)
    S = k.shape[2]
    scores = SCORES(q, k).astype(ms.float32)
    scores = scores if scale == 1.0 else scores * scale
    scores = scores.reshape(B, KV, group, T, S)
    scores = scores + spread(ctx[MASK], scores)
    softmax = kernel(args.kernels, 'softmax')
    probs = (ops.softmax(scores, -1) if softmax is None else softmax(scores)).astype(x.dtype)
    out = MIX(probs.reshape(B, KV, group * T, S), v)  # [B, KV, group*T, hd]
    out = out.reshape(B, KV * group, T, hd).transpose(0, 2, 1, 3).reshape(B, T, KV * group * hd)
    return row_parallel(out, w, lora, 'attention.wo', args, ctx), (k, v)


def heads_first(q, k, v, group):
    """q, k, v [B, T, heads, hd] as attention multiplies them: k, v [B, KV, T, hd] and q [B, KV, group * T, hd], the
    query heads sharing a kv head stacked along the row axis (one batched matmul, no repeated k and v)."""
    B, T, KV, hd = k.shape
    return q.transpose(0, 2, 1, 3).reshape(B, KV, group * T, hd), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def feed_forward(x, w, lora, args, ctx):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""
    if 'feed_forward.w13.weight' in w:  # fused for decoding
        fused = held(w, 'feed_forward.w13.weight')
        gate, up = ops.split(linear(args.tp.copy(x), fused, args), fused.shape[0] // 2, -1)
    else:
        gate, up = column_parallel(x, w, lora, ('feed_forward.w1', 'feed_forward.w3'), args, ctx)
    return row_parallel(ops.silu(gate) * up, w, lora, 'feed_forward.w2', args, ctx)


def layer(w, h, args, ctx, lora=None, cache=None):
    """One pre-norm decoder layer: h + attention(norm(h)), then + SwiGLU(norm(.)). w (and lora, its adapters): the
    layer's tensors under layer-independent names (split_layers). Returns the new h and the layer's k, v."""
    a, kv = attention(rms_norm(h, weight(w, 'attention_norm.weight', args), args.norm_eps, args.kernels), w, lora,
                      args, ctx, cache)
    h = h + a
    h_norm = rms_norm(h, weight(w, 'ffn_norm.weight', args), args.norm_eps, args.kernels)
    return h + feed_forward(h_norm, w, lora, args, ctx), kv


def embed(rest, tokens, args):
    """The embedding lookup (rest: the tensors outside the layers). With the vocabulary split over a
    tensor-parallel group (vocab_emb_dp False) each rank looks up the tokens in its rows, zeros for the rest, and the
    sum over the group is the lookup (Megatron's VocabParallelEmbedding)."""
    table, dtype = held(rest, EMBEDDING), getattr(ms, args.compute_dtype)
    if table.dtype == ms.bfloat16:  # no bfloat16 gather on CPU: widened first (a temporary of the graph)
        table = table.astype(dtype)
    if table.shape[0] == args.vocab_size:
        return ops.gather(table, tokens, 0).astype(dtype)  # the rows looked up, then widened
    rows = table.shape[0]
    local = tokens - args.tp.rank * rows
    inside = ops.logical_and(local >= 0, local < rows)
    h = ops.gather(table, ops.select(inside, local, ops.zeros_like(local)), 0).astype(dtype)
    return args.tp.reduce(h * spread(inside.astype(h.dtype).expand_dims(-1), h))


def head(rest, h, args):
    """The final norm and lm_head: h [B, T, D] -> fp32 logits [B, T, V] (this rank's [B, T, V/mp] when the
    vocabulary is split)."""
    h = rms_norm(h, weight(rest, NORM_OUT, args), args.norm_eps, args.kernels)
    matrix = held(rest, LM_HEAD if LM_HEAD in rest else EMBEDDING)  # tied: the embedding
    if matrix.shape[0] < args.vocab_size:
        h = args.tp.copy(h)
    return linear(h, matrix, args).astype(ms.float32)


def scored(inputs, targets, args):
    """Which positions the loss scores: MindFormers' rules, not where the target is ignore_id or the input pad_id."""
    return ops.logical_and(targets != args.ignore_id, inputs != args.pad_id)


def token_loss(logits, inputs, targets, args):
    """(mean next-token cross-entropy over the scored positions, their count)."""
    keep = scored(inputs, targets, args)
    safe_targets = ops.select(keep, targets, ops.zeros_like(targets)).astype(ms.int32)
    if logits.shape[-1] < args.vocab_size:
        nll = vocab_parallel_nll(logits, safe_targets, args.tp)
    else:  # log_softmax is one fused kernel (and its gradient another): 9x faster than logits - logsumexp on CPU
        nll = -ops.gather_d(ops.log_softmax(logits, -1), -1, safe_targets.expand_dims(-1)).squeeze(-1)
    weight = keep.astype(ms.float32)
    n_tokens = weight.sum()
    return (nll * weight).sum() / ops.maximum(n_tokens, 1.0), n_tokens


def vocab_parallel_nll(logits, targets, tp):
    """-log softmax(logits)[target] with the vocabulary split over the group: logits [B, T, V/mp] are this rank's
    columns. No rank builds the full logits: each reduces its columns to a log-sum-exp and the target's logit (or
    zero), and only those [B, T] numbers cross the group (Megatron's vocab-parallel cross-entropy)."""
    rows = logits.shape[-1]
    top = ops.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = ops.log(ops.exp(logits - spread(top, logits)).sum(-1)) + top.squeeze(-1)
    # all ranks' log-sum-exps: a sum of zero-padded copies (CPU has AllReduce on subgroups, not AllGather)
    placed = ops.stack([lse if r == tp.rank else ops.zeros_like(lse) for r in range(tp.size)])
    every = tp.reduce(placed)
    peak = ops.stop_gradient(every.max(axis=0))
    total = ops.log(ops.exp(every - spread(peak, every)).sum(0)) + peak
    local = targets - tp.rank * rows
    inside = ops.logical_and(local >= 0, local < rows)
    picked = ops.gather_d(logits, -1, ops.select(inside, local, ops.zeros_like(local)).expand_dims(-1)).squeeze(-1)
    return total - tp.reduce(picked * inside.astype(ms.float32))


# ----------------------------------------------------------------------------------------------------------------------
# The forward pass

# What every layer of one call shares, a plain tuple indexed by these: the RoPE tables, the mask, the cache slots
# (decoding, else None), the LoRA dropout seed (training, else None) and the rows of the micro-batch this process
# holds (d, D), data-parallel rank d of D (dropout draws what one process would). Not a NamedTuple or a dict: in
# MindSpore 2.10's graphs the gradient silently comes out zero through a NamedTuple built in the graph, and compiling
# fails or drops it through a dict passed to a function with an int Tensor in it (measured); a tuple works.
COS, SIN, MASK, SLOTS, SEED, ROWS = range(6)


def context(cos, sin, mask, slots=None, seed=None, rows=(0, 1)):
    return cos, sin, mask, slots, seed, rows


def layer_seed(seed, i, n_layers):
    """The dropout seed of layer i in a step (or micro-batch) seeded `seed` (an int32 Tensor; wraps as int32)."""
    return seed * n_layers + i


def rope(positions, args, dtype):
    """Full-width cos, sin [B, T, 1, head_dim] (each half repeated) for positions [B, T]."""
    cos_table, sin_table = rope_table(args)
    B, T = positions.shape
    cos = ops.gather(Tensor(np.concatenate([cos_table, cos_table], -1)), positions, 0)
    sin = ops.gather(Tensor(np.concatenate([sin_table, sin_table], -1)), positions, 0)
    return cos.reshape(B, T, 1, -1).astype(dtype), sin.reshape(B, T, 1, -1).astype(dtype)


def causal_mask(T):
    allowed = ops.arange(T).reshape(T, 1) >= ops.arange(T).reshape(1, T)
    return ops.select(allowed, ops.zeros((T, T), ms.float32), ops.full((T, T), MASK_VALUE, dtype=ms.float32))


def sequence_context(B, T, args, seed=None, rows=(0, 1)):
    """The context of a full (uncached) forward of B rows of T tokens (rows: which rows of the micro-batch, see
    ROWS)."""
    positions = ops.broadcast_to(ops.arange(T, dtype=ms.int32).reshape(1, T), (B, T))
    cos, sin = rope(positions, args, getattr(ms, args.compute_dtype))
    return context(cos, sin, causal_mask(T).reshape(1, 1, 1, T, T), seed=seed, rows=rows)


def recomputed_layer(w, h, args, ctx, lora):
    """layer() whose activations are recomputed in the backward instead of kept. MindSpore 2.10's recompute takes no
    dicts, so the tensors pass through it as flat tuples."""
    names = tuple(n for n in w)
    lora_names = () if lora is None else tuple(n for n in lora)
    return ms.recompute(flat_layer, names, lora_names, args, h, ctx, tuple(w[n] for n in names),
                        tuple(lora[n] for n in lora_names))


def flat_layer(names, lora_names, args, h, ctx, tensors, lora_tensors):
    w, lora = {}, {}
    for i in range(len(names)):
        w[names[i]] = tensors[i]
    for i in range(len(lora_names)):
        lora[lora_names[i]] = lora_tensors[i]
    return layer(w, h, args, ctx, lora if lora_names else None)[0]


def transformer(rest, layers, tokens, args, ctx, lora=None, caches=None, last_only=False, recompute=False):
    """tokens [B, T] -> fp32 logits [B, T, V] (only the last position's, [B, 1, V], with last_only), and the
    per-layer (k, v). rest, layers: split_layers' two parts of the weights; lora: one adapter dict per layer, or None.
    A seed in ctx (an int32 Tensor) switches on LoRA dropout (training only); recompute keeps only each layer's
    input for the backward."""
    h = embed(rest, tokens, args)
    new_cache = []
    for i in range(len(layers)):
        layer_ctx = ctx if ctx[SEED] is None else \
            context(ctx[COS], ctx[SIN], ctx[MASK], ctx[SLOTS], layer_seed(ctx[SEED], i, args.n_layers), ctx[ROWS])
        adapters = None if lora is None else lora[i]
        if recompute and caches is None:
            h, kv = recomputed_layer(layers[i], h, args, layer_ctx, adapters), None
        else:
            h, kv = layer(layers[i], h, args, layer_ctx, adapters, None if caches is None else caches[i])
        new_cache.append(kv)
    return head(rest, h[:, -1:] if last_only else h, args), new_cache


def forward(params, tokens, args, lora=None, seed=None):
    """Full causal forward of flat MindFormers-named params: tokens [B, T] int32 -> logits [B, T, V] float32. Eager
    (the split into layers runs on the host); a compiled graph calls transformer with the split weights."""
    rest, layers = split_layers(params, args.n_layers)
    adapters = None if lora is None else split_layers(lora, args.n_layers)[1]
    return transformer(rest, layers, tokens, args, sequence_context(*tokens.shape, args, seed), adapters)[0]


def shift(input_ids, labels=None):
    """MindFormers' convention: inputs ids[:, :-1], targets labels[:, 1:] (labels default to the ids)."""
    return input_ids[:, :-1], (input_ids if labels is None else labels)[:, 1:]


def loss_fn(params, input_ids, args, labels=None, lora=None, seed=None):
    """Mean next-token cross-entropy of rows input_ids [B, T+1] (and labels), and the scored-token count; flat
    params, as forward."""
    inputs, targets = shift(input_ids, labels)
    return token_loss(forward(params, inputs, args, lora, seed), inputs, targets, args)


# ----------------------------------------------------------------------------------------------------------------------
# Incremental decoding over a preallocated KV cache

def fuse_for_decoding(params, args):
    """The weights decoding runs on, fewer kernels per token (each costs microseconds on CPU however small): per
    layer one [wq; wk; wv] and one [w1; w3] matrix with the RMSNorm weight before them folded into their columns
    (W·diag(g) x = W (g * x)), the attention scale 1/sqrt(head_dim) folded into the wq rows, and the final norm into
    lm_head. Equal to the unfused model up to fp32 rounding. Works on a tensor-parallel rank's slices as on whole
    weights. Checkpoints keep MindFormers' separate tensors; this is built at load time (numpy, on the host)."""
    p = {k: v.asnumpy() for k, v in params.items()}
    fused = {EMBEDDING: p[EMBEDDING], LM_HEAD: p[LM_HEAD if LM_HEAD in p else EMBEDDING] * p[NORM_OUT]}
    for i in range(args.n_layers):
        a, f = f'model.layers.{i}.attention.', f'model.layers.{i}.feed_forward.'
        g_attn, g_ffn = p[f'model.layers.{i}.attention_norm.weight'], p[f'model.layers.{i}.ffn_norm.weight']
        wq = p[a + 'wq.weight'] / math.sqrt(args.head_dim)
        fused[a + 'wqkv.weight'] = np.concatenate([wq, p[a + 'wk.weight'], p[a + 'wv.weight']]) * g_attn
        fused[a + 'wo.weight'] = p[a + 'wo.weight']
        fused[f + 'w13.weight'] = np.concatenate([p[f + 'w1.weight'], p[f + 'w3.weight']]) * g_ffn
        fused[f + 'w2.weight'] = p[f + 'w2.weight']
    return {k: Tensor(v.astype(np.float32)) for k, v in fused.items()}


def empty_cache(args, batch_size, max_len):
    """Per layer a (k, v) pair of zero Parameters [B, KV, max_len, hd] (this rank's kv heads), which decoding
    writes into in place. They must be zeroed again (clear_cache) before they take another prompt."""
    kv_heads = args.n_kv_heads // args.tp.size
    shape = (batch_size, kv_heads, max_len, args.head_dim)
    dtype = getattr(ms, args.compute_dtype)
    return [(ms.Parameter(ops.zeros(shape, dtype), name=f'cache.{i}.k'),
             ms.Parameter(ops.zeros(shape, dtype), name=f'cache.{i}.v')) for i in range(args.n_layers)]


def clear_cache(cache, first):
    """Zero the cache's slots from first (an int32 Tensor) on, in place: all of them for a new prompt; in a
    conversation, those past what the next turn keeps (decoding also writes a few tokens past EOS). Returns a dummy:
    a compiled call needs an output."""
    for k, v in cache:
        keep = (ops.arange(k.shape[2], dtype=ms.int32) < first).astype(k.dtype).reshape(1, 1, -1, 1)
        ops.assign(k, k * spread(keep, k))
        ops.assign(v, v * spread(keep, v))
    return ms.Tensor(0)


def forward_cached(rest, layers, tokens, args, cache, slot, start, lora=None):
    """Run tokens [B, T] that occupy cache slots slot..slot+T-1, writing their keys and values into the cache (rest,
    layers and lora as transformer takes them);
    returns the last position's logits [B, V] (the only ones generation needs: a prefill skips the lm_head for the
    rest), whole also when the vocabulary is split.

    Prompts are left-padded: row b's first real token sits in slot start[b] (int32 [B]), so its RoPE position is
    slot - start[b], and keys in slots before start[b] (padding) or after the query (future) are masked.
    """
    B, T = tokens.shape
    S = cache[0][0].shape[2]
    query_slot = slot + ops.arange(T, dtype=ms.int32)  # [T]
    # [B, T], clamped into the RoPE table: padding has none, and a decoder that runs a few tokens past max_seq_len
    # (to be discarded) must not index beyond it
    positions = ops.clamp(query_slot.reshape(1, T) - start.reshape(B, 1), 0, args.max_seq_len - 1)
    key_slot = ops.arange(S, dtype=ms.int32).reshape(1, 1, S)
    allowed = ops.logical_and(key_slot <= query_slot.reshape(1, T, 1), key_slot >= start.reshape(B, 1, 1))
    mask = ops.select(allowed, ops.zeros((B, T, S), ms.float32), ops.full((B, T, S), MASK_VALUE, dtype=ms.float32))
    cos, sin = rope(positions, args, getattr(ms, args.compute_dtype))
    ctx = context(cos, sin, mask.reshape(B, 1, 1, T, S), slots=query_slot)
    logits = transformer(rest, layers, tokens, args, ctx, lora, cache, last_only=True)[0].reshape(B, -1)
    return logits if logits.shape[-1] == args.vocab_size else args.tp.gather(logits)
