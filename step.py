"""The training step: a step's token-weighted gradient sums by one of two drivers, then `optim.apply`.

The drivers differ only in how the layers are driven:
  * one graph: the whole model compiled as one graph (for a single micro-batch with `apply` in it too);
  * layer by layer: from the host, as a few small graphs each compiled once whatever the depth (the embedding, one
    decoder layer's forward, its backward, which recomputes the forward from the layer's saved input, and the head
    with the loss). That is what pipeline stages schedule (pipeline.py's 1F1B), and what the CPU runs past
    train.layerwise_from layers, where compiling one graph grows with every layer it unrolls.
Everything else they share, written once: the weights the model runs on (`model_weights`: with LoRA the frozen base
and the trained adapters), a micro-batch's dropout seed (`micro_seed`), its loss (`scaled_loss`), the token weighting
of its gradients (`weigh`, `add`) and evaluation (`loss_sum`). `prepare` makes the process's Setup: the model
arguments (with its tensor-parallel group and the C++ kernels it runs), the optimizer, the mesh and its plan, and
the driver (layout.layerwise).
"""
import functools
import math
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import ops

import checkpoint
import comm
import kernels
import layout
import llama
import optim
import pipeline
import util
from layout import GB
from util import RunError


# ----------------------------------------------------------------------------------------------------------------------
# How this process steps

class Setup(NamedTuple):
    """Everything fixed about how this process steps: the model, the optimizer, the mesh and its plan, and the
    driver (layout.layerwise)."""
    args: layout.ModelArgs
    opt: optim.OptimizerArgs
    mesh: comm.Mesh
    plan: layout.StepPlan
    layer_by_layer: bool = False
    recompute: bool = False

    @property
    def rows(self):
        """(d, D): this data-parallel rank d of D holds rows d, d + D, ... of each micro-batch (llama.ROWS)."""
        return self.mesh.coords.data, self.mesh.parallel.data_parallel


def prepare(cfg):
    """The Setup of this run on this process (joining the cluster under msrun or a rank table), checked."""
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
    built = kernels.build(checkpoint.GRAPH_CACHE) if cfg.train.cpu_kernels else None
    args = args._replace(tp=mesh.tp, kernels=built)
    layer_by_layer = layout.layerwise(parallel, args.n_layers, cfg.train, device)
    plan = layout.step_plan(layout.trainable_shapes(cfg, args), args.n_layers, parallel, mesh.coords)
    return Setup(args, optim.optimizer_args(cfg.train, built), mesh, plan, layer_by_layer, parallel.recompute)


def check_fits(cfg, setup):
    """Print what this process needs and stop with one line if this machine cannot hold it."""
    args, parallel = setup.args, setup.mesh.parallel
    lora = layout.adapter_shapes(cfg, args)
    parts = layout.memory_plan(args, parallel, cfg.train.batch_size, layout.seq_length(cfg), lora,
                               layer_by_layer=setup.layer_by_layer, frozen_bytes=layout.frozen_bytes(cfg))
    total = sum(parts.values()) * (setup.mesh.world if ms.get_context('device_target') == 'CPU' else 1)
    budget = util.memory_budget(cfg.train.max_memory_gb)
    trainable = sum(math.prod(s) for s in lora.values()) if lora else 0
    if setup.mesh.rank == 0:
        print(f'model: {layout.count_params(args):,} parameters' + (f', {trainable:,} trainable (LoRA)' if lora else '')
              + f'; training needs ~{sum(parts.values()) / GB:.1f} GB per process ('
              + ', '.join(f'{k} {v / GB:.1f}' for k, v in parts.items() if v) + ')')
    if total > budget:
        raise RunError(f'this run needs ~{total / GB:.1f} GB but only {budget / GB:.1f} GB is available: use a smaller '
                       f'model (configs/tiny.py), a smaller batch, or more devices (see python train.py --plan)')


# ----------------------------------------------------------------------------------------------------------------------
# What both drivers share

def model_weights(trainable, frozen):
    """(rest, layers, lora) the model runs on. The trainable tensors are (rest, layers) as llama.split_layers gives
    them, and frozen is None; with LoRA they are ({}, adapters) and frozen holds the base weights' (rest, layers)."""
    if frozen is None:
        return trainable[0], trainable[1], None
    return frozen[0], frozen[1], trainable[1]


def micro_seed(seed, m, count):
    """The dropout seed of micro-batch m of the count in a step seeded seed (an int): unique per step and
    micro-batch, and the step's own seed when it has one micro-batch."""
    return seed * count + m


def dropout_seed(seed, lora, args):
    """The seed that switches LoRA dropout on in the layers (llama.SEED), or None: dropout only on LoRA branches."""
    return seed if lora is not None and args.lora_dropout > 0 else None


def scaled_loss(logits, inputs, targets, args, scale):
    """(mean loss times the loss scale, (mean loss, scored tokens)) of a micro-batch: the backward starts from the
    scaled loss, as in MindFormers."""
    loss, n_tokens = llama.token_loss(logits, inputs, targets, args)
    return loss * scale, (loss, n_tokens)


def loss_sum(logits, inputs, targets, args):
    """Evaluation's (loss summed over scored tokens, scored tokens) of a batch."""
    loss, n_tokens = llama.token_loss(logits, inputs, targets, args)
    return loss * n_tokens, n_tokens


def weigh(grads, n_tokens):
    """A group's gradients times the micro-batch's scored tokens: summed over tokens, micro-batches add up exactly
    to one big batch. The count multiplies the fp32 gradients, not the loss, so fp16 activations see only the loss
    scale."""
    return {k: g * n_tokens for k, g in grads.items()}


def add(a, b):
    """Two groups' gradient sums added; b may hold names a lacks and the other way round (the layer-by-layer head's
    and embedding's gradients are the same group)."""
    out = {}
    for k, v in a.items():  # loops, not a comprehension with a condition (see comm.gather_rows)
        out[k] = v + b[k] if k in b else v
    for k, v in b.items():
        if k not in a:
            out[k] = v
    return out


def as_tensors(batch):
    """A batch (tuple of arrays) as a jit input. Without mutable, jit treats a tuple as a constant and recompiles."""
    return ms.mutable(tuple(ms.Tensor(x) for x in batch))


def train_step(state, frozen, micro_batches, lr, seed, setup, stop=False):
    """One optimizer step over a list of micro-batches (each a tuple of int32 arrays) -> (state, metrics): loss,
    grad_norm, and stop (how many processes asked to stop; `stop` is this one's vote). seed (an int) seeds LoRA
    dropout. The result equals one big batch's; with pipeline stages the micro-batches are the pipeline's."""
    lr, stop = ms.Tensor(lr, ms.float32), ms.Tensor(float(stop), ms.float32)
    frozen = None if frozen is None else ms.mutable(frozen)
    if not setup.layer_by_layer and len(micro_batches) == 1:  # the whole step, apply too, in one graph
        out = one_graph(setup)['train_step'](ms.mutable(state), frozen, as_tensors(micro_batches[0]), lr,
                                             ms.Tensor(seed, ms.int32), stop)
        return nested_like(state, out[:-len(METRICS)]), dict(zip(METRICS, out[-len(METRICS):]))
    driver = layerwise_grad_sums if setup.layer_by_layer else one_graph_grad_sums
    grads, loss, n_tokens = driver(state['params'], frozen, micro_batches, seed, state['counters'][1], setup)
    own = float(setup.mesh.owns_loss())
    return optim.apply(state, grads, loss * own, n_tokens * own, stop, lr,
                       optim.apply_pieces(setup.opt, setup.mesh, setup.plan, compiled=True))


def evaluate(trainable, frozen, batches, setup):
    """(mean loss over scored tokens, scored tokens) over batches (an iterable of array tuples), on every rank."""
    mesh = setup.mesh
    driver = layerwise_loss_sums if setup.layer_by_layer else one_graph_loss_sums
    loss, n_tokens = driver(trainable, frozen, replica_part(batches, mesh), setup)
    totals = ops.stack([loss, n_tokens]) * float(mesh.owns_loss())
    if mesh.world_sum is not None:
        totals = mesh.world_sum(totals)
    total, count = totals.asnumpy().tolist()
    return total / max(count, 1.0), count


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
# The one-graph driver

def weighted(tree, n):
    """(rest, layers) of gradients, each group weighed."""
    rest, layers = tree
    return weigh(rest, n), [weigh(g, n) for g in layers]


def added(a, b):
    """(rest, layers) of gradient sums added group by group."""
    return add(a[0], b[0]), [add(ga, gb) for ga, gb in zip(a[1], b[1])]


def one_graph(setup):
    s = setup
    return one_graph_steps(s.args, s.opt, s.mesh, s.plan, s.rows, s.recompute)


@functools.cache
def one_graph_steps(args, opt, mesh, plan, rows, recompute=False):
    """The jitted functions of one model, optimizer, mesh and plan: the whole step, a micro-batch's gradient sums
    and their sum, an eval batch's loss sum."""
    def micro_loss(trainable, frozen, batch, seed, scale):
        rest, layers, lora = model_weights(trainable, frozen)
        inputs, targets = llama.shift(*batch)
        ctx = llama.sequence_context(*inputs.shape, args, dropout_seed(seed, lora, args), rows)
        logits = llama.transformer(rest, layers, inputs, args, ctx, lora, recompute=recompute)[0]
        return scaled_loss(logits, inputs, targets, args, scale)

    scaled_grad = ms.value_and_grad(micro_loss, grad_position=0, has_aux=True)

    def grad_sums(trainable, frozen, batch, seed, scale):
        """Gradients of the loss summed over scored tokens, still scaled; the loss sum and scored tokens."""
        (_, (loss, n_tokens)), grads = scaled_grad(trainable, frozen, batch, seed, scale)
        return weighted(grads, n_tokens), loss * n_tokens, n_tokens

    pieces = optim.apply_pieces(opt, mesh, plan)
    own = 1.0 if mesh.owns_loss() else 0.0

    @ms.jit
    def train_step(state, frozen, batch, lr, seed, stop):
        """The whole step. Its outputs are one flat tuple of tensors (flat_outputs), which MindSpore's compile
        cache can keep (dict outputs are built by a Python-fallback node: "Cannot export a PyExecute CNode"), and
        which made steps faster too."""
        grads, loss, n_tokens = grad_sums(state['params'], frozen, batch, seed, state['counters'][1])
        new, metrics = optim.apply(state, grads, loss * own, n_tokens * own, stop, lr, pieces)
        return flat_outputs(new, metrics)

    @ms.jit
    def eval_step(trainable, frozen, batch):
        rest, layers, lora = model_weights(trainable, frozen)
        inputs, targets = llama.shift(*batch)
        logits = llama.transformer(rest, layers, inputs, args, llama.sequence_context(*inputs.shape, args), lora)[0]
        return loss_sum(logits, inputs, targets, args)

    return {'train_step': train_step, 'grad_sums': ms.jit(grad_sums), 'eval_step': eval_step, 'add': ms.jit(added)}


def one_graph_grad_sums(params, frozen, micro_batches, seed, scale, setup):
    """((rest, layers) of token-weighted gradient sums, loss sum, scored tokens) over the micro-batches, each
    micro-batch's whole model one graph."""
    f = one_graph(setup)
    grads = loss = n_tokens = None
    for m, batch in enumerate(micro_batches):
        g, loss_m, n_m = f['grad_sums'](ms.mutable(params), frozen, as_tensors(batch),
                                        ms.Tensor(micro_seed(seed, m, len(micro_batches)), ms.int32), scale)
        grads, loss, n_tokens = (g, loss_m, n_m) if grads is None else \
            (f['add'](ms.mutable(grads), ms.mutable(g)), loss + loss_m, n_tokens + n_m)
    return grads, loss, n_tokens


def one_graph_loss_sums(trainable, frozen, batches, setup):
    eval_step = one_graph(setup)['eval_step']
    loss = n_tokens = ms.Tensor(0.0, ms.float32)
    for batch in batches:
        loss_m, n_m = eval_step(ms.mutable(trainable), None if frozen is None else ms.mutable(frozen),
                                as_tensors(batch))
        loss, n_tokens = loss + loss_m, n_tokens + n_m
    return loss, n_tokens


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


GRAPH_CACHE_NOTE = {None: 'compiled; graph cache off', True: "its graph from an earlier run's cache",
                    False: 'compiled; kept for the next run'}


def graph_cache(root, setup, state, frozen, micro_batches):
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


# ----------------------------------------------------------------------------------------------------------------------
# The layer-by-layer driver

@functools.cache
def layer_pieces(args, lora_mode, rows):
    """The jitted pieces of one model; with LoRA (lora_mode) the adapters train and the weights are frozen."""
    def embed(table, inputs):
        return llama.embed(table, inputs, args)

    def embed_dot(table, inputs, dh):
        return (embed(table, inputs).astype(ms.float32) * dh).sum()

    def layer_out(w, lora, h, seed):
        ctx = llama.sequence_context(h.shape[0], h.shape[1], args, seed, rows)
        return llama.layer(w, h, args, ctx, lora)[0]

    def layer_dot(w, lora, h, seed, dh):
        """Its gradient is the layer's vector-Jacobian product with dh (MindSpore's vjp takes no dicts)."""
        return (layer_out(w, lora, h, seed).astype(ms.float32) * dh).sum()

    def head_loss(rest, h, inputs, targets, scale):
        return scaled_loss(llama.head(rest, h, args), inputs, targets, args, scale)

    layer_vjp = ms.grad(layer_dot, grad_position=(1 if lora_mode else 0, 2))
    head_grad = ms.value_and_grad(head_loss, grad_position=1 if lora_mode else (0, 1), has_aux=True)

    @ms.jit
    def head_step(rest, h, inputs, targets, scale):
        (_, (loss, n_tokens)), grads = head_grad(rest, h, inputs, targets, scale)
        return (loss, n_tokens, None, grads) if lora_mode else (loss, n_tokens) + tuple(grads)

    @ms.jit
    def head_loss_sum(rest, h, inputs, targets):
        return loss_sum(llama.head(rest, h, args), inputs, targets, args)

    @ms.jit
    def scored_tokens(inputs, targets):
        return llama.scored(inputs, targets, args).astype(ms.float32).sum()

    @ms.jit
    def accumulate(total, grads, n_tokens):
        return weigh(grads, n_tokens) if total is None else add(total, weigh(grads, n_tokens))

    return {'embed': ms.jit(embed), 'embed_backward': ms.jit(ms.grad(embed_dot, grad_position=0)),
            'layer': ms.jit(layer_out), 'layer_backward': ms.jit(layer_vjp), 'head': head_step,
            'head_loss_sum': head_loss_sum, 'scored_tokens': scored_tokens, 'accumulate': accumulate}


def mutable(tree):
    return None if tree is None else ms.mutable(tree)


class Stage:
    """The layer-by-layer step of this process's pipeline stage over one optimizer step's micro-batches (or, with
    seed None and evaluating, one eval batch's forward): pipeline.run carries out its forwards and backwards.

    params: (rest, layers) of the trainable tensors this stage holds (with LoRA: ({}, adapters)); frozen: with LoRA,
    the base weights' (rest, layers), else None; seed: the step's dropout seed."""

    def __init__(self, params, frozen, micro_batches, setup, seed=None, loss_scale=None, evaluating=False):
        args, parallel = setup.args, setup.mesh.parallel
        self.lora_mode, self.args, self.loss_scale, self.evaluating = frozen is not None, args, loss_scale, evaluating
        self.f = layer_pieces(args, self.lora_mode, setup.rows)
        self.first = layout.stage_layers(args.n_layers, parallel, setup.mesh.coords.stage)[0]
        rest, self.layers, lora = model_weights(params, frozen)
        self.table = {k: v for k, v in rest.items() if k == layout.EMBEDDING}  # the lookup's (first stage)
        tied = layout.LM_HEAD not in rest
        self.rest = {k: v for k, v in rest.items() if k != layout.EMBEDDING or tied}  # the head's (last stage)
        self.adapters = lora or [None] * len(self.layers)
        self.batches = [tuple(ms.Tensor(x) for x in llama.shift(*(np.asarray(x) for x in b))) for b in micro_batches]
        self.n_tokens = [] if evaluating else [self.f['scored_tokens'](*b) for b in self.batches]
        count = len(micro_batches)
        self.seeds = [None if seed is None else
                      dropout_seed(ms.Tensor(micro_seed(seed, m, count), ms.int32), lora, args) for m in range(count)]
        self.saved, self.dh = {}, {}  # per micro-batch: the layer inputs; the head's gradient (last stage)
        self.sums = [None] * (len(self.layers) + 1)  # token-weighted gradient sums: the rest, then each layer
        self.loss_sum = self.n_sum = ms.Tensor(0.0, ms.float32)

    def dropout_seed(self, m, i):
        return None if self.seeds[m] is None else llama.layer_seed(self.seeds[m], self.first + i, self.args.n_layers)

    def forward(self, m, h=None, last=True):
        """Micro-batch m through this stage's layers (h: the activation received, on every stage but the first);
        returns the output activation, or on the last stage runs the head (keeping its gradient, or in evaluation
        adding the batch's loss sum)."""
        inputs, targets = self.batches[m]
        if h is None:
            h = self.f['embed'](ms.mutable(self.table), inputs)
        self.saved[m] = []
        for i, w in enumerate(self.layers):
            if not self.evaluating:
                self.saved[m].append(h)
            h = self.f['layer'](ms.mutable(w), mutable(self.adapters[i]), h, self.dropout_seed(m, i))
        if not last:
            return h
        if self.evaluating:
            loss, n_tokens = self.f['head_loss_sum'](ms.mutable(self.rest), h, inputs, targets)
            self.loss_sum, self.n_sum = self.loss_sum + loss, self.n_sum + n_tokens
            return None
        loss, n_tokens, rest_grads, dh = self.f['head'](ms.mutable(self.rest), h, inputs, targets, self.loss_scale)
        if rest_grads is not None:
            self.accumulate(0, rest_grads, m)
        self.loss_sum, self.n_sum = self.loss_sum + loss * n_tokens, self.n_sum + n_tokens
        self.dh[m] = dh
        return None

    def backward(self, m, dh=None, first=True):
        """The gradient of micro-batch m back through this stage's layers (dh: the gradient received, on every stage
        but the last); returns the gradient of the stage's input, or on the first stage adds the embedding's."""
        dh = self.dh.pop(m) if dh is None else dh
        saved = self.saved.pop(m)
        for i in reversed(range(len(self.layers))):
            grads, dh = self.f['layer_backward'](ms.mutable(self.layers[i]), mutable(self.adapters[i]), saved[i],
                                                 self.dropout_seed(m, i), dh.astype(ms.float32))
            self.accumulate(i + 1, grads, m)
        if not first:
            return dh
        if not self.lora_mode:
            lookup = self.f['embed_backward'](ms.mutable(self.table), self.batches[m][0], dh.astype(ms.float32))
            self.accumulate(0, lookup, m)
        return None

    def accumulate(self, group, grads, m):
        """Add grads (of group 0, the rest, or of layer group - 1), weighted by micro-batch m's scored tokens."""
        self.sums[group] = self.f['accumulate'](mutable(self.sums[group]), ms.mutable(grads), self.n_tokens[m])


def activation_shape(batch, args):
    return batch[0].shape[0], batch[0].shape[1] - 1, args.dim


def layerwise_grad_sums(params, frozen, micro_batches, seed, scale, setup):
    """Gradient sums of this stage's trainable tensors over the step's micro-batches, scheduled 1F1B across the
    pipeline: ((rest, layers) of token-weighted sums, loss sum, scored tokens). The loss sum and the token count are
    this stage's (zero but on the last)."""
    mesh = setup.mesh
    stage = Stage(params, frozen, micro_batches, setup, seed, scale)
    schedule = pipeline.events(mesh.parallel.pipeline_stage, mesh.coords.stage, len(micro_batches))
    pipeline.run(stage, schedule, mesh, activation_shape(micro_batches[0], setup.args))
    layers = [s or {} for s in stage.sums[1:]]
    rest = stage.sums[0] or {}
    rest = {k: rest[k] for k in params[0] if k in rest}  # the params' order, as in the one-graph step (apply's norms)
    return (rest, layers), stage.loss_sum, stage.n_sum


def layerwise_loss_sums(trainable, frozen, batches, setup):
    """(loss sum, scored tokens) of batches through this stage's layers, forwards only, one batch at a time (zero but
    on the last stage, whose head scores them)."""
    mesh = setup.mesh
    loss = n_tokens = ms.Tensor(0.0, ms.float32)
    for batch in batches:
        stage = Stage(trainable, frozen, [batch], setup, evaluating=True)
        schedule = pipeline.events(mesh.parallel.pipeline_stage, mesh.coords.stage, 1, backward=False)
        pipeline.run(stage, schedule, mesh, activation_shape(batch, setup.args))
        loss, n_tokens = loss + stage.loss_sum, n_tokens + stage.n_sum
    return loss, n_tokens
