"""LLaMA as pure functions over a flat dict of named tensors.

Parameters are keyed by MindFormers' checkpoint names, so a dict saved with `ms.save_checkpoint` is a MindFormers
checkpoint. Every function here is pure: `forward(params, tokens, args) -> logits`. Training, LoRA, sharding and
conversion are small dict -> dict functions built on top.

Layout conventions (the converter maps every other convention onto these):
  * Linear weights are stored [out_features, in_features], as in PyTorch and MindFormers.
  * RoPE uses Hugging Face's half-split layout (rotate_half), as MindFormers r0.7+ does.
  * Query head h attends with key/value head h // (n_heads // n_kv_heads), as HF's repeat_kv does.
"""
import math
import re
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

EMBEDDING = 'model.tok_embeddings.embedding_weight'
LORA_A, LORA_B = '.mindpet_delta_lora_a', '.mindpet_delta_lora_b'  # MindFormers' names: <linear>.mindpet_delta_lora_a
MASK_VALUE = -1e9  # added to masked attention scores in fp32; finite so a fully masked (padding) row stays finite


class ModelArgs(NamedTuple):
    """The model's shape with every derived value resolved. A NamedTuple so `ms.jit` treats it as a constant."""
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float
    rope_theta: float
    tie_embeddings: bool
    compute_dtype: str  # 'float32' | 'float16' | 'bfloat16'; parameters stay float32
    pad_id: int
    ignore_id: int
    lora_alpha: float = 0.0  # LoRA scale numerator (scale = alpha / rank); the adapters themselves are a separate dict
    lora_dropout: float = 0.0  # dropout on the input of each LoRA branch, in training only
    recompute: bool = False  # recompute each layer's activations in the backward instead of keeping them


def ffn_hidden_size(dim, multiple_of=256, ffn_dim_multiplier=None, ffn_hidden=0):
    """LLaMA's FFN width: 2/3 of 4*dim, scaled, rounded up to multiple_of; an explicit ffn_hidden wins."""
    if ffn_hidden:
        return int(ffn_hidden)
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def model_args(m):
    """ModelArgs from a config's `model` section (a ConfigDict or plain dict). The one place derived values live."""
    m = dict(m)
    n_kv = m.get('n_kv_heads') or m['n_heads']
    errors = []
    if m['dim'] % m['n_heads']:
        errors.append(f"dim {m['dim']} is not divisible by n_heads {m['n_heads']}")
    elif (m['dim'] // m['n_heads']) % 2:
        errors.append(f"head_dim {m['dim'] // m['n_heads']} must be even for RoPE")
    if m['n_heads'] % n_kv:
        errors.append(f"n_heads {m['n_heads']} is not divisible by n_kv_heads {n_kv}")
    if errors:
        raise ValueError('; '.join(errors))
    return ModelArgs(
        dim=m['dim'], n_layers=m['n_layers'], n_heads=m['n_heads'], n_kv_heads=n_kv,
        head_dim=m['dim'] // m['n_heads'],
        ffn_hidden=ffn_hidden_size(m['dim'], m.get('multiple_of', 256), m.get('ffn_dim_multiplier'),
                                   m.get('ffn_hidden', 0)),
        vocab_size=m['vocab_size'], max_seq_len=m['max_seq_len'], norm_eps=float(m.get('norm_eps', 1e-6)),
        rope_theta=float(m.get('rope_theta', 10000.0)), tie_embeddings=bool(m.get('tie_embeddings', False)),
        compute_dtype=m.get('compute_dtype', 'float32'), pad_id=m.get('pad_id', 0),
        ignore_id=m.get('ignore_id', -100), lora_alpha=float(m.get('lora_alpha', 0.0)),
        lora_dropout=float(m.get('lora_dropout', 0.0)), recompute=bool(m.get('recompute', False)))


# ----------------------------------------------------------------------------------------------------------------------
# Parameters

def param_shapes(args):
    """Name -> shape of every parameter, in MindFormers' names and order."""
    D, F, V, KVD = args.dim, args.ffn_hidden, args.vocab_size, args.n_kv_heads * args.head_dim
    shapes = {EMBEDDING: (V, D)}
    for i in range(args.n_layers):
        p = f'model.layers.{i}.'
        shapes.update({
            p + 'attention_norm.weight': (D,),
            p + 'attention.wq.weight': (D, D), p + 'attention.wk.weight': (KVD, D),
            p + 'attention.wv.weight': (KVD, D), p + 'attention.wo.weight': (D, D),
            p + 'ffn_norm.weight': (D,),
            p + 'feed_forward.w1.weight': (F, D), p + 'feed_forward.w2.weight': (D, F),
            p + 'feed_forward.w3.weight': (F, D)})
    shapes['model.norm_out.weight'] = (D,)
    if not args.tie_embeddings:
        shapes['lm_head.weight'] = (V, D)
    return shapes


def count_params(args):
    return sum(math.prod(s) for s in param_shapes(args).values())


def init_params(args, seed=0):
    """Normal(0, 0.02) weights, residual projections scaled by 1/sqrt(2 * n_layers) (GPT-2 / llama2.c), unit norms."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(args).items():
        if name.endswith('norm.weight') or name.endswith('norm_out.weight'):
            value = np.ones(shape, np.float32)
        else:
            std = 0.02 / math.sqrt(2 * args.n_layers) if name.endswith(('wo.weight', 'w2.weight')) else 0.02
            value = rng.standard_normal(shape, dtype=np.float32) * std
        params[name] = Tensor(value)
    return params


def check_params(params, args):
    """Raise ValueError naming every missing, unexpected or misshapen tensor."""
    expected = param_shapes(args)
    problems = [f'missing {k}' for k in expected if k not in params]
    problems += [f'unexpected {k}' for k in params if k not in expected]
    problems += [f'{k} has shape {tuple(params[k].shape)}, the config needs {s}'
                 for k, s in expected.items() if k in params and tuple(params[k].shape) != s]
    if problems:
        more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
        raise ValueError('checkpoint does not match the model config: ' + '; '.join(problems[:3]) + more)


def lora_shapes(args, rank, targets):
    """Name -> shape of the LoRA tensors for every linear layer whose name (without '.weight') fully matches the
    regex targets: A [rank, in], B [out, rank]."""
    pattern = re.compile(targets)
    shapes = {}
    for name, (out_features, in_features) in ((k, v) for k, v in param_shapes(args).items() if len(v) == 2):
        linear_name = name[:-len('.weight')]
        if name.startswith('model.layers.') and pattern.fullmatch(linear_name):
            shapes[linear_name + LORA_A] = (rank, in_features)
            shapes[linear_name + LORA_B] = (out_features, rank)
    if not shapes:
        raise ValueError(f'the LoRA targets {targets!r} match no linear layer (names look like '
                         f'model.layers.0.attention.wq)')
    return shapes


def init_lora(args, rank, targets, seed=0):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform), B = 0: the adapted model starts equal to the base."""
    rng = np.random.default_rng(seed)
    lora = {}
    for name, shape in lora_shapes(args, rank, targets).items():
        if name.endswith(LORA_A):
            lora[name] = Tensor(rng.uniform(-1, 1, shape).astype(np.float32) / math.sqrt(shape[1]))
        else:
            lora[name] = Tensor(np.zeros(shape, np.float32))
    return lora


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks

# Every matmul and the embedding lookup go through one of these primitives, so that the sharding plan can attach a
# strategy to each kind (apply_sharding). Stand-alone, strategies have no effect.
KERNELS = {'column': ops.MatMul(transpose_b=True),  # x @ W.T, W [out, in] split by output rows
           'row': ops.MatMul(transpose_b=True),     # x @ W.T, W split by input columns: partial sums
           'replicated': ops.MatMul(transpose_b=True),
           'lm_head': ops.MatMul(transpose_b=True),
           'scores': ops.BatchMatMul(transpose_b=True),  # q @ k.T per kv head
           'mix': ops.BatchMatMul(),                     # probs @ v per kv head
           'embedding': ops.Gather()}


def linear(x, w, kernel='replicated'):
    lead = x.shape[:-1]
    return KERNELS[kernel](x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[0])


def project(x, params, prefix, projection, args, lora=None, seed=None):
    """The linear layer prefix + projection (e.g. 'model.layers.0.attention.' + 'wq'), plus its LoRA branch
    x·Aᵀ·Bᵀ·(alpha/rank) when the lora dict holds one. seed (an int32 Tensor, unique per step and layer) switches on
    LoRA dropout."""
    name, kernel = prefix + projection, PROJECTION_KERNEL[projection]
    y = linear(x, params[name + '.weight'], kernel)
    if lora is None or name + LORA_A not in lora:
        return y
    a, b = lora[name + LORA_A], lora[name + LORA_B]
    if seed is not None and args.lora_dropout > 0:
        x = dropout(x, args.lora_dropout, seed * 8 + PROJECTIONS.index(projection))
    # column-parallel layers split B's rows, row-parallel ones A's columns (see SHARDING)
    down = linear(x, a, 'row' if kernel == 'row' else 'replicated')
    return y + linear(down, b, 'column' if kernel == 'column' else 'replicated') * (args.lora_alpha / a.shape[0])


PROJECTIONS = ('wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'w3')


def hash_uniform(shape, seed):
    """Uniform [0, 1) numbers from an integer hash of (seed, element index).

    MindSpore's in-graph RNG state cannot be saved or reset, so a resumed run would draw other dropout masks; this
    counter-based hash (two rounds of multiply-xorshift, int32 arithmetic wrapping) gives the same masks for the same
    seed in any run."""
    n = math.prod(shape)
    x = ops.arange(n, dtype=ms.int32).reshape(shape) + seed * 0x2545F491
    for _ in range(2):
        x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, 16)) * 0x45D9F3B
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, 16))
    return ops.bitwise_and(x, 0xFFFFFF).astype(ms.float32) * (1.0 / (1 << 24))


def dropout(x, rate, seed):
    keep = (hash_uniform(x.shape, seed) >= rate).astype(x.dtype)
    return x * keep * (1.0 / (1.0 - rate))


def spread(y, x):
    """y broadcast to x's shape, as its own kernel. MindSpore 2.10's CPU arithmetic kernels, when they broadcast an
    operand themselves, take output-sized buffers that the graph never reuses: 20 such multiplies of a 32 MB tensor
    held 1.4 GB, the same with spread() 0.1 GB. Every broadcast onto activations in the layers goes through here
    (masks and positions built once per call are small and broadcast directly)."""
    return ops.broadcast_to(y, x.shape)


def rms_norm(x, weight, eps):
    """Computed in fp32 whatever the compute dtype, as HF and MindFormers do. weight None: already folded into the
    next matmul (fuse_for_decoding)."""
    x32 = x.astype(ms.float32)
    x32 = x32 * spread(ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + eps), x32)
    y = x32.astype(x.dtype)
    return y if weight is None else y * spread(weight, y)


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


def attention(x, params, prefix, args, cos, sin, mask, cache=None, cache_slots=None, lora=None, seed=None):
    """Grouped-query attention. x [B, T, D]; mask [B, 1, 1, T, S] additive; cache (k, v): Parameters
    [B, KV, S, hd] that this call's keys and values are written into, in place, at slots cache_slots [T].

    Returns the output and this call's k, v (the whole cache when there is one).
    """
    B, T, _ = x.shape
    H, KV, hd = args.n_heads, args.n_kv_heads, args.head_dim
    scale = 1.0 / math.sqrt(hd)
    if prefix + 'wqkv.weight' in params:  # fused for decoding: one matmul, one rotation for q and k together
        qk, v = ops.split(linear(x, params[prefix + 'wqkv.weight']).reshape(B, T, H + 2 * KV, hd), [H + KV, KV], 2)
        q, k = ops.split(apply_rope(qk, cos, sin), [H, KV], 2)
        scale = 1.0  # already in wqkv's q rows
    else:
        q = apply_rope(project(x, params, prefix, 'wq', args, lora, seed).reshape(B, T, H, hd), cos, sin)
        k = apply_rope(project(x, params, prefix, 'wk', args, lora, seed).reshape(B, T, KV, hd), cos, sin)
        v = project(x, params, prefix, 'wv', args, lora, seed).reshape(B, T, KV, hd)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, hd]
    if cache is not None:
        # Added into slots that hold zeros (the cache is cleared before each prompt), so this writes k and v, in
        # place. On CPU, scatter_nd_update copies the whole cache per call instead (measured: time grows with S).
        k, v = ops.index_add(cache[0], cache_slots, k, 2), ops.index_add(cache[1], cache_slots, v, 2)
    S, group = k.shape[2], H // KV
    # Query heads sharing a kv head are stacked along the row axis: one batched matmul, no repeated k/v.
    q = q.transpose(0, 2, 1, 3).reshape(B, KV, group * T, hd)
    scores = KERNELS['scores'](q, k).astype(ms.float32)
    scores = scores if scale == 1.0 else scores * scale
    scores = scores.reshape(B, KV, group, T, S)
    probs = ops.softmax(scores + spread(mask, scores), -1).astype(x.dtype)
    out = KERNELS['mix'](probs.reshape(B, KV, group * T, S), v)  # [B, KV, group*T, hd]
    out = out.reshape(B, H, T, hd).transpose(0, 2, 1, 3).reshape(B, T, H * hd)
    return project(out, params, prefix, 'wo', args, lora, seed), (k, v)


def feed_forward(x, params, prefix, args, lora=None, seed=None):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""
    if prefix + 'w13.weight' in params:  # fused for decoding
        gate, up = ops.split(linear(x, params[prefix + 'w13.weight']), args.ffn_hidden, -1)
    else:
        gate = project(x, params, prefix, 'w1', args, lora, seed)
        up = project(x, params, prefix, 'w3', args, lora, seed)
    return project(ops.silu(gate) * up, params, prefix, 'w2', args, lora, seed)


def cast_params(params, args):
    """fp32 master weights -> compute dtype (a no-op in fp32)."""
    dtype = getattr(ms, args.compute_dtype)
    if dtype == ms.float32:
        return params
    return {k: v.astype(dtype) for k, v in params.items()}


def block(h, params, prefix, args, cos, sin, mask, cache, cache_slots, lora, seed):
    """One pre-norm decoder layer: h + attention(norm(h)), then + SwiGLU(norm(.)). Returns it and the layer's k, v."""
    a, kv = attention(rms_norm(h, params.get(prefix + 'attention_norm.weight'), args.norm_eps), params, prefix + 'attention.',
                      args, cos, sin, mask, cache, cache_slots, lora, seed)
    h = h + a
    h = h + feed_forward(rms_norm(h, params.get(prefix + 'ffn_norm.weight'), args.norm_eps), params,
                         prefix + 'feed_forward.', args, lora, seed)
    return h, kv


def rope(positions, args, dtype):
    """Full-width cos, sin [B, T, 1, head_dim] (each half repeated) for positions [B, T]."""
    cos_table, sin_table = rope_table(args)
    B, T = positions.shape
    cos = ops.gather(Tensor(np.concatenate([cos_table, cos_table], -1)), positions, 0)
    sin = ops.gather(Tensor(np.concatenate([sin_table, sin_table], -1)), positions, 0)
    return cos.reshape(B, T, 1, -1).astype(dtype), sin.reshape(B, T, 1, -1).astype(dtype)


def head(params, h, args):
    """The final norm and lm_head: h [B, T, D] -> fp32 logits [B, T, V]."""
    h = rms_norm(h, params.get('model.norm_out.weight'), args.norm_eps)
    weight = params[EMBEDDING if args.tie_embeddings and 'lm_head.weight' not in params else 'lm_head.weight']
    return linear(h, weight, 'lm_head').astype(ms.float32)


def transformer(params, tokens, args, positions, mask, cache=None, cache_slots=None, lora=None, seed=None,
                last_only=False):
    """tokens [B, T] -> fp32 logits [B, T, V] (only the last position's, [B, 1, V], with last_only), and the
    per-layer (k, v). lora: adapter tensors by MindFormers name; seed: an int32 Tensor that switches on LoRA dropout
    (training only)."""
    params = cast_params(params, args)
    lora = None if lora is None else cast_params(lora, args)
    cos, sin = rope(positions, args, getattr(ms, args.compute_dtype))
    h = KERNELS['embedding'](params[EMBEDDING], tokens, 0)
    new_cache = []
    for i in range(args.n_layers):
        layer_seed = None if seed is None else seed * args.n_layers + i
        if args.recompute and cache is None:  # keep only each layer's input; recompute the rest in the backward
            h, kv = ms.recompute(block, h, params, f'model.layers.{i}.', args, cos, sin, mask, None, None, lora,
                                 layer_seed)
        else:
            h, kv = block(h, params, f'model.layers.{i}.', args, cos, sin, mask, None if cache is None else cache[i],
                          cache_slots, lora, layer_seed)
        new_cache.append(kv)
    return head(params, h[:, -1:] if last_only else h, args), new_cache


def causal_mask(T):
    allowed = ops.arange(T).reshape(T, 1) >= ops.arange(T).reshape(1, T)
    return ops.select(allowed, ops.zeros((T, T), ms.float32), ops.full((T, T), MASK_VALUE, dtype=ms.float32))


def sequence(B, T):
    """Positions [B, T] and the causal mask [1, 1, 1, T, T] of a full (uncached) forward."""
    positions = ops.broadcast_to(ops.arange(T, dtype=ms.int32).reshape(1, T), (B, T))
    return positions, causal_mask(T).reshape(1, 1, 1, T, T)


def forward(params, tokens, args, lora=None, seed=None):
    """Full causal forward: tokens [B, T] int32 -> logits [B, T, V] float32."""
    positions, mask = sequence(*tokens.shape)
    logits, _ = transformer(params, tokens, args, positions, mask, lora=lora, seed=seed)
    return logits


def shift(input_ids, labels=None):
    """MindFormers' convention: inputs ids[:, :-1], targets labels[:, 1:] (labels default to the ids)."""
    return input_ids[:, :-1], (input_ids if labels is None else labels)[:, 1:]


def token_loss(logits, inputs, targets, args):
    """(mean next-token cross-entropy, scored tokens); a position is not scored when its target is ignore_id or its
    input is pad_id, MindFormers' rules."""
    keep = ops.logical_and(targets != args.ignore_id, inputs != args.pad_id)
    safe_targets = ops.select(keep, targets, ops.zeros_like(targets))
    # log_softmax is one fused kernel (and its gradient another): 9x faster than logits - logsumexp on CPU
    logprobs = ops.log_softmax(logits, -1)
    nll = -ops.gather_d(logprobs, -1, safe_targets.astype(ms.int32).expand_dims(-1)).squeeze(-1)
    weight = keep.astype(ms.float32)
    n_tokens = weight.sum()
    return (nll * weight).sum() / ops.maximum(n_tokens, 1.0), n_tokens


def loss_fn(params, input_ids, args, labels=None, lora=None, seed=None):
    """Mean next-token cross-entropy of rows input_ids [B, T+1] (and labels), and the scored-token count."""
    inputs, targets = shift(input_ids, labels)
    return token_loss(forward(params, inputs, args, lora, seed), inputs, targets, args)


# ----------------------------------------------------------------------------------------------------------------------
# Incremental decoding over a preallocated KV cache

def fuse_for_decoding(params, args):
    """The weights decoding runs on, fewer kernels per token (each costs microseconds on CPU however small): per
    layer one [wq; wk; wv] and one [w1; w3] matrix with the RMSNorm weight before them folded into their columns
    (W·diag(g) x = W (g * x)), the attention scale 1/sqrt(head_dim) folded into the wq rows, and the final norm into
    lm_head. Equal to the unfused model up to fp32 rounding. Checkpoints keep MindFormers' separate tensors; this is
    built at load time (numpy, on the host)."""
    p = {k: v.asnumpy() for k, v in params.items()}
    fused = {EMBEDDING: p[EMBEDDING],
             'lm_head.weight': p['lm_head.weight' if 'lm_head.weight' in p else EMBEDDING] * p['model.norm_out.weight']}
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
    """Per layer a (k, v) pair of zero Parameters [B, KV, max_len, hd], which decoding writes into in place. They
    must be zeroed again (clear_cache) before they take another prompt."""
    shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
    dtype = getattr(ms, args.compute_dtype)
    return [(ms.Parameter(ops.zeros(shape, dtype), name=f'cache.{i}.k'),
             ms.Parameter(ops.zeros(shape, dtype), name=f'cache.{i}.v')) for i in range(args.n_layers)]


def clear_cache(cache):
    """Zero every slot of the cache (in place), ready for a new prompt. Returns a dummy: a compiled call needs an
    output."""
    for k, v in cache:
        ops.assign(k, ops.zeros_like(k))
        ops.assign(v, ops.zeros_like(v))
    return ms.Tensor(0)


def forward_cached(params, tokens, args, cache, slot, start, lora=None):
    """Run tokens [B, T] that occupy cache slots slot..slot+T-1, writing their keys and values into the cache;
    returns the last position's logits [B, V] (the only ones generation needs: a prefill skips the lm_head for the
    rest).

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
    logits, _ = transformer(params, tokens, args, positions, mask.reshape(B, 1, 1, T, S), cache, query_slot, lora,
                            last_only=True)
    return logits.reshape(B, -1)


# ----------------------------------------------------------------------------------------------------------------------
# The sharding plan: one table, from which every layout and strategy is derived

class ParallelArgs(NamedTuple):
    """MindFormers' parallel_config: a mesh of data_parallel x model_parallel devices per pipeline stage."""
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    optimizer_shard: bool = False    # split AdamW's moments over data-parallel ranks (ZeRO-1)
    vocab_emb_dp: bool = True        # True: embedding and lm_head replicated over mp; False: vocabulary split over mp
    gradient_aggregation_group: int = 4  # data-parallel gradients are all-reduced in this many fused buckets
    recompute: bool = False


# Parameter name pattern -> how each dimension is split over the model-parallel axis: 'mp', None (replicated), or
# 'vocab' (= 'mp' when vocab_emb_dp is False). Megatron's layout: wq/wk/wv/w1/w3 are column-parallel (output rows,
# i.e. heads, split), wo/w2 row-parallel (input columns split; their partial outputs are all-reduced). Every
# parameter is replicated over data-parallel ranks. Ordered: the first match wins; a name no rule matches is an error.
SHARDING = (
    (r'model\.tok_embeddings\.embedding_weight', ('vocab', None)),
    (r'lm_head\.weight', ('vocab', None)),
    (r'model\.layers\.\d+\.attention\.w[qkv]\.weight', ('mp', None)),
    (r'model\.layers\.\d+\.feed_forward\.w[13]\.weight', ('mp', None)),
    (r'model\.layers\.\d+\.attention\.wo\.weight', (None, 'mp')),
    (r'model\.layers\.\d+\.feed_forward\.w2\.weight', (None, 'mp')),
    (r'model\.layers\.\d+\.(attention|ffn)_norm\.weight|model\.norm_out\.weight', (None,)),
    (r'model\.layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])' + re.escape(LORA_A), (None, None)),
    (r'model\.layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])' + re.escape(LORA_B), ('mp', None)),
    (r'model\.layers\.\d+\.(attention\.wo|feed_forward\.w2)' + re.escape(LORA_A), (None, 'mp')),
    (r'model\.layers\.\d+\.(attention\.wo|feed_forward\.w2)' + re.escape(LORA_B), (None, None)),
)


def partition(name, vocab_emb_dp=True):
    """How parameter `name` is split: a tuple with 'mp' or None per dimension."""
    for pattern, dims in SHARDING:
        if re.fullmatch(pattern, name):
            return tuple('mp' if d == 'mp' or (d == 'vocab' and not vocab_emb_dp) else None for d in dims)
    raise ValueError(f'no sharding rule matches parameter {name}: add one to llama.SHARDING')


def kernel_of(weight_partition):
    return {('mp', None): 'column', (None, 'mp'): 'row'}.get(weight_partition, 'replicated')


# Which kernel each projection uses, read off the table (so the layers never restate the layout).
PROJECTION_KERNEL = {p: kernel_of(partition(f'model.layers.0.{"attention" if p[1] in "qkvo" else "feed_forward"}.{p}'
                                            '.weight')) for p in ('wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'w3')}


def sharding_plan(names, parallel):
    """{name: partition} for every parameter name."""
    return {name: partition(name, parallel.vocab_emb_dp) for name in names}


def layouts(plan, parallel):
    """{name: per-dimension split factor}, the form of MindSpore's parameter_plan / Parameter layouts."""
    return {name: tuple(parallel.model_parallel if d == 'mp' else 1 for d in dims) for name, dims in plan.items()}


def kernel_strategies(parallel):
    """The in_strategy of every kernel over a (dp, mp) mesh, consistent with SHARDING: activations are split over dp
    by batch; column kernels split W's rows, row kernels the contraction (partial sums are all-reduced by MindSpore);
    attention is split over (kv) heads; the vocabulary over mp unless vocab_emb_dp."""
    dp, mp = parallel.data_parallel, parallel.model_parallel
    vocab = 1 if parallel.vocab_emb_dp else mp
    return {'column': ((dp, 1), (mp, 1)), 'row': ((dp, mp), (1, mp)), 'replicated': ((dp, 1), (1, 1)),
            'lm_head': ((dp, 1), (vocab, 1)), 'scores': ((dp, mp, 1, 1), (dp, mp, 1, 1)),
            'mix': ((dp, mp, 1, 1), (dp, mp, 1, 1)), 'embedding': ((vocab, 1), (dp, 1))}


def apply_sharding(parallel):
    """Attach the plan's strategies to the kernels (used by MindSpore's semi-auto parallel; no effect stand-alone)."""
    for kernel, strategy in kernel_strategies(parallel).items():
        KERNELS[kernel].shard(strategy)


def enable_semi_auto(parallel, devices):
    """Hand the model-parallel split to MindSpore's semi-auto parallel compiler: the kernels carry the plan's
    strategies, MindSpore slices the weights they consume and inserts the collectives (including the data-parallel
    gradient all-reduce), and optimizer_shard splits AdamW's state over data-parallel ranks. MindSpore 2.10 compiles
    this only on Ascend and GPU."""
    ms.set_auto_parallel_context(parallel_mode='semi_auto_parallel', device_num=devices, full_batch=False,
                                 gradients_mean=False, enable_parallel_optimizer=parallel.optimizer_shard)
    apply_sharding(parallel)


def stage_of(name, n_layers, pipeline_stage):
    """MindFormers' pipeline assignment: layer i on stage min(i // ceil(L / pp), pp - 1), the embedding on the first
    stage, the final norm and lm_head on the last."""
    match = re.match(r'model\.layers\.(\d+)\.', name)
    if match:
        return min(int(match.group(1)) // math.ceil(n_layers / pipeline_stage), pipeline_stage - 1)
    return 0 if name == EMBEDDING else pipeline_stage - 1


def parallel_problems(args, parallel, devices=None):
    """Every reason the parallel config cannot run this model (an empty list when it can)."""
    dp, mp, pp = parallel.data_parallel, parallel.model_parallel, parallel.pipeline_stage
    problems = [f'{k} must be at least 1, got {v}' for k, v in parallel._asdict().items()
                if isinstance(v, int) and not isinstance(v, bool) and v < 1]
    if problems:
        return problems
    if devices is not None and dp * mp * pp != devices:
        problems.append(f'data_parallel x model_parallel x pipeline_stage = {dp} x {mp} x {pp} = {dp * mp * pp}, '
                        f'but there are {devices} devices')
    for what, size in (('n_heads', args.n_heads), ('n_kv_heads', args.n_kv_heads), ('dim', args.dim),
                       ('ffn_hidden', args.ffn_hidden)) + ((('vocab_size', args.vocab_size),)
                                                           if not parallel.vocab_emb_dp else ()):
        if size % mp:
            problems.append(f'{what} {size} is not divisible by model_parallel {mp}')
    if pp > args.n_layers:
        problems.append(f'pipeline_stage {pp} exceeds the {args.n_layers} layers')
    if pp > 1 and parallel.micro_batch_num < pp:
        problems.append(f'micro_batch_num {parallel.micro_batch_num} must be at least pipeline_stage {pp}')
    return problems
