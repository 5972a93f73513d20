"""A run's state on disk: this process's tensors under MindFormers' names, one file per rank when ranks hold
different ones (out_dir/rank_<i>/, with the mesh and where each slice sits in its whole), read back on any mesh.

Each process reads only its slices (layout.local_layout says which) of the tensors it holds: a run resumes, or
starts from full weights, on a mesh other than the one that wrote them. The state is
{'params', 'm', 'v'}: (rest, [this stage's layer dicts]) each, and 'counters' (AdamW step, loss scale, good steps).

Also the compiled graphs kept for the next run (graph_cache: sample.py's decoding steps, the train step).
"""
import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import mindspore as ms

import convert
import layout
import llama
import util
from util import RunError

HERE = os.path.dirname(os.path.abspath(__file__))
GRAPH_CACHE = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'llama-mindspore')
KEEP_GRAPH_CACHES = 8  # graph_cache's directories kept (a few MB each for the tiny models)


def save(state, cfg, setup, loader_state, step, run_id=0):
    """A training checkpoint of this process's tensors: the trainable ones (with LoRA the adapters) under their
    MindFormers names, adam_m.* / adam_v.*, the model config, the counters and the data position; on a sharded mesh
    in out_dir/rank_<i>/, with the mesh and where each slice sits in its whole. Each file records its step and the
    run's id (train.claim_out_dir), which mark the rank files of one save as one set (convert.Sharded checks them).
    The newest keep_checkpoints stay."""
    mesh, first = setup.mesh, layout.stage_layers(setup.args.n_layers, setup.mesh.parallel, setup.mesh.coords.stage)[0]
    tensors = llama.join_layers(*state['params'], first)
    for key, moments in (('adam_m', state['m']), ('adam_v', state['v'])):
        tensors.update({f'{key}.{k}': v for k, v in llama.join_layers(*moments, first).items()})
    adam_step, scale, good = (x.asnumpy().item() for x in state['counters'])
    extra = {'global_step': int(step), 'run_id': int(run_id), 'data_position': json.dumps(loader_state),
             'run_config': cfg.to_json(),
             'loss_scale': float(scale), 'good_steps': int(good), 'adam_step': int(adam_step), **lora_extra(cfg)}
    folder = directory(cfg, mesh)
    if mesh.sharded:
        extra.update(convert.mesh_extra(mesh.world, mesh.rank, mesh.parallel, layout.places(
            layout.trainable_shapes(cfg, setup.args), setup.args.n_layers, mesh.parallel, mesh.coords)))
    if mesh.sharded or mesh.rank == 0:
        os.makedirs(folder, exist_ok=True)
        convert.save_checkpoint(os.path.join(folder, convert.checkpoint_name(step)), tensors, cfg.model.to_dict(),
                                extra)
    mesh.barrier()  # every rank has written this step before any removes its previous one
    if mesh.sharded or mesh.rank == 0:
        for old in convert.list_checkpoints(folder)[:-cfg.train.keep_checkpoints]:
            os.remove(old)
    return folder


def directory(cfg, mesh):
    """Where this process's checkpoints go: out_dir, or out_dir/rank_<i> when ranks hold different tensors."""
    return os.path.join(cfg.train.out_dir, f'rank_{mesh.rank}') if mesh.sharded else cfg.train.out_dir


def lora_extra(cfg):
    return {'lora_rank': cfg.lora.rank, 'lora_alpha': cfg.lora.alpha, 'lora_targets': cfg.lora.targets} \
        if cfg.lora.rank else {}


def stage_split(local, setup):
    """A flat dict of this process's tensors -> (rest, this stage's layers), as the step holds them."""
    rest, layers = llama.split_layers(local, setup.args.n_layers)
    return rest, [layers[i] for i in layout.stage_layers(setup.args.n_layers, setup.mesh.parallel,
                                                         setup.mesh.coords.stage)]


def local_part(read, shapes, setup, moments=False, tensor=None):
    """stage_split of this process's part of each tensor (of the whole shapes); read(name, index) reads the part
    index of the whole tensor name as float32 numpy, or tensor(name, index) as a Tensor (in the dtype it is held
    in)."""
    parts = layout.local_layout(shapes, setup.args.n_layers, setup.mesh.parallel, setup.mesh.coords, moments)
    tensor = tensor or (lambda k, index: ms.Tensor(np.ascontiguousarray(read(k, index), np.float32)))
    return stage_split({k: tensor(k, tuple(slice(a, b) for a, b in s)) for k, s in parts.items()}, setup)


def restore(path, cfg, setup):
    """A training checkpoint (one file, or any mesh's rank files) -> (state, step, data position): this process's
    slices of the trainable tensors and their moments, read from the pieces that hold them."""
    source, shapes = convert.Sharded(path), layout.trainable_shapes(cfg, setup.args)
    problems = layout.shape_problems({k: v for k, v in source.shapes.items() if not k.startswith('adam_')}, shapes)
    if problems:
        raise RunError(f'{path} does not match this run ({layout.describe(problems, 1)}): resume with the config that '
                       f'wrote it')
    if any(f'adam_m.{k}' not in source.shapes or f'adam_v.{k}' not in source.shapes for k in shapes):
        raise RunError(f'{path} holds no optimizer state: it is not a training checkpoint')
    m, v = (local_part(lambda k, index, key=key: source.read(f'{key}.{k}', index), shapes, setup, moments=True)
            for key in ('adam_m', 'adam_v'))
    extra = source.extra
    counters = (ms.Tensor(int(extra.get('adam_step', extra['global_step'])), ms.int32),
                ms.Tensor(float(extra.get('loss_scale', 1.0)), ms.float32),
                ms.Tensor(int(extra.get('good_steps', 0)), ms.int32))
    state = {'params': local_part(source.read, shapes, setup), 'm': m, 'v': v, 'counters': counters}
    return state, int(extra['global_step']), json.loads(extra['data_position'])


def load_weights(path, cfg, setup, frozen=False):
    """(rest, layers) of this process's part of the weights at path (any format convert.py reads, any mesh's rank
    files), checked against the config; each tensor is read only where this process's slice of it lies. Weights
    that train are float32 masters; frozen ones (a LoRA base, eval's) are held in model.frozen_dtype
    (convert.held_dtype: '' keeps a 16-bit checkpoint's own dtype)."""
    file_config, lazies = convert.open_checkpoint(path)
    problems = layout.shape_problems({k: t.shape for k, t in lazies.items()}, layout.param_shapes(setup.args))
    if problems:
        raise RunError(f'{path}: checkpoint does not match the model config: {layout.describe(problems)}')
    differing = {k: v for k, v in file_config.items() if k in cfg.model and cfg.model[k] != v}
    if differing and setup.mesh.rank == 0:
        print(f'note: {path} was saved with {differing}; this run uses the config\'s values')
    dtype = convert.held_dtype(lazies, cfg.model.frozen_dtype) if frozen else 'float32'
    if frozen:
        check_holds(path, cfg, setup, dtype)
    return local_part(None, layout.param_shapes(setup.args), setup,
                      tensor=lambda k, index: convert.held_tensor(lazies[k], index, dtype))


def check_holds(path, cfg, setup, dtype):
    """Refuse, before reading anything, frozen weights (eval's, sample --config's, a LoRA base) that this machine
    cannot hold: this process's slices of them in dtype, as the plan counts them, against what is available less
    util.RUNTIME_BYTES (or train.max_memory_gb), on every process of the machine (CPU processes share it)."""
    parts = layout.local_layout(layout.param_shapes(setup.args), setup.args.n_layers, setup.mesh.parallel,
                                setup.mesh.coords)
    need = sum(math.prod(layout.sliced_shape(s)) for s in parts.values()) * convert.HELD_BYTES[dtype]
    need *= setup.mesh.world if ms.get_context('device_target') == 'CPU' else 1
    budget = util.memory_budget(cfg.train.max_memory_gb)
    if need > budget:
        raise RunError(f'{path}: holding its weights in {dtype} needs ~{need / layout.GB:.1f} GB but only '
                       f'{max(budget, 0) / layout.GB:.1f} GB is available: hold them in 16 bits '
                       f'(--config.model.frozen_dtype=float16), or split them over more devices')


def save_adapter(cfg, setup):
    """The adapter alone, whole (merged from the last checkpoint's rank files on a sharded mesh): LoRA tensors,
    rank, alpha and targets, and the base model's config."""
    setup.mesh.barrier()
    if setup.mesh.rank == 0:
        source = convert.Sharded(convert.newest_checkpoint(cfg.train.out_dir))
        path = os.path.join(cfg.train.out_dir, 'adapter.ckpt')
        convert.save_checkpoint(path, {k: source.read(k) for k in source.shapes if not k.startswith('adam_')},
                                cfg.model.to_dict(), lora_extra(cfg))
        print(f'saved {path}')


# ----------------------------------------------------------------------------------------------------------------------
# Compiled graphs kept for the next run

@contextlib.contextmanager
def graph_cache(root, identity):
    """MindSpore's on-disk compile cache for the graphs this process compiles inside the block, in a directory of
    root named by a hash of everything that decides them: this code, MindSpore's version and `identity` (sample.py:
    the model, the shapes, the sampling kind; step.py: the train step's). One directory per identity because MindSpore
    numbers a process's graphs in the order they compile and checks only the source files: fed two sequences, one
    directory hands out wrong graphs (measured: two functions compiled in the other order loaded each other's). A new
    directory is written under a hidden temporary name and renamed when the block ends well, so an interrupted run
    leaves nothing to load; stale temporaries and all but the KEEP_GRAPH_CACHES newest directories are deleted.
    Yields whether a kept directory was found; None when off: root '' or a root that cannot be written (a note
    says so, and the graphs compile as without the cache)."""
    if not root:
        yield None
        return
    code = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(HERE, '*.py')) + glob.glob(os.path.join(HERE, '*.cc'))):
        with open(path, 'rb') as f:
            code.update(f.read())
    key = hashlib.sha256(f'{ms.__version__} {code.hexdigest()} {identity!r}'.encode()).hexdigest()[:20]
    final = os.path.join(root, key)
    try:
        os.makedirs(root, exist_ok=True)
        prune_graph_caches(root)
        ready = os.path.isdir(final)
        path = final if ready else tempfile.mkdtemp(prefix=f'.{key}.', dir=root)
    except OSError as e:
        print(f'note: graph cache off, {root} cannot be written ({e.strerror})', file=sys.stderr)
        yield None
        return
    skip_dependency_scan()
    ms.set_context(enable_compile_cache=True, compile_cache_path=path)
    try:
        yield ready
    except BaseException:
        if not ready:
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        ms.set_context(enable_compile_cache=False)
    if ready:
        with contextlib.suppress(OSError):  # a cache shared read-only still loads
            os.utime(final)  # recently used: kept
    else:
        try:
            os.rename(path, final)
        except OSError:  # another process kept the same graphs first
            shutil.rmtree(path, ignore_errors=True)


def skip_dependency_scan():
    """With its compile cache on, MindSpore reads and parses every script the entry script imports, at every
    compile, to hash them into the cache: 0.2 s a graph here (sample.py's warm start, 2.7 s, compiles two). The
    directory graph_cache picks is named by a hash of this code already, so MindSpore is given no files to hash.
    (A private function of MindSpore 2.10; under another version without it, the scan runs.)"""
    from mindspore.graph import api
    if hasattr(api, '_get_compile_cache_dep_files'):
        api._get_compile_cache_dep_files = lambda: []


def prune_graph_caches(root):
    """Delete graph_cache's temporaries older than an hour (an interrupted run's) and all but its newest
    KEEP_GRAPH_CACHES directories."""
    entries = [(os.path.getmtime(e.path), e) for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    kept = sorted((e for e in entries if not e[1].name.startswith('.')), key=lambda e: -e[0])
    stale = [e for t, e in entries if e.name.startswith('.') and time.time() - t > 3600]
    for entry in stale + [e for _, e in kept[KEEP_GRAPH_CACHES:]]:
        shutil.rmtree(entry.path, ignore_errors=True)
