"""Speed figures, as medians (and spread) of repeated runs, measured against this machine in the same run.

    python bench.py                 # everything
    python bench.py --only train,compile   # some of: matmul, train, compile, memory, lora, sample, chat, data, convert,
                                           # mesh, startup
    pip install -r requirements-bench.txt  # then train, sample and startup also time PyTorch + transformers beside us

Shapes: "stories15M" is llama2.c's 15M model (dim 288, 6 layers, 6 heads, vocab 32000) at seq 256, batch 8, fp32,
with random weights; "stories260K" is the bundled real model.
"""
import argparse
import collections
import csv
import glob
import io
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault('GLOG_v', '3')
import mindspore as ms  # noqa: E402

import convert  # noqa: E402
import data  # noqa: E402
import layout  # noqa: E402
import llama  # noqa: E402
import monitor  # noqa: E402
import optim  # noqa: E402
import sample  # noqa: E402
import step  # noqa: E402
import util  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
STORIES260K = os.path.join(HERE, 'assets', 'stories260K', 'stories260K.bin')
STORIES15M = dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256, norm_eps=1e-5)


def spread(values, digits=1):
    """'median (min-max)' of a list of numbers."""
    return f'{np.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})'


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_matmul(repeats=5):
    for n in (1024, 2048):
        rate = monitor.matmul_timer(n)
        print(f'matmul fp32 {n}^3: {spread([rate() / 1e9 for _ in range(repeats)])} GFLOP/s')


def setup_of(model, lora=None, layer_by_layer=False):
    """step.prepare's Setup of one process for a model section (and LoRA fields)."""
    from configs import base
    cfg = base.get_config()
    cfg.model.update(model)
    cfg.lora.update(lora or {})
    return step.prepare(cfg)._replace(layer_by_layer=layer_by_layer)


def time_steps(state, frozen, setup, rows, steps=5, repeats=7, between=None):
    """(compile seconds, tokens/s of each timed window, between()'s result after each window) of train steps on one
    batch of rows; between, if given, is timed in alternation with the windows so both see the same load."""
    start = time.perf_counter()
    state, metrics = step.train_step(state, frozen, [(rows,)], 1e-4, 0, setup)
    metrics['loss'].asnumpy()
    compile_s = time.perf_counter() - start

    def window():
        nonlocal state
        for i in range(steps):
            state, metrics = step.train_step(state, frozen, [(rows,)], 1e-4, i, setup)
        metrics['loss'].asnumpy()
    tokens = steps * rows.shape[0] * (rows.shape[1] - 1)
    rates, others = [], []
    for _ in range(repeats):
        rates.append(tokens / timed(window, 1)[0])
        others.append(between() if between else None)
    return compile_s, rates, others


def stories15m_batch(args, batch=8):
    return np.random.default_rng(0).integers(3, args.vocab_size, (batch, args.max_seq_len + 1)).astype(np.int32)


def bench_train():
    """The stories15M-shape train step's model FLOP/s against the 2048^3 matmul rate, timed in alternation (a window
    of train steps, the matmul chain, then the peer's window of the same steps) so each MFU figure and each ratio
    compares the two under the same load."""
    setup = setup_of(STORIES15M)
    args = setup.args
    rows = stories15m_batch(args)
    seq, tokens = args.max_seq_len, 5 * rows.shape[0] * args.max_seq_len
    flops = layout.flops_per_token(args, seq)
    state = optim.init_state(llama.split_layers(llama.init_params(args, 0), args.n_layers))
    peer, matmul = start_peer(), monitor.matmul_timer(2048)
    peer_first = peer and peer('train_window', first=True)

    def between():  # the matmul rate, then the peer's tokens/s
        return matmul(), peer and tokens / peer('train_window')
    compile_s, tokens_per_s, others = time_steps(state, None, setup, rows, between=between)
    mfu = [100 * tps * flops / rate for tps, (rate, _) in zip(tokens_per_s, others)]
    print(f'train stories15M-shape (B={len(rows)}, T={seq}): compile {compile_s:.1f}s, {spread(tokens_per_s)} '
          f'tokens/s, MFU {spread(mfu)}% of the 2048^3 matmul rate measured between the windows')
    if peer:
        peer_tps = [p for _, p in others]
        peer_mfu = [100 * p * flops / rate for rate, p in others]
        print(f'  peer HF LlamaForCausalLM (SDPA) + PyTorch eager, same shape, AdamW, clip 1.0: first step '
              f'{peer_first:.1f}s, {spread(peer_tps)} tokens/s, MFU {spread(peer_mfu)}%; ours / peer, paired: '
              f'{spread([a / b for a, b in zip(tokens_per_s, peer_tps)], 2)}x')
    print(f'  FLOPs/token = 6 x {(flops - 12 * args.n_layers * args.dim * seq) // 6:,} matmul params + '
          f'12 x {args.n_layers} layers x {args.dim} dim x {seq} seq = {flops:,}')


def compile_probe(spec):
    """In this (fresh) process: print the first train step's seconds minus a steady step's (the compile time) and
    the steady step's, for spec = json {'model': {...}, 'batch': B, 'layerwise': bool}."""
    spec = json.loads(spec)
    setup = setup_of(spec['model'], layer_by_layer=spec['layerwise'])
    args = setup.args
    state = optim.init_state(llama.split_layers(llama.init_params(args, 0), args.n_layers))
    rows = stories15m_batch(args, spec['batch'])
    times = []
    for i in range(3):
        start = time.perf_counter()
        with step.graph_cache(spec['graph_cache'] if i == 0 else '', setup, state, None, [(rows,)]):
            state, metrics = step.train_step(state, None, [(rows,)], 1e-4, i, setup)
        metrics['loss'].asnumpy()
        times.append(time.perf_counter() - start)
    steady = min(times[1:])
    print(times[0] - steady, steady)


def compile_seconds(model, layerwise, batch=8, graph_cache=''):
    """compile_probe's (compile, steady step) seconds, in a fresh process."""
    spec = json.dumps({'model': model, 'layerwise': layerwise, 'batch': batch, 'graph_cache': graph_cache})
    run = subprocess.run([sys.executable, os.path.abspath(__file__), '--compile_probe', spec],
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f'compile probe failed: {run.stderr.strip()[-2000:]}')
    return [float(x) for x in run.stdout.split()[-2:]]


def bench_compile():
    """Compile time of the train step against depth, each model in a fresh process (nothing cached): the
    layer-by-layer step (train.py's default from 9 layers) at 4 and 32 layers of stories15M's width, the one-graph
    step at 4 and 8, and the 7B shape (32 layers, 32 heads, ffn/dim as 7B's) at width 256, seq 512, batch 1."""
    for layerwise, depths in ((True, (4, 32)), (False, (4, 8))):
        (c_low, s_low), (c_high, s_high) = [compile_seconds(dict(STORIES15M, n_layers=n), layerwise) for n in depths]
        print(f'compile stories15M-width train step, {"layerwise" if layerwise else "one graph"}: {depths[0]} layers '
              f'{c_low:.1f} s, {depths[1]} layers {c_high:.1f} s ({c_high / c_low:.2f}x; steps {s_low:.2f} / '
              f'{s_high:.2f} s)')
    seven_b = dict(dim=256, n_layers=32, n_heads=32, vocab_size=32000, ffn_hidden=688, max_seq_len=512,
                   norm_eps=1e-6)
    c7, s7 = compile_seconds(seven_b, True, batch=1)
    print(f'compile 7B shape at width 256 (32 layers, 32 heads, ffn 688, vocab 32000, seq 512, batch 1), '
          f'layerwise: {c7:.1f} s; a step {s7:.2f} s')


def train_memory_probe(layerwise):
    """In this (fresh) process: run the train step of a tiny model first, so MindSpore's runtime, kernels and pools
    exist, then the stories15M-shape step; print the RSS before the latter and the peak RSS (VmHWM), in MB."""
    def rss_mb():
        return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    for shape in (dict(STORIES15M, dim=48, vocab_size=512), STORIES15M):
        before = rss_mb()
        setup = setup_of(shape, layer_by_layer=layerwise)
        args = setup.args
        state = optim.init_state(llama.split_layers(llama.init_params(args, 0), args.n_layers))
        for i in range(3):
            state, metrics = step.train_step(state, None, [(stories15m_batch(args),)], 1e-4, i, setup)
            metrics['loss'].asnumpy()
        del state
    peak = int([line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]) / 1024
    print(before, peak)


def bench_memory():
    """Peak RSS of the stories15M-shape train step (in a fresh process, over the RSS it had after the same step of
    a tiny model) against layout.memory_plan's sum of weights, gradients, AdamW state and the activations kept for
    the backward: all of them in the one-graph step, each layer's input (plus one layer's in flight) layerwise."""
    args = layout.model_args(STORIES15M)
    for mode in ('one graph', 'layerwise'):
        plan = layout.memory_plan(args, layout.ParallelArgs(), 8, args.max_seq_len, layer_by_layer=mode == 'layerwise')
        expected = sum(plan.values()) / 2 ** 20
        run = subprocess.run([sys.executable, os.path.abspath(__file__), '--memory_probe', mode],
                             capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f'memory probe failed: {run.stderr.strip()[-2000:]}')
        before, peak = map(float, run.stdout.split()[-2:])
        print(f'memory stories15M-shape train step ({mode}, B=8, T=256): expected ' +
              ' + '.join(f'{k} {v / 2 ** 20:,.0f}' for k, v in plan.items() if v) + f' = {expected:,.0f} MiB; '
              f'measured peak RSS {peak:,.0f} MiB, {peak - before:,.0f} MiB over the process before the step: '
              f'{(peak - before) / expected:.2f}x')


def trainable_state_bytes(shapes):
    """fp32 weights + gradients + two AdamW moments of the trainable tensors."""
    return 16 * sum(math.prod(s) for s in shapes.values())


def bench_lora(rank=16, targets='.*wq|.*wk|.*wv|.*wo'):
    """LoRA against full fine-tuning of the same model: step time, and the memory of the trainable state."""
    full_setup = setup_of(STORIES15M)
    lora_setup = setup_of(STORIES15M, dict(rank=rank, alpha=16.0, dropout=0.05, targets=targets))
    args = full_setup.args
    rows = stories15m_batch(args)
    params = llama.split_layers(llama.init_params(args, 0), args.n_layers)
    adapters = ({}, llama.split_layers(llama.init_lora(lora_setup.args, rank, targets), args.n_layers)[1])
    _, full, _ = time_steps(optim.init_state(params), None, full_setup, rows)
    _, lora, _ = time_steps(optim.init_state(adapters), params, lora_setup, rows)
    full_bytes = trainable_state_bytes(layout.param_shapes(args))
    lora_bytes = trainable_state_bytes(layout.lora_shapes(args, rank, targets))
    print(f'fine-tune stories15M-shape: full {spread(full)} tokens/s, LoRA rank {rank} {spread(lora)} tokens/s '
          f'({np.median(lora) / np.median(full):.2f}x); trainable state {full_bytes / 1e6:.1f} MB vs '
          f'{lora_bytes / 1e6:.2f} MB ({100 * lora_bytes / full_bytes:.2f}%)')
    import importlib
    cfg = importlib.import_module('configs.7b_lora').get_config()
    args7 = layout.model_args(cfg.model)
    full7 = sum(math.prod(s) for s in layout.param_shapes(args7).values())
    lora7 = sum(math.prod(s) for s in layout.lora_shapes(args7, cfg.lora.rank, cfg.lora.targets).values())
    print(f'7B shape: LoRA rank {cfg.lora.rank} on wq/wk/wv/wo trains {lora7:,} of {full7:,} parameters; its AdamW '
          f'state is {8 * lora7 / 2 ** 20:,.0f} MiB against {8 * full7 / 2 ** 30:,.1f} GiB ({100 * lora7 / full7:.2f}%)')


def kernels_per_step(step, inputs, n_steps=20):
    """Kernels launched per call of a compiled decode step, counted by MindSpore's profiler over n_steps calls.
    inputs(i) gives the arguments of call i."""
    out_dir = tempfile.mkdtemp()
    try:
        profiler = ms.Profiler(output_path=out_dir)
        for i in range(n_steps):
            outputs = step(*inputs(i))
        outputs[0].asnumpy()
        profiler.analyse()
        found = glob.glob(os.path.join(out_dir, '*', 'FRAMEWORK', 'cpu_op_type_info_0.csv'))
        with open(found[0]) as f:
            return sum(int(row['type_occurrences']) for row in csv.DictReader(f)) / n_steps
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def bench_sample(name, params, args, repeats=9, new_tokens=128, run_c_tokens_per_s=None, peer=None, hf_dir=None):
    """Greedy decoding, batch 1 and batch 8 timed in alternation (so both see the same load on a shared machine), and
    the peer's HF generate on the same model (hf_dir) in the same alternation: tokens/s, the ratios of each pair, time
    to first token, kernels per decoded token."""
    rates, gen = {1: [], 8: []}, sample.Generator(params, args)
    peer_rates = {1: [], 8: []}
    for batch in rates:
        ours = gen.generate([[1]] * batch, new_tokens)  # compile
        if peer:
            theirs = peer('generate', hf_dir=hf_dir, batch=batch, new_tokens=new_tokens)[1]
            assert theirs == ours[0], f'HF generate chose other tokens than ours: {theirs[:8]} vs {ours[0][:8]}'
    for _ in range(repeats):
        for batch in rates:
            rates[batch] += [batch * new_tokens / t for t in
                             timed(lambda: gen.generate([[1]] * batch, new_tokens), 1)]
        for batch in peer_rates if peer else ():
            peer_rates[batch].append(batch * new_tokens / peer('generate', hf_dir=hf_dir, batch=batch,
                                                                 new_tokens=new_tokens)[0])
    ratios = [b8 / b1 for b1, b8 in zip(rates[1], rates[8])]
    for batch in rates:
        print(f'sample {name} greedy, batch {batch}: {spread(rates[batch])} tokens/s')
        if peer:
            print(f'  peer HF generate (PyTorch eager), same tokens: {spread(peer_rates[batch])} tokens/s; ours / '
                  f'peer, paired: {spread([a / b for a, b in zip(rates[batch], peer_rates[batch])], 2)}x')
    print(f'sample {name}: batch 8 / batch 1 tokens/s, paired: {spread(ratios)}')
    prompt = [list(np.random.default_rng(0).integers(3, args.vocab_size, 256))]
    gen.generate(prompt, 1)
    ttft = [1000 * t for t in timed(lambda: gen.generate(prompt, 1), repeats)]
    print(f'sample {name}: time to first token for a 256-token prompt {spread(ttft)} ms')
    step, clear = gen.decoder(1, 256, sample.Sampling(), sample.tokens_per_call(args))
    clear()
    start, seen, draw = ms.Tensor([0], ms.int32), ms.Tensor(np.zeros((1, args.vocab_size), np.float32)), \
        ms.Tensor(0, ms.int32)
    ids = ms.Tensor([[1]], ms.int32)
    step(ids, ms.Tensor(0, ms.int32), start, seen, draw)
    n = sample.tokens_per_call(args)
    kernels = kernels_per_step(step, lambda i: (ids, ms.Tensor(1 + n * i, ms.int32), start, seen, draw)) / n
    us_per_token = 1e6 / np.median(rates[1])
    print(f'sample {name}: {kernels:.0f} kernels per decoded token, {us_per_token / kernels:.1f} us per kernel at '
          f'batch 1 ({us_per_token:,.0f} us per token)')
    if run_c_tokens_per_s:
        target_us = 1e6 / (run_c_tokens_per_s / 2)
        print(f'  half of run.c\'s {run_c_tokens_per_s:,} tokens/s is {target_us:.0f} us per token: at '
              f'{us_per_token / kernels:.1f} us per kernel that allows {target_us / (us_per_token / kernels):.0f} '
              f'kernels per token, against {kernels:.0f}')


def reference_wiki_rows(path, sp, seq_length):
    """MindFormers' one-process tokenize_wiki, transcribed: the whole file read and cleaned, each paragraph encoded
    one at a time, the ids concatenated as one list, then cut into chunks (the last partial one dropped)."""
    content = []
    with open(path, encoding='utf-8') as f:
        for para in data.clean_wikitext(f.read()).split('\n\n'):
            if para and para.strip().startswith('=') is False:
                content += [sp.bos_id()] + sp.Encode(para) + [sp.eos_id()]
    n = seq_length + 1
    return [np.array(chunk, np.int32) for chunk in (content[i:i + n] for i in range(0, len(content), n))
            if len(chunk) == n]


def bench_data(repeats=5, seq_length=2048):
    """WikiText-2 valid + test -> rows of 2049 ids with the LLaMA tokenizer, tokens/s: data.wiki_rows (streamed,
    batch-encoded) against the reference's algorithm in the same run. The reference used HF's LlamaTokenizer, which
    is slower than the raw sentencepiece its transcription uses here: the ratio is conservative."""
    shared = os.path.join(os.path.dirname(HERE), 'shared', 'data')
    model = os.path.join(shared, 'llama_tokenizer', 'tokenizer.model')
    files = [os.path.join(shared, 'wikitext-2', name) for name in ('valid.txt', 'test.txt')]
    if not all(os.path.isfile(p) for p in [model] + files):
        print(f'data: skipped (needs the LLaMA tokenizer and WikiText-2 in {shared})')
        return
    tokenizer, stats = data.Tokenizer(model), data.new_stats(files)
    ours = [r['input_ids'] for f in files for r in data.wiki_rows(f, tokenizer, seq_length, stats=stats)]
    reference = [r for f in files for r in reference_wiki_rows(f, tokenizer.sp, seq_length)]
    assert np.array_equal(ours, reference), 'data.wiki_rows differs from the reference algorithm'
    tokens = stats['tokens']  # the stream both produce, [bos] and [eos] included

    def run_ours():
        for f in files:
            collections.deque(data.wiki_rows(f, tokenizer, seq_length), 0)

    def run_reference():
        for f in files:
            reference_wiki_rows(f, tokenizer.sp, seq_length)
    ours_rate, reference_rate = [], []
    for _ in range(repeats):  # interleaved, so both see the same load on this shared machine
        ours_rate += [tokens / t for t in timed(run_ours, 1)]
        reference_rate += [tokens / t for t in timed(run_reference, 1)]
    print(f'data wiki (WikiText-2 valid+test, {tokens:,} tokens, LLaMA tokenizer, seq {seq_length}): '
          f'ours {spread(ours_rate)} tokens/s, reference algorithm {spread(reference_rate)} tokens/s, '
          f'ratio {np.median(ours_rate) / np.median(reference_rate):.2f}x')


# Runs a script and prints its peak RSS. VmHWM restarts at exec; ru_maxrss would inherit this process's (a forked
# child's maximum includes the parent's memory, and this one holds MindSpore).
PEAK_RSS_OF = """import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
print([line for line in open('/proc/self/status') if line.startswith('VmHWM')][0])
"""


def bench_convert(dim=1024, n_layers=16, ffn_hidden=2816, vocab_size=32000):
    """Peak memory of `python convert.py` (a separate process) on a synthetic 1.08 GB fp32 checkpoint: a Hugging Face
    directory in two shards -> our .ckpt, then that .ckpt -> Hugging Face bf16."""
    config = dict(dim=dim, n_layers=n_layers, n_heads=dim // 128, n_kv_heads=dim // 128, vocab_size=vocab_size,
                  ffn_hidden=ffn_hidden, max_seq_len=2048, norm_eps=1e-6, rope_theta=10000.0)
    shapes = layout.param_shapes(layout.model_args(config))
    rng = np.random.default_rng(0)
    tensors = {k: convert.Lazy(s, 'F32', lambda s=s: rng.standard_normal(s, dtype=np.float32) * 0.02, None)
               for k, s in shapes.items()}
    model_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
    largest = 4 * max(int(np.prod(s)) for s in shapes.values())
    tmp = tempfile.mkdtemp()
    try:
        convert.write_hf(os.path.join(tmp, 'hf'), config, tensors, shard_bytes=model_bytes // 2 + 1)  # streamed too
        for label, src, dst, extra in (('HF fp32 (2 shards) -> .ckpt fp32', 'hf', 'ours.ckpt', []),
                                       ('.ckpt fp32 -> HF bf16', 'ours.ckpt', 'hf_bf16', ['--dtype', 'bf16'])):
            start = time.perf_counter()
            run = subprocess.run([sys.executable, '-c', PEAK_RSS_OF, os.path.join(HERE, 'convert.py'), '--input',
                                  os.path.join(tmp, src), '--output', os.path.join(tmp, dst)] + extra,
                                 capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f'convert.py failed: {run.stderr.strip()}')
            peak_mb = int(run.stdout.split()[-2]) / 1024
            print(f'convert {label}: peak RSS {peak_mb:,.0f} MB for a {model_bytes / 1e9:.2f} GB model (largest '
                  f'tensor {largest / 1e6:.0f} MB), {time.perf_counter() - start:.1f} s')
    finally:
        shutil.rmtree(tmp)


SEVEN_B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, ffn_hidden=11008, max_seq_len=2048,
               norm_eps=1e-6, rope_theta=10000.0)  # configs/7b.py's shape
BIG_DIR = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'llama-mindspore-bench',
                       '7b-random-fp16')
LLAMA_TOKENIZER = os.path.join(os.path.dirname(HERE), 'shared', 'data', 'llama_tokenizer', 'tokenizer.model')
GB = layout.GB


def random_tensor(name, shape, index):
    """A tensor of a randomly initialised model (norms 1, the rest N(0, 0.02)), drawn on its own from its index, so
    the model streams to disk one tensor at a time."""
    if name.endswith('norm.weight') or name == layout.NORM_OUT:
        return np.ones(shape, np.float32)
    return np.random.default_rng(index).standard_normal(shape, dtype=np.float32) * 0.02


def big_checkpoint():
    """configs/7b.py's shape with random weights, as a float16 Hugging Face directory: written once (streamed, about
    a minute), then read by every run like any other checkpoint."""
    if not os.path.exists(os.path.join(BIG_DIR, 'config.json')):
        shapes = layout.param_shapes(layout.model_args(SEVEN_B))
        tensors = {k: convert.Lazy(s, 'F32', functools.partial(random_tensor, k, s, i), None)
                   for i, (k, s) in enumerate(shapes.items())}
        start = time.perf_counter()
        os.makedirs(os.path.dirname(BIG_DIR), exist_ok=True)
        convert.write(BIG_DIR, SEVEN_B, tensors, fmt='hf', dtype='F16')
        print(f'big: wrote {BIG_DIR} ({sum(math.prod(s) for s in shapes.values()) * 2 / GB:.1f} GiB) in '
              f'{time.perf_counter() - start:.0f} s')
    return BIG_DIR


def memory_bandwidth(gb=2, repeats=5):
    """This machine's read bandwidth, bytes/s: the best of a few sums over a multi-GB array, one thread a core."""
    import threading
    a = np.ones(gb * GB // 8, np.uint64)
    threads, best = os.cpu_count() or 1, 0.0
    parts = np.array_split(a, threads)
    for _ in range(repeats):
        pool = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        start = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        best = max(best, a.nbytes / (time.perf_counter() - start))
    return best


def peak_rss_run(argv):
    """(peak RSS in bytes, stdout, stderr) of `python argv...` in a process of its own, from the kernel's account
    of the child (sample.py ends with os._exit: nothing after its main runs)."""
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        process = subprocess.Popen([sys.executable] + argv, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode:
        raise SystemExit(f'{argv[0]} failed: {stderr.strip()[-3000:]}')
    return usage.ru_maxrss * 1024, stdout, stderr


def bench_big():
    """A 7B on this machine: configs/7b.py's shape (random weights, float16), sampled greedily by sample.py and
    fine-tuned with configs/7b_lora.py for 2 steps of 1 x 256 tokens, each in a process of its own, their peak RSS
    beside what the memory plan predicts for the same single-CPU run, and decoding against the bandwidth limit."""
    if not os.path.exists(LLAMA_TOKENIZER):
        print(f'big: skipped, the LLaMA tokenizer is not at {LLAMA_TOKENIZER}')
        return
    directory, args = big_checkpoint(), layout.model_args(SEVEN_B)
    weight_bytes = layout.count_params(args) * 2
    bandwidth = memory_bandwidth()
    peak, _, err = peak_rss_run([os.path.join(HERE, 'sample.py'), '--ckpt', directory, '--tokenizer', LLAMA_TOKENIZER,
                                 '--temperature', '0', '--max_new_tokens', '16', '--graph_cache', '',
                                 '--prompt', 'I believe the meaning of life is'])
    rate = float(re.search(r'decoding ([\d.]+) tokens/s', err).group(1))
    plan = sum(layout.sampling_memory(args, 2, 1, sample.cache_length(16 + 16)).values())
    limit = bandwidth / weight_bytes
    print(f'big sample 7B float16 ({weight_bytes / GB:.1f} GiB of weights): peak RSS {peak / GB:.1f} GiB '
          f'(plan {plan / GB:.1f} GiB; the bound 1.15 x weights + 1.5 GiB = '
          f'{(1.15 * weight_bytes + 1.5 * GB) / GB:.1f}); decoding {rate:.2f} tokens/s, {100 * rate / limit:.0f}% of '
          f'the bandwidth limit {limit:.2f} tokens/s ({bandwidth / GB:.1f} GiB/s / {weight_bytes / GB:.1f} GiB a '
          f'token)')
    bench_big_lora(directory, args)


def bench_big_lora(directory, args, seq=256):
    """configs/7b_lora.py on this one process: 2 steps of 1 x seq tokens from an Alpaca qa MindRecord made with the
    LLaMA tokenizer, the adapter saved at the end."""
    alpaca = os.path.join(os.path.dirname(LLAMA_TOKENIZER), '..', 'alpaca', 'alpaca_data_sample.json')
    out = tempfile.mkdtemp(prefix='bench-7b-lora-')
    try:
        records = os.path.join(out, f'qa{seq}.mindrecord')
        data.main(['--dataset_type', 'alpaca', '--data_path', alpaca, '--output_path', os.path.join(out, 'c.json')])
        data.main(['--dataset_type', 'qa', '--input_glob', os.path.join(out, 'c.json'), '--model_file',
                   LLAMA_TOKENIZER, '--seq_length', str(seq), '--output_file', records])
        overrides = [f'--config.load_checkpoint={directory}', f'--config.data.train={records}', '--config.data.eval=',
                     f'--config.data.tokenizer={LLAMA_TOKENIZER}', f'--config.data.seq_length={seq}',
                     '--config.train.batch_size=1', '--config.train.total_steps=2', '--config.train.log_interval=1',
                     '--config.model.compute_dtype=float32', '--config.train.loss_scale=0',
                     '--config.parallel.data_parallel=1', f'--config.train.out_dir={out}',
                     '--config.train.graph_cache=False']
        start = time.perf_counter()
        peak, stdout, err = peak_rss_run([os.path.join(HERE, 'train.py'), '--config',
                                          os.path.join(HERE, 'configs', '7b_lora.py')] + overrides)
        records = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl')) if '"loss"' in line]
        cfg = util.parse_config(['train.py', '--config', os.path.join(HERE, 'configs', '7b_lora.py')] + overrides)[0]
        lora = layout.adapter_shapes(cfg, args)
        plan = sum(layout.memory_plan(args, layout.ParallelArgs(), 1, seq, lora, layer_by_layer=True,
                                      frozen_bytes=layout.frozen_bytes(cfg)).values())
        seconds = [seq / r['tokens_per_s'] for r in records]  # each logged step's own time (the first compiles)
        print(f'big LoRA 7B (frozen base float16, rank 16 on wq/wk/wv/wo), 2 steps of 1 x {seq}: losses '
              f'{[round(r["loss"], 3) for r in records]}, peak RSS {peak / GB:.1f} GiB (plan {plan / GB:.1f} GiB), '
              f'steps {", ".join(f"{s:.0f}" for s in seconds)} s, {time.perf_counter() - start:.0f} s in all'
              + (', adapter saved' if os.path.exists(os.path.join(out, 'adapter.ckpt')) else ', NO ADAPTER'))
    finally:
        shutil.rmtree(out, ignore_errors=True)


CHAT = ['Hello there', 'Tell me a story about a cat', 'What did the cat do?', 'Who is Lily?', 'Where is the park?']


def bench_chat(repeats=5, max_new_tokens=48):
    """Time to first token of each turn of a five-turn greedy conversation with stories260K (compiled graphs warm),
    and of turn 5's prompt run from an empty cache: what the turn would cost if the cache did not hold the history."""
    params, args, _ = convert.load_model(STORIES260K)
    gen, tokenizer, sink = sample.Generator(params, args), data.Tokenizer(sample.DEFAULT_TOKENIZER), io.StringIO()

    def conversation():
        return sample.Chat(gen, tokenizer, data.VICUNA_SYSTEM, max_new_tokens, sample.Sampling(), 0)

    def five_turns():  # ms to the first token of turns 1-5, then of turn 5 from an empty cache; prompt lengths
        chat, times, lengths = conversation(), [], []
        for message in CHAT:
            chat.say(message, sink)
            times.append(chat.stats['first_token_ms'])
            lengths.append(f"{len(chat.stats['prompt_ids'])} ({chat.stats['computed']} run)")
        fresh = conversation()
        fresh.messages = chat.messages[:-2]
        fresh.say(CHAT[-1], sink)
        return times + [fresh.stats['first_token_ms']], lengths
    five_turns()  # compiles
    runs = [five_turns() for _ in range(repeats)]
    for turn in range(5):
        print(f'chat stories260K: turn {turn + 1}, prompt {runs[0][1][turn]} tokens: time to first token '
              f'{spread([times[turn] for times, _ in runs])} ms')
    print(f'chat stories260K: turn 5 from an empty cache: {spread([times[5] for times, _ in runs])} ms')


def stories260k_for_hf(directory):
    """The bundled model as a Hugging Face directory in `directory`, for the peer; its path."""
    hf_dir = os.path.join(directory, 'hf')
    convert.convert(STORIES260K, hf_dir, dst_format='hf')
    return hf_dir


def bench_samples():
    params, args, _ = convert.load_model(STORIES260K)
    peer, tmp = start_peer(), tempfile.mkdtemp()
    try:
        bench_sample('stories260K', params, args, run_c_tokens_per_s=2800, peer=peer,
                     hf_dir=peer and stories260k_for_hf(tmp))
    finally:
        shutil.rmtree(tmp)
    args15 = layout.model_args(dict(STORIES15M, max_seq_len=512))
    bench_sample('stories15M-shape', llama.init_params(args15, 0), args15)


MESH_MODEL = ['--config.model.dim=288', '--config.model.n_layers=6', '--config.model.n_heads=6',
              '--config.model.n_kv_heads=6', '--config.model.multiple_of=32']


def mesh_run(name, workers, argv, root, steps=12):
    """The tiny preset's data with a stories15M-shaped model (vocab 512) on `workers` msrun processes (1: this
    process's python, alone): rank 0's steady tokens/s (the median of steps 3+), and per rank the bytes of weights
    and AdamW moments it holds and its peak RSS (tests/mesh_runs.py reports them)."""
    out = os.path.join(root, name)
    argv = MESH_MODEL + [f'--config.train.out_dir={out}', f'--config.train.total_steps={steps}',
                         '--config.train.log_interval=1', '--config.train.ckpt_interval=1000', '--config.data.eval=',
                         '--config.train.warmup_ratio=0.0'] + argv
    spec = os.path.join(root, f'{name}.json')
    with open(spec, 'w') as f:
        json.dump({'out': root, 'scenarios': {name: {'kind': 'train', 'argv': argv}}}, f)
    runner = os.path.join(HERE, 'tests', 'mesh_runs.py')
    command = [sys.executable, runner, spec] if workers == 1 else \
        ['msrun', f'--worker_num={workers}', f'--local_worker_num={workers}', f'--master_port={8200 + workers}',
         '--join=True', f'--log_dir={os.path.join(root, name + "_logs")}', runner, spec]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, 'MS_WORKER_NUM': str(workers)})
    ranks = [json.load(open(os.path.join(root, name, f'rank_{r}.json'))) for r in range(workers)]
    logged = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl')) if 'tokens_per_s' in line]
    return float(np.median([r['tokens_per_s'] for r in logged[2:]])), ranks


def bench_mesh():
    """One process against 2 msrun processes split three ways (data, tensor, pipeline) at one global batch of 16
    rows of 128 tokens, on this machine's cores (a process of 2 gets half the threads of one alone): tokens/s, and per
    rank the state held and the peak RSS. The pipeline against one process layer by layer (the driver it schedules),
    for 2, 4 and 8 micro-batches; 1F1B's idle fraction is (pp - 1) / (micro + pp - 1)."""
    root = tempfile.mkdtemp(prefix='bench_mesh_')
    try:
        runs = {'1 process, one graph': (1, ['--config.train.batch_size=16']),
                'dp 2': (2, ['--config.train.batch_size=8']),
                'mp 2': (2, ['--config.train.batch_size=16', '--config.parallel.model_parallel=2']),
                'dp 2, optimizer shard': (2, ['--config.train.batch_size=8', '--config.parallel.optimizer_shard=True']),
                '1 process, layer by layer': (1, ['--config.train.batch_size=16', '--config.train.layerwise_from=1'])}
        for micro in (2, 4, 8):
            runs[f'pp 2, {micro} micro-batches'] = (2, [f'--config.train.batch_size={16 // micro}',
                                                         '--config.parallel.pipeline_stage=2',
                                                         f'--config.parallel.micro_batch_num={micro}'])
        print('mesh (stories15M shape, vocab 512, 16 x 128 tokens per step; state = weights + AdamW moments per rank)')
        speeds = {}
        for i, (name, (workers, argv)) in enumerate(runs.items()):
            tokens_per_s, ranks = mesh_run(f'run{i}', workers, argv, root)
            speeds[name] = tokens_per_s
            reference = speeds['1 process, layer by layer' if name.startswith('pp') else '1 process, one graph']
            state = ', '.join(f"{(r['state']['weights'] + r['state']['moments']) / 2 ** 20:.1f}" for r in ranks)
            rss = ', '.join(f"{r['peak_rss'] / 2 ** 20:.0f}" for r in ranks)
            print(f'  {name:28s} {tokens_per_s:8,.0f} tok/s ({tokens_per_s / reference:.2f}x)   state MB per rank: '
                  f'{state}   peak RSS MB per rank: {rss}')
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- Peers: PyTorch + transformers (requirements-bench.txt), in a subprocess of their own so neither framework's
# threads or allocator touch the other's; it waits on its stdin while ours runs, and the two alternate.

def peer_worker():
    """The peer process (`bench.py --peer`): each stdin line is a json [task, args]; each answer a json line."""
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    built = {}

    def train_window(steps=5, first=False):
        """Hugging Face's LlamaForCausalLM (SDPA attention) at the stories15M shape, PyTorch eager, AdamW and global-norm
        clipping as ours: seconds of one step (first) or of `steps` steps."""
        if 'train' not in built:
            args = layout.model_args(STORIES15M)
            config = transformers.LlamaConfig(**{k: v for k, v in convert.hf_config(args._asdict(), 'F32').items()
                                                 if k not in ('architectures', 'model_type', 'torch_dtype')},
                                              attn_implementation='sdpa')
            model = transformers.LlamaForCausalLM(config)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
            rows = torch.from_numpy(stories15m_batch(args).astype(np.int64))
            built['train'] = model, opt, rows[:, :-1], rows[:, 1:]
        model, opt, inputs, targets = built['train']

        def step():
            logits = model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return sum(timed(step, 1 if first else steps))

    def generate(hf_dir, batch, new_tokens):
        """Seconds of HF generate, greedy, from [BOS] rows, exactly new_tokens each; and row 0's ids."""
        if hf_dir not in built:
            built[hf_dir] = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        model, ids = built[hf_dir], torch.ones((batch, 1), dtype=torch.int64)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0)
        return time.perf_counter() - start, out[0, 1:].tolist()
    tasks = {'train_window': train_window, 'generate': generate}
    for line in sys.stdin:
        task, kwargs = json.loads(line)
        print(json.dumps(tasks[task](**kwargs)), flush=True)


class Peer:
    """The parent's end of peer_worker: peer('task', **args) -> its answer. PEER is None without torch."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--peer'], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1, env=peer_environment())

    def __call__(self, task, **kwargs):
        self.process.stdin.write(json.dumps([task, kwargs]) + '\n')
        answer = self.process.stdout.readline()
        if not answer:
            raise SystemExit(f'the peer process died during {task}')
        return json.loads(answer)


def peer_environment():
    """This process's environment for a peer. MindSpore's runtime sets OMP_NUM_THREADS=1 in the C environment,
    which a child inherits (PyTorch then runs on one thread: measured 0.65x); os.environ is the environment this
    process started with."""
    return {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}


def peers_installed():
    import importlib.util
    if all(importlib.util.find_spec(m) for m in ('torch', 'transformers')):
        return True
    print('peers: skipped (pip install -r requirements-bench.txt for PyTorch + transformers)')
    return False


def start_peer():
    return Peer() if peers_installed() else None


# A fresh process's HF generate of 60 greedy tokens from stories260K (the peer's start-up).
HF_STARTUP = """import sys, torch, transformers
model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    model.generate(torch.ones((1, 1), dtype=torch.int64), do_sample=False, max_new_tokens=60, pad_token_id=0)
"""


def bench_startup(pairs=3):
    """Fresh processes in pairs, each pair with a graph cache of its own: the first with it empty, the second
    loading what the first kept (MindSpore's compile cache, checkpoint.graph_cache). `python sample.py` (greedy, 60
    tokens after "Once upon a time"), wall time; the stories15M-shape train step's first step minus a steady one
    (compile_probe). The peer's fresh HF process beside the former."""
    def wall(command, env=None):
        start = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, cwd=HERE, env=env)
        if run.returncode:
            raise SystemExit(f'{command[1]} failed: {run.stderr.strip()[-2000:]}')
        return time.perf_counter() - start
    tmp = tempfile.mkdtemp()
    try:
        runs = []
        for i in range(pairs):
            command = [sys.executable, 'sample.py', '--temperature', '0', '--max_new_tokens', '60', '--prompt',
                       'Once upon a time', '--graph_cache', os.path.join(tmp, f'sample{i}')]
            runs.append((wall(command), wall(command)))
        cold, warm = zip(*runs)
        print(f'start-up: python sample.py (60 greedy tokens), a fresh process: empty graph cache {spread(cold)} s, '
              f'warm {spread(warm)} s; warm / cold, paired: {spread([100 * w / c for c, w in runs], 0)}%')
        if peers_installed():
            hf_dir = stories260k_for_hf(tmp)
            peer = [wall([sys.executable, '-c', HF_STARTUP, hf_dir], peer_environment()) for _ in range(pairs)]
            print(f'  peer: a fresh process loading stories260K in transformers and generating the same: '
                  f'{spread(peer)} s')
        runs = [[compile_seconds(STORIES15M, False, graph_cache=os.path.join(tmp, f'train{i}'))[0] for _ in range(2)]
                for i in range(2)]
        cold, warm = zip(*runs)
        print(f'  train stories15M-shape step, the first step minus a steady one, a fresh process: empty graph cache '
              f'{spread(cold)} s, warm {spread(warm)} s')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SECTIONS = {'matmul': bench_matmul, 'train': bench_train, 'compile': bench_compile, 'memory': bench_memory,
            'lora': bench_lora, 'sample': bench_samples, 'chat': bench_chat, 'data': bench_data,
            'convert': bench_convert, 'mesh': bench_mesh, 'startup': bench_startup, 'big': bench_big}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', help='comma-separated sections: ' + ', '.join(SECTIONS))
    parser.add_argument('--memory_probe', choices=['one graph', 'layerwise'], help=argparse.SUPPRESS)
    parser.add_argument('--compile_probe', help=argparse.SUPPRESS)
    parser.add_argument('--peer', action='store_true', help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.peer:
        return peer_worker()
    ms.set_context(mode=ms.GRAPH_MODE)
    if a.memory_probe:
        return train_memory_probe(a.memory_probe == 'layerwise')
    if a.compile_probe:
        return compile_probe(a.compile_probe)
    chosen = a.only.split(',') if a.only else [s for s in SECTIONS if s != 'big']  # big: 13.5 GB, minutes
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f'unknown sections {unknown}: choose from {", ".join(SECTIONS)}')
    for section in chosen:
        SECTIONS[section]()


if __name__ == '__main__':
    main()
