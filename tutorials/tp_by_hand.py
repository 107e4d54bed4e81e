"""Tensor parallelism by hand on 2 CPU processes (chapter 12). Run it with torchrun:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 tutorials/tp_by_hand.py

Every rank runs this same file; torchrun sets RANK and WORLD_SIZE, and minirm.distributed.init
joins the gloo process group. Each check compares the 2-rank result with one process computing
the same thing on the full weights, which every rank can afford here (the debug preset).
"""

import torch
import torch.nn.functional as F

from minirm import distributed, parallel
from minirm.config import preset
from minirm.model import FeedForward, Transformer

grid = distributed.init(tp=2, device="cpu")
r = grid.tp_rank
lines = []  # what this rank has to say; rank 0 prints everyone's, in order

# 1. The four communication functions on a tiny tensor.
x = torch.arange(1.0, 7.0, requires_grad=True)                 # the same [1..6] on both ranks
mine = parallel.scatter_to_region(x, grid.tp_group)             # my slice of the last dim
back = parallel.gather_from_region(mine, grid.tp_group)         # every slice, concatenated
total = parallel.reduce_from_region(mine * (r + 1), grid.tp_group)  # a sum over the ranks
lines.append(f"scatter -> {mine.tolist()}, gather -> {back.tolist()}, "
             f"reduce(slice x (rank + 1)) -> {total.tolist()}")
y = parallel.copy_to_region(x, grid.tp_group)                   # identity forward ...
(y * (r + 1)).sum().backward()                                  # ... all-reduce backward
lines.append(f"copy_to_region: forward {y.tolist()[:3]}..., gradient {x.grad.tolist()[:3]}... "
             "(1 + 2 summed over the ranks)")

# 2. A SwiGLU MLP split Megatron's way: w1, w3 by output features, w2 by input features.
torch.manual_seed(0)                                            # same full weights everywhere
cfg = preset("debug")
dense = FeedForward(cfg)
w1 = parallel.ColumnParallelLinear.from_dense(dense.w1, grid)
w3 = parallel.ColumnParallelLinear.from_dense(dense.w3, grid)
w2 = parallel.RowParallelLinear.from_dense(dense.w2, grid)
h = torch.randn(2, 5, cfg.dim)
out = w2(F.silu(w1(h)) * w3(h))                                 # one all-reduce, inside w2
torch.testing.assert_close(out, dense(h))
out.sum().backward()
dense(h).sum().backward()
want = dense.w1.weight.grad[w1.start:w1.end]                    # my rows of the full gradient
torch.testing.assert_close(w1.weight.grad, want)
lines.append(f"MLP: w1 {tuple(w1.weight.shape)} rows {w1.start}:{w1.end}, w2 "
             f"{tuple(w2.weight.shape)} columns {w2.start}:{w2.end}; output and gradients "
             "match the dense MLP")

# 3. A whole reward model: the same forward code, its Linear modules swapped for shards.
cfg = preset("debug", n_outputs=1)
ref = Transformer(cfg).init_weights(seed=0)
tp = parallel.parallelize(Transformer(cfg).init_weights(seed=0), grid)
tokens = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
mask = torch.ones(3, 16, dtype=torch.bool)
mask[0, :5] = False                                             # a left-padded row
with torch.no_grad():
    reward, reward_ref = tp.reward(tokens, mask), ref.reward(tokens, mask)
torch.testing.assert_close(reward, reward_ref)
n_local = sum(p.numel() for p in tp.parameters())
lines.append(f"reward model: {n_local:,} of {sum(p.numel() for p in ref.parameters()):,} "
             f"parameters here, rewards {[round(v, 5) for v in reward[:, 0].tolist()]}")

everyone = distributed.gather_objects({r: lines}, grid)
if grid.is_main:
    for rank in sorted(everyone):
        for line in everyone[rank]:
            print(f"[rank {rank}] {line}")
    print("single process rewards:", [round(v, 5) for v in reward_ref[:, 0].tolist()])
distributed.destroy(grid)
