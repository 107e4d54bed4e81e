"""A decoding step on the CPU in one call: the whole model for one new token per row
(`minirm/decode.cpp`, built on first use by `minirm.native`).

A decoding step of one row reads every weight once and does two floating-point operations per
weight, so its time should be the time to stream the weights from memory. Run as the model's
Python, it is ~120 products and ~500 small operations, each a call from Python: on a 2-core
Xeon, SmolLM2-135M's products alone took 19.8 ms a token when called back to back from C, but
a step 32 ms eager and 27 ms compiled (`generate(compile=True)`: inductor fuses the small
operations, yet each product and attention's two batched products stay a call of their own,
and dynamo checks ~3,400 guards before each step).

This step is the same model written once more, in C++: the tokens' embeddings, each row's
RoPE angles at its position and the cache's bookkeeping (the slot marked, the lengths
advanced); then for each layer the RMSNorm, the q/k/v product, RoPE, the key and value written
into the cache, attention over the cache, the output product and residual, the feed-forward's
norm, gate/up product, SwiGLU, down product and residual; then the final norm and the output
layer. The products are the streamed kernel of
`minirm.streamed` (each weight read once for all rows), the threads stay in one parallel
region for the whole step, and nothing returns to Python until the logits are done.

It applies inside `packed_for_decoding` when the streamed layout is in use (it reads that
layout's stacked weights): float32 on the CPU, up to `streamed.MAX_ROWS` rows, the plain
`KVCache` (padded rows and all), a language-model head. `generate` then takes it for every step
after the prefill, with or without `compile`; elsewhere the model's own forward runs.
MINIRM_CPU_STEP=0 turns it off. Its sums are taken in another order than torch's, so the
logits agree with the model's forward to float32 rounding (tests/test_decode.py).
"""

import ctypes
import os

import torch

from minirm import streamed
from minirm.model import KVCache
from minirm.native import Library
from minirm.streamed import StreamedLinear

_P = ctypes.c_void_p
steps_run = 0  # by `Step`s in this process: the bench notes whether a case took them
LIBRARY = Library("decode.cpp", {
    "minirm_decode_step": [_P, _P, ctypes.c_float] + [_P] * 8,
}, returns=("minirm_decode_step",))


def available() -> bool:
    """Whether the step is built and loaded here (built on the first call)."""
    return LIBRARY.available()


def applies(model, cache, rows: int) -> bool:
    """Whether `Step` can decode `rows` rows of `model` over `cache`: the model runs in the
    streamed layout (`minirm.packed`), in float32 on the CPU, with a language-model head; the
    cache is a prefilled plain `KVCache`; and the library is built here."""
    if os.environ.get("MINIRM_CPU_STEP", "1") == "0":
        return False
    if type(cache) is not KVCache or cache.k is None or not 0 < rows <= streamed.MAX_ROWS:
        return False
    head = model.packed_head
    norms = [model.norm.weight] + [layer.attention_norm.weight for layer in model.layers] + [
        layer.ffn_norm.weight for layer in model.layers]
    return (isinstance(head, StreamedLinear) and cache.k.dtype == torch.float32
            and cache.k.device.type == "cpu" and cache.pos < cache.max_len
            and all(isinstance(layer.attention.packed[0], StreamedLinear)
                    for layer in model.layers)
            and all(w.dtype == torch.float32 for w in norms)
            and _cache_fits(model.cfg, cache, rows) and available())


def _cache_fits(cfg, cache, rows) -> bool:
    """The cache's buffers are laid out as the kernel reads them, for `rows` rows."""
    shape = (cfg.n_layers, rows, cfg.n_kv_heads, cache.max_len, cfg.head_dim)
    return (cache.k.shape == cache.v.shape == shape and cache.k.is_contiguous()
            and cache.v.is_contiguous() and cache.v.dtype == torch.float32
            and cache.mask.shape == (rows, cache.max_len) and cache.mask.dtype == torch.bool
            and cache.mask.is_contiguous())


class Step:
    """Decoding steps of `model` in its streamed layout: `step(tokens, cache)` takes one token
    per row (B,), writes its keys and values into `cache` and advances it, and returns the
    next position's logits (B, vocab), as `model(tokens[:, None], None, cache)[:, -1]` does,
    for a cache that `applies` accepts. A step reads the layout's weights as they were when it
    was made: after the weights change, make a new one (`generate` makes one a call)."""

    def __init__(self, model):
        if not available():
            raise RuntimeError(f"the decoding step is not available here: {LIBRARY.why}")
        cfg = model.cfg
        weights = []
        for layer in model.layers:
            (qkv, wo), (gate_up, down) = layer.attention.packed, layer.feed_forward.packed
            weights += [layer.attention_norm.weight, qkv.weight, wo.weight,
                        layer.ffn_norm.weight, gate_up.weight, down.weight]
        weights += [model.norm.weight, model.packed_head.weight]
        # Held here: the step reads them by address.
        self.weights = [w.detach().contiguous() for w in weights]
        if any(w.dtype != torch.float32 for w in self.weights):
            raise ValueError("the decoding step takes float32 weights (decode.applies)")
        self.pointers = (_P * len(self.weights))(*[w.data_ptr() for w in self.weights])
        self.embedding = model.tok_embeddings.weight.detach().contiguous()
        self.inv_freq = model.inv_freq(torch.device("cpu")).float().contiguous()
        if self.embedding.dtype != torch.float32:
            raise ValueError("the decoding step takes float32 weights (decode.applies)")
        self.dims = [cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                     cfg.ffn_dim, self.weights[-1].shape[0]]
        self.eps = cfg.norm_eps
        self.cfg = cfg

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B = len(tokens)
        if cache.k is None or not _cache_fits(self.cfg, cache, B):
            raise ValueError(f"a decoding step of {B} rows needs a prefilled KVCache of {B} "
                             "rows with contiguous buffers (decode.applies)")
        if cache.pos >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; all are filled")
        # The kernel does the rest of KVCache.start and .advance itself (marks the slot real
        # in cache.mask, adds one to cache.lengths), and looks the tokens up and rotates by each
        # row's position as Transformer.body does: each of those is a small operation a step,
        # and after a step has swept the caches, ~10 us each from Python.
        tokens = tokens.to(torch.int64).contiguous()
        logits = torch.empty(B, self.dims[-1])
        dims = (ctypes.c_int64 * 11)(*self.dims, B, cache.max_len, cache.pos, len(self.embedding))
        status = LIBRARY.lib.minirm_decode_step(
            self.pointers, dims, self.eps, tokens.data_ptr(), self.embedding.data_ptr(),
            self.inv_freq.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(),
            cache.mask.data_ptr(), cache.lengths.data_ptr(), logits.data_ptr())
        if status:
            raise IndexError(f"token ids must be in [0, {len(self.embedding)}): got "
                             f"{tokens.min().item()}..{tokens.max().item()}")
        cache.pos += 1
        global steps_run
        steps_run += 1
        return logits
