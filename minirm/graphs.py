"""Decoding steps replayed as CUDA graphs, or compiled on the CPU.

A decoding step of batch 1 on a GPU does little work per kernel: an 8B model's step is ~1,200
small kernels (norms, RoPE, products of one row, cache writes), each launched from Python. The
launches take longer than the GPU takes to read the weights, so the GPU waits on Python. A CUDA
graph records the kernels of one step once; replaying it launches all of them in one call.

A graph replays the same kernels on the same memory, so everything a step reads or writes must
sit at fixed addresses with fixed shapes. The plain `KVCache` is not like that: its fill
position is a Python int that slices the buffers, and a step attends over the filled slots
only. `StaticKVCache` copies a prefilled cache into buffers of its own and keeps the position
in a tensor: a step writes its keys and values at that slot (`index_copy_`) and attends over
every slot, the empty ones hidden by the mask (and zeroed: a masked value still enters the
product with a zero weight, and must not be NaN).

`decoding_step(model, cache)` returns a function tok (B,) -> logits (B, vocab) of the next
position that advances the cache by one token: replayed from a graph on a CUDA device, run
eagerly elsewhere (the same code and numbers as the graph, so the CPU tests check it). Sampling
stays outside the graph: it is a few kernels a step, and keeps its own random generator.

What it simplifies: the batch is fixed for the graph (rows that end keep decoding padding), and
every step attends over the whole cache, so `generate` graphs only small batches (up to
`generate.GRAPH_ROWS` rows), where launches dominate a step: a large batch's step is long enough
for its launches to overlap the GPU's work, and it still drops ended rows and reads only the
filled slots. One process only: under torchrun every rank decodes step by step.

The graph is captured after a prefill (a warm-up step and the recording: 34-42 ms for an 8B
model on an H200, where a replay takes 6.4 ms; `torch.cuda.graph` also empties the allocator's
cache first) and kept with the model, with its cache, for the next call: a run of `generate`
calls of the same batch size (an evaluation's batches, a benchmark's repeats) takes
the new prompts' prefill into the same buffers and replays the same graph. Its cache has a
multiple of SLOT_BLOCK slots, so that calls of nearby lengths share it; a call that needs
more slots, or weights that moved (a cast, a new device), capture again, and `release(model)`
frees it (in place updates of the weights, as an optimizer makes them, keep it: the graph
reads them where they are). With `compile=True` the graph records the compiled step (below)
instead of the eager one: inductor's fused kernels in place of the ~30 small ones of each
layer.

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
    """A copy of a prefilled `KVCache` with `slots` slots (at least the cache's), advanced one
    token a step with the slot in a tensor. Its buffers stay with the model between calls
    (`decoding_step`); `load` takes in the next call's prefilled cache."""

    static = True  # `Transformer.body` then attends over every slot and never reads the mask back
    backend = None  # the attention backend of the steps, when not the model's own

    def __init__(self, cache: KVCache, slots: int | None = None):
        slots = max(slots or 0, cache.max_len)
        super().__init__(cache.n_layers, cache.k.shape[1], slots)
        layers, batch, heads, _, head_dim = cache.k.shape
        self.k = cache.k.new_zeros(layers, batch, heads, slots, head_dim)
        self.v = cache.v.new_zeros(layers, batch, heads, slots, head_dim)
        self.mask = cache.mask.new_zeros(batch, slots)
        self.lengths = torch.zeros_like(cache.lengths)
        self.slot = torch.zeros(1, dtype=torch.long, device=cache.k.device)
        # Each layer writes into its own view. Compiled, a write into a view of the buffer that
        # all layers share became a copy of the whole buffer per layer: SmolLM2's compiled step
        # took 113-126 ms at 8 rows that way, 56-63 ms with these views.
        self.layer_k, self.layer_v = list(self.k.unbind(0)), list(self.v.unbind(0))
        self.load(cache)

    def load(self, cache: KVCache):
        """Take in a prefilled cache of the same batch and heads: its filled slots, mask and
        lengths, every other slot empty. The copies stay where they are (a CUDA graph reads them
        there). Empty slots still enter attention's product with the values (by a zero weight),
        so they must hold numbers: they are zeroed, whatever an earlier call or a cache copied
        for several samples (`KVCache.rows`, uninitialised there) left in them."""
        p = cache.pos
        for mine, theirs in ((self.k, cache.k), (self.v, cache.v)):
            mine[:, :, :, :p].copy_(theirs[:, :, :, :p])
            mine[:, :, :, p:].zero_()
        self.mask.zero_()
        self.mask[:, :p].copy_(cache.mask[:, :p])
        self.lengths.copy_(cache.lengths)
        self.slot.fill_(p)
        self.pos = p  # slots filled when the static steps began (they do not update it)

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


# A graph's cache has a multiple of SLOT_BLOCK slots, so that the next call's graph serves
# calls whose prompts and new tokens fill a few more or fewer. Every step attends over all of
# them: 256 slots of an 8B model's cache are 32 MiB a row, read each step beside 15 GiB of
# weights. Without a graph the cache has the slots the call needs, no more.
SLOT_BLOCK = 256


def _key(model, cache: KVCache, graph: bool, compile: bool):
    """What a kept step depends on: how it runs, the cache's shape and type, the attention
    backends, and where each weight lives (a graph reads them there: an optimizer's step
    updates them in place and keeps the graph, a cast or a move replaces them)."""
    block = SLOT_BLOCK if graph else 1
    slots = -(-cache.max_len // block) * block
    return (graph, compile, tuple(cache.k.shape[:3]), cache.k.shape[4], slots, cache.k.dtype,
            cache.k.device, tuple(layer.attention.backend for layer in model.layers),
            tuple(p.data_ptr() for p in model.parameters()))


def decoding_step(model, cache: KVCache, graph: bool = True, compile: bool = False):
    """A function tok (B,) -> logits (B, vocab) for the position after `cache`, which each call
    advances by one slot, up to the cache's length. With `graph` and `can_graph`, the step is
    captured once and replayed; without, the same static step runs eagerly, or with `compile`
    through `torch.compile` (`compiled_static_step`; on a GPU, the compiled step is what the
    graph captures).

    The step and its cache (`StaticKVCache`, `.cache` of the function returned) stay with the
    model: the next call with a cache of the same shape takes them over (`StaticKVCache.load`)
    and replays the same graph, so capture is paid once for many `generate` calls.
    `release(model)` frees them."""
    if not takes_step_mask(model):
        raise ValueError("static decoding steps need an attention backend that takes the "
                         "step's mask (reference or sdpa), not flash")
    graph = graph and can_graph(model, cache)
    key = _key(model, cache, graph, compile)
    kept = getattr(model, "_kept_step", None)
    if kept is not None and kept[0] == key:
        _, static, replay = kept
        static.load(cache)
    else:
        model._kept_step = None  # free the last one's buffers and graph before making these
        static = StaticKVCache(cache, key[4])
        if compile:
            static.mark_dynamic()
            # Attention written out (the reference backend) compiles into a few fused loops
            # around two small products; SDPA stays one opaque call. Compiled, SmolLM2's steps
            # took 61-67 ms against 69-85 with SDPA at 8 rows (Xeon, in turns), 33-36 against
            # 35-44 at 1 row. The backends compute the same function (tests/test_attention.py).
            static.backend = "reference"
        replay = _captured(model, static, compile) if graph else None
        model._kept_step = (key, static, replay)  # nothing in it refers back to the model
    fn = compiled_static_step() if compile else static_step
    left = [cache.max_len - cache.pos]  # slots this call may fill: a replay past the cache's
    # own would write out of bounds on the device, which ends the CUDA context, not raises

    def step(tok):
        if left[0] <= 0:
            raise ValueError(f"KV cache holds {cache.max_len} positions; all are filled")
        left[0] -= 1
        return replay(tok) if replay else fn(model, static, tok)
    step.cache = static
    return step


def release(model):
    """Free the static step and cache that `decoding_step` keeps with `model`."""
    model._kept_step = None


def _captured(model, static: StaticKVCache, compile: bool):
    """The static step captured as a CUDA graph: a function tok (B,) -> logits (B, vocab) that
    replays it (its output is the same tensor every step)."""
    fn = compiled_static_step() if compile else static_step
    device = static.k.device
    tok_in = torch.zeros(static.batch, dtype=torch.long, device=device)
    # Warm up on a side stream (as capture needs: libraries pick their kernels and workspaces
    # here, and torch.compile compiles), then undo what the warm-up steps did to the cache's
    # bookkeeping. The keys and values they wrote at the slot are written again by the first
    # real step before anything reads them.
    saved = static.slot.clone(), static.lengths.clone(), static.mask.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2 if compile else 1):  # a compiled function's first call compiles
            fn(model, static, tok_in)
            for t, s in zip((static.slot, static.lengths, static.mask), saved):
                t.copy_(s)
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # recorded, not run: the cache is as the prefill left it
        logits_out = fn(model, static, tok_in)

    def replay(tok):
        tok_in.copy_(tok)
        g.replay()
        return logits_out
    return replay
