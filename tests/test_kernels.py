"""The C++ kernels (kernels.cc) compute what the MindSpore ops they replace compute, and are off, with a note, where
they cannot be built."""
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

import checkpoint
import kernels
import layout
import llama
import optim
import step
from conftest import ROOT, setup_of


def kernels_or_skip():
    """The Kernels built here, or a skip."""
    built = kernels.build(checkpoint.GRAPH_CACHE)
    if built is None:
        pytest.skip('the C++ kernels could not be built here (no C++ compiler?); the MindSpore ops are tested')
    return built


def lambda_free_adamw(p, m, v, grads, lr, step, opt, grad_scale=1.0):
    scalars = optim.adam_scalars(lr, step, ms.Tensor(grad_scale), opt)
    return optim.update(p, m, v, grads, scalars, ms.Tensor(True), opt, {})


@pytest.mark.parametrize('weight_decay,bias_correction', [(0.1, True), (0.0, False)])
def test_fused_adamw_equals_the_elementwise_ops_bit_for_bit(weight_decay, bias_correction):
    """adamw.cc computes update's elementwise ops in their order, so three steps give the same bits: on tensors
    split over threads (70,001 and 301,000 floats, odd sizes) and not, with and without weight decay (a norm
    weight never has it) and with a gradient scale (clipping) folded into the moments' rates."""
    built = kernels_or_skip()
    shapes = {'attention.wq.weight': (3, 4), 'attention_norm.weight': (4,), layout.EMBEDDING: (1000, 301),
              'feed_forward.w1.weight': (70001,)}
    rng = np.random.default_rng(0)
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
    results = []
    for fused in (False, True):
        opt = optim.OptimizerArgs(0.9, 0.95, 1e-8, weight_decay, bias_correction, 0.0, kernels=built if fused else None)
        p = {k: ms.Tensor(x) for k, x in start.items()}
        m, v = ({k: ms.Tensor(np.zeros_like(x)) for k, x in start.items()} for _ in range(2))
        for t, g in enumerate(grads, 1):
            p, m, v = ms.jit(lambda_free_adamw)(ms.mutable(p), ms.mutable(m), ms.mutable(v),
                                                ms.mutable({k: ms.Tensor(x) for k, x in g.items()}), ms.Tensor(0.01),
                                                ms.Tensor(t, ms.int32), opt, 0.37)
        results.append({f'{kind}.{k}': x.asnumpy() for kind, d in zip('pmv', (p, m, v)) for k, x in d.items()})
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        np.testing.assert_array_equal(results[1][k], results[0][k], err_msg=k)
    assert not np.array_equal(results[1]['p.' + layout.EMBEDDING], start[layout.EMBEDDING])


def test_kernels_off_with_a_note_when_they_cannot_be_built(tmp_path, monkeypatch, capsys):
    """No compiler, a failing one, or a file in the cache that is not a library: the MindSpore ops run, one note
    says why, and no partial file is left behind."""
    root = str(tmp_path)
    for compiler in (str(tmp_path / 'no-such-compiler'), 'false'):
        monkeypatch.setenv('CXX', compiler)
        assert kernels.build.__wrapped__(root) is None
        assert 'note: C++ kernels off' in capsys.readouterr().err and os.listdir(tmp_path) == []
    monkeypatch.delenv('CXX')
    with open(kernels.library(root), 'wb') as f:  # what a cache written by something else could hold
        f.write(b'not a shared library')
    assert kernels.build.__wrapped__(root) is None
    assert 'note: C++ kernels off' in capsys.readouterr().err
    os.remove(kernels.library(root))
    built = kernels.build.__wrapped__(root)
    assert built.adamw is not None and built.rms_norm is not None
    assert os.listdir(tmp_path) == [os.path.basename(kernels.library(root))]


def test_rms_norm_kernel_is_run_c_rmsnorm():
    """RMS_NORM sums the squares in order in fp32, as llama2.c's run.c does (numpy's own sum is pairwise), and
    equals llama.rms_norm's MindSpore ops up to that order."""
    built = kernels_or_skip()
    x = np.random.default_rng(0).standard_normal((3, 5, 288)).astype(np.float32) * 3
    got = built.rms_norm(ms.Tensor(x), ms.Tensor([1e-5], ms.float32)).asnumpy()
    for row, out in zip(x.reshape(-1, 288), got.reshape(-1, 288)):
        squares = np.float32(0)
        for value in row:
            squares = np.float32(squares + value * value)
        np.testing.assert_array_equal(out, row * (np.float32(1) / np.sqrt(squares / np.float32(288) +
                                                                          np.float32(1e-5))))
    np.testing.assert_allclose(got, llama.rms_norm(ms.Tensor(x), ms.Tensor(np.ones(288, np.float32)), 1e-5).asnumpy(),
                               rtol=1e-6, atol=1e-6)


class Only:
    """Some of a Kernels' ops (the others None, so the model's ops for them run)."""

    def __init__(self, built, *names):
        for name in ('adamw', 'rms_norm', 'rms_norm_weighted', 'qkv_rope', 'softmax', 'linear16'):
            setattr(self, name, getattr(built, name) if name in names else None)


def test_decoding_with_the_kernels_equals_decoding_with_mindspores_ops(stories260k):
    """stories260K (GQA) decoded through the cache, a 7-token prefill then 3 steps: qkv_rope gives the same logits,
    bit for bit, as the splits, rotation and transposes it replaces; rms_norm the same up to its summation order."""
    built = kernels_or_skip()
    params, args = stories260k
    tokens = np.random.default_rng(0).integers(3, args.vocab_size, (2, 10)).astype(np.int32)
    with_kernels = decode(params, args._replace(kernels=built), tokens)
    np.testing.assert_array_equal(decode(params, args._replace(kernels=Only(built, 'rms_norm')), tokens), with_kernels)
    without = decode(params, args, tokens)
    np.testing.assert_allclose(without, with_kernels, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(without, with_kernels)  # the kernel ran: its sum's order shows in the last bits


def decode(params, args, tokens, fuse=True):
    """The logits of each position after the prefill of 7 tokens, then one token at a time (a step's few rows),
    traced afresh (with the kernels args give); fuse: on the weights fused for decoding, as sample.py runs them."""
    rest, layers = llama.split_layers(llama.fuse_for_decoding(params, args) if fuse else params, args.n_layers)
    cache = llama.empty_cache(args, tokens.shape[0], 16)
    start = ms.Tensor(np.zeros(tokens.shape[0], np.int32))

    def run(rest, layers, tokens, slot):
        return llama.forward_cached(rest, layers, tokens, args, cache, slot, start)
    step = ms.jit(run)
    logits = [step(ms.mutable(rest), ms.mutable(layers), ms.Tensor(tokens[:, :7]), ms.Tensor(0, ms.int32))]
    for slot in range(7, tokens.shape[1]):
        logits.append(step(ms.mutable(rest), ms.mutable(layers), ms.Tensor(tokens[:, slot:slot + 1]),
                           ms.Tensor(slot, ms.int32)))
    return np.stack([x.asnumpy() for x in logits])


def test_softmax_gradient_kernel_equals_mindspores():
    """SOFTMAX's forward is ops.softmax; its gradient (the kernel, rows of odd width split over threads) equals
    MindSpore's own up to the order of its row sum."""
    built = kernels_or_skip()
    rng = np.random.default_rng(2)
    x, weights = (ms.Tensor(rng.standard_normal((4, 3, 700, 37)).astype(np.float32) * 3) for _ in range(2))

    def mindspores(x):
        return (ms.ops.softmax(x, -1) * weights).sum()

    def kernels_(x):
        return (built.softmax(x) * weights).sum()
    expected = ms.grad(mindspores)(x).asnumpy()
    np.testing.assert_allclose(ms.grad(kernels_)(x).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(built.softmax(x).asnumpy(), ms.ops.softmax(x, -1).asnumpy())


def test_rms_norm_with_weight_and_its_gradient_equal_mindspores():
    """RMS_NORM_WEIGHTED (training's norms) and its gradients for x and the weight, from rows split over threads
    in blocks, equal llama.rms_norm's MindSpore ops up to summation order."""
    built = kernels_or_skip()
    rng = np.random.default_rng(3)
    x, dy = (ms.Tensor(rng.standard_normal((3, 700, 96)).astype(np.float32) * 2) for _ in range(2))
    weight = ms.Tensor(rng.standard_normal(96).astype(np.float32))

    def values(kernel_ops):
        def loss(x, weight):
            return (llama.rms_norm(x, weight, 1e-5, kernel_ops) * dy).sum()
        return [loss(x, weight).asnumpy()] + [g.asnumpy() for g in ms.grad(loss, grad_position=(0, 1))(x, weight)]
    with_kernels, ops_only = values(built), values(None)
    for got, expected in zip(with_kernels, ops_only):
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    assert not np.array_equal(with_kernels[1], ops_only[1])  # the kernel ran


ONE_STEP = """import sys
sys.path[:0] = [{root!r}, {tests!r}]
import numpy as np
from test_kernels import one_step
np.save({out!r}, one_step(cpu_kernels=False))
"""


def one_step(cpu_kernels):
    """A tiny-preset train step from fixed weights and tokens: the loss, then every new weight, flattened."""
    setup = setup_of(cpu_kernels=cpu_kernels)
    params = llama.split_layers(llama.init_params(setup.args, 0), setup.args.n_layers)
    rows = np.random.default_rng(0).integers(3, setup.args.vocab_size, (2, 33)).astype(np.int32)
    state, metrics = step.train_step(optim.init_state(params), None, [(rows,)], 1e-3, 0, setup)
    rest, layers = state['params']
    return np.concatenate([metrics['loss'].asnumpy().reshape(1)] +
                          [v.asnumpy().ravel() for group in [rest] + layers for v in group.values()])


def test_cpu_kernels_off_after_a_build_means_mindspores_ops(tmp_path):
    """train.cpu_kernels=False in a process that has built the kernels: the model and the optimizer are given none,
    and a train step is bit for bit that of a fresh process that never built them; with the kernels it is not (their
    sums run in another order), so the comparison can tell."""
    built = kernels_or_skip()
    off = setup_of(cpu_kernels=False)
    assert off.args.kernels is None and off.opt.kernels is None
    assert setup_of(cpu_kernels=True).args.kernels is built
    script = tmp_path / 'one_step.py'
    script.write_text(ONE_STEP.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), out=str(tmp_path / 'fresh.npy')))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    fresh = np.load(tmp_path / 'fresh.npy')
    np.testing.assert_array_equal(one_step(cpu_kernels=False), fresh)
    assert not np.array_equal(one_step(cpu_kernels=True), fresh)
