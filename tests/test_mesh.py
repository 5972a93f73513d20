"""Tensor and data parallelism for real: msrun launches of 4 and then 2 CPU processes train the tiny preset split
over a mesh, each run against one process with the same global batch (the truth), and sharded checkpoints resume
on other meshes. Each launch runs several scenarios (tests/mesh_runs.py), so that each world size starts once."""
import json
import os
import shutil
import signal
import socket
import subprocess

import numpy as np
import pytest

import convert
import layout
import llama
import monitor
import pipeline
import sample
import train
import util
from conftest import ROOT
from configs import tiny

STEPS, GLOBAL_BATCH = 4, 8
# the frozen base held in float16 (model.frozen_dtype), as configs/7b_lora.py holds it
LORA = ['--config.lora.rank=4', '--config.lora.alpha=8.0', '--config.lora.dropout=0.1', '--config.mode=finetune',
        '--config.model.frozen_dtype=float16']
# LoRA dropout draws its masks per micro-batch: runs compared with the pipeline's 2 micro-batches of 4 rows take
# their 8 rows as 2 accumulated micro-batches too
IN_TWO = ['--config.train.grad_accum=2']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def common(tiny_data, out_dir, base, rows=GLOBAL_BATCH, eval_batches=2):
    """The tiny preset's overrides every run shares: data, steps, checkpoints; `rows` per micro-batch and data-parallel
    rank, and as many eval batches (of rows x data_parallel) as make one process's 2 x GLOBAL_BATCH eval rows."""
    return [f'--config.data.train={tiny_data[0]}', f'--config.data.eval={tiny_data[1]}',
            f'--config.train.out_dir={out_dir}', f'--config.train.total_steps={STEPS}', '--config.train.log_interval=1',
            '--config.train.ckpt_interval=2', '--config.train.keep_checkpoints=5',
            f'--config.train.eval_batches={eval_batches}', '--config.train.eval_interval=0',
            f'--config.train.batch_size={rows}', f'--config.load_checkpoint={base}', '--config.train.lr=1e-2',
            '--config.train.warmup_ratio=0.0']


def launch(workers, scenarios, out):
    """Run the scenarios in turn in one launch of `workers` msrun processes (a launch costs ~18 s before any work
    here); returns {scenario: [rank results]}."""
    os.makedirs(out, exist_ok=True)
    (out / 'spec.json').write_text(json.dumps({'out': str(out), 'scenarios': scenarios}))
    run = subprocess.run(['msrun', f'--worker_num={workers}', f'--local_worker_num={workers}',
                          f'--master_port={free_port()}', '--join=True', f'--log_dir={out / "logs"}',
                          os.path.join(ROOT, 'tests', 'mesh_runs.py'), str(out / 'spec.json')],
                         capture_output=True, text=True, timeout=900)
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


def common_rows(rows, eval_batches):
    """Overrides of common()'s rows per micro-batch and eval batches (later flags win)."""
    return [f'--config.train.batch_size={rows}', f'--config.train.eval_batches={eval_batches}']


def alone_run(tiny_data, out_dir, base, *extra):
    cfg, _ = util.parse_config(['train.py'] + common(tiny_data, out_dir, base) + list(extra))
    records = train.train(cfg)
    return {'losses': [r['loss'] for r in records if 'loss' in r],
            'eval': [r['eval_loss'] for r in records if 'eval_loss' in r]}


MP = ['--config.parallel.model_parallel=2']
ZERO_VOCAB = ['--config.parallel.optimizer_shard=True', '--config.parallel.vocab_emb_dp=False']
PP2 = ['--config.parallel.pipeline_stage=2', '--config.parallel.micro_batch_num=2']
PP4 = ['--config.model.n_layers=4', '--config.parallel.pipeline_stage=4', '--config.parallel.micro_batch_num=4']
RESUME = ['--config.resume=True']
# dynamic loss scaling in fp32: scaling by powers of two changes no value, so the losses stay one process's
SCALED = ['--config.train.loss_scale=1024', '--config.train.loss_scale_window=2']
NO_EVAL = ['--config.data.eval=']  # an eval compiles one more graph: checked on dp2 x mp2, pp2 x mp2, mp2 LoRA
# name: (rows per micro-batch and data-parallel rank, eval batches, overrides). The global batch is always 8 rows:
# data_parallel 2 halves the rows, pipeline micro-batches split them. Runs of one mesh share compiled steps.
FOUR = {'dp2_mp2_zero_vocab': (4, 2, MP + ZERO_VOCAB), 'dp2_mp2_lora': (2, 4, MP + LORA + IN_TWO + NO_EVAL),
        'pp2_mp2': (4, 4, PP2 + MP), 'pp2_dp2': (2, 4, PP2 + NO_EVAL + SCALED), 'pp4': (2, 4, PP4 + NO_EVAL)}
TWO = {'mp2': (8, 2, MP + NO_EVAL), 'mp2_resume': (8, 2, MP + NO_EVAL + RESUME),  # dp2_mp2_zero_vocab's step 2
       'mp2_lora_vocab': (4, 4, MP + LORA + IN_TWO + ['--config.parallel.vocab_emb_dp=False']),
       'pp2_lora': (4, 4, PP2 + LORA + NO_EVAL), 'pp2_lora_resume': (4, 4, PP2 + LORA + NO_EVAL + RESUME),
       'pp2_lora_stop': (4, 4, PP2 + LORA + NO_EVAL)}  # SIGTERM to the last stage's process
# what each split run is compared with: one process with the same global batch (and micro-batches, for dropout)
REFERENCE = {'dp2_mp2_zero_vocab': 'alone', 'dp2_mp2_lora': 'alone_lora', 'pp2_mp2': 'alone', 'pp2_dp2': 'alone',
             'pp4': 'alone_4_layers', 'mp2': 'alone', 'mp2_lora_vocab': 'alone_lora', 'pp2_lora': 'alone_lora'}


def copy_checkpoint(source, step, target):
    """Step `step`'s checkpoint of run directory source (one file, or its rank_<i>/ files) into a new run directory."""
    names = sorted(n for n in os.listdir(source) if n.startswith('rank_')) or ['.']
    for name in names:
        os.makedirs(target / name, exist_ok=True)
        shutil.copy(source / name / f'ckpt_{step:08d}.ckpt', target / name)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_data, base):
    """Every run of this module: one process, then a launch of 4 processes, then one of 2, then one process again
    (resuming the checkpoints of the split runs)."""
    root = tmp_path_factory.mktemp('mesh')

    def scenarios(table):
        return {name: {'kind': 'train', 'argv': common(tiny_data, root / name, base, rows, evals) + argv}
                for name, (rows, evals, argv) in table.items()}
    results = {'alone': alone_run(tiny_data, root / 'alone', base),
               'alone_lora': alone_run(tiny_data, root / 'alone_lora', base, *LORA, *IN_TWO, *common_rows(4, 4)),
               'alone_4_layers': alone_run(tiny_data, root / 'alone_4_layers', base4(root), *NO_EVAL,
                                           '--config.model.n_layers=4')}
    four = scenarios(FOUR)
    four['pp4']['argv'].append(f'--config.load_checkpoint={base4(root)}')
    results.update(launch(4, four, root / 'four'))
    copy_checkpoint(root / 'dp2_mp2_zero_vocab', 2, root / 'mp2_resume')  # dp2 x mp2 -> mp2
    copy_checkpoint(root / 'alone_lora', 2, root / 'pp2_lora_resume')  # one process -> two stages
    two = scenarios(TWO)
    two['pp2_lora_stop']['signal_rank'] = 1
    two['mp2_sample'] = {'kind': 'sample', 'argv': ['--config', os.path.join(ROOT, 'configs', 'tiny.py'),
                                                    f'--config.load_checkpoint={base}'] + MP}
    results.update(launch(2, two, root / 'two'))
    copy_checkpoint(root / 'dp2_mp2_zero_vocab', 2, root / 'alone_resume')  # resharded, moments gathered
    results['alone_resume'] = alone_run(tiny_data, root / 'alone_resume', base, *RESUME)
    copy_checkpoint(root / 'pp2_lora', 2, root / 'alone_lora_resume')  # two stages' LoRA checkpoint, on one process
    results['alone_lora_resume'] = alone_run(tiny_data, root / 'alone_lora_resume', base, *LORA, *IN_TWO,
                                             *common_rows(4, 4), *RESUME)
    results['root'] = root
    return results


def base4(root):
    """A random 4-layer tiny model (for pp4), written once."""
    path = root / 'base4.ckpt'
    if not path.exists():
        m = tiny.get_config().model
        m.n_layers = 4
        convert.save_checkpoint(str(path), {k: v.asnumpy() for k, v in llama.init_params(layout.model_args(m), 5)
                                            .items()}, m.to_dict())
    return str(path)


@pytest.mark.parametrize('name', REFERENCE)
def test_split_runs_give_the_losses_of_one_process(runs, name):
    """Per-step training losses and the final eval loss within 1e-5 of one process's, on every rank."""
    reference = runs[REFERENCE[name]]
    assert len(reference['losses']) == STEPS
    for rank in runs[name]:
        np.testing.assert_allclose(rank['losses'], reference['losses'], rtol=1e-5)
        argv = (FOUR | TWO)[name][2]
        if NO_EVAL[0] not in argv:
            assert len(rank['eval']) == len(reference['eval']) == 1
            np.testing.assert_allclose(rank['eval'], reference['eval'], rtol=1e-5)


@pytest.mark.parametrize('name', REFERENCE)
def test_merged_weights_equal_one_process(runs, name):
    """The final sharded checkpoint, merged, holds one process's final weights and moments."""
    merged = str(runs['root'] / f'{name}.ckpt')
    convert.main(['--input', str(runs['root'] / name / 'rank_0' / f'ckpt_{STEPS:08d}.ckpt'), '--output', merged])
    ours, _, extra = convert.read_checkpoint(merged)
    alone, _, alone_extra = convert.read_checkpoint(str(runs['root'] / REFERENCE[name] / f'ckpt_{STEPS:08d}.ckpt'))
    assert set(ours) == set(alone) and extra['global_step'] == alone_extra['global_step'] == STEPS
    for k in alone:
        close_but_for_adams_near_zero_gradients(ours[k], alone[k], k)


def close_but_for_adams_near_zero_gradients(ours, alone, name, lr=1e-2):
    """Equal to 1e-4 but for the rare elements whose gradient is near AdamW's eps: there m / (sqrt(v) + eps) turns a
    last-bit difference of the gradient (a different fp32 summation order over ranks) into a different step of up to
    lr (measured: 4 of lm_head's 32,768 elements 1e-4 apart, 5 of a wo's 4,096 2e-5 apart). A slice put in the wrong
    place differs in nearly every element."""
    off = ~np.isclose(ours, alone, rtol=1e-4, atol=1e-6)
    assert off.mean() < 1e-2 and np.abs(ours - alone).max() <= STEPS * lr, (name, off.sum(), np.abs(ours - alone).max())


def test_each_rank_holds_its_slices(runs):
    """With model_parallel 2 each rank holds half of every split tensor, and with optimizer_shard its moments are
    halved again over the data-parallel pair: its bytes are the memory plan's."""
    shapes = layout.param_shapes(layout.model_args(tiny.get_config().model))
    split = sum(4 * np.prod(s) for k, s in shapes.items() if 'mp' in layout.partition(k, vocab_emb_dp=False))
    whole = sum(4 * np.prod(s) for s in shapes.values()) - split
    for rank in runs['dp2_mp2_zero_vocab']:  # the vocabulary split too; every moment split over dp as well
        state = rank['state']
        assert state['weights'] == split / 2 + whole == state['plan_weights'] == state['plan_gradients']
        assert state['moments'] == state['weights'] == state['plan_optimizer']


def test_each_stage_holds_only_its_layers(runs):
    """Every rank of a pipeline run holds what the plan says its stage holds: its layers' weights and moments, the
    embedding on the first stage, the final norm and lm_head on the last (halved by model_parallel where split)."""
    shapes = layout.param_shapes(layout.model_args(tiny.get_config().model))

    def size(keys, mp):
        return sum(4 * np.prod(shapes[k]) / (mp if 'mp' in layout.partition(k) else 1) for k in keys)
    for name, mp, stages in (('pp2_mp2', 2, 2), ('pp4', 1, 4)):  # pp2: one layer a stage of 2; pp4: of 4
        layer = size([k for k in shapes if k.startswith('model.layers.0.')], mp)
        ends = {0: size([layout.EMBEDDING], mp), stages - 1: size([layout.NORM_OUT, layout.LM_HEAD], mp)}
        for rank, result in enumerate(runs[name]):
            state, stage = result['state'], layout.coords_of(rank, layout.ParallelArgs(
                model_parallel=mp, pipeline_stage=stages, micro_batch_num=stages)).stage
            assert state['weights'] == layer + ends.get(stage, 0) == state['plan_weights'], (name, rank)
            assert state['moments'] == 2 * state['weights'] == state['plan_optimizer']
    for result in runs['pp2_lora']:  # the stage's adapters train; its frozen base is held once, in float16
        state = result['state']
        assert state['moments'] == 2 * state['weights'] == state['plan_optimizer']
        assert state['frozen'] == 2 * state['frozen_elements'] > 0
        assert state['frozen'] + state['weights'] == state['plan_weights']


@pytest.mark.parametrize('name,reference', [('alone_resume', 'alone'), ('mp2_resume', 'alone'),
                                            ('alone_lora_resume', 'alone_lora'), ('pp2_lora_resume', 'alone_lora')])
def test_checkpoints_resume_across_meshes(runs, name, reference):
    """Steps 3 and 4 from a step-2 checkpoint give the uninterrupted run's losses on another mesh: dp2 x mp2 x
    optimizer_shard x vocabulary split's on one process (moments gathered, vocabulary joined) and on mp2, two stages'
    LoRA one on one process, one process's LoRA one on two stages."""
    for rank in runs[name] if isinstance(runs[name], list) else [runs[name]]:
        np.testing.assert_allclose(rank['losses'], runs[reference]['losses'][2:], rtol=1e-5)


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
        assert extras(a[2]) == extras(b[2])


def extras(extra):
    """A checkpoint's extras but the run's config, the JSON ones parsed (their key order is not part of them)."""
    return {k: json.loads(v) if k in ('layout', 'mesh', 'data_position') else v for k, v in extra.items()
            if k != 'run_config'}


def test_tensor_parallel_sampling_gives_the_tokens_of_one_process(runs, base):
    params, args, _ = convert.load_model(base)
    alone = sample.Generator(params, args).generate([[1, 403, 407, 261, 378]], 20)[0]
    assert [rank['ids'] for rank in runs['mp2_sample']] == [alone, alone]


def test_a_checkpoint_missing_ranks_is_refused_in_one_line(runs, tmp_path):
    for rank in (0, 1, 3):
        os.makedirs(tmp_path / f'rank_{rank}')
        shutil.copy(runs['root'] / 'pp2_mp2' / f'rank_{rank}' / 'ckpt_00000004.ckpt', tmp_path / f'rank_{rank}')
    with pytest.raises(SystemExit, match='3 rank files of a 4-process checkpoint: ranks are missing'):
        convert.main(['--input', str(tmp_path), '--output', str(tmp_path / 'm.ckpt')])


@pytest.mark.parametrize('odd', ['step', 'run'])
def test_rank_files_of_different_saves_are_refused_in_one_line(runs, tmp_path, odd):
    """rank_1's file from another step (mp2's step 2 named as step 4), or from another run of the same mesh
    (mp2_resume's step 4 beside mp2's): merging refuses the set in one line naming that file and writes nothing, and
    resuming refuses it rather than fall back to an older step."""
    name, root = 'ckpt_00000004.ckpt', runs['root']
    other = root / 'mp2' / 'rank_1' / 'ckpt_00000002.ckpt' if odd == 'step' else root / 'mp2_resume' / 'rank_1' / name
    for rank, source in ((0, root / 'mp2' / 'rank_0' / name), (1, other)):
        os.makedirs(tmp_path / 'out' / f'rank_{rank}')
        shutil.copy(source, tmp_path / 'out' / f'rank_{rank}' / name)
    expected = 'named step 4 but holds step 2' if odd == 'step' else 'from another run'
    with pytest.raises(SystemExit, match=expected) as e:
        convert.main(['--input', str(tmp_path / 'out'), '--output', str(tmp_path / 'm.ckpt')])
    assert os.path.join('rank_1', name) in str(e.value.code) and not os.path.exists(tmp_path / 'm.ckpt')
    with pytest.raises(convert.MixedSet, match=expected):
        convert.newest_checkpoint(str(tmp_path / 'out'))


def test_resume_passes_over_a_cut_rank_file_and_says_so(runs, tmp_path):
    """A rank file cut short (a save killed on one rank): resume takes the step before and says which step it passed
    over, and why."""
    for rank in (0, 1):
        shutil.copytree(runs['root'] / 'mp2' / f'rank_{rank}', tmp_path / f'rank_{rank}')
    cut = tmp_path / 'rank_1' / 'ckpt_00000004.ckpt'
    cut.write_bytes(cut.read_bytes()[:1000])
    notes = []
    assert convert.newest_checkpoint(str(tmp_path), notes.append) == str(tmp_path / 'rank_0' / 'ckpt_00000002.ckpt')
    assert len(notes) == 1 and notes[0].startswith(str(tmp_path / 'rank_0' / 'ckpt_00000004.ckpt') + ' passed over: ')


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
    """Rank 0 of a dp2 x mp2 checkpoint beside rank 1 of an mp2 LoRA one: refused before anything is read or written."""
    for rank, run in ((0, 'dp2_mp2_zero_vocab'), (1, 'mp2_lora_vocab')):
        os.makedirs(tmp_path / f'rank_{rank}')
        shutil.copy(runs['root'] / run / f'rank_{rank}' / 'ckpt_00000004.ckpt', tmp_path / f'rank_{rank}')
    with pytest.raises(SystemExit, match='cut on different meshes'):
        convert.main(['--input', str(tmp_path), '--output', str(tmp_path / 'm.ckpt')])
    assert sorted(os.listdir(tmp_path)) == ['rank_0', 'rank_1']


def test_loss_scaling_runs_across_stages(runs):
    """pp2 x dp2 with a dynamic loss scale (window 2, no overflow in fp32) doubled it twice on every rank: 1024 ->
    4096 in the final checkpoints (its losses are one process's, test_split_runs_give_the_losses_of_one_process)."""
    for rank in range(4):
        extra = convert.read_checkpoint(str(runs['root'] / 'pp2_dp2' / f'rank_{rank}' / f'ckpt_{STEPS:08d}.ckpt'))[2]
        assert extra['loss_scale'] == 4096.0 and extra['good_steps'] == 0


def test_a_signal_on_one_stage_stops_every_stage_after_the_same_step(runs):
    """SIGTERM to the last stage's process of a pp2 LoRA run: both stages stop after the same step (the vote is summed
    inside the step), each saving its checkpoint of that step, and the steps logged before are the uninterrupted
    run's."""
    assert [rank['stopped'] for rank in runs['pp2_lora_stop']] == [signal.SIGTERM] * 2
    saved = [sorted(os.listdir(runs['root'] / 'pp2_lora_stop' / f'rank_{r}')) for r in range(2)]
    assert saved[0] == saved[1] and saved[0][-1] < f'ckpt_{STEPS:08d}.ckpt', saved
    logged = [r['loss'] for r in monitor.read_log(str(runs['root'] / 'pp2_lora_stop' / 'log.jsonl')) if 'loss' in r]
    assert 1 <= len(logged) < STEPS and saved[0][-1] == f'ckpt_{len(logged):08d}.ckpt'
    np.testing.assert_allclose(logged, runs['alone_lora']['losses'][:len(logged)], rtol=1e-5)
