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

`Step.loop` goes one further and runs `generate`'s loop in C++ (without top-k or top-p, until
ended rows are to leave the batch): each row's token drawn from the logits (`sample`:
`generate.sample_categorical`'s inverse CDF in one pass over the row), recorded, the rows that
drew a stop id ended, and the next step taken.
After a step has swept the processor's caches, each small torch operation from Python costs
30-50 us: the Python loop's ~40 of them a token took 1.1-1.3 ms at one row, 6% of the step.

It applies inside `packed_for_decoding` when the streamed layout is in use (it reads that
layout's stacked weights): float32 on the CPU, up to `streamed.MAX_ROWS` rows, the plain
`KVCache` (padded rows and all), a language-model head. `generate` then takes it for every step
after the prefill, with or without `compile`; elsewhere the model's own forward runs.
MINIRM_CPU_STEP=0 turns off the step and the loop (`sample_next` still draws in C++ on the
CPU, `sample`). Its sums are taken in another order than torch's, so the
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
    "minirm_sample": [_P, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, _P, _P, _P],
    "minirm_decode_loop": [_P, _P, ctypes.c_float] + [_P] * 8 + [ctypes.c_float] + [_P] * 6,
}, returns=("minirm_decode_step", "minirm_sample", "minirm_decode_loop"))


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

    def _check(self, cache, B):
        if cache.k is None or not _cache_fits(self.cfg, cache, B):
            raise ValueError(f"a decoding step of {B} rows needs a prefilled KVCache of {B} "
                             "rows with contiguous buffers (decode.applies)")
        if cache.pos >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; all are filled")

    def _dims(self, B, cache):
        return (ctypes.c_int64 * 11)(*self.dims, B, cache.max_len, cache.pos,
                                     len(self.embedding))

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B = len(tokens)
        self._check(cache, B)
        # The kernel does the rest of KVCache.start and .advance itself (marks the slot real
        # in cache.mask, adds one to cache.lengths), and looks the tokens up and rotates by each
        # row's position as Transformer.body does: each of those is a small operation a step,
        # and after a step has swept the caches, ~10 us each from Python.
        tokens = tokens.to(torch.int64).contiguous()
        logits = torch.empty(B, self.dims[-1])
        status = LIBRARY.lib.minirm_decode_step(
            self.pointers, self._dims(B, cache), self.eps, tokens.data_ptr(),
            self.embedding.data_ptr(), self.inv_freq.data_ptr(), cache.k.data_ptr(),
            cache.v.data_ptr(), cache.mask.data_ptr(), cache.lengths.data_ptr(),
            logits.data_ptr())
        if status:
            raise IndexError(f"token ids must be in [0, {len(self.embedding)}): got "
                             f"{tokens.min().item()}..{tokens.max().item()}")
        cache.pos += 1
        global steps_run
        steps_run += 1
        return logits

    @torch.inference_mode()
    def loop(self, cache: KVCache, logits, first: int, last: int, temperature: float, u,
             stop_ids, pad_id: int, tokens, logprobs, valid, done, enough: int = 0) -> int:
        """Steps `first` .. `last` - 1 of `generate`'s loop in one call, for a batch that keeps
        all its rows: sample a token per row from `logits` (as `sample_next` does without
        top-k or top-p; `u` (max_new, B) float64 holds every step's numbers, None at
        temperature 0), record it in `tokens`, `logprobs` and `valid` (B, max_new) at column
        step (pad_id once a row has ended), end the rows that drew one of `stop_ids` (`done`,
        (B,) bool), and take the step that gives the next `logits` (B, vocab), which are
        written in place. It stops early once every row has ended or max_new tokens are
        drawn, after the step once `enough` rows have ended (0: never; the caller then drops
        them from the batch), and before a step it cannot take (a row's logits with a NaN or
        +inf or nothing above -inf, a token outside the embedding), leaving that step's
        logits in place and nothing of it recorded. Returns the step to sample next."""
        B, max_new = tokens.shape
        self._check(cache, B)
        buffers = [("logits", logits, torch.float32, (B, self.dims[-1])),
                   ("tokens", tokens, torch.int64, (B, max_new)),
                   ("logprobs", logprobs, torch.float32, (B, max_new)),
                   ("valid", valid, torch.bool, (B, max_new)), ("done", done, torch.bool, (B,))]
        if temperature > 0:  # (unread at temperature 0)
            buffers.append(("u", u, torch.float64, (max_new, B)))
        for name, x, dtype, shape in buffers:
            if (x is None or x.dtype != dtype or x.shape != shape or not x.is_contiguous()
                    or x.device.type != "cpu"):
                raise ValueError(f"Step.loop: {name} must be a contiguous {tuple(shape)} "
                                 f"{dtype} CPU tensor")
        stop = torch.tensor(sorted(set(stop_ids)) or [-1], dtype=torch.int64)
        # A step a sample at most, each into a free slot of the cache.
        last = min(last, max_new, first + cache.max_len - cache.pos)
        state = (ctypes.c_int64 * 7)(first, cache.pos, last, max_new, len(set(stop_ids)),
                                     pad_id, enough if enough > 0 else B)
        LIBRARY.lib.minirm_decode_loop(
            self.pointers, self._dims(B, cache), self.eps, self.embedding.data_ptr(),
            self.inv_freq.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(),
            cache.mask.data_ptr(), cache.lengths.data_ptr(), logits.data_ptr(), state,
            max(temperature, 0.0), u.data_ptr() if temperature > 0 else None, stop.data_ptr(),
            tokens.data_ptr(), logprobs.data_ptr(), valid.data_ptr(), done.data_ptr())
        global steps_run
        steps_run += state[1] - cache.pos
        cache.pos = state[1]
        return state[0]


def sample(logits: torch.Tensor, temperature: float, u: torch.Tensor | None):
    """`generate.sample_next` without top-k or top-p, in one call to C++: (tokens (B,),
    logprobs (B,)) for float32 CPU logits (B, V) that need no gradient, or None where it does
    not apply (another device or dtype, the library not built, a row with a NaN or +inf or
    nothing above -inf). `u`: the rows' uniform numbers (B, 1) float64 (unused at
    temperature 0); temperature 0 takes the first largest logit.

    `sample_categorical`'s draw by inverse CDF, to rounding: the first token whose running sum
    of weights passes u times their total. The weights are the kernels' exp (0 below e^-87),
    summed 16 (or 8) at a time in float32, then run through in double precision; where the
    target falls within ~1e-6 of an entry's edge the two can pick neighbours. After a
    decoding step has swept the processor's caches, sample_next's ~25 small operations took
    ~0.8 ms a token at one row of SmolLM2's 49k vocabulary, this ~0.1 ms."""
    if (logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2
            or logits.requires_grad or not available()):
        return None
    logits = logits.contiguous()
    B, V = logits.shape
    greedy = not temperature > 0
    if not greedy:
        if u is None:
            raise ValueError("decode.sample: temperature > 0 needs u, one number a row")
        u = u.to(torch.float64).contiguous()
        if u.shape != (B, 1):
            raise ValueError(f"decode.sample: u must be ({B}, 1), got {tuple(u.shape)}")
    tokens, logprobs = torch.empty(B, dtype=torch.int64), torch.empty(B)
    bad = LIBRARY.lib.minirm_sample(logits.data_ptr(), B, V, max(temperature, 0.0),
                                    None if greedy else u.data_ptr(), tokens.data_ptr(),
                                    logprobs.data_ptr())
    return None if bad >= 0 else (tokens, logprobs)
