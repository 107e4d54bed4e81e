"""minirm.streamed: the hand-written product for decoding a few rows, against float64 products,
its build and cache, its fallbacks, and decoding with it against the plain model."""

import os
import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as F

from minirm import native, packed, streamed
from minirm.config import preset
from minirm.errors import UserError
from minirm.generate import generate
from minirm.model import Transformer


def test_the_kernel_builds_where_a_compiler_is():
    """Where a C++ compiler is on PATH the kernel must build (a broken build would otherwise
    only drop the layout, unseen)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here")
    assert streamed.available(), streamed.why_unavailable()


needs_kernel = pytest.mark.skipif(not streamed.available(),
                                  reason="the streamed kernel is not built here")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17])
def test_product_is_x_times_w_transposed(rows):
    """Every row count up to MAX_ROWS and past it (groups of 8 rows and a rest), numbers of
    outputs that are not a multiple of the kernel's blocks of four or two (the rest one at a
    time), widths that are and are not a multiple of the vector length (a scalar tail), widths
    on both sides of 2048 (where one row changes blocks), a strided x,
    and empty sums: within float32 rounding of the float64 product. Each output is summed by
    one thread in a fixed order, so one thread gives the same bits."""
    g = torch.Generator().manual_seed(rows)
    for n, k in ((1, 1), (7, 5), (33, 40), (96, 384), (31, 1537), (960, 576), (11, 2053)):
        x = torch.randn(rows, k, generator=g)
        w = torch.randn(n, k, generator=g)
        y = streamed.product(x, w)
        exact = x.double() @ w.double().t()
        bound = 1e-6 * (x.double().abs() @ w.double().abs().t()) + 1e-30
        assert y.shape == (rows, n) and y.dtype == torch.float32
        assert ((y.double() - exact).abs() <= bound).all(), (rows, n, k)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(streamed.product(x, w), y)
        finally:
            torch.set_num_threads(threads)
    empty = streamed.product(torch.ones(rows, 0), torch.ones(5, 0))
    assert torch.equal(empty, torch.zeros(rows, 5))
    assert streamed.product(torch.ones(0, 7), torch.ones(5, 7)).shape == (0, 5)
    wide = torch.randn(rows, 2 * 384, generator=g)
    w = torch.randn(96, 384, generator=g)
    torch.testing.assert_close(streamed.product(wide[:, ::2], w), wide[:, ::2] @ w.t(),
                               atol=1e-4, rtol=1e-5)


@needs_kernel
def test_streamed_linear_splits_layers_and_leaves_long_blocks_to_f_linear(monkeypatch):
    """StreamedLinear: one product for stacked layers, split back per layer, shaped like its
    input; the kernel for up to MAX_ROWS rows and F.linear beyond (a prefill); a single layer's
    weight is the model's own tensor, not a copy."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(96, 384, generator=g), torch.randn(32, 384, generator=g)
    calls, product = [], streamed.product
    monkeypatch.setattr(streamed, "product", lambda x, w: calls.append(len(x)) or product(x, w))
    both = streamed.StreamedLinear(w1, w2)
    for shape in ((1, 1), (4, 1), (2, 8), (3, 7)):
        x = torch.randn(*shape, 384, generator=g)
        y1, y2 = both(x)
        assert y1.shape == (*shape, 96) and y2.shape == (*shape, 32)
        torch.testing.assert_close(y1, F.linear(x, w1), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(y2, F.linear(x, w2), atol=1e-4, rtol=1e-5)
    assert calls == [1, 4, 16]  # 21 rows went to F.linear
    assert streamed.StreamedLinear(w1).weight.data_ptr() == w1.data_ptr()


def test_huge_pages_hold_the_layouts_weights_on_their_boundaries(monkeypatch):
    """HugePages hands out pieces of one block that starts on a 2 MiB boundary (where huge
    pages are offered), each on a 64-byte one; StreamedLinear copies its layers into them, and
    a block taken past its size is an error. Without huge pages the block is plain memory."""
    g = torch.Generator().manual_seed(0)
    w1, w2, w3 = (torch.randn(n, 24, generator=g) for n in (5, 3, 7))
    memory = streamed.HugePages(w1.numel() + w2.numel() + w3.numel(), 2)
    if streamed.huge_pages_offered():
        assert memory.flat.data_ptr() % streamed.HUGE_PAGE == 0
    both, alone = (streamed.StreamedLinear(w1, w2, memory=memory),
                   streamed.StreamedLinear(w3, memory=memory))
    assert torch.equal(both.weight, torch.cat([w1, w2])) and both.sizes == [5, 3]
    assert torch.equal(alone.weight, w3) and alone.weight.data_ptr() != w3.data_ptr()
    start = memory.flat.data_ptr()
    assert both.weight.data_ptr() == start and alone.weight.data_ptr() == start + 8 * 24 * 4
    assert alone.weight.data_ptr() % 64 == 0
    with pytest.raises(AssertionError, match="more taken than reserved"):
        memory.take(1)
    monkeypatch.setattr(streamed, "huge_pages_offered", lambda: False)
    plain = streamed.huge_page_tensor(1000)
    assert plain.shape == (1000,) and plain.dtype == torch.float32


def test_build_caches_the_library_and_reports_a_failed_build(monkeypatch, tmp_path):
    """The library is built once into MINIRM_CACHE and loaded from there after, or into the
    temporary folder where that folder cannot be made; a compiler that fails leaves no file
    behind, and then the kernel is unavailable with the reason, the layout is not offered, and
    forcing it is a clear error."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("MINIRM_CACHE", str(tmp_path))
    streamed.LIBRARY.load()
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    streamed.LIBRARY.load()
    assert list(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp

    umask = os.umask(0o022)  # a shared cache folder: the library readable by every user
    os.umask(umask)
    if (umask & 0o044) == 0:
        assert built[0].stat().st_mode & 0o444 == 0o444

    blocked = tmp_path / "a-file"  # a cache folder that cannot be made: the temporary one
    blocked.write_text("")
    monkeypatch.setenv("MINIRM_CACHE", str(blocked / "cache"))
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    streamed.LIBRARY.load()
    [private] = (tmp_path / "tmp").glob("minirm-*")
    assert [p.suffix for p in private.iterdir()] == [".so"]
    assert private.stat().st_mode & 0o077 == 0
    private.chmod(0o777)  # a temporary folder others can write to is refused
    with pytest.raises(RuntimeError, match="others can write"):
        streamed.LIBRARY.load()

    broken = tmp_path / "broken"
    monkeypatch.setenv("MINIRM_CACHE", str(broken))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setattr(streamed.LIBRARY, "lib", None)
    monkeypatch.setattr(streamed.LIBRARY, "why", None)
    assert not streamed.available()
    assert "false failed on streamed.cpp" in streamed.why_unavailable()
    assert list(broken.iterdir()) == []
    assert "streamed" not in packed.layouts()
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    model = Transformer(preset("debug", dim=384, ffn_dim=512, n_heads=6,
                               n_kv_heads=2)).init_weights(seed=0).eval()
    with pytest.raises(UserError, match="MINIRM_CPU_MATMUL=streamed"):
        with packed.packed_for_decoding(model, rows=2):
            pass


@needs_kernel
def test_decoding_in_the_streamed_layout_samples_the_plain_models_tokens(monkeypatch):
    """generate with the streamed layout, while rows end at unlike steps (the batch shrinks
    from 5 rows), gives the plain model's tokens and ends, log-probs to float32 rounding."""
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    cfg = preset("debug", dim=384, ffn_dim=512, n_heads=6, n_kv_heads=2)
    model = Transformer(cfg).init_weights(seed=0).eval()
    prompts = [[256, 5, 6, 7], [256, 9], [256, 1, 2], [256, 40, 41, 42, 43], [256, 7]]
    stop = set(range(0, 259, 6))

    def run():
        return generate(model, prompts, 16, temperature=1.0, stop_ids=stop, pad_id=cfg.pad_id,
                        generator=torch.Generator().manual_seed(3))

    fast = run()
    assert packed.layout_in_use(model) == "streamed"
    monkeypatch.setattr(packed, "can_pack", lambda model: False)
    plain = run()
    assert torch.equal(fast.tokens, plain.tokens) and torch.equal(fast.ended, plain.ended)
    assert len(set(plain.mask.sum(-1).tolist())) > 2
    torch.testing.assert_close(fast.logprobs, plain.logprobs, atol=1e-4, rtol=1e-4)


@needs_kernel
def test_the_eight_lane_build_computes_the_same_product(monkeypatch, tmp_path):
    """Built without AVX-512 (as on a processor with AVX2 only, or NEON), the kernel works on
    8-lane vectors; its products are those of the float64 product too."""
    if not streamed.available() or "avx512f" not in native.machine():
        pytest.skip("the default build here is already the 8-lane one")
    monkeypatch.setenv("MINIRM_CACHE", str(tmp_path))
    monkeypatch.setattr(streamed.LIBRARY, "flags", native.FLAGS + ["-mno-avx512f"])
    lib = streamed.LIBRARY.load()
    g = torch.Generator().manual_seed(1)
    for rows, n, k in ((1, 33, 40), (8, 31, 1537), (11, 96, 384)):
        x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
        y = torch.empty(rows, n)
        lib.minirm_streamed_product(x.data_ptr(), w.data_ptr(), y.data_ptr(), rows, n, k)
        exact = x.double() @ w.double().t()
        bound = 1e-6 * (x.double().abs() @ w.double().abs().t())
        assert ((y.double() - exact).abs() <= bound).all(), (rows, n, k)
    assert not torch.equal(y, streamed.product(x, w))  # another order of sums: another build
