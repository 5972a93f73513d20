"""The model against independent truth: llama2.c's golden outputs for the real stories260K model, and the reference
sizes of LLaMA 7B/13B/65B."""
import os

import mindspore as ms
import numpy as np
import pytest

import llama
import sample
from conftest import ROOT, STORIES

ONCE_UPON_A_TIME = [1, 403, 407, 261, 378]  # BOS + encode('Once upon a time'), from the data README
GREEDY_40 = [int(x) for x in ('432 383 286 261 376 298 315 421 395 317 426 338 401 396 267 337 410 408 419 292 411 322 '
                              '265 282 295 433 426 385 328 432 358 394 261 370 432 352 266 268 388 426').split()]


@pytest.fixture(scope='module')
def forward_jit(stories260k):
    params, args = stories260k

    @ms.jit
    def fwd(p, tokens):
        return llama.forward(p, tokens, args)
    return lambda tokens: fwd(ms.mutable(params), ms.Tensor(np.asarray(tokens, np.int32))).asnumpy()


def test_golden_greedy_200_steps_from_bos(stories260k, tok512):
    """llama2.c's run.c, greedy from BOS for 200 steps, prints exactly this text."""
    params, args = stories260k
    out = sample.generate(params, args, [[tok512.bos_id]], max_new_tokens=200, temperature=0.0)[0]
    with open(os.path.join(STORIES, 'golden_greedy_200_steps.txt'), encoding='utf-8') as f:
        golden = f.read()
    assert tok512.decode(out) == golden


def test_once_upon_a_time(stories260k, tok512, forward_jit):
    assert [tok512.bos_id] + tok512.encode('Once upon a time') == ONCE_UPON_A_TIME
    logits = forward_jit([ONCE_UPON_A_TIME])[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert probs[tok512.sp.PieceToId(',')] == pytest.approx(0.9688, abs=5e-5)
    assert probs[tok512.sp.PieceToId('▁there')] == pytest.approx(0.0287, abs=5e-5)
    params, args = stories260k
    assert sample.generate(params, args, [ONCE_UPON_A_TIME], 40)[0] == GREEDY_40


def test_mean_nll_on_tinystories_sample(stories260k, tok512):
    """5 stories, BOS before each, 1,804 scored tokens: mean NLL 1.266441 (data README). One padded batch: padding
    is labelled ignore_id, so it is not scored."""
    params, args = stories260k
    with open(os.path.join(ROOT, 'tests', 'fixtures', 'tinystories_sample.txt'), encoding='utf-8') as f:
        stories = [s.strip() for s in f.read().split('<|endoftext|>') if s.strip()]
    rows = [tok512.encode(s, bos=True) for s in stories]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    labels = np.full((len(rows), width), args.ignore_id, np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = labels[i, :len(r)] = r
    loss, n = llama.loss_fn(params, ms.Tensor(ids), args, ms.Tensor(labels))  # eagerly: a second execution mode
    assert int(n.asnumpy()) == 1804
    assert float(loss.asnumpy()) == pytest.approx(1.266441, abs=1e-4)


def test_kv_cache_decoding_equals_full_forward(stories260k, forward_jit):
    """Prefill 7 tokens, then decode 9 one at a time: every step's logits equal the full forward's (GQA model)."""
    params, args = stories260k
    tokens = np.random.default_rng(0).integers(3, args.vocab_size, (2, 16)).astype(np.int32)
    full = forward_jit(tokens)
    step = sample.compiled_step(args)
    cache = ms.mutable(tuple(llama.empty_cache(args, 2, 64)))
    start = ms.Tensor(np.zeros(2, np.int32))
    last, cache = step(ms.mutable(params), None, ms.Tensor(tokens[:, :7]), cache, ms.Tensor(0, ms.int32), start)
    np.testing.assert_allclose(last.asnumpy(), full[:, 6], atol=2e-5)
    for pos in range(7, 16):
        last, cache = step(ms.mutable(params), None, ms.Tensor(tokens[:, pos:pos + 1]), ms.mutable(tuple(cache)),
                           ms.Tensor(pos, ms.int32), start)
        np.testing.assert_allclose(last.asnumpy(), full[:, pos], atol=2e-5)


def test_batched_generation_equals_each_prompt_alone(stories260k, tok512):
    params, args = stories260k
    prompts = [tok512.encode(p, bos=True) for p in
               ('Once upon a time', 'Tom had a dog', 'The sun was shining brightly over the big green hill and')]
    together = sample.generate(params, args, prompts, 30)
    alone = [sample.generate(params, args, [p], 30)[0] for p in prompts]
    assert together == alone
    assert len({len(p) for p in prompts}) == 3


def test_sampling_is_seeded_and_respects_top_k(stories260k):
    params, args = stories260k
    a = sample.generate(params, args, [[1]], 20, temperature=1.0, top_k=5, seed=3)
    b = sample.generate(params, args, [[1]], 20, temperature=1.0, top_k=5, seed=3)
    assert a == b


def test_choose_next_rules():
    """Sampling filters against hand-computed cases."""
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert sample.choose_next(logits, [[]], 0.0, 0, 1.0, 1.0, rng)[0] == 0
    draws = [sample.choose_next(logits, [[]], 1.0, 2, 1.0, 1.0, rng)[0] for _ in range(400)]
    assert set(draws) == {0, 1}  # top_k 2 keeps the two most likely
    draws = [sample.choose_next(logits, [[]], 1.0, 0, 0.7, 1.0, rng)[0] for _ in range(400)]
    assert set(draws) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is {0, 1}
    assert abs(np.mean(draws) - 0.3 / 0.8) < 0.08
    # repetition penalty 2 on a seen id: positive logits are divided, negative multiplied (HF's rule)
    logits = np.array([[2.0, 1.5, -1.0]])
    assert sample.choose_next(logits, [[0]], 0.0, 0, 1.0, 2.0, rng)[0] == 1


@pytest.mark.parametrize('dim,multiple_of,expected', [(4096, 256, 11008), (5120, 256, 13824), (8192, 256, 22016),
                                                      (64, 4, 172), (288, 32, 768)])
def test_ffn_rule(dim, multiple_of, expected):
    assert llama.ffn_hidden_size(dim, multiple_of) == expected


@pytest.mark.parametrize('preset,billions', [('3b', 3.43), ('7b', 6.74), ('13b', 13.02), ('65b', 65.29)])
def test_reference_parameter_counts(preset, billions):
    import importlib
    cfg = importlib.import_module(f'configs.{preset}').get_config()
    assert round(llama.count_params(llama.model_args(cfg.model)) / 1e9, 2) == billions


def test_stories260k_preset_matches_the_file(stories260k):
    from configs import stories260k as preset
    _, args = stories260k
    assert llama.model_args(preset.get_config().model) == args


def test_bad_model_configs_are_refused():
    with pytest.raises(ValueError, match='n_heads'):
        llama.model_args(dict(dim=64, n_layers=1, n_heads=6, vocab_size=8, max_seq_len=8))
    with pytest.raises(ValueError, match='n_kv_heads'):
        llama.model_args(dict(dim=64, n_layers=1, n_heads=8, n_kv_heads=3, vocab_size=8, max_seq_len=8))
