"""Generate text with a KV cache: prefill the prompts, then decode one token at a time.

    python sample.py                                   # a story from the bundled stories260K model
    python sample.py --prompt "Once upon a time" --temperature 0 --max_new_tokens 60
    python sample.py --ckpt out/tiny/ckpt_00000200.ckpt --prompt "The" --prompt "A"

`--max_new_tokens` counts generated tokens only (the prompt is not included). Prompts in a batch are left-padded
to one length; each row gets the same tokens it would get alone.
"""
import argparse
import os
import sys
import time
from typing import NamedTuple

import numpy as np

os.environ.setdefault('GLOG_v', '3')  # MindSpore's C++ warnings off, before it is imported
import mindspore as ms  # noqa: E402
from mindspore import ops  # noqa: E402

import convert  # noqa: E402
import data  # noqa: E402
import layout  # noqa: E402
import llama  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, 'assets', 'stories260K', 'stories260K.bin')
DEFAULT_TOKENIZER = os.path.join(HERE, 'assets', 'stories260K', 'tok512.model')
PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this, so prompts of similar length share one graph
CACHE_BUCKET = 64   # the cache length is rounded up to a multiple of this, for the same reason
TOKENS_PER_CALL = 4  # tokens decoded per call of the compiled step: the ~0.3 ms a call costs on CPU is shared...
UNROLLED_LAYERS = 32  # ...while the unrolled step holds at most this many layers (compile time grows with them)
FUSE_UP_TO = 250_000_000  # parameters: smaller models decode on a fused second copy of the weights (fewer kernels);
                          # larger ones are bound by reading their weights, not by kernels, and keep a single copy
CHECK_EVERY = 16     # decoding looks at the generated ids (a host round trip) only this often, to stop at EOS


class Sampling(NamedTuple):
    """How the next token is chosen. Closed over by the compiled step: another setting compiles another step."""
    temperature: float = 0.0         # 0 = greedy
    top_k: int = 0                   # 0 = off
    top_p: float = 1.0               # 1 = off
    repetition_penalty: float = 1.0  # 1 = off


def choose_next(logits, seen, u, sampling):
    """Next ids [B] (int32) from logits [B, V], inside the graph: Hugging Face's repetition penalty on the ids seen
    so far (seen [B, V] is 1 for them), then greedy, or temperature, top-k, top-p (the smallest set of most likely ids
    whose mass reaches it) and inverse-CDF sampling with u [B, 1] uniform in [0, 1)."""
    if sampling.repetition_penalty != 1.0:
        penalized = ops.select(logits > 0, logits / sampling.repetition_penalty, logits * sampling.repetition_penalty)
        logits = ops.select(seen > 0, penalized, logits)
    if sampling.temperature == 0:
        return ops.argmax(logits, -1).astype(ms.int32)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = ops.topk(logits, sampling.top_k)[0][:, -1:]
        logits = ops.select(logits < kth, ops.full(logits.shape, -np.inf, dtype=ms.float32), logits)
    probs = ops.softmax(logits, -1)
    if sampling.top_p < 1.0:
        sorted_probs, order = ops.sort(probs, -1, True)
        drop = (ops.cumsum(sorted_probs, -1) - sorted_probs >= sampling.top_p).astype(ms.float32)
        drop = ops.tensor_scatter_elements(ops.zeros_like(probs), order.astype(ms.int32), drop, 1)
        probs = probs * (1.0 - drop)
    cdf = ops.cumsum(probs, -1)
    chosen = (cdf < u * cdf[:, -1:]).astype(ms.int32).sum(-1)
    return ops.minimum(chosen, logits.shape[-1] - 1)


def tokens_per_call(args):
    """4 for small models (stories260K, stories15M), 1 from 17 layers on (3B, 7B, 13B, 65B)."""
    return max(1, min(TOKENS_PER_CALL, UNROLLED_LAYERS // args.n_layers))


class Generator:
    """A model ready to decode: its weights held as Parameters (fused for decoding when small) and the compiled
    steps it has built, one per batch size, cache length, sampling rule and tokens per call. Keep one per model:
    another generate() call with the same shapes reuses its steps."""

    def __init__(self, params, args, lora=None):
        self.args = args
        fuse = lora is None and layout.count_params(args) <= FUSE_UP_TO  # LoRA runs on the plain weights
        weights = llama.fuse_for_decoding(params, args) if fuse else params
        self.weights = llama.split_layers({k: ms.Parameter(v, name=k) for k, v in weights.items()}, args.n_layers)
        self.adapters = None if lora is None else \
            llama.split_layers({k: ms.Parameter(v, name=k) for k, v in lora.items()}, args.n_layers)[1]
        self.steps = {}

    def decoder(self, batch_size, cache_len, sampling, per_call=1):
        """(step, clear) for one batch size, cache length and sampling rule: step runs its tokens (a prompt, or the
        last chosen ids) through the model, chooses the next ids and feeds them back in, until it has chosen per_call
        of them (the loop is unrolled: compile time grows with it); clear() empties the cache for a new prompt.

        Only token ids, two positions, the seen-ids mask and a random-draw counter cross into the graph per call: the
        weights and the KV cache are Parameters (the cache written in place), and the chosen ids go straight back in
        without a host round trip."""
        key = (batch_size, cache_len, sampling, per_call)
        if key in self.steps:
            return self.steps[key]
        args, (rest, layers), adapters = self.args, self.weights, self.adapters
        cache = llama.empty_cache(args, batch_size, cache_len)

        @ms.jit
        def step(tokens, slot, start, seen, draw):
            chosen, logits = [], None
            for i in range(per_call):
                logits = llama.forward_cached(rest, layers, tokens, args, cache, slot, start, adapters)
                u = llama.hash_uniform((batch_size, 1), draw + i) if sampling.temperature else None  # greedy: none
                ids = choose_next(logits, seen, u, sampling).reshape(-1, 1)
                if sampling.repetition_penalty != 1.0:
                    seen = ops.tensor_scatter_elements(seen, ids, ops.ones((batch_size, 1), ms.float32), 1)
                chosen.append(ids)
                slot, tokens = slot + tokens.shape[1], ids
            return ops.concat(chosen, 1), chosen[-1], logits, seen

        @ms.jit
        def clear():
            return llama.clear_cache(cache)
        self.steps[key] = (step, clear)
        return self.steps[key]

    def generate(self, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0,
                 eos_id=None):
        """Token ids in, new token ids out: prompts is a list of id lists; returns a list of lists of generated ids.

        A row stops after eos_id (included in its output) or after max_new_tokens. The same seed gives the same
        samples. LoRA adapters given to the Generator are applied unmerged (args.lora_alpha sets their scale)."""
        args = self.args
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError('every prompt needs at least one token (e.g. BOS)')
        if longest + max_new_tokens > args.max_seq_len:
            raise ValueError(f'prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model\'s '
                             f'max_seq_len {args.max_seq_len}')
        B = len(prompts)
        width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
        per_call = tokens_per_call(args)
        calls = -(-max_new_tokens // per_call)
        cache_len = -(-(width + calls * per_call) // CACHE_BUCKET) * CACHE_BUCKET
        tokens = np.full((B, width), args.pad_id, np.int32)
        seen = np.zeros((B, args.vocab_size), np.float32)
        for b, p in enumerate(prompts):
            tokens[b, width - len(p):] = p
            seen[b, p] = 1.0
        start = ms.Tensor(np.array([width - len(p) for p in prompts], np.int32))
        step, clear = self.decoder(B, cache_len, Sampling(temperature, top_k, top_p, repetition_penalty), per_call)
        clear()

        def draw(i):  # the random-draw counter of token i (int32)
            return ms.Tensor((seed * 1_000_003 + i) % 2 ** 31, ms.int32)
        ids, last, _, seen = step(ms.Tensor(tokens), ms.Tensor(0, ms.int32), start, ms.Tensor(seen), draw(0))
        generated = [ids]
        for call in range(1, calls):
            done = per_call * call
            if eos_id is not None and done % CHECK_EVERY < per_call and \
                    (ops.concat(generated, 1).asnumpy() == eos_id).any(1).all():
                break
            # the last chosen id goes in at slot width + done - 1
            ids, last, _, seen = step(last, ms.Tensor(width + done - 1, ms.int32), start, seen, draw(done))
            generated.append(ids)
        out = []
        for row in ops.concat(generated, 1).asnumpy()[:, :max_new_tokens].tolist():
            end = row.index(eos_id) + 1 if eos_id in row else len(row)
            out.append(row[:end])
        return out


def generate(params, args, prompts, max_new_tokens, lora=None, **sampling):
    """Generator(params, args, lora).generate(prompts, max_new_tokens, **sampling), for one call: it compiles its
    steps anew (keep a Generator to reuse them)."""
    return Generator(params, args, lora).generate(prompts, max_new_tokens, **sampling)


def from_config(argv):
    """(flat params, args, mesh, load_checkpoint) of a train.py config and its --config.x=y overrides: with
    model_parallel > 1, this process's slices of the weights, split over the processes of an msrun / rank-table
    launch the way training splits them; whole otherwise."""
    import train
    cfg, _ = train.parse_config(['sample.py'] + argv)
    if cfg.parallel.pipeline_stage > 1:
        raise ValueError('sample.py splits a model over model_parallel only: add --config.parallel.pipeline_stage=1')
    if not cfg.load_checkpoint:
        raise ValueError(f'{argv[1]} names no load_checkpoint: add --config.load_checkpoint=<checkpoint>')
    cfg.lora.rank = 0  # decoding: adapters come from --lora
    setup = train.prepare(cfg)
    return llama.join_layers(*train.load_weights(cfg, setup)), setup.args, setup.mesh, train.resolve(
        cfg.load_checkpoint), train.resolve(cfg.data.tokenizer)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', default=DEFAULT_CKPT, help='any checkpoint convert.py reads')
    parser.add_argument('--config', help="a train.py config (and --config.x=y overrides): its load_checkpoint, "
                                         "tokenizer and model_parallel split (under msrun)")
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
    a, overrides = parser.parse_known_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    prompts, rank = list(a.prompt or []), 0
    try:
        if overrides and not (a.config and all(o.startswith('--config.') for o in overrides)):
            parser.error(f'unrecognized arguments: {" ".join(overrides)}')
        if a.prompt_file:
            with open(a.prompt_file, encoding='utf-8') as f:
                prompts += [line.rstrip('\n') for line in f if line.strip()]
        if a.config:
            params, args, mesh, a.ckpt, tokenizer_path = from_config(['--config', a.config] + overrides)
            a.tokenizer, rank = tokenizer_path or a.tokenizer, mesh.rank
        else:
            params, args, _ = convert.load_model(a.ckpt)
        tokenizer = data.Tokenizer(a.tokenizer)
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
        outs = Generator(params, args, lora).generate(ids, max_new, a.temperature, a.top_k, a.top_p,
                                                      a.repetition_penalty, seed, tokenizer.eos_id)
        elapsed = time.time() - t0
    except (OSError, ValueError, convert.ConvertError, data.DataError) as e:
        sys.exit(f'error: {e}')
    if rank == 0:  # tensor-parallel ranks decode the same tokens
        for prompt_ids, new_ids in zip(ids, outs):
            print(tokenizer.decode(prompt_ids + new_ids))
            print('-' * 40)
    n = sum(len(o) for o in outs)
    print(f'{n} tokens in {elapsed:.2f}s (including compilation), seed {seed}', file=sys.stderr)


if __name__ == '__main__':
    main()
