"""Weights laid out for decoding on the CPU: the same matmuls, read faster.

Decoding one token reads every weight once and does little arithmetic with it, so its speed is
the speed at which the matrix-vector products stream weights from memory, and the fastest way to
stream them depends on the processor. Inside `packed_for_decoding(model, rows)` the projections
run in whichever of two layouts reads faster on this machine, measured once per process:

- `onednn`: the q, k and v projections become one matrix, and so do SwiGLU's gate and up
  projections (w1, w3): fewer and larger products, the same numbers (rows of a product are
  independent). Every projection, and the output layer, is reordered once into oneDNN's blocked
  layout (`torch.ops.mkldnn._reorder_linear_weight`). On AMD EPYC its matrix-vector kernel
  streams at close to the bandwidth limit where `F.linear` (MKL, tuned for long rows; a 576-wide
  row is short) reaches about half. This is a copy, as large again as the projections and the
  output layer.
- `blas`: `F.linear` on the model's own weights, one product per projection (no copy). On Intel
  Xeon, MKL's kernel reads 30-60% faster than oneDNN's packed one, and a fused gate/up matrix
  reads slower than its two halves.

`choose` times one pass over every layer's products in both layouts (~0.5 s, once per process,
model shape, thread count and number of rows); MINIRM_CPU_MATMUL=onednn or =blas fixes the
choice instead. The chosen weights stay with the model for the next `generate` call,
rebuilt when any weight has changed since (an optimizer step, a load); `release(model)` frees
them. Packing SmolLM2-135M takes ~0.3 s, so a REINFORCE step repacks after its optimizer
updates for a small fraction of its rollout time. It applies only where it can help and is
exact: float32 weights on the CPU, plain `Linear` layers (not tensor-parallel shards), dim x dim
of at least MIN_WEIGHTS, gradients off. Elsewhere the model runs as written. Both layouts agree
with `F.linear` to float32 rounding (tests/test_model.py).
"""

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from minirm import onednn

# Packing for a batch of 16 rows reads fastest here for 1 to 8 rows alike (measured on the
# smollm2-135m shapes, 2 EPYC cores); the hint changes the blocking, never the result.
BATCH_HINT = 16
# oneDNN's call costs ~15 us more than F.linear's, which only pays off for matrices of more than
# ~100k weights; below MIN_WEIGHTS (a toy model's) the model runs unpacked.
MIN_WEIGHTS = 2**17
LAYOUTS = ("onednn", "blas")


class PackedLinear:
    """y = x W^T for the rows of several Linear layers stacked into one W, in oneDNN's packed
    layout; returns one output per layer."""

    def __init__(self, *weights: torch.Tensor):
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.sizes = [w.shape[0] for w in weights]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)

    def __call__(self, x):
        shape = x.shape[:-1]
        y = onednn.product(x.reshape(-1, x.shape[-1]), self.packed).view(*shape, -1)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else y


class PlainLinear:
    """The same call on the layers' own weights, one F.linear (torch's BLAS) each."""

    def __init__(self, *weights: torch.Tensor):
        self.weights = [w.detach() for w in weights]

    def __call__(self, x):
        ys = [F.linear(x, w) for w in self.weights]
        return ys if len(ys) > 1 else ys[0]


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


def _pack(model, layout):
    make = PackedLinear if layout == "onednn" else PlainLinear
    packs = []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        packs.append(((make(a.wq.weight, a.wk.weight, a.wv.weight), make(a.wo.weight)),
                      (make(f.w1.weight, f.w3.weight), make(f.w2.weight))))
    head = None
    if model.score is None:  # the language-model head (tied: the embedding matrix)
        head = make((model.tok_embeddings if model.output is None else model.output).weight)
    return packs, head


def _products(packs, head, rows, dim, ffn):
    """One decoding step's products alone, on random inputs."""
    x, h = torch.randn(rows, dim), torch.randn(rows, ffn)
    for (qkv, wo), (w13, w2) in packs:
        q = qkv(x)[0]
        wo(x if q.shape[-1] == dim else torch.randn(rows, q.shape[-1]))
        w13(x)
        w2(h)
    if head is not None:
        head(x)


_CHOSEN = {}  # (model shape, threads, rows) -> layout


def choose(model, rows: int, built: dict) -> str:
    """The layout whose products read fastest here for `rows` rows at once: one pass over all
    layers in each, timed in turns, the fastest of three passes each. Layouts it builds to time
    them are left in `built` (name -> weights)."""
    if onednn.forced():
        return onednn.forced()
    cfg = model.cfg
    key = (cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size,
           model.score is None, torch.get_num_threads(), rows)
    if key not in _CHOSEN:
        for name in LAYOUTS:
            if name not in built:
                built[name] = _pack(model, name)
        times = onednn.fastest_of([
            lambda name=name: _products(*built[name], rows, cfg.dim, cfg.ffn_dim)
            for name in LAYOUTS])
        _CHOSEN[key] = LAYOUTS[times.index(min(times))]
    return _CHOSEN[key]


@contextmanager
def packed_for_decoding(model, rows: int = 1):
    """Within this block, gradient-free forward passes of `model` use the weights laid out as
    reads fastest here for steps of `rows` rows.

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
    if layout not in built:
        built[layout] = _pack(model, layout)
    packs, head = built[layout]
    for layer, (attn, ffn) in zip(model.layers, packs):
        layer.attention.packed, layer.feed_forward.packed = attn, ffn
    model.packed_head = head
    try:
        yield model
    finally:
        for layer in model.layers:
            layer.attention.packed = layer.feed_forward.packed = None
        model.packed_head = None


def layout_in_use(model):
    """The layout `packed_for_decoding` last used for `model` ("onednn" or "blas"), or None."""
    cached = getattr(model, "_packed_cache", None)
    return next(iter(cached[1]), None) if cached else None


def release(model):
    """Drop the weights that `packed_for_decoding` keeps (a packed copy, for oneDNN)."""
    model._packed_cache = None
