"""The three attention backends compute one function: checked against each other (forward and
gradients, float32, 1e-5), against numbers worked out by hand, and for the memory promise of the
flash backend (nothing of size T x S is saved or built)."""

import math
import os
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minirm.attention as attention_module
from minirm.attention import BACKENDS, attention, build_mask


def _inputs(B, Hq, Hkv, T, S, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    dout = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
    return q, k, v, dout


def _run(backend, q, k, v, dout, key_mask=None, block=16):
    """Output and gradients wrt q, k, v of one backend."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, key_mask, backend=backend, block=block)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _padding(B, S, side, n_pad=(0, 3, 7)):
    """(B, S) bool key mask with n_pad[b] padding tokens on the given side of row b."""
    mask = torch.ones(B, S, dtype=torch.bool)
    for b in range(B):
        n = n_pad[b % len(n_pad)]
        if side == "left":
            mask[b, :n] = False
        else:
            mask[b, S - n:] = False
    return mask


CASES = {
    # name: (B, Hq, Hkv, T, S, D, block, padding side or None)
    "causal": (2, 4, 2, 32, 32, 8, 16, None),
    "right-padding": (3, 4, 2, 32, 32, 8, 16, "right"),
    "left-padding": (3, 4, 2, 32, 32, 8, 16, "left"),
    "gqa-4-2": (2, 4, 2, 24, 24, 8, 8, "left"),
    "gqa-6-2": (2, 6, 2, 24, 24, 8, 8, "right"),
    "mha": (2, 4, 4, 24, 24, 8, 8, "left"),
    "odd-length": (2, 4, 2, 37, 37, 8, 16, None),
    "odd-length-padded": (3, 4, 2, 37, 37, 8, 16, "left"),
    "decode": (2, 4, 2, 1, 20, 8, 16, None),
    "decode-padded": (3, 4, 2, 1, 20, 8, 16, "left"),
    "prefill-with-cache": (2, 4, 2, 5, 20, 8, 16, None),
    "prefill-with-cache-padded": (3, 6, 2, 5, 20, 8, 16, "right"),
    "cache-odd": (2, 4, 2, 37, 50, 8, 16, "left"),
    "block-larger-than-sequence": (2, 4, 2, 10, 10, 8, 64, "left"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_backends_agree(name):
    B, Hq, Hkv, T, S, D, block, side = CASES[name]
    q, k, v, dout = _inputs(B, Hq, Hkv, T, S, D)
    key_mask = None if side is None else _padding(B, S, side)
    ref = _run("reference", q, k, v, dout, key_mask)
    for backend in ("flash", "sdpa"):
        got = _run(backend, q, k, v, dout, key_mask, block)
        for what, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{backend} {what}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, Hkv, T, S, side", [(1, 3, 37, 37, "left"), (3, 1, 29, 40, "right"),
                                                (1, 1, 64, 64, None)])
def test_flash_with_odd_head_pairs(B, Hkv, T, S, side, threads):
    """An odd number of (batch element, key/value head) pairs: on an even number of threads
    the forward takes each pair's rows in two halves where a step takes a tile's rows whole
    (several tiles, a short last one, keys after a cache); the same numbers either way."""
    q, k, v, dout = _inputs(B, 2 * Hkv, Hkv, T, S, 8, seed=B + T)
    key_mask = None if side is None else _padding(B, S, side)
    ref = _run("reference", q, k, v, dout, key_mask)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _run("flash", q, k, v, dout, key_mask, block=8)
    finally:
        torch.set_num_threads(before)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=what)


@pytest.mark.parametrize("T, S", [(100, 100), (37, 50), (5, 20)])
def test_flash_several_query_tiles(monkeypatch, T, S):
    # Shrink the budget to 2 tiles of 2 query blocks x 4 rows x 4 keys for each of the
    # B * Hq = 8 heads, so that a step of the backward takes 8 query rows and one of the forward
    # 16 rows by up to 8 keys: many query tiles, the last one short, and forward steps of two
    # key blocks merged.
    monkeypatch.setattr(attention_module, "TILE_SCORES", 2 * 2 * 4 * 4 * 8)
    assert attention_module._tile_rows(2, 4, 4, tiles=2) == 8
    assert attention_module._tile_rows(2, 4, 4) == 16
    assert attention_module._span(2, 4, 16, 4) == 8
    q, k, v, dout = _inputs(2, 4, 2, T, S, 8)
    key_mask = _padding(2, S, "left")
    ref = _run("reference", q, k, v, dout, key_mask)
    for a, b in zip(_run("flash", q, k, v, dout, key_mask, block=4), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flash_tiles_cover_the_causal_keys():
    # Query i (key position i + S - T) must meet keys 0..i + S - T exactly once, in steps that
    # mask where they need to: rows [c, i1) of a step see all its keys, rows [a, c) sit among
    # them, rows before a see none. Merged steps hold only blocks every row of the tile sees.
    for T, S, block, rows, span in [(10, 10, 4, 4, None), (37, 50, 4, 8, 12), (5, 20, 4, 8, 16),
                                    (64, 64, 8, 8, 24), (64, 64, 8, 16, 64)]:
        seen = torch.zeros(T, S, dtype=torch.int)
        for i0, i1, steps in attention_module._tiles(T, S, block, rows, span):
            assert [j0 for _, _, j0, _ in steps] == sorted(j0 for _, _, j0, _ in steps)
            for a, c, j0, j1 in steps:
                assert i0 <= a <= c <= i1 and j1 - j0 <= (span or block)
                if j1 - j0 > block:
                    assert a == c == i0 and j1 - (S - T) <= i0
                for i in range(a, i1):
                    last = i + S - T if i < c else j1 - 1
                    seen[i, j0:min(j1, last + 1)] += 1
                    assert i >= c or j0 <= i + S - T < j1  # a masked row has its key inside
        want = (torch.arange(S)[None] <= torch.arange(S - T, S)[:, None]).int()
        assert torch.equal(seen, want), (T, S, block, rows, span)


def test_non_contiguous_inputs():
    # The model makes q, k, v with view(B, T, H, D).transpose(1, 2): same numbers, other strides.
    B, Hq, Hkv, T, D = 2, 4, 2, 20, 8
    q, k, v, dout = _inputs(B, Hq, Hkv, T, T, D)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    ref = _run("reference", q, k, v, dout)
    for backend in BACKENDS:
        for a, b in zip(_run(backend, qt, kt, vt, dout, block=8), ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# One head, T = S = 2, D = 2, scale 1/sqrt(2):
#   q = [[1, 0], [0, 1]], k = [[1, 0], [1, 1]], v = [[1, 2], [3, 4]]
#   query 0 sees key 0 only                      -> out[0] = v[0] = [1, 2]
#   query 1 scores [q1.k0, q1.k1] / sqrt(2) = [0, 1/sqrt(2)]
#     weight of key 1: w = 1 / (1 + e^(-1/sqrt(2))) = 1 / 1.49306869 = 0.66976155
#     out[1] = v0 + w (v1 - v0) = [1, 2] + 0.66976155 * [2, 2] = [2.3395231, 3.3395231]
# With key_mask = [False, True] (key 0 is padding):
#   query 0 is padding but sees itself           -> out[0] = v[0] = [1, 2]
#   query 1 sees key 1 only                      -> out[1] = v[1] = [3, 4]
HAND_Q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
HAND_K = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
HAND_V = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed(backend):
    assert math.isclose(1 / (1 + math.exp(-1 / math.sqrt(2))), 0.66976155, rel_tol=1e-7)
    out = attention(HAND_Q, HAND_K, HAND_V, backend=backend)
    torch.testing.assert_close(out, torch.tensor([[[[1.0, 2.0], [2.3395231, 3.3395231]]]]))
    padded = attention(HAND_Q, HAND_K, HAND_V, torch.tensor([[False, True]]), backend=backend)
    torch.testing.assert_close(padded, torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))


def test_build_mask_by_hand():
    # T = 2 queries at key positions 2 and 3 of S = 4; key 0 of row 0 is padding, key 3 of row 1.
    key_mask = torch.tensor([[False, True, True, True], [True, True, True, False]])
    expected = torch.tensor([
        [[0, 1, 1, 0],
         [0, 1, 1, 1]],
        [[1, 1, 1, 0],
         [1, 1, 1, 1]],   # query 3 is padding: it still sees itself
    ], dtype=torch.bool)[:, None]
    assert torch.equal(build_mask(key_mask, 2, 4, "cpu"), expected)
    assert torch.equal(build_mask(None, 2, 4, "cpu"), torch.tensor([[[[1, 1, 1, 0], [1, 1, 1, 1]]]],
                                                                   dtype=torch.bool))


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_rows_are_finite(backend):
    # Row 1 is padding except for its last token, so most of its queries see nothing but
    # themselves; no NaN may reach the output or any gradient.
    B, Hq, Hkv, T, D = 2, 4, 2, 24, 8
    q, k, v, dout = _inputs(B, Hq, Hkv, T, T, D)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[0, :5] = False
    key_mask[1, :-1] = False
    for x in _run(backend, q, k, v, dout, key_mask, block=8):
        assert torch.isfinite(x).all()


def test_flash_gradcheck():
    # Finite differences in float64 check the hand-written backward on its own.
    q, k, v, _ = _inputs(1, 2, 1, 5, 7, 4, dtype=torch.float64)
    key_mask = torch.tensor([[False, True, True, True, True, False, True]])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, key_mask, backend="flash", block=2), (q, k, v))


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_flash_never_holds_t_by_s():
    B, Hq, Hkv, T, D, block = 1, 2, 1, 64, 8, 4
    q, k, v, dout = _inputs(B, Hq, Hkv, T, T, D)
    key_mask = _padding(B, T, "left", n_pad=(5,))
    t_by_s = B * Hq * T * T

    def saved_sizes(backend):
        sizes = []

        def pack(x):
            sizes.append(x.numel())
            return x
        q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = attention(q_, k_, v_, key_mask, backend=backend, block=block)
        return sizes, out

    sizes, _ = saved_sizes("reference")
    assert max(sizes) >= t_by_s  # the check can see a T x S tensor when there is one
    sizes, out = saved_sizes("flash")
    assert max(sizes) < T * T, sizes  # q, k, v, out, lse, key_mask: nothing T x S, even per head

    # Nor is one built along the way, forward or backward: every step holds one key block.
    with _LargestTensor() as probe:
        _run("flash", q, k, v, dout, key_mask, block)
    assert probe.largest < t_by_s // 2, probe.largest


def test_flash_half_precision():
    q, k, v, dout = _inputs(2, 4, 2, 40, 40, 16, dtype=torch.bfloat16)
    key_mask = _padding(2, 40, "left")
    ref = _run("reference", q, k, v, dout, key_mask)
    got = _run("flash", q, k, v, dout, key_mask, block=16)
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def test_flash_inside_autocast():
    """Forward and backward run inside a bf16 autocast region (the backward too, as when a
    loss is backpropagated within it): the flash passes keep their own float32 tiles."""
    q, k, v, dout = _inputs(2, 4, 2, 40, 40, 16)
    key_mask = _padding(2, 40, "left")
    ref = _run("reference", q.double(), k.double(), v.double(), dout.double(), key_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run("flash", q, k, v, dout, key_mask, block=16)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_flash_under_torch_compile():
    # aot_eager traces forward and backward like inductor does, without inductor's C++ compile
    # (which takes ~20 s on CPU); fullgraph=True fails on any graph break, e.g. a host sync.
    q, k, v, dout = _inputs(2, 4, 2, 37, 37, 8)
    key_mask = _padding(2, 37, "left")

    def f(q, k, v, key_mask):
        return attention(q, k, v, key_mask, backend="flash", block=16)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
    out = compiled(q_, k_, v_, key_mask)
    out.backward(dout)
    ref = _run("flash", q, k, v, dout, key_mask, block=16)
    for a, b in zip((out.detach(), q_.grad, k_.grad, v_.grad), ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_rejects_bad_arguments():
    q, k, v, _ = _inputs(1, 3, 2, 4, 4, 8)
    with pytest.raises(AssertionError, match="not divisible"):
        attention(q, k, v)
    q, k, v, _ = _inputs(1, 2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="unknown"):
        attention(q, k, v, backend="xformers")
    with pytest.raises(AssertionError, match="key_mask"):
        attention(q, k, v, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(AssertionError, match="last T"):
        attention(q, k[:, :, :2], v[:, :, :2])


# ------------------------------------------------------------- the sdpa backend's CPU kernel

needs_kernel = pytest.mark.skipif(not attention_module.KERNEL.available(),
                                  reason="the attention kernel is not built here")


def test_the_cpu_kernel_builds_where_a_compiler_is():
    """Where a C++ compiler is on PATH the kernel must build (else the sdpa backend would
    quietly keep torch's slower kernel)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here")
    assert attention_module.KERNEL.available(), attention_module.KERNEL.why_unavailable()


def _check_kernel():
    # (B, Hq, Hkv, T, D): one position; lengths that are not a multiple of the kernel's blocks
    # (16 rows, or 8 with AVX2); groups of 1, 2 and 3 query heads; both head sizes; rows
    # without padding, left-padded (a padded query sees only itself) and right-padded.
    # And queries after the keys of a prompt (S > T).
    for B, Hq, Hkv, T, S, D in ((1, 1, 1, 1, 1, 64), (2, 4, 2, 5, 5, 64), (2, 6, 3, 17, 17, 128),
                                (1, 2, 1, 40, 40, 64), (3, 9, 3, 33, 33, 64),
                                (1, 4, 4, 300, 300, 128), (2, 4, 2, 17, 40, 64),
                                (3, 6, 3, 20, 37, 128)):
        q, k, v, dout = _inputs(B, Hq, Hkv, T, S, D, seed=T)
        # The model's layout: (B, T, heads, D) tensors, seen as (B, heads, T, D).
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        for side in (None, "left", "right"):
            key_mask = None if side is None else _padding(B, S, side, n_pad=(T // 2, 0, 3))
            got = _run("sdpa", q, k, v, dout, key_mask)
            exact = _run("reference", *(x.double() for x in (q, k, v, dout)), key_mask)
            for what, a, b in zip(("out", "dq", "dk", "dv"), got, exact):
                torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5,
                                           msg=f"{what} at {(B, Hq, Hkv, T, S, D)}, {side}")


@needs_kernel
def test_the_cpu_kernel_is_attention():
    """Forward and backward through the kernel, against the reference formula in float64."""
    _check_kernel()


@needs_kernel
def test_the_eight_lane_kernel_is_attention(monkeypatch, tmp_path):
    """Built without AVX-512 (8-lane vectors, blocks of 8 rows), the kernel passes the same
    checks."""
    from minirm import native

    if "avx512f" not in native.machine():
        pytest.skip("the default build here is already the 8-lane one")
    monkeypatch.setenv("MINIRM_CACHE", str(tmp_path))
    kernel = attention_module.KERNEL
    monkeypatch.setattr(kernel, "flags", native.FLAGS + ["-mno-avx512f"])
    monkeypatch.setattr(kernel, "lib", kernel.load())
    _check_kernel()


@needs_kernel
def test_sdpa_takes_the_kernel_only_where_it_applies(monkeypatch):
    """float32 CPU rows, padded or not, of head size 64 (up to 1536 positions) or 128 (up to
    768) go to the kernel, after a prompt's keys too; a few queries after a cache (decoding),
    other head sizes, float64, longer rows, and a backward with fewer (batch, key/value head)
    pairs than threads stay with SDPA."""
    def node(B, Hq, Hkv, T, S, D, dtype=torch.float32, key_mask=None):
        q, k, v, _ = _inputs(B, Hq, Hkv, T, S, D, dtype=dtype)
        return attention(q.requires_grad_(), k, v, key_mask, backend="sdpa").grad_fn.name()

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    kernel = "_CausalCPUBackward"
    assert node(2, 4, 2, 8, 8, 64) == kernel
    assert node(2, 4, 2, 8, 8, 128) == kernel
    assert node(2, 4, 2, 8, 8, 64, key_mask=_padding(2, 8, "left")) == kernel
    assert node(2, 4, 2, 16, 40, 64) == kernel  # after a prompt's keys
    assert node(2, 4, 2, 4, 8, 64) != kernel  # a few queries after a cache: decoding
    assert node(2, 4, 2, 8, 8, 32) != kernel
    assert node(2, 4, 2, 8, 8, 64, dtype=torch.float64) != kernel
    assert node(1, 2, 1, 8, 8, 64) != kernel  # one pair for two threads
    for D, T in attention_module.MAX_KEYS.items():
        assert node(1, 2, 2, T, T, D) == kernel
        assert node(1, 2, 2, T + 1, T + 1, D) != kernel


@needs_kernel
def test_the_cpu_kernel_passes_nan_on_as_sdpa_does():
    """A NaN in one key reaches the outputs of every query that sees that key, in the forward
    as in the backward (a NaN score must not pass for a masked one), and no other query's."""
    q, k, v, dout = _inputs(1, 2, 1, 20, 20, 64)
    k[0, 0, 7, 3] = float("nan")
    got = _run("sdpa", q, k, v, dout)
    want = _run("reference", q, k, v, dout)
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan())
    assert got[0][0, :, :7].isfinite().all() and got[0][0, :, 7:].isnan().all()
