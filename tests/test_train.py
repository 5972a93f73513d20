"""Training: the loss falls, resume is exact, and the optimizer and schedule equal hand computations."""
import json
import math
import os
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

import convert
import layout
import llama
import monitor
import optim
import step
import train
from configs import tiny
from conftest import ROOT, setup_of
from test_kernels import kernels_or_skip, lambda_free_adamw
from test_monitor import MINDFORMERS_LOG, read_events


def tiny_config(out_dir, tiny_data, resume=False, **train_fields):
    cfg = tiny.get_config()
    cfg.data.train, cfg.data.eval = tiny_data
    cfg.resume = resume
    cfg.train.update(out_dir=str(out_dir), **train_fields)
    return cfg


def test_tiny_training_lowers_the_loss(tmp_path, tiny_data):
    """The loss falls; the run leaves its records (a header first), an up-to-date picture of them and the same
    scalars as TensorBoard events."""
    records = train.train(tiny_config(tmp_path, tiny_data, total_steps=60, log_interval=10, eval_interval=0,
                                      ckpt_interval=1000, tensorboard=True, log_grad_norms=True))
    losses = [r['loss'] for r in records if 'loss' in r]
    assert losses[0] > 4.0 and losses[-1] < losses[0] - 0.8
    assert [r['eval_loss'] for r in records if 'eval_loss' in r][0] < losses[0]
    assert os.path.exists(tmp_path / 'ckpt_00000060.ckpt')
    head, *logged = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert head['config']['train']['total_steps'] == 60 and head['parameters'] == head['trainable_parameters'] == \
        layout.count_params(layout.model_args(tiny.get_config().model))
    assert logged == records
    first = logged[0]
    assert {'step', 'loss', 'lr', 'grad_norm', 'tokens_per_s', 'mfu', 'skipped', 'peak_rss_mib'} <= set(first)
    assert len(first['losses']) == 10 and first['loss'] == first['losses'][-1] and first['skipped'] == 0
    assert first['loss_mean'] == pytest.approx(np.mean(first['losses']))
    assert 100 < first['peak_rss_mib'] < 1e5
    assert set(first['grad_norms']) == {'model.tok_embeddings.embedding_weight', 'model.norm_out.weight',
                                        'lm_head.weight', 'model.layers.0', 'model.layers.1'}
    assert math.sqrt(sum(v * v for v in first['grad_norms'].values())) == pytest.approx(first['grad_norm'], rel=1e-4)
    check_picture(tmp_path, records)
    version, scalars = read_events(str(tmp_path))
    assert version == 'brain.Event:2'
    steps = range(1, 61)
    assert scalars['train/loss'] == pytest.approx(dict(zip(steps, [x for r in logged if 'loss' in r
                                                                   for x in r['losses']])))
    assert scalars['eval/perplexity'] == pytest.approx({60: logged[-1]['perplexity']})
    assert scalars['grad_norm/model.layers.1'][10] == pytest.approx(first['grad_norms']['model.layers.1'])


def check_picture(out_dir, records):
    """out_dir/curves.png: the picture's size, drawn (not blank) in every panel, from the last record (written
    after it, and saying so), with no temporary left behind."""
    from PIL import Image
    path = out_dir / 'curves.png'
    image = Image.open(path)
    assert image.size == monitor.SIZE and image.format == 'PNG'
    assert image.text['last_step'] == str(records[-1]['step']) and image.text['records'] == str(len(records) + 1)
    assert os.stat(path).st_mtime_ns >= os.stat(out_dir / 'log.jsonl').st_mtime_ns
    pixels = np.asarray(image.convert('L'))
    cells = [pixels[monitor.TOP + r * 368:monitor.TOP + (r + 1) * 368, c * 420:(c + 1) * 420]
             for r in range(2) for c in range(3)]
    assert all((cell < 200).mean() > 0.005 for cell in cells)
    assert not [n for n in os.listdir(out_dir) if n.startswith('.') and n != '.lock']  # no temporary left


def test_resume_gives_the_same_losses(tmp_path, tiny_data):
    straight = tiny_config(tmp_path / 'a', tiny_data, total_steps=12, log_interval=1, ckpt_interval=6,
                           keep_checkpoints=5)
    straight.data.eval = ''
    full = train.train(straight)
    resumed_dir = tmp_path / 'b'
    os.makedirs(resumed_dir)
    shutil.copy(tmp_path / 'a' / 'ckpt_00000006.ckpt', resumed_dir)
    # as if killed after logging step 9, during the save of step 12 by a process that is gone
    (resumed_dir / 'log.jsonl').write_text(''.join(open(tmp_path / 'a' / 'log.jsonl').readlines()[:9]))
    (resumed_dir / '.ckpt_00000012.ckpt.tmp999999999').write_bytes(b'half')
    again = tiny_config(resumed_dir, tiny_data, total_steps=12, log_interval=1, ckpt_interval=6, resume=True)
    again.data.eval = ''
    rest = train.train(again)
    assert [r['step'] for r in rest] == list(range(7, 13))
    assert [r['step'] for r in monitor.read_log(str(resumed_dir / 'log.jsonl')) if 'loss' in r] == list(range(1, 13))
    assert not any(name.startswith('.') and name != '.lock' for name in os.listdir(resumed_dir))
    np.testing.assert_allclose([r['loss'] for r in rest], [r['loss'] for r in full[6:]], rtol=1e-6)
    plotted = tmp_path / 'compare.png'
    train.main(['train.py', '--plot', str(tmp_path / 'a'), str(resumed_dir / 'log.jsonl'), MINDFORMERS_LOG,
                '--out', str(plotted)])
    from PIL import Image
    image = Image.open(plotted)
    assert image.size == monitor.SIZE and image.text['last_step'] == '12'
    # headers and records: a (12 steps), b (its log's header and steps 1-6, then a header and 7-12), MindFormers
    assert image.text["records"] == str(13 + 14 + 13)
    a = convert.read_checkpoint(str(tmp_path / 'a' / 'ckpt_00000012.ckpt'))[0]
    b = convert.read_checkpoint(str(resumed_dir / 'ckpt_00000012.ckpt'))[0]
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_checkpoint_is_a_mindformers_checkpoint_with_config(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, total_steps=2, log_interval=1, ckpt_interval=1, keep_checkpoints=1)
    cfg.data.eval = ''
    train.train(cfg)
    # keep_checkpoints=1, beside the run's lock on out_dir (train.claim_out_dir)
    assert sorted(os.listdir(tmp_path)) == ['.lock', 'ckpt_00000002.ckpt', 'curves.png', 'log.jsonl']
    raw = ms.load_checkpoint(str(tmp_path / 'ckpt_00000002.ckpt'))
    args = layout.model_args(cfg.model)
    for name, shape in layout.param_shapes(args).items():
        assert tuple(raw[name].shape) == shape
        assert tuple(raw['adam_m.' + name].shape) == shape and tuple(raw['adam_v.' + name].shape) == shape
    assert json.loads(raw['model_config'])['dim'] == 64
    assert int(raw['global_step'].asnumpy()) == 2


def test_a_second_run_loads_the_first_runs_compiled_step(tmp_path, tiny_data):
    """train.py run twice in fresh processes: the second loads the step the first compiled (MindSpore says so at
    log level 2), and both log the same losses. Another batch shape, or a LoRA run, gets a directory of its own."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / 'cache'), GLOG_v='2')
    runs = []
    for name in ('first', 'second'):
        command = [sys.executable, 'train.py', '--config', 'configs/tiny.py', f'--config.data.train={tiny_data[0]}',
                   '--config.data.eval=', '--config.train.total_steps=3', '--config.train.log_interval=1',
                   f'--config.train.out_dir={tmp_path / name}', '--config.train.peak_tflops=1']
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        runs.append((run.stdout + run.stderr, [r['loss'] for r in monitor.read_log(str(tmp_path / name / 'log.jsonl'))
                                               if 'loss' in r]))
    (first, first_losses), (second, second_losses) = runs
    assert 'compiled; kept for the next run' in first and 'Use the compilation cache' not in first
    assert "its graph from an earlier run's cache" in second and 'Use the compilation cache' in second
    assert len(first_losses) == 3 and second_losses == first_losses
    root = tmp_path / 'cache' / 'llama-mindspore'
    kept = [e for e in os.listdir(root) if os.path.isdir(root / e)]  # (beside the C++ kernels' library)
    assert len(kept) == 1
    setup = setup_of()
    state = optim.init_state(llama.split_layers(llama.init_params(setup.args, 0), setup.args.n_layers))
    rows = np.zeros((8, 129), np.int32)
    with step.graph_cache(str(root), setup, state, None, [(rows,)]) as found:
        assert found  # what the runs compiled: the tiny preset, batch 8
    lora = setup_of(lora={'rank': 2})
    for other, frozen, batch in ((setup, None, rows[:4]), (lora, state['params'], rows)):
        with step.graph_cache(str(root), other, state, frozen, [(batch,)]) as found:
            assert found is False
    with step.graph_cache('', setup, state, None, [(rows,)]) as found:
        assert found is None


def test_learning_rate_schedule_by_hand():
    cfg = tiny.get_config().train
    cfg.update(lr=1.0, lr_end=0.1, warmup_ratio=0.1)
    assert optim.learning_rate(0, 100, cfg) == pytest.approx(0.1)     # warmup: (step + 1) / 10
    assert optim.learning_rate(9, 100, cfg) == pytest.approx(1.0)
    assert optim.learning_rate(10, 100, cfg) == pytest.approx(1.0)    # cosine starts at the peak
    assert optim.learning_rate(55, 100, cfg) == pytest.approx(0.55)   # halfway: lr_end + (lr - lr_end) / 2
    assert optim.learning_rate(100, 100, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize('bias_correction,fused', [(True, False), (False, False), (True, True)])
def test_adamw_against_numpy(bias_correction, fused):
    """Three steps of the compiled AdamW, elementwise or fused, equal a float64 numpy transcription of the rule."""
    rng = np.random.default_rng(0)
    names = ['attention.wq.weight', 'attention_norm.weight']
    params = {k: rng.standard_normal((3, 4) if 'wq' in k else (4,)).astype(np.float32) for k in names}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    opt = optim.OptimizerArgs(0.9, 0.95, 1e-8, 0.1, bias_correction, 0.0, kernels=kernels_or_skip() if fused else None)
    adamw = ms.jit(lambda_free_adamw)
    p = {k: ms.Tensor(v) for k, v in params.items()}
    m, v = ({k: ms.Tensor(np.zeros_like(x)) for k, x in params.items()} for _ in range(2))
    for t, g in enumerate(grads, 1):
        p, m, v = adamw(ms.mutable(p), ms.mutable(m), ms.mutable(v), ms.mutable({k: ms.Tensor(x) for k, x in g.items()}),
                       ms.Tensor(0.01), ms.Tensor(t, ms.int32), opt)
    mn = {k: 0.0 for k in params}
    vn = {k: 0.0 for k in params}
    pn = {k: x.astype(np.float64) for k, x in params.items()}
    for t, g in enumerate(grads, 1):
        for k in pn:
            mn[k] = 0.9 * mn[k] + 0.1 * g[k]
            vn[k] = 0.95 * vn[k] + 0.05 * g[k].astype(np.float64) ** 2
            mh, vh = (mn[k] / (1 - 0.9 ** t), vn[k] / (1 - 0.95 ** t)) if bias_correction else (mn[k], vn[k])
            pn[k] = pn[k] - 0.01 * (mh / (np.sqrt(vh) + 1e-8) + (0.1 * pn[k] if 'norm' not in k else 0))
    for k in pn:
        np.testing.assert_allclose(p[k].asnumpy(), pn[k], rtol=1e-5, atol=1e-6)


def test_global_norm_clipping_by_hand():
    """apply with gradients (3, 0) and (4) summed over 2 scored tokens (a mean gradient of norm 2.5) and clipping at
    1.0: the gradient norm is 2.5 and Adam's first moment holds (1 - beta1) times the gradient scaled to norm 1."""
    setup = setup_of(model=dict(n_layers=1))
    grads = ({layout.NORM_OUT: ms.Tensor(np.array([3.0, 0.0] + [0.0] * 62, np.float32))},
             [{'ffn_norm.weight': ms.Tensor(np.array([4.0] + [0.0] * 63, np.float32))}])
    params = ({layout.NORM_OUT: ms.Tensor(np.ones(64, np.float32))}, [{'ffn_norm.weight': ms.Tensor(np.ones(64, np.float32))}])
    state = optim.init_state(params)
    pieces = optim.apply_pieces(setup.opt, setup.mesh, setup.plan, compiled=True)
    state, metrics = optim.apply(state, grads, ms.Tensor(0.0), ms.Tensor(2.0), ms.Tensor(0.0), ms.Tensor(1e-3), pieces)
    assert float(metrics['grad_norm'].asnumpy()) == pytest.approx(2.5)
    np.testing.assert_allclose(state['m'][0][layout.NORM_OUT].asnumpy()[:2], [0.1 * 0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(state['m'][1][0]['ffn_norm.weight'].asnumpy()[0], 0.1 * 0.8, rtol=1e-6)


def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches of 4 rows give the gradient of one batch of 8 (token-weighted sums, so exact up to fp32
    summation order), and the accumulating path runs the same optimizer step.

    Compared before AdamW: Adam's first update is about lr * sign(g), so a 1e-9 difference in a near-zero gradient
    entry would show up as an lr-sized difference in that weight."""
    setup = setup_of()
    args = setup.args
    batch = np.random.default_rng(1).integers(3, 512, (8, 129)).astype(np.int32)
    batch[1, 100:] = 0  # padding is not scored, so the two halves hold different token counts
    params = llama.split_layers(llama.init_params(args, 0), args.n_layers)
    grad_sums = step.one_graph(setup)['grad_sums']
    one, seed = ms.Tensor(1.0, ms.float32), ms.Tensor(0, ms.int32)
    big, _, n_big = grad_sums(ms.mutable(params), None, step.as_tensors((batch,)), seed, one)
    halves = [grad_sums(ms.mutable(params), None, step.as_tensors((b,)), seed, one) for b in (batch[:4], batch[4:])]
    n_halves = sum(float(h[2].asnumpy()) for h in halves)
    assert float(n_big.asnumpy()) == n_halves == 8 * 128 - 28
    flat = [llama.join_layers(*g) for g in (big, halves[0][0], halves[1][0])]
    for k in flat[0]:
        expected = flat[0][k].asnumpy() / n_halves
        got = (flat[1][k].asnumpy() + flat[2][k].asnumpy()) / n_halves
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    one, metrics_one = step.train_step(optim.init_state(params), None, [(batch,)], 1e-3, 0, setup)
    two, metrics_two = step.train_step(optim.init_state(params), None, [(batch[:4],), (batch[4:],)], 1e-3, 0, setup)
    for key, rel in (('loss', 1e-6), ('grad_norm', 1e-5)):
        assert float(metrics_one[key].asnumpy()) == pytest.approx(float(metrics_two[key].asnumpy()), rel=rel)
    by_name = dict(zip(monitor.tensor_names(one), metrics_one['grad_norms'].asnumpy()))  # the order apply returns
    assert set(by_name) == set(flat[0])
    for k, norm in by_name.items():
        assert norm == pytest.approx(np.linalg.norm(flat[0][k].asnumpy()) / n_halves, rel=1e-4)
    assert int(two['counters'][0].asnumpy()) == 1


def test_flops_per_token_by_hand():
    args = layout.model_args(tiny.get_config().model)
    D, L, F, V, T = 64, 2, 192, 512, 128
    assert args.ffn_hidden == F
    matmul_params = L * (2 * D * D + 2 * D * (D // 2) + 3 * D * F) + V * D  # attention + FFN + lm_head
    assert layout.flops_per_token(args, T) == 6 * matmul_params + 12 * L * D * T
    assert math.isclose(layout.count_params(args), matmul_params + V * D + (2 * L + 1) * D)


@pytest.mark.parametrize('variant', ['tied, weight decay, 2 micro-batches', 'lora with dropout'])
def test_layer_by_layer_step_equals_the_one_graph_step(variant):
    """train.layerwise_from: the step cut into per-layer graphs (compile time independent of depth) computes the same
    update as the single graph, up to fp32 reduction order. (Untied, without LoRA: tests/test_mesh.py's pipeline runs
    and test_parallel's data-parallel one, layer by layer, give one process's one-graph losses and weights.)"""
    tied, lora_mode = variant.startswith('tied'), variant.startswith('lora')
    model = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=32,
                 tie_embeddings=tied)
    lora = dict(rank=4, alpha=8.0, dropout=0.2, targets='.*wq|.*wo|.*w2') if lora_mode else None
    setup = setup_of(model, lora, weight_decay=0.1, layerwise_from=0)
    args = setup.args
    params = llama.split_layers(llama.init_params(args, 0), args.n_layers)
    rows = np.random.default_rng(0).integers(3, 128, (4, 17)).astype(np.int32)
    rows[1, 10:] = 0
    batches = [(rows[:2],), (rows[2:],)] if variant.endswith('micro-batches') else [(rows,)]
    frozen = None
    if lora_mode:
        frozen, params = params, ({}, llama.split_layers(llama.init_lora(args, 4, lora['targets'], 1), 3)[1])
    results = []
    for layer_by_layer in (False, True):
        state, losses = optim.init_state(params), []
        for i in range(3):
            state, metrics = step.train_step(state, frozen, batches, 1e-2, i,
                                             setup._replace(layer_by_layer=layer_by_layer))
            losses.append(float(metrics['loss'].asnumpy()))
        results.append((losses, llama.join_layers(*state['params']), metrics['grad_norms'].asnumpy()))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
    np.testing.assert_allclose(results[1][2], results[0][2], rtol=1e-4)  # per tensor, in one order
    assert set(results[0][1]) == set(results[1][1]) == set(llama.join_layers(*params))
    for k in results[0][1]:
        np.testing.assert_allclose(results[1][1][k].asnumpy(), results[0][1][k].asnumpy(), atol=2e-6)
    assert int(state['counters'][0].asnumpy()) == 3
