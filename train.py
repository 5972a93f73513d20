"""Train or evaluate a LLaMA.

    python train.py                                        # configs/tiny.py on the bundled WikiText-2
    python train.py --config configs/7b.py --config.data.train=wiki2048.mindrecord
    python train.py --config configs/tiny.py --config.resume=True   # continue from out_dir's newest checkpoint
    python train.py --config configs/65b.py --plan        # memory and throughput of a parallel config
    python train.py --plot out/tiny out/other mindformers.log   # runs' curves in one picture (monitor.py)
    msrun --worker_num=4 --local_worker_num=4 --master_port=8118 --join=True train.py \
        --config.parallel.model_parallel=2                 # data parallel 2 x tensor parallel 2

This file is the run: its checks, the setup, the loop and the command line. The step is step.py's (one compiled
graph, or layer by layer, which pipeline stages schedule), the optimizer optim.py's; the learning rate is an input,
so the schedule never recompiles. Checkpoints hold the weights under MindFormers' names, the model config,
AdamW's moments (`adam_m.*`, `adam_v.*`) and the position in the data; a sharded run writes one per rank.
SIGTERM or Ctrl-C saves a checkpoint after the current step, then exits with 128 + the signal (143, 130).
"""
import math
import os
import signal
import sys
import time

import util  # before numpy and MindSpore start threads: util.take_sigint

if __name__ == '__main__':
    util.take_sigint()
os.environ.setdefault('GLOG_v', '3')  # MindSpore's C++ warnings off, before it is imported
import mindspore as ms  # noqa: E402

import checkpoint  # noqa: E402
import convert  # noqa: E402
import data  # noqa: E402
import layout  # noqa: E402
import llama  # noqa: E402
import monitor  # noqa: E402
import optim  # noqa: E402
import step  # noqa: E402
from util import RunError  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------------
# The run

def train(cfg):
    """Run cfg (a ConfigDict); returns the list of logged records (on every rank; only rank 0 writes logs)."""
    setup = checked_setup(cfg)
    if cfg.mode == 'eval':
        return run_eval(cfg, setup)
    lock, run_id = claim_out_dir(cfg, setup.mesh)
    try:
        return run(cfg, setup, run_id)
    finally:
        lock.close()


def run(cfg, setup, run_id):
    """The run of train(): data, the starting state, then the loop, in out_dir, which this run holds."""
    t, mesh, parallel = cfg.train, setup.mesh, setup.mesh.parallel
    train_path = data_file(cfg.data.train, cfg, mesh)
    eval_path = data_file(cfg.data.eval, cfg, mesh) if cfg.data.eval else None
    micro = t.grad_accum * (parallel.micro_batch_num if parallel.pipeline_stage > 1 else 1)
    loader = data.Loader(train_path, t.batch_size, seed=t.seed, rank=mesh.coords.data, world=parallel.data_parallel,
                         columns=data.columns_of(train_path))
    total_steps = t.total_steps if t.total_steps > 0 else t.epochs * (loader.batches_per_epoch // micro)
    util.remove_stale_temporaries(checkpoint.directory(cfg, mesh), 'ckpt_*.ckpt')  # of saves cut short
    state, frozen, start_step, position = initial_state(cfg, setup)
    if position:
        loader.restore(position)
    log = monitor.Log(cfg, setup, total_steps, t.batch_size * micro * layout.seq_length(cfg) * parallel.data_parallel,
                      start_step)
    log.say(run_line(cfg, setup, total_steps, log))
    batches, stop = iter(loader), StopRequest()
    try:
        for i in range(start_step, total_steps):
            lr = optim.learning_rate(i, total_steps, t)
            micro_batches = [next(batches) for _ in range(micro)]
            first, began = i == start_step, time.perf_counter()
            with step.graph_cache(checkpoint.GRAPH_CACHE if t.graph_cache and first else '', setup, state, frozen,
                                  micro_batches) as found:
                state, metrics = step.train_step(state, frozen, micro_batches, lr, i, setup, stop.signal is not None)
            if first:
                metrics['loss'].asnumpy()
                log.say(f'first step {time.perf_counter() - began:.1f} s ({step.GRAPH_CACHE_NOTE[found]})')
            done = i + 1
            log.add(metrics)
            # every rank must stop at the same step: the votes are summed inside the step (read each step only then)
            stopping = float(metrics['stop'].asnumpy()) > 0 if mesh.world > 1 else stop.signal is not None
            save_now = done % t.ckpt_interval == 0 or done == total_steps or stopping
            if done % t.log_interval == 0 or save_now:
                log.step(done, lr, state)
            if eval_path and ((t.eval_interval and done % t.eval_interval == 0) or done == total_steps):
                eval_loss, _ = step.evaluate(state['params'], frozen,
                                             eval_batches(eval_path, cfg, mesh, t.eval_batches), setup)
                log.eval(done, eval_loss)
            if save_now:
                log.say(f'saved step {done} in {checkpoint.save(state, cfg, setup, loader.state(), done, run_id)}')
                log.restart()
            if stopping:
                log.say(f'stopped by a signal after step {done}; continue with --config.resume=True')
                raise Stopped(stop.signal or signal.SIGTERM)  # another rank's signal stops this one too
        if cfg.lora.rank:
            checkpoint.save_adapter(cfg, setup)
        if mesh.world > 1:
            print(f'rank {mesh.rank}: parameters sha256 {monitor.digest(state)}')
    finally:
        stop.restore()
        log.close()
    return log.records


def checked_setup(cfg):
    """The run's Setup (step.prepare), once its config makes a run that fits this machine."""
    ms.set_context(mode=ms.GRAPH_MODE)
    if cfg.mode not in ('pretrain', 'finetune', 'eval'):
        raise RunError(f'mode must be pretrain, finetune or eval, got {cfg.mode!r}')
    check_values(cfg)
    setup = step.prepare(cfg)
    if cfg.mode == 'eval':
        return setup
    if (cfg.mode == 'finetune' or cfg.lora.rank) and not cfg.load_checkpoint:
        raise RunError('fine-tuning and LoRA start from weights: pass --config.load_checkpoint=<checkpoint>')
    step.check_fits(cfg, setup)
    return setup


def claim_out_dir(cfg, mesh):
    """(the lock, the run's id): every rank takes an OS lock on its own file in out_dir (util.lock_file: it ends
    with its process), and rank 0 draws the id that marks the run's rank files as one set (checkpoint.save). One
    all-reduce gives every rank both, so when another run holds out_dir every rank refuses, naming it."""
    lock, holder = util.lock_file(os.path.join(cfg.train.out_dir, '.lock' + (f'.rank{mesh.rank}' if mesh.rank else '')))
    drawn = float(int.from_bytes(os.urandom(3), 'little')) if mesh.rank == 0 else 0.0  # 24 bits: exact in fp32
    votes = ms.Tensor([float(holder is not None), drawn], ms.float32)
    refused, run_id = (votes if mesh.world_sum is None else mesh.world_sum(votes)).asnumpy().tolist()
    if refused:
        if lock:
            lock.close()
        raise RunError(f'train.out_dir {cfg.train.out_dir} is in use by another run ({holder or "on another rank"}): '
                       f'wait for it to end, or choose another out_dir')
    return lock, int(run_id)


def run_line(cfg, setup, total_steps, log):
    """What the run does, in one line."""
    mesh, parallel = setup.mesh, setup.mesh.parallel
    return (f'training {total_steps} steps of {log.tokens_per_step} tokens'
            + (f' on {mesh.world} processes (data_parallel {parallel.data_parallel} x model_parallel '
               f'{parallel.model_parallel} x pipeline_stage {parallel.pipeline_stage})' if mesh.world > 1 else '')
            + (', layer by layer' if setup.layer_by_layer else '')
            + (f', LoRA rank {cfg.lora.rank}' if cfg.lora.rank else '') + f'; MFU against {log.peak / 1e9:.0f} GFLOP/s')


def check_values(cfg):
    """Refuse training settings that make no run, in one line naming each; make out_dir."""
    problems = layout.training_problems(cfg)
    if problems:
        raise RunError('; '.join(problems))
    writable_directory(cfg.train.out_dir)


def writable_directory(path):
    """Create path, or say in one line why it cannot be written (under a file, in /proc, no permission)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write-test-{os.getpid()}')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise RunError(f'train.out_dir {path} is not a writable directory ({e.strerror}): choose another') from e


def data_file(path, cfg, mesh):
    """The MindRecord for a data path (text is preprocessed by the first process while the others wait)."""
    args = (util.resolve(path), util.resolve(cfg.data.tokenizer), layout.seq_length(cfg), cfg.model.vocab_size,
            cfg.train.out_dir)
    if mesh.rank == 0:
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        data.prepared(*args)
    mesh.barrier()
    return data.prepared(*args, write=False)


def initial_state(cfg, setup):
    """(state, frozen base or None, first step, data position): from the newest checkpoint when resuming (on any
    mesh), else from load_checkpoint or a random init; with LoRA the state holds only the adapters."""
    t, args, mesh = cfg.train, setup.args, setup.mesh
    base = util.resolve(cfg.load_checkpoint)
    frozen = checkpoint.load_weights(base, cfg, setup, frozen=True) if cfg.lora.rank else None
    note = (lambda text: print(f'note: resuming, {text}', file=sys.stderr)) if mesh.rank == 0 else None
    path = convert.newest_checkpoint(t.out_dir, note) if cfg.resume else None
    if path:
        state, done, position = checkpoint.restore(path, cfg, setup)
        if mesh.rank == 0:
            print(f'resumed from {path} at step {done}')
        return state, frozen, done, position
    if cfg.load_checkpoint and not cfg.lora.rank:
        return optim.init_state(checkpoint.load_weights(base, cfg, setup), t.loss_scale, setup.plan), frozen, 0, None
    parts = layout.local_layout(layout.trainable_shapes(cfg, args), args.n_layers, mesh.parallel, mesh.coords)

    def take(name, value):  # every rank draws each whole tensor in turn, and keeps its part
        return value[tuple(slice(a, b) for a, b in parts[name])] if name in parts else None
    drawn = llama.init_lora(args, cfg.lora.rank, cfg.lora.targets, t.seed, take) if cfg.lora.rank else \
        llama.init_params(args, t.seed, take)
    return optim.init_state(checkpoint.stage_split(drawn, setup), t.loss_scale, setup.plan), frozen, 0, None


def eval_batches(path, cfg, mesh, limit=0):
    """Eval batches of batch_size rows per data-parallel replica (step.replica_part gives each its share)."""
    return data.eval_batches(path, cfg.train.batch_size * mesh.parallel.data_parallel, limit)


def run_eval(cfg, setup):
    """mode=eval: loss and perplexity of load_checkpoint (+ a LoRA adapter) on data.eval (else data.train)."""
    if not cfg.load_checkpoint:
        raise RunError('mode=eval needs --config.load_checkpoint=<checkpoint to evaluate>')
    trainable, frozen = checkpoint.load_weights(util.resolve(cfg.load_checkpoint), cfg, setup, frozen=True), None
    if cfg.lora.adapter:  # this process's slices of the adapter, on top of the weights
        adapter, args = convert.load_adapter(util.resolve(cfg.lora.adapter), setup.args)
        setup = setup._replace(args=args)
        shapes = {k: tuple(v.shape) for k, v in adapter.items()}

        def read(k, index):
            return adapter[k].asnumpy()[index]
        trainable, frozen = checkpoint.local_part(read, shapes, setup), trainable
    path = data_file(cfg.data.eval or cfg.data.train, cfg, setup.mesh)
    loss, tokens = step.evaluate(trainable, frozen, eval_batches(path, cfg, setup.mesh), setup)
    if setup.mesh.rank == 0:
        print(f'eval {path}: {int(tokens)} tokens, loss {loss:.6f}, perplexity {math.exp(loss):.4f}')
    return [{'eval_loss': loss, 'perplexity': math.exp(loss), 'tokens': tokens}]


# ----------------------------------------------------------------------------------------------------------------------
# Signals and the command line

class Stopped(Exception):
    """Raised after the save a signal asked for: the process exits with 128 + the signal, as the shell reports it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step, so the run saves before it exits."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signal = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def main(argv=None):
    argv = argv or sys.argv
    try:
        if '--plot' in argv[1:]:  # python train.py --plot RUN... [--out PNG]: overlay runs' curves in one picture
            return monitor.plot_command(argv[1:])
        cfg, plan = util.parse_config(argv)
        layout.print_plan(cfg) if plan else train(cfg)
    except (RunError, util.ConvertError, data.DataError, ValueError) as e:
        sys.exit(f'error: {e}')
    except Stopped as e:  # saved; non-zero so that a scheduler sees the run did not finish
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C before the loop's handler is installed (start-up, preprocessing)
        print('error: interrupted before training started; nothing was saved', file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == '__main__':
    main()
