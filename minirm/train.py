"""Train a reward model: one objective, or the paper's recipes.

    python -m minirm.train                      # the whole pipeline in miniature on ToySteer
    python -m minirm.train --objective scaled-bt --model DIR --data preference.jsonl.gz
    python -m minirm.train --recipe helpsteer2-preference --model DIR --data HELPSTEER2_DIR
    python -m minirm.train --recipe paper-table --seeds 0,1,2

Objectives (METHOD.md section 3): `regression` (5 attributes, SteerLM), `helpfulness`
(helpfulness-only regression), `bt`, `margin-bt`, `scaled-bt`. With `--init-from` a stage starts
from a trained reward model, head included; with a 5-output head the BT reward is the
helpfulness output (METHOD.md section 4). A stage writes OUT/model (Hugging Face layout),
OUT/config.json (resolved settings), OUT/metrics.jsonl and OUT/checkpoint (for --resume).
An --out that holds a run, finished or interrupted, is refused unless --resume continues it
(with the settings of its config.json) or --force replaces it.

`--data` is a folder in the HelpSteer2 layout (train.jsonl.gz, validation.jsonl.gz,
preference/preference.jsonl.gz) or a single file: ratings for the regression objectives, any
preference format of `minirm.data` for the BT objectives. Without `--data`, ToySteer is
generated under OUT/data.

Hyperparameters default to the paper's (METHOD.md section 4), or, for the debug and toy presets
(`--hparams auto`), to settings sized for a toy model trained from scratch on a CPU; every flag
overrides them.
"""

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from minirm import data as D
from minirm import losses
from minirm.checkpoint import load_model, load_tokenizer, model_folder, save_model_parallel
from minirm.cliargs import describe, opt, parse, positive, save_settings
from minirm.config import PRESETS, from_hf
from minirm.errors import UserError, cli
from minirm.scoring import score_pairs
from minirm.runs import check_out, check_resumed_settings, resume_hint
from minirm.trainer import OptimSettings, Trainer

RECIPES = ("helpsteer2-preference", "paper-table")
N_OUTPUTS = {"regression": 5, "helpfulness": 1, "bt": 1, "margin-bt": 1, "scaled-bt": 1}

# METHOD.md section 4: stage 1 (regression) 2 epochs, batch 128, lr 2e-6; stage 2 (BT) 1 epoch,
# batch 64 pairs, lr 1e-6.
PAPER_HPARAMS = {"rating": dict(epochs=2.0, batch_size=128, lr=2e-6, schedule="constant"),
                 "pair": dict(epochs=1.0, batch_size=64, lr=1e-6, schedule="constant")}
# A toy model trained from scratch on ToySteer needs far larger steps than fine-tuning a 70B
# model; sized so that `python -m minirm.train` finishes in about 2.5 minutes on 2 CPU cores.
# ToySteer rows cost nothing to make, so the default run sees each once (12,000 prompts, one
# epoch per stage): on 2,500 prompts, 2-3 epochs overfit and the final accuracy stayed at
# 0.81-0.84 (seeds 0 and 1); fresh rows and a cosine decay reach 0.87-0.88.
TOY_HPARAMS = {"rating": dict(epochs=1.0, batch_size=32, lr=1e-3, schedule="cosine"),
               "pair": dict(epochs=1.0, batch_size=16, lr=1e-3, schedule="cosine")}
TOY_PRESETS = ("debug", "toy")
# Settings that may change between a run and its --resume: how often to validate and save,
# where and how it runs (the numbers are those of the run). The others shape the run and must
# be the ones its config.json holds; epochs, batch size, lr and schedule are compared resolved.
RESUME_MAY_DIFFER = ("out", "resume", "force", "eval_every", "save_every", "device", "dtype",
                     "attention", "activation_checkpointing", "compile", "skip_nonfinite", "tp",
                     "dp", "micro_batch_size", "hparams", "seeds", "rewardbench", "expo_alphas")


@dataclass
class TrainSettings:
    objective: str = opt(None, "one training stage", choices=losses.OBJECTIVES)
    recipe: str = opt(None, "several stages (default when no --objective: "
                      "helpsteer2-preference)", choices=RECIPES)
    model: str = opt("toy", "preset name or model folder to start from")
    data: str = opt(None, "HelpSteer2-layout folder or one data file (default: ToySteer)")
    val: str = opt(None, "validation preference file (default: the data's val split)")
    format: str = opt(None, "preference file format (default: detected)", choices=D.FORMATS)
    init_from: str = opt(None, "reward-model folder to initialise from, head included")
    out: str = opt(None, "output folder (default: runs/<name>-<time>)")
    epochs: float = opt(None, "passes over the training data")
    batch_size: int = opt(None, "global batch: samples (regression) or pairs (BT)")
    micro_batch_size: int = opt(None, "items per forward pass (gradient accumulation)")
    lr: float = opt(None, "peak learning rate")
    warmup_steps: int = opt(10, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)")
    schedule: str = opt(None, "learning-rate schedule after warm-up (default: constant, the "
                        "paper's; cosine for toy models)", choices=("constant", "cosine"))
    clip: float = opt(1.0, "gradient clipping norm")
    max_length: int = opt(None, "max tokens per sequence (default: min(4096, context))")
    truncate: str = opt(None, "cut long prompts from the left instead of dropping them",
                        choices=("prompt-left",))
    hparams: str = opt("auto", "default epochs/batch/lr: the paper's (METHOD.md 4), or sized "
                       "for toy models; auto = toy for the debug/toy presets",
                       choices=("auto", "paper", "toy"))
    rounding: str = opt("half-away", "rounding of the mean preference (METHOD.md 1.2)",
                        choices=("half-away", "half-even"))
    seed: int = opt(0, "seed for initialisation, data order and ToySteer")
    seeds: str = opt("0", "comma-separated seeds for --recipe paper-table")
    toy_prompts: int = opt(12000, "ToySteer training prompts when generating data")
    expo_alphas: str = opt("0,0.5,1,1.52", "ExPO factors to try on validation data (0 keeps "
                           "the BT model as it is)")
    rewardbench: str = opt(None, "paper-table: also score each model on this RewardBench file")
    eval_every: int = opt(50, "validate every N steps (and at the end)")
    save_every: int = opt(100, "checkpoint every N steps (and on Ctrl-C)")
    resume: bool = opt(False, "continue from OUT/checkpoint (completed stages are kept)")
    force: bool = opt(False, "replace what --out holds (an earlier finished or interrupted "
                      "run, deleted when this run starts)")
    dtype: str = opt(None, "float32 (CPU default) or bfloat16 (GPU default)",
                     choices=("float32", "bfloat16"))
    device: str = opt(None, "cpu or cuda (default: cuda when available)")
    attention: str = opt(None, "attention backend", choices=("reference", "flash", "sdpa"))
    activation_checkpointing: bool = opt(False, "recompute blocks in backward to save memory")
    compile: bool = opt(False, "torch.compile the blocks (on a GPU: fuses the work between "
                        "products; the first steps compile)")
    skip_nonfinite: bool = opt(False, "skip batches with a NaN/inf loss instead of stopping")
    tp: int = opt(1, "tensor-parallel degree (run under torchrun)")
    dp: int = opt(None, "data-parallel degree (default: world size / tp)")


@dataclass
class StageResult:
    name: str
    model: object
    tokenizer: object
    val_accuracy: float | None
    out: Path


def pair_kind(objective):
    return "rating" if objective in losses.RATING_LOSSES else "pair"


def hparams(s: TrainSettings, objective):
    toy = s.hparams == "toy" or (s.hparams == "auto" and s.model in TOY_PRESETS)
    table = TOY_HPARAMS if toy else PAPER_HPARAMS
    base = table[pair_kind(objective)]
    return {k: getattr(s, k) if getattr(s, k) is not None else v for k, v in base.items()}


def data_paths(data):
    """(ratings train, ratings val, preference file) found in a HelpSteer2-layout folder."""
    folder = Path(data)

    def find(*names):
        for n in names:
            if (folder / n).exists():
                return folder / n
        return None

    return (find("train.jsonl.gz", "train.jsonl"),
            find("validation.jsonl.gz", "validation.jsonl"),
            find("preference/preference.jsonl.gz", "preference/preference.jsonl"))


def load_stage_data(s: TrainSettings, objective, data, report):
    """Training items (Rated rows or Pairs) and validation Pairs for one objective."""
    path = Path(data)
    if not path.exists():
        raise UserError(f"{data}: no such data file or folder")
    val_pairs = None
    if path.is_dir():
        ratings, _, prefs = data_paths(path)
        if pair_kind(objective) == "rating":
            if ratings is None:
                raise UserError(f"{path}: no train.jsonl(.gz) ratings file for --objective "
                                f"{objective}")
            train = D.load_ratings(ratings)
        else:
            if prefs is None:
                raise UserError(f"{path}: no preference/preference.jsonl(.gz) for --objective "
                                f"{objective}")
            train = D.load_helpsteer2_preference(prefs, split="train", rounding=s.rounding,
                                                 report=report)
        if prefs is not None and s.val is None:
            val_pairs = D.load_helpsteer2_preference(prefs, split="val", rounding=s.rounding,
                                                     report=report)
    elif pair_kind(objective) == "rating":
        train = D.load_ratings(path)
    else:
        # The train split of a HelpSteer2-Preference file; any other file is read whole.
        hs2 = (s.format or D._detect_format(path)) == "helpsteer2-preference"
        train = D.load_pairs(path, format=s.format, split="train" if hs2 else None,
                             report=report)
    if s.val is not None:
        val_pairs = D.load_pairs(s.val, format=s.format, report=report)
    return train, val_pairs


def resolve_model(s: TrainSettings, objective, init_from):
    """(model spec, n_outputs to ask for) for a stage."""
    spec = init_from or s.model
    if str(spec) in PRESETS:
        return spec, N_OUTPUTS[objective]
    head = from_hf(model_folder(spec)).n_outputs
    if head:  # a reward model: keep its head (a 5-output head gives BT its helpfulness output)
        if objective == "regression" and head != 5:
            raise UserError(f"{spec}: 5-attribute regression needs a 5-output head; this "
                            f"checkpoint's head has {head}")
        return spec, None
    return spec, N_OUTPUTS[objective]


def train_stage(s: TrainSettings, objective, out: Path, data, init_from=None, grid=None,
                name=None, report=print, run_out=None) -> StageResult:
    """One stage into `out`; `run_out`: the folder given as --out (a recipe's run folder, of
    which `out` is a stage), named in the Ctrl-C message as the one to --resume."""
    name = name or objective
    if s.resume:  # before anything is loaded or written
        check_resumed_settings(out, asdict(replace(s, objective=objective,
                                                   init_from=init_from)),
                               ignore=RESUME_MAY_DIFFER, resolved=hparams(s, objective))
    from minirm.distributed import device_for
    device = s.device or device_for(grid)
    dtype = s.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    spec, n_outputs = resolve_model(s, objective, init_from)
    if s.resume and (out / "model" / "config.json").exists() and \
            (out / "results.json").exists():
        report(f"[{name}] already complete in {out}; keeping it")
        tok = load_tokenizer(out / "model")
        model, _ = load_model(out / "model", dtype=dtype, device=device, attention=s.attention)
        import json
        acc = json.loads((out / "results.json").read_text()).get("val_accuracy")
        return StageResult(name, model, tok, acc, out)
    hp = hparams(s, objective)
    positive("batch_size", hp["batch_size"])
    positive("lr", hp["lr"], allow_zero=True)
    positive("epochs", hp["epochs"])
    tok = load_tokenizer(spec)
    tp_grid = grid if grid is not None and grid.tp_size > 1 else None
    model, cfg = load_model(spec, dtype=dtype, device=device, n_outputs=n_outputs,
                            attention=s.attention, seed=s.seed, grid=tp_grid)
    model.activation_checkpointing = s.activation_checkpointing
    if s.compile:
        model.compile_blocks()
    if s.max_length is not None and s.max_length > cfg.max_seq_len:
        raise UserError(f"--max-length {s.max_length} exceeds the model's context of "
                        f"{cfg.max_seq_len} tokens; pass at most {cfg.max_seq_len}")
    max_len = s.max_length or min(4096, cfg.max_seq_len)
    train, val_pairs = load_stage_data(s, objective, data, report)
    if pair_kind(objective) == "rating":
        enc, labels = D.encode_rated(train, tok, max_len, s.truncate, report=report)
        items = [(e.ids, lab) for e, lab in zip(enc, labels)]
        lengths = [len(e.ids) for e in enc]
    else:
        items = D.encode_pairs(train, tok, max_len, s.truncate, report=report)
        lengths = [max(len(c.ids), len(r.ids)) for c, r, _ in items]
    if not items:
        raise UserError(f"{data}: no training items left for --objective {objective}")
    val_enc = D.encode_pairs(val_pairs, tok, max_len, "prompt-left", report=lambda *_: None) \
        if val_pairs else None
    bs = hp["batch_size"]
    micro = s.micro_batch_size or bs
    plan = make_plan(lengths, bs, hp["epochs"], s.seed)
    settings = OptimSettings(lr=hp["lr"], weight_decay=s.weight_decay, betas=(0.9, 0.98),
                             warmup_steps=s.warmup_steps, schedule=hp["schedule"], clip=s.clip)
    if grid is None or grid.is_main:
        save_settings(replace(s, objective=objective, init_from=init_from), out,
                      extra={"resolved": {**hp, "max_length": max_len, "steps": len(plan),
                                          "micro_batch_size": micro, "dtype": dtype}})
    trainer = Trainer(model, settings, out, len(plan), tokenizer=tok, grid=grid,
                      skip_nonfinite=s.skip_nonfinite, desc=name,
                      resume_hint=resume_hint(run_out or out))
    if s.resume and trainer.checkpoint_dir.exists():
        trainer.load_checkpoint()
        report(f"[{name}] resumed at step {trainer.step} of {len(plan)}")
    elif (out / "metrics.jsonl").exists() and (grid is None or grid.is_main):
        (out / "metrics.jsonl").unlink()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (
        device.startswith("cuda") and dtype == "bfloat16") else _null()
    loss_fn = make_loss_fn(objective, model, device, tok.pad_id, autocast)

    def micro_batches(indices):
        from minirm.distributed import dp_split
        mine = dp_split(indices, grid)
        chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
        return [[items[j] for j in c] for c in chunks], len(indices)

    def evaluate():
        if not val_enc:
            return {}
        c, r = score_pairs(model, val_enc, tok.pad_id, batch_size=max(micro, 8))
        return {"val_accuracy": float(losses.pair_accuracy(c - r))}

    t0 = time.perf_counter()
    done = trainer.fit(plan, micro_batches, loss_fn, evaluate if val_enc else None,
                       s.eval_every, s.save_every)
    if not done:
        raise SystemExit(130)
    acc = evaluate().get("val_accuracy")
    save_model_parallel(model, out / "model", grid, tokenizer=tok)
    if grid is None or grid.is_main:
        _write_json(out / "results.json", {"val_accuracy": acc, "steps": len(plan),
                                           "seconds": round(time.perf_counter() - t0, 1)})
        report(f"[{name}] {len(plan)} steps, validation accuracy "
               f"{'n/a' if acc is None else f'{acc:.4f}'}, model in {out / 'model'}")
    return StageResult(name, model, tok, acc, out)


def make_plan(lengths, batch_size, epochs, seed):
    """Every optimizer step's global batch (item indices), fixed by the seed."""
    plan = []
    for epoch in range(math.ceil(epochs)):
        plan += D.batches(lengths, batch_size, seed=seed, epoch=epoch)
    n_steps = max(1, round(len(lengths) * epochs / batch_size))
    return plan[:n_steps]


def batch_rewards(model, seqs, pad_id, device, autocast=None, pairs=0):
    """Reward-head outputs (N, n_outputs) of token-id lists `seqs`, in their order, with
    gradients, over the fewest padded positions: the rows in up to three batches of similar
    length (`data.length_groups`), or, with `pairs` = P (seqs are P chosen then P rejected
    sequences), each pair's shared prompt computed once (`data.collate_pairs`) when that pads
    fewer positions still, by `data.MIN_GAIN` at least. Either way a row's reward is the one it
    gets alone."""
    autocast = autocast or _null()
    groups = D.length_groups([len(s) for s in seqs])
    positions = D.padded_positions([len(s) for s in seqs], groups)
    if pairs:
        tokens, mask, prompts = D.collate_pairs(list(zip(seqs[:pairs], seqs[pairs:])), pad_id)
        if prompts[0].numel() + tokens.numel() <= (1 - D.MIN_GAIN) * positions:
            with autocast:
                return model.reward(tokens.to(device), mask.to(device),
                                    tuple(t.to(device) for t in prompts))
    batches = [tuple(t.to(device) for t in D.collate([seqs[i] for i in g], pad_id))
               for g in groups]
    with autocast:
        embedded = model.embed_together(*(tokens for tokens, _ in batches))
        parts = [model.reward(tokens, mask, embedded=x) for (tokens, mask), x in
                 zip(batches, embedded)]
    return D.in_input_order(parts, groups)


def make_loss_fn(objective, model, device, pad_id, autocast):
    """loss_fn(micro-batch) -> (mean loss, items, metrics) for the trainer."""
    if pair_kind(objective) == "rating":
        def loss_fn(batch):
            labels = torch.tensor([lab for _, lab in batch], dtype=torch.float32, device=device)
            out = batch_rewards(model, [ids for ids, _ in batch], pad_id, device, autocast)
            if objective == "helpfulness":
                loss = losses.helpfulness(out[:, 0], labels[:, 0])
            else:
                loss = losses.regression(out, labels)
            return loss, len(batch), {}
        return loss_fn

    pair_loss = losses.PAIR_LOSSES[objective]

    def loss_fn(batch):
        # Chosen rows, then rejected; the reward is output 0 (helpfulness for a 5-output head
        # initialised from regression).
        seqs = [c.ids for c, _, _ in batch] + [r.ids for _, r, _ in batch]
        strength = torch.tensor([m for _, _, m in batch], dtype=torch.float32, device=device)
        out = batch_rewards(model, seqs, pad_id, device, autocast, pairs=len(batch))
        r = out[:, 0]
        delta = r[:len(batch)] - r[len(batch):]
        loss = pair_loss(delta, strength)
        return loss, len(batch), {"accuracy": losses.pair_accuracy(delta.detach()),
                                  "margin": delta.detach().mean()}
    return loss_fn


def _write_json(path: Path, obj):
    import json
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def default_out(s: TrainSettings) -> Path:
    name = s.recipe or s.objective or "helpsteer2-preference"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check(s: TrainSettings):
    """Flag values no stage could use: refused before any model or data is loaded."""
    from minirm.score import resolve_device

    for name in ("epochs", "batch_size", "micro_batch_size", "clip", "toy_prompts"):
        positive(name, getattr(s, name))
    for name in ("lr", "warmup_steps", "weight_decay", "eval_every", "save_every"):
        positive(name, getattr(s, name), allow_zero=True)
    if s.device is not None:
        resolve_device(s.device)  # a GPU asked for where none is visible


@cli
def main(argv=None):
    from minirm import distributed
    from minirm.recipes import run_recipe

    s = parse(TrainSettings, argv, "python -m minirm.train", __doc__.split("\n\n")[0])
    check(s)
    if s.objective and s.recipe:
        raise UserError("give either --objective (one stage) or --recipe, not both")
    if s.objective is None and s.recipe is None:
        s.recipe = "helpsteer2-preference"
    grid = distributed.init(tp=s.tp, dp=s.dp)
    try:
        out = Path(s.out) if s.out else default_out(s)
        if s.out is None and grid.world > 1:
            raise UserError("pass --out under torchrun, so every rank writes the same run")
        check_out(s.out, out, s.resume, s.force, depth=2 if s.recipe else 0,
                  inputs=(s.data, s.val, s.init_from, s.model, s.rewardbench),
                  resume_finished=True)
        distributed.barrier()  # --force: rank 0 has cleared --out before any rank goes on
        report = distributed.print0 if grid.world > 1 else print
        report(f"settings:\n{describe(s)}")
        if s.recipe:
            run_recipe(s, out, grid if grid.world > 1 else None, report)
        else:
            if s.data is None:
                raise UserError("--objective needs --data (or run without --objective for the "
                                "ToySteer pipeline)")
            train_stage(s, s.objective, out, s.data, s.init_from,
                        grid if grid.world > 1 else None, report=report)
    finally:
        distributed.destroy(grid)


if __name__ == "__main__":
    main()
