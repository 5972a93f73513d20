"""Generate text with a KV cache: prefill the prompts, then decode one token at a time.

    python sample.py                                   # a story from the bundled stories260K model
    python sample.py --prompt "Once upon a time" --temperature 0 --max_new_tokens 60
    python sample.py --ckpt out/tiny/ckpt_00000200.ckpt --prompt "The" --prompt "A"
    python sample.py --chat --ckpt out/alpaca/ckpt_00000200.ckpt   # a conversation, one message a line from stdin

`--max_new_tokens` counts generated tokens only (the prompt is not included). Prompts in a batch are left-padded
to one length; each row gets the same tokens it would get alone. One prompt's text streams as it is generated.
"""
import argparse
import functools
import json
import os
import signal
import sys
import time
from typing import NamedTuple

import util  # before numpy and MindSpore start threads: util.take_sigint

if __name__ == '__main__':
    util.take_sigint()
import numpy as np  # noqa: E402

os.environ.setdefault('GLOG_v', '3')  # MindSpore's C++ warnings off, before it is imported
import mindspore as ms  # noqa: E402
from mindspore import ops  # noqa: E402

import checkpoint  # noqa: E402
import comm  # noqa: E402
import convert  # noqa: E402
import data  # noqa: E402
import kernels  # noqa: E402
import layout  # noqa: E402
import llama  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, 'assets', 'stories260K', 'stories260K.bin')
DEFAULT_TOKENIZER = os.path.join(HERE, 'assets', 'stories260K', 'tok512.model')
SHORTEST_PROMPT = 16  # prompts are left-padded to a power of two from this on: a few compiled shapes for any length
SHORTEST_CACHE = 64  # the cache length is a power of two from this up to CACHE_STEP, a multiple of CACHE_STEP
CACHE_STEP = 512     # beyond: a few compiled shapes for any request, at most 2x the slots needed (1.5x beyond 512)
TOKENS_PER_CALL = 4  # tokens decoded per call of the compiled step: the ~0.3 ms a call costs on CPU is shared...
UNROLLED_LAYERS = 32  # ...while the unrolled step holds at most this many layers (compile time grows with them)
FUSE_UP_TO = 250_000_000  # parameters: smaller models decode on a fused second copy of the weights (fewer kernels);
                          # larger ones are bound by reading their weights, not by kernels, and keep a single copy
CHECK_EVERY = 16     # decoding looks at the generated ids (a host round trip) only this often, to stop at EOS
CHAT_CHUNK = 32      # --chat runs its prompts in pieces of this many tokens: one compiled shape for every turn


class Sampling(NamedTuple):
    """How the next token is chosen. Only its kind (greedy or not, a repetition penalty or not) shapes the compiled
    step; the values enter it as a tensor (knobs), so another temperature, top-k or top-p reuses the step."""
    temperature: float = 0.0         # 0 = greedy
    top_k: int = 0                   # 0 = off
    top_p: float = 1.0               # 1 = off
    repetition_penalty: float = 1.0  # 1 = off

    def kind(self):
        return self.temperature > 0, self.repetition_penalty != 1.0

    def knobs(self, vocab_size):
        """[temperature, top_k, top_p, penalty] float32, 'off' as values that change nothing: all vocab_size ids
        kept, a nucleus mass of 2 (never reached)."""
        top_k = self.top_k if 0 < self.top_k < vocab_size else vocab_size
        return ms.Tensor([self.temperature or 1.0, top_k, self.top_p if self.top_p < 1 else 2.0,
                          self.repetition_penalty], ms.float32)


def choose_next(logits, seen, u, kind, knobs):
    """Next ids [B] (int32) from logits [B, V], inside the graph: Hugging Face's repetition penalty on the ids seen
    so far (seen [B, V] is 1 for them), then greedy, or temperature, top-k, top-p (the smallest set of most likely ids
    whose mass reaches it) and inverse-CDF sampling with u [B, 1] uniform in [0, 1), over the ids sorted from the most
    likely down. kind and knobs: Sampling's."""
    sampled, penalized = kind
    temperature, top_k, top_p, penalty = knobs[0], knobs[1], knobs[2], knobs[3]
    if penalized:
        logits = ops.select(seen > 0, ops.select(logits > 0, logits / penalty, logits * penalty), logits)
    if not sampled:
        return ops.argmax(logits, -1).astype(ms.int32)
    ranked, order = ops.sort(logits / temperature, -1, True)
    outside_k = ops.arange(logits.shape[-1], dtype=ms.float32).reshape(1, -1) >= top_k
    ranked = ops.select(ops.broadcast_to(outside_k, ranked.shape), ops.full(ranked.shape, -np.inf, dtype=ms.float32),
                        ranked)
    probs = ops.softmax(ranked, -1)
    probs = probs * (ops.cumsum(probs, -1) - probs < top_p).astype(ms.float32)
    cdf = ops.cumsum(probs, -1)
    place = ops.minimum((cdf < u * cdf[:, -1:]).astype(ms.int32).sum(-1, keepdims=True), logits.shape[-1] - 1)
    return ops.gather_d(order.astype(ms.int32), -1, place).squeeze(-1)


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def power_of_two(n, smallest):
    return max(smallest, 1 << (n - 1).bit_length())


def cache_length(n):
    """The cache length for n slots (CACHE_STEP)."""
    return power_of_two(n, SHORTEST_CACHE) if n <= CACHE_STEP else round_up(n, CACHE_STEP)


def seen_mask(prompts, vocab_size):
    """[B, V] float32: 1 for the ids of each prompt (the repetition penalty's memory)."""
    seen = np.zeros((len(prompts), vocab_size), np.float32)
    for b, p in enumerate(prompts):
        seen[b, p] = 1.0
    return seen


def tokens_per_call(args):
    """4 for small models (stories260K, stories15M), 1 from 17 layers on (3B, 7B, 13B, 65B)."""
    return max(1, min(TOKENS_PER_CALL, UNROLLED_LAYERS // args.n_layers))


def flat(groups):
    """(names, tensors) of a list of dicts, for a compiled graph's input: a flat tuple crosses into the graph in
    about half the time nested dicts take (measured per call with stories260K's weights and cache: 0.38-0.42 ms
    against 0.70-1.2 ms; a call without them 0.1 ms)."""
    return tuple(tuple(g) for g in groups), ms.mutable(tuple(t for g in groups for t in g.values()))


def grouped(names, tensors):
    """flat's dicts again, inside the graph."""
    groups, i = [], 0
    for keys in names:
        group = {}
        for j in range(len(keys)):
            group[keys[j]] = tensors[i + j]
        groups.append(group)
        i += len(keys)
    return groups


def pairs(cache):
    """The flat cache (k0, v0, k1, v1, ...) as llama's per-layer (k, v) pairs."""
    return [(cache[i], cache[i + 1]) for i in range(0, len(cache), 2)]


@ms.jit
def clear_from(cache, first):
    return llama.clear_cache(pairs(cache), first)


@functools.cache
def compiled_step(args, kind, per_call, weight_names, adapter_names):
    """The compiled decoding step of one model, sampling kind and number of tokens per call (the loop is unrolled:
    compile time grows with it); ms.jit compiles it once per shape of its inputs (batch size, cache length, tokens).
    It runs its tokens (a prompt's piece, or the last chosen ids) through the model, chooses the next ids and feeds
    them back in until it has chosen per_call of them, without a host round trip. The weights and the KV cache are
    inputs, not closed over, so the graph holds no values and MindSpore's on-disk compile cache can keep it; the
    cache (Parameters) is written in place."""
    @ms.jit
    def step(weights, adapters, cache, tokens, slot, start, seen, draw, knobs):
        groups, chosen, logits = grouped(weight_names, weights), [], None
        lora = None if adapters is None else grouped(adapter_names, adapters)
        for i in range(per_call):
            logits = llama.forward_cached(groups[0], groups[1:], tokens, args, pairs(cache), slot, start, lora)
            u = llama.hash_uniform((tokens.shape[0], 1), draw + i) if kind[0] else None  # greedy: none
            ids = choose_next(logits, seen, u, kind, knobs).reshape(-1, 1)
            if kind[1]:
                seen = ops.tensor_scatter_elements(seen, ids, ops.ones(ids.shape, ms.float32), 1)
            chosen.append(ids)
            slot, tokens = slot + tokens.shape[1], ids
        return ops.concat(chosen, 1), chosen[-1], logits, seen
    return step


class Generator:
    """A model ready to decode: its weights as Tensors (fused for decoding when small) and its KV caches, one per
    batch size and cache length. Keep one per model: the compiled steps are shared by every Generator of the same
    model arguments, and another generate() call with the same shapes reuses them."""

    def __init__(self, params, args, lora=None, cpu_kernels=True):
        # RMSNorm and the attention operands by the C++ kernels where they build (cpu_kernels False: MindSpore's ops)
        self.args = args = args._replace(kernels=kernels.build(checkpoint.GRAPH_CACHE) if cpu_kernels else None)
        # LoRA runs on the plain weights, 16-bit ones are held as they are
        fuse = lora is None and layout.count_params(args) <= FUSE_UP_TO and \
            all(v.dtype == ms.float32 for v in params.values())
        rest, layers = llama.split_layers(llama.fuse_for_decoding(params, args) if fuse else params, args.n_layers)
        self.weight_names, self.weights = flat([rest] + layers)
        self.adapter_names, self.adapters = ((), None) if lora is None else \
            flat(llama.split_layers(lora, args.n_layers)[1])
        self.caches = {}

    def cache(self, batch_size, cache_len):
        """The KV cache of one batch size and cache length (allocated on first use)."""
        key = (batch_size, cache_len)
        if key not in self.caches:
            self.caches[key] = ms.mutable(tuple(t for kv in llama.empty_cache(self.args, batch_size, cache_len)
                                                for t in kv))
        return self.caches[key]

    def decoder(self, batch_size, cache_len, sampling, per_call=1):
        """(step, clear) for one batch size, cache length and sampling rule: step(tokens, slot, start, seen, draw)
        runs compiled_step on this Generator's weights and cache -> (chosen ids [B, per_call], the last of them,
        the last logits, seen); clear(first=0) zeroes the cache from slot first on (all of it for a new prompt). The
        steps of one batch size and cache length share its cache: a prompt runs with per_call 1, decoding continues
        with more."""
        cache, knobs = self.cache(batch_size, cache_len), sampling.knobs(self.args.vocab_size)
        compiled = compiled_step(self.args, sampling.kind(), per_call, self.weight_names, self.adapter_names)

        def step(tokens, slot, start, seen, draw):
            return compiled(self.weights, self.adapters, cache, tokens, slot, start, seen, draw, knobs)

        def clear(first=0):
            return clear_from(cache, ms.Tensor(first, ms.int32))
        return step, clear

    def steps_for(self, batch_size, cache_len, sampling):
        """(prefill, step, clear): a prompt (in a chat, each of its pieces) runs with per_call 1 (a graph a quarter
        the size, which writes only the prompt's slots), then tokens_per_call per call."""
        prefill, clear = self.decoder(batch_size, cache_len, sampling, 1)
        return prefill, self.decoder(batch_size, cache_len, sampling, tokens_per_call(self.args))[0], clear

    def shapes(self, prompts, max_new_tokens):
        """(batch size, padded prompt width, cache length): what the graphs of a generate() call are compiled for."""
        width = power_of_two(max(len(p) for p in prompts), SHORTEST_PROMPT)
        return len(prompts), width, cache_length(width + round_up(max_new_tokens, tokens_per_call(self.args)))

    def identity(self):
        """What, besides shapes and the sampling kind, decides this Generator's graphs: the model, its tensors
        (fused for decoding or not; args say whether C++ kernels run in them) and its adapters' shapes."""
        return self.args, self.weight_names, self.adapter_names, \
            None if self.adapters is None else tuple(t.shape for t in self.adapters)

    def generate(self, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0,
                 eos_id=None, on_tokens=None):
        """Token ids in, new token ids out: prompts is a list of id lists; returns a list of lists of generated ids.

        A row stops after eos_id (included in its output) or after max_new_tokens. The same seed gives the same
        samples. LoRA adapters given to the Generator are applied unmerged (args.lora_alpha sets their scale).
        on_tokens(rows), if given, is called after every compiled call with each row's ids so far (cut as the result
        is cut), for streaming; the ids are the same with it or without it."""
        args = self.args
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError('every prompt needs at least one token (e.g. BOS)')
        if longest + max_new_tokens > args.max_seq_len:
            raise ValueError(f'prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model\'s '
                             f'max_seq_len {args.max_seq_len}')
        B, width, cache_len = self.shapes(prompts, max_new_tokens)
        tokens = np.full((B, width), args.pad_id, np.int32)
        for b, p in enumerate(prompts):
            tokens[b, width - len(p):] = p
        start = ms.Tensor(np.array([width - len(p) for p in prompts], np.int32))
        self.caches.pop((B, cache_len), None)  # a new cache is zeros: no clear graph to compile (or load, 0.27 s)
        prefill, step, _ = self.steps_for(B, cache_len, Sampling(temperature, top_k, top_p, repetition_penalty))
        return self.decode((prefill, step), tokens, 0, start, seen_mask(prompts, args.vocab_size), max_new_tokens,
                           lambda i: (seed * 1_000_003 + i) % 2 ** 31, eos_id, on_tokens)[0]

    def decode(self, steps, tokens, slot, start, seen, max_new_tokens, draw, eos_id=None, on_tokens=None):
        """Run tokens [B, T] (numpy) into cache slots slot.. with steps[0], then decode after them with steps[1] (of
        steps_for); draw(i) is the random-draw counter of generated token i. Returns the rows (as generate returns
        them) and the slot of the last chosen id, which is not in the cache (the next call writes it)."""
        tokens, seen, generated, done = ms.Tensor(tokens), ms.Tensor(seen), [], 0
        while True:
            ids, last, _, seen = steps[done > 0](tokens, ms.Tensor(slot, ms.int32), start, seen,
                                                 ms.Tensor(draw(done), ms.int32))
            generated.append(ids)
            slot, tokens, done = slot + tokens.shape[1] + ids.shape[1] - 1, last, done + ids.shape[1]
            # The ids come to the host (a round trip) every CHECK_EVERY tokens to look for EOS; streaming, every call.
            if done >= max_new_tokens or on_tokens is not None or eos_id is not None and \
                    done % CHECK_EVERY < ids.shape[1]:
                rows = [row[:row.index(eos_id) + 1] if eos_id in row else row
                        for row in ops.concat(generated, 1).asnumpy()[:, :max_new_tokens].tolist()]
                if on_tokens is not None:
                    on_tokens(rows)
                if done >= max_new_tokens or eos_id is not None and all(eos_id in row for row in rows):
                    return rows, slot


def generate(params, args, prompts, max_new_tokens, lora=None, **sampling):
    """Generator(params, args, lora).generate(prompts, max_new_tokens, **sampling), for one call: it compiles its
    steps anew (keep a Generator to reuse them)."""
    return Generator(params, args, lora).generate(prompts, max_new_tokens, **sampling)


def from_config(argv):
    """(flat params, args, mesh, load_checkpoint, tokenizer path) of a train.py config and its --config.x=y
    overrides: with model_parallel > 1, this process's slices of the weights, split over the processes of an msrun /
    rank-table launch the way training splits them; whole otherwise."""
    from step import prepare  # the run's setup, as training makes it (not at the top: `step` names locals here)
    cfg, _ = util.parse_config(['sample.py'] + argv)
    if cfg.parallel.pipeline_stage > 1:
        raise ValueError('sample.py splits a model over model_parallel only: add --config.parallel.pipeline_stage=1')
    if not cfg.load_checkpoint:
        raise ValueError(f'{argv[1]} names no load_checkpoint: add --config.load_checkpoint=<checkpoint>')
    cfg.lora.rank = 0  # decoding: adapters come from --lora
    setup = prepare(cfg)
    path = util.resolve(cfg.load_checkpoint)
    weights = checkpoint.load_weights(path, cfg, setup, frozen=True)
    return llama.join_layers(*weights), setup.args, setup.mesh, path, util.resolve(cfg.data.tokenizer)


class TextStream:
    """Writes the text of a growing list of ids as it grows. The whole list is decoded each time, because the text of
    a sentencepiece piece depends on its neighbours (a leading '▁' is a space except at the start; a character can
    span several byte pieces); what is new is written and flushed. Trailing U+FFFD are held back until final: they
    are the first bytes of a character whose last ones are not generated yet."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.shown = tokenizer, out or sys.stdout, ''

    def __call__(self, ids, final=False):
        text = self.tokenizer.decode(ids)
        text = text if final else text.rstrip('\ufffd')
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def note(text):
    """What the chat says about itself goes to stderr: stdout is the conversation."""
    print(f'({text})', file=sys.stderr, flush=True)


class Chat:
    """A conversation in the template data.py trains qa rows with (FastChat's vicuna_v1.1: the system prompt, then
    'USER: ... ASSISTANT: ...</s>' rounds), so a model fine-tuned by train.py sees at inference what it was trained on.

    The KV cache holds the conversation so far: a turn runs only the ids the cache does not hold yet, in pieces of
    CHAT_CHUNK tokens, so one compiled shape serves every turn. The cache is the Generator's (one per shape): one
    Chat at a time per Generator. After each turn, stats holds its prompt and reply ids and timings."""

    def __init__(self, gen, tokenizer, system, max_new_tokens, sampling, seed, verbose=False):
        self.gen, self.tokenizer, self.system, self.max_new_tokens = gen, tokenizer, system, max_new_tokens
        self.seed, self.verbose, self.turn, self.draws = seed, verbose, 0, 0
        self.per_call = tokens_per_call(gen.args)
        # Room for the longest conversation, the padding in front of it and a call's run past its end.
        cache_len = round_up(gen.args.max_seq_len + CHAT_CHUNK + self.per_call, SHORTEST_CACHE)
        self.steps = gen.steps_for(1, cache_len, sampling)
        self.messages = []              # user, assistant, user, ...: the rounds kept
        self.held, self.offset = [], 0  # the ids whose keys and values the cache holds, from slot offset on

    def reset(self):
        self.messages = []  # the cache keeps the system prompt, which the next turn starts with

    def prompt_ids(self, messages):
        """The ids of messages (user, assistant, ..., user) as data.py renders a qa row, up to the last 'ASSISTANT:':
        the reply to come is rendered as an empty message, 'ASSISTANT:' alone, as FastChat renders it."""
        turns = [{'from': ('human', 'gpt')[j % 2], 'value': m} for j, m in enumerate(messages + [''])]
        ids, _ = next(data.qa_examples(self.tokenizer, [(0, {'conversations': turns})], 'the chat', self.system))
        return ids[:-1]  # a qa row closes every round with EOS: this one is still open

    def fit(self, message):
        """(messages, their prompt ids) with message added and the oldest rounds dropped, with a note, until the
        reply has room for max_new_tokens (the system prompt always stays); None, with a note, if the message is too
        long for the model by itself."""
        messages, limit = self.messages + [message], self.gen.args.max_seq_len
        ids = self.prompt_ids(messages)
        while len(ids) + self.max_new_tokens > limit and len(messages) > 1:
            messages = messages[2:]
            ids = self.prompt_ids(messages)
        if len(ids) >= limit:
            note(f'message not sent: with the system prompt it is {len(ids)} tokens, and the model holds {limit} '
                 f'(max_seq_len): shorten it')
            return None
        if len(messages) <= len(self.messages):
            note(f'dropped the oldest {(len(self.messages) + 1 - len(messages)) // 2} round(s): the conversation '
                 f'outgrew max_seq_len {limit}')
        return messages, ids

    def prefill(self, ids, seen):
        """Bring the cache to ids, all but the last piece: returns that piece [1, CHAT_CHUNK], its slot, and how many
        ids the cache already held. The ids past the longest prefix the cache holds run, widened to whole pieces by
        recomputing a few held ones, or by padding in front of the conversation (masked: `start` is offset)."""
        n = len(ids)
        held = next((i for i, (a, b) in enumerate(zip(self.held, ids)) if a != b), min(len(self.held), n))
        width = round_up(n - min(held, n - 1), CHAT_CHUNK)  # the last id always runs: its logits are needed
        if self.offset + n - width < 0:  # no room in front for the padding: lay the conversation out anew
            width = round_up(n, CHAT_CHUNK)
            self.offset = width - n
        first = n - width  # the first position that runs (negative: padding)
        tokens = np.array([[self.gen.args.pad_id] * max(0, -first) + ids[max(first, 0):]], np.int32)
        slot, start = self.offset + first, ms.Tensor([self.offset], ms.int32)
        prefill, _, clear = self.steps
        clear(slot)  # the cache is written by adding into zeroed slots
        for piece in range(0, width - CHAT_CHUNK, CHAT_CHUNK):
            prefill(ms.Tensor(tokens[:, piece:piece + CHAT_CHUNK]), ms.Tensor(slot + piece, ms.int32), start, seen,
                    ms.Tensor(0, ms.int32))
        return tokens[:, -CHAT_CHUNK:], slot + width - CHAT_CHUNK, max(first, 0)

    def say(self, message, out=None):
        """Add a user message and stream the reply (to EOS or max_new_tokens) to out; returns its ids (None when the
        message was not sent)."""
        t0, out, first_token = time.time(), out or sys.stdout, []
        fitted = self.fit(message)
        if fitted is None:
            return None
        messages, ids = fitted
        seen = seen_mask([ids], self.gen.args.vocab_size)
        tokens, slot, from_cache = self.prefill(ids, ms.Tensor(seen))
        stream = TextStream(self.tokenizer, out)

        def on_tokens(rows):  # (EOS decodes to nothing)
            if not first_token:
                first_token.append(time.time() - t0)
            stream(rows[0])
        out.write('ASSISTANT: ')
        draws = self.seed * 1_000_003 + self.draws
        rows, end = self.gen.decode(self.steps[:2], tokens, slot, ms.Tensor([self.offset], ms.int32), seen,
                                    min(self.max_new_tokens, self.gen.args.max_seq_len - len(ids)),
                                    lambda i: (draws + i) % 2 ** 31, self.tokenizer.eos_id, on_tokens)
        reply = rows[0]
        stream(reply, final=True)
        out.write('\n')
        out.flush()
        self.messages, self.held = messages + [self.tokenizer.decode(reply)], (ids + reply)[:end - self.offset]
        self.turn, self.draws = self.turn + 1, self.draws + len(reply) + self.per_call  # (at most this many drawn)
        self.stats = {'turn': self.turn, 'prompt_ids': ids, 'from_cache': from_cache, 'computed': len(ids) - from_cache,
                      'reply_ids': reply, 'first_token_ms': round(1000 * first_token[0], 1),
                      'seconds': round(time.time() - t0, 3)}
        if self.verbose:
            print(json.dumps(self.stats), file=sys.stderr, flush=True)
        return reply


def chat(conversation):
    """Messages from stdin, one a line, replies to stdout: a readline prompt on a terminal; the same from a pipe
    (each line is echoed, so the output reads as the terminal does). An empty line is skipped; /reset starts over;
    end of input ends the chat."""
    tty = sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401 -- line editing and history for input(); imported only for a terminal
    sys.stdin.reconfigure(errors='replace')  # invalid UTF-8 typed or piped in is replaced, not a traceback
    note('chat: one message a line; /reset starts over; end of input (Ctrl-D) quits')
    while True:
        try:
            line = input('USER: ')
        except EOFError:
            print()
            return
        if not tty:
            print(line)
        message = line.strip()
        if message == '/reset':
            conversation.reset()
            note('conversation reset')
        elif message:
            conversation.say(message)


def load(a, overrides):
    """(Generator, tokenizer, mesh or None) of the command line's checkpoint or config, tokenizer and adapter."""
    mesh = None
    if a.config:
        params, args, mesh, a.ckpt, tokenizer_path = from_config(['--config', a.config] + overrides)
        a.tokenizer = tokenizer_path or a.tokenizer
    else:
        params, args, _ = convert.load_model(a.ckpt, dtype=a.dtype, budget=util.memory_budget())
    tokenizer = data.Tokenizer(a.tokenizer)
    lora = None
    if a.lora:
        lora, args = convert.load_adapter(a.lora, args)
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f'the tokenizer {a.tokenizer} has {tokenizer.vocab_size} pieces but the model only '
                         f'{args.vocab_size}: pass the tokenizer the model was trained with (--tokenizer)')
    return Generator(params, args, lora), tokenizer, mesh


def shared_seed(mesh):
    """A random seed, the same on every process of a launch (rank 0's, summed with zeros): tensor-parallel ranks
    that sampled apart would feed their collectives different tokens."""
    drawn = int.from_bytes(os.urandom(3), 'little')  # 24 bits: exact in the fp32 sum
    if mesh is None or mesh.world_sum is None:
        return drawn
    return int(mesh.world_sum(ms.Tensor([float(drawn) if mesh.rank == 0 else 0.0], ms.float32)).asnumpy()[0])


def run(gen, tokenizer, a, seed, rank):
    """Generate from the prompts of the command line and print their text: streamed for one prompt."""
    prompts = list(a.prompt or [])
    if a.prompt_file:
        text = util.read_text(a.prompt_file, ValueError, name=f'--prompt_file {a.prompt_file}')
        prompts += [line for line in text.splitlines() if line.strip()]
    ids = [tokenizer.encode(p, bos=True) for p in (prompts or [''])]
    longest = max(len(p) for p in ids)
    if longest >= gen.args.max_seq_len:
        raise ValueError(f'a prompt of {longest} tokens exceeds the model\'s max_seq_len {gen.args.max_seq_len} '
                         f'(with room for one new token): shorten it')
    max_new = min(a.max_new_tokens, gen.args.max_seq_len - longest)
    stream = TextStream(tokenizer) if len(ids) == 1 and rank == 0 else None  # tensor-parallel ranks: rank 0 prints
    if stream:
        stream(ids[0])
    t0, sampling, pace = time.time(), Sampling(a.temperature, a.top_k, a.top_p, a.repetition_penalty), Pace()

    def streamed(rows):
        pace(rows)
        stream(ids[0] + rows[0])
    # every rank looks for EOS after the same calls (rank 0 streams, the others only count), so all stop together
    on_tokens = streamed if stream else pace if len(ids) == 1 else None
    with checkpoint.graph_cache(a.graph_cache, (gen.identity(), gen.shapes(ids, max_new), sampling.kind())):
        outs = gen.generate(ids, max_new, *sampling, seed, tokenizer.eos_id, on_tokens)
    elapsed = time.time() - t0
    if rank == 0:
        for prompt_ids, new_ids in zip(ids, outs):
            if stream:
                stream(prompt_ids + new_ids, final=True)
                print()
            else:
                print(tokenizer.decode(prompt_ids + new_ids))
            print('-' * 40)
    n, rate = sum(len(o) for o in outs), pace.rate()
    print(f'{n} tokens in {elapsed:.2f}s (including compilation), seed {seed}'
          + ('' if rate is None else f'; decoding {rate:.2f} tokens/s'), file=sys.stderr)


class Pace:
    """When each compiled call of a streamed prompt returned, and the row's length then: decoding's own rate, apart
    from loading, compiling and the prompt (the prefill call and the first decoding call, which compiles)."""

    def __init__(self):
        self.marks = []

    def __call__(self, rows):
        self.marks.append((time.perf_counter(), len(rows[0])))

    def rate(self):
        if len(self.marks) < 3:
            return None
        (t0, n0), (t1, n1) = self.marks[1], self.marks[-1]
        return (n1 - n0) / (t1 - t0)


def main(argv=None):
    parser = util.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', default=DEFAULT_CKPT, help='any checkpoint convert.py reads')
    parser.add_argument('--config', help="a train.py config (and --config.x=y overrides): its load_checkpoint, "
                                         "tokenizer and model_parallel split (under msrun)")
    parser.add_argument('--lora', help='a LoRA adapter (from train.py) to apply on top of --ckpt')
    parser.add_argument('--dtype', default='', choices=['', 'float32', 'float16', 'bfloat16'],
                        help="how --ckpt's weights are held ('' = as the checkpoint stores them: 16 bits stay 16); "
                             "widened to the compute dtype where they are used")
    parser.add_argument('--tokenizer', default=DEFAULT_TOKENIZER, help='sentencepiece .model')
    parser.add_argument('--prompt', action='append', help='repeat for a batch (default: an empty prompt). One prompt '
                                                          'streams its text as it is generated; a batch prints each '
                                                          "row's text when all rows are done")
    parser.add_argument('--prompt_file', help='a file with one prompt per line, for a batch')
    parser.add_argument('--chat', action='store_true', help='a conversation: messages from stdin, one a line, in the '
                                                            'vicuna template train.py fine-tunes with (see data.py)')
    parser.add_argument('--system', default=data.VICUNA_SYSTEM, help="--chat: the system prompt (default vicuna's)")
    parser.add_argument('--verbose', action='store_true', help='--chat: per turn a JSON line on stderr: the prompt '
                                                               'ids, how many came from the cache, time to first token')
    parser.add_argument('--max_new_tokens', type=util.number(int, 0), default=256,
                        help='generated tokens, not counting the prompt (--chat: per reply)')
    parser.add_argument('--temperature', type=util.number(float, 0, strict=False), default=1.0, help='0 = greedy')
    parser.add_argument('--top_k', type=util.number(int, 0, strict=False), default=0, help='0 = off')
    parser.add_argument('--top_p', type=util.number(float, 0), default=0.9, help='1 = off')
    parser.add_argument('--repetition_penalty', type=util.number(float, 0), default=1.0, help='1 = off')
    parser.add_argument('--seed', type=int, default=None, help='default: a random seed, printed')
    parser.add_argument('--graph_cache', default=checkpoint.GRAPH_CACHE, help="compiled graphs kept for the next run with the "
                                                                    "same model and shapes; '' = off")
    a, overrides = parser.parse_known_args(argv)
    if overrides and not (a.config and all(o.startswith('--config.') for o in overrides)):
        parser.error(f'unrecognized arguments: {" ".join(overrides)}')
    if a.top_p > 1:
        parser.error(f'argument --top_p: must be at most 1 (1 = off), got {a.top_p}')
    if a.chat and (a.prompt or a.prompt_file):
        parser.error('--chat reads its messages from stdin: drop --prompt and --prompt_file')
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        gen, tokenizer, mesh = load(a, overrides)
        rank = mesh.rank if mesh else 0
        seed = a.seed if a.seed is not None else shared_seed(mesh)
        if a.chat:
            if rank or gen.args.tp.size > 1:
                raise ValueError('--chat runs in one process: drop model_parallel')
            sampling = Sampling(a.temperature, a.top_k, a.top_p, a.repetition_penalty)
            note(f'seed {seed}')
            with checkpoint.graph_cache(a.graph_cache, (gen.identity(), 'chat', sampling.kind())):
                return chat(Chat(gen, tokenizer, a.system, a.max_new_tokens, sampling, seed, a.verbose))
        if gen.args.tp.size > 1:
            a.graph_cache = ''  # MindSpore's compile cache does not support host collectives
        run(gen, tokenizer, a, seed, rank)
    except (OSError, ValueError, util.ConvertError, util.DataError, util.RunError) as e:
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:  # Ctrl-C (util.take_sigint): one line, and the shell's status for it
        print('\ninterrupted', file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == '__main__':
    main()
    # Skip MindSpore's C++ teardown at exit: it takes ~0.8 s (measured) and frees nothing the OS would not. Nothing
    # is left to write: the output is flushed here and graph_cache renamed its directory when its block ended. Not
    # in a cluster: msrun's workers end through that teardown (cut short, msrun reports them failed).
    sys.stdout.flush()
    sys.stderr.flush()
    if comm.launched() is None:
        os._exit(0)
