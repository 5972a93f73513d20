"""Train or evaluate a LLaMA.

    python train.py                                        # configs/tiny.py on the bundled WikiText-2
    python train.py --config configs/7b.py --config.data.train=wiki2048.mindrecord
    python train.py --config configs/tiny.py --config.resume=True   # continue from out_dir's newest checkpoint
    python train.py --config configs/65b.py --plan        # memory and throughput of a parallel config
    python train.py --plot out/tiny out/other mindformers.log   # runs' curves in one picture (monitor.py)
    msrun --worker_num=4 --local_worker_num=4 --master_port=8118 --join=True train.py \
        --config.parallel.model_parallel=2                 # data parallel 2 x tensor parallel 2

A step computes the token-weighted gradient sums of its micro-batches with one of two drivers, then `apply`s them:
all-reduce over data-parallel ranks, unscale, clip to the global norm, AdamW with fp32 moments, skip on overflow.
The drivers are the whole model in one compiled graph (`one_graph_steps`), or layer by layer from the host
(pipeline.py), which is what pipeline stages schedule; layout.layerwise says which runs where. The learning rate is
an input, so the schedule never recompiles. Checkpoints hold the weights under MindFormers' names, the model config,
AdamW's moments (`adam_m.*`, `adam_v.*`) and the position in the data; a sharded run writes one per rank.
SIGTERM or Ctrl-C saves a checkpoint after the current step, then exits with 128 + the signal (143, 130).
"""
import functools
import math
import os
import signal
import sys
import time
from typing import NamedTuple

os.environ.setdefault('GLOG_v', '3')  # MindSpore's C++ warnings off, before it is imported
import mindspore as ms  # noqa: E402
from mindspore import ops  # noqa: E402

import checkpoint  # noqa: E402
import comm  # noqa: E402
import convert  # noqa: E402
import data  # noqa: E402
import kernels  # noqa: E402
import layout  # noqa: E402
import llama  # noqa: E402
import monitor  # noqa: E402
import pipeline  # noqa: E402
from monitor import RunError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GB = 1024 ** 3


def resolve(path):
    """Paths in configs are relative to the working directory, or else to this repository (bundled assets)."""
    if not path or os.path.isabs(path) or os.path.exists(path) or '*' in path:
        return path
    bundled = os.path.join(HERE, path)
    return bundled if os.path.exists(bundled) else path


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
    fused: bool = False         # AdamW by kernels.ADAMW rather than by elementwise ops


def optimizer_args(t):
    fused = bool(t.cpu_kernels) and kernels.build(checkpoint.GRAPH_CACHE)  # also sets llama's kernels
    return OptimizerArgs(t.beta1, t.beta2, t.eps, t.weight_decay, t.bias_correction, t.grad_clip,
                         t.loss_scale > 0, t.loss_scale_window, fused)


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
    place it is applied, by kernels.ADAMW (opt.fused) or by elementwise ops, bit for bit the same. With loss scaling
    a step whose gradients overflowed (finite False) keeps the old values. rows: {name: (first, count)} of the
    tensors whose moments this rank holds only a slice of (optimizer_shard); those update that slice of their rows,
    and `gather_rows` puts the pieces back together."""
    decay, step_size, eps, m_rate, v_rate = scalars[0][0], scalars[0][1], scalars[0][2], scalars[0][3], scalars[0][4]
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        if k in rows:
            p, g = p[rows[k][0]:rows[k][0] + rows[k][1]], g[rows[k][0]:rows[k][0] + rows[k][1]]
        decays = opt.weight_decay and not k.endswith('norm.weight') and k != layout.NORM_OUT
        if opt.fused:
            pk, mk, vk = kernels.ADAMW(p, m[k], v[k], g, scalars[0] if decays else scalars[1])
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


METRICS = ('loss', 'grad_norm', 'stop', 'grad_norms')  # a step's metrics (apply's), in the flat step's outputs


def flat_outputs(state, metrics):
    """The train step's outputs, inside its graph: params, m and v group by group, the counters, then METRICS.
    apply's new dicts are built in the order of the params they update, which is the input state's order (values(),
    not lookups by name: those made the tiny preset's step compile 30% slower, measured)."""
    tensors = ()
    for part in ('params', 'm', 'v'):
        rest, layers = state[part]
        tensors = tensors + tuple(rest.values())
        for group in layers:
            tensors = tensors + tuple(group.values())
    return tensors + tuple(state['counters']) + tuple(metrics[k] for k in METRICS)


def nested_like(state, tensors):
    """flat_outputs' state tensors (the metrics cut off) in the structure of the step's input state, on the host."""
    rest, layers = state['params']
    parts, i = [], 0
    for _ in ('params', 'm', 'v'):
        groups = []
        for names in [rest] + layers:
            groups.append(dict(zip(names, tensors[i:i + len(names)])))
            i += len(names)
        parts.append((groups[0], groups[1:]))
    return {'params': parts[0], 'm': parts[1], 'v': parts[2], 'counters': tuple(tensors[i:i + 3])}


# ----------------------------------------------------------------------------------------------------------------------
# The one-graph driver: the whole model's gradient sums, and apply, in one compiled graph

def weighted(tree, n):
    """(rest, layers) of tensors, each times n."""
    rest, layers = tree
    return {k: v * n for k, v in rest.items()}, [{k: v * n for k, v in g.items()} for g in layers]


def added(a, b):
    (rest_a, layers_a), (rest_b, layers_b) = a, b
    return {k: v + rest_b[k] for k, v in rest_a.items()}, [{k: v + gb[k] for k, v in ga.items()}
                                                          for ga, gb in zip(layers_a, layers_b)]


@functools.cache
def one_graph_steps(args, opt, mesh, plan, recompute=False):
    """The jitted functions of one model, optimizer, mesh and plan. The trainable tensors are (rest, layers) as
    llama.split_layers gives them; with LoRA they are ({}, adapters) and `frozen` holds the base weights, else
    frozen is None."""
    def scaled_loss(trainable, frozen, batch, seed, scale):
        """Mean loss times the loss scale: what the backward starts from, as in MindFormers."""
        (rest, layers), lora = (trainable, None) if frozen is None else (frozen, trainable[1])
        inputs, targets = llama.shift(*batch)
        dropout = lora is not None and args.lora_dropout > 0
        ctx = llama.sequence_context(*inputs.shape, args, seed if dropout else None)
        logits = llama.transformer(rest, layers, inputs, args, ctx, lora, recompute=recompute)[0]
        loss, n_tokens = llama.token_loss(logits, inputs, targets, args)
        return loss * scale, (loss, n_tokens)

    scaled_grad = ms.value_and_grad(scaled_loss, grad_position=0, has_aux=True)

    def grad_sums(trainable, frozen, batch, seed, scale):
        """Gradients of the loss summed over scored tokens (so micro-batches add up exactly), still scaled. The
        token count multiplies the fp32 gradients, not the loss, so fp16 activations see only the loss scale."""
        (_, (loss, n_tokens)), grads = scaled_grad(trainable, frozen, batch, seed, scale)
        return weighted(grads, n_tokens), loss * n_tokens, n_tokens

    pieces = apply_pieces(opt, mesh, plan)
    own = 1.0 if mesh.owns_loss() else 0.0

    @ms.jit
    def train_step(state, frozen, batch, lr, seed, stop):
        """The whole step. Its outputs are one flat tuple of tensors (flat_outputs), which MindSpore's compile
        cache can keep (dict outputs are built by a Python-fallback node: "Cannot export a PyExecute CNode"), and
        which made steps faster too."""
        grads, loss_sum, n_tokens = grad_sums(state['params'], frozen, batch, seed, state['counters'][1])
        new, metrics = apply(state, grads, loss_sum * own, n_tokens * own, stop, lr, pieces)
        return flat_outputs(new, metrics)

    @ms.jit
    def eval_step(weights, lora, batch):
        inputs, targets = llama.shift(*batch)
        logits = llama.transformer(weights[0], weights[1], inputs, args, llama.sequence_context(*inputs.shape, args),
                                   lora)[0]
        loss, n_tokens = llama.token_loss(logits, inputs, targets, args)
        return loss * n_tokens, n_tokens

    return {'train_step': train_step, 'grad_sums': ms.jit(grad_sums), 'eval_step': eval_step, 'add': ms.jit(added)}


# ----------------------------------------------------------------------------------------------------------------------
# A step, with either driver

class Setup(NamedTuple):
    """Everything fixed about how this process steps: the model, the optimizer, the mesh and its plan, and the
    driver (layout.layerwise)."""
    args: layout.ModelArgs
    opt: OptimizerArgs
    mesh: comm.Mesh
    plan: layout.StepPlan
    layer_by_layer: bool = False
    recompute: bool = False


def as_tensors(batch):
    """A batch (tuple of arrays) as a jit input. Without mutable, jit treats a tuple as a constant and recompiles."""
    return ms.mutable(tuple(ms.Tensor(x) for x in batch))


def train_step(state, frozen, micro_batches, lr, seed, setup, stop=False):
    """One optimizer step over a list of micro-batches (each a tuple of int32 arrays) -> (state, metrics): loss,
    grad_norm, and stop (how many processes asked to stop; `stop` is this one's vote). seed (an int) seeds LoRA
    dropout. The result equals one big batch's; with pipeline stages the micro-batches are the pipeline's."""
    mesh, own = setup.mesh, float(setup.mesh.owns_loss())
    lr, stop = ms.Tensor(lr, ms.float32), ms.Tensor(float(stop), ms.float32)
    frozen = None if frozen is None else ms.mutable(frozen)
    if setup.layer_by_layer:
        grads, loss_sum, n_tokens = pipeline.grad_sums(state['params'], frozen, micro_batches, seed,
                                                       state['counters'][1], setup.args, mesh)
    else:
        f = one_graph_steps(setup.args, setup.opt, mesh, setup.plan, setup.recompute)
        if len(micro_batches) == 1:
            out = f['train_step'](ms.mutable(state), frozen, as_tensors(micro_batches[0]), lr,
                                  ms.Tensor(seed, ms.int32), stop)
            return nested_like(state, out[:-len(METRICS)]), dict(zip(METRICS, out[-len(METRICS):]))
        grads = None
        for m, batch in enumerate(micro_batches):
            g, loss_m, n_m = f['grad_sums'](ms.mutable(state['params']), frozen, as_tensors(batch),
                                            ms.Tensor(seed * len(micro_batches) + m, ms.int32), state['counters'][1])
            grads, loss_sum, n_tokens = (g, loss_m, n_m) if grads is None else \
                (f['add'](ms.mutable(grads), ms.mutable(g)), loss_sum + loss_m, n_tokens + n_m)
    return apply(state, grads, loss_sum * own, n_tokens * own, stop, lr, apply_pieces(setup.opt, mesh, setup.plan, compiled=True))


GRAPH_CACHE_NOTE = {None: 'compiled; graph cache off', True: "its graph from an earlier run's cache",
                    False: 'compiled; kept for the next run'}


def step_graph_cache(root, setup, state, frozen, micro_batches):
    """checkpoint.graph_cache for the first train step, which then compiles once per model, optimizer and batch
    shape on this machine: a run that starts again loads it. Only for the one-graph step of one micro-batch in one
    process, whose step is one graph with tensor outputs (MindSpore's compile cache cannot keep host collectives
    or dict outputs); root '' = off."""
    if not root or setup.mesh.world > 1 or setup.layer_by_layer or len(micro_batches) > 1:
        return checkpoint.graph_cache('', None)
    shapes = [tuple((k, tuple(v.shape)) for k, v in group.items())
              for part in (state['params'], frozen or ({}, [])) for group in [part[0]] + list(part[1])]
    batch = tuple((x.shape, str(x.dtype)) for x in micro_batches[0])
    # the plan's name sets print in an order that varies between processes: sorted, so the key does not
    plan = setup.plan._replace(counted=tuple(tuple(sorted(names)) for names in setup.plan.counted))
    return checkpoint.graph_cache(root, (setup.args, setup.opt, plan, setup.recompute, shapes, batch))


def evaluate(trainable, frozen, batches, setup):
    """(mean loss over scored tokens, scored tokens) over batches (an iterable of array tuples), on every rank."""
    mesh, args = setup.mesh, setup.args
    weights, lora = (trainable, None) if frozen is None else (frozen, trainable[1])
    batches = replica_part(batches, mesh)
    if setup.layer_by_layer:
        loss_sum, n_tokens = pipeline.evaluate(trainable, frozen, batches, args, mesh)
    else:
        eval_step = one_graph_steps(args, setup.opt, mesh, setup.plan)['eval_step']
        loss_sum = n_tokens = ms.Tensor(0.0, ms.float32)
        for batch in batches:
            loss_m, n_m = eval_step(ms.mutable(weights), None if lora is None else ms.mutable(lora),
                                    as_tensors(batch))
            loss_sum, n_tokens = loss_sum + loss_m, n_tokens + n_m
    totals = ops.stack([loss_sum, n_tokens]) * float(mesh.owns_loss())
    if mesh.world_sum is not None:
        totals = mesh.world_sum(totals)
    total, count = totals.asnumpy().tolist()
    return total / max(count, 1.0), count


def eval_batches(path, cfg, mesh, limit=0):
    """Eval batches of batch_size rows per data-parallel replica (replica_part gives each its share)."""
    return data.eval_batches(path, cfg.train.batch_size * mesh.parallel.data_parallel, limit)


def replica_part(batches, mesh):
    """This data-parallel replica's rows of each batch (of batch_size x data_parallel rows), so that the replicas
    together score every row once; a replica whose part of a short last batch is empty skips it."""
    dp, d = mesh.parallel.data_parallel, mesh.coords.data
    for batch in batches:
        rows = -(-len(batch[0]) // dp)
        part = tuple(x[d * rows:(d + 1) * rows] for x in batch)
        if len(part[0]):
            yield part


# ----------------------------------------------------------------------------------------------------------------------
# The run

def check_values(cfg):
    """Refuse training settings that make no run, in one line naming each; make out_dir."""
    problems = layout.training_problems(cfg)
    if problems:
        raise RunError('; '.join(problems))
    writable_directory(cfg.train.out_dir)


def writable_directory(path):
    """Create path, or say in one line why it cannot be written (under a file, in /proc, no permission)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write-test-{os.getpid()}')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise RunError(f'train.out_dir {path} is not a writable directory ({e.strerror}): choose another') from e


def prepare(cfg):
    """ModelArgs and Setup of this run on this process (joining the cluster under msrun or a rank table), checked."""
    try:
        args = layout.model_args(dict(cfg.model.to_dict(), **(dict(lora_alpha=cfg.lora.alpha,
                                                                    lora_dropout=cfg.lora.dropout)
                                                               if cfg.lora.rank else {})))
    except ValueError as e:
        raise RunError(f'bad model config: {e}') from e
    if cfg.lora.rank and cfg.lora.alpha <= 0:
        raise RunError(f'lora.alpha must be positive, got {cfg.lora.alpha}')
    device = ms.get_context('device_target')
    if args.compute_dtype == 'bfloat16' and device == 'CPU':
        raise RunError('bfloat16 compute does not exist on CPU: use --config.model.compute_dtype=float32')
    rank, world = comm.join_cluster()
    parallel = layout.parallel_args(cfg.parallel, world)
    problems = layout.parallel_problems(args, parallel, world)
    devices = parallel.data_parallel * parallel.model_parallel * parallel.pipeline_stage
    if world == 1 and devices > 1 and not layout.parallel_problems(args, parallel):  # a config for a cluster
        check_fits(cfg, Setup(args, None, comm.Mesh(layout.ParallelArgs(recompute=parallel.recompute)), None))
        raise RunError(f'the config splits the model over {devices} processes (data_parallel {parallel.data_parallel} '
                       f'x model_parallel {parallel.model_parallel} x pipeline_stage {parallel.pipeline_stage}): '
                       f'launch it with msrun or python hccl.py launch, or set those to 1 to run it here')
    if problems:
        raise RunError('bad parallel config: ' + '; '.join(problems))
    mesh = comm.Mesh(parallel, rank, world)
    args = args._replace(tp=mesh.tp, rows=(mesh.coords.data, parallel.data_parallel))
    layer_by_layer = layout.layerwise(parallel, args.n_layers, cfg.train, device)
    plan = layout.step_plan(layout.trainable_shapes(cfg, args), args.n_layers, parallel, mesh.coords)
    return Setup(args, optimizer_args(cfg.train), mesh, plan, layer_by_layer, parallel.recompute)


def check_fits(cfg, setup):
    """Print what this process needs and stop with one line if this machine cannot hold it."""
    import psutil
    args, parallel = setup.args, setup.mesh.parallel
    lora = layout.adapter_shapes(cfg, args)
    parts = layout.memory_plan(args, parallel, cfg.train.batch_size, layout.seq_length(cfg), lora,
                               layer_by_layer=setup.layer_by_layer)
    total = sum(parts.values()) * (setup.mesh.world if ms.get_context('device_target') == 'CPU' else 1)
    budget = cfg.train.max_memory_gb * GB or psutil.virtual_memory().available
    trainable = sum(math.prod(s) for s in lora.values()) if lora else 0
    if setup.mesh.rank == 0:
        print(f'model: {layout.count_params(args):,} parameters' + (f', {trainable:,} trainable (LoRA)' if lora else '')
              + f'; training needs ~{sum(parts.values()) / GB:.1f} GB per process ('
              + ', '.join(f'{k} {v / GB:.1f}' for k, v in parts.items() if v) + ')')
    if total > budget:
        raise RunError(f'this run needs ~{total / GB:.1f} GB but only {budget / GB:.1f} GB is available: use a smaller '
                       f'model (configs/tiny.py), a smaller batch, or more devices (see python train.py --plan)')


def initial_state(cfg, setup):
    """(state, frozen base or None, first step, data position): from the newest checkpoint when resuming (on any
    mesh), else from load_checkpoint or a random init; with LoRA the state holds only the adapters."""
    t, args, mesh = cfg.train, setup.args, setup.mesh
    base = resolve(cfg.load_checkpoint)
    frozen = checkpoint.load_weights(base, cfg, setup) if cfg.lora.rank else None
    path = convert.newest_checkpoint(t.out_dir) if cfg.resume else None
    if path:
        state, step, position = checkpoint.restore(path, cfg, setup)
        if mesh.rank == 0:
            print(f'resumed from {path} at step {step}')
        return state, frozen, step, position
    if cfg.load_checkpoint and not cfg.lora.rank:
        return init_state(checkpoint.load_weights(base, cfg, setup), t.loss_scale, setup.plan), frozen, 0, None
    parts = layout.local_layout(layout.trainable_shapes(cfg, args), args.n_layers, mesh.parallel, mesh.coords)

    def take(name, value):  # every rank draws each whole tensor in turn, and keeps its part
        return value[tuple(slice(a, b) for a, b in parts[name])] if name in parts else None
    drawn = llama.init_lora(args, cfg.lora.rank, cfg.lora.targets, t.seed, take) if cfg.lora.rank else \
        llama.init_params(args, t.seed, take)
    return init_state(checkpoint.stage_split(drawn, setup), t.loss_scale, setup.plan), frozen, 0, None


class Stopped(Exception):
    """Raised after the save a signal asked for: the process exits with 128 + the signal, as the shell reports it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


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


def run_eval(cfg, setup):
    """mode=eval: loss and perplexity of load_checkpoint (+ a LoRA adapter) on data.eval (else data.train)."""
    if not cfg.load_checkpoint:
        raise RunError('mode=eval needs --config.load_checkpoint=<checkpoint to evaluate>')
    trainable, frozen = checkpoint.load_weights(resolve(cfg.load_checkpoint), cfg, setup), None
    if cfg.lora.adapter:  # this process's slices of the adapter, on top of the weights
        adapter, args = convert.load_adapter(resolve(cfg.lora.adapter), setup.args)
        setup = setup._replace(args=args)
        shapes = {k: tuple(v.shape) for k, v in adapter.items()}

        def read(k, index):
            return adapter[k].asnumpy()[index]
        trainable, frozen = checkpoint.local_part(read, shapes, setup), trainable
    path = data_file(cfg.data.eval or cfg.data.train, cfg, setup.mesh)
    loss, tokens = evaluate(trainable, frozen, eval_batches(path, cfg, setup.mesh), setup)
    if setup.mesh.rank == 0:
        print(f'eval {path}: {int(tokens)} tokens, loss {loss:.6f}, perplexity {math.exp(loss):.4f}')
    return [{'eval_loss': loss, 'perplexity': math.exp(loss), 'tokens': tokens}]


def data_file(path, cfg, mesh):
    """The MindRecord for a data path (text is preprocessed by the first process while the others wait)."""
    args = (resolve(path), resolve(cfg.data.tokenizer), layout.seq_length(cfg), cfg.model.vocab_size, cfg.train.out_dir)
    if mesh.rank == 0:
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        data.prepared(*args)
    mesh.barrier()
    return data.prepared(*args, write=False)


def train(cfg):
    """Run cfg (a ConfigDict); returns the list of logged records (on every rank; only rank 0 writes logs)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    t = cfg.train
    if cfg.mode not in ('pretrain', 'finetune', 'eval'):
        raise RunError(f'mode must be pretrain, finetune or eval, got {cfg.mode!r}')
    check_values(cfg)
    setup = prepare(cfg)
    if cfg.mode == 'eval':
        return run_eval(cfg, setup)
    if (cfg.mode == 'finetune' or cfg.lora.rank) and not cfg.load_checkpoint:
        raise RunError('fine-tuning and LoRA start from weights: pass --config.load_checkpoint=<checkpoint>')
    check_fits(cfg, setup)
    mesh, parallel = setup.mesh, setup.mesh.parallel
    train_path = data_file(cfg.data.train, cfg, mesh)
    eval_path = data_file(cfg.data.eval, cfg, mesh) if cfg.data.eval else None
    micro = t.grad_accum * (parallel.micro_batch_num if parallel.pipeline_stage > 1 else 1)
    loader = data.Loader(train_path, t.batch_size, seed=t.seed, rank=mesh.coords.data, world=parallel.data_parallel,
                         columns=data.columns_of(train_path))
    total_steps = t.total_steps if t.total_steps > 0 else t.epochs * (loader.batches_per_epoch // micro)
    convert.remove_stale_temporaries(checkpoint.directory(cfg, mesh), 'ckpt_*.ckpt')  # of saves cut short
    state, frozen, start_step, position = initial_state(cfg, setup)
    if position:
        loader.restore(position)
    log = monitor.Log(cfg, setup, total_steps, t.batch_size * micro * layout.seq_length(cfg) * parallel.data_parallel,
                      start_step)
    log.say(f'training {total_steps} steps of {log.tokens_per_step} tokens'
            + (f' on {mesh.world} processes (data_parallel {parallel.data_parallel} x model_parallel '
               f'{parallel.model_parallel} x pipeline_stage {parallel.pipeline_stage})' if mesh.world > 1 else '')
            + (', layer by layer' if setup.layer_by_layer else '')
            + (f', LoRA rank {cfg.lora.rank}' if cfg.lora.rank else '') + f'; MFU against {log.peak / 1e9:.0f} GFLOP/s')
    batches, stop = iter(loader), StopRequest()
    try:
        for step in range(start_step, total_steps):
            lr = learning_rate(step, total_steps, t)
            micro_batches = [next(batches) for _ in range(micro)]
            first, began = step == start_step, time.perf_counter()
            with step_graph_cache(checkpoint.GRAPH_CACHE if t.graph_cache and first else '', setup, state, frozen,
                                  micro_batches) as found:
                state, metrics = train_step(state, frozen, micro_batches, lr, step, setup, stop.signal is not None)
            if first:
                metrics['loss'].asnumpy()
                log.say(f'first step {time.perf_counter() - began:.1f} s ({GRAPH_CACHE_NOTE[found]})')
            done = step + 1
            log.add(metrics)
            # every rank must stop at the same step: the votes are summed inside the step (read each step only then)
            stopping = float(metrics['stop'].asnumpy()) > 0 if mesh.world > 1 else stop.signal is not None
            save_now = done % t.ckpt_interval == 0 or done == total_steps or stopping
            if done % t.log_interval == 0 or save_now:
                log.step(done, lr, state)
            if eval_path and ((t.eval_interval and done % t.eval_interval == 0) or done == total_steps):
                eval_loss, _ = evaluate(state['params'], frozen, eval_batches(eval_path, cfg, mesh, t.eval_batches),
                                        setup)
                log.eval(done, eval_loss)
            if save_now:
                log.say(f'saved step {done} in {checkpoint.save(state, cfg, setup, loader.state(), done)}')
                log.restart()
            if stopping:
                log.say(f'stopped by a signal after step {done}; continue with --config.resume=True')
                raise Stopped(stop.signal or signal.SIGTERM)  # another rank's signal stops this one too
        if cfg.lora.rank:
            checkpoint.save_adapter(cfg, setup)
        if mesh.world > 1:
            print(f'rank {mesh.rank}: parameters sha256 {monitor.digest(state)}')
    finally:
        stop.restore()
        log.close()
    return log.records


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
    argv = argv or sys.argv
    try:
        if '--plot' in argv[1:]:  # python train.py --plot RUN... [--out PNG]: overlay runs' curves in one picture
            return monitor.plot_command(argv[1:])
        cfg, plan = parse_config(argv)
        layout.print_plan(cfg) if plan else train(cfg)
    except (RunError, convert.ConvertError, data.DataError, ValueError) as e:
        sys.exit(f'error: {e}')
    except Stopped as e:  # saved; non-zero so that a scheduler sees the run did not finish
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C before the loop's handler is installed (start-up, preprocessing)
        print('error: interrupted before training started; nothing was saved', file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == '__main__':
    main()
