"""What a run shows of itself: a log line per log_interval steps and eval, the same records as JSON in
out_dir/log.jsonl, tokens/s and MFU.
"""
import functools
import hashlib
import json
import math
import os
import time

import numpy as np
import mindspore as ms

import convert
import layout


class RunError(Exception):
    """A run that cannot start or continue; the message says what to do."""


class Log:
    """The run's records: a line every log_interval steps and at each eval, printed by the first process, kept in
    `records` and appended to out_dir/log.jsonl as JSON; tokens/s and MFU over the steps since the last line."""

    def __init__(self, cfg, setup, total_steps, tokens_per_step):
        self.cfg, self.total_steps, self.tokens_per_step, self.main = cfg, total_steps, tokens_per_step, \
            setup.mesh.rank == 0
        self.world, self.flops = setup.mesh.world, layout.flops_per_token(setup.args, cfg.data.seq_length or cfg.model.max_seq_len)
        self.peak = cfg.train.peak_tflops * 1e12 or measured_matmul_flops()
        self.file = open(os.path.join(cfg.train.out_dir, 'log.jsonl'), 'a') if self.main else None
        self.records, self.steps, self.start = [], 0, time.time()

    def say(self, line):
        if self.main:
            print(line)

    def write(self, record):
        self.records.append(record)
        if self.file:
            self.file.write(json.dumps(record) + '\n')
            self.file.flush()

    def step(self, done, lr, metrics, state):
        """Log step done; a non-finite loss or gradient without loss scaling stops the run, before anything
        non-finite is saved, naming the last good checkpoint."""
        loss, grad_norm = float(metrics['loss'].asnumpy()), float(metrics['grad_norm'].asnumpy())
        t = self.cfg.train
        if not t.loss_scale and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise RunError(f'loss {loss}, gradient norm {grad_norm} at step {done}: lower the learning rate or use '
                           f'loss scaling; the last good checkpoint is {convert.newest_checkpoint(t.out_dir)}')
        elapsed = time.time() - self.start
        tokens_per_s = self.steps * self.tokens_per_step / elapsed
        record = {'step': done, 'loss': loss, 'lr': lr, 'grad_norm': grad_norm, 'tokens_per_s': tokens_per_s,
                  'mfu': tokens_per_s * self.flops / self.peak / self.world,
                  'eta_s': (self.total_steps - done) * elapsed / self.steps,
                  'loss_scale': float(state['counters'][1].asnumpy())}
        self.say(f"step {done}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                 f"{tokens_per_s:,.0f} tok/s MFU {100 * record['mfu']:.1f}% ETA {record['eta_s']:.0f}s"
                 + (f" loss_scale {record['loss_scale']:g}" if t.loss_scale else ''))
        self.write(record)
        self.restart()

    def restart(self):
        """Time from here: what came between (evals, saves) is not the steps' time."""
        self.steps, self.start = 0, time.time()

    def close(self):
        if self.file:
            self.file.close()



@functools.cache
def measured_matmul_flops(n=1024, repeats=5):
    """This machine's fp32 matmul throughput (FLOP/s) through MindSpore: the peak MFU is measured against on CPU."""
    a = ms.Tensor(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    matmul = ms.jit(ms.ops.matmul)
    matmul(a, a).asnumpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).asnumpy()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / float(np.median(times))


def digest(state):
    """sha256 of every trainable tensor's bytes: equal on all data-parallel ranks when they stay in sync."""
    digest = hashlib.sha256()
    rest, layers = state['params']
    for group in [rest] + layers:
        for k in sorted(group):
            digest.update(group[k].asnumpy().tobytes())
    return digest.hexdigest()


def drop_records_after(path, step):
    """Rewrite log.jsonl without the records of steps after `step` (a resumed run logs them again), atomically."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get('step', 0) <= step]
    with convert.atomic(path) as tmp, open(tmp, 'w') as f:
        f.writelines(lines)
