"""Train or evaluate a LLaMA.

    python train.py                                        # configs/tiny.py on the bundled WikiText-2
    python train.py --config configs/7b.py --config.data.train=wiki2048.mindrecord
    python train.py --config configs/tiny.py --config.train.resume=True

One compiled step does the forward, the backward, global-norm clipping and AdamW (fp32 state) on a dict of named
tensors; the learning rate is an input, so the schedule never recompiles. Checkpoints hold the weights under
MindFormers' names, the model config, AdamW's moments (`adam_m.*`, `adam_v.*`) and the position in the data.
"""
import functools
import glob
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from typing import NamedTuple

import numpy as np

os.environ.setdefault('GLOG_v', '3')  # MindSpore's C++ warnings off, before it is imported
import mindspore as ms  # noqa: E402
from mindspore import ops  # noqa: E402

import convert  # noqa: E402
import data  # noqa: E402
import llama  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GB = 1024 ** 3


class RunError(Exception):
    """A run that cannot start or continue; the message says what to do."""


def resolve(path):
    """Paths in configs are relative to the working directory, or else to this repository (bundled assets)."""
    if not path or os.path.isabs(path) or glob.glob(path):
        return path
    bundled = os.path.join(HERE, path)
    return bundled if glob.glob(bundled) else path


# ----------------------------------------------------------------------------------------------------------------------
# Learning rate and optimizer (pure functions over dicts of tensors)

def learning_rate(step, total_steps, t):
    """MindFormers' CosineWithWarmUpLR: linear warmup for int(total * warmup_ratio) steps, then cosine to lr_end."""
    warmup = int(total_steps * t.warmup_ratio)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return t.lr_end + (t.lr - t.lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class OptimizerArgs(NamedTuple):
    """AdamW's and the loss scaler's constants, closed over by the compiled step."""
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction: bool
    grad_clip: float
    loss_scaling: bool = False  # dynamic loss scaling (for fp16 compute)
    scale_window: int = 1000    # clean steps before the loss scale doubles
    data_parallel: int = 1      # processes whose gradients are summed (all-reduced) inside the step
    grad_buckets: tuple = ()    # gradient_buckets(): the all-reduce fuses the gradients into these flat buffers
    layerwise: bool = False     # compile one layer and loop over layers on the host (see layerwise_step)


def optimizer_args(t, n_layers, data_parallel=1, trainable=None, buckets=1):
    """OptimizerArgs from the train section; with data parallelism, the gradient buckets of the trainable tensors."""
    grad_buckets = gradient_buckets({k: v.shape for k, v in trainable.items()}, buckets) if data_parallel > 1 else ()
    return OptimizerArgs(t.beta1, t.beta2, t.eps, t.weight_decay, t.bias_correction, t.grad_clip, t.loss_scale > 0,
                         t.loss_scale_window, data_parallel, grad_buckets,
                         0 < t.layerwise_from <= n_layers)


def decays(name):
    """Weight decay applies to matrices, never to norm weights."""
    return not name.endswith(('norm.weight', 'norm_out.weight'))


def square_sum(grads):
    total = 0.0
    for g in grads.values():  # reducing the last axis first is 10x faster than one full ReduceSum on CPU
        total = total + (g * g).sum(-1).sum()
    return total


def global_norm(grads):
    return ops.sqrt(square_sum(grads))


def clip_factor(norm, max_norm):
    """What gradients of global norm `norm` are multiplied by to clip them to max_norm (1 when max_norm is 0)."""
    return max_norm / ops.maximum(norm, max_norm) if max_norm else 1.0


def clip_by_global_norm(grads, max_norm):
    norm = global_norm(grads)
    return {k: g * clip_factor(norm, max_norm) for k, g in grads.items()}, norm


def adamw(state, grads, lr, opt, grad_scale=1.0):
    """One AdamW step with fp32 moments and decoupled weight decay (lr x weight_decay x p); returns the new state.

    grad_scale multiplies the gradients inside the moment updates' scalars, so unscaling and clipping cost no pass of
    their own, and
    Adam's bias correction is folded into the step size and epsilon, as PyTorch does: m̂ / (√v̂ + ε) =
    (√c2 / c1) · m / (√v + ε√c2) with c = 1 - β^t, exactly. Each is a pass over every weight saved (26% of the
    update's time on CPU)."""
    step = state['step'] + 1
    if opt.bias_correction:
        t = step.astype(ms.float32)
        c1, root_c2 = 1.0 - ops.pow(opt.beta1, t), ops.sqrt(1.0 - ops.pow(opt.beta2, t))
        step_size, eps = lr * root_c2 / c1, opt.eps * root_c2
    else:
        step_size, eps = lr, opt.eps
    m_rate, v_rate = (1.0 - opt.beta1) * grad_scale, (1.0 - opt.beta2) * grad_scale * grad_scale  # scalars
    params, m, v = {}, {}, {}
    for k, p in state['params'].items():
        g = grads[k]
        m[k] = opt.beta1 * state['adam_m'][k] + m_rate * g
        v[k] = opt.beta2 * state['adam_v'][k] + v_rate * (g * g)
        if opt.weight_decay and decays(k):
            p = p * (1.0 - lr * opt.weight_decay)
        params[k] = p - step_size * (m[k] / (ops.sqrt(v[k]) + eps))
    return {'params': params, 'adam_m': m, 'adam_v': v, 'step': step, 'loss_scale': state['loss_scale'],
            'good_steps': state['good_steps']}


def skip_if_overflow(old, new, finite, opt):
    """Dynamic loss scaling: keep the update and count a clean step, or drop the update and halve the scale; the
    scale doubles after scale_window clean steps in a row."""
    def pick(a, b):
        return {k: ops.select(finite, b[k], a[k]) for k in a}
    good = ops.select(finite, old['good_steps'] + 1, ops.zeros_like(old['good_steps']))
    grow = good >= opt.scale_window
    scale = ops.select(finite, ops.select(grow, old['loss_scale'] * 2.0, old['loss_scale']),
                       ops.maximum(old['loss_scale'] * 0.5, 1.0))
    return {'params': pick(old['params'], new['params']), 'adam_m': pick(old['adam_m'], new['adam_m']),
            'adam_v': pick(old['adam_v'], new['adam_v']), 'step': ops.select(finite, new['step'], old['step']),
            'loss_scale': scale, 'good_steps': ops.select(grow, ops.zeros_like(good), good)}


def init_state(trainable, loss_scale=0.0):
    """The optimizer state around the trainable tensors (all weights, or only the LoRA adapters)."""
    return {'params': trainable, 'adam_m': {k: ops.zeros_like(v) for k, v in trainable.items()},
            'adam_v': {k: ops.zeros_like(v) for k, v in trainable.items()}, 'step': ms.Tensor(0, ms.int32),
            'loss_scale': ms.Tensor(loss_scale or 1.0, ms.float32), 'good_steps': ms.Tensor(0, ms.int32)}


# ----------------------------------------------------------------------------------------------------------------------
# Compiled steps (cached per model shape and optimizer constants, so every caller shares the graphs)

@functools.cache
def compiled_steps(args, opt):
    """The jitted functions for one model and optimizer. With LoRA (args.lora_alpha > 0) the trainable tensors are
    the adapters and `frozen` holds the base weights; otherwise the trainable tensors are the weights and frozen is
    None."""
    lora_mode = args.lora_alpha > 0

    def scaled_loss(trainable, frozen, batch, seed, scale):
        """Mean loss times the loss scale: what the backward starts from, as in MindFormers."""
        params, lora = (frozen, trainable) if lora_mode else (trainable, None)
        loss, n_tokens = llama.loss_fn(params, batch[0], args, batch[1] if len(batch) > 1 else None, lora,
                                       seed if args.lora_dropout > 0 else None)
        return loss * scale, (loss, n_tokens)

    scaled_grad_fn = ms.value_and_grad(scaled_loss, grad_position=0, has_aux=True)

    def grad_fn(trainable, frozen, batch, seed, scale):
        """Gradients of the loss summed over scored tokens (so micro-batches add up exactly), still scaled. The
        token count multiplies the fp32 gradients, not the loss, so fp16 activations see only the loss scale."""
        (_, (loss, n_tokens)), grads = scaled_grad_fn(trainable, frozen, batch, seed, scale)
        return (loss, n_tokens), {k: g * n_tokens for k, g in grads.items()}

    def apply(state, grad_sum, stats, lr):
        """stats = [loss sum, scored tokens, stop votes] of this process; across data-parallel processes both the
        gradient sums and the stats are summed, so every rank takes the same step as one process with the global
        batch would."""
        if opt.data_parallel > 1:
            grad_sum = all_reduce_in_buckets(grad_sum, opt.grad_buckets)
            stats = ALL_REDUCE(stats)
        n_tokens = ops.maximum(stats[1], 1.0)
        unscale = 1.0 / (n_tokens * state['loss_scale'])  # summed over tokens and loss-scaled -> a mean gradient
        grad_norm = global_norm(grad_sum) * unscale
        new = adamw(state, grad_sum, lr, opt, unscale * clip_factor(grad_norm, opt.grad_clip))
        if opt.loss_scaling:  # the global norm is finite exactly when every gradient is
            new = skip_if_overflow(state, new, ops.isfinite(grad_norm), opt)
        return new, {'loss': stats[0] / n_tokens, 'grad_norm': grad_norm, 'stop': stats[2]}

    @ms.jit
    def train_step(state, frozen, batch, lr, seed, stop):
        (loss, n_tokens), grad_sum = grad_fn(state['params'], frozen, batch, seed, state['loss_scale'])
        return apply(state, grad_sum, ops.stack([loss * n_tokens, n_tokens, stop]), lr)

    @ms.jit
    def micro_grads(trainable, frozen, batch, seed, scale):
        (loss, n_tokens), grad_sum = grad_fn(trainable, frozen, batch, seed, scale)
        return grad_sum, loss * n_tokens, n_tokens

    @ms.jit
    def add_grads(acc, grad_sum):
        return {k: acc[k] + g for k, g in grad_sum.items()}

    @ms.jit
    def apply_step(state, grad_sum, stats, lr):
        return apply(state, grad_sum, stats, lr)

    @ms.jit
    def eval_step(params, lora, batch):
        loss, n_tokens = llama.loss_fn(params, batch[0], args, batch[1] if len(batch) > 1 else None, lora)
        return loss * n_tokens, n_tokens

    return train_step, micro_grads, add_grads, apply_step, eval_step


def as_tensors(batch):
    """A batch (tuple of arrays) as a jit input. Without mutable, jit treats a tuple as a constant and recompiles."""
    return ms.mutable(tuple(ms.Tensor(x) for x in batch))


def mutable_or_none(d):
    return None if d is None else ms.mutable(d)


def train_step(state, frozen, micro_batches, lr, seed, args, opt, stop=False):
    """One optimizer step over a list of micro-batches (each a tuple of int32 arrays) -> (state, metrics): loss and
    grad_norm, and stop (how many data-parallel processes asked to stop; `stop` is this one's vote).

    One micro-batch runs as a single compiled graph; more accumulate token-weighted gradient sums first, so the
    result equals one big batch. seed (an int) seeds LoRA dropout."""
    if opt.layerwise:
        return layerwise_step(state, frozen, micro_batches, lr, seed, args, opt, stop)
    fused, micro_grads, add_grads, apply_step, _ = compiled_steps(args, opt)
    lr, frozen, stop = ms.Tensor(lr, ms.float32), mutable_or_none(frozen), float(stop)
    if len(micro_batches) == 1:
        return fused(ms.mutable(state), frozen, as_tensors(micro_batches[0]), lr, ms.Tensor(seed, ms.int32),
                     ms.Tensor(stop, ms.float32))
    grad_sum, loss_sum, n_tokens = None, 0.0, 0.0
    for i, batch in enumerate(micro_batches):
        g, l_sum, n = micro_grads(ms.mutable(state['params']), frozen, as_tensors(batch),
                                  ms.Tensor(seed * len(micro_batches) + i, ms.int32), state['loss_scale'])
        grad_sum = g if grad_sum is None else add_grads(ms.mutable(grad_sum), ms.mutable(g))
        loss_sum, n_tokens = loss_sum + l_sum, n_tokens + n
    stats = ops.stack([loss_sum, n_tokens, ms.Tensor(stop, ms.float32)])
    return apply_step(ms.mutable(state), ms.mutable(grad_sum), stats, lr)


ALL_REDUCE = None  # ops.AllReduce() (a sum over all processes), made by init_distributed once the cluster exists


def gradient_buckets(shapes, buckets):
    """Split tensor names into `buckets` contiguous groups of similar total size (MindFormers'
    gradient_aggregation_group): a tuple of groups of (name, size), a constant of the compiled step."""
    sizes = [(name, math.prod(shape)) for name, shape in shapes.items()]
    target, groups, current, filled = sum(n for _, n in sizes) / buckets, [], [], 0
    for name, size in sizes:
        current.append((name, size))
        filled += size
        if filled >= target * (len(groups) + 1) and len(groups) < buckets - 1:
            groups.append(tuple(current))
            current = []
    return tuple(groups + [tuple(current)] if current else groups)


def all_reduce_in_buckets(grads, buckets):
    """Sum gradients over processes with one all-reduce per bucket of concatenated, flattened tensors instead of one
    per tensor."""
    out = {}
    for group in buckets:
        flat = ALL_REDUCE(ops.concat([grads[name].reshape(-1) for name, _ in group]))
        offset = 0
        for name, size in group:
            out[name] = flat[offset:offset + size].reshape(grads[name].shape)
            offset += size
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Layer by layer (train.layerwise): the same step cut into a few graphs — the embedding, one transformer layer, the
# head and loss, one optimizer group — each compiled once and run for every layer from a host loop. MindSpore's
# compile time grows faster than the number of layers it unrolls; this way it does not depend on depth. The price:
# each layer's forward runs twice (the backward recomputes it from the saved layer input), and a few calls per layer.

LAYER = re.compile(r'model\.layers\.(\d+)\.(.+)')
LAYER0 = 'model.layers.0.'


def split_layers(tensors, n_layers):
    """{name: tensor} -> (the other tensors, one dict per layer with its names rewritten as layer 0's): every layer
    then has the same names and shapes, so one compiled graph serves them all."""
    rest, layers = {}, [{} for _ in range(n_layers)]
    for name, tensor in tensors.items():
        match = LAYER.fullmatch(name)
        if match:
            layers[int(match.group(1))][LAYER0 + match.group(2)] = tensor
        else:
            rest[name] = tensor
    return rest, layers


def join_layers(rest, layers):
    joined = dict(rest)
    for i, layer in enumerate(layers):
        joined.update({f'model.layers.{i}.' + name[len(LAYER0):]: tensor for name, tensor in layer.items()})
    return joined


@functools.cache
def layerwise_steps(args, opt):
    """The pieces of a layer-by-layer step, jitted; with LoRA the trainable tensors are the adapters."""
    lora_mode = args.lora_alpha > 0

    def layer(trainable, frozen, h, seed):
        params, lora = (frozen, trainable) if lora_mode else (trainable, None)
        positions, mask = llama.sequence(h.shape[0], h.shape[1])
        cos, sin = llama.rope(positions, args, h.dtype)
        return llama.block(h, llama.cast_params(params, args), LAYER0, args, cos, sin, mask, None, None,
                           None if lora is None else llama.cast_params(lora, args),
                           seed if args.lora_dropout > 0 else None)[0]

    def layer_dot(trainable, frozen, h, seed, dh):
        """Its gradient is the layer's vector-Jacobian product with dh (MindSpore's vjp takes no dicts)."""
        return (layer(trainable, frozen, h, seed).astype(ms.float32) * dh).sum()

    def head_loss(rest, h, inputs, targets, scale):
        loss, n_tokens = llama.token_loss(llama.head(llama.cast_params(rest, args), h, args), inputs, targets, args)
        return loss * scale, (loss, n_tokens)

    def embed(table, inputs):
        return llama.KERNELS['embedding'](table.astype(getattr(ms, args.compute_dtype)), inputs, 0)

    def embed_dot(table, inputs, dh):
        return (embed(table, inputs).astype(ms.float32) * dh).sum()

    layer_vjp = ms.grad(layer_dot, grad_position=(0, 2))
    embed_vjp = ms.grad(embed_dot, grad_position=0)
    # with LoRA the head is frozen: only the gradient into the last layer's output is needed
    head_grad = ms.value_and_grad(head_loss, grad_position=1 if lora_mode else (0, 1), has_aux=True)

    @ms.jit
    def head_step(rest, h, inputs, targets, scale):
        (_, (loss, n_tokens)), grads = head_grad(rest, h, inputs, targets, scale)
        return loss, n_tokens, grads

    @ms.jit
    def layer_backward(trainable, frozen, h, seed, dh):
        return layer_vjp(trainable, frozen, h, seed, dh)

    @ms.jit
    def embed_backward(table, inputs, dh):
        return embed_vjp(table, inputs, dh)

    @ms.jit
    def weigh(acc, grads, n_tokens):
        """Token-weighted sums over micro-batches, as the one-graph step keeps them."""
        return {k: g * n_tokens if acc is None else acc[k] + g * n_tokens for k, g in grads.items()}

    @ms.jit
    def reduce_group(grads):
        return all_reduce_in_buckets(grads, (tuple((k, math.prod(g.shape)) for k, g in grads.items()),))

    @ms.jit
    def update_group(group, grads, lr, grad_scale, finite):
        new = adamw(group, grads, lr, opt, grad_scale)
        return skip_if_overflow(group, new, finite, opt) if opt.loss_scaling else new

    return {'layer_forward': ms.jit(layer), 'layer_backward': layer_backward, 'head_step': head_step,
            'embed': ms.jit(embed), 'embed_backward': embed_backward, 'weigh': weigh, 'square_sum': ms.jit(square_sum),
            'reduce_group': reduce_group, 'update': update_group}


def layerwise_step(state, frozen, micro_batches, lr, seed, args, opt, stop=False):
    """train_step, layer by layer (see above): the same arithmetic, so the same results up to fp32 reduction order."""
    f, L, lora_mode = layerwise_steps(args, opt), args.n_layers, args.lora_alpha > 0
    rest, layers = split_layers(state['params'], L)
    frozen_rest, frozen_layers = split_layers(frozen, L) if lora_mode else (None, [None] * L)
    head_params = frozen_rest if lora_mode else rest
    sums = [None] * (L + 1)  # token-weighted gradient sums of each layer, then of the rest (none with LoRA)
    loss_sum = n_sum = ms.Tensor(0.0, ms.float32)
    for m, batch in enumerate(micro_batches):
        inputs, targets = llama.shift(*(ms.Tensor(x) for x in batch))
        layer_seeds = [ms.Tensor((seed * len(micro_batches) + m) * L + i, ms.int32) for i in range(L)]
        h, saved = f['embed'](head_params[llama.EMBEDDING], inputs), []
        for i in range(L):
            saved.append(h)
            h = f['layer_forward'](ms.mutable(layers[i]), mutable_or_none(frozen_layers[i]), h, layer_seeds[i])
        loss, n_tokens, grads = f['head_step'](ms.mutable(head_params), h, inputs, targets, state['loss_scale'])
        grads_of = [None] * L + ([None] if lora_mode else [grads[0]])
        dh = grads if lora_mode else grads[1]
        for i in reversed(range(L)):
            grads_of[i], dh = f['layer_backward'](ms.mutable(layers[i]), mutable_or_none(frozen_layers[i]), saved[i],
                                                  layer_seeds[i], dh.astype(ms.float32))
        if not lora_mode:
            lookup = f['embed_backward'](head_params[llama.EMBEDDING], inputs, dh.astype(ms.float32))
            grads_of[L][llama.EMBEDDING] = grads_of[L][llama.EMBEDDING] + lookup if args.tie_embeddings else lookup
        for i, grads in enumerate(grads_of):
            if grads is not None:
                sums[i] = f['weigh'](mutable_or_none(sums[i]), ms.mutable(grads), n_tokens)
        loss_sum, n_sum = loss_sum + loss * n_tokens, n_sum + n_tokens
    sums = [g for g in sums if g is not None]
    stats = ops.stack([loss_sum, n_sum, ms.Tensor(float(stop), ms.float32)])
    if opt.data_parallel > 1:
        sums, stats = [f['reduce_group'](ms.mutable(g)) for g in sums], ALL_REDUCE(stats)
    n_tokens = max(float(stats[1].asnumpy()), 1.0)
    unscale = 1.0 / (n_tokens * float(state['loss_scale'].asnumpy()))
    grad_norm = math.sqrt(sum(float(f['square_sum'](ms.mutable(g)).asnumpy()) for g in sums)) * unscale
    finite = ms.Tensor(math.isfinite(grad_norm))
    grad_scale = ms.Tensor(unscale * float(clip_factor(ms.Tensor(grad_norm), opt.grad_clip)), ms.float32)
    parts = {key: split_layers(state[key], L) for key in ('params', 'adam_m', 'adam_v')}
    new = [f['update'](ms.mutable({'params': parts['params'][1][i] if i < L else parts['params'][0],
                                   'adam_m': parts['adam_m'][1][i] if i < L else parts['adam_m'][0],
                                   'adam_v': parts['adam_v'][1][i] if i < L else parts['adam_v'][0],
                                   'step': state['step'], 'loss_scale': state['loss_scale'],
                                   'good_steps': state['good_steps']}),
                       ms.mutable(grads), ms.Tensor(lr, ms.float32), grad_scale, finite)
           for i, grads in enumerate(sums)]
    state = {key: join_layers({} if lora_mode else new[L][key], [g[key] for g in new[:L]])
             for key in ('params', 'adam_m', 'adam_v')}
    state.update({key: new[-1][key] for key in ('step', 'loss_scale', 'good_steps')})
    return state, {'loss': stats[0] / n_tokens, 'grad_norm': ms.Tensor(grad_norm, ms.float32), 'stop': stats[2]}


def evaluate(params, lora, loader, args):
    """(mean loss over scored tokens, scored tokens) over the batches of loader (an iterable of array tuples)."""
    eval_step = compiled_steps(args, OptimizerArgs(0.9, 0.95, 1e-8, 0.0, True, 1.0))[-1]
    total, count = 0.0, 0.0
    for batch in loader:
        loss_sum, n = eval_step(ms.mutable(params), mutable_or_none(lora), as_tensors(batch))
        total, count = total + float(loss_sum.asnumpy()), count + float(n.asnumpy())
    return total / max(count, 1.0), count


# ----------------------------------------------------------------------------------------------------------------------
# Throughput and memory

def flops_per_token(args, seq_len):
    """Training FLOPs per token: 6 x (parameters in matmuls) + 12 x layers x dim x seq_len (attention scores and
    mixing, forward and backward), the PaLM count. Norm weights and the embedding lookup are not matmuls; a tied
    lm_head is."""
    shapes = llama.param_shapes(args)
    matmul_params = sum(math.prod(s) for k, s in shapes.items() if len(s) == 2 and k != llama.EMBEDDING)
    matmul_params += args.vocab_size * args.dim if args.tie_embeddings else 0
    return 6 * matmul_params + 12 * args.n_layers * args.dim * seq_len


@functools.cache
def measured_matmul_flops(n=1024, repeats=5):
    """This machine's fp32 matmul throughput (FLOP/s) through MindSpore: the peak MFU is measured against on CPU."""
    a = ms.Tensor(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    matmul = ms.jit(ms.ops.matmul)
    matmul(a, a).asnumpy()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, a).asnumpy()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / float(np.median(times))


def memory_plan(args, parallel, batch_size, seq_len, lora_shapes=None, fp16_weights=False):
    """Bytes per device on the fullest pipeline stage, by kind, for a mesh of dp x mp x pp devices.

    Each parameter counts on the stage llama.stage_of gives it, divided by model_parallel when llama.SHARDING splits
    it. Weights are fp32 masters (4 B) plus a 2-byte copy when computing in 16 bits, or fp16 only (2 B) as
    MindFormers keeps them (fp16_weights); gradients follow the weights' dtype; AdamW's two fp32 moments take 8 B,
    divided by data_parallel with optimizer_shard. With LoRA only the adapters have gradients and moments.
    Activations per layer and micro-batch follow Korthikanti et al. 2022 for tensor parallelism without sequence
    parallelism, s·b·h·(10 + 24/t + 5·a·s/(h·t)) bytes at 16 bits (it counts dropout masks LLaMA does not have, so it
    errs high), doubled for fp32; with recompute a layer keeps only its 16-bit input (2·s·b·h) and one layer's full
    activations exist during its backward. Under 1F1B stage k holds min(pp - k, micro_batch_num) micro-batches in
    flight. The last stage also holds fp32 logits and their gradient."""
    dp, mp, pp = parallel.data_parallel, parallel.model_parallel, parallel.pipeline_stage
    s, b, h, a = seq_len, batch_size, args.dim, args.n_heads
    scale = 1 if args.compute_dtype in ('float16', 'bfloat16') else 2
    full_layer = s * b * h * (10 + 24 / mp + 5 * a * s / (h * mp)) * scale
    kept_layer = 2 * s * b * h * scale if parallel.recompute else full_layer
    logits = 2 * 4 * s * b * args.vocab_size / (1 if parallel.vocab_emb_dp else mp)

    def per_stage(shapes):
        counts = [0.0] * pp
        for name, shape in shapes.items():
            split = mp if 'mp' in llama.partition(name, parallel.vocab_emb_dp) else 1
            counts[llama.stage_of(name, args.n_layers, pp)] += math.prod(shape) / split
        return counts
    weights = per_stage(llama.param_shapes(args))
    trainable = per_stage(lora_shapes) if lora_shapes else weights
    layers = [sum(llama.stage_of(f'model.layers.{i}.', args.n_layers, pp) == k for i in range(args.n_layers))
              for k in range(pp)]
    stages = []
    for k in range(pp):
        in_flight = min(pp - k, parallel.micro_batch_num) if pp > 1 else 1
        stages.append({
            'weights': weights[k] * (2 if fp16_weights else 4),
            'compute copy': weights[k] * 2 if not fp16_weights and scale == 1 else 0,
            'gradients': trainable[k] * (2 if fp16_weights else 4),
            'optimizer': trainable[k] * 8 / (dp if parallel.optimizer_shard else 1),
            'activations': layers[k] * in_flight * kept_layer + (full_layer if parallel.recompute else 0)
            + (logits if k == pp - 1 else 0)})
    return max(stages, key=lambda parts: sum(parts.values()))


def check_fits(args, cfg):
    """Print what a one-device run needs and stop with one line if this machine cannot hold it."""
    import psutil
    lora = llama.lora_shapes(args, cfg.lora.rank, cfg.lora.targets) if cfg.lora.rank else None
    parts = memory_plan(args, llama.ParallelArgs(recompute=cfg.parallel.recompute), cfg.train.batch_size,
                        seq_length(cfg), lora)
    total = sum(parts.values())
    budget = cfg.train.max_memory_gb * GB or psutil.virtual_memory().available
    trainable = sum(math.prod(s) for s in lora.values()) if lora else 0
    print(f'model: {llama.count_params(args):,} parameters' + (f', {trainable:,} trainable (LoRA)' if lora else '')
          + f'; training needs ~{total / GB:.1f} GB (' + ', '.join(f'{k} {v / GB:.1f}' for k, v in parts.items() if v)
          + ')')
    if total > budget:
        raise RunError(f'this run needs ~{total / GB:.1f} GB but only {budget / GB:.1f} GB is available: use a smaller '
                       f'model (configs/tiny.py), a smaller batch, or more devices (see python train.py --plan)')


def plan_configs(args, parallel, devices):
    """Every seed-style (dp, mp, pp) for this many devices that the model divides into, fewest model splits first."""
    found = []
    for mp in range(1, devices + 1):
        for pp in range(1, devices // mp + 1):
            if devices % (mp * pp):
                continue
            candidate = parallel._replace(data_parallel=devices // (mp * pp), model_parallel=mp, pipeline_stage=pp,
                                          micro_batch_num=max(parallel.micro_batch_num, pp))
            if not llama.parallel_problems(args, candidate, devices):
                found.append(candidate)
    return sorted(found, key=lambda p: (p.model_parallel * p.pipeline_stage, p.pipeline_stage))


def print_plan(cfg):
    """--plan: per-device memory of this parallel config on its devices, tokens/s at an assumed MFU, and the
    smallest configurations that fit on the same number of devices."""
    args = run_args(cfg)
    fields = {k: v for k, v in cfg.parallel.items() if k in llama.ParallelArgs._fields}
    parallel = llama.ParallelArgs(**dict(fields, data_parallel=cfg.parallel.data_parallel or 1))
    devices = parallel.data_parallel * parallel.model_parallel * parallel.pipeline_stage
    problems = llama.parallel_problems(args, parallel, devices)
    if problems:
        raise RunError('bad parallel config: ' + '; '.join(problems))
    budget, seq, batch = cfg.parallel.device_memory_gb * GB, seq_length(cfg), cfg.train.batch_size
    lora = llama.lora_shapes(args, cfg.lora.rank, cfg.lora.targets) if cfg.lora.rank else None
    print(f'{llama.count_params(args) / 1e9:.2f} B parameters on {devices} devices of {cfg.parallel.device_memory_gb:g} '
          f'GB: data_parallel {parallel.data_parallel} x model_parallel {parallel.model_parallel} x pipeline_stage '
          f'{parallel.pipeline_stage}, {parallel.micro_batch_num} micro-batches of {batch} x {seq} tokens')
    print(f'{"per device, fullest stage (GB)":50} weights  copy  grads  optim  activ   total  fits')
    for fp16_weights in (False, True):
        for shard, recompute in ((False, False), (True, False), (False, True), (True, True)):
            p = parallel._replace(optimizer_shard=shard, recompute=recompute)
            parts = memory_plan(args, p, batch, seq, lora, fp16_weights)
            label = (f'{"fp16 weights (MindFormers)" if fp16_weights else "fp32 master weights"}'
                     f'{", opt shard" if shard else ""}{", recompute" if recompute else ""}')
            total = sum(parts.values())
            print(f'{label:50}' + ''.join(f'{v / GB:7.1f}' for v in parts.values())
                  + f'{total / GB:8.1f}  {"yes" if total <= budget else "no"}')
    flops = flops_per_token(args, seq)
    print(f'at MFU {cfg.parallel.mfu:g} of {cfg.parallel.device_tflops:g} TFLOPS: '
          f'{cfg.parallel.mfu * cfg.parallel.device_tflops * 1e12 / flops:,.0f} tokens/s per device '
          f'({flops / 1e9:.1f} GFLOP per token)')
    fitting = [p for p in plan_configs(args, parallel, devices)
               if sum(memory_plan(args, p, batch, seq, lora).values()) <= budget]
    print(f'smallest configurations that fit {devices} devices with fp32 master weights (optimizer shard '
          f'{"on" if parallel.optimizer_shard else "off"}, recompute {"on" if parallel.recompute else "off"}): '
          + ('; '.join(f'dp {p.data_parallel} x mp {p.model_parallel} x pp {p.pipeline_stage} '
                       f'({sum(memory_plan(args, p, batch, seq, lora).values()) / GB:.1f} GB)' for p in fitting[:4])
             or 'none'))
    return parallel


# ----------------------------------------------------------------------------------------------------------------------
# Data

def prepare_dataset(path, cfg, rank=0):
    """A .mindrecord is used as is; text files are preprocessed (WikiText rules) once into out_dir/data."""
    path = resolve(path)
    if path.endswith('.mindrecord'):
        return path
    tokenizer_path = resolve(cfg.data.tokenizer)
    files = data.expand_glob(path)
    key = hashlib.sha1(json.dumps([files, os.path.getsize(tokenizer_path) if os.path.isfile(tokenizer_path) else 0,
                                   seq_length(cfg)]).encode()).hexdigest()[:10]
    out = os.path.join(cfg.train.out_dir, 'data', f'{os.path.basename(files[0])}.{seq_length(cfg)}.{key}.mindrecord')
    if rank == 0 and not os.path.isfile(out + '.db'):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tokenizer = data.Tokenizer(tokenizer_path)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise RunError(f'tokenizer {tokenizer_path} has {tokenizer.vocab_size} pieces, more than the model\'s '
                           f'vocab_size {cfg.model.vocab_size}')
        n = data.write_mindrecord(data.wiki_rows(path, tokenizer, seq_length(cfg)), out, data.SCHEMAS['wiki'])
        print(f'preprocessed {path} -> {out} ({n} rows of {seq_length(cfg) + 1} tokens)')
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints

CHECKPOINT = re.compile(r'ckpt_(\d{8})\.ckpt')


def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f'ckpt_{step:08d}.ckpt')


def list_checkpoints(out_dir):
    """Complete training checkpoints, oldest first (temporary files of an interrupted save are not listed)."""
    names = sorted(n for n in os.listdir(out_dir) if CHECKPOINT.fullmatch(n)) if os.path.isdir(out_dir) else []
    return [os.path.join(out_dir, n) for n in names]


def lora_extra(cfg):
    return {'lora_rank': cfg.lora.rank, 'lora_alpha': cfg.lora.alpha, 'lora_targets': cfg.lora.targets}


def save_state(state, cfg, loader_state, step):
    """A training checkpoint: trainable tensors under their MindFormers names, adam_m.* / adam_v.*, the model config,
    the step, the loss scale and the data position. With LoRA the trainable tensors are the adapters only."""
    tensors = dict(state['params'])
    tensors.update({f'adam_m.{k}': v for k, v in state['adam_m'].items()})
    tensors.update({f'adam_v.{k}': v for k, v in state['adam_v'].items()})
    extra = {'global_step': int(step), 'data_position': json.dumps(loader_state), 'run_config': cfg.to_json(),
             'loss_scale': float(state['loss_scale'].asnumpy()), 'good_steps': int(state['good_steps'].asnumpy()),
             'adam_step': int(state['step'].asnumpy()), **(lora_extra(cfg) if cfg.lora.rank else {})}
    path = checkpoint_path(cfg.train.out_dir, step)
    convert.save_checkpoint(path, tensors, cfg.model.to_dict(), extra)
    for old in list_checkpoints(cfg.train.out_dir)[:-cfg.train.keep_checkpoints]:
        os.remove(old)
    return path


def save_adapter(lora, cfg):
    """The adapter alone: LoRA tensors, rank, alpha and targets, and the base model's config."""
    path = os.path.join(cfg.train.out_dir, 'adapter.ckpt')
    convert.save_checkpoint(path, lora, cfg.model.to_dict(), lora_extra(cfg))
    return path


def restore_state(path, expected_shapes):
    """A training checkpoint -> (state, step, data position), its tensors checked against expected_shapes."""
    tensors, _, extra = convert.read_checkpoint(path)
    trainable = {k: v for k, v in tensors.items() if not k.startswith(('adam_m.', 'adam_v.'))}
    problems = [k for k, shape in expected_shapes.items() if k not in trainable or trainable[k].shape != shape]
    problems += [k for k in trainable if k not in expected_shapes]
    if problems:
        raise RunError(f'{path} does not match this run ({len(problems)} tensors differ, e.g. {problems[0]}): '
                       f'resume with the config that wrote it')
    if any(f'adam_m.{k}' not in tensors or f'adam_v.{k}' not in tensors for k in trainable):
        raise RunError(f'{path} holds no optimizer state: it is not a training checkpoint')
    state = {'params': {k: ms.Tensor(v) for k, v in trainable.items()},
             'adam_m': {k: ms.Tensor(tensors[f'adam_m.{k}']) for k in trainable},
             'adam_v': {k: ms.Tensor(tensors[f'adam_v.{k}']) for k in trainable},
             'step': ms.Tensor(int(extra.get('adam_step', extra['global_step'])), ms.int32),
             'loss_scale': ms.Tensor(float(extra.get('loss_scale', 1.0)), ms.float32),
             'good_steps': ms.Tensor(int(extra.get('good_steps', 0)), ms.int32)}
    return state, int(extra['global_step']), json.loads(extra['data_position'])


# ----------------------------------------------------------------------------------------------------------------------
# The run

def seq_length(cfg):
    """Tokens per training row: data.seq_length, or the model's max_seq_len when it is 0."""
    return cfg.data.seq_length or cfg.model.max_seq_len


def run_args(cfg):
    """ModelArgs for this run: the model section, plus LoRA's scale and dropout when LoRA is on."""
    fields = dict(cfg.model.to_dict(), recompute=cfg.parallel.recompute)
    if cfg.lora.rank:
        if cfg.lora.alpha <= 0:
            raise RunError(f'lora.alpha must be positive, got {cfg.lora.alpha}')
        fields.update(lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout)
    try:
        args = llama.model_args(fields)
    except ValueError as e:
        raise RunError(f'bad model config: {e}') from e
    if args.compute_dtype == 'bfloat16' and ms.get_context('device_target') == 'CPU':
        raise RunError('bfloat16 compute does not exist on CPU: use --config.model.compute_dtype=float32')
    return args


def load_weights(cfg, args):
    """The weights the run starts from: load_checkpoint (any format convert.py reads), checked against the config."""
    path = resolve(cfg.load_checkpoint)
    params, _, file_config = convert.load_model(path)
    try:
        llama.check_params(params, args)
    except ValueError as e:
        raise RunError(f'{cfg.load_checkpoint}: {e}') from e
    differing = {k: v for k, v in file_config.items() if k in cfg.model and cfg.model[k] != v}
    if differing:
        print(f'note: {cfg.load_checkpoint} was saved with {differing}; this run uses the config\'s values')
    return params


def dataset_columns(path):
    """('input_ids', 'labels') for a qa file with labels, else ('input_ids',)."""
    import mindspore.dataset as ds
    names = ds.MindDataset(path, shuffle=False).get_col_names()
    return ('input_ids', 'labels') if 'labels' in names else ('input_ids',)


def eval_batches(path, batch_size, max_batches=0):
    """Every row of path once, in order, the last batch possibly short (max_batches > 0 stops early)."""
    import mindspore.dataset as ds
    if not os.path.isfile(path):
        raise RunError(f'eval dataset {path} not found')
    dataset = ds.MindDataset(path, columns_list=list(dataset_columns(path)), shuffle=False)
    batches = dataset.batch(batch_size, drop_remainder=False).create_tuple_iterator(num_epochs=1, output_numpy=True)
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            return
        yield tuple(batch)


def run_eval(cfg, args):
    """mode=eval: loss and perplexity of load_checkpoint (+ a LoRA adapter) on data.eval (else data.train)."""
    if not cfg.load_checkpoint:
        raise RunError('mode=eval needs --config.load_checkpoint=<checkpoint to evaluate>')
    params = load_weights(cfg, args)
    lora = None
    if cfg.lora.adapter:
        lora, args = convert.load_adapter(resolve(cfg.lora.adapter), args)
    path = prepare_dataset(cfg.data.eval or cfg.data.train, cfg)
    loss, tokens = evaluate(params, lora, eval_batches(path, cfg.train.batch_size), args)
    print(f'eval {path}: {int(tokens)} tokens, loss {loss:.6f}, perplexity {math.exp(loss):.4f}')
    return [{'eval_loss': loss, 'perplexity': math.exp(loss), 'tokens': tokens}]


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step, so the run saves before it exits."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signal = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@functools.cache
def init_distributed():
    """(rank, world size): under msrun (MS_WORKER_NUM set) or an HCCL rank table (RANK_TABLE_FILE, RANK_SIZE > 1)
    this joins the cluster; otherwise the run is one process and (0, 1) is returned, so the same script runs both
    ways."""
    msrun = int(os.environ.get('MS_WORKER_NUM', '1')) > 1
    rank_table = bool(os.environ.get('RANK_TABLE_FILE')) and int(os.environ.get('RANK_SIZE', '1')) > 1
    if not (msrun or rank_table):
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init
    if rank_table:
        ms.set_device(ms.get_context('device_target'), int(os.environ.get('DEVICE_ID', '0')))
    init()
    global ALL_REDUCE
    ALL_REDUCE = ops.AllReduce()
    if ms.get_context('device_target') == 'CPU':  # workers share the host's cores
        local = int(os.environ.get('MS_LOCAL_WORKER', os.environ.get('MS_WORKER_NUM', '1')))
        ms.device_context.cpu.op_tuning.threads_num(max(1, (os.cpu_count() or 1) // local))
    return get_rank(), get_group_size()


def barrier():
    """Wait for every process (MindSpore has no Barrier kernel on CPU; a blocking all-reduce is one)."""
    ALL_REDUCE(ms.Tensor(np.zeros(1, np.float32))).asnumpy()


def parallel_args(cfg, args, world):
    """The parallel config with data_parallel 0 resolved to world / (model_parallel x pipeline_stage), validated."""
    p = llama.ParallelArgs(**{k: v for k, v in cfg.parallel.items() if k in llama.ParallelArgs._fields})
    if p.data_parallel == 0:
        p = p._replace(data_parallel=max(1, world // (p.model_parallel * p.pipeline_stage)))
    problems = llama.parallel_problems(args, p, world)
    if problems:
        raise RunError('bad parallel config: ' + '; '.join(problems))
    if p.optimizer_shard and p.model_parallel == 1 and world > 1:
        print('note: optimizer_shard is applied by MindSpore\'s semi-auto parallel (model_parallel > 1); the '
              'data-parallel path here keeps whole AdamW moments on every rank')
    if p.pipeline_stage > 1:
        raise RunError(f'pipeline_stage {p.pipeline_stage}: MindSpore pipelines nn.Cells (parallel.nn.Pipeline) and '
                       f'this pure-function model has none; `python train.py --plan` sizes pipeline configurations')
    return p


def semi_auto(parallel):
    """Model parallelism goes through MindSpore's semi-auto compiler; pure data parallelism is done here, by
    all-reducing gradients inside the step, and runs on every backend."""
    return parallel.model_parallel > 1


def initial_state(cfg, args):
    """(state, frozen base or None, first step, data position): from the newest checkpoint when resuming, else from
    load_checkpoint or a random init; with LoRA the state holds only the adapters."""
    t = cfg.train
    if cfg.resume and list_checkpoints(t.out_dir):
        path = list_checkpoints(t.out_dir)[-1]
        shapes = llama.lora_shapes(args, cfg.lora.rank, cfg.lora.targets) if cfg.lora.rank else \
            llama.param_shapes(args)
        state, step, position = restore_state(path, shapes)
        print(f'resumed from {path} at step {step}')
        return state, load_weights(cfg, args) if cfg.lora.rank else None, step, position
    weights = load_weights(cfg, args) if cfg.load_checkpoint else llama.init_params(args, t.seed)
    if cfg.lora.rank:  # the base is frozen: only the adapters get gradients and optimizer state
        return init_state(llama.init_lora(args, cfg.lora.rank, cfg.lora.targets, t.seed), t.loss_scale), weights, 0, \
            None
    return init_state(weights, t.loss_scale), None, 0, None


def parameters_digest(state):
    """sha256 of every trainable tensor's bytes: equal on all data-parallel ranks when they stay in sync."""
    digest = hashlib.sha256()
    for k in sorted(state['params']):
        digest.update(state['params'][k].asnumpy().tobytes())
    return digest.hexdigest()


def train(cfg):
    """Run cfg (a ConfigDict); returns the list of logged records (on every rank; only rank 0 writes files)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    t = cfg.train
    if cfg.mode not in ('pretrain', 'finetune', 'eval'):
        raise RunError(f'mode must be pretrain, finetune or eval, got {cfg.mode!r}')
    args = run_args(cfg)
    if cfg.mode == 'eval':
        return run_eval(cfg, args)
    if (cfg.mode == 'finetune' or cfg.lora.rank) and not cfg.load_checkpoint:
        raise RunError('fine-tuning and LoRA start from weights: pass --config.load_checkpoint=<checkpoint>')
    check_fits(args, cfg)
    rank, world = init_distributed()
    parallel = parallel_args(cfg, args, world)
    peak = t.peak_tflops * 1e12 or measured_matmul_flops()  # measured before any parallel mode is set
    if semi_auto(parallel):
        llama.enable_semi_auto(parallel, world)
    data_rank, data_world = rank // parallel.model_parallel, parallel.data_parallel  # model-parallel peers share data
    main_process = rank == 0

    if main_process:
        os.makedirs(t.out_dir, exist_ok=True)
        train_path = prepare_dataset(cfg.data.train, cfg)
        eval_path = prepare_dataset(cfg.data.eval, cfg) if cfg.data.eval else None
    if world > 1:  # rank 0 may have just preprocessed text into out_dir/data
        barrier()
        train_path = prepare_dataset(cfg.data.train, cfg, rank)
        eval_path = prepare_dataset(cfg.data.eval, cfg, rank) if cfg.data.eval else None
    loader = data.Loader(train_path, t.batch_size, seed=t.seed, rank=data_rank, world=data_world,
                         columns=dataset_columns(train_path))
    total_steps = t.total_steps if t.total_steps > 0 else t.epochs * (loader.batches_per_epoch // t.grad_accum)
    state, frozen, start_step, position = initial_state(cfg, args)
    if position:
        loader.restore(position)
    # under semi-auto MindSpore inserts the data-parallel all-reduce itself
    opt = optimizer_args(t, args.n_layers, 1 if semi_auto(parallel) else parallel.data_parallel, state['params'],
                         max(1, parallel.gradient_aggregation_group))

    flops = flops_per_token(args, seq_length(cfg))
    tokens_per_step = t.batch_size * t.grad_accum * seq_length(cfg) * data_world
    print(f'training {total_steps} steps of {tokens_per_step} tokens'
          + (f' on {world} processes (data_parallel {parallel.data_parallel} x model_parallel '
             f'{parallel.model_parallel})' if world > 1 else '')
          + (f', LoRA rank {cfg.lora.rank} on {len(state["params"]) // 2} layers' if cfg.lora.rank else '')
          + f'; MFU against {peak / 1e9:.0f} GFLOP/s')
    log_file = open(os.path.join(t.out_dir, 'log.jsonl'), 'a') if main_process else None
    records, batches, stop = [], iter(loader), StopRequest()

    def log(record):
        records.append(record)
        if log_file:
            log_file.write(json.dumps(record) + '\n')
            log_file.flush()

    def check_finite(loss, grad_norm, step):
        """Never checkpoint weights that a non-finite step produced (loss scaling skips such steps itself)."""
        if not opt.loss_scaling and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise RunError(f'loss {loss}, gradient norm {grad_norm} at step {step}: lower the learning rate or use '
                           f'loss scaling; the last good checkpoint is {(list_checkpoints(t.out_dir) or ["none"])[-1]}')

    try:
        window_start, window_steps = time.time(), 0
        for step in range(start_step, total_steps):
            lr = learning_rate(step, total_steps, t)
            micro_batches = [next(batches) for _ in range(t.grad_accum)]
            state, metrics = train_step(state, frozen, micro_batches, lr, step, args, opt, stop.signal is not None)
            window_steps += 1
            done = step + 1
            # every rank must stop at the same step: the votes are summed inside the step (read each step only then)
            stopping = float(metrics['stop'].asnumpy()) > 0 if world > 1 else stop.signal is not None
            save_now = done % t.ckpt_interval == 0 or done == total_steps or stopping
            if done % t.log_interval == 0 or save_now:
                loss, grad_norm = float(metrics['loss'].asnumpy()), float(metrics['grad_norm'].asnumpy())
                check_finite(loss, grad_norm, done)
                elapsed = time.time() - window_start
                tokens_per_s = window_steps * tokens_per_step / elapsed
                record = {'step': done, 'loss': loss, 'lr': lr, 'grad_norm': grad_norm, 'tokens_per_s': tokens_per_s,
                          'mfu': tokens_per_s * flops / peak / world,
                          'eta_s': (total_steps - done) * elapsed / window_steps,
                          'loss_scale': float(state['loss_scale'].asnumpy())}
                print(f"step {done}/{total_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                      f"{tokens_per_s:,.0f} tok/s MFU {100 * record['mfu']:.1f}% ETA {record['eta_s']:.0f}s"
                      + (f" loss_scale {record['loss_scale']:g}" if opt.loss_scaling else ''))
                log(record)
                window_start, window_steps = time.time(), 0
            if eval_path and ((t.eval_interval and done % t.eval_interval == 0) or done == total_steps):
                params, lora = (frozen, state['params']) if cfg.lora.rank else (state['params'], None)
                eval_loss, _ = evaluate(params, lora, eval_batches(eval_path, t.batch_size, t.eval_batches), args)
                print(f'step {done} eval loss {eval_loss:.4f} perplexity {math.exp(eval_loss):.2f}')
                log({'step': done, 'eval_loss': eval_loss})
                window_start = time.time()
            if save_now and main_process:
                print(f'saved {save_state(state, cfg, loader.state(), done)}')
                window_start = time.time()
            if stopping:
                print(f'stopped by a signal after step {done}; continue with --config.resume=True')
                break
        if cfg.lora.rank and main_process:
            print(f'saved {save_adapter(state["params"], cfg)}')
        if world > 1:
            print(f'rank {rank}: parameters sha256 {parameters_digest(state)}')
    finally:
        stop.restore()
        if log_file:
            log_file.close()
    return records


def parse_config(argv):
    """The config file and its --config.x=y overrides, locked (a typo is an error, not a new field)."""
    from absl import flags
    from ml_collections import config_flags
    flag_values = flags.FlagValues()
    try:
        config = config_flags.DEFINE_config_file('config', os.path.join(HERE, 'configs', 'tiny.py'),
                                                 flag_values=flag_values, lock_config=True, sys_argv=argv)
        flags.DEFINE_bool('plan', False, 'print the memory and compute plan of the config and exit',
                          flag_values=flag_values)
        rest = flag_values(argv)
        cfg = config.value
        cfg.train  # a config file that failed to load raises only when first used
    except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        lines = str(e).splitlines()
        if 'Failed loading config file' in str(e):  # keep the attempted path and its error, drop the preamble
            lines = lines[-2:]
        message = ' '.join(' '.join(lines).replace('\\n', ' ').split()).replace("'", '').replace('\\', '')
        raise RunError(f'bad configuration: {message} (configs/base.py lists every field)') from e
    if len(rest) > 1:
        raise RunError(f'unexpected arguments {rest[1:]}: options look like --config.train.lr=1e-3')
    return cfg, flag_values.plan


def main(argv=None):
    try:
        cfg, plan = parse_config(argv or sys.argv)
        print_plan(cfg) if plan else train(cfg)
    except (RunError, convert.ConvertError, data.DataError) as e:
        sys.exit(f'error: {e}')
    except RuntimeError as e:  # MindSpore 2.10 compiles semi-auto parallel (model_parallel > 1) only on Ascend/GPU
        if ms.get_auto_parallel_context('parallel_mode') != 'semi_auto_parallel' or \
                ms.get_context('device_target') != 'CPU':
            raise
        sys.exit(f'error: MindSpore compiles model_parallel > 1 (semi-auto parallel) only on Ascend or GPU; on this '
                 f'CPU it stopped with: {str(e).splitlines()[0]}')


if __name__ == '__main__':
    main()
