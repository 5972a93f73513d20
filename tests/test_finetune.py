"""Fine-tuning, LoRA, evaluation, loss scaling, and a training loop that never loses work."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest

import convert
import data
import layout
import llama
import optim
import step
import train
import util
from conftest import ROOT, STORIES, setup_of
from test_chat import interrupted
from configs import stories260k, tiny

PAIRS = [('What color is the sky?', 'The sky is blue.'), ('Who likes to play?', 'Lily likes to play.'),
         ('Where is the dog?', 'The dog is in the park.'), ('What did Tom eat?', 'Tom ate a red apple.'),
         ('Is the cat happy?', 'Yes, the cat is happy.'), ('What is big?', 'The tree is big.'),
         ('Who has a ball?', 'Ben has a ball.'), ('Why is Sue sad?', 'Sue lost her toy.')]


@pytest.fixture(scope='module')
def qa_file(tmp_path_factory, tok512):
    """Conversations -> data.py's qa rows (vicuna template): only the replies and their EOS are labelled."""
    folder = tmp_path_factory.mktemp('qa')
    conversations = [{'id': str(i), 'conversations': [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]}
                     for i, (q, a) in enumerate(PAIRS)]
    (folder / 'conversations.json').write_text(json.dumps(conversations))
    path = str(folder / 'qa.mindrecord')
    data.write_mindrecord(data.qa_rows(str(folder / 'conversations.json'), tok512, 192), path, data.SCHEMAS['qa'])
    return path


def stories_config(out_dir, qa_file, **train_fields):
    cfg = stories260k.get_config()
    cfg.load_checkpoint = os.path.join(STORIES, 'stories260K.bin')
    cfg.mode = 'finetune'
    cfg.data.train = cfg.data.eval = qa_file
    cfg.data.seq_length = 192
    fields = dict(out_dir=str(out_dir), batch_size=4, total_steps=16, lr=2e-3, lr_end=2e-4, warmup_ratio=0.0,
                  log_interval=4, eval_interval=0, ckpt_interval=1000)
    cfg.train.update({**fields, **train_fields})
    return cfg


def eval_loss(cfg, checkpoint, adapter=''):
    cfg = cfg.copy_and_resolve_references()
    cfg.mode, cfg.load_checkpoint, cfg.lora.adapter = 'eval', checkpoint, adapter
    return train.train(cfg)[0]['eval_loss']


def test_full_finetune_lowers_the_reply_loss(tmp_path, qa_file):
    cfg = stories_config(tmp_path, qa_file)
    before = eval_loss(cfg, cfg.load_checkpoint)
    train.train(cfg)
    after = eval_loss(cfg, str(tmp_path / 'ckpt_00000016.ckpt'))
    assert after < before - 1.0, (before, after)


def stories_setup(lora=None):
    cfg = stories260k.get_config()
    cfg.lora.update(lora or {})
    return step.prepare(cfg)


def test_masked_positions_contribute_no_gradient(stories260k):
    params, args = stories260k
    setup = stories_setup()
    params = llama.split_layers(params, args.n_layers)
    ids = np.random.default_rng(0).integers(3, 512, (2, 33)).astype(np.int32)
    labels = np.full_like(ids, -100)
    grad_sums = step.one_graph(setup)['grad_sums']
    grads, loss_sum, n = grad_sums(ms.mutable(params), None, step.as_tensors((ids, labels)), ms.Tensor(0, ms.int32),
                                   ms.Tensor(1.0, ms.float32))
    assert float(n.asnumpy()) == 0 and float(loss_sum.asnumpy()) == 0
    assert all(not np.any(g.asnumpy()) for g in llama.join_layers(*grads).values())
    labels[0, 5] = ids[0, 5]  # one scored position: now some gradient flows
    grads, _, n = grad_sums(ms.mutable(params), None, step.as_tensors((ids, labels)), ms.Tensor(0, ms.int32),
                            ms.Tensor(1.0, ms.float32))
    assert float(n.asnumpy()) == 1 and any(np.any(g.asnumpy()) for g in llama.join_layers(*grads).values())


def lora_config(out_dir, qa_file, **train_fields):
    """stories_config with LoRA on the base held in float16 (as configs/7b_lora.py holds it)."""
    cfg = stories_config(out_dir, qa_file, **train_fields)
    cfg.lora.update(rank=4, alpha=8.0, dropout=0.1)
    cfg.model.frozen_dtype = 'float16'
    return cfg


def test_lora_trains_only_the_adapters(tmp_path, qa_file, stories260k):
    """A LoRA run on a float16 base writes an adapter that lowers the eval loss; merged into the base by convert.py
    --lora, it gives the loss of the base with the adapter applied unmerged (the merge is in fp32, the unmerged base
    in float16: equal within that rounding)."""
    cfg = lora_config(tmp_path, qa_file, total_steps=8, log_interval=1)
    before = eval_loss(cfg, cfg.load_checkpoint)
    records = train.train(cfg)
    adapter = str(tmp_path / 'adapter.ckpt')
    tensors, config, extra = convert.read_checkpoint(adapter)
    args = stories260k[1]
    assert {k: v.shape for k, v in tensors.items()} == layout.lora_shapes(args, 4, cfg.lora.targets)
    assert len(tensors) == 2 * 4 * 5  # A and B for wq, wk, wv, wo in 5 layers
    assert extra == {'lora_rank': 4, 'lora_alpha': 8.0, 'lora_targets': '.*wq|.*wk|.*wv|.*wo'}
    assert config['dim'] == 64
    adapted = eval_loss(cfg, cfg.load_checkpoint, adapter)
    assert adapted < before - 0.3
    losses = [r['loss'] for r in records if 'loss' in r]
    assert losses[-1] < losses[0]
    merged = str(tmp_path / 'merged.ckpt')
    convert.main(['--input', cfg.load_checkpoint, '--lora', adapter, '--output', merged])
    cfg.model.frozen_dtype = 'float32'
    assert eval_loss(cfg, merged) == pytest.approx(adapted, abs=2e-3)


def test_lora_step_leaves_the_base_bit_identical(stories260k):
    params, args = stories260k
    setup = stories_setup(dict(rank=4, alpha=8.0, dropout=0.1, targets='.*wq|.*wv'))
    before = {k: v.asnumpy().copy() for k, v in params.items()}
    lora = llama.init_lora(setup.args, 4, '.*wq|.*wv', seed=0)
    state = optim.init_state(({}, llama.split_layers(lora, args.n_layers)[1]))
    ids = np.random.default_rng(0).integers(3, 512, (2, 33)).astype(np.int32)
    frozen = llama.split_layers(params, args.n_layers)
    for i in range(3):
        state, _ = step.train_step(state, frozen, [(ids,)], 1e-2, i, setup)
    assert all(np.array_equal(params[k].asnumpy(), before[k]) for k in params)
    trained = llama.join_layers(*state['params'])
    assert set(trained) == set(lora)
    assert any(not np.array_equal(trained[k].asnumpy(), lora[k].asnumpy()) for k in lora)


def test_lora_merge_equals_base_plus_adapter(stories260k):
    """Logits of the merged weights W + (alpha/r)·B·A equal the base run with the adapter applied unmerged."""
    params, args = stories260k
    args = args._replace(lora_alpha=8.0)
    rng = np.random.default_rng(1)
    lora = {k: ms.Tensor(rng.standard_normal(s).astype(np.float32) * 0.05)
            for k, s in layout.lora_shapes(args, 4, '.*wq|.*wk|.*wv|.*wo|.*w2').items()}
    merged = {k: v.asnumpy() for k, v in params.items()}
    for name in {k[:-len(layout.LORA_A)] for k in lora if k.endswith(layout.LORA_A)}:
        a, b = lora[name + layout.LORA_A].asnumpy(), lora[name + layout.LORA_B].asnumpy()
        merged[name + '.weight'] = merged[name + '.weight'] + (8.0 / 4) * (b @ a)
    tokens = ms.Tensor(rng.integers(3, 512, (2, 24)).astype(np.int32))
    with_adapter = llama.forward(params, tokens, args, lora).asnumpy()
    with_merged = llama.forward({k: ms.Tensor(v) for k, v in merged.items()}, tokens, args).asnumpy()
    plain = llama.forward(params, tokens, args).asnumpy()
    np.testing.assert_allclose(with_adapter, with_merged, atol=2e-4)
    assert np.abs(with_adapter - plain).max() > 0.01  # the adapter does change the output


def test_lora_resume_with_dropout_is_exact(tmp_path, qa_file):
    straight = lora_config(tmp_path / 'a', qa_file, total_steps=8, log_interval=1, ckpt_interval=4, keep_checkpoints=3)
    full = train.train(straight)
    os.makedirs(tmp_path / 'b')
    os.link(tmp_path / 'a' / 'ckpt_00000004.ckpt', tmp_path / 'b' / 'ckpt_00000004.ckpt')
    again = lora_config(tmp_path / 'b', qa_file, total_steps=8, log_interval=1, ckpt_interval=4)
    again.resume = True
    rest = train.train(again)
    np.testing.assert_allclose([r['loss'] for r in rest if 'loss' in r],
                               [r['loss'] for r in full if 'loss' in r][4:], rtol=1e-6)


def test_eval_perplexity_of_stories260k(tmp_path, tok512):
    """exp(mean NLL) on the 5 TinyStories stories (data README: mean NLL 1.266441 over 1,804 tokens)."""
    with open(os.path.join(ROOT, 'tests', 'fixtures', 'tinystories_sample.txt'), encoding='utf-8') as f:
        stories = [s.strip() for s in f.read().split('<|endoftext|>') if s.strip()]
    rows = []
    for story in stories:
        ids = tok512.encode(story, bos=True)
        row, labels = np.zeros(513, np.int32), np.full(513, -100, np.int32)
        row[:len(ids)] = labels[:len(ids)] = ids
        rows.append({'input_ids': row, 'labels': labels})
    path = str(tmp_path / 'stories.mindrecord')
    data.write_mindrecord(rows, path, data.SCHEMAS['qa'])
    cfg = stories260k.get_config()
    cfg.update(mode='eval', load_checkpoint=os.path.join(STORIES, 'stories260K.bin'))
    cfg.data.eval = path
    cfg.train.batch_size = 2  # 5 rows: the last batch is short and still counted
    result = train.train(cfg)[0]
    assert result['tokens'] == 1804
    assert result['perplexity'] == pytest.approx(math.exp(1.266441), abs=1e-3)


def test_loss_scale_halves_and_skips_on_overflow_then_grows():
    setup = setup_of(loss_scale=1024.0, loss_scale_window=2)
    args = setup.args
    params = llama.split_layers(llama.init_params(args, 0), args.n_layers)
    state = optim.init_state(params, loss_scale=1024.0)
    pieces = optim.apply_pieces(setup.opt, setup.mesh, setup.plan, compiled=True)
    grads = (({k: ms.Tensor(np.full(v.shape, 0.5, np.float32)) for k, v in params[0].items()}),
             [{k: ms.Tensor(np.full(v.shape, 0.5, np.float32)) for k, v in g.items()} for g in params[1]])
    bad = (dict(grads[0], **{'model.norm_out.weight': ms.Tensor(np.full((64,), np.inf, np.float32))}), grads[1])
    zero, one, lr = ms.Tensor(0.0), ms.Tensor(1.0), ms.Tensor(1e-3, ms.float32)  # loss sum, tokens, stop
    state, metrics = optim.apply(state, bad, zero, one, zero, lr, pieces)
    assert float(state['counters'][1].asnumpy()) == 512.0 and int(state['counters'][0].asnumpy()) == 0
    before, after = llama.join_layers(*params), llama.join_layers(*state['params'])
    assert all(np.array_equal(after[k].asnumpy(), before[k].asnumpy()) for k in before)
    assert not np.isfinite(float(metrics['grad_norm'].asnumpy()))
    for expected_scale in (512.0, 1024.0):  # two clean steps (window 2): the scale doubles after the second
        state, _ = optim.apply(state, grads, zero, one, zero, lr, pieces)
        assert float(state['counters'][1].asnumpy()) == expected_scale
    assert int(state['counters'][0].asnumpy()) == 2 and int(state['counters'][2].asnumpy()) == 0
    assert not np.array_equal(state['params'][0]['model.norm_out.weight'].asnumpy(),
                              params[0]['model.norm_out.weight'].asnumpy())


def test_fp16_training_on_cpu_with_loss_scaling(tmp_path, tiny_data):
    """From MindFormers' starting scale 2^32 fp16 gradients overflow: steps are skipped and the scale halves until
    they fit, then training proceeds."""
    cfg = tiny.get_config()
    cfg.model.compute_dtype = 'float16'
    cfg.data.train, cfg.data.eval = tiny_data[0], ''
    cfg.train.update(out_dir=str(tmp_path), total_steps=40, log_interval=1, ckpt_interval=1000,
                     loss_scale=2.0 ** 32, loss_scale_window=1000)
    records = train.train(cfg)
    scales = [r['loss_scale'] for r in records if 'loss' in r]
    losses = [r['loss'] for r in records if 'loss' in r]
    assert scales[0] < 2.0 ** 32 and scales == sorted(scales, reverse=True)
    assert all(math.isfinite(x) for x in losses)
    skipped = [r['skipped_steps'] for r in records if 'loss' in r]
    assert skipped[0] == [1] and 5 < sum(map(len, skipped)) < 30  # each halves the scale, from 2^32 to fp16's range
    assert losses[-1] < losses[0] - 0.5


@pytest.fixture(scope='module')
def tiny_mindrecord(tiny_data):
    return tiny_data[0]


def loadable(path):
    """Every tensor of a training checkpoint of the tiny preset, with its moments, read back and finite."""
    tensors, config, extra = convert.read_checkpoint(path)
    shapes = layout.param_shapes(layout.model_args(config))
    assert {k: v.shape for k, v in tensors.items() if not k.startswith('adam_')} == shapes
    assert all(f'adam_m.{k}' in tensors and f'adam_v.{k}' in tensors for k in shapes)
    return tensors


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, tiny_mindrecord):
    cfg = tiny.get_config()
    cfg.data.train, cfg.data.eval = tiny_mindrecord, ''
    cfg.train.update(out_dir=str(tmp_path), total_steps=100, lr=1e9, warmup_ratio=0.0, grad_clip=0.0,
                     log_interval=1, ckpt_interval=1, keep_checkpoints=100)
    with pytest.raises(train.RunError, match='lower the learning rate') as e:
        train.train(cfg)
    last_good = convert.list_checkpoints(str(tmp_path))[-1]
    assert last_good in str(e.value) and 'the first non-finite gradient (in backward order) is ' in str(e.value)
    assert all(np.isfinite(v).all() for v in loadable(last_good).values())


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, tiny_mindrecord, monkeypatch):
    cfg = tiny.get_config()
    cfg.data.train, cfg.data.eval = tiny_mindrecord, ''
    cfg.train.update(out_dir=str(tmp_path), total_steps=2, log_interval=1, ckpt_interval=1, keep_checkpoints=5)
    train.train(cfg)

    def crash(src, dst):
        raise KeyboardInterrupt('killed between writing and renaming')
    monkeypatch.setattr(convert.os, 'replace', crash)
    cfg.train.total_steps, cfg.resume = 3, True
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    assert [os.path.basename(p) for p in convert.list_checkpoints(str(tmp_path))] == \
        ['ckpt_00000001.ckpt', 'ckpt_00000002.ckpt']
    assert not any(n.endswith('.ckpt') and not convert.CHECKPOINT.fullmatch(n) for n in os.listdir(tmp_path))


def run_training_process(tmp_path, tiny_mindrecord, total_steps):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'train.py'), f'--config.data.train={tiny_mindrecord}',
         '--config.data.eval=', f'--config.train.out_dir={tmp_path}', f'--config.train.total_steps={total_steps}',
         '--config.train.ckpt_interval=1', '--config.train.keep_checkpoints=1000', '--config.train.log_interval=1'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoints(path, n, process, timeout=120):
    deadline = time.time() + timeout
    while len(convert.list_checkpoints(str(path))) < n:
        assert process.poll() is None and time.time() < deadline, process.stdout.read() if process.poll() else 'timeout'
        time.sleep(0.05)


def test_sigkill_while_saving_every_step_leaves_loadable_checkpoints(tmp_path, tiny_mindrecord):
    """A run killed while it saves every step leaves loadable checkpoints. While it ran, a second run on its out_dir
    was refused in one line naming it (the directory's lock); the lock died with the killed process."""
    process = run_training_process(tmp_path, tiny_mindrecord, 100000)
    wait_for_checkpoints(tmp_path, 3, process)
    with pytest.raises(SystemExit) as e:
        train.main(['train.py', f'--config.data.train={tiny_mindrecord}', '--config.data.eval=',
                    f'--config.train.out_dir={tmp_path}'])
    assert str(e.value.code).startswith(f'error: train.out_dir {tmp_path} is in use by another run (pid {process.pid} ')
    time.sleep(0.37)
    process.kill()
    process.wait()
    for path in convert.list_checkpoints(str(tmp_path)):
        loadable(path)
    lock, holder = util.lock_file(str(tmp_path / '.lock'))
    assert holder is None
    lock.close()


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_and_exits_cleanly(tmp_path, tiny_mindrecord, signum):
    """SIGTERM (a scheduler) or SIGINT (Ctrl-C) after the run's graphs have run, when MindSpore's own handler
    would turn SIGINT into SIGTERM: the run saves the step, says so and exits with 128 + that signal."""
    process = run_training_process(tmp_path, tiny_mindrecord, 100000)
    wait_for_checkpoints(tmp_path, 2, process)
    if signum == signal.SIGINT:
        out, _ = interrupted(process)
    else:
        process.send_signal(signum)
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, out  # saved, but not finished: a scheduler must see that
    assert 'stopped by a signal' in out
    last = convert.list_checkpoints(str(tmp_path))[-1]
    logged = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert int(convert.CHECKPOINT.fullmatch(os.path.basename(last)).group(1)) == logged[-1]['step']


def test_presets_carry_the_reference_recipes():
    """MindFormers' numbers (configs/llama/run_llama_{7b,13b,65b,7b_lora}.yaml, 2023, and its fine-tune recipe)."""
    import importlib
    get = {name: importlib.import_module(f'configs.{name}').get_config() for name in
           ('7b', '13b', '65b', '7b_finetune', '7b_lora')}
    for name in ('7b', '13b'):
        t = get[name].train
        assert (t.lr, t.lr_end, t.warmup_ratio, t.beta1, t.beta2, t.eps, t.grad_clip, t.epochs) == \
            (3e-4, 3e-5, 0.03, 0.9, 0.95, 1e-8, 1.0, 2)
    assert (get['7b'].train.batch_size, get['13b'].train.batch_size, get['65b'].train.batch_size) == (4, 2, 2)
    assert (get['65b'].train.lr, get['65b'].train.lr_end, get['65b'].model.norm_eps) == (1.5e-4, 1.5e-5, 1e-5)
    assert get['7b'].train.loss_scale == 2.0 ** 32
    # FP32StateAdamWeightDecay, the optimizer of every one of these yamls, has no bias correction
    assert not any(get[name].train.bias_correction for name in get)
    ft = get['7b_finetune']
    assert (ft.mode, ft.train.lr, ft.train.lr_end, ft.train.beta2) == ('finetune', 1e-5, 0.0, 0.999)
    lora = get['7b_lora']
    assert (lora.lora.rank, lora.lora.alpha, lora.lora.dropout, lora.lora.targets) == \
        (16, 16.0, 0.05, '.*wq|.*wk|.*wv|.*wo')
    assert (lora.train.lr, lora.train.lr_end, lora.train.batch_size, lora.train.epochs, lora.train.loss_scale) == \
        (1e-4, 0.0, 2, 1, 65536.0)


def test_lora_optimizer_state_is_under_one_percent_for_7b():
    import importlib
    cfg = importlib.import_module('configs.7b_lora').get_config()
    args = layout.model_args(cfg.model)
    lora = sum(math.prod(s) for s in layout.lora_shapes(args, cfg.lora.rank, cfg.lora.targets).values())
    assert lora == 32 * 4 * (16 * 4096 + 4096 * 16)
    assert lora / layout.count_params(args) < 0.01
