"""Decoding steps replayed as CUDA graphs.

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
"""

import torch
import torch.distributed as dist

from minirm.model import KVCache


class StaticKVCache(KVCache):
    """A prefilled `KVCache`'s buffers, advanced one token a step with the slot in a tensor."""

    static = True  # `Transformer.body` then attends over every slot and never reads the mask back

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

    def start(self, mask):
        """One new token per row: mark its slot real; the key mask is every slot."""
        self.mask.index_copy_(1, self.slot, mask)
        return self.mask

    def update(self, layer, k, v):
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]

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


def decoding_step(model, cache: KVCache, graph: bool = True):
    """A function tok (B,) -> logits (B, vocab) for the position after `cache`, which each call
    advances by one slot, up to the cache's length. With `graph` and `can_graph`, the step is
    captured once and replayed; without, the same static step runs eagerly."""
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
        def eager(tok):
            check()
            return model(tok[:, None], None, static)[:, -1]
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
