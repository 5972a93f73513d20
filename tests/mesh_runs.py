"""Run by the multi-process tests under msrun (not a test module): every scenario of a spec file, in turn, on this
launch's processes; each rank writes what it saw to <out>/<scenario>/rank_<r>.json.

    msrun --worker_num=4 ... python tests/mesh_runs.py spec.json

A spec is {"out": dir, "scenarios": {name: {"kind": "train" | "sample", "argv": [--config.x=y, ...]}}}. A train
scenario records the logged losses (and the signal that stopped it: "signal_rank" sends SIGTERM to that rank),
the state this rank holds when the run starts (bytes of weights and moments, and what layout.memory_plan says they
should be) and the sha256 of its final tensors; a sample scenario the ids
greedy decoding gives for a fixed prompt. Both record the process's peak RSS (bench.py reads it).
"""
import json
import math
import os
import resource
import signal
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('GLOG_v', '3')

import mindspore as ms  # noqa: E402

import comm  # noqa: E402
import layout  # noqa: E402
import sample  # noqa: E402
import step  # noqa: E402
import train  # noqa: E402
import util  # noqa: E402

PROMPT = [1, 403, 407, 261, 378]
ITEMSIZE = {ms.float32: 4, ms.float16: 2, ms.bfloat16: 2}


def state_bytes(cfg):
    """Bytes of the weights and AdamW moments this rank holds at the start of cfg's run, and what the memory plan
    says its stage holds."""
    cfg = cfg.copy_and_resolve_references()
    cfg.resume = False
    setup = step.prepare(cfg)
    state, frozen = train.initial_state(cfg, setup)[:2]

    def size(tree, itemsize=None):
        rest, layers = tree
        return sum(math.prod(t.shape) * (itemsize or ITEMSIZE[t.dtype]) for group in [rest] + layers
                   for t in group.values())
    lora = layout.adapter_shapes(cfg, setup.args)
    plan = layout.stage_memory(setup.args, setup.mesh.parallel, cfg.train.batch_size, layout.seq_length(cfg), lora,
                               layer_by_layer=setup.layer_by_layer,
                               frozen_bytes=layout.frozen_bytes(cfg))[setup.mesh.coords.stage]
    return {'weights': size(state['params']), 'moments': size(state['m']) + size(state['v']),
            'frozen': size(frozen) if frozen else 0, 'frozen_elements': size(frozen, 1) if frozen else 0,
            'plan_weights': plan['weights'], 'plan_gradients': plan['gradients'], 'plan_optimizer': plan['optimizer']}


def run(name, scenario, out):
    cfg, _ = util.parse_config(['train.py'] + scenario['argv'])
    result = {}
    if scenario['kind'] == 'sample':
        params, args, mesh, _, _ = sample.from_config(scenario['argv'])
        result['ids'] = sample.Generator(params, args).generate([PROMPT], 20)[0]
        rank = mesh.rank
    else:
        result['state'] = state_bytes(cfg)
        if comm.join_cluster()[0] == scenario.get('signal_rank'):
            signal_once_handled()
        try:
            records = train.train(cfg)
        except train.Stopped as e:  # after the save the signal asked for (train.py's main exits with 128 + it)
            records, result['stopped'] = [], e.signum
        result['losses'] = [r['loss'] for r in records if 'loss' in r]
        result['eval'] = [r['eval_loss'] for r in records if 'eval_loss' in r]
        rank = comm.join_cluster()[0]
    result['peak_rss'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    os.makedirs(os.path.join(out, name), exist_ok=True)
    with open(os.path.join(out, name, f'rank_{rank}.json'), 'w') as f:
        json.dump(result, f)


def signal_once_handled():
    """SIGTERM to this process, from another thread (as a scheduler sends it), once train.py's handler is installed:
    the run then stops after the step in progress."""
    def send():
        while not isinstance(getattr(signal.getsignal(signal.SIGTERM), '__self__', None), train.StopRequest):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=send, daemon=True).start()


def main():
    ms.set_context(mode=ms.GRAPH_MODE)
    spec = json.load(open(sys.argv[1]))
    for name, scenario in spec['scenarios'].items():
        run(name, scenario, spec['out'])


if __name__ == '__main__':
    main()
