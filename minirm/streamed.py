"""A hand-written product for decoding a few rows at once on the CPU: y = x W^T, every weight
read once for all the rows.

A decoding step of B rows multiplies B activation rows by every weight matrix of the model and
does only 2B floating-point operations per weight it reads: the products are bound by how fast
the weights stream from memory, not by arithmetic. MKL's products for 2 to 16 rows (packed or
not) stream them at 55-80% of the speed of its product for a single row: on a 2-core Xeon,
one pass over SmolLM2-135M's projections at 8 rows took 38-42 ms in MKL's packed form, 54-59 ms
with `F.linear`, and 28-34 ms with this kernel (`minirm/streamed.cpp`, ~90 lines of C++): each
thread walks blocks of four weight rows once, keeps the running sums of up to 8 activation rows
in vector registers, and prefetches the next block while it reads this one.

The kernel is compiled on first use with the machine's C++ compiler and loaded with ctypes
(`minirm.native`: ~1 s once per machine, cached). It runs on torch's threads
(`torch.set_num_threads`). Where it cannot be built (no compiler, no OpenMP) `available()` is
False and decoding keeps the other layouts of `minirm.packed`; the reason is in
`why_unavailable()`. Its sums are taken in another order than BLAS's, so results
agree with `F.linear` to float32 rounding (tests/test_streamed.py).

Under `torch.compile` (a compiled decoding step, `minirm.graphs`) it runs as the operator
`minirm::streamed` (`minirm.ops`), one opaque call for the compiler; outside it the ctypes call
goes direct.

The streamed layout keeps its weights in one block of memory in huge pages (`HugePages`, 2 MiB
pages on Linux where transparent huge pages are offered, as they are by default: `madvise`
mode). Streaming 538 MB of weights in 4 KiB pages is 131,000 pages a token, each a TLB miss
and a page walk, and the hardware prefetcher stops at each page's end: the kernel read
SmolLM2-135M's weights at one row in 19.2 ms against 21.2 in 4 KiB pages (Xeon, in turns), and
a 256 MiB matrix at 30.5 GB/s against 23.4.
"""

import ctypes
import mmap

import torch
import torch.nn.functional as F

from minirm.native import Library
from minirm.ops import opaque

# Up to here the kernel reads the weights once for all rows; a longer block (a prefill) goes
# to F.linear, whose blocked product reuses each weight across many rows in cache.
MAX_ROWS = 16

LIBRARY = Library("streamed.cpp", {
    "minirm_streamed_product": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3,
})


def available() -> bool:
    """Whether the kernel is built and loaded here (built on the first call)."""
    return LIBRARY.available()


def why_unavailable() -> str | None:
    """Why the kernel could not be built here (the compiler's last line), or None."""
    return LIBRARY.why_unavailable()


def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T for 2-D float32 CPU tensors (made contiguous here), with the kernel."""
    assert x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu", \
        "the streamed product takes float32 CPU tensors"
    assert x.shape[1] == weight.shape[1], f"x is {tuple(x.shape)}, W is {tuple(weight.shape)}"
    if not available():
        raise RuntimeError(f"the streamed product is not available here: {why_unavailable()}")
    if x.numel() == 0 or weight.numel() == 0:  # nothing to sum: zeros, or an empty y
        return x.new_zeros(x.shape[0], weight.shape[0])
    x, weight = x.contiguous(), weight.contiguous()
    y = x.new_empty(x.shape[0], weight.shape[0])
    LIBRARY.lib.minirm_streamed_product(x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                                 x.shape[0], weight.shape[0], weight.shape[1])
    return y


_streamed = opaque("streamed", "(Tensor x, Tensor weight) -> Tensor",
                   lambda x, weight: product(x, weight),
                   lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]))


HUGE_PAGE = 2 << 20


def huge_pages_offered() -> bool:
    """Whether this system gives memory advised for it transparent huge pages (Linux, with
    /sys/kernel/mm/transparent_hugepage/enabled at `always` or `madvise`)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read() and hasattr(mmap, "MADV_HUGEPAGE")
    except OSError:
        return False


def huge_page_tensor(numel: int) -> torch.Tensor:
    """An uninitialised float32 tensor of `numel` elements starting on a 2 MiB boundary, in
    memory advised for transparent huge pages (an anonymous mapping, released with the tensor);
    a plain `torch.empty` where huge pages are not offered."""
    if not huge_pages_offered() or numel == 0:
        return torch.empty(numel)
    memory = mmap.mmap(-1, numel * 4 + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, which then faults 2 MiB pages
    flat = torch.frombuffer(memory, dtype=torch.float32)  # holds `memory` while it lives
    start = (-flat.data_ptr() % HUGE_PAGE) // 4
    return flat[start:start + numel]


class HugePages:
    """One block of huge-page memory (`huge_page_tensor`) for `pieces` tensors of `numel`
    elements in all, handed out in turn, each on a 64-byte boundary (a cache line)."""

    def __init__(self, numel: int, pieces: int):
        self.flat = huge_page_tensor(numel + 16 * pieces)
        self.left, self.pieces_left, self.used = numel, pieces, 0

    def take(self, numel: int) -> torch.Tensor:
        assert numel <= self.left and self.pieces_left, "HugePages: more taken than reserved"
        piece = self.flat[self.used:self.used + numel]
        self.left, self.pieces_left = self.left - numel, self.pieces_left - 1
        self.used += (numel + 15) // 16 * 16
        return piece


class StreamedLinear:
    """y = x W^T for the rows of several Linear layers stacked into one W, kept in nn.Linear's
    own (out, in) layout: the kernel for up to MAX_ROWS rows, `F.linear` for more (a prefill).
    Returns one output per layer. The weights are copied into `memory` (a `HugePages`) when it
    is given; else a single layer's weight is used as it is, not copied."""

    def __init__(self, *weights: torch.Tensor, memory: HugePages | None = None):
        if memory is not None:
            rows = sum(w.shape[0] for w in weights)
            weight = memory.take(rows * weights[0].shape[1]).view(rows, -1)
            torch.cat([w.detach() for w in weights], out=weight)
        else:
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.weight = weight.detach().contiguous()
        self.sizes = [w.shape[0] for w in weights]

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1])
        if len(flat) > MAX_ROWS:
            y = F.linear(flat, self.weight)
        elif torch.compiler.is_compiling():
            y = _streamed(flat, self.weight)
        else:
            y = product(flat, self.weight)
        y = y.view(*x.shape[:-1], -1)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else y
