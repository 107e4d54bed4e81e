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
tensors, oneDNN present, and a weight of at least MIN_WEIGHTS entries (a toy model's matrices are
smaller and run as `F.linear`: there a oneDNN call's ~15 us of fixed cost is not won back). The
results agree with `F.linear` to float32 rounding (the sums are taken in another order;
tests/test_model.py checks values and gradients).
"""

import torch
import torch.nn.functional as F

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


def applies(x, weight) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.numel() >= MIN_WEIGHTS
            and x.numel() > 0 and torch.backends.mkldnn.is_available())


def linear(x, weight):
    """F.linear(x, weight) (no bias), through oneDNN where that is faster (see above)."""
    if not applies(x, weight):
        return F.linear(x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _Linear.apply(x, weight)
    return product(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
