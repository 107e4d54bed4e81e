"""The element-wise parts of a block on the CPU, forward and backward, each in one pass over
memory: SwiGLU's silu(g) * u, rotary embeddings and RMSNorm (`minirm/fused.cpp`, built on
first use by `minirm.native`).

Written with torch's operators, each of these is several kernels, and each kernel a pass over
activations that do not fit in cache; autograd adds as many again for the backward. SwiGLU at
8 x 256 x 1536 (SmolLM2-135M's training step) is silu, a product, then silu's backward and two
more products: 11 ms a layer forward and backward on a 2-core Xeon, against 2 ms here. RoPE on
the queries and keys is a product, a roll and an addcmul each way (3.8 ms against 0.7 ms), and
RMSNorm is a norm, a rescale and a gain, then four passes back (`model._RMSNormCPU`).

The formulas, with s = sigmoid(g) and r = (mean(x^2) + eps)^-1/2 for a row x:

    SwiGLU    h = g s u                 dg = dh u s (1 + g (1 - s)),   du = dh g s
    RoPE      y = x cos + roll(x) sin   dx = dy cos - roll(dy) sin     (sin's first half negated)
    RMSNorm   y = x r w                 dx = r (g - x^ mean(g x^)),    dw = sum of dy x^
                                        with x^ = x r and g = dy w

The exp in sigmoid is the kernel's own (a polynomial, to about one unit in the last place), so
results agree with torch's to float32 rounding, not to the bit (tests/test_fused.py).

These run for float32 CPU tensors outside `torch.compile` (which fuses them itself), wherever the
library builds (`available()`); elsewhere the model uses torch's operators, the same formulas.
"""

import ctypes

import torch

from minirm.native import Library

_P, _N = ctypes.c_void_p, ctypes.c_int64
LIBRARY = Library("fused.cpp", {
    "minirm_swiglu": [_P, _P, _P, _N],
    "minirm_swiglu_backward": [_P] * 5 + [_N],
    "minirm_rope": [_P] * 4 + [_N] * 3 + [ctypes.c_float],
    "minirm_rms_norm": [_P] * 4 + [_N] * 2 + [ctypes.c_float],
    "minirm_rms_norm_backward": [_P] * 6 + [_N] * 2 + [ctypes.c_int],
})


def available() -> bool:
    """Whether the kernels are built and loaded here (built on the first call)."""
    return LIBRARY.available()


def _lib():
    if not LIBRARY.available():
        raise RuntimeError(f"the fused kernels are not available here: {LIBRARY.why}")
    return LIBRARY.lib


def applies(x: torch.Tensor) -> bool:
    """Whether the model should use these kernels for activations like x."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.compiler.is_compiling() and LIBRARY.available())


def _swiglu(g, u):
    h = torch.empty_like(g)
    _lib().minirm_swiglu(g.data_ptr(), u.data_ptr(), h.data_ptr(), g.numel())
    return h


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return _swiglu(g, u)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _lib().minirm_swiglu_backward(g.data_ptr(), u.data_ptr(), dh.data_ptr(), dg.data_ptr(),
                                      du.data_ptr(), g.numel())
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for two float32 CPU tensors of one shape."""
    assert g.shape == u.shape and g.dtype == u.dtype == torch.float32, \
        f"gate {g.dtype} {tuple(g.shape)} and up {u.dtype} {tuple(u.shape)}: float32, one shape"
    g, u = g.contiguous(), u.contiguous()
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        return _SwiGLU.apply(g, u)
    return _swiglu(g, u)


def _rope(x, cos, sin, sign):
    y = torch.empty_like(x)
    rows = cos.shape[0]
    _lib().minirm_rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), rows,
                       x.numel() // (rows * x.shape[-1]), x.shape[-1], sign)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(x, cos, sin, 1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope(dy.contiguous(), cos, sin, -1.0), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`model.apply_rope`: x (B, T, H, head_dim) rotated by the cos and signed sin of each
    position, (B, T, 1, head_dim) (constants: no gradient flows to them)."""
    B, T, H, D = x.shape
    assert D % 2 == 0 and x.dtype == cos.dtype == signed_sin.dtype == torch.float32, \
        f"RoPE takes float32 and an even head size, got {x.dtype} x, {cos.dtype} cos, D={D}"
    if x.numel() == 0:
        return x.clone()
    # (B * T, D) tables, one row per position: no copy when they are already (B, T, 1, D).
    cos = cos.expand(B, T, 1, D).reshape(B * T, D).contiguous()
    signed_sin = signed_sin.expand(B, T, 1, D).reshape(B * T, D).contiguous()
    x = x.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rope.apply(x, cos, signed_sin)
    return _rope(x, cos, signed_sin, 1.0)


def _rms_norm(x, weight, eps):
    d = x.shape[-1]
    y, r = torch.empty_like(x), x.new_empty(x.numel() // d)
    _lib().minirm_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), r.data_ptr(), len(r),
                           d, eps)
    return y, r


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, r = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        dy = dy.contiguous()
        threads = torch.get_num_threads()
        dx = torch.empty_like(x)
        parts = x.new_zeros(threads, x.shape[-1])  # each thread's share of dw
        _lib().minirm_rms_norm_backward(x.data_ptr(), weight.data_ptr(), r.data_ptr(),
                                        dy.data_ptr(), dx.data_ptr(), parts.data_ptr(), len(r),
                                        x.shape[-1], threads)
        return dx, parts.sum(0) if ctx.needs_input_grad[1] else None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dimension (float32 CPU tensors)."""
    assert weight.shape == x.shape[-1:] and x.dtype == weight.dtype == torch.float32, \
        f"x {x.dtype} {tuple(x.shape)} and weight {weight.dtype} {tuple(weight.shape)}"
    x, weight = x.contiguous(), weight.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm(x, weight, eps)[0]
