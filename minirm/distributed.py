"""Processes, the 2-D (dp x tp) grid, and data parallelism.

One script runs as 1 process (plain `python -m ...`, no process group at all) or as N processes
under `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). The N
ranks form a grid of dp rows by tp columns: rank = dp_rank * tp + tp_rank, so the ranks of one
tensor-parallel group are neighbours (the GPUs of one node, where the links are fastest).

    grid = distributed.init(tp=2)                # dp = world // tp
    model = parallel.parallelize(model, grid)    # shards along tp (minirm/parallel.py)
    for batch in batches:                        # the same global batch on every rank
        local = distributed.dp_split(batch, grid)
        w = distributed.dp_weight(len(local), len(batch), grid)
        (w * loss_of(local)).backward()          # loss_of: a mean over the local items
        distributed.all_reduce_grads(model, grid)
        parallel.clip_grad_norm_tp(model, 1.0, grid)
        opt.step()

Data parallelism here is plain gradient averaging (every dp rank holds the whole tp shard and
its AdamW states), the simplest scheme that is exactly equivalent to one process; sharding the
optimizer (ZeRO / FSDP) is left out. Every check on the launch happens before the first
collective and is the same on every rank, so a bad launch fails everywhere at once instead of
leaving ranks waiting for each other.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from minirm.errors import UserError


@dataclass
class Grid:
    rank: int = 0
    world: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_group: object = None    # None when there is no process group (one process)
    dp_group: object = None
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs):
    """print() on rank 0 only, so one script's output reads the same on 1 process or N."""
    if env_rank() == 0:
        print(*args, **kwargs)


def init(tp: int = 1, dp: int | None = None, backend: str | None = None, device=None,
         timeout_s: float = 1800) -> Grid:
    """Join the process group (when launched by torchrun) and build the (dp x tp) grid.

    device: None means CUDA when available, else the CPU; on CUDA each rank uses
    cuda:LOCAL_RANK. backend: None means NCCL on CUDA, gloo on the CPU. `timeout_s` bounds
    every collective (and the rendezvous), so a rank that died cannot leave the others
    waiting forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if tp < 1 or (dp is not None and dp < 1):
        raise UserError(f"tp={tp} and dp={dp} must be positive")
    if dp is None:
        if world % tp:
            raise UserError(f"world size {world} is not divisible by tp={tp}; launch a multiple "
                            f"of {tp} processes (torchrun --nproc-per-node {tp})")
        dp = world // tp
    if tp * dp != world:
        raise UserError(f"tp={tp} x dp={dp} needs {tp * dp} processes but {world} were "
                        f"launched; run torchrun --nproc-per-node {tp * dp}")
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if backend is None and world > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" or device.startswith("cuda"):
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpus == 0:
            raise UserError(f"{backend or 'cuda'} needs CUDA GPUs but none are visible; "
                            "run on a GPU machine or use gloo on CPU (--device cpu)")
        if local_rank >= n_gpus:
            raise UserError(f"LOCAL_RANK={local_rank} but only {n_gpus} GPUs are visible; "
                            f"launch at most {n_gpus} processes per node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device)
    if world == 1:  # one process: nothing to join; parallel code sees groups of size 1
        return Grid(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    # Every rank must create every group, in the same order (torch.distributed's rule).
    tp_group = dp_group = None
    for d in range(dp):
        g = dist.new_group([d * tp + t for t in range(tp)])
        if rank // tp == d:
            tp_group = g
    for t in range(tp):
        g = dist.new_group([d * tp + t for d in range(dp)])
        if rank % tp == t:
            dp_group = g
    return Grid(rank=rank, world=world, tp_rank=rank % tp, tp_size=tp, dp_rank=rank // tp,
                dp_size=dp, tp_group=tp_group, dp_group=dp_group, device=device,
                backend=backend)


def group_size(group) -> int:
    """Processes in `group`; 1 when no process group exists (a single process)."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def device_for(grid: Grid | None) -> str:
    """The device name this process computes on ("cpu", "cuda:3")."""
    if grid is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(grid.device)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def destroy(grid: Grid | None = None):
    """Leave the process group (a no-op with one process); `grid` is accepted and unused."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------- data parallelism

def dp_split(items, grid: Grid):
    """This dp rank's contiguous share of a global batch (a list, range or tensor).

    Shares differ by at most one item (the first len % dp ranks get one more). Every rank must
    hold at least one item, so that every rank runs the same forward and backward.
    """
    if grid is None or grid.dp_size == 1:
        return items
    n, dp = len(items), grid.dp_size
    if n < dp:
        raise UserError(f"a batch of {n} items cannot be split over dp={dp} ranks; use a "
                        f"batch of at least {dp}")
    start = grid.dp_rank * (n // dp) + min(grid.dp_rank, n % dp)
    size = n // dp + (grid.dp_rank < n % dp)
    return items[start:start + size]


def dp_weight(n_local: int, n_global: int, grid: Grid) -> float:
    """Scale for a local mean loss so that averaging over dp gives the global mean.

    sum_r (n_r / n) mean_r = mean over the whole batch, and all_reduce_grads divides by dp, so
    each rank multiplies its mean by n_r * dp / n (exactly 1 when the batch splits evenly).
    """
    return n_local * grid.dp_size / n_global


def all_reduce_grads(model, grid: Grid, op: str = "mean"):
    """Average (op="mean") or sum (op="sum") every gradient over the dp group, after backward.

    "mean" goes with local losses scaled by dp_weight; "sum" with local losses already weighted
    by n_local / n_global (a share of the global batch), as gradient accumulation does.
    """
    if grid is None or grid.dp_size == 1:
        return
    if op not in ("mean", "sum"):
        raise ValueError(f"op={op!r}; use 'mean' or 'sum'")
    works = []
    for p in model.parameters():
        if p.grad is not None:
            if op == "mean":
                p.grad.div_(grid.dp_size)
            works.append(dist.all_reduce(p.grad, group=grid.dp_group, async_op=True))
    for w in works:
        w.wait()


def all_reduce_sum(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Sum of a tensor over the dp group (for metrics: item counts, weighted loss sums)."""
    if grid is None or grid.dp_size == 1:
        return x.detach().clone()
    y = x.detach().to(grid.device, copy=True)  # NCCL reduces GPU tensors only
    dist.all_reduce(y, group=grid.dp_group)
    return y.to(x.device)


def dp_average(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean of a tensor over the dp group (for logging a weighted loss: dp_average(w * loss))."""
    return all_reduce_sum(x, grid) / (grid.dp_size if grid is not None else 1)


def any_rank(flag: bool, grid: Grid) -> bool:
    """True on every rank when `flag` is true on any (e.g. Ctrl-C reached one rank)."""
    if grid is None or grid.world == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=grid.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def gather_objects(obj: dict, grid: Grid) -> dict:
    """Merge every rank's dict on rank 0 (other ranks get {}): e.g. optimizer shards to save."""
    if grid is None or grid.world == 1:
        return obj
    parts = [None] * grid.world if grid.is_main else None
    dist.gather_object(obj, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if grid.is_main else {}
