"""Scaling out, checked as far as a CPU allows: real data parallelism across processes, the model-parallel split
simulated numerically, the sharding table's strategies against the operands they annotate, rank-table launches,
and the memory plan against a hand calculation."""
import json
import math
import os
import re
import socket
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

import convert
import hccl
import layout
import llama
import train
from conftest import ROOT
from configs import tiny


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def tiny_mindrecord(tiny_data):
    return tiny_data[0]


def msrun_tiny(tmp_path, tiny_mindrecord, *overrides, env=None):
    """hccl.py launch --msrun: 2 CPU worker processes training the tiny preset; returns (exit code, worker logs)."""
    out = tmp_path / 'run'
    command = [sys.executable, os.path.join(ROOT, 'hccl.py'), 'launch', '--msrun', '--master_port', str(free_port()),
               '--output_dir', str(tmp_path / 'output'), os.path.join(ROOT, 'configs', 'tiny.py'), '[0,2)', 'train',
               f'--config.data.train={tiny_mindrecord}', '--config.data.eval=', f'--config.train.out_dir={out}',
               '--config.train.log_interval=1', '--config.train.total_steps=5'] + list(overrides)
    code = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}).returncode
    logs = [open(tmp_path / 'output' / 'msrun_log' / f'worker_{r}.log').read() for r in range(2)]
    return code, logs, out


def test_two_process_data_parallel_equals_one_process(tmp_path, tiny_mindrecord, layerwise_from=1):
    """Batch 4 on each of 2 workers (started by hccl.py launch --msrun) = batch 8 on one process: the same losses,
    and identical weights on both ranks, with the layer-by-layer step (tests/test_mesh.py runs the one-graph step
    on meshes)."""
    one = tiny.get_config()
    one.data.train, one.data.eval = tiny_mindrecord, ''
    one.train.update(out_dir=str(tmp_path / 'one'), batch_size=8, total_steps=5, log_interval=1)
    alone = [r['loss'] for r in train.train(one)]
    code, logs, out = msrun_tiny(tmp_path, tiny_mindrecord, '--config.train.batch_size=4',
                                 f'--config.train.layerwise_from={layerwise_from}')
    assert code == 0, logs[0][-3000:]
    together = [r['loss'] for r in map(json.loads, open(out / 'log.jsonl')) if 'loss' in r]  # after the header
    np.testing.assert_allclose(together, alone, rtol=2e-5)
    digests = [re.search(r'rank (\d): parameters sha256 ([0-9a-f]{64})', log).groups() for log in logs]
    assert [d[0] for d in digests] == ['0', '1'] and digests[0][1] == digests[1][1]
    # rank 0 alone writes the run's files; every rank held its lock on out_dir (train.claim_out_dir)
    assert sorted(os.listdir(out)) == ['.lock', '.lock.rank1', 'ckpt_00000005.ckpt', 'curves.png', 'log.jsonl']


def test_tensor_parallel_predict_under_msrun_samples_alike_and_ends_cleanly(tmp_path):
    """hccl.py launch --msrun ... predict (sample.py on 2 workers, model_parallel 2), sampling without --seed: both
    ranks take rank 0's random seed (ranks that sampled apart would feed their all-reduces different tokens), and
    the launch ends with rc 0 (sample.py's fast exit would cut msrun's worker protocol short)."""
    cfg = tiny.get_config()
    checkpoint = str(tmp_path / 'tiny.ckpt')
    convert.save(checkpoint, llama.init_params(layout.model_args(cfg.model), 0), cfg.model.to_dict())
    command = [sys.executable, os.path.join(ROOT, 'hccl.py'), 'launch', '--msrun', '--master_port', str(free_port()),
               '--output_dir', str(tmp_path / 'output'), os.path.join(ROOT, 'configs', 'tiny.py'), '[0,2)', 'predict',
               f'--config.load_checkpoint={checkpoint}', '--config.parallel.model_parallel=2', '--prompt', 'The',
               '--max_new_tokens', '12', '--temperature', '1.0', '--graph_cache', '']
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    logs = [open(tmp_path / 'output' / 'msrun_log' / f'worker_{r}.log').read() for r in range(2)]
    assert run.returncode == 0, logs[0][-3000:] + logs[1][-3000:]
    seeds = [re.search(r'12 tokens in [\d.]+s \(including compilation\), seed (\d+)', log).group(1) for log in logs]
    assert seeds[0] == seeds[1]


# ----------------------------------------------------------------------------------------------------------------------
# The sharding table, its strategies, and a numerical simulation of the split

MP_ARGS = layout.model_args(dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128, multiple_of=16,
                                max_seq_len=32, norm_eps=1e-5))


def all_names(args):
    """Every parameter name a model can have: weights, an untied head, LoRA on every projection."""
    names = set(layout.param_shapes(args)) | set(layout.param_shapes(args._replace(tie_embeddings=True)))
    return names | set(layout.lora_shapes(args, 2, '.*'))


def test_every_rule_is_used_and_an_unknown_name_is_refused():
    names = all_names(MP_ARGS)
    for pattern, _ in layout.SHARDING:
        assert any(re.fullmatch(pattern, n) for n in names), pattern
    with pytest.raises(ValueError, match='no sharding rule matches parameter model.layers.0.attention.wz.weight'):
        layout.partition('model.layers.0.attention.wz.weight')


def test_megatron_layout():
    plan = {k: layout.partition(k, vocab_emb_dp=False) for k in layout.param_shapes(MP_ARGS)}
    for p in ('wq', 'wk', 'wv'):
        assert plan[f'model.layers.1.attention.{p}.weight'] == ('mp', None)
    assert plan['model.layers.1.attention.wo.weight'] == (None, 'mp')
    assert plan['model.layers.0.feed_forward.w1.weight'] == plan['model.layers.0.feed_forward.w3.weight'] == ('mp', None)
    assert plan['model.layers.0.feed_forward.w2.weight'] == (None, 'mp')
    assert plan[layout.EMBEDDING] == plan['lm_head.weight'] == ('mp', None)
    assert layout.partition(layout.EMBEDDING, vocab_emb_dp=True) == (None, None)


def test_divisibility_and_device_count_violations_are_caught():
    P = layout.ParallelArgs
    assert layout.parallel_problems(MP_ARGS, P(data_parallel=2, model_parallel=4), 8) == []
    problems = layout.parallel_problems(MP_ARGS, P(data_parallel=1, model_parallel=8), 8)
    assert problems == ['n_kv_heads 4 is not divisible by model_parallel 8']
    problems = layout.parallel_problems(MP_ARGS, P(data_parallel=1, model_parallel=3), 3)
    assert set(problems) == {'n_heads 8 is not divisible by model_parallel 3', 'dim 64 is not divisible by model_parallel 3',
                             'n_kv_heads 4 is not divisible by model_parallel 3',
                             'ffn_hidden 176 is not divisible by model_parallel 3'}
    assert layout.parallel_problems(MP_ARGS, P(model_parallel=2, vocab_emb_dp=False), 2) == []
    assert 'vocab_size 128 is not divisible by model_parallel 3' in layout.parallel_problems(
        MP_ARGS._replace(n_heads=3, n_kv_heads=3, dim=63, ffn_hidden=63), P(model_parallel=3, vocab_emb_dp=False), 3)
    assert layout.parallel_problems(MP_ARGS, P(data_parallel=2), 8) == [
        'data_parallel x model_parallel x pipeline_stage = 2 x 1 x 1 = 2, but there are 8 devices']
    assert layout.parallel_problems(MP_ARGS, P(pipeline_stage=4, micro_batch_num=2), 4) == [
        'pipeline_stage 4 exceeds the 2 layers', 'micro_batch_num 2 must be at least pipeline_stage 4']


# ----------------------------------------------------------------------------------------------------------------------
# Rank-table launches

def test_device_environments_single_and_multi_node():
    single = hccl.device_environments([0, 1, 2, 3], 4, '/t.json')
    assert [(e['DEVICE_ID'], e['RANK_ID'], e['RANK_SIZE']) for e in single] == [
        ('0', '0', '4'), ('1', '1', '4'), ('2', '2', '4'), ('3', '3', '4')]
    second_node = hccl.device_environments(list(range(8, 16)), 16, '/t.json')
    assert [(e['DEVICE_ID'], e['RANK_ID']) for e in second_node] == [(str(i), str(8 + i)) for i in range(8)]
    upper_half = hccl.device_environments([4, 5, 6, 7], 4, '/t.json')
    assert [(e['DEVICE_ID'], e['RANK_ID']) for e in upper_half] == [('4', '0'), ('5', '1'), ('6', '2'), ('7', '3')]


def test_launch_starts_one_process_per_device_with_its_environment(tmp_path, monkeypatch):
    conf = tmp_path / 'hccn.conf'
    conf.write_text(''.join(f'address_{i}=192.168.100.{101 + i}\n' for i in range(4)))
    hccl.main(['--device_num', '[0,4)', '--server_ip', '10.0.0.1', '--hccn_conf', str(conf), '--device_num_per_node',
               '4', '--output_dir', str(tmp_path)])
    table = str(tmp_path / 'hccl_4p_0123_10.0.0.1.json')
    assert hccl.job_command(os.path.join(ROOT, 'configs', '7b.py'), 'finetune', [])[-1] == '--config.mode=finetune'
    with pytest.raises(SystemExit, match="run status 'serve' should be one of"):
        hccl.main(['launch', table, os.path.join(ROOT, 'configs', '7b.py'), '[0,4)', 'serve'])
    probe = [sys.executable, '-c', 'import os, sys; print(sys.argv[1:], *(os.environ[k] for k in '
             '("RANK_TABLE_FILE", "RANK_SIZE", "DEVICE_ID", "RANK_ID")))']
    monkeypatch.setattr(hccl, 'job_command', lambda config, status, extra: probe + [config, status] + extra)
    hccl.main(['launch', '--join', '--output_dir', str(tmp_path / 'output'), table, 'configs/7b.py', '[0,4)', 'train',
               '--config.train.lr=1e-3'])
    for rank in range(4):
        log = (tmp_path / 'output' / 'log' / f'rank_{rank}' / 'mindformer.log').read_text().split()
        assert log[-4:] == [table, '4', str(rank), str(rank)]
        assert "'--config.train.lr=1e-3']" in log
    with pytest.raises(SystemExit, match='lists 4 ranks but the job has 8'):
        hccl.main(['launch', table, 'configs/7b.py', '[0,4)', 'train', '8'])


# ----------------------------------------------------------------------------------------------------------------------
# The memory plan, gradient buckets, recompute

def test_memory_plan_for_the_7b_seed_config_by_hand():
    """configs/7b.py on 8 devices: dp 2, mp 1, pp 4 (8 layers a stage), 16 micro-batches of 4 x 2048, fp16 compute,
    optimizer shard on. Pipeline stages run layer by layer: a layer's input is kept per micro-batch in flight, one
    layer's activations and one layer's fp16 copy exist at a time. The fullest stage is the last (layers 24-31,
    final norm, lm_head, logits)."""
    import importlib
    cfg = importlib.import_module('configs.7b').get_config()
    args, parallel = layout.model_args(cfg.model), layout.parallel_args(cfg.parallel)
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096          # 202,383,360 parameters
    last_stage = 8 * layer + 4096 + 32000 * 4096                  # + norm_out + lm_head
    s, b, h, a = 2048, 4, 4096, 32
    full_layer = s * b * h * (10 + 24 + 5 * a * s / h)            # Korthikanti, t = 1, 16-bit
    kept = 2 * s * b * h                                          # a layer's fp16 input
    activations = 8 * 1 * kept + full_layer + 2 * 4 * s * b * 32000  # 1 micro-batch in flight on the last stage
    expected = {'weights': 4 * last_stage, 'compute copy': 2 * layer, 'gradients': 4 * last_stage,
                'optimizer': 8 * last_stage / 2, 'activations': activations}
    assert layout.memory_plan(args, parallel, 4, 2048) == pytest.approx(expected)
    assert sum(expected.values()) / 2 ** 30 == pytest.approx(25.95, abs=0.01)
    fp16 = layout.memory_plan(args, parallel, 4, 2048, fp16_weights=True)
    assert fp16['weights'] == fp16['gradients'] == 2 * last_stage and fp16['compute copy'] == 0
    assert layout.memory_plan(args, parallel._replace(recompute=False), 4, 2048) == pytest.approx(expected)
    one_graph = layout.memory_plan(args, parallel._replace(recompute=False, pipeline_stage=1, micro_batch_num=1), 4,
                                   2048)
    assert one_graph['activations'] == pytest.approx(32 * full_layer + 2 * 4 * s * b * 32000)
    assert one_graph['compute copy'] == 2 * layout.count_params(args)


def test_memory_plan_for_the_7b_lora_recipe_by_hand():
    """configs/7b_lora.py as MindFormers' run_llama_7b_lora.yaml runs it: 8 devices, dp 8, batch 2 x 2048, fp16
    compute, recompute. The frozen base is held once, in float16 (no master, gradient, moments or compute copy);
    only the adapters (rank 16 on wq, wk, wv, wo) have fp32 masters, gradients and moments."""
    import importlib
    cfg = importlib.import_module('configs.7b_lora').get_config()
    args, parallel = layout.model_args(cfg.model), layout.parallel_args(cfg.parallel)
    adapters = 32 * 4 * (16 * 4096 + 4096 * 16)                   # 16,777,216 LoRA parameters
    s, b, h, a = 2048, 2, 4096, 32
    full_layer = s * b * h * (10 + 24 + 5 * a * s / h)            # Korthikanti, t = 1, 16-bit
    activations = 32 * 2 * s * b * h + full_layer + 2 * 4 * s * b * 32000  # layer inputs, one layer, the logits
    expected = {'weights': 2 * layout.count_params(args) + 4 * adapters, 'compute copy': 0, 'gradients': 4 * adapters,
                'optimizer': 8 * adapters, 'activations': activations}
    lora = layout.adapter_shapes(cfg, args)
    assert layout.memory_plan(args, parallel, 2, 2048, lora, frozen_bytes=layout.frozen_bytes(cfg)) == \
        pytest.approx(expected)
    assert sum(expected.values()) / 2 ** 30 == pytest.approx(16.6, abs=0.05)
    # held as float32 (frozen_dtype ''), the base needs a 16-bit compute copy, and the recipe no longer fits
    cfg.model.frozen_dtype = ''
    as_fp32 = layout.memory_plan(args, parallel, 2, 2048, lora, frozen_bytes=layout.frozen_bytes(cfg))
    assert as_fp32['weights'] == 4 * layout.count_params(args) + 4 * adapters
    assert as_fp32['compute copy'] == 2 * layout.count_params(args) and sum(as_fp32.values()) > 32 * 2 ** 30


@pytest.mark.parametrize('preset,line', [
    ('7b', 'config as written: 26.0 GB per device of 32 GB: fits'),
    ('7b_lora', 'config as written: 16.6 GB per device of 32 GB: fits')])
def test_plan_command_prints_the_table(capsys, preset, line):
    train.main(['train.py', '--config', os.path.join(ROOT, 'configs', f'{preset}.py'), '--plan'])
    out = capsys.readouterr().out
    assert '6.74 B parameters on 8 devices of 32 GB' in out
    assert 'tokens/s per device' in out and 'smallest configurations that fit 8 devices' in out
    assert out.strip().splitlines()[-1] == line
    if preset == '7b':
        assert re.search(r'fp32 master weights, opt shard, recompute +6\.5 +0\.4 +6\.5 +6\.5 +6\.0 +26\.0 +yes', out)


def test_gradient_buckets_cover_every_tensor_once_in_order():
    sizes = [(k, math.prod(s)) for k, s in layout.param_shapes(MP_ARGS).items()]
    for n in (1, 3, 4, 100):
        buckets = layout.gradient_buckets(sizes, n)
        assert [key for group in buckets for key, _ in group] == [k for k, _ in sizes]
        assert len(buckets) <= n and all(buckets)
        assert [size for group in buckets for _, size in group] == [s for _, s in sizes]


def test_recompute_gives_the_same_loss_and_gradients():
    tokens = ms.Tensor(np.random.default_rng(2).integers(3, 128, (2, 17)).astype(np.int32))
    params = llama.split_layers(llama.init_params(MP_ARGS), MP_ARGS.n_layers)
    results = []
    for loss in (loss_kept, loss_recomputed):
        (value, _), grads = ms.jit(ms.value_and_grad(loss, has_aux=True))(ms.mutable(params), tokens)
        results.append((float(value.asnumpy()), {k: g.asnumpy() for k, g in llama.join_layers(*grads).items()}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for k in results[0][1]:
        np.testing.assert_allclose(results[0][1][k], results[1][1][k], rtol=1e-4, atol=1e-7)


def loss_of(params, tokens, recompute):
    inputs, targets = llama.shift(tokens)
    logits = llama.transformer(*params, inputs, MP_ARGS, llama.sequence_context(*inputs.shape, MP_ARGS),
                               recompute=recompute)[0]
    return llama.token_loss(logits, inputs, targets, MP_ARGS)


def loss_kept(params, tokens):
    return loss_of(params, tokens, False)


def loss_recomputed(params, tokens):
    return loss_of(params, tokens, True)
