"""Read rewards from a model: the loading and flags that evaluate, score and expo share, and the
`score` command.

    python -m minirm.score --model DIR --prompt "What is 1+1?" --response "2" --response "3"
    python -m minirm.score --model DIR --data pairs.jsonl --out rewards.jsonl

Where the reward comes from (`--reward`):
- `head` (default): the reward head of a minirm / LlamaForSequenceClassification folder, read at
  the last real token (METHOD.md 2). A 5-output head gives output `--reward-index` (0, the
  helpfulness output, by default) or, with `--weights`, a published weighted sum of the five
  attributes (METHOD.md 2; `scoring.ATTRIBUTE_WEIGHTS`);
- `token0`: a plain causal LM read as the released Nemotron reward model is, the logit of token
  id 0 at the last token (METHOD.md 9; `minirm.released`).

Every conversation goes through the tokenizer's chat format once (`encode_all`, by the rules
of `data.encode_pairs`). One longer than `--max-length` (default: the model's context) has its
prompt cut from the left; a pair whose response alone does not fit is scored on the end of its
response, never dropped; one line says how many of each. A response on the command line is scored as
the chosen side of a pair with itself, so it is tokenized and cut by the same code as a file.
"""

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from minirm.checkpoint import ordinary_permissions
from minirm.cliargs import opt
from minirm.data import FORMATS, Encoded, Pair, _check_encoding, _encode
from minirm.errors import UserError, cli, write_failure
from minirm.runs import check_not_input
from minirm.scoring import ATTRIBUTE_WEIGHTS, reduce_outputs, score_pairs, score_sequences

REWARD_SOURCES = ("head", "token0")
NO_HEAD = ("{where}: the model has no reward head; pass --reward token0 to read a released-style "
           "model, or train one with minirm.train")


@dataclass
class RewardSettings:
    """How rewards are read: shared by evaluate, score and expo."""
    reward: str = opt("head", "'head': the reward head; 'token0': the logit of token 0 of a "
                      "causal LM (the released model's convention, METHOD.md 9)",
                      choices=REWARD_SOURCES)
    reward_index: int = opt(0, "head output that is the reward (0: helpfulness)")
    weights: str = opt(None, "reward = this weighted sum of a 5-attribute head instead",
                       choices=tuple(ATTRIBUTE_WEIGHTS))
    batch_size: int = opt(16, "sequences per forward pass")
    max_length: int = opt(None, "max tokens per conversation, unset: the model's context; "
                          "longer prompts are cut from the left")
    chat_format: str = opt(None, "override the tokenizer's chat format",
                           choices=("llama3", "chatml", "toy"))
    attention: str = opt("sdpa", "attention backend", choices=("reference", "flash", "sdpa"))
    dtype: str = opt(None, "weights dtype, unset: float32 on CPU, bfloat16 on GPU",
                     choices=("float32", "bfloat16", "float16"))
    device: str = opt(None, "cpu or cuda, unset: cuda when available")
    tp: int = opt(1, "tensor-parallel degree (run under torchrun --nproc-per-node TP)")


@dataclass
class ReadSettings(RewardSettings):
    model: str = opt(None, "reward model folder (Hugging Face layout)")


def reward_reading(model, reward="head", reward_index=0, weights=None, where="the model"):
    """Check the reward flags against a model; returns (reward_fn, reward_index, weights)."""
    from minirm.released import token0_reward

    n = model.cfg.n_outputs
    if reward not in REWARD_SOURCES:
        raise UserError(f"--reward {reward!r} is unknown; choose one of {REWARD_SOURCES}")
    if reward == "head" and not n:
        raise UserError(NO_HEAD.format(where=where))
    if reward == "token0" and n:
        raise UserError(f"{where}: the model has a {n}-output reward head and no language-model "
                        "head, so it has no token-0 logit; drop --reward token0")
    n = n if reward == "head" else 1
    if weights is not None:
        if isinstance(weights, str):
            weights = ATTRIBUTE_WEIGHTS[weights]
        if reward_index:
            raise UserError("pass --reward-index or --weights, not both")
        if n != len(weights):
            raise UserError(f"--weights combines {len(weights)} attribute outputs but {where} "
                            f"has {n}; drop --weights")
        weights = tuple(weights)
    if not 0 <= reward_index < n:
        raise UserError(f"--reward-index {reward_index} is out of range: {where} has {n} "
                        f"output{'s' if n > 1 else ''}")
    return (token0_reward(model) if reward == "token0" else None), reward_index, weights


@dataclass
class RewardReader:
    """A model, its tokenizer and how to read its reward."""
    model: torch.nn.Module
    tokenizer: object
    max_length: int
    batch_size: int = 16
    reward_fn: object = None      # None: model.reward (the head)
    reward_index: int = 0
    weights: tuple | None = None
    what: str = "head output 0"   # for printing

    def encode(self, pairs, report=print):
        return encode_all(pairs, self.tokenizer, self.max_length, report)

    def pair_rewards(self, encoded, progress=False):
        """(chosen, rejected) float32 rewards of encoded pairs."""
        return score_pairs(self.model, encoded, self.tokenizer.pad_id, self.batch_size,
                           self.weights, self.reward_index, progress, self.reward_fn)

    def rewards(self, seqs, progress=False, group=1):
        """Rewards (N,) of token-id lists; `group` = k: runs of k sequences share a prompt,
        computed once (`scoring.score_sequences`)."""
        out = score_sequences(self.model, seqs, self.tokenizer.pad_id, self.batch_size,
                              progress, reward_fn=self.reward_fn, group=group)
        return reduce_outputs(out, self.weights, self.reward_index)


def describe_reward(reward, reward_index, weights_name):
    if reward == "token0":
        return "logit of token 0 at the last token (METHOD.md 9)"
    if weights_name:
        return f"head outputs weighted by {weights_name} {ATTRIBUTE_WEIGHTS[weights_name]}"
    return f"head output {reward_index}"


def load_reader(s: ReadSettings) -> RewardReader:
    """Load the model and tokenizer of `s.model` and check the reward flags against them."""
    from minirm.checkpoint import load_model, load_tokenizer

    if s.model is None:
        raise UserError("--model is required: a reward model folder")
    if s.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {s.batch_size}")
    grid = tp_grid(s.tp)
    device = str(grid.device) if grid is not None else resolve_device(s.device)
    dtype = s.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model, cfg = load_model(s.model, dtype=dtype, device=device, attention=s.attention,
                            grid=grid)
    model.eval()
    reward_fn, index, weights = reward_reading(model, s.reward, s.reward_index, s.weights,
                                               where=str(s.model))
    tokenizer = load_tokenizer(s.model, chat_format=s.chat_format)
    return RewardReader(model, tokenizer, resolve_max_length(s.max_length, cfg), s.batch_size,
                        reward_fn, index, weights, describe_reward(s.reward, index, s.weights))


def tp_grid(tp):
    """The tensor-parallel grid for --tp under torchrun (None for one process).

    Scoring needs no data parallelism: every rank of the tp group scores every sequence, and
    all ranks end with the same rewards; only rank 0 prints and writes.
    """
    import os

    from minirm import distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp == 1 and world == 1:
        return None
    if world != tp:
        raise UserError(f"--tp {tp} needs exactly {tp} processes (torchrun --nproc-per-node "
                        f"{tp}); got {world}")
    return distributed.init(tp=tp, dp=1)


def resolve_device(device, gpu_default=True):
    """--device, by default cuda when a GPU is visible (and `gpu_default`), else cpu. One the
    commands cannot use (a misspelling, another kind of accelerator, a GPU not visible here) is
    a user error."""
    if device is None:
        return "cuda" if gpu_default and torch.cuda.is_available() else "cpu"
    try:
        kind, index = torch.device(device).type, torch.device(device).index
    except RuntimeError:
        kind, index = None, None
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: not a device minirm runs on; pass cpu, cuda or "
                        "cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no GPU is visible to torch; pass --device cpu")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s) "
                        f"here, numbered from 0")
    return device


def resolve_max_length(max_length, cfg):
    """--max-length, by default the model's context, which it may not exceed."""
    max_length = max_length or cfg.max_seq_len
    if not 2 <= max_length <= cfg.max_seq_len:
        raise UserError(f"--max-length {max_length} must be in 2..{cfg.max_seq_len} (the "
                        "model's context)")
    return max_length


def stored_dtype(folder):
    """The dtype a model folder was saved in (config.json's torch_dtype), float32 if unknown."""
    try:
        name = json.loads((Path(folder) / "config.json").read_text()).get("torch_dtype")
    except (OSError, ValueError, AttributeError):
        name = None  # load_model reports a missing or broken config.json properly
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def encode_all(pairs, tokenizer, max_length, report=print):
    """Tokenize every pair to at most `max_length` tokens: none is dropped.

    As `data.encode_pairs` with the prompt cut from the left, one step further: a pair whose
    response alone is longer than max_length, which `encode_pairs` drops, is kept here as BOS
    plus its last max_length - 1 tokens, so the response loses its beginning but keeps its end,
    where the reward is read. Reports the counts in one line; returns the encoded pairs, in the
    order of `pairs`.
    """
    if not pairs:
        return []
    _check_encoding(max_length, "prompt-left")
    encoded, prompt_cut, end_kept = [], 0, 0
    for pair in pairs:
        sides = [_encode(tokenizer, pair.prompt, response, max_length, "prompt-left")
                 for response in (pair.chosen, pair.rejected)]
        if all(enc is not None for enc, _ in sides):
            prompt_cut += any(cut for _, cut in sides)
            encoded.append((sides[0][0], sides[1][0], pair.strength))
        else:  # kept or cut as a pair, as encode_pairs does
            end_kept += 1
            encoded.append((keep_end(tokenizer, pair.prompt, pair.chosen, max_length),
                            keep_end(tokenizer, pair.prompt, pair.rejected, max_length),
                            pair.strength))
    line = (f"encoded {len(pairs)} pairs at max_length {max_length}: kept "
            f"{len(pairs) - end_kept} ({prompt_cut} with the prompt cut from the left)")
    if end_kept:
        line += (f"; {end_kept} more, whose response alone is longer, are scored on their last "
                 f"{max_length - 1} tokens after BOS (the response's beginning cut too): raise "
                 f"--max-length to score them whole")
    report(line)
    return encoded


def keep_end(tokenizer, prompt, response, max_length):
    """The conversation's BOS and its last max_length - 1 tokens."""
    enc = tokenizer.encode_chat(prompt + [{"role": "assistant", "content": response}])
    ids, start = enc.ids, enc.assistant_start
    cut = max(0, len(ids) - max_length)
    return Encoded(ids[:1] + ids[1 + cut:], max(1, start - cut))


def write_atomic(path, text: str):
    """Write `text` to `path` via a temporary file and a rename: all or nothing. A path that
    cannot be written (a file where a folder should be, a full disk) is a UserError."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        why = write_failure(e)
        if why is None:
            raise
        raise UserError(f"{path}: cannot write it ({why}); choose another path or free some "
                        "disk space") from None


# ---- the score command ----

@dataclass
class ScoreSettings(ReadSettings):
    prompt: str = opt(None, "a user message to score responses to (with --response)")
    data: str = opt(None, "score every pair of this preference or RewardBench file")
    format: str = opt(None, "format of --data, unset: detected from the fields",
                      choices=FORMATS)
    split: str = opt(None, "split of a HelpSteer2-Preference --data file",
                     choices=("train", "val"))
    out: str = opt(None, "with --data: write one JSON line per pair here, unset: stdout")


def score_responses(reader, prompt, responses, report=print):
    """One reward per response to the user message `prompt`."""
    messages = [{"role": "user", "content": prompt}]
    pairs = [Pair(messages, r, r) for r in responses]  # each response is a pair with itself
    return reader.rewards([c.ids for c, _, _ in reader.encode(pairs, report)])


def score_file(reader, pairs, report=print, progress=False):
    """One record per pair: {"id" (when the pair has one), "reward_chosen", "reward_rejected"}."""
    chosen, rejected = reader.pair_rewards(reader.encode(pairs, report), progress)
    return [{**({} if p.id is None else {"id": p.id}), "reward_chosen": float(c),
             "reward_rejected": float(r)} for p, c, r in zip(pairs, chosen, rejected)]


def build_parser():
    from minirm.cliargs import build_parser as from_settings

    p = from_settings(ScoreSettings, "python -m minirm.score",
                      "Score responses, or every pair of a file, with a reward model.")
    p.add_argument("--response", action="append", default=[],
                   help="a response to --prompt (repeat the flag for several)")
    return p


@cli
def main(argv=None):
    from minirm.data import load_pairs

    args = vars(build_parser().parse_args(argv))
    responses = args.pop("response")
    s = ScoreSettings(**args)
    if (s.data is None) == (s.prompt is None):
        raise UserError("pass either --prompt with one or more --response, or --data FILE")
    if s.prompt is not None and (not responses or s.out):
        raise UserError("--prompt needs one or more --response (and takes no --out; it prints "
                        "one reward per response)")
    if s.data is not None and responses:
        raise UserError("--response goes with --prompt, not with --data")
    check_not_input(s.out, "--out", {"--data": s.data})  # before the data is read
    for i, r in enumerate(responses):  # as a data file's empty response is refused
        if not r.strip():
            raise UserError(f"--response number {i + 1} is empty; give the response's text")
    # Messages go to stderr unless the records go to --out: stdout holds only the results.
    # Under torchrun only rank 0 prints and writes.
    from minirm.distributed import env_rank
    if env_rank() != 0:
        sys.stdout = open(os.devnull, "w")
        s.out = None
    log = print if s.out else (lambda *a: print(*a, file=sys.stderr))
    if s.prompt is not None:
        rewards = score_responses(load_reader(s), s.prompt, responses, report=log)
        for r in rewards.tolist():
            print(f"{r:.6f}")
        return
    pairs = load_pairs(s.data, format=s.format, split=s.split, report=log)  # fails fast
    reader = load_reader(s)
    records = score_file(reader, pairs, log, progress=sys.stderr.isatty())
    text = "".join(json.dumps(r) + "\n" for r in records)
    if s.out is None:
        sys.stdout.write(text)
        return
    write_atomic(s.out, text)
    log(f"wrote {len(records)} rows ({reader.what}) to {s.out}")


if __name__ == "__main__":
    main()
