"""The optimizer, pure functions over dicts of tensors: MindFormers' learning-rate schedule, AdamW with fp32 moments,
dynamic loss scaling, the optimizer state's layout, and `apply`, which takes a step's token-weighted gradient sums
to the next state: all-reduce over data-parallel ranks, unscale, clip to the global norm, update, skip on overflow.

Both drivers of the step (step.py) end in `apply`: the one-graph step traces it into its graph, the layer-by-layer
step calls its pieces, each compiled on its own, from the host. The same code either way.
"""
import functools
import math
from typing import NamedTuple

import mindspore as ms
from mindspore import ops

import comm
import layout


# ----------------------------------------------------------------------------------------------------------------------
# The optimizer: AdamW and the loss scaler, pure functions over dicts of tensors

def learning_rate(step, total_steps, t):
    """MindFormers' CosineWithWarmUpLR: linear warmup for int(total * warmup_ratio) steps, then cosine to lr_end."""
    warmup = int(total_steps * t.warmup_ratio)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return t.lr_end + (t.lr - t.lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class OptimizerArgs(NamedTuple):
    """AdamW's and the loss scaler's constants (configs/base.py's defaults), closed over by the compiled step."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    bias_correction: bool = True
    grad_clip: float = 1.0
    loss_scaling: bool = False  # dynamic loss scaling (for fp16 compute)
    scale_window: int = 1000    # clean steps before the loss scale doubles
    kernels: object = None      # kernels.build's value: AdamW by its adamw kernel rather than by elementwise ops


def optimizer_args(t, kernel_ops=None):
    """OptimizerArgs from a config's train section, with the C++ kernels the run uses (or None)."""
    return OptimizerArgs(t.beta1, t.beta2, t.eps, t.weight_decay, t.bias_correction, t.grad_clip,
                         t.loss_scale > 0, t.loss_scale_window, kernel_ops)


def adam_scalars(lr, step, grad_scale, opt):
    """The step's scalars, two rows of (decay, step size, epsilon, m's rate, v's rate, beta1, beta2): row 0 for the
    tensors with weight decay (decay 1 - lr·wd), row 1 for those without (decay 1). Adam's bias correction is folded
    into the step size and epsilon, as PyTorch does (m̂ / (√v̂ + ε) = (√c2 / c1) · m / (√v + ε√c2) with c = 1 - β^t,
    exactly), and grad_scale (unscaling times clipping) into the moments' rates, so none of them costs a pass over
    the weights."""
    if opt.bias_correction:
        t = step.astype(ms.float32)
        c1, root_c2 = 1.0 - ops.pow(opt.beta1, t), ops.sqrt(1.0 - ops.pow(opt.beta2, t))
        step_size, eps = lr * root_c2 / c1, opt.eps * root_c2
    else:
        step_size, eps = lr, ops.full((), opt.eps, dtype=ms.float32)
    one = ops.ones((), ms.float32)
    rest = [step_size, eps, (1.0 - opt.beta1) * grad_scale, (1.0 - opt.beta2) * grad_scale * grad_scale,
            opt.beta1 * one, opt.beta2 * one]
    return ops.stack([ops.stack([1.0 - lr * opt.weight_decay] + rest), ops.stack([one] + rest)])


def update(params, m, v, grads, scalars, finite, opt, rows):
    """AdamW (fp32 moments, decoupled weight decay lr·wd·p, never on norm weights) on one group of tensors; the one
    place it is applied, by the adamw kernel (opt.kernels) or by elementwise ops, bit for bit the same. With loss
    scaling a step whose gradients overflowed (finite False) keeps the old values. rows: {name: (first, count)} of
    the tensors whose moments this rank holds only a slice of (optimizer_shard); those update that slice of their
    rows, and `gather_rows` puts the pieces back together."""
    decay, step_size, eps, m_rate, v_rate = scalars[0][0], scalars[0][1], scalars[0][2], scalars[0][3], scalars[0][4]
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        if k in rows:
            p, g = p[rows[k][0]:rows[k][0] + rows[k][1]], g[rows[k][0]:rows[k][0] + rows[k][1]]
        decays = opt.weight_decay and not k.endswith('norm.weight') and k != layout.NORM_OUT
        if opt.kernels is not None:
            pk, mk, vk = opt.kernels.adamw(p, m[k], v[k], g, scalars[0] if decays else scalars[1])
        else:
            mk = opt.beta1 * m[k] + m_rate * g
            vk = opt.beta2 * v[k] + v_rate * (g * g)
            pk = (p * decay if decays else p) - step_size * (mk / (ops.sqrt(vk) + eps))
        if opt.loss_scaling:
            pk, mk, vk = ops.select(finite, pk, p), ops.select(finite, mk, m[k]), ops.select(finite, vk, v[k])
        new_p[k], new_m[k], new_v[k] = pk, mk, vk
    return new_p, new_m, new_v


def advance(counters, finite, opt):
    """(Adam's step, loss scale, clean steps) after a step: with loss scaling an overflow halves the scale and does
    not count; after scale_window clean steps in a row the scale doubles."""
    step, scale, good = counters
    if not opt.loss_scaling:
        return step + 1, scale, good
    good = ops.select(finite, good + 1, ops.zeros_like(good))
    grow = good >= opt.scale_window
    scale = ops.select(finite, ops.select(grow, scale * 2.0, scale), ops.maximum(scale * 0.5, 1.0))
    return ops.select(finite, step + 1, step), scale, ops.select(grow, ops.zeros_like(good), good)


def init_state(params, loss_scale=0.0, plan=None):
    """The optimizer state around the trainable tensors, params = (rest, layers) as llama.split_layers gives them:
    the tensors, their two moments (zeros; only this rank's rows of those the plan shards), and the counters."""
    def zeros(group, kind):
        rows = dict(plan.rows[kind]) if plan else {}
        return {k: ops.zeros((rows[k][1],) + v.shape[1:] if k in rows else v.shape, ms.float32)
                for k, v in group.items()}
    rest, layers = params
    return {'params': (rest, layers), 'm': (zeros(rest, 0), [zeros(g, 1) for g in layers]),
            'v': (zeros(rest, 0), [zeros(g, 1) for g in layers]),
            'counters': (ms.Tensor(0, ms.int32), ms.Tensor(loss_scale or 1.0, ms.float32), ms.Tensor(0, ms.int32))}


# ----------------------------------------------------------------------------------------------------------------------
# Apply: from gradient sums to the next state, shared by both drivers

def square_sum(grads, counted):
    """Each tensor's squared norm, in grads' order, those not named in counted times zero; their sum is the
    squared global norm, and the vector is kept so a non-finite norm can be traced to its tensor (monitor.py) at no
    extra cost. Every tensor is squared on every rank: ranks' graphs must run their collectives in one order, and a
    rank whose norm read no gradient would run its norm's all-reduce before the gradients' (measured on CPU: the
    ranks' messages then cross)."""
    squares = ()
    for k, g in grads.items():  # reducing the last axis first is 10x faster than one full ReduceSum on CPU
        squares = squares + ((g * g).sum(-1).sum() * (1.0 if k in counted else 0.0),)
    return ops.stack(squares)


@functools.cache
def apply_pieces(opt, mesh, plan, compiled=False):
    """apply's pieces for one optimizer, mesh and plan: plain functions, which the one-graph step traces into its
    graph, or (compiled) each its own graph, which the layer-by-layer step calls from the host."""
    data_sum, world_sum = mesh.data, mesh.world_sum  # closed over as themselves: a graph reads mesh.x as a Python object
    def reduce(grads):
        """The data-parallel all-reduce of (rest, layers), in gradient_aggregation_group fused buckets."""
        if data_sum is None:
            return grads
        rest, layers = grads
        flat = {}
        for g, group in enumerate([rest] + layers):  # no dict comprehension over two loops in MindSpore's graphs
            for k, v in group.items():
                flat[f'{g}/{k}'] = v
        flat = comm.all_reduce_in_buckets(flat, plan.buckets, data_sum)
        reduced = []
        for g in range(len(layers)):  # a loop of known length (a comprehension here makes apply's loop fail to compile)
            reduced.append({k: flat[f'{g + 1}/{k}'] for k in layers[g]})
        return {k: flat[f'0/{k}'] for k in rest}, reduced

    def scalars(stats, squares, counters, lr):
        """From this rank's [loss sum, scored tokens, stop votes, squared gradient norm], summed over all ranks:
        Adam's scalars, whether the gradients are finite, the next counters and the metrics (with the norm of each
        of this rank's tensors, squares unscaled, in the order of monitor.tensor_names)."""
        if world_sum is not None:
            stats = world_sum(stats)
        n_tokens = ops.maximum(stats[1], 1.0)
        unscale = 1.0 / (n_tokens * counters[1])  # summed over tokens and loss-scaled -> a mean gradient
        grad_norm = ops.sqrt(stats[3]) * unscale
        clip = opt.grad_clip / ops.maximum(grad_norm, opt.grad_clip) if opt.grad_clip else 1.0
        finite = ops.isfinite(grad_norm)
        return adam_scalars(lr, counters[0] + 1, unscale * clip, opt), finite, advance(counters, finite, opt), \
            {'loss': stats[0] / n_tokens, 'grad_norm': grad_norm, 'stop': stats[2],
             'grad_norms': ops.sqrt(squares) * unscale}

    def pieces_of(kind):
        rows = dict(plan.rows[kind])

        def square(grads):
            return square_sum(grads, plan.counted[kind])

        def update_group(params, m, v, grads, scalars, finite):
            return update(params, m, v, grads, scalars, finite, opt, rows)

        def update_rows(params, m, v, grads, scalars, finite):
            new_p, new_m, new_v = update(params, m, v, grads, scalars, finite, opt, rows)
            return comm.gather_rows(new_p, params, rows, data_sum), new_m, new_v
        # chosen here, not by an `if` in the graph: a function called once per layer with an early return on a
        # constant gave every call the first call's outputs (MindSpore 2.10, measured)
        return square, update_rows if rows else update_group
    def reduce_group(group):  # one bucket per group: a compiled reduce of every group would grow with the depth
        return comm.all_reduce_in_buckets(group, (tuple((k, math.prod(v.shape)) for k, v in group.items()),),
                                          data_sum)

    def reduce_by_group(grads):
        if data_sum is None:
            return grads
        rest, layers = grads
        return reduce_group_compiled(rest) if len(rest) else rest, [reduce_group_compiled(g) for g in layers]
    pieces = Pieces()
    (pieces.square_rest, pieces.update_rest), (pieces.square_layer, pieces.update_layer) = pieces_of(0), pieces_of(1)
    pieces.reduce, pieces.scalars = reduce, scalars
    if compiled:  # each its own graph, its dicts passed through ms.mutable
        for name in ('scalars', 'square_rest', 'update_rest', 'square_layer', 'update_layer'):
            setattr(pieces, name, host(getattr(pieces, name)))
        reduce_group_compiled, pieces.reduce = host(reduce_group), reduce_by_group
    return pieces


class Pieces:
    """apply's functions (a plain object: MindSpore's graphs call an object's attributes, not a dict's values)."""


def host(fn):
    """fn compiled, called from the host with its dict and tuple arguments passed through ms.mutable."""
    jitted = ms.jit(fn)

    def call(*arguments):
        return jitted(*(ms.mutable(x) if isinstance(x, (dict, tuple)) else x for x in arguments))
    return call


def apply(state, grads, loss_sum, n_tokens, stop, lr, pieces):
    """The next state and the metrics from a step's token-weighted gradient sums: all-reduce them over data-parallel
    ranks, sum the loss, tokens, stop votes and squared gradient norm over all ranks, then update every group
    (unscaled, clipped, skipped on overflow). The one-graph step runs this inside its graph, the layer-by-layer step
    from the host with each piece compiled on its own: the same code."""
    rest, layers = pieces.reduce(grads)
    squares = (pieces.square_rest(rest),) if len(rest) else ()
    for group in layers:
        squares = squares + (pieces.square_layer(group),)
    squares = ops.concat(squares)
    stats = ops.stack([loss_sum, n_tokens, stop, squares.sum()])
    scalars, finite, counters, metrics = pieces.scalars(stats, squares, state['counters'], lr)
    new = [pieces.update_rest(state['params'][0], state['m'][0], state['v'][0], rest, scalars, finite)
           if len(rest) else ({}, {}, {})]
    for g in range(len(layers)):
        new.append(pieces.update_layer(state['params'][1][g], state['m'][1][g], state['v'][1][g], layers[g], scalars,
                                       finite))
    return {'params': (new[0][0], [n[0] for n in new[1:]]), 'm': (new[0][1], [n[1] for n in new[1:]]),
            'v': (new[0][2], [n[2] for n in new[1:]]), 'counters': counters}, metrics
