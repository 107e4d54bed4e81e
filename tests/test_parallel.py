"""Tensor and data parallelism against one process, on CPU with gloo (picotron's tests).

Each multi-process test spawns its ranks with torch.multiprocessing; the checks run inside the
ranks (an assertion there fails the test with the rank's traceback) against a single-process
reference computed from the same seed. Shapes are tiny: the debug preset.
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from minirm import distributed, parallel, sft
from minirm.checkpoint import load_model, save_model, save_model_parallel
from minirm.config import preset
from minirm.distributed import Grid
from minirm.errors import UserError
from minirm.generate import generate
from minirm.model import KVCache, Transformer

TOL = dict(atol=1e-5, rtol=1e-5)


def spawn(fn, world, *args):
    """Run fn(*args) on `world` gloo ranks (RANK/WORLD_SIZE set as torchrun would)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(world, port, fn, args), nprocs=world, join=True)


def _entry(rank, world, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        distributed.destroy()


def shard_of(full, module):
    """The slice of a full tensor that a parallel module holds."""
    return full.narrow(module.shard_dim, module.start, module.end - module.start)


# --------------------------------------------------------------------------------- layers

def _layers():
    grid = distributed.init(tp=2, device="cpu")
    torch.manual_seed(0)  # the same full layers and inputs on every rank
    x = torch.randn(3, 5, 16)

    def check(dense, par, x_dense, x_par, gather=True):
        dense.weight.grad = None
        x_dense, x_par = x_dense.clone().requires_grad_(), x_par.clone().requires_grad_()
        y, y_par = dense(x_dense), par(x_par)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        y.backward(g)
        if not gather:  # the output stays split: my slice of it, and of its gradient
            y, g = y[..., par.start:par.end], g[..., par.start:par.end]
        torch.testing.assert_close(y_par, y, **TOL)
        y_par.backward(g)
        torch.testing.assert_close(par.weight.grad, shard_of(dense.weight.grad, par), **TOL)
        if x_dense.is_floating_point():
            gx = x_dense.grad
            if x_par.shape != x_dense.shape:  # a parallel input: my slice of the gradient
                gx = gx[..., par.start:par.end]
            torch.testing.assert_close(x_par.grad, gx, **TOL)

    for out in (12, 7):  # 7 splits unevenly (4 + 3), as a 259-token vocabulary does
        lin = nn.Linear(16, out, bias=False)
        for gather in (True, False):
            col = parallel.ColumnParallelLinear.from_dense(lin, grid, gather_output=gather)
            check(lin, col, x, x, gather)
    lin = nn.Linear(16, 6, bias=False)
    row = parallel.RowParallelLinear.from_dense(lin, grid, input_is_parallel=False)
    check(lin, row, x, x)
    row = parallel.RowParallelLinear.from_dense(lin, grid)  # input already split
    check(lin, row, x, x[..., row.start:row.end])
    emb = nn.Embedding(259, 8)
    ids = torch.randint(0, 259, (3, 11))
    par = parallel.VocabParallelEmbedding.from_dense(emb, grid)
    assert par.weight.shape == ((130 if grid.tp_rank == 0 else 129), 8)
    y, y_par = emb(ids), par(ids)
    torch.testing.assert_close(y_par, y, **TOL)
    g = torch.randn_like(y)
    y.backward(g)
    y_par.backward(g)
    torch.testing.assert_close(par.weight.grad, shard_of(emb.weight.grad, par), **TOL)

    # Vocabulary-parallel log-probabilities equal log_softmax over the full logits.
    logits = torch.randn(2, 5, 259, requires_grad=True)
    targets = torch.randint(0, 259, (2, 5))
    ref = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    start, end = parallel.shard_range(259, 2, grid.tp_rank)
    local = logits.detach()[..., start:end].clone().requires_grad_()
    ours = parallel.vocab_parallel_logprobs(local, targets, grid.tp_group)
    torch.testing.assert_close(ours, ref, **TOL)
    g = torch.randn_like(ref)
    ref.backward(g)
    ours.backward(g)
    torch.testing.assert_close(local.grad, logits.grad[..., start:end], **TOL)
    torch.testing.assert_close(parallel.vocab_parallel_log_softmax(local, grid.tp_group),
                               torch.log_softmax(logits, -1)[..., start:end], **TOL)
    targets[0, :2] = -100
    torch.testing.assert_close(
        parallel.vocab_parallel_cross_entropy(local, targets, grid.tp_group),
        F.cross_entropy(logits.reshape(-1, 259), targets.reshape(-1)), **TOL)


def test_parallel_layers_and_vocab_logprobs_match_dense():
    spawn(_layers, 2)


# ---------------------------------------------------------------------------- whole model

VARIANTS = {"untied": {}, "tied": {"tie_embeddings": True},
            "reward": {"n_outputs": 2}, "tied-reward": {"tie_embeddings": True, "n_outputs": 1}}


def _lm_loss(model, tokens, mask, group):
    with parallel.local_logits(model):
        logits = model(tokens, mask)[:, :-1]
    targets = tokens[:, 1:].masked_fill(~mask[:, 1:], -100)
    return parallel.vocab_parallel_cross_entropy(logits, targets, group)


def _model():
    grid = distributed.init(tp=2, device="cpu")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, :4] = False  # a left-padded row
    for name, overrides in VARIANTS.items():
        cfg = preset("debug", **overrides)
        ref = Transformer(cfg).init_weights(seed=0)
        tp = parallel.parallelize(Transformer(cfg).init_weights(seed=0), grid)
        # Backward recomputes the collectives (and, with a reward head, the shared prompts).
        tp.activation_checkpointing = name in ("tied", "tied-reward")
        if cfg.n_outputs == 0 or cfg.tie_embeddings:
            torch.testing.assert_close(tp(tokens, mask), ref(tokens, mask), **TOL)
            loss_ref = F.cross_entropy(ref(tokens, mask)[:, :-1].reshape(-1, 259),
                                       tokens[:, 1:].masked_fill(~mask[:, 1:], -100).reshape(-1))
            loss = _lm_loss(tp, tokens, mask, grid.tp_group)
            # Log-probs of chosen targets only (the output layer on those positions alone).
            targets = mask[:, 1:] & (torch.arange(11) >= 6)
            lp_ref = sft.token_logprobs(ref, tokens, mask, targets=targets)
            lp = sft.token_logprobs(tp, tokens, mask, grid, targets)
            torch.testing.assert_close(lp, lp_ref, **TOL)
            loss_ref, loss = loss_ref - 0.1 * lp_ref.sum(), loss - 0.1 * lp.sum()
            # REINFORCE's samples of a prompt: rows 0 and 2 continue the same 8 tokens, which
            # each shard runs once, keeping its own heads' keys and values; rows of 12, 11 and
            # 10 tokens, right-padded.
            same = torch.stack((tokens[1], tokens[2], torch.cat((tokens[1, :8], tokens[2, 8:]))))
            lengths = [12, 11, 10]
            same_mask = torch.arange(12) < torch.tensor(lengths)[:, None]
            targets = sft.response_mask([8, 8, 8], lengths, 12)
            lp_ref = sft.token_logprobs(ref, same, same_mask, targets=targets)
            caches, body = [], tp.body

            def spy(*args, cache=None, **kwargs):
                caches.append(type(cache).__name__)
                return body(*args, cache=cache, **kwargs)

            tp.body = spy
            lp = sft.shared_prompt_logprobs(tp, same, same_mask, targets, grid)
            del tp.body
            assert caches[0] == "SharedPrompts" and "_Continued" in caches  # not a fallback
            torch.testing.assert_close(lp, lp_ref, **TOL)
            loss_ref, loss = loss_ref - 0.1 * lp_ref.sum(), loss - 0.1 * lp.sum()
        else:  # a reward model without a language-model head
            loss_ref = loss = torch.zeros(())
        if cfg.n_outputs:
            r_ref, r = ref.reward(tokens, mask), tp.reward(tokens, mask)
            torch.testing.assert_close(r, r_ref, **TOL)
            loss_ref, loss = loss_ref + r_ref.square().mean(), loss + r.square().mean()
            # The same rows as continuations of their first 5 tokens (each shard records its
            # own heads' prompt keys and values).
            shared = tp.reward(tokens[:, 5:], mask[:, 5:],
                               (tokens[:, :5], mask[:, :5], torch.arange(3)))
            torch.testing.assert_close(shared, r_ref, **TOL)
            loss_ref, loss = loss_ref + r_ref.mean(), loss + shared.mean()
        torch.testing.assert_close(loss, loss_ref, **TOL)
        loss_ref.backward()
        loss.backward()
        specs, grads = parallel.shard_specs(tp), dict(tp.named_parameters())
        for pname, p in ref.named_parameters():
            dim, start, end = specs.get(pname, (0, 0, p.shape[0]))
            want = p.grad.narrow(dim, start, end - start)
            torch.testing.assert_close(grads[pname].grad, want, **TOL, msg=f"{name} {pname}")
        if name == "reward":
            continue
        # Generation: the KV cache holds this rank's heads; greedy tokens equal one process's,
        # and sampling with the same seed draws the same tokens on every rank.
        cache = KVCache(cfg.n_layers, 1, 8)
        tp(tokens[:1, :4], None, cache)
        assert cache.k.shape[2] == cfg.n_kv_heads // 2
        prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
        want, got = generate(ref, prompts, 10), generate(tp, prompts, 10)
        assert torch.equal(got.tokens, want.tokens)
        torch.testing.assert_close(got.logprobs, want.logprobs, **TOL)
        # Rows that end leave the batch (a quarter of the ids stop a row): every rank alike.
        sampled = generate(tp, prompts, 10, temperature=1.0, stop_ids=set(range(0, 259, 4)),
                           generator=torch.Generator().manual_seed(5))
        everyone = [torch.empty_like(sampled.tokens) for _ in range(2)]
        torch.distributed.all_gather(everyone, sampled.tokens, group=grid.tp_group)
        assert torch.equal(everyone[0], everyone[1])


def test_debug_model_tp2_matches_tp1():
    spawn(_model, 2)


# ----------------------------------------------------------------------- loading and saving

def _load(lm_folder, rm_folder, out):
    grid = distributed.init(tp=2, device="cpu")
    for folder, kw in ((lm_folder, {}), (rm_folder, {}), (lm_folder, {"n_outputs": 3})):
        ref, cfg = load_model(folder, **kw)
        model, _ = load_model(folder, grid=grid, **kw)
        specs, params = parallel.shard_specs(model), dict(model.named_parameters())
        for name, p in ref.named_parameters():
            dim, start, end = specs.get(name, (0, 0, p.shape[0]))
            assert torch.equal(params[name], p.narrow(dim, start, end - start)), name
        x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
        if cfg.n_outputs:
            torch.testing.assert_close(model.reward(x), ref.reward(x), **TOL)
        else:
            torch.testing.assert_close(model(x), ref(x), **TOL)
    # Saving under TP writes what a single process writes.
    model, _ = load_model(rm_folder, grid=grid)
    save_model_parallel(model, out, grid, max_shard_bytes=60_000)
    if grid.is_main:
        ref, again = load_model(rm_folder)[0], load_model(out)[0]
        for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), again.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2), n1
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in
                                                               rm_folder.iterdir())


def test_sharded_loading_from_indexed_checkpoint(tmp_path):
    lm, _ = load_model("debug", seed=0)
    lm_folder = save_model(lm, tmp_path / "lm", max_shard_bytes=60_000)
    rm = Transformer(preset("debug", tie_embeddings=True, n_outputs=2)).init_weights(seed=1)
    rm_folder = save_model(rm, tmp_path / "rm", max_shard_bytes=60_000)
    assert (lm_folder / "model.safetensors.index.json").exists()
    assert len(list(rm_folder.glob("model-*.safetensors"))) > 1
    spawn(_load, 2, lm_folder, rm_folder, tmp_path / "saved")


# --------------------------------------------------------------- optimizer steps on (dp, tp)

BATCHES = [range(0, 4), range(4, 10), range(10, 15)]  # 15 items in 3 steps; 5 splits 3 + 2


def train_losses(grid):
    """A few AdamW steps on the same global batches; the global mean loss of each step."""
    cfg = preset("debug", tie_embeddings=True, n_outputs=1)
    model = parallel.parallelize(Transformer(cfg).init_weights(seed=0), grid)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(2)
    tokens, targets = torch.randint(0, 256, (15, 10), generator=g), torch.randn(15, 1,
                                                                                 generator=g)
    losses = []
    for batch in BATCHES:
        idx = torch.tensor(distributed.dp_split(batch, grid))
        x = tokens[idx]
        # Per item: next-token NLL (all items have the same length) + squared reward error.
        loss = _lm_loss(model, x, torch.ones_like(x, dtype=torch.bool), grid.tp_group)
        loss = loss + (model.reward(x) - targets[idx]).square().mean()
        w = distributed.dp_weight(len(idx), len(batch), grid)
        opt.zero_grad()
        (w * loss).backward()
        distributed.all_reduce_grads(model, grid)
        parallel.clip_grad_norm_tp(model, 1.0, grid)
        opt.step()
        losses.append(distributed.dp_average(w * loss, grid).item())
    return losses


def _dp_tp(want):
    grid = distributed.init(tp=2, dp=2, device="cpu")
    assert (grid.dp_rank, grid.tp_rank) == divmod(grid.rank, 2)
    got = train_losses(grid)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-5, rtol=2e-5)


def test_adamw_steps_dp2_tp2_match_one_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds spinning
    try:
        want = train_losses(Grid())
    finally:
        torch.set_num_threads(threads)
    spawn(_dp_tp, 4, want)


# ----------------------------------------------------------------------------- bad input

def test_divisibility_errors():
    with torch.device("meta"):
        model = Transformer(preset("llama-3.1-70b"))
    with pytest.raises(UserError, match="n_kv_heads=8 is not divisible by tp=3; use tp in "
                                        "1, 2, 4, 8"):
        parallel.parallelize(model, Grid(tp_size=3))
    with torch.device("meta"):
        model = Transformer(preset("debug", n_heads=8, ffn_dim=129))
    with pytest.raises(UserError, match="ffn_dim=129 is not divisible by tp=2"):
        parallel.parallelize(model, Grid(tp_size=2))
    with pytest.raises(UserError, match="n_kv_heads=2 is not divisible by tp=4; use tp in 1, 2"):
        parallel.check_divisible(preset("debug"), 4)


def test_bad_launch_errors(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UserError, match="world size 4 is not divisible by tp=3"):
        distributed.init(tp=3)
    with pytest.raises(UserError, match="tp=2 x dp=3 needs 6 processes but 4 were launched"):
        distributed.init(tp=2, dp=3)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="nccl needs CUDA GPUs but none are visible"):
            distributed.init(tp=2, dp=2, backend="nccl")
    monkeypatch.setenv("WORLD_SIZE", "1")
    grid = distributed.init(tp=1, device="cpu")  # one process: no process group at all
    assert grid.world == 1 and grid.tp_group is None and not torch.distributed.is_initialized()


def test_bad_launch_under_torchrun_is_one_line_and_no_hang(tmp_path):
    """Both ranks fail before any collective; only rank 0 prints, and torchrun returns."""
    script = tmp_path / "bad.py"
    script.write_text(textwrap.dedent("""
        from minirm import distributed
        from minirm.errors import cli

        @cli
        def main(argv=None):
            distributed.init(tp=3)

        main()
    """))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: world size 2 is not divisible by tp=3; launch a multiple of 3 "
                     "processes (torchrun --nproc-per-node 3)"], proc.stderr
