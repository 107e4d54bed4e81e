"""Weights laid out for decoding on the CPU: the same matmuls, read faster.

Decoding one token reads every weight once and does little arithmetic with it, so its speed is
the speed at which the matrix-vector products stream weights from memory, and the fastest way to
stream them depends on the processor. Inside `packed_for_decoding(model, rows)` the projections
run in whichever of three layouts decodes faster on this machine, measured once per process. In
all three, the q, k and v projections become one matrix, and so do SwiGLU's gate and up
projections (w1, w3): fewer and larger products, the same numbers (rows of a product are
independent). These are a copy, as large again as the projections and the output layer; the BLAS
layout for 2 to PAD_ROWS rows also keeps the fused q/k/v and gate/up matrices unpacked, for
prefills.

- `onednn`: every projection, and the output layer, reordered into oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`). On AMD EPYC its matrix-vector kernel streams at
  close to the bandwidth limit where `F.linear` (MKL, tuned for long rows; a 576-wide row is
  short) reaches about half.
- `blas`: torch's BLAS (MKL in the x86 builds). For one row, and for more than PAD_ROWS, the
  weights stored transposed, (in, out) contiguous, and y = x @ W^T computed as x times that
  row-major matrix: on Intel Xeon MKL streams one row 20-30% faster than `F.linear` reads the
  model's own (out, in) weights, and faster than oneDNN's packed layout. For 2 to PAD_ROWS
  (16) rows, MKL's packed product (`torch.ops.mkl._mkl_linear`, cblas_sgemm_pack /
  cblas_sgemm_compute): the weights reordered once for products of that many rows, where a
  plain product of a few rows packs them again on every call. On the Xeon, one pass over
  SmolLM2-135M's projections at 8 rows took 32-44 ms against 44-57 for `F.linear` or the
  transposed weights and 39 in oneDNN's layout. (At 64 rows too the packed product is ahead,
  89 against 105 ms, but a REINFORCE rollout's batch shrinks as samples end, and each new
  number of rows would need a new pack.)
- `streamed`: the weights in nn.Linear's own layout, multiplied by the hand-written kernel of
  `minirm.streamed` for up to 16 rows (each weight read once for all rows, the next ones
  prefetched), `F.linear` for more. On the Xeon it reads SmolLM2-135M's projections at 8 rows
  in 28-34 ms against 38-42 for MKL's packed product, and one row about as fast as the BLAS
  layout. It is offered where the kernel builds (a C++ compiler with OpenMP). Its copy holds
  every projection and the output layer in one block of huge pages (`streamed.HugePages`:
  ~10% faster to stream than 4 KiB pages), and its decoding steps run in one call to C++
  (`minirm.decode`).

`choose` times the model's own decoding steps in each layout, several in a row as `generate`
runs them (once per process, model shape, thread count and number of rows: ~3 s for
SmolLM2-135M at 1 or 8 rows, longer for larger models and batches): timing the products alone,
or steps alternating between the layouts, predicted the wrong layout for 8 rows on the Xeon.
It holds one layout's copy at a time, never two. MINIRM_CPU_MATMUL=onednn, =blas or =streamed
fixes the choice instead. The chosen weights stay with the model for the next `generate` call,
rebuilt when any weight has changed since (an optimizer step, a load); `release(model)` frees them,
and a REINFORCE rollout or an evaluation during SFT calls it after generating, so the copy is
not held through the optimizer's steps (packing SmolLM2-135M takes ~0.3 s, a small fraction of
a rollout). It applies only where it can help and is exact: float32 weights on the CPU,
plain `Linear` layers (not tensor-parallel shards), dim x dim of at least MIN_WEIGHTS, gradients
off. Elsewhere the model runs as written. All layouts agree with `F.linear` to float32
rounding (tests/test_model.py).

Under `torch.compile` (a compiled decoding step, `minirm.graphs`) the products are called as
the operators `minirm::onednn_packed`, `minirm::mkl_packed` and `minirm::streamed`
(`minirm.ops`): inductor has lowerings of its own for the underlying packed calls, but they
accept only weights that inductor packed itself while freezing a model; an operator is one
opaque call for the compiler. Outside the compiler the calls go direct (an operator adds ~3 us
a call in Python).
"""

import math
import time
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from minirm import onednn, streamed
from minirm.errors import UserError
from minirm.ops import opaque
from minirm.streamed import StreamedLinear

# Packing for a batch of 16 rows reads fastest here for 1 to 8 rows alike (measured on the
# smollm2-135m shapes, 2 EPYC cores); the hint changes the blocking, never the result.
BATCH_HINT = 16
# oneDNN's call costs ~15 us more than F.linear's, which only pays off for matrices of more than
# ~100k weights; below MIN_WEIGHTS (a toy model's) the model runs unpacked.
MIN_WEIGHTS = 2**17
LAYOUTS = ("onednn", "blas", "streamed")
# The BLAS layout uses MKL's packed product for 2 to PAD_ROWS rows. Up to here its products take
# about as long as those of one row (Xeon, SmolLM2-135M's projections: 29-32 ms for 4 to 16 rows,
# 50 for 32), so a pack serves fewer rows padded; for more rows each drop of the batch would
# need a new pack (~0.2 s), where the transposed weights take any number of rows.
PAD_ROWS = 16
# `choose` times the layouts again when the two fastest are within this factor: on a shared
# machine a burst of other work can bring them to the same time.
CLEAR_LEAD = 1.1


# The packed products as opaque calls for torch.compile (minirm.ops).
_onednn_packed = opaque(
    "onednn_packed", "(Tensor x, Tensor packed) -> Tensor", onednn.product,
    lambda x, packed: x.new_empty(x.shape[0], packed.shape[0]))
_mkl_packed = opaque(
    "mkl_packed", "(Tensor x, Tensor packed, Tensor weight, int rows) -> Tensor",
    lambda x, packed, weight, rows: torch.ops.mkl._mkl_linear(x, packed, weight, None, rows),
    lambda x, packed, weight, rows: x.new_empty(x.shape[0], weight.shape[0]))


class PackedLinear:
    """y = x W^T for the rows of several Linear layers stacked into one W, in oneDNN's packed
    layout; returns one output per layer."""

    def __init__(self, *weights: torch.Tensor):
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.sizes = [w.shape[0] for w in weights]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)

    def __call__(self, x):
        shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            y = _onednn_packed(flat, self.packed)
        else:
            y = onednn.product(flat, self.packed)
        y = y.view(*shape, -1)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else y


class TransposedLinear:
    """The same call on the layers' weights stacked and stored transposed, (in, out)
    contiguous: x @ W^T as x times a row-major matrix, one BLAS product."""

    def __init__(self, *weights: torch.Tensor):
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.sizes = [w.shape[0] for w in weights]
        self.transposed = weight.detach().t().contiguous()

    def __call__(self, x):
        y = x @ self.transposed
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else y


class RowsPackedLinear:
    """The same call through MKL's packed product, the stacked weights reordered once for
    products of `rows` rows (at most PAD_ROWS). Fewer rows, as when rows leave a decoding
    batch, are padded with zero rows: up to PAD_ROWS rows a product costs what reading the
    weights costs. More rows (a prefill) take `F.linear` on the weights unpacked, which MKL's
    packed call does by itself."""

    def __init__(self, rows: int, *weights: torch.Tensor):
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.weight = weight.detach().contiguous()
        self.sizes = [w.shape[0] for w in weights]
        self.rows = None
        self.pack_for(rows)

    def pack_for(self, rows: int):
        if rows != self.rows:
            self.rows = rows
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, rows)

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1])
        n = len(flat)
        if n < self.rows:
            flat = F.pad(flat, (0, 0, 0, self.rows - n))
        if torch.compiler.is_compiling():
            y = _mkl_packed(flat, self.packed, self.weight, self.rows)
        else:
            y = torch.ops.mkl._mkl_linear(flat, self.packed, self.weight, None, self.rows)
        y = y[:n].view(*x.shape[:-1], -1)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else y


def mkl_packing() -> bool:
    """Whether this torch has MKL's packed product (its x86 builds do)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def packs_rows(rows: int) -> bool:
    """Whether the BLAS layout serves steps of `rows` rows with MKL's packed product."""
    return 1 < rows <= PAD_ROWS and mkl_packing()


def can_pack(model) -> bool:
    weight = model.tok_embeddings.weight
    from minirm.model import Linear

    plain = all(type(m) is Linear for layer in model.layers
                for m in (layer.attention.wq, layer.attention.wo, layer.feed_forward.w1,
                          layer.feed_forward.w2))
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and plain
            and type(model.tok_embeddings) is nn.Embedding
            and model.cfg.dim * model.cfg.dim >= MIN_WEIGHTS
            and torch.backends.mkldnn.is_available())


def _versions(model):
    """Changes whenever a weight is updated in place or replaced."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def layouts() -> list[str]:
    """The layouts this machine offers: `streamed` where its kernel builds."""
    return [name for name in LAYOUTS if name != "streamed" or streamed.available()]


def _make(layout, rows, model):
    """The class of one product in `layout` for decoding steps of `rows` rows of `model`."""
    if layout == "onednn":
        return PackedLinear
    if layout == "streamed":  # all of the model's products in one block of huge pages
        weights = [w for group in _weights(model) for w in group]
        memory = streamed.HugePages(sum(w.numel() for w in weights), len(weights))
        return lambda *weights: StreamedLinear(*weights, memory=memory)
    if packs_rows(rows):
        return lambda *weights: RowsPackedLinear(rows, *weights)
    return TransposedLinear


def _weights(model):
    """The weights of each product of a decoding step, in order: per layer q/k/v, the
    attention's output, gate/up and down; then the language-model head (tied: the embedding
    matrix), if the model has one."""
    groups = []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        groups += [(a.wq.weight, a.wk.weight, a.wv.weight), (a.wo.weight,),
                   (f.w1.weight, f.w3.weight), (f.w2.weight,)]
    if model.score is None:
        groups.append(((model.tok_embeddings if model.output is None else model.output).weight,))
    return groups


def _pack(model, layout, rows):
    make = _make(layout, rows, model)
    products = [make(*group) for group in _weights(model)]
    packs = [(tuple(products[i:i + 2]), tuple(products[i + 2:i + 4]))
             for i in range(0, 4 * len(model.layers), 4)]
    head = products[-1] if model.score is None else None
    return packs, head


def _products(packs, head):
    return [p for attn, ffn in packs for p in attn + ffn] + ([head] if head else [])


def _fits(weights, layout, rows) -> bool:
    """Whether `weights`, built in `layout` for an earlier call, serve steps of `rows` rows:
    the BLAS layout is one of two classes by the number of rows, and its packed products are
    packed again for another number of rows (`RowsPackedLinear.pack_for`, ~0.2 s for
    SmolLM2-135M)."""
    products = _products(*weights)
    packed_rows = isinstance(products[0], RowsPackedLinear)
    if layout == "blas" and packed_rows != packs_rows(rows):
        return False
    if packed_rows:
        for p in products:
            p.pack_for(rows)
    return True


def _installed(model, packs, head):
    for layer, (attn, ffn) in zip(model.layers, packs):
        layer.attention.packed, layer.feed_forward.packed = attn, ffn
    model.packed_head = head


def _removed(model):
    for layer in model.layers:
        layer.attention.packed = layer.feed_forward.packed = None
    model.packed_head = None


@torch.inference_mode()
def _fastest_step(model, weights, rows, steps=5):
    """The fastest of `steps` decoding steps of `rows` rows with `weights` (one layout's), taken
    in a row after a warm-up step, as `generate` runs them: in one call to C++ where that
    applies (`minirm.decode`, the streamed layout), else the model's own forward.

    In a row, not alternating with the other layout step by step: a processor's last-level
    cache keeps part of one step's weights for the next, and alternating between two copies
    of the weights loses that; on the Xeon it hid a 10-15% lead of one layout for 8 rows."""
    from minirm import decode
    from minirm.model import KVCache

    token = torch.zeros(rows, 1, dtype=torch.long)
    cache = KVCache(len(model.layers), rows, steps + 1)
    best = math.inf
    _installed(model, *weights)
    try:
        whole = None
        for i in range(steps + 1):
            start = time.perf_counter()
            if whole:
                whole(token[:, 0], cache)
            else:
                h = model.body(token, None, cache)
                if model.packed_head is not None:
                    model.packed_head(h)
            if i:
                best = min(best, time.perf_counter() - start)
            elif decode.applies(model, cache, rows):  # the warm-up step filled the cache
                whole = decode.Step(model)
    finally:
        _removed(model)
    return best


_CHOSEN = {}  # (model shape, threads, rows) -> layout


def choose(model, rows: int, built: dict) -> str:
    """The layout that decodes fastest here for `rows` rows at once, from the model's own
    decoding steps in each (`_fastest_step`; twice when neither leads by CLEAR_LEAD). Each
    layout is built, timed and dropped in turn, so that there is never more than one copy of
    the weights besides the model's own; the last one timed is left in `built`
    (name -> weights)."""
    if onednn.forced():
        if onednn.forced() == "streamed" and not streamed.available():
            raise UserError("MINIRM_CPU_MATMUL=streamed, but the kernel cannot be built here "
                            f"({streamed.why_unavailable()}); unset it or set it to blas")
        return onednn.forced()
    cfg = model.cfg
    key = (cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size,
           model.score is None, torch.get_num_threads(), rows)
    if key not in _CHOSEN:
        times = dict.fromkeys(layouts(), math.inf)
        for _ in range(2):  # a second round only for a close call (or a burst of load)
            for name in times:
                built.clear()  # free the last copy before making the next
                built[name] = _pack(model, name, rows)
                times[name] = min(times[name], _fastest_step(model, built[name], rows))
            first, second = sorted(times.values())[:2]
            if second > CLEAR_LEAD * first:
                break
        _CHOSEN[key] = min(times, key=times.get)
    return _CHOSEN[key]


@contextmanager
def packed_for_decoding(model, rows: int = 1):
    """Within this block, gradient-free forward passes of `model` use the weights laid out as
    decodes fastest here for steps of `rows` rows.

    The layout stays with the model for the next call and is rebuilt when any weight has
    changed since (an optimizer step, a load); `release(model)` frees it."""
    if not can_pack(model):
        yield model
        return
    versions = _versions(model)
    cached = getattr(model, "_packed_cache", None)
    if cached is None or cached[0] != versions:
        model._packed_cache = None  # free the stale copy before making the new one
        cached = model._packed_cache = (versions, {})
    built = cached[1]
    layout = choose(model, rows, built)
    for name in [n for n in built if n != layout]:
        del built[name]  # keep only the layout in use
    if layout not in built or not _fits(built[layout], layout, rows):
        built.pop(layout, None)
        built[layout] = _pack(model, layout, rows)
    _installed(model, *built[layout])
    try:
        yield model
    finally:
        _removed(model)


def layout_in_use(model):
    """The layout `packed_for_decoding` last used for `model` (one of LAYOUTS), or None."""
    cached = getattr(model, "_packed_cache", None)
    return next(iter(cached[1]), None) if cached else None


def release(model):
    """Drop the copy of the weights that `packed_for_decoding` keeps (either layout): callers
    that go on to change the weights (a REINFORCE rollout, an evaluation during training) call
    it after generating, so the copy is not held through the optimizer's steps."""
    model._packed_cache = None
