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

The graph (a warm-up step and the recording: 34-42 ms for an 8B model on an H200, where a
replay takes 6.4 ms; `torch.cuda.graph` also empties the allocator's cache first) is kept with
the model, with its cache, for the next call: a run of `generate` calls of the same batch size
(an evaluation's batches, a benchmark's repeats) takes the new prompts' prefill into the same
buffers and replays the same graph. Its cache has a multiple of SLOT_BLOCK slots, so that
calls of nearby lengths share it; a call that needs more slots, or weights that moved (a
cast, a new device), capture again, and `release(model)` frees it (in-place updates of the
weights, as an optimizer makes them, keep it: the graph reads them where they are).

With `compile=True` the graph records compiled blocks instead of eager ones: inductor's fused
kernels in place of the ~30 small ones of each layer. One compiled function serves every block
(`compiled_block`: each block writes through its own view of the cache, so the compiled code
never sees a layer's number), which compiles in seconds where the whole step as one function
(below) takes minutes for a large model; replayed from the graph, the Python around each block
costs nothing. The prefill, ~1,100 kernels launched from Python for an 8B model (15-20 ms, a
few steps' time), then runs block by block compiled too, straight into the graph's cache
(`prefilled_step`: the static cache takes a prefill from empty into its first slots; one
compilation serves every prompt length).

On the CPU the same static step can run through `torch.compile` as a whole
(`decoding_step(compile=True)`, `generate(compile=True)`; `compiled_static_step`): inductor
fuses the ~20 small operations of each layer between the products (norms, RoPE, cache writes,
SwiGLU, residuals) into a few C++ loops, and the step's Python runs once per compiled graph,
not once per operation (compiled block by block, the Python around 30 blocks took back most of
the gain: 37.9 ms a step at one row against 38.8 eager and 29.8 compiled whole); attention is
the reference formula, which inductor fuses, in place of the model's backend. On a 2-core Xeon,
timed in turns with the eager steps in one process, SmolLM2-135M's steps were 16-24% faster at
8 rows (68-82 ms against 80-107 on a busy host) and 24-34% at 1 row (35-39 against 51-53),
after 25-130 s of compiling on the first call (benchmarks/README.md). The cache's length is
marked dynamic, so one compilation serves every prompt length and number of new tokens; each
new batch size or packed layout (`minirm.packed`) compiles again. Where the streamed layout is
in use, `generate` takes `minirm.decode`'s step instead, the whole step in one call to C++: 20
ms at one row against 27 compiled, 26 ms at 8 rows against 37-42.
"""

import functools
import weakref

import torch
import torch.distributed as dist

from minirm.model import KVCache


class StaticKVCache(KVCache):
    """A KV cache of `slots` slots whose fill position is a tensor (`slot`): each call writes
    its T new tokens at slots slot .. slot + T - 1 and attends over every slot, the empty ones
    masked. `of(cache)` copies a prefilled plain cache into one; its buffers stay with the
    model between calls (`decoding_step`), `load` and `clear` start the next call."""

    static = True  # `Transformer.body` then attends over every slot and never reads the mask back
    backend = None  # the attention backend of the steps, when not the model's own
    run_block = None  # with compiled blocks (`compile_blocks`), what runs each block instead
    compiled = None  # how its steps run compiled: "step", "blocks" or not (None)

    def __init__(self, n_layers, batch, heads, slots, head_dim, dtype, device):
        super().__init__(n_layers, batch, slots)
        shape = (n_layers, batch, heads, slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        # Each layer writes into its own view. Compiled, a write into a view of the buffer that
        # all layers share became a copy of the whole buffer per layer: SmolLM2's compiled step
        # took 113-126 ms at 8 rows that way, 56-63 ms with these views.
        self.layer_k, self.layer_v = list(self.k.unbind(0)), list(self.v.unbind(0))
        self.views = [_LayerView(self, i) for i in range(n_layers)]
        self.calls = 0  # `load`s and `clear`s so far: each starts another call's steps

    @classmethod
    def of(cls, cache: KVCache, slots: int | None = None):
        """A static cache holding `cache`'s filled slots, with `slots` slots (at least its)."""
        layers, batch, heads, _, head_dim = cache.k.shape
        static = cls(layers, batch, heads, max(slots or 0, cache.max_len), head_dim,
                     cache.k.dtype, cache.k.device)
        static.load(cache)
        return static

    def clear(self):
        """Every slot empty, for a prefill from the start. Empty slots still enter attention's
        product with the values (by a zero weight), so they must hold numbers: they are zeroed,
        whatever an earlier call left in them."""
        for t in (self.k, self.v, self.mask, self.lengths, self.slot):
            t.zero_()
        self.pos = 0  # slots filled when the static steps began (they do not update it)
        self.calls += 1

    def load(self, cache: KVCache):
        """Take in a prefilled cache of the same batch and heads: its filled slots, mask and
        lengths, every other slot empty (zeroed, as in `clear`: a cache copied for several
        samples, `KVCache.rows`, leaves them uninitialised). The copies stay where they are
        (a CUDA graph reads them there)."""
        p = cache.pos
        for mine, theirs in ((self.k, cache.k), (self.v, cache.v)):
            mine[:, :, :, :p].copy_(theirs[:, :, :, :p])
            mine[:, :, :, p:].zero_()
        self.mask.zero_()
        self.mask[:, :p].copy_(cache.mask[:, :p])
        self.lengths.copy_(cache.lengths)
        self.slot.fill_(p)
        self.pos = p
        self.calls += 1

    def start(self, mask):
        """Mark the new tokens' slots real or padding. One token a row: the key mask is every
        slot (those after it are empty). Several: a prefill from empty (`prefilled_step`),
        whose keys are the first T slots, and so is its key mask."""
        T = mask.shape[1]
        if T == 1:
            self.mask.index_copy_(1, self.slot, mask)
            return self.mask
        self._check_prefill(T)
        self.mask[:, :T] = mask
        return self.mask[:, :T]

    def update(self, layer, k, v):
        return self.views[layer].update(layer, k, v)

    def compile_blocks(self):
        """Run the blocks through one compiled function (`compiled_block`) from now on."""
        self.mark_dynamic()
        self.run_block, self.compiled = self._compiled_block, "blocks"

    def _compiled_block(self, i, block, x, cos, sin, key_mask, allowed):
        """Block i of a pass over this cache, compiled: the same compiled code for every block
        (it sees block i's weights and its own view of the cache, never the number i), and for
        every prompt length of a prefill (its length is marked dynamic)."""
        marks = [(key_mask, 1), (allowed, 3)]  # the cache's slots, or a prefill's length
        if x.shape[1] > 1:
            marks += [(x, 1), (cos, 1), (sin, 1), (allowed, 2)]
        for t, dim in marks:
            torch._dynamo.maybe_mark_dynamic(t, dim)
        return compiled_block()(block, x, cos, sin, key_mask, self.views[i], allowed)

    def _check_prefill(self, T):
        if self.pos != 0:  # (its length is `prefilled_step`'s to check: compiled, a test of
            # max_len here would compile once per cache length)
            raise ValueError(f"a static cache takes {T} tokens a row only as a prefill from "
                             "empty (StaticKVCache.clear)")

    def mark_dynamic(self):
        """Tell `torch.compile` that the number of slots varies from call to call."""
        for t in self.layer_k + self.layer_v:
            torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.maybe_mark_dynamic(self.mask, 1)

    def advance(self, mask):
        self.lengths += mask.sum(-1)
        self.slot += mask.shape[1]

    def rows(self, rows):
        raise NotImplementedError("a static cache keeps its batch; decode with the plain KVCache "
                                  "to drop rows")


class _LayerView:
    """One layer's part of a `StaticKVCache`, as a cache for that layer's block alone: a compiled
    block that wrote through the whole cache would look its layer up by number and compile once
    per layer."""

    static = True

    def __init__(self, cache: StaticKVCache, layer: int):
        self.cache, self.k, self.v = cache, cache.layer_k[layer], cache.layer_v[layer]

    @property
    def backend(self):
        return self.cache.backend

    def update(self, layer, k, v):
        """The new keys and values of T tokens a row: one at the cache's slot (a step), or the
        first T slots (a prefill from empty, `StaticKVCache.start`)."""
        T = k.shape[2]
        if T == 1:
            self.k.index_copy_(2, self.cache.slot, k)
            self.v.index_copy_(2, self.cache.slot, v)
            return self.k, self.v
        self.k[:, :, :T] = k
        self.v[:, :, :T] = v
        return k, v


def run_block(block, x, cos, sin, key_mask, view: _LayerView, allowed):
    """One block of a pass over a static cache, with the block's own view of it."""
    return block(x, cos, sin, key_mask, view, 0, allowed, None)


@functools.cache
def compiled_block():
    """`run_block` through `torch.compile`, one for the process: one compiled graph serves every
    block of a model, and the graphs are kept between calls (one for steps, one for prefills,
    per batch size, packed layout and model shape). The whole step compiled as one function (30
    blocks unrolled) took 90 s to compile for SmolLM2-135M on the CPU, and the whole prefill
    120 s; block by block, 21 s and 6 s (the first call's time, packing included)."""
    from minirm.model import allow_recompiles

    allow_recompiles(32)
    return torch.compile(run_block)


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


def static_prefill(model, cache: StaticKVCache, tokens, mask):
    """Prompts (B, P) into a cleared static cache: logits (B, vocab) at the last position."""
    h = model.body(tokens, mask, cache)[:, -1:]
    return model.logits_from(model.norm(h))[:, -1]


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
# `prefilled_step` pads prompts on the left to a multiple of this many tokens.
PREFILL_ALIGN = 8
# model -> (key, StaticKVCache, graph replay or None): the step kept for each model's next call.
# Beside the model, not on it: a copy of the model (deepcopy, pickle) should not carry a graph.
KEPT = weakref.WeakKeyDictionary()


def _kept(model, like, max_len: int, graph: bool, compiled: str | None):
    """The static cache and graph replay (None without a graph) kept with `model` for caches
    like `like` (n_layers, batch, heads, head_dim, dtype, device) of up to `max_len` slots: the
    kept ones when they fit, else new ones (captured at once, with `graph`). `compiled`: None,
    "step" (the whole step through `compiled_static_step`) or "blocks" (`compiled_block`).

    They depend on how the step runs, the cache's shape and type, the attention backends, and
    where each weight lives (a graph reads them there: an optimizer's step updates them in place
    and keeps the graph, a cast or a move replaces them)."""
    block = SLOT_BLOCK if graph else 1
    slots = -(-max_len // block) * block
    device = like[-1]
    # RoPE's frequencies too, made now rather than inside a compiled or captured call: their
    # first making would compile once more and could land inside the capture.
    key = (graph, compiled, like, slots, tuple(layer.attention.backend for layer in model.layers),
           tuple(p.data_ptr() for p in model.parameters()), model.inv_freq(device).data_ptr(),
           torch.is_inference_mode_enabled())  # (inference tensors: in-place only in there)
    kept = KEPT.get(model)
    if kept is None or kept[0] != key:
        KEPT.pop(model, None)  # free the last one's buffers and graph before making these
        layers, batch, heads, head_dim, dtype, device = like
        static = StaticKVCache(layers, batch, heads, slots, head_dim, dtype, device)
        if compiled == "blocks":
            static.compile_blocks()
        elif compiled == "step":
            static.mark_dynamic()
            static.compiled = "step"
        if compiled:
            # Attention written out (the reference backend) compiles into a few fused loops
            # around two small products; SDPA stays one opaque call. Compiled, SmolLM2's steps
            # took 61-67 ms against 69-85 with SDPA at 8 rows (Xeon, in turns), 33-36 against
            # 35-44 at 1 row. The backends compute the same function (tests/test_attention.py).
            static.backend = "reference"
        replay = _captured(model, static, compiled) if graph else None
        kept = KEPT[model] = (key, static, replay)  # nothing in it refers to the model
    return kept[1], kept[2]


def _check_backend(model):
    if not takes_step_mask(model):
        raise ValueError("static decoding steps need an attention backend that takes the "
                         "step's mask (reference or sdpa), not flash")


def decoding_step(model, cache: KVCache, graph: bool = True, compile: bool = False,
                  blocks: bool | None = None):
    """A function tok (B,) -> logits (B, vocab) for the position after `cache`, which each call
    advances by one slot, up to the cache's length. With `graph` and `can_graph`, the step is
    captured once and replayed; without, the same static step runs eagerly. With `compile` it
    runs through `torch.compile`: block by block (`blocks`, the default with a graph:
    `compiled_block`, which compiles in seconds and costs a few hundred microseconds of Python a
    block, nothing once captured) or as a whole (the default without: `compiled_static_step`,
    minutes of compiling for a large model, one call a step).

    The step and its cache (`StaticKVCache`, `.cache` of the function returned) stay with the
    model: the next call with a cache of the same shape takes them over (`StaticKVCache.load`)
    and replays the same graph, so capture is paid once for many `generate` calls.
    `release(model)` frees them."""
    _check_backend(model)
    graph = graph and can_graph(model, cache)
    layers, batch, heads, _, head_dim = cache.k.shape
    like = (layers, batch, heads, head_dim, cache.k.dtype, cache.k.device)
    how = None if not compile else "blocks" if (graph if blocks is None else blocks) else "step"
    static, replay = _kept(model, like, cache.max_len, graph, how)
    static.load(cache)
    return _stepper(model, static, replay, cache.max_len)


def prefill_applies(model, device, cuda_graphs: bool, compile: bool) -> bool:
    """`generate` prefills straight into the kept static cache (`prefilled_step`) with compiled
    steps on a GPU: there the plain prefill's ~1,100 kernels launched from Python take 15-20 ms
    for an 8B model, a few of its steps."""
    return device.type == "cuda" and cuda_graphs and compile and static_steps_apply(model)


def prefilled_step(model, tokens, mask, max_len: int, graph: bool = True,
                   compile: bool = False):
    """Prompts tokens (B, P), left-padded with `mask`, prefilled straight into the static cache
    that `decoding_step` keeps (no plain cache, no copy), in one pass through the static cache
    (`static_prefill`; with `compile` block by block through `torch.compile`, one compilation
    for every P; the steps too).
    Returns the logits at the last position (B, vocab) and the step function of
    `decoding_step`, for a cache of `max_len` slots."""
    _check_backend(model)
    if tokens.shape[1] > max_len:
        raise ValueError(f"KV cache holds {max_len} positions; {tokens.shape[1]} needed")
    # More left padding, to a multiple of PREFILL_ALIGN slots: it changes no output (padding
    # is masked, positions count real tokens), and the compiled prefill then never sees a
    # length of 1 (compiled apart) or an odd one (a mask's rows must be 16-byte aligned for
    # SDPA's memory-efficient kernel, which compiled code calls as it is).
    pad = -tokens.shape[1] % PREFILL_ALIGN
    if pad:
        tokens = torch.nn.functional.pad(tokens, (pad, 0))
        mask = torch.nn.functional.pad(mask, (pad, 0))
        max_len += pad
    device = tokens.device
    graph = graph and device.type == "cuda" and static_steps_apply(model)
    cfg, weight = model.cfg, model.layers[0].attention.wk.weight
    like = (len(model.layers), len(tokens), cfg.n_kv_heads, cfg.head_dim, weight.dtype, device)
    static, replay = _kept(model, like, max_len, graph, "blocks" if compile else None)
    static.clear()
    # The prefill attends with the model's own backend (the steps' reference formula would hold
    # every prompt's P x P scores at once).
    step_backend, static.backend = static.backend, None
    try:
        logits = static_prefill(model, static, tokens, mask)
    finally:
        static.backend = step_backend
    static.pos = tokens.shape[1]
    return logits, _stepper(model, static, replay, max_len)


def _stepper(model, static, replay, max_len):
    """The step function over `static`, filled to `static.pos` for a call of `max_len` slots."""
    step_fn = compiled_static_step() if static.compiled == "step" else static_step
    left = [max_len - static.pos]  # slots this call may fill: a replay past the cache's own
    # would write out of bounds on the device, which ends the CUDA context, not raises
    call = static.calls

    def step(tok):
        if static.calls != call:
            raise ValueError("a later decoding_step or prefilled_step call took over this "
                             "step's cache (one kept per model); make a new step")
        if left[0] <= 0:
            raise ValueError(f"KV cache holds {max_len} positions; all are filled")
        left[0] -= 1
        return replay(tok) if replay else step_fn(model, static, tok)
    step.cache = static
    return step


def release(model):
    """Free the static step and cache that `decoding_step` keeps for `model` (also done when
    the model is moved or cast: `Transformer._apply`)."""
    KEPT.pop(model, None)


def _captured(model, static: StaticKVCache, compiled: str | None):
    """The static step captured as a CUDA graph: a function tok (B,) -> logits (B, vocab) that
    replays it (its output is the same tensor every step)."""
    step_fn = compiled_static_step() if compiled == "step" else static_step
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
        for _ in range(2 if compiled else 1):  # a compiled function's first call compiles
            step_fn(model, static, tok_in)
            for t, s in zip((static.slot, static.lengths, static.mask), saved):
                t.copy_(s)
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # recorded, not run: the cache is left as it was
        logits_out = step_fn(model, static, tok_in)

    def replay(tok):
        tok_in.copy_(tok)
        g.replay()
        return logits_out
    return replay
