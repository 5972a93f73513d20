"""Frozen weights held in 16 bits (model.frozen_dtype, sample.py --dtype): widened where they are used, they give
what fp32 weights rounded to 16 bits first give; a checkpoint's own 16-bit dtype is kept as it is read."""
import argparse
import os

import mindspore as ms
import numpy as np
import pytest

import convert
import kernels
import checkpoint
import llama
import optim
import sample
import step
from conftest import STORIES
from configs import stories260k as stories_preset
from test_kernels import Only, decode, kernels_or_skip
from test_model import GREEDY_40, ONCE_UPON_A_TIME

DTYPES = {'float16': ms.float16, 'bfloat16': ms.bfloat16}


def held_and_rounded(params, dtype):
    """(params held in dtype, the same values widened back to float32 Tensors)."""
    held = {k: v.astype(DTYPES[dtype]) for k, v in params.items()}
    return held, {k: v.astype(ms.float32) for k, v in held.items()}


def full_forward(params, args, tokens):
    rest, layers = llama.split_layers(params, args.n_layers)

    @ms.jit
    def fwd(rest, layers, tokens):
        return llama.transformer(rest, layers, tokens, args, llama.sequence_context(*tokens.shape, args))[0]
    return fwd(ms.mutable(rest), ms.mutable(layers), ms.Tensor(tokens)).asnumpy()


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_16_bit_weights_give_the_logits_of_weights_rounded_first(stories260k, dtype):
    """A whole forward (24 rows: the matmuls widen each weight by a cast) with weights held in 16 bits equals, bit
    for bit, the forward of fp32 weights holding the same values: with MindSpore's ops and with the C++ kernels."""
    params, args = stories260k
    held, rounded = held_and_rounded(params, dtype)
    tokens = np.random.default_rng(0).integers(3, args.vocab_size, (2, 12)).astype(np.int32)
    for run_args in (args, args._replace(kernels=kernels.build(checkpoint.GRAPH_CACHE))):
        np.testing.assert_array_equal(full_forward(held, run_args, tokens), full_forward(rounded, run_args, tokens))
    assert not np.array_equal(full_forward(held, args, tokens), full_forward(params, args, tokens))  # it is rounded


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_decoding_reads_16_bit_weights_through_the_linear16_kernel(stories260k, dtype):
    """Decoding's few rows go through linear16, which widens the 16-bit weights as it reads them: its logits equal
    those of the rounded fp32 weights through MindSpore's matmul up to the order of the sums (and differ in the last
    bits, so the kernel ran); without kernels, bit for bit."""
    built = kernels_or_skip()
    params, args = stories260k
    held, rounded = held_and_rounded(params, dtype)
    tokens = np.random.default_rng(1).integers(3, args.vocab_size, (2, 10)).astype(np.int32)
    expected = decode(rounded, args, tokens, fuse=False)
    np.testing.assert_array_equal(decode(held, args, tokens, fuse=False), expected)
    with_kernel = decode(held, args._replace(kernels=Only(built, 'linear16')), tokens, fuse=False)
    np.testing.assert_allclose(with_kernel, expected, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(with_kernel, expected)


def test_lora_steps_on_a_16_bit_base_equal_a_rounded_fp32_base(stories260k):
    """Three LoRA steps with dropout, the frozen base held in float16, give the losses and adapters of the same
    steps on an fp32 base holding the float16 values, bit for bit: the base is only ever widened."""
    params, args = stories260k
    cfg = stories_preset.get_config()
    cfg.lora.update(rank=4, alpha=8.0, dropout=0.1, targets='.*wq|.*wv')
    setup = step.prepare(cfg)
    held, rounded = held_and_rounded(params, 'float16')
    ids = np.random.default_rng(0).integers(3, 512, (2, 33)).astype(np.int32)
    results = []
    for base in (held, rounded):
        lora = llama.init_lora(setup.args, 4, '.*wq|.*wv', seed=0)
        state, losses = optim.init_state(({}, llama.split_layers(lora, args.n_layers)[1])), []
        for i in range(3):
            state, metrics = step.train_step(state, llama.split_layers(base, args.n_layers), [(ids,)], 1e-2, i, setup)
            losses.append(metrics['loss'].asnumpy())
        results.append((losses, {k: v.asnumpy() for k, v in llama.join_layers(*state['params']).items()}))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for k in results[0][1]:
        np.testing.assert_array_equal(results[0][1][k], results[1][1][k], err_msg=k)


@pytest.mark.parametrize('dtype', ['fp16', 'bf16'])
def test_sample_holds_a_16_bit_checkpoint_in_its_own_dtype(tmp_path, dtype, tok512):
    """sample.py on a float16 or bfloat16 Hugging Face export of stories260K holds every weight in that dtype
    (--dtype '', the default) and decodes llama2.c's greedy tokens; --dtype float32 widens them once, at load."""
    export = str(tmp_path / dtype)
    convert.main(['--input', os.path.join(STORIES, 'stories260K.bin'), '--output', export, '--dtype', dtype])
    expected = {'fp16': ms.float16, 'bf16': ms.bfloat16}[dtype]
    a = argparse.Namespace(config=None, ckpt=export, tokenizer=os.path.join(STORIES, 'tok512.model'), lora=None,
                           dtype='')
    gen = sample.load(a, [])[0]
    assert {t.dtype for t in gen.weights} == {expected}
    assert gen.generate([ONCE_UPON_A_TIME], 40, temperature=0.0)[0] == GREEDY_40
    a.dtype = 'float32'
    assert {t.dtype for t in sample.load(a, [])[0].weights} == {ms.float32}
