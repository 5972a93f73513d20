"""Train or evaluate a LLaMA.

    python train.py                                        # configs/tiny.py on the bundled WikiText-2
    python train.py --config configs/7b.py --config.data.train=wiki2048.mindrecord
    python train.py --config configs/tiny.py --config.train.resume=True

One compiled step does the forward, the backward, global-norm clipping and AdamW (fp32 state) on a dict of named
tensors; the learning rate is an input, so the schedule never recompiles. Checkpoints hold the weights under
MindFormers' names, the model config, AdamW's moments (`adam_m.*`, `adam_v.*`) and the position in the data.
"""
import functools
import glob
import hashlib
import json
import math
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
import llama  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GB = 1024 ** 3


class RunError(Exception):
    """A run that cannot start or continue; the message says what to do."""


def resolve(path):
    """Paths in configs are relative to the working directory, or else to this repository (bundled assets)."""
    if not path or os.path.isabs(path) or glob.glob(path):
        return path
    bundled = os.path.join(HERE, path)
    return bundled if glob.glob(bundled) else path


# ----------------------------------------------------------------------------------------------------------------------
# Learning rate and optimizer (pure functions over dicts of tensors)

def learning_rate(step, total_steps, t):
    """MindFormers' CosineWithWarmUpLR: linear warmup for int(total * warmup_ratio) steps, then cosine to lr_end."""
    warmup = int(total_steps * t.warmup_ratio)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return t.lr_end + (t.lr - t.lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class OptimizerArgs(NamedTuple):
    """AdamW's constants, closed over by the compiled step."""
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction: bool
    grad_clip: float


def decays(name):
    """Weight decay applies to matrices, never to norm weights."""
    return not name.endswith(('norm.weight', 'norm_out.weight'))


def clip_by_global_norm(grads, max_norm):
    norm = ops.sqrt(sum((g * g).sum() for g in grads.values()))
    if not max_norm:
        return grads, norm
    scale = max_norm / ops.maximum(norm, max_norm)
    return {k: g * scale for k, g in grads.items()}, norm


def adamw(state, grads, lr, opt):
    """One AdamW step with fp32 moments and decoupled weight decay; returns the new state."""
    step = state['step'] + 1
    t = step.astype(ms.float32)
    m_scale = 1.0 / (1.0 - ops.pow(opt.beta1, t)) if opt.bias_correction else 1.0
    v_scale = 1.0 / (1.0 - ops.pow(opt.beta2, t)) if opt.bias_correction else 1.0
    params, m, v = {}, {}, {}
    for k, p in state['params'].items():
        g = grads[k]
        m[k] = opt.beta1 * state['adam_m'][k] + (1.0 - opt.beta1) * g
        v[k] = opt.beta2 * state['adam_v'][k] + (1.0 - opt.beta2) * g * g
        update = m[k] * m_scale / (ops.sqrt(v[k] * v_scale) + opt.eps)
        if opt.weight_decay and decays(k):
            update = update + opt.weight_decay * p
        params[k] = p - lr * update
    return {'params': params, 'adam_m': m, 'adam_v': v, 'step': step}


def init_state(params):
    return {'params': params, 'adam_m': {k: ops.zeros_like(v) for k, v in params.items()},
            'adam_v': {k: ops.zeros_like(v) for k, v in params.items()}, 'step': ms.Tensor(0, ms.int32)}


# ----------------------------------------------------------------------------------------------------------------------
# Compiled steps (cached per model shape and optimizer constants, so every caller shares the graphs)

@functools.cache
def compiled_steps(args, opt):

    def summed_loss(params, batch):
        """Loss summed over scored tokens (so micro-batches add up exactly); the mean and count ride along."""
        loss, n_tokens = llama.loss_fn(params, batch[0], args, batch[1] if len(batch) > 1 else None)
        return loss * n_tokens, (loss, n_tokens)

    grad_fn = ms.value_and_grad(summed_loss, grad_position=0, has_aux=True)

    def apply(state, grad_sum, n_tokens, lr):
        grads = {k: g / ops.maximum(n_tokens, 1.0) for k, g in grad_sum.items()}
        grads, grad_norm = clip_by_global_norm(grads, opt.grad_clip)
        return adamw(state, grads, lr, opt), grad_norm

    @ms.jit
    def train_step(state, batch, lr):
        (_, (loss, n_tokens)), grad_sum = grad_fn(state['params'], batch)
        state, grad_norm = apply(state, grad_sum, n_tokens, lr)
        return state, loss, grad_norm

    @ms.jit
    def micro_grads(params, batch):
        (_, (loss, n_tokens)), grad_sum = grad_fn(params, batch)
        return grad_sum, loss * n_tokens, n_tokens

    @ms.jit
    def add_grads(acc, grad_sum):
        return {k: acc[k] + g for k, g in grad_sum.items()}

    @ms.jit
    def apply_step(state, grad_sum, n_tokens, lr):
        return apply(state, grad_sum, n_tokens, lr)

    @ms.jit
    def eval_step(params, batch):
        loss, n_tokens = llama.loss_fn(params, batch[0], args, batch[1] if len(batch) > 1 else None)
        return loss * n_tokens, n_tokens

    return train_step, micro_grads, add_grads, apply_step, eval_step


def as_tensors(batch):
    """A batch (tuple of arrays) as a jit input. Without mutable, jit treats a tuple as a constant and recompiles."""
    return ms.mutable(tuple(ms.Tensor(x) for x in batch))


def train_step(state, micro_batches, lr, args, opt):
    """One optimizer step over a list of micro-batches (each a tuple of int32 arrays). Returns state, loss, grad norm.

    One micro-batch runs as a single compiled graph; more accumulate token-weighted gradient sums first, so the
    result equals one big batch."""
    fused, micro_grads, add_grads, apply_step, _ = compiled_steps(args, opt)
    lr = ms.Tensor(lr, ms.float32)
    if len(micro_batches) == 1:
        return fused(ms.mutable(state), as_tensors(micro_batches[0]), lr)
    grad_sum, loss_sum, n_tokens = None, 0.0, 0.0
    for batch in micro_batches:
        g, l_sum, n = micro_grads(ms.mutable(state['params']), as_tensors(batch))
        grad_sum = g if grad_sum is None else add_grads(ms.mutable(grad_sum), ms.mutable(g))
        loss_sum, n_tokens = loss_sum + l_sum, n_tokens + n
    state, grad_norm = apply_step(ms.mutable(state), ms.mutable(grad_sum), n_tokens, lr)
    return state, loss_sum / ops.maximum(n_tokens, 1.0), grad_norm


def evaluate(params, loader, n_batches, args):
    """Mean loss over scored tokens of the first n_batches batches (0 = all of them)."""
    eval_step = compiled_steps(args, OptimizerArgs(0.9, 0.95, 1e-8, 0.0, True, 1.0))[-1]
    total, count = 0.0, 0.0
    n_batches = n_batches or loader.batches_per_epoch
    for i, batch in zip(range(n_batches), loader):
        loss_sum, n = eval_step(ms.mutable(params), as_tensors(batch))
        total, count = total + float(loss_sum.asnumpy()), count + float(n.asnumpy())
    return total / max(count, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Throughput and memory

def flops_per_token(args, seq_len):
    """Training FLOPs per token: 6 x (parameters in matmuls) + 12 x layers x dim x seq_len (attention scores and
    mixing, forward and backward), the PaLM count. Norm weights and the embedding lookup are not matmuls; a tied
    lm_head is."""
    shapes = llama.param_shapes(args)
    matmul_params = sum(math.prod(s) for k, s in shapes.items() if len(s) == 2 and k != llama.EMBEDDING)
    matmul_params += args.vocab_size * args.dim if args.tie_embeddings else 0
    return 6 * matmul_params + 12 * args.n_layers * args.dim * seq_len


@functools.cache
def measured_matmul_flops(n=1024, repeats=5):
    """This machine's fp32 matmul throughput (FLOP/s) through MindSpore: the peak MFU is measured against on CPU."""
    a = ms.Tensor(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    matmul = ms.jit(ms.ops.matmul)
    matmul(a, a).asnumpy()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, a).asnumpy()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / float(np.median(times))


def memory_needed(args, batch_size, seq_len):
    """Bytes a single-device training run holds: fp32 weights, gradients and two AdamW moments, a compute-dtype copy
    of the weights when it is not fp32, and activations (Korthikanti et al. 2022: seq x batch x dim x (34 + 5 x heads
    x seq / dim) bytes per layer with 16-bit activations, scaled to the compute dtype, plus fp32 logits three times)."""
    n = llama.count_params(args)
    act_bytes = 4 if args.compute_dtype == 'float32' else 2
    activations = (args.n_layers * seq_len * batch_size * args.dim * (34 + 5 * args.n_heads * seq_len / args.dim)
                   * act_bytes / 2 + 3 * 4 * batch_size * seq_len * args.vocab_size)
    parts = {'weights': 4 * n, 'gradients': 4 * n, 'optimizer': 8 * n,
             'compute copy': 0 if args.compute_dtype == 'float32' else 2 * n, 'activations': activations}
    return parts


def check_fits(args, cfg):
    import psutil
    parts = memory_needed(args, cfg.train.batch_size, cfg.data.seq_length)
    total = sum(parts.values())
    budget = cfg.train.max_memory_gb * GB or psutil.virtual_memory().available
    print(f'model: {llama.count_params(args):,} parameters; training needs ~{total / GB:.1f} GB ('
          + ', '.join(f'{k} {v / GB:.1f}' for k, v in parts.items() if v) + ')')
    if total > budget:
        raise RunError(f'this run needs ~{total / GB:.1f} GB but only {budget / GB:.1f} GB is available: use a smaller '
                       f'model (configs/tiny.py), a smaller batch, or more devices')


# ----------------------------------------------------------------------------------------------------------------------
# Data

def prepare_dataset(path, cfg, rank=0):
    """A .mindrecord is used as is; text files are preprocessed (WikiText rules) once into out_dir/data."""
    path = resolve(path)
    if path.endswith('.mindrecord'):
        return path
    tokenizer_path = resolve(cfg.data.tokenizer)
    files = data.expand_glob(path)
    key = hashlib.sha1(json.dumps([files, os.path.getsize(tokenizer_path) if os.path.isfile(tokenizer_path) else 0,
                                   cfg.data.seq_length]).encode()).hexdigest()[:10]
    out = os.path.join(cfg.train.out_dir, 'data', f'{os.path.basename(files[0])}.{cfg.data.seq_length}.{key}.mindrecord')
    if not os.path.isfile(out + '.db') and rank == 0:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tokenizer = data.Tokenizer(tokenizer_path)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise RunError(f'tokenizer {tokenizer_path} has {tokenizer.vocab_size} pieces, more than the model\'s '
                           f'vocab_size {cfg.model.vocab_size}')
        n = data.write_mindrecord(data.wiki_rows(path, tokenizer, cfg.data.seq_length), out, data.SCHEMAS['wiki'])
        print(f'preprocessed {path} -> {out} ({n} rows of {cfg.data.seq_length + 1} tokens)')
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints

def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f'ckpt_{step:08d}.ckpt')


def list_checkpoints(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, 'ckpt_[0-9]*[0-9].ckpt')))


def save_state(state, cfg, loader_state, step):
    tensors = dict(state['params'])
    tensors.update({f'adam_m.{k}': v for k, v in state['adam_m'].items()})
    tensors.update({f'adam_v.{k}': v for k, v in state['adam_v'].items()})
    extra = {'global_step': int(step), 'data_position': json.dumps(loader_state), 'run_config': cfg.to_json()}
    path = checkpoint_path(cfg.train.out_dir, step)
    convert.save_checkpoint(path, tensors, cfg.model.to_dict(), extra)
    for old in list_checkpoints(cfg.train.out_dir)[:-cfg.train.keep_checkpoints]:
        os.remove(old)
    return path


def restore_state(path, args):
    """A training checkpoint -> (state, step, data position)."""
    tensors, _, extra = convert.read_checkpoint(path)
    params = {k: v for k, v in tensors.items() if not k.startswith(('adam_m.', 'adam_v.'))}
    try:
        llama.check_params(params, args)
    except ValueError as e:
        raise RunError(f'{path}: {e}') from e
    missing = [k for k in params if f'adam_m.{k}' not in tensors or f'adam_v.{k}' not in tensors]
    if missing:
        raise RunError(f'{path} has no optimizer state for {missing[0]}: it is not a training checkpoint')
    state = {'params': {k: ms.Tensor(v) for k, v in params.items()},
             'adam_m': {k: ms.Tensor(tensors[f'adam_m.{k}']) for k in params},
             'adam_v': {k: ms.Tensor(tensors[f'adam_v.{k}']) for k in params},
             'step': ms.Tensor(int(extra['global_step']), ms.int32)}
    return state, int(extra['global_step']), json.loads(extra['data_position'])


# ----------------------------------------------------------------------------------------------------------------------
# The run

def train(cfg):
    """Run cfg (a ConfigDict); returns the list of logged records."""
    ms.set_context(mode=ms.GRAPH_MODE)
    t = cfg.train
    try:
        args = llama.model_args(cfg.model)
    except ValueError as e:
        raise RunError(f'bad model config: {e}') from e
    if args.compute_dtype == 'bfloat16' and ms.get_context('device_target') == 'CPU':
        raise RunError('bfloat16 compute does not exist on CPU: use --config.model.compute_dtype=float32')
    check_fits(args, cfg)
    os.makedirs(t.out_dir, exist_ok=True)
    opt = OptimizerArgs(t.beta1, t.beta2, t.eps, t.weight_decay, t.bias_correction, t.grad_clip)

    loader = data.Loader(prepare_dataset(cfg.data.train, cfg), t.batch_size, seed=t.seed)
    eval_loader = data.Loader(prepare_dataset(cfg.data.eval, cfg), t.batch_size, shuffle=False) \
        if cfg.data.eval else None
    steps_per_epoch = loader.batches_per_epoch // t.grad_accum
    total_steps = t.total_steps if t.total_steps > 0 else t.epochs * steps_per_epoch

    start_step = 0
    if t.resume and list_checkpoints(t.out_dir):
        path = list_checkpoints(t.out_dir)[-1]
        state, start_step, position = restore_state(path, args)
        loader.restore(position)
        print(f'resumed from {path} at step {start_step}')
    elif t.init_from:
        params, _, file_config = convert.load_model(resolve(t.init_from))
        try:
            llama.check_params(params, args)
        except ValueError as e:
            raise RunError(f'{t.init_from}: {e}') from e
        differing = {k: v for k, v in file_config.items() if k in cfg.model and cfg.model[k] != v}
        if differing:
            print(f'note: {t.init_from} was saved with {differing}; this run uses the config\'s values')
        state = init_state(params)
    else:
        state = init_state(llama.init_params(args, t.seed))

    peak = t.peak_tflops * 1e12 or measured_matmul_flops()
    flops = flops_per_token(args, cfg.data.seq_length)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_length
    log_file = open(os.path.join(t.out_dir, 'log.jsonl'), 'a')
    records, batches = [], iter(loader)
    print(f'training {total_steps} steps of {tokens_per_step} tokens; MFU against {peak / 1e9:.0f} GFLOP/s')
    window_start, window_steps = time.time(), 0
    for step in range(start_step, total_steps):
        lr = learning_rate(step, total_steps, t)
        state, loss, grad_norm = train_step(state, [next(batches) for _ in range(t.grad_accum)], lr, args, opt)
        window_steps += 1
        done = step + 1
        if done % t.log_interval == 0 or done == total_steps:
            loss = float(loss.asnumpy())
            if not math.isfinite(loss):
                raise RunError(f'loss is {loss} at step {done}: lower the learning rate; the last good checkpoint '
                               f'is {(list_checkpoints(t.out_dir) or ["(none)"])[-1]}')
            elapsed = time.time() - window_start
            tokens_per_s = window_steps * tokens_per_step / elapsed
            record = {'step': done, 'loss': loss, 'lr': lr, 'grad_norm': float(grad_norm.asnumpy()),
                      'tokens_per_s': tokens_per_s, 'mfu': tokens_per_s * flops / peak,
                      'eta_s': (total_steps - done) * elapsed / window_steps}
            print(f"step {done}/{total_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {record['grad_norm']:.3f} "
                  f"{tokens_per_s:,.0f} tok/s MFU {100 * record['mfu']:.1f}% ETA {record['eta_s']:.0f}s")
            records.append(record)
            log_file.write(json.dumps(record) + '\n')
            log_file.flush()
            window_start, window_steps = time.time(), 0
        if eval_loader and ((t.eval_interval and done % t.eval_interval == 0) or done == total_steps):
            eval_loss = evaluate(state['params'], eval_loader, t.eval_batches, args)
            eval_loader.restore({'epoch': 0, 'batch': 0})
            print(f'step {done} eval loss {eval_loss:.4f} perplexity {math.exp(eval_loss):.2f}')
            record = {'step': done, 'eval_loss': eval_loss}
            records.append(record)
            log_file.write(json.dumps(record) + '\n')
            window_start = time.time()
        if done % t.ckpt_interval == 0 or done == total_steps:
            print(f'saved {save_state(state, cfg, loader.state(), done)}')
            window_start = time.time()
    log_file.close()
    return records


def parse_config(argv):
    """The config file and its --config.x=y overrides, locked (a typo is an error, not a new field)."""
    from absl import flags
    from ml_collections import config_flags
    flag_values = flags.FlagValues()
    try:
        config = config_flags.DEFINE_config_file('config', os.path.join(HERE, 'configs', 'tiny.py'),
                                                 flag_values=flag_values, lock_config=True, sys_argv=argv)
        rest = flag_values(argv)
        cfg = config.value
        cfg.train  # a config file that failed to load raises only when first used
    except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        lines = str(e).splitlines()
        if 'Failed loading config file' in str(e):  # keep the attempted path and its error, drop the preamble
            lines = lines[-2:]
        message = ' '.join(' '.join(lines).replace('\\n', ' ').split()).replace("'", '').replace('\\', '')
        raise RunError(f'bad configuration: {message} (configs/base.py lists every field)') from e
    if len(rest) > 1:
        raise RunError(f'unexpected arguments {rest[1:]}: options look like --config.train.lr=1e-3')
    return cfg


def main(argv=None):
    try:
        train(parse_config(argv or sys.argv))
    except (RunError, convert.ConvertError, data.DataError) as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
