"""Where every tensor of a LLaMA lives: its config and derived sizes, MindFormers' tensor names and shapes, how each
tensor is split over a mesh of data x model x pipeline ranks (one sharding table), and what that costs in memory.

Pure Python: llama.py, train.py and sample.py build on it, and convert.py uses it without importing MindSpore
(400 MB and 2 s that a checkpoint conversion does not need).
"""
import math
import re
from typing import NamedTuple

EMBEDDING = 'model.tok_embeddings.embedding_weight'
NORM_OUT = 'model.norm_out.weight'
LM_HEAD = 'lm_head.weight'
LORA_A, LORA_B = '.mindpet_delta_lora_a', '.mindpet_delta_lora_b'  # MindFormers' names: <linear>.mindpet_delta_lora_a
LAYER = re.compile(r'model\.layers\.(\d+)\.(.+)')  # a layer's tensor: its index, then its layer-independent name
GB = 1024 ** 3
MODEL_DEFAULTS = dict(max_seq_len=2048, norm_eps=1e-6, rope_theta=10000.0, multiple_of=256, tie_embeddings=False,
                      compute_dtype='float32', pad_id=0, ignore_id=-100)  # = configs/base.py's (tested)


# ----------------------------------------------------------------------------------------------------------------------
# The model config

class Solo:
    """The tensor-parallel group of a process that holds whole weights: one member, whose collectives are
    identities. Every process has a group (ModelArgs.tp), so the model's layers never ask whether they are split."""
    size, rank = 1, 0

    def copy(self, x):
        return x

    def reduce(self, x):
        return x

    def gather(self, x):
        return x

    def __eq__(self, other):
        return isinstance(other, Solo)

    def __hash__(self):
        return 1

    def __repr__(self):  # stable across processes: graph caches are keyed on the model's arguments
        return 'Solo()'


SOLO = Solo()


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
    compute_dtype: str  # 'float32' | 'float16' | 'bfloat16'; trained weights stay float32, frozen ones are held
    #                     in 16 bits or 32 (model.frozen_dtype) and widened where they are used
    pad_id: int
    ignore_id: int
    lora_alpha: float = 0.0   # scales the LoRA branch by alpha / rank (the adapters themselves are a separate dict)
    lora_dropout: float = 0.0  # dropout on each LoRA branch's input, in training only
    tp: object = SOLO  # this process's tensor-parallel group: SOLO, or comm.ModelParallel
    kernels: object = None  # the C++ kernels the model runs (kernels.build's value), or None: MindSpore's ops



def ffn_hidden_size(dim, multiple_of=256, ffn_dim_multiplier=None, ffn_hidden=0):
    """LLaMA's FFN width: 2/3 of 4*dim, scaled, rounded up to multiple_of; an explicit ffn_hidden wins."""
    if ffn_hidden:
        return int(ffn_hidden)
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def model_args(m):
    """ModelArgs from a config's `model` section (a ConfigDict or plain dict). The one place derived values live.
    Raises ValueError naming every field that makes no model."""
    m = {**MODEL_DEFAULTS, **{k: v for k, v in dict(m).items() if v is not None}}
    problems = [f'{k} must be at least 1, got {m.get(k)}' for k in ('dim', 'n_layers', 'n_heads', 'vocab_size',
                                                                  'max_seq_len')
                if not isinstance(m.get(k), int) or m[k] < 1]
    if problems:
        raise ValueError('; '.join(problems))
    n_kv = m.get('n_kv_heads') or m['n_heads']
    if m['dim'] % m['n_heads']:
        problems.append(f"dim {m['dim']} is not divisible by n_heads {m['n_heads']}")
    elif (m['dim'] // m['n_heads']) % 2:
        problems.append(f"head_dim {m['dim'] // m['n_heads']} must be even for RoPE")
    if n_kv < 1 or m['n_heads'] % n_kv:
        problems.append(f"n_heads {m['n_heads']} is not divisible by n_kv_heads {n_kv}")
    ffn = ffn_hidden_size(m['dim'], m['multiple_of'], m.get('ffn_dim_multiplier'), m.get('ffn_hidden', 0))
    if ffn < 1:
        problems.append(f'the FFN width must be at least 1, got {ffn}')
    if m['compute_dtype'] not in ('float32', 'float16', 'bfloat16'):
        problems.append(f"compute_dtype must be float32, float16 or bfloat16, got {m['compute_dtype']!r}")
    if m.get('frozen_dtype', '') not in ('', 'float32', 'float16', 'bfloat16'):
        problems.append(f"frozen_dtype must be float16, bfloat16, float32 or '' (the checkpoint's own), got "
                        f"{m['frozen_dtype']!r}")
    if problems:
        raise ValueError('; '.join(problems))
    return ModelArgs(
        dim=m['dim'], n_layers=m['n_layers'], n_heads=m['n_heads'], n_kv_heads=n_kv, head_dim=m['dim'] // m['n_heads'],
        ffn_hidden=ffn, vocab_size=m['vocab_size'], max_seq_len=m['max_seq_len'], norm_eps=float(m['norm_eps']),
        rope_theta=float(m['rope_theta']), tie_embeddings=bool(m['tie_embeddings']),
        compute_dtype=m['compute_dtype'], pad_id=m['pad_id'], ignore_id=m['ignore_id'],
        lora_alpha=float(m.get('lora_alpha', 0.0)), lora_dropout=float(m.get('lora_dropout', 0.0)))


def seq_length(cfg):
    """Tokens per training row: data.seq_length, or the model's max_seq_len when it is 0."""
    return cfg.data.seq_length or cfg.model.max_seq_len


def training_problems(cfg):
    """What in a config's training values makes no run, a line each."""
    t = cfg.train
    problems = [f'train.{k} must be at least 1, got {t[k]}' for k in ('batch_size', 'grad_accum', 'log_interval',
                                                                    'ckpt_interval', 'keep_checkpoints', 'epochs')
                if t[k] < 1]
    problems += [f'train.{k} must not be negative, got {t[k]}' for k in ('lr', 'lr_end', 'weight_decay', 'grad_clip',
                                                                        'eval_interval', 'eval_batches', 'loss_scale')
                 if t[k] < 0]
    if t.total_steps == 0 or t.total_steps < -1:
        problems.append(f'train.total_steps must be at least 1, or -1 for train.epochs passes, got {t.total_steps}')
    if not 0 <= t.warmup_ratio <= 1:
        problems.append(f'train.warmup_ratio must be within [0, 1], got {t.warmup_ratio}')
    if seq_length(cfg) > cfg.model.max_seq_len:
        problems.append(f'data.seq_length {cfg.data.seq_length} is longer than model.max_seq_len '
                        f'{cfg.model.max_seq_len}')
    return problems


# ----------------------------------------------------------------------------------------------------------------------
# Tensor names and shapes

def layer_shapes(args):
    """Layer-independent name -> shape of one decoder layer's weights (a layer's full name is
    model.layers.{i}.<name>)."""
    D, F, KVD = args.dim, args.ffn_hidden, args.n_kv_heads * args.head_dim
    return {'attention_norm.weight': (D,), 'attention.wq.weight': (D, D), 'attention.wk.weight': (KVD, D),
            'attention.wv.weight': (KVD, D), 'attention.wo.weight': (D, D), 'ffn_norm.weight': (D,),
            'feed_forward.w1.weight': (F, D), 'feed_forward.w2.weight': (D, F), 'feed_forward.w3.weight': (F, D)}


def param_shapes(args):
    """Name -> shape of every parameter, in MindFormers' names and order."""
    shapes = {EMBEDDING: (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        shapes.update({f'model.layers.{i}.{name}': shape for name, shape in layer_shapes(args).items()})
    shapes[NORM_OUT] = (args.dim,)
    if not args.tie_embeddings:
        shapes[LM_HEAD] = (args.vocab_size, args.dim)
    return shapes


def adapter_shapes(cfg, args):
    """{name: shape} of a config's LoRA adapters (its lora section), None without LoRA."""
    return lora_shapes(args, cfg.lora.rank, cfg.lora.targets) if cfg.lora.rank else None


def trainable_shapes(cfg, args):
    """What a config's run trains: its LoRA adapters, else every parameter."""
    return adapter_shapes(cfg, args) or param_shapes(args)


def count_params(args):
    return sum(math.prod(s) for s in param_shapes(args).values())


def lora_shapes(args, rank, targets):
    """Name -> shape of the LoRA tensors for every linear layer whose name (without '.weight') fully matches the
    regex targets: A [rank, in], B [out, rank]."""
    pattern = re.compile(targets)
    shapes = {}
    for name, (out_features, in_features) in ((k, v) for k, v in param_shapes(args).items() if len(v) == 2):
        linear_name = name[:-len('.weight')]
        if LAYER.fullmatch(name) and pattern.fullmatch(linear_name):
            shapes[linear_name + LORA_A] = (rank, in_features)
            shapes[linear_name + LORA_B] = (out_features, rank)
    if not shapes:
        raise ValueError(f'the LoRA targets {targets!r} match no linear layer (names look like '
                         f'model.layers.0.attention.wq)')
    return shapes


def shape_problems(shapes, expected):
    """Every missing, unexpected or misshapen tensor of shapes ({name: shape}) against expected, as phrases."""
    problems = [f'missing {k}' for k in expected if k not in shapes]
    problems += [f'unexpected {k}' for k in shapes if k not in expected]
    problems += [f'{k} has shape {tuple(shapes[k])}, the config needs {tuple(s)}'
                 for k, s in expected.items() if k in shapes and tuple(shapes[k]) != tuple(s)]
    return problems


def describe(problems, limit=3):
    return '; '.join(problems[:limit]) + (f' (and {len(problems) - limit} more)' if len(problems) > limit else '')


# ----------------------------------------------------------------------------------------------------------------------
# The mesh and the sharding table

class ParallelArgs(NamedTuple):
    """MindFormers' parallel_config: data_parallel x model_parallel x pipeline_stage processes."""
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1         # pipeline micro-batches per step (with pipeline_stage > 1)
    optimizer_shard: bool = False    # split AdamW's moments over data-parallel ranks (ZeRO-1)
    vocab_emb_dp: bool = True        # True: embedding and lm_head replicated over mp; False: vocabulary split over mp
    gradient_aggregation_group: int = 4  # data-parallel gradients are all-reduced in this many fused buckets
    recompute: bool = False          # the one-graph step keeps only each layer's input for the backward


def parallel_args(section, world=None):
    """ParallelArgs from a config's `parallel` section; data_parallel 0 means world / (model_parallel x
    pipeline_stage), or 1 without a world size. The one place a parallel config is read."""
    p = ParallelArgs(**{k: v for k, v in dict(section).items() if k in ParallelArgs._fields})
    if p.data_parallel == 0:
        p = p._replace(data_parallel=max(1, (world or 1) // max(1, p.model_parallel * p.pipeline_stage)))
    return p


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
    if pp > 1 and args.tie_embeddings:
        problems.append('tied embeddings cannot be split into pipeline stages (the embedding is on the first stage, '
                        'the lm_head on the last): set pipeline_stage 1')
    return problems


class Coords(NamedTuple):
    """A process's place in the mesh. Ranks are laid out stage-major with tensor-parallel peers adjacent, as
    Megatron-LM and MindSpore do: rank = stage * (dp * mp) + data * mp + model."""
    data: int = 0
    model: int = 0
    stage: int = 0


def coords_of(rank, parallel):
    dp, mp = parallel.data_parallel, parallel.model_parallel
    return Coords(data=rank // mp % dp, model=rank % mp, stage=rank // (dp * mp))


def rank_of(coords, parallel):
    dp, mp = parallel.data_parallel, parallel.model_parallel
    return coords.stage * dp * mp + coords.data * mp + coords.model


def mesh_groups(rank, parallel):
    """The ranks of each communication group this rank belongs to: its tensor-parallel group ('model'), its
    data-parallel group ('data'), and its pipeline neighbours' pairs ('prev', 'next'); groups of one are left out."""
    c = coords_of(rank, parallel)
    dp, mp, pp = parallel.data_parallel, parallel.model_parallel, parallel.pipeline_stage
    groups = {'model': [rank_of(c._replace(model=m), parallel) for m in range(mp)],
              'data': [rank_of(c._replace(data=d), parallel) for d in range(dp)]}
    if c.stage > 0:
        groups['prev'] = [rank_of(c._replace(stage=c.stage - 1), parallel), rank]
    if c.stage < pp - 1:
        groups['next'] = [rank, rank_of(c._replace(stage=c.stage + 1), parallel)]
    return {k: v for k, v in groups.items() if len(v) > 1}


# Parameter name pattern -> how each dimension is split over the model-parallel axis: 'mp', None (replicated), or
# 'vocab' (= 'mp' when vocab_emb_dp is False). Megatron's layout: wq/wk/wv/w1/w3 are column-parallel (output rows,
# i.e. heads, split), wo/w2 row-parallel (input columns split; their partial outputs are all-reduced). LoRA's A and B
# follow their layer: a column-parallel layer splits B's rows, a row-parallel one A's columns. Every parameter is
# replicated over data-parallel ranks (AdamW's moments are split over them with optimizer_shard). Ordered: the first
# match wins; a name no rule matches is an error.
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
    raise ValueError(f'no sharding rule matches parameter {name}: add one to layout.SHARDING')


def stage_of(name, n_layers, pipeline_stage):
    """MindFormers' pipeline assignment: layer i on stage min(i // ceil(L / pp), pp - 1), the embedding on the first
    stage, the final norm and lm_head on the last."""
    match = re.match(r'model\.layers\.(\d+)\.', name)
    if match:
        return min(int(match.group(1)) // math.ceil(n_layers / pipeline_stage), pipeline_stage - 1)
    return 0 if name == EMBEDDING else pipeline_stage - 1


def stage_layers(n_layers, parallel, stage):
    """The layer indices on a pipeline stage."""
    return [i for i in range(n_layers) if stage_of(f'model.layers.{i}.', n_layers, parallel.pipeline_stage) == stage]


def local_layout(shapes, n_layers, parallel, coords, moments=False):
    """{name: ((start, stop), ...)}: the part of each full tensor (shapes: {name: full shape}) this process holds.
    Tensors of other pipeline stages are left out. moments=True gives the part of AdamW's moments instead: with
    optimizer_shard, also split over data-parallel ranks along the first dimension where it divides (as MindSpore's
    parallel optimizer does); the others stay whole."""
    mp, dp = parallel.model_parallel, parallel.data_parallel
    layout = {}
    for name, shape in shapes.items():
        if stage_of(name, n_layers, parallel.pipeline_stage) != coords.stage:
            continue
        slices = [(coords.model * (n // mp), (coords.model + 1) * (n // mp)) if split == 'mp' else (0, n)
                  for n, split in zip(shape, partition(name, parallel.vocab_emb_dp))]
        rows = slices[0][1] - slices[0][0]
        if moments and parallel.optimizer_shard and dp > 1 and rows % dp == 0:
            first = slices[0][0] + coords.data * (rows // dp)
            slices[0] = (first, first + rows // dp)
        layout[name] = tuple(slices)
    return layout


def sliced_shape(slices):
    return tuple(stop - start for start, stop in slices)


def places(shapes, n_layers, parallel, coords):
    """{name: [full shape, starts]} of the tensors and AdamW moments a process holds: where each slice sits in its
    whole, as a sharded checkpoint stores it."""
    out = {k: [list(shapes[k]), [a for a, _ in s]] for k, s in local_layout(shapes, n_layers, parallel, coords).items()}
    for k, s in local_layout(shapes, n_layers, parallel, coords, moments=True).items():
        out[f'adam_m.{k}'] = out[f'adam_v.{k}'] = [list(shapes[k]), [a for a, _ in s]]
    return out


class StepPlan(NamedTuple):
    """The constants optim.apply needs about a process's trainable tensors (hashable: compiled pieces are cached
    on it)."""
    counted: tuple   # per group kind (0: the rest, 1: a layer): the names this rank counts in the global gradient
    #                  norm (a tensor replicated over ranks counts once)
    rows: tuple      # per group kind: ((name, (first, count)), ...) of the moments this rank holds a slice of
    buckets: tuple   # the data-parallel all-reduce's fused buckets of ('group/name', size)


def step_plan(shapes, n_layers, p, c):
    """The StepPlan of the trainable tensors ({full name: full shape}) for the process at coords c of parallel p."""
    weights = local_layout(shapes, n_layers, p, c)
    moments = local_layout(shapes, n_layers, p, c, moments=True)
    layers = stage_layers(n_layers, p, c.stage)
    counted, rows, sizes = [set(), set()], [{}, {}], []
    for name, slices in weights.items():
        match = LAYER.fullmatch(name)
        kind, short = (1, match.group(2)) if match else (0, name)
        if c.data == 0 and (c.model == 0 or 'mp' in partition(name, p.vocab_emb_dp)):
            counted[kind].add(short)
        (w_first, _), (m_first, m_stop) = slices[0], moments[name][0]
        if (m_first, m_stop) != slices[0]:
            rows[kind][short] = (m_first - w_first, m_stop - m_first)
        group = layers.index(int(match.group(1))) + 1 if match else 0
        sizes.append((f'{group}/{short}', math.prod(sliced_shape(slices))))
    buckets = gradient_buckets(sizes, max(1, p.gradient_aggregation_group))
    return StepPlan(tuple(frozenset(s) for s in counted), tuple(tuple(sorted(r.items())) for r in rows), buckets)


def gradient_buckets(sizes, buckets):
    """Split [(key, size)] into `buckets` contiguous groups of similar total size (MindFormers'
    gradient_aggregation_group): a tuple of groups of (key, size)."""
    target, groups, current, filled = sum(n for _, n in sizes) / buckets, [], [], 0
    for key, size in sizes:
        current.append((key, size))
        filled += size
        if filled >= target * (len(groups) + 1) and len(groups) < buckets - 1:
            groups.append(tuple(current))
            current = []
    return tuple(groups + [tuple(current)] if current else groups)


# ----------------------------------------------------------------------------------------------------------------------
# Compute and memory

def flops_per_token(args, seq_len):
    """Training FLOPs per token: 6 x (parameters in matmuls) + 12 x layers x dim x seq_len (attention scores and
    mixing, forward and backward), the PaLM count. Norm weights and the embedding lookup are not matmuls; a tied
    lm_head is."""
    shapes = param_shapes(args)
    matmul_params = sum(math.prod(s) for k, s in shapes.items() if len(s) == 2 and k != EMBEDDING)
    matmul_params += args.vocab_size * args.dim if args.tie_embeddings else 0
    return 6 * matmul_params + 12 * args.n_layers * args.dim * seq_len


def layerwise(parallel, n_layers, train, device):
    """Whether the step runs layer by layer from the host (see step.py): always with pipeline stages (the schedule
    drives it), and on CPU from train.layerwise_from layers, where MindSpore's compile time grows with every layer
    it unrolls; also with micro-batches on a tensor-parallel mesh, whose gradients MindSpore 2.10 fails to compile
    through the tensor-parallel cells in one graph ("the parameters number of the function is 3"). Otherwise
    (Ascend, GPU) the whole model is one graph."""
    return parallel.pipeline_stage > 1 or (device == 'CPU' and 0 < train.layerwise_from <= n_layers) or \
        (parallel.model_parallel > 1 and train.grad_accum > 1)


def stage_memory(args, parallel, batch_size, seq_len, lora=None, fp16_weights=False, layer_by_layer=None,
                 frozen_bytes=4):
    """Bytes per device on each pipeline stage, by kind, for the state this implementation holds on a mesh of
    dp x mp x pp processes (local_layout's slices of every tensor).

    Trained weights are fp32 masters (4 B); frozen ones (LoRA's base) are held in frozen_bytes (2: float16 or
    bfloat16, as model.frozen_dtype holds them). A weight held in another dtype than the compute dtype is copied
    into it where it is used: a temporary of the step (of every weight in one graph, of one layer at a time layer by
    layer). fp16_weights instead counts every weight in 2 B with no copy, as MindFormers keeps them. Gradients
    follow the trained weights' dtype; AdamW's two fp32 moments take 8 B, split over data-parallel ranks with
    optimizer_shard. With LoRA ({name: shape} of the adapters) only the adapters have gradients and moments.
    Activations per layer and micro-batch follow Korthikanti et al. 2022 for tensor parallelism without sequence
    parallelism, s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes at 16 bits (it counts dropout masks LLaMA does not have, so
    it errs high), doubled for fp32. A layer-by-layer step (the default with pipeline stages) or recompute keeps only
    each layer's input (s*b*h in the compute dtype) and one layer's full activations at a time. Under 1F1B stage k
    holds min(pp - k, micro_batch_num) micro-batches in flight. The last stage also holds fp32 logits and their
    gradient."""
    mp, pp = parallel.model_parallel, parallel.pipeline_stage
    layer_by_layer = pp > 1 if layer_by_layer is None else layer_by_layer
    s, b, h, a = seq_len, batch_size, args.dim, args.n_heads
    act_bytes = 2 if args.compute_dtype in ('float16', 'bfloat16') else 4
    full_layer = s * b * h * (10 + 24 / mp + 5 * a * s / (h * mp)) * act_bytes / 2
    keeps_inputs = layer_by_layer or parallel.recompute
    kept_layer = s * b * h * act_bytes if keeps_inputs else full_layer
    logits = 2 * 4 * s * b * args.vocab_size / (1 if parallel.vocab_emb_dp else mp)
    shapes, trained = param_shapes(args), lora or param_shapes(args)

    def count(stage, shapes_=shapes, moments=False):
        layout = local_layout(shapes_, args.n_layers, parallel, Coords(stage=stage), moments)
        return sum(math.prod(sliced_shape(v)) for v in layout.values())
    one_layer = count(0, {n: v for n, v in shapes.items() if n.startswith('model.layers.0.')})
    stages = []
    for k in range(pp):
        weights, trainable = count(k), count(k, trained)
        layers = len(stage_layers(args.n_layers, parallel, k))
        in_flight = min(pp - k, parallel.micro_batch_num) if pp > 1 else 1
        copied = max(one_layer, weights - layers * one_layer) if layer_by_layer else weights  # a layer or the rest
        held = 2 if fp16_weights else frozen_bytes if lora else 4  # bytes a weight (a LoRA base's) is held in
        stages.append({
            'weights': weights * held + (4 * trainable if lora else 0),
            'compute copy': act_bytes * copied if held != act_bytes else 0,
            'gradients': trainable * (2 if fp16_weights else 4),
            'optimizer': 8 * count(k, trained, moments=True),
            'activations': layers * in_flight * kept_layer + (full_layer if keeps_inputs else 0)
            + (logits if k == pp - 1 else 0)})
    return stages


def sampling_memory(args, held_bytes, batch_size, cache_len):
    """Bytes sample.py holds for a model in one process, by kind: the weights as they are held (held_bytes each:
    2 for a 16-bit checkpoint), the KV cache and the last position's logits in the compute dtype."""
    act_bytes = 2 if args.compute_dtype in ('float16', 'bfloat16') else 4
    kv = 2 * args.n_layers * batch_size * args.n_kv_heads * cache_len * args.head_dim * act_bytes
    return {'weights': count_params(args) * held_bytes, 'kv cache': kv, 'logits': 4 * batch_size * args.vocab_size}


def memory_plan(*arguments, **fields):
    """stage_memory of the fullest stage: what each device must hold."""
    return max(stage_memory(*arguments, **fields), key=lambda parts: sum(parts.values()))


def plan_configs(args, parallel, devices):
    """Every seed-style (dp, mp, pp) for this many devices that the model divides into, fewest model splits first."""
    found = []
    for mp in range(1, devices + 1):
        for pp in range(1, devices // mp + 1):
            if devices % (mp * pp):
                continue
            candidate = parallel._replace(data_parallel=devices // (mp * pp), model_parallel=mp, pipeline_stage=pp,
                                          micro_batch_num=max(parallel.micro_batch_num, pp))
            if not parallel_problems(args, candidate, devices):
                found.append(candidate)
    return sorted(found, key=lambda p: (p.model_parallel * p.pipeline_stage, p.pipeline_stage))


def frozen_bytes(cfg):
    """Bytes a frozen weight (LoRA's base) is held in by model.frozen_dtype; '' (the checkpoint's own) is planned as
    float32, which a 16-bit checkpoint only lowers."""
    return 2 if cfg.model.frozen_dtype in ('float16', 'bfloat16') else 4


def print_plan(cfg):
    """train.py --plan: per-device memory of a config's parallel split on its devices, as this implementation holds
    it (and with MindFormers' fp16 weights), tokens/s at an assumed MFU, the smallest splits that fit, and last the
    config as written."""
    args = model_args(cfg.model)
    parallel = parallel_args(cfg.parallel)
    devices = parallel.data_parallel * parallel.model_parallel * parallel.pipeline_stage
    problems = parallel_problems(args, parallel, devices)
    if problems:
        raise ValueError('bad parallel config: ' + '; '.join(problems))
    budget, seq, batch = cfg.parallel.device_memory_gb * GB, seq_length(cfg), cfg.train.batch_size
    lora = adapter_shapes(cfg, args)
    held = frozen_bytes(cfg)

    def plan(p, fp16_weights=False):
        return sum(memory_plan(args, p, batch, seq, lora, fp16_weights, frozen_bytes=held).values())
    ours = f'LoRA base in {cfg.model.frozen_dtype or "float32"}' if lora else 'fp32 master weights'
    print(f'{count_params(args) / 1e9:.2f} B parameters on {devices} devices of {cfg.parallel.device_memory_gb:g} GB: '
          f'data_parallel {parallel.data_parallel} x model_parallel {parallel.model_parallel} x pipeline_stage '
          f'{parallel.pipeline_stage}, {parallel.micro_batch_num} micro-batches of {batch} x {seq} tokens')
    print(f'{"per device, fullest stage (GB)":50} weights  copy  grads  optim  activ   total  fits')
    for fp16_weights in (False, True):
        for shard, recompute in ((False, False), (True, False), (False, True), (True, True)):
            p = parallel._replace(optimizer_shard=shard, recompute=recompute)
            parts = memory_plan(args, p, batch, seq, lora, fp16_weights, frozen_bytes=held)
            label = (f'{"fp16 weights (MindFormers)" if fp16_weights else ours}'
                     f'{", opt shard" if shard else ""}{", recompute" if recompute else ""}')
            total = sum(parts.values())
            print(f'{label:50}' + ''.join(f'{v / GB:7.1f}' for v in parts.values())
                  + f'{total / GB:8.1f}  {"yes" if total <= budget else "no"}')
    flops = flops_per_token(args, seq)
    print(f'at MFU {cfg.parallel.mfu:g} of {cfg.parallel.device_tflops:g} TFLOPS: '
          f'{cfg.parallel.mfu * cfg.parallel.device_tflops * 1e12 / flops:,.0f} tokens/s per device '
          f'({flops / 1e9:.1f} GFLOP per token)')
    fitting = [(p, total) for p in plan_configs(args, parallel, devices) if (total := plan(p)) <= budget]
    print(f'smallest configurations that fit {devices} devices with {ours} (optimizer shard '
          f'{"on" if parallel.optimizer_shard else "off"}, recompute {"on" if parallel.recompute else "off"}): '
          + ('; '.join(f'dp {p.data_parallel} x mp {p.model_parallel} x pp {p.pipeline_stage} ({total / GB:.1f} GB)'
                       for p, total in fitting[:4]) or 'none'))
    total = plan(parallel)
    print(f'config as written: {total / GB:.1f} GB per device of {cfg.parallel.device_memory_gb:g} GB: '
          f'{"fits" if total <= budget else "does not fit"}')
    return parallel
