"""REINFORCE with a frozen reward model: how the paper trained its policy (METHOD.md section 7).

    python -m minirm.reinforce               # the toy pipeline on ToySteer, CPU, a few minutes
    python -m minirm.reinforce --policy DIR --reward-model DIR --prompts prompts.jsonl
    torchrun --nproc-per-node 8 -m minirm.reinforce --tp 8 --policy ... --out runs/rl

One step of the run (one rollout batch), each line the formula of METHOD.md 7:
  1. rollouts: P prompts x k samples at temperature 1, no top-k/top-p, with the KV cache (7.1);
  2. r_i = RM(prompt + response_i), read at the last token of the response (7.2);
  3. R_i = r_i - beta * mean_t |log pi(y_t) - log pi_ref(y_t)|   (--kl-estimator abs; 7.3);
  4. b_i = mean of R_j over the other samples j != i of the prompt that ended (7.4);
  5. A_i = R_i - b_i, the same for every token of response i (7.5);
  6. loss = -(1/n) sum_i mean_t log pi(y_t) A_i over the n samples of an optimizer batch (7.6);
  7. the P k samples are cut into --optimizer-steps batches, one AdamW update each (7.7).
The policy and the frozen reference start from the same checkpoint; the reward model is frozen.

Simplifications relative to PPO (the paper's own, METHOD.md 7.4-7.5):
- no value network: the baseline is the leave-one-out mean of the prompt's other samples (7.4);
- no importance ratio pi / pi_old and no clipping: the later optimizer steps on a rollout batch
  are slightly off-policy and are treated as on-policy (7.5, 7.7);
- no per-token rewards and no GAE: one scalar return per response, one advantage for all its
  tokens (7.5); no advantage normalisation (7.5); no entropy bonus;
- the KL penalty sits in the reward (7.3), a constant for the gradient, not a loss term.
Choices of ours where METHOD.md is silent:
- log pi in the KL is recomputed on the full sequences (the policy as it was at rollout time),
  not taken from the sampler: equal at temperature 1 up to rounding, and exactly 0 on the first
  step, where the policy is the reference;
- a sample that did not end, or has no ended sibling, gets A_i = 0 (no gradient) but still
  counts in the 1/n of step 6; the reward of one that did not end (read at its last generated
  token, or at the end-of-turn its re-encoding adds) only enters the metrics;
- a rollout batch is cut into optimizer batches in order (whole prompt groups), not shuffled;
  prompts are visited in a seeded order, reshuffled after each pass;
- no data parallelism: with torchrun, all ranks form one tensor-parallel group (--tp = world).

Measured, the toy run (weights/toy-sft-policy and weights/toy-reward-model, 25 steps of 32
prompts x 4 samples, lr 5e-5, one CPU thread, 37 s), means of the first and the last 5
steps: reward 1.86 -> 4.44, ToySteer task score of the samples 0.34 -> 0.42, KL 0.06 -> 0.59,
response length 15.8 -> 8.3 tokens (padding dropped), 99-100% ending. On 200 held-out prompts
the sampled task score goes 0.33 -> 0.41, the greedy one 0.47 -> 0.49.
"""

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from minirm import data as D
from minirm.checkpoint import load_model, load_tokenizer, save_model_parallel
from minirm.cliargs import describe, opt, parse, positive, save_settings
from minirm.config import PRESETS, from_hf
from minirm.errors import UserError, cli
from minirm.sft import response_mask, shared_prompt_logprobs, tiny_model_threads
from minirm.runs import check_out, check_resumed_settings, held_run, resume_hint
from minirm.trainer import OptimSettings, Trainer

KL_ESTIMATORS = ("abs", "k1", "k3")
# METHOD.md 7: P = 32 prompts, k = 4, temperature 1, 2048 new tokens, beta 0.01, lr 1e-6,
# 4 optimizer steps per rollout batch (the number of steps is ours). The toy policy is tiny and
# trained from scratch: it needs larger steps, and its answers are short. Measured with the
# shipped toy models, 60 steps: the reward keeps rising (1.9 -> 5.7, 5-step means) while the
# task score stops at 0.42-0.43 after ~30 steps; past that the policy gains reward only where the
# reward model misjudges. An earlier, weaker toy reward model (0.82 validation accuracy against
# 0.88) was hacked outright: past ~30 steps its task score fell and responses stopped ending.
PAPER = dict(prompts_per_step=32, max_new_tokens=2048, lr=1e-6, steps=100)
TOY = dict(prompts_per_step=32, max_new_tokens=64, lr=5e-5, steps=25)
TOY_POLICY, TOY_REWARD_MODEL = Path("weights/toy-sft-policy"), Path("weights/toy-reward-model")
# Settings a --resume may change (how often to save, where and how it runs); the others, as
# resolved, must be those of the run's config.json.
RESUME_MAY_DIFFER = ("out", "resume", "force", "save_every", "device", "dtype", "tp",
                     "micro_batch_size", "hparams")


@dataclass
class ReinforceSettings:
    policy: str = opt(None, f"policy checkpoint (default: {TOY_POLICY}, trained if absent)")
    reward_model: str = opt(None, f"reward model (default: {TOY_REWARD_MODEL}, trained if "
                            "absent)")
    prompts: str = opt(None, "JSONL of prompts: `prompt` (a string or a message list) or "
                       "`messages` (default: ToySteer prompts)")
    out: str = opt(None, "output folder (default: runs/reinforce-<time>)")
    k: int = opt(4, "samples per prompt (METHOD.md 7.1)")
    temperature: float = opt(1.0, "sampling temperature (METHOD.md 7.1: 1.0; another one "
                             "samples from a distribution other than pi)")
    max_new_tokens: int = opt(None, "response length limit (paper 2048, toy 64)")
    beta: float = opt(0.01, "KL coefficient in the reward (METHOD.md 7.3)")
    kl_estimator: str = opt("abs", "abs: mean |log pi - log pi_ref| (the paper's); k1: mean "
                            "log ratio; k3: mean (r - 1 - log r), r = pi_ref / pi",
                            choices=KL_ESTIMATORS)
    prompts_per_step: int = opt(None, "P, prompts per rollout batch (METHOD.md 7.1: 32)")
    optimizer_steps: int = opt(4, "optimizer steps per rollout batch (METHOD.md 7.7)")
    micro_batch_size: int = opt(None, "sequences per forward pass (default: a whole batch)")
    lr: float = opt(None, "learning rate, constant (paper 1e-6, toy 5e-5)")
    weight_decay: float = opt(0.01, "AdamW weight decay (METHOD.md 7)")
    clip: float = opt(1.0, "gradient clipping norm (METHOD.md 7)")
    steps: int = opt(None, "rollout batches (default 100, toy 25)")
    hparams: str = opt("auto", "defaults: paper (METHOD.md 7) or toy; auto = toy for a "
                       "byte-level (toy) policy", choices=("auto", "paper", "toy"))
    reward: str = opt("head", "'head', or 'token0' for a released-style model (METHOD.md 9)",
                      choices=("head", "token0"))
    reward_weights: str = opt(None, "reward = this weighted sum of a 5-attribute head",
                              choices=("helpfulness", "steerlm-a", "steerlm-b"))
    seed: int = opt(0, "seed for sampling and prompt order")
    save_every: int = opt(20, "checkpoint every N steps (and on Ctrl-C)")
    resume: bool = opt(False, "continue from OUT/checkpoint, exactly")
    force: bool = opt(False, "replace what --out holds (an earlier finished or interrupted "
                      "run, deleted when this run starts)")
    dtype: str = opt(None, "float32 (CPU default) or bfloat16 (GPU default)",
                     choices=("float32", "bfloat16"))
    device: str = opt(None, "cpu or cuda (default: cuda when available)")
    tp: int = opt(1, "tensor-parallel degree (run under torchrun; = the number of processes)")


# ---- the formulas ------------------------------------------------------------------------

def kl_per_token(logp, ref_logp, estimator="abs"):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (METHOD.md 7.3)."""
    log_ratio = logp - ref_logp                       # log pi / pi_ref
    if estimator == "abs":                            # the paper's |log pi - log pi_ref|
        return log_ratio.abs()
    if estimator == "k1":                             # unbiased, can be negative
        return log_ratio
    if estimator == "k3":                             # (r - 1) - log r, r = pi_ref / pi: >= 0
        return torch.expm1(-log_ratio) + log_ratio
    raise UserError(f"--kl-estimator {estimator!r}: choose one of {', '.join(KL_ESTIMATORS)}")


def sequence_kl(logp, ref_logp, mask, estimator="abs"):
    """Mean over each response's tokens of the per-token KL (METHOD.md 7.3): (N,)."""
    per_token = kl_per_token(logp, ref_logp, estimator) * mask
    return per_token.sum(-1) / mask.sum(-1).clamp(min=1)


def rloo_advantages(R, ended, k):
    """A_i = R_i - b_i, b_i = mean of R_j over the other ended samples of i's prompt
    (METHOD.md 7.4-7.5). A sample that did not end, or has no other ended sibling, gets 0.

    R, ended: (P k,), the k samples of a prompt adjacent. Returns (advantages, baselines).
    """
    R, e = R.view(-1, k).double(), ended.view(-1, k).double()
    others = e.sum(-1, keepdim=True) - e              # ended siblings j != i
    baseline = ((R * e).sum(-1, keepdim=True) - R * e) / others.clamp(min=1)
    trained = (e > 0) & (others > 0)
    advantages = torch.where(trained, R - baseline, torch.zeros_like(R))
    baseline = torch.where(trained, baseline, torch.full_like(R, float("nan")))
    return advantages.view(-1).float(), baseline.view(-1).float()


def policy_loss(logp, mask, advantages):
    """-(1/n) sum_i mean_t log pi(y_t) A_i (METHOD.md 7.6); logp and mask (n, T), A (n,)."""
    mean_logp = (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return -(mean_logp * advantages).mean()


# ---- rollouts ----------------------------------------------------------------------------

@dataclass
class Rollout:
    """P k samples: sequences (prompt + response, right-padded) and what REINFORCE needs."""
    tokens: torch.Tensor      # (N, T)
    mask: torch.Tensor        # (N, T) real tokens
    response: torch.Tensor    # (N, T - 1) next-token targets that are response tokens
    ended: torch.Tensor       # (N,) emitted a stop id
    reward: torch.Tensor      # (N,) r_i
    kl: torch.Tensor          # (N,) mean per-token KL to the reference
    advantage: torch.Tensor   # (N,) A_i
    texts: list               # (N,) decoded responses


class Reinforce:
    """The policy (trained), the reference (frozen), the reward model (frozen) and one step."""

    def __init__(self, policy, reference, tokenizer, reader, s: ReinforceSettings, grid=None):
        self.policy, self.reference, self.tok, self.reader = policy, reference, tokenizer, reader
        self.s, self.grid = s, grid
        self.device = next(policy.parameters()).device
        # METHOD.md 7.4 needs responses that end: stop at the model's and the format's ends.
        self.stop_ids = set(policy.cfg.eos_ids) | tokenizer.stop_ids
        self.same_tokenizer = same_tokenizer(tokenizer, reader.tokenizer)
        # Every rank seeds its sampler alike, so under tp all draw the same tokens.
        self.generator = torch.Generator(device=self.device).manual_seed(s.seed)
        self.micro = s.micro_batch_size or 1 << 30

    def logprobs(self, model, tokens, mask, response, rows):
        """Per-token log-probs (n, T' - 1) of the response tokens of the sequences `rows`, T'
        their longest (0 at the prompt's positions, whose logits are not computed). The k
        samples of a prompt share it: each distinct prompt of the rows is computed once
        (`sft.shared_prompt_logprobs`), the responses in batches of similar length."""
        tokens, mask = trim(tokens[rows], mask[rows])
        targets = response[rows][:, :tokens.shape[1] - 1]
        return shared_prompt_logprobs(model, tokens.to(self.device), mask.to(self.device),
                                      targets.to(self.device), self.grid)

    def frozen_logprobs(self, model, tokens, mask, response):
        """Per-token log-probs (N, T - 1) of all responses, no gradient, in micro-batches."""
        parts = []
        for i in range(0, len(tokens), self.micro):
            rows = slice(i, i + self.micro)
            lp = self.logprobs(model, tokens, mask, response, rows).float().cpu()
            parts.append(torch.nn.functional.pad(lp, (0, tokens.shape[1] - 1 - lp.shape[1])))
        return torch.cat(parts)

    @torch.no_grad()
    def rollout(self, prompts) -> Rollout:
        """Sample k responses to each prompt (lists of messages) and score them (7.1-7.5)."""
        s, k = self.s, self.s.k
        self.policy.eval()
        ids = [self.tok.encode_chat(p, add_generation_prompt=True).ids for p in prompts]
        ids = [x for x in ids for _ in range(k)]           # the k samples of a prompt adjacent
        from minirm.generate import generate, release
        try:
            gen = generate(self.policy, ids, s.max_new_tokens, s.temperature,
                           stop_ids=self.stop_ids, pad_id=self.tok.pad_id,
                           generator=self.generator)
        finally:  # the optimizer steps change the weights: the next rollout repacks
            release(self.policy)
        responses = gen.token_lists(keep_stop=True)       # each ends with its stop id if ended
        ended = gen.ended.cpu()
        seqs = [p + r for p, r in zip(ids, responses)]
        tokens, mask = D.collate(seqs, self.tok.pad_id)
        response = response_mask([len(p) for p in ids], [len(x) for x in seqs], tokens.shape[1])
        texts = [self.tok.decode(r[:-1] if e else r) for r, e in zip(responses, ended.tolist())]
        # 7.2: the reward model reads the last token of the response.
        if self.same_tokenizer:  # score exactly the generated ids
            scored = seqs
        else:                    # re-encode the text in the reward model's own chat format
            from minirm.score import keep_end
            scored = [keep_end(self.reader.tokenizer, prompts[i // k], text,
                               self.reader.max_length).ids for i, text in enumerate(texts)]
        reward = self.reader.rewards(scored, group=k).float()  # each prompt computed once
        # 7.3: KL to the reference, from log pi at rollout time and log pi_ref.
        logp = self.frozen_logprobs(self.policy, tokens, mask, response)
        ref_logp = self.frozen_logprobs(self.reference, tokens, mask, response)
        kl = sequence_kl(logp, ref_logp, response, s.kl_estimator)
        R = reward - s.beta * kl
        advantage, _ = rloo_advantages(R, ended, k)       # 7.4-7.5
        return Rollout(tokens, mask, response, ended, reward, kl, advantage, texts)

    def step(self, trainer, prompts, task_score=None):
        """One rollout batch, then --optimizer-steps updates on it (7.7); returns metrics."""
        ro = self.rollout(prompts)
        cuts = torch.arange(len(ro.tokens)).tensor_split(self.s.optimizer_steps)

        def loss_fn(rows):  # 7.6, on a micro-batch of the optimizer batch
            logp = self.logprobs(self.policy, ro.tokens, ro.mask, ro.response, rows)
            response = ro.response[rows][:, :logp.shape[1]].to(self.device)
            return policy_loss(logp, response, ro.advantage[rows].to(self.device)), len(rows), {}

        updates = []
        for j, batch in enumerate(cuts):
            micro = [batch[i:i + self.micro] for i in range(0, len(batch), self.micro)]
            updates.append(trainer.update(micro, loss_fn, len(batch),
                                          batch_desc=f"optimizer batch {j}"))
        metrics = {"reward_mean": ro.reward.mean().item(), "kl": ro.kl.mean().item(),
                   "response_length": ro.response.sum(-1).float().mean().item(),
                   "ended_fraction": ro.ended.float().mean().item(),
                   "advantage_abs": ro.advantage.abs().mean().item()}
        if task_score is not None:
            flat = [p for p in prompts for _ in range(self.s.k)]
            metrics["task_score"] = float(np.mean([task_score(p, t)
                                                   for p, t in zip(flat, ro.texts)]))
        for key in ("loss", "grad_norm"):
            metrics[key] = float(np.mean([u[key] for u in updates]))
        metrics["lr"] = updates[-1]["lr"]
        return metrics


def trim(tokens, mask):
    """Drop the padding columns no row of this slice needs (rows are right-padded)."""
    T = int(mask.sum(-1).max())
    return tokens[:, :T], mask[:, :T]


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids to the same conversation."""
    return (a.chat_format == b.chat_format and a.bos_token == b.bos_token
            and a.eos_token == b.eos_token and a._tok.to_str() == b._tok.to_str())


# ---- prompts -----------------------------------------------------------------------------

def load_prompts(path) -> list[list[dict]]:
    """One conversation ending with the user's turn per JSONL row: `prompt` (a string or a
    message list) or `messages`. A malformed row or an empty prompt is a one-line UserError."""
    prompts = []
    for row in D._rows(path):
        field = "messages" if "prompt" not in row.data and "messages" in row.data else "prompt"
        messages = row.messages(field)
        try:
            from minirm.tokenizer import check_messages
            check_messages(messages, add_generation_prompt=True)
        except UserError as e:
            raise row.error(field, f"is not a prompt ({e})")
        if not messages[-1]["content"].strip():
            raise row.error(field, "is empty (the user's message has no text)")
        prompts.append(messages)
    if not prompts:
        raise UserError(f"{path} holds no prompts; give one JSON object with `prompt` a line")
    return prompts


def toysteer_judge(prompts):
    """ToySteer's true task score of (prompt, response text), if every prompt is a ToySteer
    task; else None."""
    from minirm import toysteer
    for p in prompts:
        if len(p) != 1:
            return None
        try:
            toysteer.attributes(p[0]["content"], "")
        except UserError:
            return None
    return lambda messages, text: toysteer.true_score(messages[0]["content"], text)


def prompt_plan(n_prompts, per_step, steps, seed):
    """The prompt indices of every rollout batch: a seeded order, reshuffled after each pass."""
    plan, order, epoch = [], [], 0
    while len(plan) < steps:
        while len(order) < per_step:
            order += np.random.default_rng([seed, epoch]).permutation(n_prompts).tolist()
            epoch += 1
        plan.append(order[:per_step])
        order = order[per_step:]
    return plan


# ---- models ------------------------------------------------------------------------------

def model_config(spec):
    return PRESETS[str(spec)] if str(spec) in PRESETS else from_hf(spec)


def toy_models(s, out: Path, report):
    """The toy pipeline's policy and reward model: weights/..., or trained now, reduced."""
    def sft(folder):
        from minirm.sft import SFTSettings, run_sft
        # one interrupted before (Ctrl-C) is continued
        run_sft(SFTSettings(toy_prompts=1500, resume=(folder / "checkpoint").exists()), folder,
                report=report)

    def reward_model(folder):
        from minirm.train import main as train
        resume = ["--resume"] if held_run(folder, depth=2) else []  # one interrupted before
        train(["--out", str(folder), "--toy-prompts", "3000", *resume])

    return (_shipped_or_trained(s.policy, TOY_POLICY, out / "sft-policy", sft,
                                "the toy SFT policy (1,500 ToySteer prompts)", report),
            _shipped_or_trained(s.reward_model, TOY_REWARD_MODEL, out / "reward-model",
                                reward_model, "the toy reward model (python -m minirm.train, "
                                "3,000 ToySteer prompts)", report))


def _shipped_or_trained(given, shipped: Path, folder: Path, train, what, report) -> str:
    """`given` if set, else the shipped folder, else `train(folder)` once (kept for reruns)."""
    if given is not None:
        return str(given)
    if shipped.is_dir():
        return str(shipped)
    report(f"{shipped} not found: training {what} first in {folder}")
    if not (folder / "model" / "config.json").exists():
        train(folder)
    return str(folder / "model")


def load_reward_reader(s, spec, dtype, device, grid):
    """The frozen reward model and how to read it (`score.RewardReader`)."""
    from minirm.score import NO_HEAD, RewardReader, reward_reading

    if s.reward == "head" and not model_config(spec).n_outputs and str(spec) not in PRESETS:
        raise UserError(NO_HEAD.format(where=spec))  # before loading a model in vain
    model, cfg = load_model(spec, dtype=dtype, device=device, grid=grid, seed=s.seed + 1,
                            n_outputs=1 if str(spec) in PRESETS else None)  # preset: random
    model.eval().requires_grad_(False)
    reward_fn, index, weights = reward_reading(model, s.reward, 0, s.reward_weights, str(spec))
    return RewardReader(model, load_tokenizer(spec), cfg.max_seq_len,
                        s.micro_batch_size or 64, reward_fn, index, weights)


def resolve(s: ReinforceSettings, policy_cfg) -> ReinforceSettings:
    toy = s.hparams == "toy" or (s.hparams == "auto" and policy_cfg.vocab_size == 259)
    base = TOY if toy else PAPER
    return replace(s, **{k: getattr(s, k) if getattr(s, k) is not None else v
                         for k, v in base.items()})


def check(s: ReinforceSettings):
    if s.k < 2:
        raise UserError(f"--k {s.k}: the leave-one-out baseline (METHOD.md 7.4) needs at "
                        "least 2 samples per prompt")
    for name in ("prompts_per_step", "optimizer_steps", "max_new_tokens", "steps",
                 "micro_batch_size", "save_every"):
        positive(name, getattr(s, name), allow_zero=name == "save_every")
    for name in ("lr", "beta", "weight_decay", "clip", "temperature"):
        positive(name, getattr(s, name), allow_zero=name != "temperature")
    if s.optimizer_steps and s.prompts_per_step and \
            s.optimizer_steps > s.prompts_per_step * s.k:
        raise UserError(f"--optimizer-steps {s.optimizer_steps} exceeds the {s.prompts_per_step}"
                        f" x {s.k} samples of a rollout batch")


# ---- the command -------------------------------------------------------------------------

TABLE = ("step", "reward", "kl", "length", "ended", "task score", "loss")


def table_row(step, m):
    cells = [f"{step:>4}", f"{m['reward_mean']:+.3f}", f"{m['kl']:.4f}",
             f"{m['response_length']:.1f}", f"{m['ended_fraction']:.2f}",
             f"{m['task_score']:.3f}" if "task_score" in m else "n/a", f"{m['loss']:+.4f}"]
    return " | ".join(c.rjust(len(h)) for c, h in zip(cells, TABLE))


def run(s: ReinforceSettings, out: Path, grid=None, report=print):
    """Train the policy with REINFORCE; returns (policy, reference, tokenizer, settings)."""
    from minirm.distributed import device_for
    from minirm.tokenizer import chat_prompt

    check(s)
    is_main = grid is None or grid.is_main
    if s.prompts is not None:
        prompts = load_prompts(s.prompts)
    else:
        from minirm import toysteer
        prompts = [chat_prompt(p) for p in toysteer.sample_prompts(2000, seed=s.seed)]
    judge = toysteer_judge(prompts)
    policy_spec, rm_spec = toy_models(s, out, report)
    cfg = model_config(policy_spec)
    if cfg.n_outputs:
        raise UserError(f"{policy_spec}: a reward model (it has a reward head, no language-"
                        "model head) cannot be the policy; pass a language model")
    if not cfg.eos_ids:
        raise UserError(f"{policy_spec}: the policy has no eos token (eos_token_id in "
                        "config.json); REINFORCE needs responses that end (METHOD.md 7.4)")
    s = resolve(replace(s, policy=policy_spec, reward_model=rm_spec), cfg)
    check(s)
    if s.resume:  # before the models are loaded, or anything written
        check_resumed_settings(out, asdict(s), ignore=RESUME_MAY_DIFFER)
    device = s.device or device_for(grid)
    dtype = s.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    tp_grid = grid if grid is not None and grid.tp_size > 1 else None
    tok = load_tokenizer(policy_spec)
    reader = load_reward_reader(s, rm_spec, dtype, device, tp_grid)
    policy, _ = load_model(policy_spec, dtype=dtype, device=device, seed=s.seed, grid=tp_grid)
    reference, _ = load_model(policy_spec, dtype=dtype, device=device, seed=s.seed,
                              grid=tp_grid)
    reference.eval().requires_grad_(False)
    rl = Reinforce(policy, reference, tok, reader, s, tp_grid)
    longest = max(len(tok.encode_chat(p, add_generation_prompt=True).ids) for p in prompts)
    limit = min(cfg.max_seq_len, reader.max_length if rl.same_tokenizer else cfg.max_seq_len)
    if longest + s.max_new_tokens > limit:
        raise UserError(f"the longest prompt ({longest} tokens) + --max-new-tokens "
                        f"{s.max_new_tokens} exceed the context of {limit} tokens; lower "
                        "--max-new-tokens or shorten the prompts")
    scoring = ("same tokenizer and chat format: the generated ids are scored" if
               rl.same_tokenizer else "responses re-encoded in its own chat format")
    report(f"policy {policy_spec}, reward model {rm_spec} ({scoring}), {len(prompts)} prompts"
           f"{' (ToySteer: task score on)' if judge else ''}")
    plan = prompt_plan(len(prompts), s.prompts_per_step, s.steps, s.seed)
    settings = OptimSettings(lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.98),
                             warmup_steps=0, schedule="constant", clip=s.clip)  # METHOD.md 7
    trainer = Trainer(policy, settings, out, s.steps * s.optimizer_steps, tokenizer=tok,
                      grid=grid, desc="reinforce", resume_hint=resume_hint(out))
    if s.resume and trainer.checkpoint_dir.exists():
        extra = trainer.load_checkpoint()
        rl.generator.set_state(extra["generator"])
        report(f"[reinforce] resumed at step {trainer.step} of {s.steps}")
    elif (out / "metrics.jsonl").exists() and is_main:
        (out / "metrics.jsonl").unlink()
    if is_main:
        save_settings(s, out)
        report(f"settings (resolved):\n{describe(s)}")
    from tqdm import tqdm
    say = tqdm.write if is_main else (lambda *_: None)
    say(" | ".join(TABLE))

    def step_fn(indices):
        metrics = rl.step(trainer, [prompts[i] for i in indices], judge)
        say(table_row(trainer.step + 1, metrics))
        return metrics

    done = trainer.fit(plan, step_fn=step_fn, save_every=s.save_every,
                       extra_state=lambda: {"generator": rl.generator.get_state()},
                       show=("reward_mean", "task_score"))
    if not done:
        raise SystemExit(130)
    save_model_parallel(policy, out / "model", grid, tokenizer=tok)
    if is_main:
        report(summary(out / "metrics.jsonl") + f"\npolicy saved to {out / 'model'}")
    return policy, reference, tok, s


def summary(metrics_file: Path) -> str:
    """Mean of the first and the last n steps (up to 5) of each headline metric."""
    import json
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    n = max(1, min(5, len(rows) // 2))
    lines = [f"first {n} steps -> last {n} steps (of {len(rows)}):"]
    for key in ("reward_mean", "task_score", "kl", "response_length", "ended_fraction"):
        if rows and key in rows[0]:
            a, b = (np.mean([r[key] for r in part]) for part in (rows[:n], rows[-n:]))
            lines.append(f"  {key:16} {a:8.4f} -> {b:8.4f}")
    return "\n".join(lines)


@cli
def main(argv=None):
    from minirm import distributed

    s = parse(ReinforceSettings, argv, "python -m minirm.reinforce", __doc__.split("\n\n")[0])
    check(s)
    if s.device is not None:
        from minirm.score import resolve_device

        resolve_device(s.device)  # before the toy pipeline trains its stand-ins
    tiny_model_threads(s.policy or "toy", s.device)  # no --policy: the toy pipeline
    grid = distributed.init(tp=s.tp)
    try:
        if grid.world > 1 and grid.dp_size != 1:
            raise UserError(f"reinforce runs tensor parallelism only: launch --tp "
                            f"{grid.world} for {grid.world} processes")
        if s.out is None and grid.world > 1:
            raise UserError("pass --out under torchrun, so every rank writes the same run")
        out = Path(s.out or f"runs/reinforce-{time.strftime('%Y%m%d-%H%M%S')}")
        check_out(s.out, out, s.resume, s.force, inputs=(s.policy, s.reward_model, s.prompts))
        distributed.barrier()  # --force: rank 0 has cleared --out before any rank goes on
        policy, reference, tok, s = run(s, out, grid if grid.world > 1 else None,
                                        distributed.print0)
        if s.prompts is None and grid.world == 1:  # ToySteer: greedy answers, before and after
            from minirm import toysteer
            from minirm.sft import sample_report
            held_out = toysteer.sample_prompts(200, seed=10_000 + s.seed)
            for name, temp in (("sampled (T=1)", 1.0), ("greedy", 0.0)):
                before, after = (sample_report(m, tok, held_out, temp, s.max_new_tokens,
                                               seed=s.seed)[0] for m in (reference, policy))
                print(f"{name}: true task score on 200 held-out prompts {before:.3f} (SFT "
                      f"policy) -> {after:.3f} (after REINFORCE)")
    finally:
        distributed.destroy(grid)


if __name__ == "__main__":
    main()
