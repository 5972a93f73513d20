"""A run's state on disk: this process's tensors under MindFormers' names, one file per rank when ranks hold
different ones (out_dir/rank_<i>/, with the mesh and where each slice sits in its whole), read back on any mesh.

Each process reads only its slices (layout.local_layout says which) of the tensors it holds: a run resumes, or
starts from full weights, on a mesh other than the one that wrote them. The state is
{'params', 'm', 'v'}: (rest, [this stage's layer dicts]) each, and 'counters' (AdamW step, loss scale, good steps).
"""
import json
import os

import numpy as np
import mindspore as ms

import convert
import layout
import llama
from monitor import RunError


def save(state, cfg, setup, loader_state, step):
    """A training checkpoint of this process's tensors: the trainable ones (with LoRA the adapters) under their
    MindFormers names, adam_m.* / adam_v.*, the model config, the counters and the data position; on a sharded mesh
    in out_dir/rank_<i>/, with the mesh and where each slice sits in its whole. The newest keep_checkpoints stay."""
    mesh, first = setup.mesh, layout.stage_layers(setup.args.n_layers, setup.mesh.parallel, setup.mesh.coords.stage)[0]
    tensors = llama.join_layers(*state['params'], first)
    for key, moments in (('adam_m', state['m']), ('adam_v', state['v'])):
        tensors.update({f'{key}.{k}': v for k, v in llama.join_layers(*moments, first).items()})
    adam_step, scale, good = (x.asnumpy().item() for x in state['counters'])
    extra = {'global_step': int(step), 'data_position': json.dumps(loader_state), 'run_config': cfg.to_json(),
             'loss_scale': float(scale), 'good_steps': int(good), 'adam_step': int(adam_step), **lora_extra(cfg)}
    folder = directory(cfg, mesh)
    if mesh.sharded:
        extra['mesh'] = json.dumps({'world': mesh.world, 'rank': mesh.rank, **mesh.parallel._asdict()})
        extra['layout'] = json.dumps(layout.places(layout.trainable_shapes(cfg, setup.args), setup.args.n_layers,
                                                   mesh.parallel, mesh.coords))
    if mesh.sharded or mesh.rank == 0:
        os.makedirs(folder, exist_ok=True)
        convert.save_checkpoint(os.path.join(folder, f'ckpt_{step:08d}.ckpt'), tensors, cfg.model.to_dict(), extra)
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


def local_part(read, shapes, setup, moments=False):
    """stage_split of this process's part of each tensor (of the whole shapes); read(name, index) reads the part
    index of the whole tensor name."""
    parts = layout.local_layout(shapes, setup.args.n_layers, setup.mesh.parallel, setup.mesh.coords, moments)
    return stage_split({k: ms.Tensor(np.ascontiguousarray(read(k, tuple(slice(a, b) for a, b in s)), np.float32))
                        for k, s in parts.items()}, setup)


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


def load_weights(path, cfg, setup):
    """(rest, layers) of this process's part of the weights at path (any format convert.py reads, any mesh's rank
    files), checked against the config; each tensor is read only where this process's slice of it lies."""
    file_config, lazies = convert.open_checkpoint(path)
    problems = layout.shape_problems({k: t.shape for k, t in lazies.items()}, layout.param_shapes(setup.args))
    if problems:
        raise RunError(f'{path}: checkpoint does not match the model config: {layout.describe(problems)}')
    differing = {k: v for k, v in file_config.items() if k in cfg.model and cfg.model[k] != v}
    if differing and setup.mesh.rank == 0:
        print(f'note: {path} was saved with {differing}; this run uses the config\'s values')
    return local_part(lambda k, index: convert.read_part(lazies[k], index), layout.param_shapes(setup.args), setup)


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


