"""C++ kernels (kernels.cc) for MindSpore on the CPU, where a few of its elementwise ops cost more than the work.

    ADAMW(p, m, v, g, scalars) -> p', m', v'   train.update's AdamW on one tensor in one pass over memory
    RMS_NORM(x, eps) -> y                       llama.rms_norm without a weight (decoding), one kernel for six
    QKV_ROPE(qkv, cos, sin, kv) -> q, k, v      llama.attention's operands from the fused projection (decoding):
                                                splits, RoPE and transposes in one kernel for seven
    RMS_NORM_WEIGHTED(x, w, eps) -> y           llama.rms_norm with its weight (training), forward and gradient
                                                one kernel each
    SOFTMAX(x)                                  ops.softmax over the last axis, its gradient one kernel for four
                                                (SoftmaxGrad; in training, attention's softmax backward)

ADAMW and QKV_ROPE compute what the MindSpore ops they replace compute, in their order, so the results are the same
bits; RMS_NORM and SOFTMAX's gradient the same sums in another order (all tested).
`build()` compiles kernels.cc once per machine with $CXX (else g++) into the user's cache directory, under a name from
the source's hash, checks the library on one number and says whether the kernels run; where they cannot (another
device, no compiler, an unwritable cache) it says why in one note and the MindSpore ops run instead.
"""
import functools
import hashlib
import os
import subprocess
import sys

import mindspore as ms
from mindspore import nn, ops

import convert

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels.cc')
ADAMW = RMS_NORM = RMS_NORM_WEIGHTED = QKV_ROPE = SOFTMAX = None  # set by build()


@functools.cache
def build(root):
    """Whether the kernels run here, their library kept in the directory root (checkpoint.GRAPH_CACHE); once they
    do, the module's ops are set."""
    global ADAMW, RMS_NORM, RMS_NORM_WEIGHTED, QKV_ROPE, SOFTMAX
    if ms.get_context('device_target') != 'CPU':
        return False  # other devices have MindSpore's own fused kernels
    try:
        if not os.path.exists(library(root)):
            compile_library(SOURCE, library(root))
        adamw = custom_op(root, 'AdamW', ('p', 'm', 'v', 'g', 'scalars'), ('new_p', 'new_m', 'new_v'))
        rms_norm = custom_op(root, 'RmsNorm', ('x', 'eps'), ('y',))
        qkv_rope = custom_op(root, 'QkvRope', ('qkv', 'cos', 'sin', 'kv'), ('q', 'k', 'v'))
        softmax = Softmax(custom_op(root, 'SoftmaxGrad', ('y', 'dy'), ('dx',)))
        rms_norm_weighted = RmsNorm(custom_op(root, 'RmsNormWeighted', ('x', 'w', 'eps'), ('y',)),
                                    custom_op(root, 'RmsNormWeightedGrad', ('x', 'w', 'eps', 'dy'), ('dx', 'dw')))
        one, zero = ms.Tensor([1.0]), ms.Tensor([0.0])  # p 1, g 1, no decay: the step is m / sqrt(v) = 1
        works = [x.asnumpy().tolist() for x in adamw(one, zero, zero, one, ms.Tensor([1.0, 1, 0, 1, 1, 0, 0]))] == \
            [[0.0], [1.0], [1.0]]  # the library loads and is this source's (the kernels themselves are tested)
    except (OSError, convert.ConvertError, subprocess.CalledProcessError, TypeError, RuntimeError) as e:
        reason = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        print(f'note: C++ kernels off, MindSpore\'s ops run instead ({reason})', file=sys.stderr)
        return False
    if not works:
        print(f'note: C++ kernels off: {library(root)} computes wrong numbers; delete it to rebuild it', file=sys.stderr)
        return False
    ADAMW, RMS_NORM, RMS_NORM_WEIGHTED, QKV_ROPE, SOFTMAX = adamw, rms_norm, rms_norm_weighted, qkv_rope, softmax
    return True


def library(root):
    """Where build keeps the library compiled from this kernels.cc."""
    with open(SOURCE, 'rb') as f:
        return os.path.join(root, f'kernels-{hashlib.sha256(f.read()).hexdigest()[:16]}.so')


def compile_library(source, path):
    """A shared library from one C++ source, through convert.atomic: a temporary renamed when complete, removed on
    failure, and a killed compile's removed by the next."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with convert.atomic(path) as partial:  # no -march=native: a cache may be shared by machines with different CPUs
        subprocess.run([os.environ.get('CXX', 'g++'), '-O3', '-fno-math-errno', '-ffp-contract=off', '-fPIC',
                        '-shared', '-pthread', '-o', partial, source], check=True, capture_output=True, text=True)


def custom_op(root, name, inputs, outputs):
    """The library's function `name` as a MindSpore op on fp32 tensors, its output shapes and types given by the
    library's nameInferShape and nameInferType (C++, because a graph returning dicts runs its kernels where a Python
    shape function cannot be called)."""
    signature = ops.CustomRegOp(name)
    for i, input_name in enumerate(inputs):
        signature = signature.input(i, input_name)
    for i, output_name in enumerate(outputs):
        signature = signature.output(i, output_name)
    signature = signature.dtype_format(*[ops.DataType.F32_Default] * (len(inputs) + len(outputs)))
    return ops.Custom(f'{library(root)}:{name}', None, None, func_type='aot', reg_info=signature.target('CPU').get_op_info())


class Softmax(nn.Cell):
    """MindSpore's softmax over the last axis, its gradient by the kernel softmax_grad."""

    def __init__(self, softmax_grad):
        super().__init__()
        self.softmax_grad = softmax_grad

    def construct(self, x):
        return ops.softmax(x, -1)

    def bprop(self, x, out, dout):
        return (self.softmax_grad(out, dout),)


class RmsNorm(nn.Cell):
    """RMSNorm with a weight by the kernels forward and backward (the gradient of x and of the weight)."""

    def __init__(self, forward, backward):
        super().__init__()
        self.forward, self.backward = forward, backward

    def construct(self, x, weight, eps):
        return self.forward(x, weight, eps)

    def bprop(self, x, weight, eps, out, dout):
        dx, dw = self.backward(x, weight, eps, dout)
        return dx, dw, ops.zeros_like(eps)
