"""C++ kernels (kernels.cc) for MindSpore on the CPU, where a few of its elementwise ops cost more than the work.

    adamw(p, m, v, g, scalars) -> p', m', v'   optim.update's AdamW on one tensor in one pass over memory
    rms_norm(x, eps) -> y                       llama.rms_norm without a weight (decoding), one kernel for six
    qkv_rope(qkv, cos, sin, kv) -> q, k, v      llama.attention's operands from the fused projection (decoding):
                                                splits, RoPE and transposes in one kernel for seven
    rms_norm_weighted(x, w, eps) -> y           llama.rms_norm with its weight (training), forward and gradient
                                                one kernel each
    softmax(x)                                  ops.softmax over the last axis, its gradient one kernel for four
                                                (SoftmaxGrad; in training, attention's softmax backward)
    linear16(x, w) -> y                         x [M, K] fp32 @ w [N, K]^T with w held in float16 or bfloat16,
                                                widened as it is read (decoding: one pass over 16-bit weights)

adamw and qkv_rope compute what the MindSpore ops they replace compute, in their order, so the results are the same
bits; rms_norm, softmax's gradient and linear16 the same sums in another order (all tested).
`build()` compiles kernels.cc once per machine with $CXX (else g++) into the user's cache directory, under a name from
the source's hash, checks the library on one number and returns the Kernels, a value the run passes to the model
and the optimizer; where they cannot run (another device, no compiler, an unwritable cache) it says why in one note,
returns None, and the MindSpore ops run instead.
"""
import functools
import hashlib
import os
import subprocess
import sys

import mindspore as ms
from mindspore import nn, ops

from util import ConvertError, atomic

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels.cc')


class Kernels:
    """The kernels of one library, each an op (or a Cell with its gradient): what `build` returns and the model
    (ModelArgs.kernels) and the optimizer (OptimizerArgs.kernels) are given. A plain object, which MindSpore's graphs
    read attributes of; its repr names the library, so graph caches keyed on the model's arguments tell the kernels
    apart from MindSpore's ops."""

    def __init__(self, root):
        self.name = os.path.basename(library(root))
        self.adamw = custom_op(root, 'AdamW', ('p', 'm', 'v', 'g', 'scalars'), ('new_p', 'new_m', 'new_v'))
        self.rms_norm = custom_op(root, 'RmsNorm', ('x', 'eps'), ('y',))
        self.qkv_rope = custom_op(root, 'QkvRope', ('qkv', 'cos', 'sin', 'kv'), ('q', 'k', 'v'))
        self.softmax = Softmax(custom_op(root, 'SoftmaxGrad', ('y', 'dy'), ('dx',)))
        self.rms_norm_weighted = RmsNorm(custom_op(root, 'RmsNormWeighted', ('x', 'w', 'eps'), ('y',)),
                                         custom_op(root, 'RmsNormWeightedGrad', ('x', 'w', 'eps', 'dy'), ('dx', 'dw')))
        self.linear16 = custom_op(root, 'Linear16', ('x', 'w'), ('y',),
                                  [(F32, F16, F32), (F32, ops.DataType.BF16_Default, F32)])

    def __repr__(self):
        return f'Kernels({self.name})'


@functools.cache
def build(root):
    """The Kernels of kernels.cc, their library kept in the directory root (checkpoint.GRAPH_CACHE), or None where
    they cannot run here (a note says why). Nothing else changes: a run uses them only where it is given them."""
    if ms.get_context('device_target') != 'CPU':
        return None  # other devices have MindSpore's own fused kernels
    try:
        if not os.path.exists(library(root)):
            compile_library(SOURCE, library(root))
        built = Kernels(root)
        one, zero = ms.Tensor([1.0]), ms.Tensor([0.0])  # p 1, g 1, no decay: the step is m / sqrt(v) = 1
        works = [x.asnumpy().tolist() for x in built.adamw(one, zero, zero, one, ms.Tensor([1.0, 1, 0, 1, 1, 0, 0]))] \
            == [[0.0], [1.0], [1.0]]  # the library loads and is this source's (the kernels themselves are tested)
    except (OSError, ConvertError, subprocess.CalledProcessError, TypeError, RuntimeError) as e:
        reason = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        print(f'note: C++ kernels off, MindSpore\'s ops run instead ({reason})', file=sys.stderr)
        return None
    if not works:
        print(f'note: C++ kernels off: {library(root)} computes wrong numbers; delete it to rebuild it', file=sys.stderr)
        return None
    return built


def library(root):
    """Where build keeps the library compiled from this kernels.cc."""
    with open(SOURCE, 'rb') as f:
        return os.path.join(root, f'kernels-{hashlib.sha256(f.read()).hexdigest()[:16]}.so')


def compile_library(source, path):
    """A shared library from one C++ source, through util.atomic: a temporary renamed when complete, removed on
    failure, and a killed compile's removed by the next."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic(path) as partial:  # no -march=native: a cache may be shared by machines with different CPUs
        subprocess.run([os.environ.get('CXX', 'g++'), '-O3', '-fno-math-errno', '-ffp-contract=off', '-fPIC',
                        '-shared', '-pthread', '-o', partial, source], check=True, capture_output=True, text=True)


F32, F16 = ops.DataType.F32_Default, ops.DataType.F16_Default


def custom_op(root, name, inputs, outputs, formats=None):
    """The library's function `name` as a MindSpore op, on fp32 tensors unless formats lists the dtypes of its
    inputs and outputs (one tuple per accepted combination); its output shapes and types are given by the library's
    nameInferShape and nameInferType (C++, because a graph returning dicts runs its kernels where a Python shape
    function cannot be called)."""
    signature = ops.CustomRegOp(name)
    for i, input_name in enumerate(inputs):
        signature = signature.input(i, input_name)
    for i, output_name in enumerate(outputs):
        signature = signature.output(i, output_name)
    for dtypes in formats or [(F32,) * (len(inputs) + len(outputs))]:
        signature = signature.dtype_format(*dtypes)
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
