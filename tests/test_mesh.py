"""Tensor and data parallelism for real: msrun launches of 4 and then 2 CPU processes train the tiny preset split
over a mesh, each run against one process with the same global batch (the truth), and sharded checkpoints resume
on other meshes. Each launch runs several scenarios (tests/mesh_runs.py), so that each world size starts once."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import convert
import layout
import llama
import pipeline
import sample
import train
from conftest import ROOT
from configs import tiny

STEPS, GLOBAL_BATCH = 4, 8
LORA = ['--config.lora.rank=4', '--config.lora.alpha=8.0', '--config.lora.dropout=0.1', '--config.mode=finetune']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def common(tiny_data, out_dir, data_parallel, base):
    """The tiny preset's overrides every run shares: data, steps, checkpoints, the per-rank batch."""
    return [f'--config.data.train={tiny_data[0]}', f'--config.data.eval={tiny_data[1]}',
            f'--config.train.out_dir={out_dir}', f'--config.train.total_steps={STEPS}', '--config.train.log_interval=1',
            '--config.train.ckpt_interval=2', '--config.train.keep_checkpoints=5', '--config.train.eval_batches=2',
            '--config.train.eval_interval=0', f'--config.train.batch_size={GLOBAL_BATCH // data_parallel}',
            f'--config.load_checkpoint={base}', '--config.train.lr=1e-2', '--config.train.warmup_ratio=0.0']


def launch(workers, scenarios, out):
    """Run scenarios on `workers` msrun processes; returns {scenario: [rank results]}."""
    spec = out / 'spec.json'
    spec.write_text(json.dumps({'out': str(out), 'scenarios': scenarios}))
    run = subprocess.run(['msrun', f'--worker_num={workers}', f'--local_worker_num={workers}',
                          f'--master_port={free_port()}', '--join=True', f'--log_dir={out / "logs"}', sys.executable,
                          os.path.join(ROOT, 'tests', 'mesh_runs.py'), str(spec)],
                         capture_output=True, text=True, timeout=1500)
    logs = '\n'.join(open(out / 'logs' / f'worker_{r}.log').read()[-3000:] for r in range(workers))
    assert run.returncode == 0, logs
    return {name: [json.load(open(out / name / f'rank_{r}.json')) for r in range(workers)] for name in scenarios}


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    """A random tiny model every run starts from (LoRA needs a base)."""
    args = layout.model_args(tiny.get_config().model)
    path = str(tmp_path_factory.mktemp('base') / 'base.ckpt')
    convert.save_checkpoint(path, {k: v.asnumpy() for k, v in llama.init_params(args, 5).items()},
                            tiny.get_config().model.to_dict())
    return path


def alone_run(tiny_data, out_dir, base, *extra):
    cfg, _ = train.parse_config(['train.py'] + common(tiny_data, out_dir, 1, base) + list(extra))
    records = train.train(cfg)
    return {'losses': [r['loss'] for r in records if 'loss' in r],
            'eval': [r['eval_loss'] for r in records if 'eval_loss' in r]}


FOUR_LAYERS = ['--config.model.n_layers=4']


def stages_of(stages, micro_batches):
    return [f'--config.parallel.pipeline_stage={stages}', f'--config.parallel.micro_batch_num={micro_batches}']


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_data, base):
    """Every run of this module: one process, then 4 processes, then 2 (which resume the 4's checkpoints)."""
    root = tmp_path_factory.mktemp('mesh')
    base_4l = str(root / 'base_4l.ckpt')
    four_layers = tiny.get_config().model
    four_layers.n_layers = 4
    convert.save_checkpoint(base_4l, {k: v.asnumpy() for k, v in
                                      llama.init_params(layout.model_args(four_layers), 5).items()},
                            four_layers.to_dict())

    def base_of(argv):
        return base_4l if FOUR_LAYERS[0] in argv else base
    results = {'alone': alone_run(tiny_data, root / 'alone', base),
               'alone_lora': alone_run(tiny_data, root / 'alone_lora', base, *LORA)}
    results['alone_4l'] = alone_run(tiny_data, root / 'alone_4l', base_4l, *FOUR_LAYERS)
    mp = ['--config.parallel.model_parallel=2']
    four = {'dp2_mp2': (2, mp), 'dp2_mp2_zero_vocab': (2, mp + ['--config.parallel.optimizer_shard=True',
                                                                '--config.parallel.vocab_emb_dp=False']),
            'dp2_mp2_lora_zero': (2, mp + LORA + ['--config.parallel.optimizer_shard=True']),
            'pp2_dp2': (4, stages_of(2, 2)), 'pp2_mp2': (2, stages_of(2, 2) + mp),
            'pp4': (4, stages_of(4, 4) + FOUR_LAYERS)}
    results.update(launch(4, {name: {'kind': 'train', 'argv': common(tiny_data, root / name, per, base_of(argv))
                                     + argv} for name, (per, argv) in four.items()}, root / 'four'))
    for target in ('mp2_resume', 'alone_resume'):  # dp2 x mp2's step-2 checkpoint, on another mesh
        for rank in range(4):
            os.makedirs(root / target / f'rank_{rank}')
            shutil.copy(root / 'dp2_mp2' / f'rank_{rank}' / 'ckpt_00000002.ckpt', root / target / f'rank_{rank}')
    os.makedirs(root / 'pp2_resume')  # one process's step-2 checkpoint, on two pipeline stages
    shutil.copy(root / 'alone' / 'ckpt_00000002.ckpt', root / 'pp2_resume')
    two = {'mp2': (1, mp), 'mp2_lora_vocab': (1, mp + LORA + ['--config.parallel.vocab_emb_dp=False']),
           'mp2_resume': (1, mp + ['--config.resume=True']), 'pp2': (2, stages_of(2, 2)),
           'pp2_lora': (2, stages_of(2, 2) + LORA), 'pp2_resume': (2, stages_of(2, 2) + ['--config.resume=True'])}
    scenarios = {name: {'kind': 'train', 'argv': common(tiny_data, root / name, per, base) + argv}
                 for name, (per, argv) in two.items()}
    scenarios['mp2_sample'] = {'kind': 'sample', 'argv': ['--config', os.path.join(ROOT, 'configs', 'tiny.py'),
                                                          f'--config.load_checkpoint={base}'] + mp}
    results.update(launch(2, scenarios, root / 'two'))
    results['alone_resume'] = alone_run(tiny_data, root / 'alone_resume', base, '--config.resume=True')
    for rank in range(2):  # pp2's step-2 checkpoint, on one process
        os.makedirs(root / 'pp_alone_resume' / f'rank_{rank}')
        shutil.copy(root / 'pp2' / f'rank_{rank}' / 'ckpt_00000002.ckpt', root / 'pp_alone_resume' / f'rank_{rank}')
    results['pp_alone_resume'] = alone_run(tiny_data, root / 'pp_alone_resume', base, '--config.resume=True')
    results['root'] = root
    return results


@pytest.mark.parametrize('name,reference', [('mp2', 'alone'), ('dp2_mp2', 'alone'),
                                            ('dp2_mp2_zero_vocab', 'alone'), ('mp2_lora_vocab', 'alone_lora'),
                                            ('dp2_mp2_lora_zero', 'alone_lora'), ('pp2', 'alone'),
                                            ('pp2_lora', 'alone_lora'), ('pp2_dp2', 'alone'), ('pp2_mp2', 'alone'),
                                            ('pp4', 'alone_4l')])
def test_split_runs_give_the_losses_of_one_process(runs, name, reference):
    """Per-step training losses and the final eval loss within 1e-5 of one process's, on every rank."""
    for rank in runs[name]:
        np.testing.assert_allclose(rank['losses'], runs[reference]['losses'], rtol=1e-5)
        np.testing.assert_allclose(rank['eval'], runs[reference]['eval'], rtol=1e-5)
    assert len(runs[reference]['losses']) == STEPS


@pytest.mark.parametrize('name,reference', [('mp2', 'alone'), ('dp2_mp2', 'alone'), ('dp2_mp2_zero_vocab', 'alone'),
                                            ('dp2_mp2_lora_zero', 'alone_lora'), ('pp2_dp2', 'alone'),
                                            ('pp2_mp2', 'alone'), ('pp4', 'alone_4l')])
def test_merged_weights_equal_one_process(runs, name, reference):
    """The final sharded checkpoint, merged, holds one process's final weights and moments."""
    merged = str(runs['root'] / f'{name}.ckpt')
    convert.main(['--input', str(runs['root'] / name / 'rank_0' / f'ckpt_{STEPS:08d}.ckpt'), '--output', merged])
    ours, _, extra = convert.read_checkpoint(merged)
    alone, _, alone_extra = convert.read_checkpoint(str(runs['root'] / reference / f'ckpt_{STEPS:08d}.ckpt'))
    assert set(ours) == set(alone) and extra['global_step'] == alone_extra['global_step'] == STEPS
    for k in alone:
        np.testing.assert_allclose(ours[k], alone[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_each_rank_holds_its_slices(runs):
    """With model_parallel 2 each rank holds half of every split tensor: its bytes are the plan's, and with
    optimizer_shard its moments are halved again over the data-parallel pair."""
    args = layout.model_args(tiny.get_config().model)
    shapes = layout.param_shapes(args)
    split = sum(4 * np.prod(s) for k, s in shapes.items() if 'mp' in layout.partition(k))
    whole = sum(4 * np.prod(s) for k, s in shapes.items()) - split
    for name in ('mp2', 'dp2_mp2', 'dp2_mp2_zero_vocab'):
        for rank in runs[name]:
            state = rank['state']
            assert state['weights'] == state['plan_weights'] == state['plan_gradients']
            assert state['moments'] == state['plan_optimizer']
    for rank in runs['dp2_mp2']:
        assert rank['state']['weights'] == split / 2 + whole and rank['state']['moments'] == 2 * (split / 2 + whole)
    embedding = 4 * np.prod(shapes[layout.EMBEDDING]) + 4 * np.prod(shapes[layout.LM_HEAD])
    for rank in runs['dp2_mp2_zero_vocab']:  # the vocabulary split too; every moment split over dp as well
        assert rank['state']['weights'] == (split + embedding) / 2 + whole - embedding
        assert rank['state']['moments'] == rank['state']['weights']


def test_a_dp2_mp2_checkpoint_resumes_on_mp2_and_on_one_process(runs):
    """Steps 3 and 4 from dp2 x mp2's step-2 checkpoint give the uninterrupted run's losses, on 2 processes and on
    one (the checkpoint resharded as it is read)."""
    for rank in runs['mp2_resume']:
        np.testing.assert_allclose(rank['losses'], runs['alone']['losses'][2:], rtol=1e-5)
    np.testing.assert_allclose(runs['alone_resume']['losses'], runs['alone']['losses'][2:], rtol=1e-5)


def test_merge_then_split_round_trips_bit_exact(runs, tmp_path):
    """dp2 x mp2 x optimizer_shard rank files -> one file -> the same mesh's rank files: every tensor and extra equal."""
    source = runs['root'] / 'dp2_mp2_zero_vocab'
    convert.main(['--input', str(source / 'rank_0' / 'ckpt_00000004.ckpt'), '--output', str(tmp_path / 'm.ckpt')])
    convert.main(['--input', str(tmp_path / 'm.ckpt'), '--output', str(tmp_path / 'split'), '--parallel',
                  'data_parallel=2,model_parallel=2,optimizer_shard=True,vocab_emb_dp=False'])
    for rank in range(4):
        a = convert.read_checkpoint(str(source / f'rank_{rank}' / 'ckpt_00000004.ckpt'))
        b = convert.read_checkpoint(str(tmp_path / 'split' / f'rank_{rank}' / 'ckpt_00000004.ckpt'))
        assert set(a[0]) == set(b[0]) and a[1] == b[1]
        assert all(np.array_equal(a[0][k], b[0][k]) for k in a[0])
        assert {k: v for k, v in a[2].items() if k != 'run_config'} == {k: v for k, v in b[2].items()
                                                                          if k != 'run_config'}


def test_tensor_parallel_sampling_gives_the_tokens_of_one_process(runs, base):
    params, args, _ = convert.load_model(base)
    alone = sample.Generator(params, args).generate([[1, 403, 407, 261, 378]], 20)[0]
    assert [rank['ids'] for rank in runs['mp2_sample']] == [alone, alone]


def test_a_checkpoint_missing_ranks_is_refused_in_one_line(runs, tmp_path):
    for rank in (0, 1, 3):
        os.makedirs(tmp_path / f'rank_{rank}')
        shutil.copy(runs['root'] / 'dp2_mp2' / f'rank_{rank}' / 'ckpt_00000004.ckpt', tmp_path / f'rank_{rank}')
    with pytest.raises(SystemExit, match='3 rank files of a 4-process checkpoint: ranks are missing'):
        convert.main(['--input', str(tmp_path), '--output', str(tmp_path / 'm.ckpt')])


def test_each_stage_holds_only_its_layers(runs):
    """Every rank of a pipeline run holds what the plan says its stage holds: its layers' weights and moments (pp4:
    one layer each, the embedding on the first stage, the final norm and lm_head on the last)."""
    args = layout.model_args(dict(tiny.get_config().model.to_dict(), n_layers=4))
    shapes = layout.param_shapes(args)
    layer = sum(4 * np.prod(s) for k, s in shapes.items() if k.startswith('model.layers.0.'))
    ends = {0: 4 * np.prod(shapes[layout.EMBEDDING]),
            3: 4 * (np.prod(shapes[layout.NORM_OUT]) + np.prod(shapes[layout.LM_HEAD]))}
    for stage, rank in enumerate(runs['pp4']):
        assert rank['state']['weights'] == layer + ends.get(stage, 0) == rank['state']['plan_weights']
        assert rank['state']['moments'] == 2 * rank['state']['weights'] == rank['state']['plan_optimizer']
    for name in ('pp2', 'pp2_dp2', 'pp2_mp2', 'pp2_lora'):
        for rank in runs[name]:
            assert rank['state']['weights'] == rank['state']['plan_weights'] and \
                rank['state']['moments'] == rank['state']['plan_optimizer'], name


def test_pipeline_checkpoints_resume_across_meshes(runs):
    """One process's step-2 checkpoint continues on two pipeline stages, and pp2's on one process, with the
    uninterrupted run's losses."""
    for rank in runs['pp2_resume']:
        np.testing.assert_allclose(rank['losses'], runs['alone']['losses'][2:], rtol=1e-5)
    np.testing.assert_allclose(runs['pp_alone_resume']['losses'], runs['alone']['losses'][2:], rtol=1e-5)


@pytest.mark.parametrize('pp,micro', [(2, 2), (2, 5), (3, 3), (4, 4), (4, 9), (8, 16)])
def test_1f1b_schedule_completes_with_blocking_exchanges(pp, micro):
    """Every stage's events (pipeline.events), run with exchanges that block until both neighbours reach them:
    all stages finish (no deadlock), both sides of each exchange carry the same micro-batches, each forward and
    backward runs once with its inputs there, and stage k never keeps more than pp - k micro-batches of
    activations (1F1B's bound)."""
    events = {k: pipeline.events(pp, k, micro) for k in range(pp)}
    position = {k: 0 for k in range(pp)}
    have = {k: set() for k in range(pp)}  # ('act' | 'grad', m) received, ('F' | 'B', m) done
    peak = {k: 0 for k in range(pp)}

    def next_event(k):
        return events[k][position[k]] if position[k] < len(events[k]) else None
    while any(next_event(k) for k in range(pp)):
        moved = False
        for k in range(pp):
            event = next_event(k)
            if event is None:
                continue
            if event[0] in ('F', 'B'):
                kind, m = event
                needed = ('act', m) if kind == 'F' and k > 0 else ('grad', m) if kind == 'B' and k < pp - 1 else None
                assert needed is None or needed in have[k], (k, event)
                assert kind == 'F' or ('F', m) in have[k]
                have[k].add(event)
                in_flight = sum(1 for e in have[k] if e[0] == 'F') - sum(1 for e in have[k] if e[0] == 'B')
                peak[k] = max(peak[k], in_flight)
                position[k] += 1
                moved = True
                continue
            _, side, act, grad = event
            partner = k - 1 if side == 'prev' else k + 1
            other = next_event(partner)
            if other and other[0] == 'exchange' and other[1] != side and other[2:] == event[2:]:
                lower, upper = (k, partner) if side == 'next' else (partner, k)
                assert act is None or ('F', act) in have[lower]
                assert grad is None or ('B', grad) in have[upper]
                if act is not None:
                    have[upper].add(('act', act))
                if grad is not None:
                    have[lower].add(('grad', grad))
                position[k] += 1
                position[partner] += 1
                moved = True
        assert moved, f'deadlock: {[next_event(k) for k in range(pp)]}'
    for k in range(pp):
        assert {e for e in have[k] if e[0] in 'FB'} == {(kind, m) for kind in 'FB' for m in range(micro)}
        assert peak[k] <= pp - k


def test_rank_files_of_different_meshes_are_refused_in_one_line(runs, tmp_path):
    """Rank 0 of a dp2 x mp2 checkpoint beside rank 1 of an mp2 one: refused before anything is read or written."""
    for rank, run in ((0, 'dp2_mp2'), (1, 'mp2')):
        os.makedirs(tmp_path / f'rank_{rank}')
        shutil.copy(runs['root'] / run / f'rank_{rank}' / 'ckpt_00000004.ckpt', tmp_path / f'rank_{rank}')
    with pytest.raises(SystemExit, match='cut on different meshes'):
        convert.main(['--input', str(tmp_path), '--output', str(tmp_path / 'm.ckpt')])
    assert sorted(os.listdir(tmp_path)) == ['rank_0', 'rank_1']
