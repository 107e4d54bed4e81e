"""The training loop shared by every command that trains (train, sft, reinforce).

What it owns, so no command writes its own:
- AdamW with decoupled weight decay on matrices only (not on norms and biases), linear warm-up
  then a constant (or cosine) learning rate, gradient clipping (METHOD.md section 4);
- gradient accumulation: a global batch is a list of micro-batches, each loss weighted by its
  share of the items, so the update equals one big batch (and, with data parallelism, gradients
  are summed over the dp ranks that each hold part of the global batch);
- a non-finite loss or gradient stops the run naming the step and batch (or skips the batch);
- `OUT/metrics.jsonl` (one JSON object a step), a tqdm bar, and checkpoints at `OUT/checkpoint`
  that hold the model (Hugging Face layout) plus optimizer, scheduler, step and RNG states, so a
  resumed run continues with exactly the losses of an uninterrupted one;
- Ctrl-C (SIGINT) saves a checkpoint at the next step boundary and stops cleanly.

A command describes its run as a `plan`: the list of global batches (item indices), fixed by the
seed, so the data position is simply the step number. A step is one optimizer update, unless the
command passes a `step_fn` that makes one plan entry several updates (REINFORCE: one rollout,
then several optimizer steps on it via `update`); `step` then counts plan entries.
"""

import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minirm.checkpoint import load_weights, recover_dir, save_model
from minirm.errors import UserError


class NonFiniteError(UserError):
    """A loss or gradient became NaN or infinite: the run stops with one line naming the step
    and the batch (exit status 2), as the fix is the user's (a lower --lr, or
    --skip-nonfinite)."""


@dataclass
class OptimSettings:
    lr: float = 1e-5
    weight_decay: float = 0.1        # METHOD.md 4 (0.01 for REINFORCE, section 7)
    betas: tuple = (0.9, 0.98)       # METHOD.md 4 and 7
    warmup_steps: int = 10           # METHOD.md 4: 10 linear warm-up steps, then constant
    schedule: str = "constant"       # or "cosine" (decays to 10% over the run)
    clip: float = 1.0                # METHOD.md 4: gradient clipping 1.0


def param_groups(model, weight_decay):
    """Weight decay on matrices (dim >= 2) only: norms and biases are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step, settings: OptimSettings, total_steps: int):
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "cosine":
        span = max(1, total_steps - settings.warmup_steps)
        progress = min(1.0, (step - settings.warmup_steps) / span)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def describe_batch(indices) -> str:
    """The global batch of a plan step, for error messages: its items' indices in the training
    set (as encoded: rows dropped for length are not counted)."""
    shown = ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")
    return f"batch of {len(indices)} training items [{shown}]"


def adamw(model, weight_decay, lr, betas):
    """torch's AdamW in its fused form (one kernel per tensor: ~4x faster than the per-op loop
    on a CPU, the same update to float rounding) wherever torch has it."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas),
                             fused=fused or None)


class Trainer:
    def __init__(self, model, settings: OptimSettings, out, total_steps, tokenizer=None,
                 grid=None, skip_nonfinite=False, desc="train", resume_hint="--resume"):
        self.model, self.settings, self.total_steps = model, settings, total_steps
        self.resume_hint = resume_hint  # how to continue, in the Ctrl-C message
        self.out, self.tokenizer, self.grid = Path(out), tokenizer, grid
        self.skip_nonfinite, self.desc = skip_nonfinite, desc
        self.optimizer = adamw(model, settings.weight_decay, settings.lr, settings.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, settings, total_steps))
        self.step = 0
        self.stop_requested = False
        self.is_main = grid is None or grid.is_main
        if self.is_main:  # a checkpoint save killed half-way is put back before any resume
            recover_dir(self.checkpoint_dir)

    # ---- one optimizer step -------------------------------------------------------------
    def train_step(self, micro_batches, loss_fn, n_total, batch_desc=""):
        """Accumulate gradients over micro-batches, then clip and step; one step of the plan.

        loss_fn(micro) -> (mean loss over its items, n_items, {metric: mean over its items}).
        n_total is the number of items in the global batch (over all dp ranks).
        """
        metrics = self.update(micro_batches, loss_fn, n_total, batch_desc)
        self.step += 1
        return metrics

    def update(self, micro_batches, loss_fn, n_total, batch_desc=""):
        """One optimizer update (as train_step) that does not advance `step`: for a `step_fn`
        that makes several updates per plan entry. The scheduler counts updates."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums, n_seen = {}, 0
        for micro in micro_batches:
            loss, n, metrics = loss_fn(micro)
            (loss * (n / n_total)).backward()
            n_seen += n
            for k, v in {"loss": loss, **metrics}.items():
                v = v.detach().item() if torch.is_tensor(v) else float(v)
                sums[k] = sums.get(k, 0.0) + v * n
        stats = torch.tensor([n_seen, *sums.values()], dtype=torch.float64)
        if self.grid is not None and self.grid.dp_size > 1:
            from minirm.distributed import all_reduce_grads, all_reduce_sum
            all_reduce_grads(self.model, self.grid, op="sum")
            stats = all_reduce_sum(stats, self.grid)
        metrics = {k: v / max(stats[0].item(), 1) for k, v in zip(sums, stats[1:].tolist())}
        grad_norm = self.clip_grad_norm()
        if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
            what = (f"non-finite {'loss' if not math.isfinite(metrics['loss']) else 'gradient'}"
                    f" at step {self.step + 1} ({batch_desc})")
            if not self.skip_nonfinite:
                raise NonFiniteError(what + "; lower the learning rate or pass "
                                     "--skip-nonfinite to skip such batches")
            self.optimizer.zero_grad(set_to_none=True)
            metrics["skipped"] = 1
        else:
            self.optimizer.step()
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        metrics["grad_norm"] = grad_norm
        return metrics

    def clip_grad_norm(self):
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grid is not None and self.grid.tp_size > 1:
            from minirm.parallel import clip_grad_norm_tp
            return float(clip_grad_norm_tp(params, self.settings.clip, self.grid))
        return float(torch.nn.utils.clip_grad_norm_(params, self.settings.clip))

    # ---- logging --------------------------------------------------------------------------
    def log(self, record):
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_dir(self):
        return self.out / "checkpoint"

    def state_dict(self, extra=None):
        """`extra`: the command's own state (a dict), or a function returning it at save time
        (e.g. a sampling generator's state, which changes every step)."""
        extra = extra() if callable(extra) else extra
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                "extra": extra or {}}

    def save_checkpoint(self, extra=None):
        """Model + training state, written to a temporary folder and renamed (atomic)."""
        state = self.state_dict(extra)
        rank = 0 if self.grid is None else self.grid.rank
        trainer_files = {f"trainer_state_rank{rank}.pt": state}
        hf_state = None  # save_model reads the model itself
        if self.grid is not None and self.grid.world > 1:
            # Rank 0 writes everything: the gathered full weights and every rank's optimizer
            # shard, so the checkpoint folder is complete or absent, never partial.
            from minirm.distributed import gather_objects
            from minirm.parallel import gathered_hf_state
            hf_state = gathered_hf_state(self.model, self.grid)
            trainer_files = gather_objects(trainer_files, self.grid)
        if self.is_main:
            save_model(self.model, self.checkpoint_dir, self.tokenizer, state=hf_state,
                       binary_files=trainer_files)
        if self.grid is not None:
            from minirm.distributed import barrier
            barrier()

    def load_checkpoint(self, folder=None):
        """Restore model, optimizer, scheduler, step and RNG; returns the caller's extra state."""
        folder = Path(folder or self.checkpoint_dir)
        rank = 0 if self.grid is None else self.grid.rank
        path = folder / f"trainer_state_rank{rank}.pt"
        if not path.exists():
            raise UserError(f"{folder}: no training state for rank {rank} to resume from; "
                            "start a new run, or resume with the same parallel layout")
        load_weights(self.model, folder, grid=self.grid)
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file: pickle and zip errors of all kinds
            raise UserError(f"{path}: unreadable training state ({type(e).__name__}: "
                            f"{str(e)[:200]}); resume from another copy or start a new "
                            "run without --resume") from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = state["step"]
            set_rng_state(state["rng"])
            extra = state["extra"]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: the training state does not fit this run ({e!r:.200}); "
                            "resume with the settings it was saved with, or start a new run "
                            "without --resume") from None
        self._truncate_metrics()
        return extra

    def _truncate_metrics(self):
        """Drop metrics lines written after the checkpoint, so a resumed log has no repeats."""
        path = self.out / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, plan, make_micro_batches=None, loss_fn=None, evaluate=None, eval_every=0,
            save_every=0, extra_state=None, step_fn=None, show=()):
        """Run the steps of `plan` from `self.step` on.

        plan: list of global batches (lists of item indices); make_micro_batches(indices) ->
        (micro-batches for this rank, n_total); evaluate() -> {name: value} (validation).
        step_fn(indices) -> metrics, instead of make_micro_batches and loss_fn: runs a whole
        plan entry itself, calling `self.update` for each of its optimizer updates.
        extra_state: a dict or a function returning one (see `state_dict`). show: metric names
        for the progress bar, besides loss and accuracies.
        """
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        # Every rank catches Ctrl-C (the terminal sends it to torchrun and all its workers, and
        # torchrun passes it on): each only raises a flag, and `_should_stop` asks whether any
        # rank raised it, so all ranks stop after the same step and save together.
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._request_stop)
        bar = tqdm(total=len(plan), initial=self.step, desc=self.desc, unit="step",
                   disable=not self.is_main, dynamic_ncols=True)
        try:
            while self.step < len(plan) and not self._should_stop():
                t0 = time.perf_counter()
                indices = plan[self.step]
                if step_fn is not None:
                    metrics = step_fn(indices)
                    self.step += 1
                else:
                    micro, n_total = make_micro_batches(indices)
                    metrics = self.train_step(micro, loss_fn, n_total,
                                              batch_desc=describe_batch(indices))
                record = {"step": self.step, **metrics,
                          "step_time": round(time.perf_counter() - t0, 4)}
                last = self.step == len(plan)
                if evaluate and ((eval_every and self.step % eval_every == 0) or last):
                    record.update(evaluate())
                self.log(record)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                                 if k in ("loss", "accuracy", "margin", "val_accuracy",
                                          *show)})
                bar.update(1)
                if save_every and self.step % save_every == 0 and not last:
                    self.save_checkpoint(extra_state)
            if self.stop_requested and self.step < len(plan):
                self.save_checkpoint(extra_state)
                if self.is_main:
                    tqdm.write(f"stopped at step {self.step}; checkpoint saved to "
                               f"{self.checkpoint_dir} (continue with {self.resume_hint})")
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous)
        return self.step >= len(plan)

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def _should_stop(self):
        if self.grid is None or self.grid.world == 1:
            return self.stop_requested
        from minirm.distributed import any_rank
        return any_rank(self.stop_requested, self.grid)
