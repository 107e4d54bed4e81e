"""Tensor parallelism written by hand (Megatron-LM, Shoeybi et al. 2019, section 3).

Everything rests on four autograd functions that move a tensor into and out of a "parallel
region", the stretch of computation where each of the tp ranks holds a slice:

    copy_to_region      forward: identity          backward: all-reduce   (Megatron's f)
    reduce_from_region  forward: all-reduce        backward: identity     (Megatron's g)
    scatter_to_region   forward: keep my slice     backward: all-gather   (last dimension)
    gather_from_region  forward: all-gather        backward: keep my slice

On top of them, the three layers of the Llama reference: a `ColumnParallelLinear` holds a slice
of the output features (Y_r = X A_r^T, eq. 3), a `RowParallelLinear` a slice of the input
features (Y = sum_r X_r A_r^T, the sum is the all-reduce), and a `VocabParallelEmbedding` a
slice of the vocabulary. An attention block is then column (wq, wk, wv: a share of the heads),
attention on local heads, row (wo): two all-reduces per block, one forward one backward; the MLP
the same with w1, w3 column and w2 row (eq. 3-4). `parallelize` swaps these into a built
`Transformer`; the model's forward is untouched (its views infer the local head count).

`vocab_parallel_logprobs` computes log-softmax over a vocabulary split across ranks from three
all-reduces of (B, T) numbers, never gathering the (B, T, vocab) logits:

    with parallel.local_logits(model):           # the LM head skips its all-gather
        logits = model(tokens, mask)             # (B, T, vocab / tp)
    logp = parallel.vocab_parallel_logprobs(logits[:, :-1], tokens[:, 1:], grid.tp_group)

Everything else sees full logits: `minirm.generate.generate` runs unchanged (the KV cache holds
this rank's heads) and draws the same tokens on every rank when each passes a generator with
the same seed. Loading only this rank's slices is `checkpoint.load_model(..., grid=grid)`.

Simplifications: no sequence parallelism (activations outside the regions are replicated), no
overlap of communication with compute, kv heads are never replicated (tp must divide
n_kv_heads). The vocabulary may split unevenly (259 = 130 + 129 at tp=2, for the byte-level
presets): ranks hold ceil(vocab / tp) rows, the last one fewer.
"""

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from minirm.distributed import group_size
from minirm.errors import UserError


def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def shard_range(n: int, tp: int, rank: int):
    """Rows [start, end) of `n` held by `rank`: ceil(n / tp) each, the last rank fewer."""
    chunk = -(-n // tp)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


def _sizes(n: int, tp: int):
    return [e - s for s, e in (shard_range(n, tp, r) for r in range(tp))]


# ------------------------------------------------------------------ the four communication ops

def _all_reduce(x, group):
    if group_size(group) == 1:
        return x
    x = x.clone()  # the input may be saved for backward; reduce a copy
    dist.all_reduce(x, group=group)
    return x


def _split_last(x, group, sizes):
    rank = _rank(group)
    start = sum(sizes[:rank])
    return x[..., start:start + sizes[rank]].contiguous()


def _gather_last(x, group, sizes):
    """Concatenate every rank's x along the last dim; `sizes` may differ (padded to the max)."""
    if group_size(group) == 1:
        return x
    width = max(sizes)
    x = F.pad(x, (0, width - x.shape[-1])).contiguous()
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[..., :s] for p, s in zip(parts, sizes)], dim=-1)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _split_last(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group, ctx.sizes), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _gather_last(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group, ctx.sizes), None, None


def copy_to_region(x, group):
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x, group):
    return _ReduceFromRegion.apply(x, group)


def scatter_to_region(x, group, sizes=None):
    """My slice of the last dimension; `sizes` per rank, equal shares by default."""
    sizes = sizes or _sizes(x.shape[-1], group_size(group))
    return _ScatterToRegion.apply(x, group, list(sizes))


def gather_from_region(x, group, sizes=None):
    sizes = sizes or [x.shape[-1]] * group_size(group)
    return _GatherFromRegion.apply(x, group, list(sizes))


# -------------------------------------------------------------------------------- the layers

class _Sharded(nn.Module):
    """A weight holding rows or columns [start, end) of a full (out, in) or (vocab, dim) one."""

    shard_dim = 0

    def __init__(self, full_shape, grid, device=None, dtype=None):
        super().__init__()
        self.group, self.full_shape = grid.tp_group, tuple(full_shape)
        n = full_shape[self.shard_dim]
        self.sizes = _sizes(n, grid.tp_size)
        self.start, self.end = shard_range(n, grid.tp_size, grid.tp_rank)
        shape = list(full_shape)
        shape[self.shard_dim] = self.end - self.start
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.weight.tp_sharded = True  # for clip_grad_norm_tp, which sees parameters only
        # load_state_dict(assign=True) puts in a new Parameter: mark that one too.
        self.register_load_state_dict_post_hook(
            lambda m, _: setattr(m.weight, "tp_sharded", True))

    @classmethod
    def from_dense(cls, dense, grid, **kw):
        """The shard of a built nn.Linear / nn.Embedding (on the meta device: an empty shard)."""
        w = dense.weight
        shape = w.shape if cls is VocabParallelEmbedding else w.shape[::-1]  # Linear: (in, out)
        m = cls(*shape, grid, device=w.device, dtype=w.dtype, **kw)
        if not w.is_meta:
            with torch.no_grad():
                m.weight.copy_(w.narrow(cls.shard_dim, m.start, m.end - m.start))
        return m

    def extra_repr(self):
        return f"full={self.full_shape}, dim {self.shard_dim} [{self.start}:{self.end}]"


class ColumnParallelLinear(_Sharded):
    """nn.Linear(in, out, bias=False) whose output features are split: y_r = x A_r^T.

    gather_output=False leaves y split (the input of a RowParallelLinear, or vocab-parallel
    logits); True all-gathers it into the full output.
    """

    def __init__(self, in_features, out_features, grid, gather_output=False, device=None,
                 dtype=None):
        super().__init__((out_features, in_features), grid, device, dtype)
        self.gather_output = gather_output

    def forward(self, x):
        y = F.linear(copy_to_region(x, self.group), self.weight)
        return gather_from_region(y, self.group, self.sizes) if self.gather_output else y


class RowParallelLinear(_Sharded):
    """nn.Linear(in, out, bias=False) whose input features are split: y = sum_r x_r A_r^T."""

    shard_dim = 1

    def __init__(self, in_features, out_features, grid, input_is_parallel=True, device=None,
                 dtype=None):
        super().__init__((out_features, in_features), grid, device, dtype)
        self.input_is_parallel = input_is_parallel

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.group, self.sizes)
        return reduce_from_region(F.linear(x, self.weight), self.group)


class VocabParallelEmbedding(_Sharded):
    """nn.Embedding(vocab, dim) with rows [start, end) here: ids elsewhere give zeros, summed."""

    def __init__(self, num_embeddings, embedding_dim, grid, device=None, dtype=None):
        super().__init__((num_embeddings, embedding_dim), grid, device, dtype)

    def forward(self, ids):
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        elsewhere = (ids < self.start) | (ids >= self.end)
        out = F.embedding((ids - self.start).masked_fill(elsewhere, 0), self.weight)
        return reduce_from_region(out.masked_fill(elsewhere[..., None], 0.0), self.group)


PARALLEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


# ------------------------------------------------------------------- vocabulary-parallel loss

def vocab_parallel_log_softmax(local_logits, group):
    """My slice of log_softmax over the whole vocabulary, in float32: z - logsumexp(z).

    Combine what is computed from it over the ranks with reduce_from_region (as
    vocab_parallel_logprobs does), e.g. entropy = -reduce_from_region((p * logp).sum(-1)).
    """
    z = local_logits.float()
    # Any shift cancels in z - m - log sum exp(z - m), so the max needs no gradient.
    m = z.max(-1).values.detach()
    if group_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # The sum must all-reduce in backward too: each rank's loss reaches logsumexp only through
    # its own slice (then a reduce_from_region), so its gradient is partial until summed.
    sum_exp = copy_to_region(reduce_from_region((z - m[..., None]).exp().sum(-1), group), group)
    return z - (m + sum_exp.log())[..., None]


def vocab_parallel_logprobs(local_logits, targets, group, vocab_start=None):
    """log p(targets) (B, T) float32 from vocab-parallel logits (B, T, vocab / tp).

    Each rank picks the targets that fall in its slice and the all-reduce sums the picks; the
    full (B, T, vocab) logits never exist. Targets outside [0, vocab) (an ignore index) give 0;
    mask them out. With one rank this is log_softmax(logits).gather(targets).
    """
    logp = vocab_parallel_log_softmax(local_logits, group)
    width = logp.shape[-1]
    if vocab_start is None:
        vocab_start = _vocab_start(width, group, logp.device)
    local = targets - vocab_start
    mine = (local >= 0) & (local < width)
    picked = logp.gather(-1, local.clamp(0, width - 1)[..., None])[..., 0]
    return reduce_from_region(picked.masked_fill(~mine, 0.0), group)


def vocab_parallel_cross_entropy(local_logits, targets, group, ignore_index=-100):
    """Mean negative log-likelihood over the targets that are not `ignore_index`."""
    keep = targets != ignore_index
    nll = -vocab_parallel_logprobs(local_logits, targets.masked_fill(~keep, 0), group)
    return (nll * keep).sum() / keep.sum().clamp(min=1)


def _vocab_start(width, group, device):
    if group_size(group) == 1:
        return 0
    widths = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(group_size(group))]
    dist.all_gather(widths, torch.tensor([width], device=device), group=group)
    return int(sum(w.item() for w in widths[:_rank(group)]))


# ------------------------------------------------------------------------- a whole model

def check_divisible(cfg, tp: int):
    """tp must split the heads, kv heads and the MLP evenly; say which tp would."""
    if tp < 1:
        raise UserError(f"tp={tp} must be at least 1")
    good = [t for t in range(1, cfg.n_kv_heads + 1)
            if not (cfg.n_heads % t or cfg.n_kv_heads % t or cfg.ffn_dim % t)]
    for name, n in (("n_kv_heads", cfg.n_kv_heads), ("n_heads", cfg.n_heads),
                    ("ffn_dim", cfg.ffn_dim)):
        if n % tp:
            raise UserError(f"{name}={n} is not divisible by tp={tp}; use tp in "
                            f"{', '.join(map(str, good))}")
    if -(-cfg.vocab_size // tp) * (tp - 1) >= cfg.vocab_size:
        raise UserError(f"vocab_size={cfg.vocab_size} is too small to split over tp={tp}")


def parallelize(model, grid):
    """Swap a built Transformer's layers for tensor-parallel ones, in place; returns the model.

    Works on real weights (each rank keeps its slice) and on the meta device (empty shards for
    `load_model(..., grid=grid)` to fill). Initialise weights before, never after: a shard has
    no way to draw the same numbers as the full tensor. The LM head gathers full logits by
    default (generation, evaluation); `local_logits(model)` switches it to vocab-parallel.
    """
    check_divisible(model.cfg, grid.tp_size)
    if grid.tp_size == 1:
        return model
    for block in model.layers:
        att, mlp = block.attention, block.feed_forward
        att.wq, att.wk, att.wv, mlp.w1, mlp.w3 = (
            ColumnParallelLinear.from_dense(m, grid)
            for m in (att.wq, att.wk, att.wv, mlp.w1, mlp.w3))
        att.wo, mlp.w2 = (RowParallelLinear.from_dense(m, grid) for m in (att.wo, mlp.w2))
    model.tok_embeddings = VocabParallelEmbedding.from_dense(model.tok_embeddings, grid)
    if model.output is not None:
        model.output = ColumnParallelLinear.from_dense(model.output, grid, gather_output=True)
    elif model.cfg.tie_embeddings:
        # The tied path of `logits_from` multiplies by the embedding weight with no
        # copy_to_region before it; a head that shares the (vocab-sharded) weight has one.
        model.output = ColumnParallelLinear(model.cfg.dim, model.cfg.vocab_size, grid,
                                            gather_output=True, device="meta")
        retie(model)
    # The reward head and the norms stay replicated: they read the replicated hidden state.
    return model


def retie(model):
    """Point a tied head back at the embedding weight (load_state_dict(assign=True) unties)."""
    if model.cfg.tie_embeddings and isinstance(model.output, ColumnParallelLinear):
        model.output.weight = model.tok_embeddings.weight


@contextmanager
def local_logits(model):
    """Inside, model(...) returns vocab-parallel logits (B, T, vocab / tp) for
    vocab_parallel_logprobs; outside, full logits. A no-op without tensor parallelism."""
    head = model.output if isinstance(model.output, ColumnParallelLinear) else None
    if head is None:
        yield model
        return
    head.gather_output = False
    try:
        yield model
    finally:
        head.gather_output = True


def shard_specs(model) -> dict:
    """Parameter name -> (dim, start, end) of the full tensor it holds; absent = replicated."""
    return {f"{name}.weight": (m.shard_dim, m.start, m.end)
            for name, m in model.named_modules() if isinstance(m, PARALLEL_LAYERS)}


def clip_grad_norm_tp(params, max_norm: float, grid) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a tensor-parallel model (or its parameters).

    A sharded weight's squared norm is summed over the tp group; a replicated one (the norms,
    the reward head) holds the whole gradient on every rank and is counted once. Returns the
    total norm, the same on every rank, so every rank scales by the same factor.
    """
    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    grads = [(p.grad, getattr(p, "tp_sharded", False)) for p in params if p.grad is not None]
    dev = grads[0][0].device if grads else torch.device("cpu")
    sq = [torch.zeros((), device=dev), torch.zeros((), device=dev)]  # replicated, sharded
    for g, sharded in grads:
        sq[sharded] += g.float().pow(2).sum()
    if group_size(grid.tp_group) > 1:
        dist.all_reduce(sq[1], group=grid.tp_group)
    total = (sq[0] + sq[1]).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for g, _ in grads:
        g.mul_(scale.to(g.dtype))
    return total


def gathered_hf_state(model, grid) -> dict | None:
    """The whole state under Hugging Face names on tp rank 0 (for save_model(state=...)),
    None on the other ranks. Every rank of the tp group must call it."""
    from minirm.checkpoint import name_map

    state = full_state_dict(model, grid)
    if state is None:
        return None
    ours_to_hf = {v: k for k, v in name_map(model.cfg).items()}
    return {ours_to_hf[k]: v for k, v in state.items() if k in ours_to_hf}


def full_state_dict(model, grid) -> dict | None:
    """The whole (unsharded) state on tp rank 0 of this tp group, None on the others.

    Tensors are gathered one at a time and moved to the CPU, so the device holds one full
    tensor at most; tp rank 0's host memory holds the whole model.
    """
    if grid.tp_size == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    specs, modules = shard_specs(model), dict(model.named_modules())
    out, seen = ({} if grid.tp_rank == 0 else None), set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:  # a tied head: stored once, under the embedding's name
            continue
        seen.add(t.data_ptr())
        if name in specs:
            dim, sizes = specs[name][0], modules[name.rsplit(".", 1)[0]].sizes
            t = _gather_to_first(t.transpose(0, dim), grid, sizes)
            t = None if t is None else t.transpose(0, dim)
        if out is not None:
            out[name] = t.detach().cpu().contiguous()
    return out


def _gather_to_first(t, grid, sizes):
    """Concatenate every rank's rows (dim 0, sizes may differ) on tp rank 0."""
    width = max(sizes)
    t = F.pad(t, (0, 0) * (t.dim() - 1) + (0, width - t.shape[0])).contiguous()
    parts = [torch.empty_like(t) for _ in sizes] if grid.tp_rank == 0 else None
    dist.gather(t, parts, group_dst=0, group=grid.tp_group)
    if parts is None:
        return None
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])
