"""The processes of a run and every collective between them, on MindSpore's communication package.

The same code runs on CPU (msrun, mccl), GPU (NCCL) and Ascend (HCCL), using only what all of them have: an
all-reduce (sum) over a group made with create_group. MindSpore 2.10 on CPU has no AllGather or Broadcast but on the
world group, no ReduceScatter and no Send/Receive (measured), so:
  * tensor parallelism is Megatron-LM's two custom-gradient all-reduces (CopyToGroup, ReduceFromGroup);
  * a gather is a sum of zero-padded copies (ModelParallel.gather, gather_rows);
  * a pipeline hand-off is an all-reduce over the two neighbours, the receiver contributing zeros (exchange).
Ranks are laid out as layout.Coords says.
"""
import functools
import math
import os

import numpy as np
import mindspore as ms
from mindspore import nn, ops

import layout


def launched():
    """How this process was started as one of a cluster's: 'msrun' (MS_WORKER_NUM > 1), 'rank table' (an HCCL rank
    table, RANK_TABLE_FILE with RANK_SIZE > 1), or None for a process on its own."""
    if int(os.environ.get('MS_WORKER_NUM', '1')) > 1:
        return 'msrun'
    if os.environ.get('RANK_TABLE_FILE') and int(os.environ.get('RANK_SIZE', '1')) > 1:
        return 'rank table'
    return None


@functools.cache  # MindSpore's init() runs once per process; later calls get the same answer
def join_cluster():
    """(rank, world size): started as a cluster's process (launched) this joins the cluster; otherwise the run is
    one process and (0, 1) is returned, so the same script runs both ways."""
    how = launched()
    if how is None:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init
    if how == 'rank table':
        ms.set_device(ms.get_context('device_target'), int(os.environ.get('DEVICE_ID', '0')))
    init()
    if ms.get_context('device_target') == 'CPU':  # workers share the host's cores
        local = int(os.environ.get('MS_LOCAL_WORKER', os.environ.get('MS_WORKER_NUM', '1')))
        ms.device_context.cpu.op_tuning.threads_num(max(1, (os.cpu_count() or 1) // local))
    return get_rank(), get_group_size()


class Mesh:
    """What a process knows of the run's processes: its place (layout.Coords), and an all-reduce (sum) over each of
    its groups: `data` (its data-parallel replicas), `world`, the pipeline neighbours `prev` and `next`, each None
    where the group would have one process; and `tp`, the tensor-parallel group the layers use (ModelParallel, or
    layout.SOLO for a group of one)."""

    def __init__(self, parallel, rank=0, world=1):
        self.parallel, self.rank, self.world = parallel, rank, world
        self.coords = layout.coords_of(rank, parallel)
        self.data = self.world_sum = self.prev = self.next = None
        self.tp = layout.SOLO
        if world == 1:
            return
        from mindspore.communication import create_group
        self.world_sum = ops.AllReduce()
        for name, ranks in layout.mesh_groups(rank, parallel).items():
            # both sides of a pipeline pair must name it alike (one's 'next' is the other's 'prev')
            group = ('pair' if name in ('prev', 'next') else name) + '-' + '-'.join(map(str, ranks))
            create_group(group, ranks)
            if name == 'model':
                self.tp = ModelParallel(group, len(ranks), ranks.index(rank))
            else:
                setattr(self, name, ops.AllReduce(group=group))

    def __eq__(self, other):  # by value, so that compiled steps cached on a mesh serve every run of the same mesh
        return isinstance(other, Mesh) and (self.parallel, self.rank, self.world) == \
            (other.parallel, other.rank, other.world)

    def __hash__(self):
        return hash((self.parallel, self.rank, self.world))

    @property
    def sharded(self):
        """Whether ranks hold different tensors (then each writes its own checkpoint)."""
        p = self.parallel
        return p.model_parallel > 1 or p.pipeline_stage > 1 or (p.optimizer_shard and p.data_parallel > 1)

    def owns_loss(self):
        """Whether this rank's loss and token counts go into the global ones: on the last stage, the first
        tensor-parallel rank of each data-parallel replica."""
        return self.coords.stage == self.parallel.pipeline_stage - 1 and self.coords.model == 0

    def barrier(self):
        """Wait for every process (MindSpore has no Barrier kernel on CPU; a blocking all-reduce is one)."""
        if self.world_sum is not None:
            self.world_sum(ms.Tensor(np.zeros(1, np.float32))).asnumpy()


# ----------------------------------------------------------------------------------------------------------------------
# Tensor parallelism: the collectives the sharding table implies (args.tp in llama.py)

class CopyToGroup(nn.Cell):
    """Megatron's f: identity forward, the gradient summed over the group (before column-parallel layers)."""

    def __init__(self, group):
        super().__init__()
        self.all_reduce = ops.AllReduce(group=group)

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.all_reduce(dout),)


class ReduceFromGroup(nn.Cell):
    """Megatron's g: the partial results summed over the group, identity backward (after row-parallel layers)."""

    def __init__(self, group):
        super().__init__()
        self.all_reduce = ops.AllReduce(group=group)

    def construct(self, x):
        return self.all_reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


class ModelParallel:
    """A tensor-parallel group: its size, this process's rank in it, and the collectives. A plain object of Cells:
    MindSpore's graphs call an object's attributes, but turn a NamedTuple of Cells into a tuple."""

    def __init__(self, group, size, rank):
        self.size, self.rank = size, rank
        self._copy, self._reduce = CopyToGroup(group), ReduceFromGroup(group)

    def copy(self, x):
        return self._copy(x)

    def reduce(self, x):
        return self._reduce(x)

    def gather(self, x):
        """Every rank's x concatenated along the last axis, forward only (a sum of zero-padded copies)."""
        every = self.reduce(ops.stack([x if r == self.rank else ops.zeros_like(x) for r in range(self.size)]))
        return ops.concat([every[r] for r in range(self.size)], -1)


# ----------------------------------------------------------------------------------------------------------------------
# Data parallelism: gradients in fused buckets, and the optimizer's sharded rows

def all_reduce_in_buckets(tensors, buckets, all_reduce):
    """{key: tensor} summed over a group with one all-reduce per bucket of concatenated, flattened tensors."""
    out = {k: v for k, v in tensors.items()}  # not dict(tensors): in a graph that is a Python object of unknown type
    flat = None
    for bucket in buckets:
        joined = ops.concat([tensors[key].reshape(-1) for key, _ in bucket])
        if flat is not None:  # one order on every rank: a graph may run independent all-reduces in any order
            joined = ops.depend(joined, flat)
        flat = all_reduce(joined)
        offset = 0
        for key, size in bucket:
            out[key] = flat[offset:offset + size].reshape(tensors[key].shape)
            offset += size
    return out


def gather_rows(params, before, rows, all_reduce):
    """The whole tensors again after each data-parallel rank updated its rows (optimizer_shard): each rank places its
    rows among zeros and one all-reduce sums them (adding zeros is exact). rows: {name: (first, count)} of this
    rank, not empty; before: the tensors before the update, for their shapes."""
    placed = {}
    for k, (first, count) in rows.items():
        # a pad, the same op on every rank (ranks' graphs must have one shape, or they order collectives apart)
        after = before[k].shape[0] - first - count
        placed[k] = ops.pad(params[k], (0, 0) * (len(before[k].shape) - 1) + (first, after))
    summed = all_reduce_in_buckets(placed, (tuple((k, math.prod(before[k].shape)) for k in rows),), all_reduce)
    out = {}
    for k, v in params.items():  # a loop: a dict comprehension with a condition mixed up the groups' outputs
        out[k] = summed[k] if k in rows else v
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline parallelism: the hand-off between neighbouring stages

def exchange(pair, upper, act=None, grad=None, carries=(True, False), shape=None):
    """One exchange with a pipeline neighbour: an all-reduce over the pair in which each side contributes what it
    sends and zeros for what it receives. carries: whether the exchange carries an activation (going up) and a
    gradient (coming down), which both sides know from the schedule; upper: this side is the upper stage (it
    receives the activation, sends the gradient). Returns (activation, gradient) in fp32, None where not carried."""
    parts = []
    if carries[0]:
        parts.append(ops.zeros(shape, ms.float32) if upper else act.astype(ms.float32))
    if carries[1]:
        parts.append(grad.astype(ms.float32) if upper else ops.zeros(shape, ms.float32))
    both = pair(ops.stack(parts))
    return (both[0] if carries[0] else None), (both[-1] if carries[1] else None)
