"""Supervised fine-tuning: the language-model loss on the assistant's tokens only.

    python -m minirm.sft                                    # the toy policy, from scratch
    python -m minirm.sft --model DIR --data chats.jsonl     # fine-tune any checkpoint

Without `--data`, the `toy` preset (byte-level tokenizer, chat format "toy") is trained from
scratch on every ToySteer ratings row (generated under OUT/data), the good responses and the bad
alike, so that the policy it makes answers ToySteer prompts with responses of mixed quality that
end with <|eos|>: the starting point that REINFORCE (`minirm.reinforce`) improves with a reward
model. With `--data`, each JSONL row is a conversation, as `messages` (a list of
{"role", "content"} ending with the assistant's) or as `prompt` (a string or a message list) plus
`response`.

The loss (next-token cross-entropy) is averaged over the response tokens of the whole global
batch, the closing end-of-turn token included, so the model learns where to stop; the prompt's
tokens are context only:
    loss = -sum_{b, t >= start_b} log p(x_{b,t} | x_{b,<t}) / (number of response tokens)
Writes OUT/model, OUT/config.json, OUT/metrics.jsonl and OUT/checkpoint (for --resume) through
the shared `Trainer`; runs under torchrun with --tp (the loss is then vocabulary-parallel) and
data parallelism over the remaining ranks.

Measured, the default run (ToySteer seed 0, 2,500 prompts, 312 steps of 32, one CPU thread):
43 s of training, 47 s in all; validation loss 0.96 per response token; on 200 held-out prompts
every response ends, with a true task score of 0.47 greedy and 0.33 sampled at temperature 1
(the tiny model learns the formats and the easy tasks, not copying; responses are a mix of
right, wrong, padded and garbled answers, as its data).

Simplifications: only the final assistant message of a conversation is trained on (earlier
assistant turns are context, as in HelpSteer2's rows); no sequence packing (rows are padded);
conversations longer than --max-length are dropped, never cut.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minirm import data as D
from minirm.checkpoint import load_model, load_tokenizer, save_model_parallel
from minirm.cliargs import describe, opt, parse, positive, save_settings
from minirm.errors import UserError, cli
from minirm.runs import check_out, check_resumed_settings, resume_hint
from minirm.trainer import OptimSettings, Trainer

TOY_PRESETS = ("debug", "toy")
# Sized by us: the toy model learns ToySteer's format and most of its tasks in about a minute
# on 2 CPU cores. Fine-tuning a pretrained checkpoint takes the usual small steps.
TOY_HPARAMS = dict(epochs=2.0, batch_size=32, lr=2e-3)
FINETUNE_HPARAMS = dict(epochs=1.0, batch_size=32, lr=1e-5)
# Settings a --resume may change (how often to validate and save, where and how it runs); the
# others must be those of the run's config.json (epochs, batch size and lr compared resolved).
RESUME_MAY_DIFFER = ("out", "resume", "force", "eval_every", "save_every", "device", "dtype",
                     "attention", "tp", "micro_batch_size", "hparams")


@dataclass
class SFTSettings:
    model: str = opt("toy", "preset name (trained from scratch) or model folder to fine-tune")
    data: str = opt(None, "chat JSONL: `messages`, or `prompt` + `response` "
                    "(default: ToySteer ratings rows)")
    val: str = opt(None, "validation chat JSONL (default: ToySteer's validation rows)")
    out: str = opt(None, "output folder (default: runs/sft-<time>)")
    epochs: float = opt(None, "passes over the data")
    batch_size: int = opt(None, "conversations per optimizer step")
    micro_batch_size: int = opt(None, "conversations per forward pass (gradient accumulation)")
    lr: float = opt(None, "peak learning rate")
    warmup_steps: int = opt(10, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)")
    schedule: str = opt("cosine", "learning-rate schedule after warm-up",
                        choices=("constant", "cosine"))
    clip: float = opt(1.0, "gradient clipping norm")
    max_length: int = opt(None, "max tokens per conversation (default: min(4096, context))")
    hparams: str = opt("auto", "default epochs/batch/lr: toy (from scratch) or finetune; "
                       "auto = toy for the debug/toy presets", choices=("auto", "toy", "finetune"))
    chat_format: str = opt(None, "override the tokenizer's chat format",
                           choices=("llama3", "chatml", "toy"))
    seed: int = opt(0, "seed for initialisation, data order and ToySteer")
    toy_prompts: int = opt(2500, "ToySteer prompts when generating data (two rows each)")
    eval_every: int = opt(100, "validation loss every N steps (and at the end)")
    save_every: int = opt(200, "checkpoint every N steps (and on Ctrl-C)")
    resume: bool = opt(False, "continue from OUT/checkpoint")
    force: bool = opt(False, "replace what --out holds (an earlier finished or interrupted "
                      "run, deleted when this run starts)")
    dtype: str = opt(None, "float32 (CPU default) or bfloat16 (GPU default)",
                     choices=("float32", "bfloat16"))
    device: str = opt(None, "cpu or cuda (default: cuda when available)")
    attention: str = opt(None, "attention backend", choices=("reference", "flash", "sdpa"))
    tp: int = opt(1, "tensor-parallel degree (run under torchrun)")


# ---- the loss ----------------------------------------------------------------------------

def token_logprobs(model, tokens, mask, grid=None, targets=None, embedded=None):
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1: (B, T - 1), float32 at least.

    With `targets`, a (B, T - 1) bool mask of the predictions wanted (a response's tokens),
    the output layer runs at those positions only and the others are 0: the prompt's logits,
    a (T, vocab) matrix per row, are neither computed nor stored.
    Under tensor parallelism the logits stay split over the vocabulary and the log-softmax is
    computed from all-reduced numbers (`parallel.vocab_parallel_logprobs`). `embedded`: the
    tokens' embeddings, when the caller has them (with `targets`).
    """
    if targets is None:
        return logprobs_of(model, model.norm(model.body(tokens, mask))[:, :-1], tokens[:, 1:],
                           grid)
    h = model.norm(model.body(tokens, mask, embedded=embedded))[:, :-1][targets]
    logp = logprobs_of(model, h, tokens[:, 1:][targets], grid)
    return logp.new_zeros(targets.shape).masked_scatter(targets, logp)


def logprobs_of(model, h, wanted, grid=None):
    """log p(wanted) from final-norm hidden states h (..., dim): the output layer and the
    log-softmax, vocabulary-parallel under tensor parallelism."""
    if grid is not None and grid.tp_size > 1:
        from minirm.parallel import local_logits, vocab_parallel_logprobs
        with local_logits(model):
            return vocab_parallel_logprobs(model.logits_from(h), wanted, grid.tp_group)
    logits = model.logits_from(h)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), wanted.reshape(-1),
                            reduction="none").view(wanted.shape)


def response_mask(starts, lengths, T):
    """(B, T - 1) bool over next-token targets: target t + 1 is a response token."""
    target = torch.arange(1, T)[None, :]
    return (target >= torch.tensor(starts)[:, None]) & (target < torch.tensor(lengths)[:, None])


def grouped_logprobs(model, tokens, mask, targets, grid=None):
    """`token_logprobs(..., targets)` of a right-padded batch (B, T), computed over the fewest
    padded positions: the rows in up to three batches of similar length (`data.length_groups`),
    each cut to its own longest row, with one embedding lookup for all
    (`Transformer.embed_together`). Returns (B, T - 1), 0 where not a target."""
    lengths = mask.sum(-1).tolist()
    groups = D.length_groups(lengths)
    cut = [max(lengths[i] for i in g) for g in groups]
    rows = [torch.tensor(g, device=tokens.device) for g in groups]
    parts = [tokens[r, :T] for r, T in zip(rows, cut)]
    out = []
    for r, T, t, x in zip(rows, cut, parts, model.embed_together(*parts)):
        lp = token_logprobs(model, t, mask[r, :T], grid, targets[r, :T - 1], x)
        out.append(F.pad(lp, (0, tokens.shape[1] - T)))
    return D.in_input_order(out, groups)


def shared_prompt_logprobs(model, tokens, mask, targets, grid=None):
    """`grouped_logprobs` of rows that continue the same prompts (REINFORCE's k samples of
    each), with each distinct prompt run through the model once (`model.SharedPrompts`): the
    same numbers, for the prompt's share of the work once instead of k times.

    Rows are right-padded, and row b's targets are one run, its tokens from start_b to its
    last real token; its prompt is what comes before, tokens[b, :start_b]. The distinct
    prompts run left-padded, keeping every layer's keys and values and the last position's
    hidden state, which predicts the first target; the responses then run right-padded after
    their prompt's keys (in batches of similar length, as `grouped_logprobs`), and position t
    of a response predicts target t + 1. Where the rows are not laid out so, where no prompt
    repeats, or where this would not compute `data.MIN_GAIN` fewer positions than
    `grouped_logprobs` (a long prompt that only one row continues pads all the others), this
    is `grouped_logprobs`."""
    B, T = tokens.shape
    if T < 2:
        return grouped_logprobs(model, tokens, mask, targets, grid)
    lengths = mask.sum(-1).tolist()
    starts = (targets.int().argmax(-1) + 1).tolist()  # the first target's token
    right_padded = torch.arange(T) < torch.tensor(lengths)[:, None]
    if not (bool(targets.any(-1).all()) and torch.equal(mask.bool().cpu(), right_padded)
            and torch.equal(targets.cpu(), response_mask(starts, lengths, T))):
        return grouped_logprobs(model, tokens, mask, targets, grid)
    seqs = tokens.tolist()
    distinct = {}
    rows = [distinct.setdefault(tuple(seq[:s]), len(distinct)) for seq, s in zip(seqs, starts)]
    responses = [seq[s:n] for seq, s, n in zip(seqs, starts, lengths)]
    response_lengths = [len(r) for r in responses]
    groups = D.length_groups(response_lengths)
    whole = D.padded_positions(lengths, D.length_groups(lengths))
    shared = (len(distinct) * max(map(len, distinct))
              + D.padded_positions(response_lengths, groups))
    if len(distinct) == B or shared > (1 - D.MIN_GAIN) * whole:
        return grouped_logprobs(model, tokens, mask, targets, grid)
    from minirm.generate import left_pad
    device = tokens.device
    prompt_tokens, prompt_mask = left_pad([list(p) for p in distinct], 0, device)
    parts = [tuple(x.to(device) for x in D.collate([responses[i] for i in g], 0))
             for g in groups]
    embedded = model.embed_together(prompt_tokens, *(t for t, _ in parts))
    cache, last = model.run_prompts(prompt_tokens, prompt_mask, embedded[0])
    rows = torch.tensor(rows, device=device)
    out = []
    for g, (t, m), x in zip(groups, parts, embedded[1:]):
        r = rows[g]
        h = model.body(t, m, cache=cache.continued(r), embedded=x)
        h = model.norm(torch.cat((last[r][:, None], h[:, :-1]), 1)[m])
        logp = logprobs_of(model, h, t[m], grid)
        out.append(logp.new_zeros(len(g), targets.shape[1]).masked_scatter(targets[g], logp))
    return D.in_input_order(out, groups)


def sft_loss(model, batch, pad_id, grid=None):
    """(mean negative log-likelihood over the response tokens, their count) of `batch`, a list
    of `data.Encoded` conversations. Prompt tokens (before `start`) are not predicted."""
    tokens, mask = D.collate([e.ids for e in batch], pad_id)
    device = next(model.parameters()).device
    keep = response_mask([e.start for e in batch], [len(e.ids) for e in batch],
                         tokens.shape[1]).to(device)
    logp = grouped_logprobs(model, tokens.to(device), mask.to(device), keep, grid)
    n = keep.sum()
    return -(logp * keep).sum() / n.clamp(min=1), int(n)


def tiny_model_threads(spec, device=None):
    """One intra-op thread for a command that runs a toy model on the CPU (unless
    OMP_NUM_THREADS says otherwise). A model this small gains nothing from a second thread, and
    on cores shared with other jobs the threads wait on each other: the default
    `python -m minirm.sft` took 50 s on one thread and 11 minutes on two busy cores."""
    import os
    from minirm.config import PRESETS, from_hf
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "OMP_NUM_THREADS" in os.environ or not str(device).startswith("cpu"):
        return
    if str(spec) in PRESETS or (Path(spec) / "config.json").is_file():
        cfg = PRESETS[str(spec)] if str(spec) in PRESETS else from_hf(spec)
        if cfg.n_params() < 10_000_000:
            torch.set_num_threads(1)


# ---- data --------------------------------------------------------------------------------

def load_chats(path) -> list[tuple[list[dict], str]]:
    """(prompt messages, response) per row of a chat JSONL; a bad row is a one-line UserError."""
    chats = []
    for row in D._rows(path):
        if row.data.get("messages") is not None:
            messages = row.messages("messages")
            if messages[-1]["role"] != "assistant":
                raise row.error("messages", "must end with the assistant's message to learn")
            prompt, response = messages[:-1], row.text("messages[-1].content",
                                                       value=messages[-1]["content"])
        elif row.data.get("prompt") is not None:
            prompt = (row.messages("prompt") if not isinstance(row.get("prompt"), str)
                      else D._helpsteer_prompt(row))  # a HelpSteer2 string may hold turns
            response = row.text("response")
        else:
            raise row.error("messages", "is missing", "give `messages`, or `prompt` and "
                            "`response`")
        row.check_conversation("messages" if "messages" in row.data else "prompt",
                               prompt, response)
        chats.append((prompt, response))
    if not chats:
        raise UserError(f"{path} holds no conversations")
    return chats


def encode_chats(chats, tokenizer, max_length, report=print, what="conversations"):
    """Tokenize through the chat format (`data.encode_rated`: one BOS, the response start)."""
    rows = [D.Rated(prompt, response, []) for prompt, response in chats]
    enc, _ = D.encode_rated(rows, tokenizer, max_length, report=lambda line: report(
        line.replace(" rows ", f" {what} ")), truncatable=False)  # sft has no --truncate
    return enc


def toysteer_chats(folder: Path, split: str):
    name = "train.jsonl.gz" if split == "train" else "validation.jsonl.gz"
    return [(r.prompt, r.response) for r in D.load_ratings(folder / name)]


# ---- the command -------------------------------------------------------------------------

def hparams(s: SFTSettings):
    toy = s.hparams == "toy" or (s.hparams == "auto" and s.model in TOY_PRESETS)
    base = TOY_HPARAMS if toy else FINETUNE_HPARAMS
    return {k: getattr(s, k) if getattr(s, k) is not None else v for k, v in base.items()}


def run_sft(s: SFTSettings, out: Path, grid=None, report=print):
    """Train; returns (model, tokenizer). `grid` is None for one process."""
    from minirm.distributed import device_for, dp_split
    from minirm.train import make_plan

    hp = hparams(s)
    if s.resume:  # before anything is loaded or written
        check_resumed_settings(out, asdict(s), ignore=RESUME_MAY_DIFFER, resolved=hp)
    positive("batch_size", hp["batch_size"])
    positive("micro_batch_size", s.micro_batch_size)
    positive("lr", hp["lr"], allow_zero=True)
    positive("epochs", hp["epochs"])
    device = s.device or device_for(grid)
    dtype = s.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    is_main = grid is None or grid.is_main
    if s.data is None:
        from minirm import toysteer
        folder = out / "data"
        if not (folder / "train.jsonl.gz").exists():
            if is_main:
                toysteer.generate(folder, seed=s.seed, n_prompts=s.toy_prompts)
            if grid is not None:
                from minirm.distributed import barrier
                barrier()
            report(f"generated ToySteer (seed {s.seed}) in {folder}")
        train, val = toysteer_chats(folder, "train"), toysteer_chats(folder, "val")
    else:
        train = load_chats(s.data)
        val = load_chats(s.val) if s.val else None
    tok = load_tokenizer(s.model, chat_format=s.chat_format)
    tp_grid = grid if grid is not None and grid.tp_size > 1 else None
    model, cfg = load_model(s.model, dtype=dtype, device=device, attention=s.attention,
                            seed=s.seed, grid=tp_grid)
    if cfg.n_outputs:
        raise UserError(f"{s.model}: a reward model has no language-model head to fine-tune; "
                        "pass a language model")
    max_len = s.max_length or min(4096, cfg.max_seq_len)
    items = encode_chats(train, tok, max_len, report)
    val_items = encode_chats(val, tok, max_len, lambda *_: None)[:256] if val else None
    n_resp = [len(e.ids) - e.start for e in items]  # response tokens of each conversation
    plan = make_plan([len(e.ids) for e in items], hp["batch_size"], hp["epochs"], s.seed)
    micro = s.micro_batch_size or hp["batch_size"]
    settings = OptimSettings(lr=hp["lr"], weight_decay=s.weight_decay, betas=(0.9, 0.98),
                             warmup_steps=s.warmup_steps, schedule=s.schedule, clip=s.clip)
    if is_main:
        save_settings(s, out, extra={"resolved": {**hp, "max_length": max_len, "dtype": dtype,
                                                  "steps": len(plan), "micro_batch_size": micro}})
    trainer = Trainer(model, settings, out, len(plan), tokenizer=tok, grid=grid, desc="sft",
                      resume_hint=resume_hint(out))
    if s.resume and trainer.checkpoint_dir.exists():
        trainer.load_checkpoint()
        report(f"[sft] resumed at step {trainer.step} of {len(plan)}")
    elif (out / "metrics.jsonl").exists() and is_main:
        (out / "metrics.jsonl").unlink()

    def micro_batches(indices):
        # Items are response tokens: the trainer weights each micro-batch's mean by its share
        # of the global batch's tokens, so the update is the token mean of the whole batch.
        mine = dp_split(indices, grid)
        chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
        return [[items[j] for j in c] for c in chunks], sum(n_resp[j] for j in indices)

    def loss_fn(batch):
        loss, n = sft_loss(model, batch, tok.pad_id, tp_grid)
        return loss, n, {}

    @torch.no_grad()
    def evaluate():
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(val_items), micro):
            loss, n = sft_loss(model, val_items[i:i + micro], tok.pad_id, tp_grid)
            total, count = total + loss.item() * n, count + n
        return {"val_loss": total / max(count, 1)}

    t0 = time.perf_counter()
    done = trainer.fit(plan, micro_batches, loss_fn, evaluate if val_items else None,
                       s.eval_every, s.save_every, show=("val_loss",))
    if not done:
        raise SystemExit(130)
    save_model_parallel(model, out / "model", grid, tokenizer=tok)
    if is_main:
        report(f"[sft] {len(plan)} steps in {time.perf_counter() - t0:.0f} s, model in "
               f"{out / 'model'}")
    return model, tok


@torch.no_grad()
def sample_report(model, tok, prompts, temperature=0.0, max_new_tokens=64, seed=0,
                  batch_size=64):
    """(mean ToySteer true score, fraction ended, [(prompt, response, score)]) of responses
    to user messages `prompts`, greedy (temperature 0) or sampled."""
    from minirm import toysteer
    from minirm.generate import generate, release
    from minirm.tokenizer import chat_prompt

    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    stop = set(model.cfg.eos_ids) | tok.stop_ids
    rows, ended = [], 0
    try:
        for i in range(0, len(prompts), batch_size):
            part = prompts[i:i + batch_size]
            ids = [tok.encode_chat(chat_prompt(p), add_generation_prompt=True).ids for p in part]
            g = generate(model, ids, max_new_tokens, temperature, stop_ids=stop,
                         pad_id=tok.pad_id, generator=gen)
            ended += int(g.ended.sum())
            for p, r in zip(part, g.token_lists(stop_ids=stop)):
                text = tok.decode(r)
                rows.append((p, text, toysteer.true_score(p, text)))
    finally:
        release(model)  # training goes on: nothing of decoding's held through it
    return sum(r[2] for r in rows) / len(rows), ended / len(rows), rows


@cli
def main(argv=None):
    from minirm import distributed

    s = parse(SFTSettings, argv, "python -m minirm.sft", __doc__.split("\n\n")[0])
    if s.device is not None:
        from minirm.score import resolve_device

        resolve_device(s.device)  # a misspelt device, or a GPU where none is visible
    tiny_model_threads(s.model, s.device)
    grid = distributed.init(tp=s.tp)
    try:
        if s.out is None and grid.world > 1:
            raise UserError("pass --out under torchrun, so every rank writes the same run")
        out = Path(s.out or f"runs/sft-{time.strftime('%Y%m%d-%H%M%S')}")
        check_out(s.out, out, s.resume, s.force,
                  inputs=(s.data, s.val, s.model))
        distributed.barrier()  # --force: rank 0 has cleared --out before any rank goes on
        report = distributed.print0
        report(f"settings:\n{describe(s)}")
        model, tok = run_sft(s, out, grid if grid.world > 1 else None, report)
        if s.data is None and grid.world == 1:  # ToySteer: how good is the policy?
            from minirm import toysteer
            prompts = toysteer.sample_prompts(200, seed=10_000 + s.seed)  # not training prompts
            for name, temp in (("greedy", 0.0), ("sampled (T=1)", 1.0)):
                score, ended, rows = sample_report(model, tok, prompts, temp, seed=s.seed)
                report(f"[sft] {name}: true task score {score:.3f}, ended {ended:.0%} "
                       f"(200 held-out prompts)")
                for p, r, sc in rows[:4]:
                    report(f"    {p!r:28} -> {r!r:44} {sc:.2f}")
    finally:
        distributed.destroy(grid)


if __name__ == "__main__":
    main()
