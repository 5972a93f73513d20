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

import hccl
import llama
import train
from conftest import ROOT
from configs import tiny


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def tiny_mindrecord(tmp_path_factory):
    cfg = tiny.get_config()
    cfg.train.out_dir = str(tmp_path_factory.mktemp('tiny'))
    return train.prepare_dataset(cfg.data.train, cfg)


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


@pytest.mark.parametrize('layerwise_from', [0, 1])
def test_two_process_data_parallel_equals_one_process(tmp_path, tiny_mindrecord, layerwise_from):
    """Batch 4 on each of 2 workers = batch 8 on one process: the same losses, and identical weights on both ranks;
    with the one-graph step and with the layer-by-layer step."""
    one = tiny.get_config()
    one.data.train, one.data.eval = tiny_mindrecord, ''
    one.train.update(out_dir=str(tmp_path / 'one'), batch_size=8, total_steps=5, log_interval=1)
    alone = [r['loss'] for r in train.train(one)]
    code, logs, out = msrun_tiny(tmp_path, tiny_mindrecord, '--config.train.batch_size=4',
                                 f'--config.train.layerwise_from={layerwise_from}')
    assert code == 0, logs[0][-3000:]
    together = [json.loads(line)['loss'] for line in open(out / 'log.jsonl')]
    np.testing.assert_allclose(together, alone, rtol=2e-5)
    digests = [re.search(r'rank (\d): parameters sha256 ([0-9a-f]{64})', log).groups() for log in logs]
    assert [d[0] for d in digests] == ['0', '1'] and digests[0][1] == digests[1][1]
    assert sorted(os.listdir(out)) == ['ckpt_00000005.ckpt', 'log.jsonl']  # rank 0 alone writes


def test_model_parallel_reaches_mindspore_semi_auto_compiler(tmp_path, tiny_mindrecord):
    """model_parallel 2 on 2 processes: the step is handed to MindSpore's semi-auto parallel compiler with the plan's
    strategies, which on a CPU refuses at its parallel pass; the run says so in one line."""
    code, logs, _ = msrun_tiny(tmp_path, tiny_mindrecord, '--config.parallel.model_parallel=2',
                               env={'MS_NODE_TIMEOUT': '5'})  # the scheduler notices the exits sooner
    assert code != 0
    for log in logs:
        assert 'training 5 steps of 1024 tokens on 2 processes (data_parallel 1 x model_parallel 2)' in log
        assert ('error: MindSpore compiles model_parallel > 1 (semi-auto parallel) only on Ascend or GPU; on this CPU '
                'it stopped with: Invalid backend: CPU') in log


# ----------------------------------------------------------------------------------------------------------------------
# The sharding table, its strategies, and a numerical simulation of the split

MP_ARGS = llama.model_args(dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128, multiple_of=16,
                                max_seq_len=32, norm_eps=1e-5))


def all_names(args):
    """Every parameter name a model can have: weights, an untied head, LoRA on every projection."""
    names = set(llama.param_shapes(args)) | set(llama.param_shapes(args._replace(tie_embeddings=True)))
    return names | set(llama.lora_shapes(args, 2, '.*'))


def test_every_rule_is_used_and_an_unknown_name_is_refused():
    names = all_names(MP_ARGS)
    for pattern, _ in llama.SHARDING:
        assert any(re.fullmatch(pattern, n) for n in names), pattern
    with pytest.raises(ValueError, match='no sharding rule matches parameter model.layers.0.attention.wz.weight'):
        llama.partition('model.layers.0.attention.wz.weight')


def test_megatron_layout():
    plan = llama.sharding_plan(llama.param_shapes(MP_ARGS), llama.ParallelArgs(model_parallel=2, vocab_emb_dp=False))
    for p in ('wq', 'wk', 'wv'):
        assert plan[f'model.layers.1.attention.{p}.weight'] == ('mp', None)
    assert plan['model.layers.1.attention.wo.weight'] == (None, 'mp')
    assert plan['model.layers.0.feed_forward.w1.weight'] == plan['model.layers.0.feed_forward.w3.weight'] == ('mp', None)
    assert plan['model.layers.0.feed_forward.w2.weight'] == (None, 'mp')
    assert plan[llama.EMBEDDING] == plan['lm_head.weight'] == ('mp', None)
    assert llama.partition(llama.EMBEDDING, vocab_emb_dp=True) == (None, None)
    assert llama.PROJECTION_KERNEL == {'wq': 'column', 'wk': 'column', 'wv': 'column', 'wo': 'row', 'w1': 'column',
                                       'w2': 'row', 'w3': 'column'}


def test_divisibility_and_device_count_violations_are_caught():
    P = llama.ParallelArgs
    assert llama.parallel_problems(MP_ARGS, P(data_parallel=2, model_parallel=4), 8) == []
    problems = llama.parallel_problems(MP_ARGS, P(data_parallel=1, model_parallel=8), 8)
    assert problems == ['n_kv_heads 4 is not divisible by model_parallel 8']
    problems = llama.parallel_problems(MP_ARGS, P(data_parallel=1, model_parallel=3), 3)
    assert set(problems) == {'n_heads 8 is not divisible by model_parallel 3', 'dim 64 is not divisible by model_parallel 3',
                             'n_kv_heads 4 is not divisible by model_parallel 3',
                             'ffn_hidden 176 is not divisible by model_parallel 3'}
    assert llama.parallel_problems(MP_ARGS, P(model_parallel=2, vocab_emb_dp=False), 2) == []
    assert 'vocab_size 128 is not divisible by model_parallel 3' in llama.parallel_problems(
        MP_ARGS._replace(n_heads=3, n_kv_heads=3, dim=63, ffn_hidden=63), P(model_parallel=3, vocab_emb_dp=False), 3)
    assert llama.parallel_problems(MP_ARGS, P(data_parallel=2), 8) == [
        'data_parallel x model_parallel x pipeline_stage = 2 x 1 x 1 = 2, but there are 8 devices']
    assert llama.parallel_problems(MP_ARGS, P(pipeline_stage=4, micro_batch_num=2), 4) == [
        'pipeline_stage 4 exceeds the 2 layers', 'micro_batch_num 2 must be at least pipeline_stage 4']


def test_strategies_match_the_operands_they_annotate(monkeypatch):
    """Run the model eagerly with every kernel wrapped to record its operands' shapes: each strategy has one entry per
    operand dimension, and on a 2 x 2 mesh every split divides the dimension it splits."""
    seen = {}

    def recording(name, kernel):
        def call(*operands):
            seen.setdefault(name, set()).add(tuple(tuple(o.shape) for o in operands[:2]))
            return kernel(*operands)
        return call
    for name, kernel in list(llama.KERNELS.items()):
        monkeypatch.setitem(llama.KERNELS, name, recording(name, kernel))
    args = MP_ARGS._replace(lora_alpha=4.0)
    params = llama.init_params(args)
    lora = llama.init_lora(args, 2, '.*')
    llama.forward(params, ms.Tensor(np.ones((2, 8), np.int32)), args, lora)
    strategies = llama.kernel_strategies(llama.ParallelArgs(data_parallel=2, model_parallel=2, vocab_emb_dp=False))
    assert set(seen) == set(strategies) == set(llama.KERNELS)
    for name, shapes in seen.items():
        for operand_shapes in shapes:
            for shape, split in zip(operand_shapes, strategies[name]):
                assert len(shape) == len(split), (name, shape, split)
                assert all(dim % parts == 0 for dim, parts in zip(shape, split)), (name, shape, split)


def test_annotated_model_and_step_run_stand_alone():
    """With every kernel carrying a 2 x 2 mesh strategy, the stand-alone forward and train step give what they give
    without annotations (MindSpore ignores strategies outside semi-auto parallel)."""
    args = MP_ARGS
    params = llama.init_params(args)
    tokens = np.random.default_rng(0).integers(3, 128, (2, 17)).astype(np.int32)
    opt = train.OptimizerArgs(0.9, 0.95, 1e-8, 0.0, True, 1.0)

    def run():
        logits = llama.forward(params, ms.Tensor(tokens[:, :-1]), args).asnumpy()
        state, metrics = train.train_step(train.init_state(dict(params)), None, [(tokens,)], 1e-3, 0, args, opt)
        return logits, float(metrics['loss'].asnumpy()), state['params']['model.layers.1.attention.wo.weight'].asnumpy()
    plain = run()
    try:
        llama.apply_sharding(llama.ParallelArgs(data_parallel=2, model_parallel=2, vocab_emb_dp=False))
        assert llama.KERNELS['row'].in_strategy == ((2, 2), (1, 2))
        train.compiled_steps.cache_clear()
        annotated = run()
    finally:
        llama.apply_sharding(llama.ParallelArgs())
    np.testing.assert_array_equal(plain[0], annotated[0])
    assert plain[1] == annotated[1]
    np.testing.assert_array_equal(plain[2], annotated[2])


def numpy_rope(x, positions, theta):
    half = x.shape[-1] // 2
    freqs = positions[:, None] / theta ** (np.arange(half) * 2 / x.shape[-1])
    cos, sin = np.cos(freqs)[:, None, :], np.sin(freqs)[:, None, :]
    return np.concatenate([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1)


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def shard(w, dims, mp, s):
    """Shard s of w under partition dims."""
    for axis, d in enumerate(dims):
        if d == 'mp':
            size = w.shape[axis] // mp
            w = np.take(w, np.arange(s * size, (s + 1) * size), axis)
    return w


def simulated_tensor_parallel_forward(params, tokens, args, parallel):
    """Each of mp shards holds only its slices (as the plan says) and computes locally; the only communication is
    what the layout implies: an all-reduce (sum) after each row-parallel layer and after a vocab-split embedding
    lookup, and concatenation of vocab-split logits."""
    mp, plan = parallel.model_parallel, llama.sharding_plan(params, parallel)
    p = {k: [shard(v, plan[k], mp, s) for s in range(mp)] for k, v in params.items()}
    T = len(tokens)
    H, KV, hd = args.n_heads // mp, args.n_kv_heads // mp, args.head_dim
    rows = p[llama.EMBEDDING]
    h = sum(np.where(((tokens >= s * len(rows[s])) & (tokens < (s + 1) * len(rows[s])))[:, None],
                     rows[s][np.clip(tokens - s * len(rows[s]), 0, len(rows[s]) - 1)], 0.0) for s in range(mp))
    causal = np.tril(np.ones((T, T), bool))
    for i in range(args.n_layers):
        pre = f'model.layers.{i}.'
        x = rms(h, params[pre + 'attention_norm.weight'], args.norm_eps)
        partial = []
        for s in range(mp):
            q = numpy_rope((x @ p[pre + 'attention.wq.weight'][s].T).reshape(T, H, hd), np.arange(T), args.rope_theta)
            k = numpy_rope((x @ p[pre + 'attention.wk.weight'][s].T).reshape(T, KV, hd), np.arange(T), args.rope_theta)
            v = (x @ p[pre + 'attention.wv.weight'][s].T).reshape(T, KV, hd)
            k, v = np.repeat(k, H // KV, 1), np.repeat(v, H // KV, 1)
            scores = np.where(causal[None], np.einsum('thd,shd->hts', q, k) / math.sqrt(hd), -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            heads = np.einsum('hts,shd->thd', probs, v).reshape(T, H * hd)
            partial.append(heads @ p[pre + 'attention.wo.weight'][s].T)
        h = h + sum(partial)  # all-reduce of the row-parallel wo
        x = rms(h, params[pre + 'ffn_norm.weight'], args.norm_eps)
        partial = []
        for s in range(mp):
            gate, up = x @ p[pre + 'feed_forward.w1.weight'][s].T, x @ p[pre + 'feed_forward.w3.weight'][s].T
            partial.append((gate / (1 + np.exp(-gate)) * up) @ p[pre + 'feed_forward.w2.weight'][s].T)
        h = h + sum(partial)  # all-reduce of the row-parallel w2
    x = rms(h, params['model.norm_out.weight'], args.norm_eps)
    if 'mp' in plan['lm_head.weight']:  # vocab-split logits are gathered
        return np.concatenate([x @ p['lm_head.weight'][s].T for s in range(mp)], -1)
    return x @ p['lm_head.weight'][0].T


@pytest.mark.parametrize('mp,vocab_emb_dp', [(2, True), (4, True), (2, False), (4, False)])
def test_simulated_model_parallel_split_gives_the_unsharded_logits(mp, vocab_emb_dp):
    params = {k: v.asnumpy().astype(np.float64) for k, v in llama.init_params(MP_ARGS, seed=3).items()}
    tokens = np.random.default_rng(1).integers(0, 128, 12)
    parallel = llama.ParallelArgs(model_parallel=mp, vocab_emb_dp=vocab_emb_dp)
    assert llama.parallel_problems(MP_ARGS, parallel, mp) == []
    simulated = simulated_tensor_parallel_forward(params, tokens, MP_ARGS, parallel)
    reference = llama.forward({k: ms.Tensor(v.astype(np.float32)) for k, v in params.items()},
                              ms.Tensor(tokens[None].astype(np.int32)), MP_ARGS).asnumpy()[0]
    np.testing.assert_allclose(simulated, reference, atol=2e-5)


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
    optimizer shard and recompute on. The fullest stage is the last (layers 24-31, final norm, lm_head, logits)."""
    import importlib
    cfg = importlib.import_module('configs.7b').get_config()
    args, parallel = llama.model_args(cfg.model), llama.ParallelArgs(**{
        k: v for k, v in cfg.parallel.items() if k in llama.ParallelArgs._fields})
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096          # 202,383,360 parameters
    last_stage = 8 * layer + 4096 + 32000 * 4096                  # + norm_out + lm_head
    s, b, h, a = 2048, 4, 4096, 32
    full_layer = s * b * h * (10 + 24 + 5 * a * s / h)            # Korthikanti, t = 1, 16-bit
    kept = 2 * s * b * h                                          # recompute keeps the layer input
    activations = 8 * 1 * kept + full_layer + 2 * 4 * s * b * 32000  # 1 micro-batch in flight on the last stage
    expected = {'weights': 4 * last_stage, 'compute copy': 2 * last_stage, 'gradients': 4 * last_stage,
                'optimizer': 8 * last_stage / 2, 'activations': activations}
    assert train.memory_plan(args, parallel, 4, 2048) == pytest.approx(expected)
    assert sum(expected.values()) / 2 ** 30 == pytest.approx(28.84, abs=0.01)
    fp16 = train.memory_plan(args, parallel, 4, 2048, fp16_weights=True)
    assert fp16['weights'] == fp16['gradients'] == 2 * last_stage and fp16['compute copy'] == 0
    first = train.memory_plan(args, parallel._replace(recompute=False), 4, 2048)  # now the first stage is fullest
    assert first['activations'] == pytest.approx(8 * 4 * full_layer)  # 4 micro-batches in flight on stage 0


def test_plan_command_prints_the_table(capsys):
    train.main(['train.py', '--config', os.path.join(ROOT, 'configs', '7b.py'), '--plan'])
    out = capsys.readouterr().out
    assert '6.74 B parameters on 8 devices of 32 GB' in out
    assert re.search(r'fp32 master weights, opt shard, recompute +6\.5 +3\.3 +6\.5 +6\.5 +6\.0 +28\.8 +yes', out)
    assert 'tokens/s per device' in out and 'smallest configurations that fit 8 devices' in out


def test_gradient_buckets_cover_every_tensor_once_in_order():
    shapes = llama.param_shapes(MP_ARGS)
    for n in (1, 3, 4, 100):
        buckets = train.gradient_buckets(shapes, n)
        flat = [name for group in buckets for name, _ in group]
        assert flat == list(shapes) and len(buckets) <= n and all(buckets)
        assert all(size == math.prod(shapes[name]) for group in buckets for name, size in group)


def test_recompute_gives_the_same_loss_and_gradients():
    tokens = ms.Tensor(np.random.default_rng(2).integers(3, 128, (2, 17)).astype(np.int32))
    params = llama.init_params(MP_ARGS)
    results = []
    for recompute in (False, True):
        args = MP_ARGS._replace(recompute=recompute)
        fn = ms.jit(ms.value_and_grad(lambda_free_loss, grad_position=0, has_aux=True))
        (loss, _), grads = fn(ms.mutable(params), tokens, args)
        results.append((float(loss.asnumpy()), {k: g.asnumpy() for k, g in grads.items()}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for k in results[0][1]:
        np.testing.assert_allclose(results[0][1][k], results[1][1][k], rtol=1e-4, atol=1e-7)


def lambda_free_loss(params, tokens, args):
    return llama.loss_fn(params, tokens, args)
