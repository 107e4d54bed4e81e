"""Decoding steps replayed as CUDA graphs, or compiled on the CPU.

A decoding step of batch 1 on a GPU does little work per kernel: an 8B model's step is ~1,200
small kernels (norms, RoPE, products of one row, cache writes), each launched from Python. The
launches take longer than the GPU takes to read the weights, so the GPU waits on Python. A CUDA
graph records the kernels of one step once; replaying it launches all of them in one call.

A graph replays the same kernels on the same memory, so everything a step reads or writes must
sit at fixed addresses with fixed shapes. The plain `KVCache` is not like that: its fill
position is a Python int that slices the buffers, and a step attends over the filled slots
only. `StaticKVCache` takes over a prefilled cache's buffers and keeps the position in a
tensor: a step writes its keys and values at that slot (`index_copy_`) and attends over every
slot, the empty ones hidden by the mask (and zeroed: a masked value still enters the product
with a zero weight, and must not be NaN).

`decoding_step(model, cache)` returns a function tok (B,) -> logits (B, vocab) of the next
position that advances the cache by one token: replayed from a graph on a CUDA device, run
eagerly elsewhere (the same code and numbers as the graph, so the CPU tests check it). Sampling
stays outside the graph: it is a few kernels a step, and keeps its own random generator.

What it simplifies: the batch is fixed for the graph (rows that end keep decoding padding), and
every step attends over the whole cache, so `generate` graphs only small batches (up to
`generate.GRAPH_ROWS` rows), where launches dominate a step: a large batch's step is long enough
for its launches to overlap the GPU's work, and it still drops ended rows and reads only the
filled slots. One graph per `generate` call, captured after the prefill (a warm-up step and the
recording: 34-42 ms for an 8B model on an H200, where a replay takes 6.4 ms; `torch.cuda.graph`
also empties the allocator's cache first). One process only: under torchrun every rank decodes
step by step.

On the CPU the same static step can run through `torch.compile` (`decoding_step(compile=True)`,
`generate(compile=True)`): inductor fuses the ~20 small operations of each layer between the
products (norms, RoPE, cache writes, SwiGLU, residuals) into a few C++ loops, and the step's
Python runs once per compiled graph, not once per operation; attention is the reference
formula, which inductor fuses, in place of the model's backend. On a 2-core Xeon, timed in
turns with the eager steps in one process, SmolLM2-135M's steps were 16-24% faster at 8 rows
(68-82 ms against 80-107 on a busy host) and 24-34% at 1 row (35-39 against 51-53), after
25-130 s of compiling on the first call (benchmarks/README.md). The cache's length is marked
dynamic, so one compilation serves every prompt length and number of new tokens; each new
batch size or packed layout (`minirm.packed`) compiles again. Where the streamed layout is in
use, `generate` takes `minirm.decode`'s step instead, the whole step in one call to C++: 20 ms
at one row against 27 compiled, 26 ms at 8 rows against 37-42.
"""

import functools

import torch
import torch.distributed as dist

from minirm.model import KVCache


class StaticKVCache(KVCache):
    """A prefilled `KVCache`'s buffers, advanced one token a step with the slot in a tensor."""

    static = True  # `Transformer.body` then attends over every slot and never reads the mask back
    backend = None  # the attention backend of the steps, when not the model's own

    def __init__(self, cache: KVCache):
        super().__init__(cache.n_layers, cache.k.shape[1], cache.max_len)
        self.k, self.v, self.mask, self.lengths = cache.k, cache.v, cache.mask, cache.lengths
        self.pos = cache.pos  # slots filled when the static steps began (they do not update it)
        # Masked slots still enter attention's product with the values (by a zero weight), so
        # they must hold numbers: a cache copied for several samples (`KVCache.rows`) leaves
        # them uninitialised.
        self.k[:, :, :, cache.pos:].zero_()
        self.v[:, :, :, cache.pos:].zero_()
        self.slot = torch.full((1,), cache.pos, dtype=torch.long, device=cache.k.device)
        # Each layer writes into its own view. Compiled, a write into a view of the buffer that
        # all layers share became a copy of the whole buffer per layer: SmolLM2's compiled step
        # took 113-126 ms at 8 rows that way, 56-63 ms with these views.
        self.layer_k, self.layer_v = list(self.k.unbind(0)), list(self.v.unbind(0))

    def start(self, mask):
        """One new token per row: mark its slot real; the key mask is every slot."""
        self.mask.index_copy_(1, self.slot, mask)
        return self.mask

    def update(self, layer, k, v):
        self.layer_k[layer].index_copy_(2, self.slot, k)
        self.layer_v[layer].index_copy_(2, self.slot, v)
        return self.layer_k[layer], self.layer_v[layer]

    def mark_dynamic(self):
        """Tell `torch.compile` that the number of slots varies from call to call."""
        for t in self.layer_k + self.layer_v:
            torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.maybe_mark_dynamic(self.mask, 1)

    def advance(self, mask):
        self.lengths += mask.sum(-1)
        self.slot += 1

    def rows(self, rows):
        raise NotImplementedError("a static cache keeps its batch; decode with the plain KVCache "
                                  "to drop rows")


def takes_step_mask(model) -> bool:
    """The model's attention takes the step's mask: the flash backend builds its own, which
    would let the query see the last slot, empty until the cache is full."""
    return all(layer.attention.backend != "flash" for layer in model.layers)


def static_steps_apply(model) -> bool:
    """`takes_step_mask`, and this process is the only one (under torchrun, products of a
    shard end in collectives: not captured)."""
    return takes_step_mask(model) and not (dist.is_available() and dist.is_initialized())


def can_graph(model, cache: KVCache) -> bool:
    """CUDA graphs apply: a prefilled cache on a CUDA device and `static_steps_apply`."""
    return (cache.k is not None and cache.k.device.type == "cuda"
            and static_steps_apply(model))


def static_step(model, cache: StaticKVCache, tok):
    """One decoding step over a static cache: tok (B,) -> logits (B, vocab)."""
    return model(tok[:, None], None, cache)[:, -1]


@functools.cache
def compiled_static_step():
    """`static_step` through `torch.compile`, one for the process: its compiled graphs are kept
    between `generate` calls (a graph per batch size, packed layout and model)."""
    from minirm.model import allow_recompiles

    allow_recompiles(32)
    return torch.compile(static_step)


def decoding_step(model, cache: KVCache, graph: bool = True, compile: bool = False):
    """A function tok (B,) -> logits (B, vocab) for the position after `cache`, which each call
    advances by one slot, up to the cache's length. With `graph` and `can_graph`, the step is
    captured once and replayed; without, the same static step runs eagerly, or with `compile`
    through `torch.compile` (`compiled_static_step`)."""
    if not takes_step_mask(model):
        raise ValueError("static decoding steps need an attention backend that takes the "
                         "step's mask (reference or sdpa), not flash")
    static = StaticKVCache(cache)
    left = [cache.max_len - cache.pos]  # slots still free: a replay past them would write
    # out of bounds on the device, which ends the CUDA context instead of raising

    def check():
        if left[0] <= 0:
            raise ValueError(f"KV cache holds {cache.max_len} positions; all are filled")
        left[0] -= 1

    if not (graph and can_graph(model, cache)):
        run = static_step
        if compile:
            static.mark_dynamic()
            # Attention written out (the reference backend) compiles into a few fused loops
            # around two small products; SDPA stays one opaque call. Compiled, SmolLM2's steps
            # took 61-67 ms against 69-85 with SDPA at 8 rows (Xeon, in turns), 33-36 against
            # 35-44 at 1 row. The backends compute the same function (tests/test_attention.py).
            static.backend = "reference"
            run = compiled_static_step()

        def eager(tok):
            check()
            return run(model, static, tok)
        return eager
    device = cache.k.device
    tok_in = torch.zeros(static.k.shape[1], 1, dtype=torch.long, device=device)
    # Warm up on a side stream (as capture needs: libraries pick their kernels and workspaces
    # here), then undo what the warm-up step did to the cache's bookkeeping. The keys and values
    # it wrote at the slot are written again by the first real step before anything reads them.
    saved = static.slot.clone(), static.lengths.clone(), static.mask.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        model(tok_in, None, static)
    torch.cuda.current_stream(device).wait_stream(side)
    for t, s in zip((static.slot, static.lengths, static.mask), saved):
        t.copy_(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # recorded, not run: the cache is as the prefill left it
        logits_out = model(tok_in, None, static)[:, -1]

    def step(tok):
        check()
        tok_in.copy_(tok[:, None])
        g.replay()
        return logits_out
    step.cache = static  # the graph reads and writes its tensors (the slot is its alone)
    return step
