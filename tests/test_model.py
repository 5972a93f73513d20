"""The model against independent truth: llama2.c's golden outputs for the real stories260K model, and the reference
sizes of LLaMA 7B/13B/65B."""
import os

import mindspore as ms
import numpy as np
import pytest

import layout
import llama
import sample
from conftest import ROOT, STORIES

ONCE_UPON_A_TIME = [1, 403, 407, 261, 378]  # BOS + encode('Once upon a time'), from the data README
GREEDY_40 = [int(x) for x in ('432 383 286 261 376 298 315 421 395 317 426 338 401 396 267 337 410 408 419 292 411 322 '
                              '265 282 295 433 426 385 328 432 358 394 261 370 432 352 266 268 388 426').split()]


@pytest.fixture(scope='module')
def forward_jit(stories260k):
    """The full forward as one compiled graph (of llama.split_layers' parts, as the training step takes them)."""
    params, args = stories260k
    rest, layers = llama.split_layers(params, args.n_layers)

    @ms.jit
    def fwd(rest, layers, tokens):
        return llama.transformer(rest, layers, tokens, args, llama.sequence_context(*tokens.shape, args))[0]
    return lambda tokens: fwd(ms.mutable(rest), ms.mutable(layers), ms.Tensor(np.asarray(tokens, np.int32))).asnumpy()


def test_golden_greedy_200_steps_from_bos(gen, tok512):
    """llama2.c's run.c, greedy from BOS for 200 steps, prints exactly this text."""
    out = gen.generate([[tok512.bos_id]], max_new_tokens=200, temperature=0.0)[0]
    with open(os.path.join(STORIES, 'golden_greedy_200_steps.txt'), encoding='utf-8') as f:
        golden = f.read()
    assert tok512.decode(out) == golden


def test_once_upon_a_time(gen, tok512, forward_jit):
    assert [tok512.bos_id] + tok512.encode('Once upon a time') == ONCE_UPON_A_TIME
    logits = forward_jit([ONCE_UPON_A_TIME])[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert probs[tok512.sp.PieceToId(',')] == pytest.approx(0.9688, abs=5e-5)
    assert probs[tok512.sp.PieceToId('▁there')] == pytest.approx(0.0287, abs=5e-5)
    assert gen.generate([ONCE_UPON_A_TIME], 40)[0] == GREEDY_40


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


def test_kv_cache_decoding_equals_full_forward(stories260k, gen, forward_jit):
    """Prefill 7 tokens, then decode 9 one at a time (teacher-forced) through the in-place cache: every step's logits
    equal the full forward's (GQA model)."""
    params, args = stories260k
    tokens = np.random.default_rng(0).integers(3, args.vocab_size, (2, 16)).astype(np.int32)
    full = forward_jit(tokens)
    step, clear = gen.decoder(2, 64, sample.Sampling(), 1)
    clear()
    start, draw = ms.Tensor(np.zeros(2, np.int32)), ms.Tensor(0, ms.int32)
    seen = ms.Tensor(np.zeros((2, args.vocab_size), np.float32))
    _, _, last, _ = step(ms.Tensor(tokens[:, :7]), ms.Tensor(0, ms.int32), start, seen, draw)
    np.testing.assert_allclose(last.asnumpy(), full[:, 6], atol=2e-5)
    for pos in range(7, 16):
        _, _, last, _ = step(ms.Tensor(tokens[:, pos:pos + 1]), ms.Tensor(pos, ms.int32), start, seen, draw)
        np.testing.assert_allclose(last.asnumpy(), full[:, pos], atol=2e-5)


def test_decoding_with_lora_equals_the_merged_model(stories260k, gen):
    """Unmerged LoRA in the cached decoder against the same adapter merged by hand (W + B·A·alpha/rank, numpy) and
    decoded through the fused weights: the same greedy tokens, and not those of the base model."""
    params, args = stories260k
    lora_args = args._replace(lora_alpha=8.0)
    lora = llama.init_lora(lora_args, 4, '.*wq|.*w2', seed=1)
    rng = np.random.default_rng(2)
    lora = {k: ms.Tensor(rng.standard_normal(v.shape).astype(np.float32) * 0.3) if k.endswith(layout.LORA_B) else v
            for k, v in lora.items()}
    merged = dict(params)
    for name in (k[:-len(layout.LORA_A)] for k in lora if k.endswith(layout.LORA_A)):
        delta = lora[name + layout.LORA_B].asnumpy() @ lora[name + layout.LORA_A].asnumpy() * (8.0 / 4)
        merged[name + '.weight'] = ms.Tensor(params[name + '.weight'].asnumpy() + delta)
    prompt = [ONCE_UPON_A_TIME]
    adapted = sample.generate(params, lora_args, prompt, 30, lora=lora)
    assert adapted == sample.generate(merged, args, prompt, 30)
    assert adapted != gen.generate(prompt, 30)  # the base model (the shared Generator's compiled steps)


def test_unfused_decoding_keeps_the_golden_tokens(stories260k, monkeypatch):
    """Models above sample.FUSE_UP_TO decode on their plain weights: llama2.c's greedy ids all the same."""
    params, args = stories260k
    monkeypatch.setattr(sample, 'FUSE_UP_TO', 0)
    assert sample.generate(params, args, [ONCE_UPON_A_TIME], 40)[0] == GREEDY_40


def test_tokens_per_call_and_the_end_of_the_context(stories260k, monkeypatch):
    """Four tokens per compiled call give the tokens of one per call, also when prompt + new tokens fill max_seq_len
    exactly and max_new_tokens is not a multiple of four (the last call runs past the context and is trimmed)."""
    params, args = stories260k
    prompt = [1] + list(np.random.default_rng(5).integers(3, args.vocab_size, args.max_seq_len - 11))
    outs = {}
    for n in (1, 4):
        monkeypatch.setattr(sample, 'TOKENS_PER_CALL', n)
        outs[n] = sample.generate(params, args, [prompt], 10)
    assert len(outs[4][0]) == 10 and outs[4] == outs[1]


def test_batched_generation_equals_each_prompt_alone(gen, tok512):
    prompts = [tok512.encode(p, bos=True) for p in
               ('Once upon a time', 'Tom had a dog', 'The sun was shining brightly over the big green hill and')]
    together = gen.generate(prompts, 30)
    alone = [gen.generate([p], 30)[0] for p in prompts]
    assert together == alone
    assert len({len(p) for p in prompts}) == 3


def test_sampling_is_seeded(gen):
    a = gen.generate([[1]], 20, temperature=1.0, top_k=5, seed=3)
    assert a == gen.generate([[1]], 20, temperature=1.0, top_k=5, seed=3)
    assert a != gen.generate([[1]], 20, temperature=1.0, top_k=5, seed=4)


def test_new_lengths_and_sampling_values_compile_nothing(gen):
    """Within the prompt and cache buckets, another prompt length, max_new_tokens, temperature, top-k or top-p runs
    on the graphs already compiled (MindSpore's record of the graphs it compiled does not grow); the sampled rows
    still follow their settings (top-k 1 is greedy)."""
    from mindspore.graph import api
    greedy = gen.generate([[1, 403, 407]], 44)[0]
    gen.generate([[1, 9]], 30, temperature=0.8, top_k=5, seed=1)
    compiled = len(api.ms_compile_cache)
    for prompt, new, sampling in (([1] * 9, 40, dict(temperature=1.3, top_p=0.8)), ([1, 403, 407], 44, dict(
            temperature=0.5, top_k=1)), ([1] * 16, 12, dict(temperature=2.0, top_k=0, top_p=1.0))):
        out = gen.generate([prompt], new, seed=2, **sampling)[0]
        assert len(out) == new and (sampling.get('top_k') != 1 or out == greedy)
    assert len(api.ms_compile_cache) == compiled


@pytest.mark.parametrize('rule,u,expected', [
    (sample.Sampling(), 0.5, 0),                                       # greedy
    (sample.Sampling(1.0), 0.45, 0), (sample.Sampling(1.0), 0.55, 1),  # cdf 0.5, 0.8, 0.95, 1
    (sample.Sampling(1.0), 0.96, 3),
    (sample.Sampling(1.0, top_k=2), 0.6, 0),                           # top-2 renormalised: cdf 0.625, 1
    (sample.Sampling(1.0, top_k=2), 0.7, 1), (sample.Sampling(1.0, top_k=2), 0.999, 1),
    (sample.Sampling(1.0, top_p=0.7), 0.999, 1),                       # 0.5 < 0.7 <= 0.5 + 0.3: nucleus {0, 1}
    (sample.Sampling(1.0, top_p=0.7), 0.6, 0),
    (sample.Sampling(1.0, top_p=0.4), 0.999, 0),                       # the most likely id alone reaches 0.4
])
def test_choose_next_rules_by_hand(rule, u, expected):
    logits = ms.Tensor(np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)))
    chosen = sample.choose_next(logits, ms.Tensor(np.zeros((1, 4), np.float32)), ms.Tensor([[u]], ms.float32),
                                rule.kind(), rule.knobs(4))
    assert int(chosen.asnumpy()[0]) == expected


def test_repetition_penalty_by_hand():
    """Hugging Face's rule with penalty 2: seen id 0's 2.0 is divided to 1.0, so id 1 (1.5) wins; seen negative
    logits are multiplied."""
    logits = ms.Tensor(np.array([[2.0, 1.5, -1.0]], np.float32))
    rule = sample.Sampling(repetition_penalty=2.0)
    seen = ms.Tensor(np.array([[1.0, 0.0, 0.0]], np.float32))
    assert int(sample.choose_next(logits, seen, ms.Tensor([[0.5]]), rule.kind(), rule.knobs(3)).asnumpy()[0]) == 1
    seen = ms.Tensor(np.array([[0.0, 1.0, 1.0]], np.float32))
    assert int(sample.choose_next(logits, seen, ms.Tensor([[0.5]]), rule.kind(), rule.knobs(3)).asnumpy()[0]) == 0


@pytest.mark.parametrize('dim,multiple_of,expected', [(4096, 256, 11008), (5120, 256, 13824), (8192, 256, 22016),
                                                      (64, 4, 172), (288, 32, 768)])
def test_ffn_rule(dim, multiple_of, expected):
    assert layout.ffn_hidden_size(dim, multiple_of) == expected


@pytest.mark.parametrize('preset,billions', [('3b', 3.43), ('7b', 6.74), ('13b', 13.02), ('65b', 65.29)])
def test_reference_parameter_counts(preset, billions):
    import importlib
    cfg = importlib.import_module(f'configs.{preset}').get_config()
    assert round(layout.count_params(layout.model_args(cfg.model)) / 1e9, 2) == billions


def test_stories260k_preset_matches_the_file(stories260k):
    from configs import stories260k as preset
    _, args = stories260k
    assert layout.model_args(preset.get_config().model) == args


def test_bad_model_configs_are_refused():
    with pytest.raises(ValueError, match='n_heads'):
        layout.model_args(dict(dim=64, n_layers=1, n_heads=6, vocab_size=8, max_seq_len=8))
    with pytest.raises(ValueError, match='n_kv_heads'):
        layout.model_args(dict(dim=64, n_layers=1, n_heads=8, n_kv_heads=3, vocab_size=8, max_seq_len=8))
