"""minirm.fused: the CPU kernels for SwiGLU, RoPE and RMSNorm, forward and backward, against
float64 autograd through torch's operators; the model with and without them."""

import os
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import minirm.attention as attention_module
from minirm import fused, native
from minirm.config import preset
from minirm.model import Transformer, rope_cos_sin


def test_the_kernels_build_where_a_compiler_is():
    """Where a C++ compiler is on PATH the kernels must build (a broken build would otherwise
    only send the model back to torch's operators, unseen)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here")
    assert fused.available(), fused.LIBRARY.why_unavailable()


needs_kernels = pytest.mark.skipif(not fused.available(),
                                   reason="the fused kernels are not built here")


def exact_and_got(fn, exact_fn, inputs, dy):
    """fn's output and input gradients (float32) next to exact_fn's through float64 autograd."""
    xs = [x.clone().requires_grad_() for x in inputs]
    x64 = [x.double().requires_grad_() for x in inputs]
    got, want = fn(*xs), exact_fn(*x64)
    got_grads = torch.autograd.grad(got, xs, dy)
    want_grads = torch.autograd.grad(want, x64, dy.double())
    return [got, *got_grads], [want, *want_grads]


def check_swiglu():
    g = torch.Generator().manual_seed(0)
    for shape in ((1,), (17,), (2, 7, 33), (3, 5, 1536)):
        gate = torch.randn(shape, generator=g) * 4
        far = torch.tensor([100.0, -100.0, 0.0, -1.2785, -3e38, 1e36, -1e36])
        gate.view(-1)[:len(far)] = far[:gate.numel()]
        up, dh = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        got, want = exact_and_got(fused.swiglu, lambda a, b: F.silu(a) * b, (gate, up), dh)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            assert torch.equal(fused.swiglu(gate, up), got[0])


@needs_kernels
def test_swiglu_of_infinities_and_nan_is_torchs():
    """Past the range of the kernel's exp: silu(+inf) = inf, silu(-inf) = nan (-inf * 0), and
    nan stays nan, as in torch."""
    gate = torch.tensor([float("inf"), float("-inf"), float("nan"), 89.0, -89.0, -1e30])
    up = torch.ones_like(gate)
    torch.testing.assert_close(fused.swiglu(gate, up), F.silu(gate) * up, equal_nan=True)


@needs_kernels
def test_swiglu_forward_and_backward():
    """silu(g) * u and its two gradients, for sizes that are not a multiple of the vector
    length (a scalar tail), gates far out on both sides (the kernel's exp clamps its input)
    (up to +-3e38) and near silu's minimum (where its derivative crosses zero): within float32
    rounding of
    float64. Without gradients the kernel gives the same bits."""
    check_swiglu()


def torch_rope(x, cos, sin):
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def check_rope():
    g = torch.Generator().manual_seed(1)
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 7, 30]])  # a left-padded row too
    for heads, head_dim in ((3, 8), (2, 32), (9, 64)):
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).double() / head_dim)
        cos, sin = rope_cos_sin(inv_freq, positions, torch.float32)
        x = torch.randn(2, 5, heads, head_dim, generator=g)
        dy = torch.randn(x.shape, generator=g)
        got, want = exact_and_got(lambda x: fused.rope(x, cos, sin),
                                  lambda x: torch_rope(x, cos.double(), sin.double()), (x,), dy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
        # One position table for every row (no padding): broadcast over the batch; and one
        # position for every row of a decoding step.
        for table in (positions[:1], positions[:1, 3:4]):
            one = rope_cos_sin(inv_freq, table, torch.float32)
            y = x[:, :table.shape[1]].contiguous()
            torch.testing.assert_close(fused.rope(y, *one), torch_rope(y, *one), rtol=1e-6,
                                       atol=1e-6)


@needs_kernels
def test_rope_forward_and_backward():
    """The rotation and its gradient (the rotation back) for head sizes whose halves are and
    are not whole vectors, rows with their own positions, and one position table broadcast
    over the batch."""
    check_rope()


def check_rms_norm():
    g = torch.Generator().manual_seed(2)
    for shape in ((4, 7, 64), (3, 40), (2, 3, 576), (1, 5)):
        d = shape[-1]
        x, dy = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g)
        w = torch.rand(d, generator=g) + 0.5
        got, want = exact_and_got(lambda x, w: fused.rms_norm(x, w, 1e-5),
                                  lambda x, w: F.rms_norm(x, (d,), w, 1e-5), (x, w), dy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = torch.autograd.grad(fused.rms_norm(xs, ws, 1e-5), (xs, ws), dy)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one[0], got[1])  # dx: each row on one thread
        torch.testing.assert_close(one[1], got[2], rtol=1e-6, atol=1e-6)  # dw: other sums


@needs_kernels
def test_rms_norm_forward_and_backward():
    """RMSNorm and its gradients for the input and the gain, widths with and without a scalar
    tail; dx is the same on one thread as on several, dw (summed per thread, then added)
    equal to rounding."""
    check_rms_norm()


@needs_kernels
def test_the_eight_lane_build_computes_the_same(monkeypatch, tmp_path):
    """Built without AVX-512 (a processor with AVX2 only), the kernels work on 8-lane vectors
    and pass the same checks."""
    if "avx512f" not in native.machine():
        pytest.skip("the default build here is already the 8-lane one")
    monkeypatch.setenv("MINIRM_CACHE", str(tmp_path))
    monkeypatch.setattr(fused.LIBRARY, "flags", native.FLAGS + ["-mno-avx512f"])
    monkeypatch.setattr(fused.LIBRARY, "lib", fused.LIBRARY.load())
    check_swiglu()
    check_rope()
    check_rms_norm()


def nodes(out):
    """The names of the nodes of out's backward graph."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(nxt for nxt, _ in fn.next_functions)
    return {fn.name() for fn in seen}


def training_pass(model, tokens, mask):
    model.zero_grad(set_to_none=True)
    reward = model.reward(tokens, mask)
    reward.sum().backward()
    return reward, {name: p.grad for name, p in model.named_parameters()}


@needs_kernels
def test_the_model_trains_and_scores_the_same_with_and_without_them(monkeypatch):
    """A reward model's training pass (padding, grouped-query attention) through the kernels
    gives the rewards and gradients of torch's operators, and scoring without gradients the
    same rewards; without the library the model takes torch's operators."""
    cfg = preset("debug", n_outputs=1)
    model = Transformer(cfg).init_weights(seed=0).train()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, cfg.vocab_size, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    mask[2, 9:] = False  # right padding
    reward, grads = training_pass(model, tokens, mask)

    assert {"_SwiGLUBackward", "_RopeBackward", "_RMSNormBackward"} <= nodes(reward)
    with torch.no_grad():
        scored = model.reward(tokens, mask)

    monkeypatch.setattr(fused.LIBRARY, "lib", None)
    monkeypatch.setattr(fused.LIBRARY, "why", "no compiler")
    assert not fused.applies(tokens.float())
    want, want_grads = training_pass(model, tokens, mask)
    assert not {"_SwiGLUBackward", "_RopeBackward", "_RMSNormBackward"} & nodes(want)
    torch.testing.assert_close(reward, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scored, want, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not attention_module.KERNEL.available(),
                    reason="the attention kernel is not built here")
def test_a_model_trains_the_same_through_the_attention_kernel():
    """SmolLM2's head size (64): a reward model's rewards and gradients through the sdpa
    backend, whose CPU kernel takes these rows (padded and not), equal those of the reference
    formula."""
    cfg = preset("debug", dim=128, n_heads=2, n_kv_heads=1, head_dim=64, n_outputs=1)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(3, cfg.vocab_size, (3, 21), generator=g)
    padded = torch.ones(3, 21, dtype=torch.bool)
    padded[1, :5] = False
    padded[2, 15:] = False
    for mask in (None, padded):
        results = []
        for backend in ("sdpa", "reference"):
            model = Transformer(replace(cfg, attention=backend)).init_weights(seed=0).train()
            results.append(training_pass(model, tokens, mask))
        (reward, grads), (want, want_grads) = results
        assert "_CausalCPUBackward" in nodes(reward)
        torch.testing.assert_close(reward, want, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
