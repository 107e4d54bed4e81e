"""y = x W^T on the CPU through oneDNN's matrix multiplication, forward and backward.

In float32 on the CPU, `F.linear` and every product of its backward run through the BLAS torch
was built with (MKL). On the AMD EPYC machines minirm is developed on, oneDNN's own kernels run the
same products of a transformer's shapes (2048 rows by 576..1536) 10-30% faster
(benchmarks/README.md), and `torch.ops.mkldnn._linear_pointwise` reaches them with plain float32
tensors, strided views included, so no weight or activation is copied to get there. A training
step spends most of its time in these products:

    forward          y  = x W^T           _linear_pointwise(x, W)
    backward, input  dx = dy W            _linear_pointwise(dy, W^T)      (W^T: a view)
    backward, weight dW = dy^T x          _linear_pointwise(dy^T, x^T)    (views)

`linear(x, weight)` takes this path only where it is the same function and faster: float32 CPU
tensors, oneDNN present, a weight of at least MIN_WEIGHTS entries (a toy model's matrices are
smaller and run as `F.linear`: there a oneDNN call's ~15 us of fixed cost is not won back), and a
machine where oneDNN wins. Which library is faster depends on the processor: on AMD EPYC oneDNN
is 10-30% ahead, on Intel Xeon MKL is 5-30% ahead of oneDNN (benchmarks/README.md). So
`faster_here()` times the two on a 1024^3 product, forward and weight-gradient layouts, once per
process and thread count (~0.1 s), and oneDNN is used only when it is at least 5% faster. The
environment variable MINIRM_CPU_MATMUL=onednn or =blas fixes the choice instead (=streamed fixes
the decoding layout to minirm.streamed's kernel and leaves training to BLAS).
The results agree with `F.linear` to float32 rounding (the sums are taken in another order;
tests/test_model.py checks values and gradients).
"""

import math
import os
import time

import torch
import torch.nn.functional as F

from minirm.errors import UserError

MIN_WEIGHTS = 2**16  # SmolLM2-135M's smallest projection (k, v) has 110,592


def product(a, b):
    """a b^T for 2-D float32 CPU tensors, in oneDNN (b: a plain weight, a strided view,
    or one packed by `minirm.packed`)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        return product(x2, weight).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = product(dy2, weight.t()).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = product(dy2.t(), x2.t()) if ctx.needs_input_grad[1] else None
        return dx, dw


_FASTER = {}  # torch thread count -> whether oneDNN beat BLAS


def fastest_of(calls, repeats=3):
    """The fastest wall time of each call, timed in turns after one warm-up call each."""
    best = [math.inf] * len(calls)
    for rep in range(repeats + 1):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            if rep:
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def forced() -> str | None:
    """"onednn", "blas" or "streamed" when MINIRM_CPU_MATMUL fixes the CPU products' library,
    else None."""
    choice = os.environ.get("MINIRM_CPU_MATMUL", "auto")
    if choice not in ("auto", "onednn", "blas", "streamed"):
        raise UserError(f"MINIRM_CPU_MATMUL={choice!r} is not a choice; set it to auto, onednn, "
                        "blas or streamed, or unset it")
    return None if choice == "auto" else choice


def faster_here() -> bool:
    """Whether oneDNN's float32 products beat torch's BLAS on this machine (see above)."""
    if forced():
        return forced() == "onednn"
    threads = torch.get_num_threads()
    if threads not in _FASTER:
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(1024, 1024, generator=g) for _ in range(2))
        # y = x W^T, and dW = dy^T x (both operands transposed views)
        t = fastest_of([lambda: F.linear(a, b), lambda: a.t() @ b,
                         lambda: product(a, b), lambda: product(a.t(), b.t())])
        _FASTER[threads] = t[2] + t[3] < 0.95 * (t[0] + t[1])
    return _FASTER[threads]


def applies(x, weight) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.numel() >= MIN_WEIGHTS
            and x.numel() > 0 and torch.backends.mkldnn.is_available())


def linear(x, weight):
    """F.linear(x, weight) (no bias), through oneDNN where that is faster (see above). Under
    torch.compile, F.linear: the compiler picks the product, and the graph stays whole."""
    if torch.compiler.is_compiling() or not (applies(x, weight) and faster_here()):
        return F.linear(x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _Linear.apply(x, weight)
    return product(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
