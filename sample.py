"""Generate text with a KV cache: prefill the prompts, then decode one token at a time.

    python sample.py                                   # a story from the bundled stories260K model
    python sample.py --prompt "Once upon a time" --temperature 0 --max_new_tokens 60
    python sample.py --ckpt out/tiny/ckpt_00000200.ckpt --prompt "The" --prompt "A"

`--max_new_tokens` counts generated tokens only (the prompt is not included). Prompts in a batch are left-padded
to one length; each row gets the same tokens it would get alone.
"""
import argparse
import functools
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, 'assets', 'stories260K', 'stories260K.bin')
DEFAULT_TOKENIZER = os.path.join(HERE, 'assets', 'stories260K', 'tok512.model')
PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this, so prompts of similar length share one graph
CACHE_BUCKET = 64   # the cache length is rounded up to a multiple of this, for the same reason


@functools.cache
def compiled_step(args):
    """The jitted prefill/decode step for one model shape (one graph per input shape, shared by all calls)."""
    import mindspore as ms
    import llama

    @ms.jit
    def step(params, lora, tokens, cache, slot, start):
        logits, cache = llama.forward_cached(params, tokens, args, cache, slot, start, lora)
        return logits[:, -1], cache
    return step


def choose_next(logits, history, temperature, top_k, top_p, repetition_penalty, rng):
    """Next ids [B] from logits [B, V] (numpy). temperature 0 is greedy; history is each row's ids so far."""
    logits = logits.astype(np.float64)
    if repetition_penalty != 1.0:  # Hugging Face's rule: shrink the logit of every id already present
        for row, ids in zip(logits, history):
            seen = np.unique(ids)
            row[seen] = np.where(row[seen] > 0, row[seen] / repetition_penalty, row[seen] * repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = np.sort(logits, -1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:  # keep the smallest set of most likely ids whose mass reaches top_p
        order = np.argsort(-probs, -1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        drop = np.zeros(probs.shape, bool)
        np.put_along_axis(drop, order, np.cumsum(sorted_probs, -1) - sorted_probs >= top_p, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    cdf = np.cumsum(probs, -1)
    u = rng.random((len(probs), 1)) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(-1), probs.shape[-1] - 1)


def generate(params, args, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
             seed=0, eos_id=None, lora=None):
    """Token ids in, new token ids out: prompts is a list of id lists; returns a list of lists of generated ids.

    A row stops after eos_id (included in its output) or after max_new_tokens. lora: LoRA adapter tensors, applied
    unmerged on top of params (args.lora_alpha sets their scale)."""
    import mindspore as ms
    import llama
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError('every prompt needs at least one token (e.g. BOS)')
    if longest + max_new_tokens > args.max_seq_len:
        raise ValueError(f'prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model\'s '
                         f'max_seq_len {args.max_seq_len}')
    B = len(prompts)
    width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    cache_len = -(-(width + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    tokens = np.full((B, width), args.pad_id, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = p
    start = ms.Tensor(np.array([width - len(p) for p in prompts], np.int32))
    step, params, lora = compiled_step(args), ms.mutable(params), None if lora is None else ms.mutable(lora)
    cache = ms.mutable(tuple(llama.empty_cache(args, B, cache_len)))
    rng = np.random.default_rng(seed)
    history = [list(p) for p in prompts]
    out, done = [[] for _ in prompts], np.zeros(B, bool)
    logits, cache = step(params, lora, ms.Tensor(tokens), cache, ms.Tensor(0, ms.int32), start)
    for i in range(max_new_tokens):
        next_ids = choose_next(logits.asnumpy(), history, temperature, top_k, top_p, repetition_penalty, rng)
        for b in np.flatnonzero(~done):
            out[b].append(int(next_ids[b]))
            history[b].append(int(next_ids[b]))
            done[b] = eos_id is not None and next_ids[b] == eos_id
        if done.all() or i == max_new_tokens - 1:
            break
        logits, cache = step(params, lora, ms.Tensor(next_ids.astype(np.int32).reshape(B, 1)),
                             ms.mutable(tuple(cache)), ms.Tensor(width + i, ms.int32), start)
    return out


def use_config(a):
    """Take the checkpoint and tokenizer of a train.py config file, and split the model over the processes of an
    msrun / rank-table launch the way training does (llama.SHARDING) when its model_parallel is above 1."""
    import importlib.util
    import llama
    import train
    spec = importlib.util.spec_from_file_location('run_config', a.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    a.ckpt = train.resolve(cfg.load_checkpoint) or a.ckpt
    a.tokenizer = train.resolve(cfg.data.tokenizer) or a.tokenizer
    if cfg.parallel.model_parallel > 1:
        _, world = train.init_distributed()
        parallel = llama.ParallelArgs(**{k: v for k, v in cfg.parallel.items() if k in llama.ParallelArgs._fields})
        llama.enable_semi_auto(parallel._replace(data_parallel=world // parallel.model_parallel), world)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', default=DEFAULT_CKPT, help='any checkpoint convert.py reads')
    parser.add_argument('--config', help="a train.py config: its load_checkpoint, tokenizer and parallel split")
    parser.add_argument('--lora', help='a LoRA adapter (from train.py) to apply on top of --ckpt')
    parser.add_argument('--tokenizer', default=DEFAULT_TOKENIZER, help='sentencepiece .model')
    parser.add_argument('--prompt', action='append', help='repeat for a batch (default: an empty prompt)')
    parser.add_argument('--prompt_file', help='a file with one prompt per line, for a batch')
    parser.add_argument('--max_new_tokens', type=int, default=256, help='generated tokens, not counting the prompt')
    parser.add_argument('--temperature', type=float, default=1.0, help='0 = greedy')
    parser.add_argument('--top_k', type=int, default=0, help='0 = off')
    parser.add_argument('--top_p', type=float, default=0.9, help='1 = off')
    parser.add_argument('--repetition_penalty', type=float, default=1.0, help='1 = off')
    parser.add_argument('--seed', type=int, default=None, help='default: a random seed, printed')
    a = parser.parse_args(argv)
    os.environ.setdefault('GLOG_v', '3')
    import mindspore as ms
    import convert
    import data
    ms.set_context(mode=ms.GRAPH_MODE)
    prompts = list(a.prompt or [])
    try:
        if a.config:
            use_config(a)
        if a.prompt_file:
            with open(a.prompt_file, encoding='utf-8') as f:
                prompts += [line.rstrip('\n') for line in f if line.strip()]
        tokenizer = data.Tokenizer(a.tokenizer)
        params, args, _ = convert.load_model(a.ckpt)
        lora = None
        if a.lora:
            lora, args = convert.load_adapter(a.lora, args)
        if tokenizer.vocab_size > args.vocab_size:
            raise ValueError(f'the tokenizer {a.tokenizer} has {tokenizer.vocab_size} pieces but the model only '
                             f'{args.vocab_size}: pass the tokenizer the model was trained with (--tokenizer)')
        ids = [tokenizer.encode(p, bos=True) for p in (prompts or [''])]
        max_new = min(a.max_new_tokens, args.max_seq_len - max(len(p) for p in ids))
        seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), 'little')
        t0 = time.time()
        outs = generate(params, args, ids, max_new, a.temperature, a.top_k, a.top_p, a.repetition_penalty, seed,
                        tokenizer.eos_id, lora)
        elapsed = time.time() - t0
    except (OSError, ValueError, convert.ConvertError, data.DataError) as e:
        sys.exit(f'error: {e}')
    except RuntimeError as e:  # MindSpore 2.10 compiles semi-auto parallel only on Ascend/GPU
        if ms.get_auto_parallel_context('parallel_mode') != 'semi_auto_parallel' or \
                ms.get_context('device_target') != 'CPU':
            raise
        sys.exit(f'error: MindSpore compiles model_parallel > 1 only on Ascend or GPU: {str(e).splitlines()[0]}')
    for prompt_ids, new_ids in zip(ids, outs):
        print(tokenizer.decode(prompt_ids + new_ids))
        print('-' * 40)
    n = sum(len(o) for o in outs)
    print(f'{n} tokens in {elapsed:.2f}s (including compilation), seed {seed}', file=sys.stderr)


if __name__ == '__main__':
    main()
