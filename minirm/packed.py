"""Packed weights for decoding on the CPU: the same matmuls, read faster.

Decoding one token reads every weight once and does little arithmetic with it, so its speed is
the speed at which the matrix-vector products stream weights from memory. On a CPU in float32,
`F.linear` on a Llama-sized matrix reaches only about half of the machine's bandwidth (the BLAS
matrix-vector kernel is tuned for long rows; a 576-wide row is short), and the per-token step
launches seven of them per layer. Inside `packed_for_decoding(model)`:

- the q, k and v projections become one matrix, and so do SwiGLU's gate and up projections (w1,
  w3): fewer and larger products, the same numbers (rows of a product are independent);
- every projection, and the output layer, is reordered once into oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`), whose matrix-vector kernel streams at close to
  the bandwidth limit on both cores.

Packing copies the weights: the model's own parameters are untouched and stay in use for
training and gradients, and the packed copy (as large again as the projections and the output
layer) stays with the model for the next `generate` call, rebuilt when any weight has changed
since (an optimizer step, a load); `release(model)` frees it. Packing SmolLM2-135M takes ~0.3 s,
so a REINFORCE step repacks after its optimizer updates for a small fraction of its rollout
time. It applies only where it helps and is exact: float32 weights on the CPU, plain `Linear`
layers (not tensor-parallel shards), dim x dim of at least MIN_WEIGHTS, gradients off.
Elsewhere the model runs as written. The packed kernels agree with `F.linear` to float32
rounding (tests/test_model.py).
"""

from contextlib import contextmanager

import torch
import torch.nn as nn

from minirm import onednn


# Packing for a batch of 16 rows reads fastest here for 1 to 8 rows alike (measured on the
# smollm2-135m shapes, 2 EPYC cores); the hint changes the blocking, never the result.
BATCH_HINT = 16
# oneDNN's call costs ~15 us more than F.linear's, which only pays off for matrices of more than
# ~100k weights; below MIN_WEIGHTS (a toy model's) the model runs unpacked.
MIN_WEIGHTS = 2**17


class PackedLinear:
    """y = x W^T for the rows of several Linear layers stacked into one W, in a packed layout."""

    def __init__(self, *weights: torch.Tensor):
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.sizes = [w.shape[0] for w in weights]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)

    def __call__(self, x):
        shape = x.shape[:-1]
        y = onednn.product(x.reshape(-1, x.shape[-1]), self.packed).view(*shape, -1)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else y


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


def _pack(model):
    packs = []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        packs.append(((PackedLinear(a.wq.weight, a.wk.weight, a.wv.weight),
                       PackedLinear(a.wo.weight)),
                      (PackedLinear(f.w1.weight, f.w3.weight), PackedLinear(f.w2.weight))))
    head = None
    if model.score is None:  # the language-model head (tied: the embedding matrix)
        head = PackedLinear((model.tok_embeddings if model.output is None
                             else model.output).weight)
    return packs, head


@contextmanager
def packed_for_decoding(model):
    """Within this block, gradient-free forward passes of `model` use packed weights.

    The packed copy stays with the model for the next call and is rebuilt when any weight has
    changed since (an optimizer step, a load); `release(model)` frees it."""
    if not can_pack(model):
        yield model
        return
    versions = _versions(model)
    cached = getattr(model, "_packed_cache", None)
    if cached is None or cached[0] != versions:
        model._packed_cache = None  # free the stale copy before making the new one
        model._packed_cache = (versions, _pack(model))
    packs, head = model._packed_cache[1]
    for layer, (attn, ffn) in zip(model.layers, packs):
        layer.attention.packed, layer.feed_forward.packed = attn, ffn
    model.packed_head = head
    try:
        yield model
    finally:
        for layer in model.layers:
            layer.attention.packed = layer.feed_forward.packed = None
        model.packed_head = None


def release(model):
    """Drop the packed copy of the weights that `packed_for_decoding` keeps."""
    model._packed_cache = None
