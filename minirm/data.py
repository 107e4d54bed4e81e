"""Data in, token batches out: HelpSteer2 ratings and preference pairs (METHOD.md sections 1 and 3).

Three stages, one function each:
1. Loaders read a file into `Rated` rows (HelpSteer2 ratings: regression) or `Pair`s (preferences:
   Bradley-Terry training and evaluation). `load_helpsteer2_preference` applies the paper's
   post-processing (METHOD.md 1.2); `load_pairs` also reads TRL/generic, Anthropic HH, RewardBench
   and LLMBar files, telling the format from the fields of the first row.
2. `encode_rated` / `encode_pairs` put each conversation through the tokenizer's chat format once
   (one BOS, and we know where the response starts) and drop, or cut the prompt of, what is longer
   than max_length. A pair is dropped whole, never split (METHOD.md 4).
3. `collate` right-pads a batch; `batches` decides which rows share one (seeded, length-bucketed).

A bad input is a `UserError` naming the file, the line and the field, so one malformed row in a
20,000-row file costs one look. Loaders stream: a .jsonl(.gz) file is read a line at a time.

Choices the paper leaves open (METHOD.md 1.2), made explicit:
- raw -100 ("neither response is valid") annotations are left out of the mean and the spread;
  a pair whose most similar annotations are all -100 is dropped ("all -100");
- the mean is rounded half away from zero (`rounding="half-away"`, so 0.5 -> 1, -1.5 -> -2) or
  half to even (`"half-even"`, Python's `round`). A mean of three integers is never x.5: the rule
  only matters once a -100 was left out;
- a pair failing both filters counts under "spread > 2" (the paper's step 3 comes first);
- the released `preference_strength` is checked (an int in -3..3) but recomputed from
  `three_most_similar_preferences`, since the released file is not yet filtered.
`truncate="prompt-left"` keeps the first token (BOS) and the whole response and cuts the tokens
right after BOS: a system header goes first, the final turn's header last.
Format details: LLMBar rows get RewardBench's subset names and ids; in HH, consecutive turns of one
speaker are joined, and a row with an empty final answer or with different prompts in chosen and
rejected is dropped and counted (public HH has a few); `margin` / `preference_strength` of a
generic pair give its strength |m|, and 0 (a tie) drops the pair.
"""

import gzip
import json
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from minirm.errors import UserError
from minirm.tokenizer import ROLES, check_messages

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
MISSING = -100        # a label that is absent (the regression loss skips it, METHOD.md 3)
NEITHER_VALID = -100  # a raw preference annotation: "neither response is valid" (METHOD.md 1.2)
FORMATS = ("helpsteer2-preference", "trl", "generic", "hh", "rewardbench", "llmbar")
ROUNDINGS = ("half-away", "half-even")
TRUNCATIONS = ("prompt-left",)
HS_USER, HS_ASSISTANT = "\n<extra_id_1>User\n", "\n<extra_id_1>Assistant\n"  # METHOD.md 1.1
# LLMBar file -> RewardBench subset (METHOD.md 6), so evaluation reports the same names.
LLMBAR_SUBSETS = {"Natural": "llmbar-natural", "Adversarial_Neighbor": "llmbar-adver-neighbor",
                  "Adversarial_GPTInst": "llmbar-adver-GPTInst",
                  "Adversarial_GPTOut": "llmbar-adver-GPTOut",
                  "Adversarial_Manual": "llmbar-adver-manual"}


@dataclass
class Rated:
    """One HelpSteer2 ratings row: a conversation and its 5 attribute labels."""
    prompt: list[dict]   # the messages before the response ({"role", "content"})
    response: str
    labels: list[float]  # 5 values in ATTRIBUTES order, MISSING where absent
    id: str | None = None


@dataclass
class Pair:
    """One preference pair: `chosen` is the better response to `prompt`."""
    prompt: list[dict]
    chosen: str
    rejected: str
    strength: int = 1    # |preference strength| m in {1, 2, 3}; 1 when the format has none
    id: str | None = None
    subset: str | None = None


@dataclass
class Encoded:
    """One tokenized conversation."""
    ids: list[int]
    start: int           # index of the first token of the final assistant response


# ---- reading rows ----

class _Row:
    """A parsed JSON object and where it came from; its getters fail as a one-line UserError."""

    def __init__(self, data: dict, path: Path, line: int):
        self.data, self.path, self.line = data, path, line

    def error(self, field, problem, fix="fix or remove the row") -> UserError:
        return UserError(f"{self.path} line {self.line}: field {field!r} {problem}; {fix}")

    def get(self, field):
        if self.data.get(field) is None:
            raise self.error(field, "is missing")
        return self.data[field]

    def text(self, field, empty_ok=False, value=None) -> str:
        v = self.get(field) if value is None else value
        if not isinstance(v, str):
            raise self.error(field, f"must be a string, got {type(v).__name__}")
        if not empty_ok and not v.strip():
            raise self.error(field, "is empty")
        try:  # JSON lets "\ud800" through; the tokenizer would fail on it much later
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise self.error(field, "holds a lone surrogate (not valid Unicode text)")
        return v

    def int_in(self, field, lo, hi, also=(), value=None) -> int:
        v = self.get(field) if value is None else value
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not (lo <= v <= hi or v in also):
            extra = "".join(f" or {a}" for a in also)
            raise self.error(field, f"must be an int in {lo}..{hi}{extra}, got {v!r:.40}")
        return v

    def messages(self, field) -> list[dict]:
        """A string (one user message) or a list of {"role", "content"} messages."""
        v = self.get(field)
        if isinstance(v, str):
            return [{"role": "user", "content": self.text(field, empty_ok=True)}]
        if not isinstance(v, list):
            raise self.error(field, f"must be a string or a list of messages, "
                                    f"got {type(v).__name__}")
        for j, m in enumerate(v):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise self.error(f"{field}[{j}]", f"must be a message with a role in {ROLES}")
            self.text(f"{field}[{j}].content", empty_ok=True, value=m.get("content"))
        return [{"role": m["role"], "content": m["content"]} for m in v]

    def id(self) -> str | None:
        v = self.data.get("id")
        return str(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else None

    def check_conversation(self, field, prompt, response):
        try:
            check_messages(prompt + [{"role": "assistant", "content": response}], False)
        except UserError as e:
            raise self.error(field, f"is not a valid conversation ({e})")


def _rows(path):
    """Yield a _Row per JSON object of a .jsonl, a .jsonl.gz or a .json list (LLMBar), streaming."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found (or not a file); check the path")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); check its permissions")
    with f:
        gz = f.read(2) == b"\x1f\x8b"  # the gzip magic number, whatever the file is called
        f.seek(0)
        lines, first = _lines(gzip.GzipFile(fileobj=f) if gz else f, path), True
        for n, raw in lines:
            text = _decode(raw, path, n)
            if not text.strip():
                continue
            if first and text.lstrip().startswith("["):  # a whole-file JSON list: read it all
                rest = "".join(_decode(r, path, m) for m, r in lines)
                yield from _json_list(text + rest, path, n)
                return
            first = False
            yield _row(_loads(text, path, n), path, n)


def _lines(stream, path):
    n, it = 0, iter(stream)
    while True:
        try:
            raw = next(it)
        except StopIteration:
            return
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise UserError(f"{path} line {n + 1}: unreadable gzip data ({e}); the file is "
                            f"truncated or corrupt, download or copy it again")
        n += 1
        yield n, raw


def _decode(raw: bytes, path, n) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} line {n}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"save the file as UTF-8")


def _loads(text, path, n):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {n}: malformed JSON ({e.msg} at column {e.colno}); "
                        f"each line must be one JSON object")
    except ValueError as e:  # an integer too long to convert
        raise UserError(f"{path} line {n}: malformed JSON ({e})")
    except RecursionError:
        raise UserError(f"{path} line {n}: malformed JSON (nested too deeply)")


def _row(value, path, n) -> _Row:
    if not isinstance(value, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")
        raise UserError(f"{path} line {n}: expected a JSON object {{...}}, got "
                        f"{'null' if value is None else kind}; each row must be one object")
    return _Row(value, path, n)


def _json_list(text, path, line0):
    """The objects of a JSON list, each with the line it starts on."""
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    i = space.match(text, text.index("[") + 1).end()
    line, seen = line0, 0  # the line of text[seen]
    while not text.startswith("]", i) or seen:  # "[]" is an empty list, "[1,]" is malformed
        line, seen = line + text.count("\n", seen, i), i
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {line0 + e.lineno - 1}: malformed JSON ({e.msg})")
        except (ValueError, RecursionError) as e:
            raise UserError(f"{path} line {line}: malformed JSON ({e})")
        yield _row(value, path, line)
        i = space.match(text, i).end()
        if text.startswith(",", i):
            i = space.match(text, i + 1).end()
        elif text.startswith("]", i):
            break
        else:
            raise UserError(f"{path} line {line + text.count(chr(10), seen, i)}: malformed "
                            f"JSON (expected ',' or ']' in the list)")
    if text[i + 1:].strip():
        raise UserError(f"{path} line {line + text.count(chr(10), seen, i)}: malformed JSON "
                        f"(text after the closing ']')")


# ---- HelpSteer2 ----

def split_helpsteer_prompt(prompt: str) -> list[dict]:
    """HelpSteer2's `prompt` string -> alternating user/assistant messages (METHOD.md 1.1)."""
    pieces = re.split(f"({re.escape(HS_ASSISTANT)}|{re.escape(HS_USER)})", prompt)
    messages = [{"role": "user", "content": pieces[0]}]
    for marker, content in zip(pieces[1::2], pieces[2::2]):
        role = "assistant" if marker == HS_ASSISTANT else "user"
        if role == messages[-1]["role"]:
            raise ValueError(f"two {role} turns in a row")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise ValueError("it ends with an assistant turn, not the user's")
    return messages


def _helpsteer_prompt(row: _Row) -> list[dict]:
    try:
        return split_helpsteer_prompt(row.text("prompt", empty_ok=True))
    except ValueError as e:
        raise row.error("prompt", f"has misplaced <extra_id_1> turn markers: {e}")


def load_ratings(path) -> list[Rated]:
    """HelpSteer2 ratings (train/validation .jsonl or .jsonl.gz) -> Rated rows (METHOD.md 1.1)."""
    rated = []
    for row in _rows(path):
        prompt, response = _helpsteer_prompt(row), row.text("response")
        labels = [_label(row, a) for a in ATTRIBUTES]
        if all(v == MISSING for v in labels):
            raise row.error("helpfulness", "and the other attributes are all missing",
                            f"a ratings row needs at least one of {', '.join(ATTRIBUTES)}")
        rated.append(Rated(prompt, response, labels, row.id()))
    if not rated:
        raise UserError(f"{path} holds no rows; give a HelpSteer2 ratings .jsonl(.gz) file")
    return rated


def _label(row: _Row, field) -> float:
    v = row.data.get(field)
    if v is None or v == MISSING:
        return float(MISSING)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 4:
        raise row.error(field, f"must be a number in 0..4 (or -100 for missing), got {v!r:.40}")
    return float(v)


def preference_from_annotations(strengths, rounding="half-away") -> tuple[int, str | None]:
    """The paper's post-processing of one pair's most similar annotations (METHOD.md 1.2).

    Returns (rounded mean, None) for a kept pair, or (rounded mean or 0, reason) for a dropped one.
    """
    _choice("rounding", rounding, ROUNDINGS)
    valid = [s for s in strengths if s != NEITHER_VALID]
    if not valid:
        return 0, "all -100"
    mean = Fraction(sum(valid), len(valid))  # exact, so x.5 is exactly x.5
    if rounding == "half-even":
        value = round(mean)  # Fraction rounds half to even, like Python's round
    else:
        value = (1 if mean >= 0 else -1) * math.floor(abs(mean) + Fraction(1, 2))
    if max(valid) - min(valid) > 2:
        return value, "spread > 2"
    return value, "rounds to 0" if value == 0 else None


def load_helpsteer2_preference(path, split=None, rounding="half-away", report=print) -> list[Pair]:
    """HelpSteer2-Preference -> post-processed pairs (METHOD.md 1.2); `split` "train" or "val"."""
    _choice("split", split, ("train", "val", None))
    _choice("rounding", rounding, ROUNDINGS)
    pairs, dropped, seen = [], Counter(), 0
    for row in _rows(path):
        pair, reason = _helpsteer_pair(row, rounding)
        # Anything other than "train" is validation (METHOD.md 1.2).
        if split and (row.text("split", empty_ok=True) == "train") != (split == "train"):
            continue
        seen += 1
        if reason:
            dropped[reason] += 1
        else:
            pairs.append(pair)
    name = f"{Path(path).name}" + (f" [{split}]" if split else "")
    summary = f"kept {len(pairs)} of {seen} pairs, dropped {_counts(dropped)} (rounding {rounding})"
    report(f"{name}: {summary}")
    if not pairs:
        raise UserError(f"{path}: no usable pair left{f' in split {split!r}' if split else ''}: "
                        f"{summary}; check the file and --split")
    return pairs


def _helpsteer_pair(row: _Row, rounding) -> tuple[Pair | None, str | None]:
    prompt, r1, r2 = _helpsteer_prompt(row), row.text("response_1"), row.text("response_2")
    row.int_in("preference_strength", -3, 3)  # checked, but recomputed from the annotations
    field = "three_most_similar_preferences"
    similar = row.get(field)
    if not isinstance(similar, list) or not similar:
        raise row.error(field, "must be a non-empty list of {statement, elaboration, strength}")
    strengths = [row.int_in(f"{field}[{j}].strength", -3, 3, also=(NEITHER_VALID,),
                            value=a.get("strength") if isinstance(a, dict) else a)
                 for j, a in enumerate(similar)]
    value, reason = preference_from_annotations(strengths, rounding)
    if reason:
        return None, reason
    chosen, rejected = (r1, r2) if value < 0 else (r2, r1)  # negative: response_1 is better
    return Pair(prompt, chosen, rejected, abs(value), row.id()), None


# ---- other preference formats ----

def load_pairs(path, format=None, split=None, report=print, rounding="half-away") -> list[Pair]:
    """Preference pairs from any of FORMATS; the format is told from the first row unless given.

    `split` and `rounding` only apply to helpsteer2-preference; other files are read whole.
    """
    if format is not None and format not in FORMATS:
        raise UserError(f"--format {format!r} is unknown; choose one of {', '.join(FORMATS)}")
    format = format or _detect_format(path)
    if format == "helpsteer2-preference":
        return load_helpsteer2_preference(path, split, rounding, report)
    parse = {"trl": _generic, "generic": _generic, "rewardbench": _rewardbench, "hh": _hh,
             "llmbar": _llmbar}[format]
    pairs, dropped = [], Counter()
    for i, row in enumerate(_rows(path)):
        pair, reason = parse(row, i)
        if reason:
            dropped[reason] += 1
        else:
            pairs.append(pair)
    if split is not None:
        report(f"note: split {split!r} applies to helpsteer2-preference files; "
               f"{Path(path).name} is read whole")
    summary = f"kept {len(pairs)} of {len(pairs) + sum(dropped.values())} pairs"
    report(f"{Path(path).name} ({format}): {summary}, dropped {_counts(dropped)}")
    if not pairs:
        raise UserError(f"{path}: no usable pair left: {summary}, dropped {_counts(dropped)}")
    return pairs


def _detect_format(path) -> str:
    for row in _rows(path):  # the first row decides
        keys = set(row.data)
        if {"response_1", "response_2"} <= keys:
            return "helpsteer2-preference"
        if {"input", "output_1", "output_2", "label"} <= keys:
            return "llmbar"
        if {"chosen", "rejected"} <= keys:
            if "prompt" in keys:
                return "rewardbench" if "subset" in keys else "trl"
            return "hh" if isinstance(row.data["chosen"], str) else "trl"
        raise UserError(f"{path} line {row.line}: cannot tell the format from the fields "
                        f"{sorted(keys)[:8]}; pass --format with one of {', '.join(FORMATS)}")
    raise UserError(f"{path} holds no rows; give a file of preference pairs")


def _answer(row: _Row, field) -> tuple[list[dict], str]:
    """(earlier turns, final answer) of a chosen/rejected field: a string or a conversation."""
    if isinstance(row.get(field), str):
        return [], row.text(field)
    messages = row.messages(field)
    if not messages or messages[-1]["role"] != "assistant":
        raise row.error(field, "must end with an assistant message")
    return messages[:-1], row.text(f"{field}[-1].content", value=messages[-1]["content"])


def _generic(row: _Row, i, subset=None) -> tuple[Pair | None, str | None]:
    (context, chosen), (other, rejected) = _answer(row, "chosen"), _answer(row, "rejected")
    if context != other:
        raise row.error("rejected", "does not share the earlier turns of 'chosen'",
                        "chosen and rejected may differ in their last assistant message only")
    prompt = (row.messages("prompt") if "prompt" in row.data else []) + context
    if not prompt:
        raise row.error("prompt", "is missing")
    row.check_conversation("prompt", prompt, chosen)
    strength = 1
    for field in ("preference_strength", "margin"):
        if row.data.get(field) is not None:
            strength = abs(row.int_in(field, -3, 3))
            if strength == 0:
                return None, f"{field} 0"
            break
    subset = subset or (row.text("subset") if row.data.get("subset") is not None else None)
    return Pair(prompt, chosen, rejected, strength, row.id(), subset), None


def _rewardbench(row: _Row, i):
    return _generic(row, i, subset=row.text("subset"))


def _hh(row: _Row, i) -> tuple[Pair | None, str | None]:
    (prompt, chosen), (other, rejected) = _hh_split(row, "chosen"), _hh_split(row, "rejected")
    if prompt != other:
        return None, "prompts differ"
    if not chosen or not rejected:
        return None, "empty answer"
    return Pair(prompt, chosen, rejected, 1, row.id()), None


def _hh_split(row: _Row, field) -> tuple[list[dict], str]:
    """An HH transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." -> (prompt, last assistant turn)."""
    pieces = re.split(r"\n\n(Human|Assistant):", row.text(field))
    if pieces[0].strip() or len(pieces) < 3:
        raise row.error(field, "must be a transcript starting with '\\n\\nHuman:'")
    messages = []
    for who, content in zip(pieces[1::2], pieces[2::2]):
        role = "user" if who == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:  # two turns of one speaker: join them
            messages[-1]["content"] += "\n\n" + content.strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    if messages[0]["role"] != "user" or messages[-1]["role"] != "assistant":
        raise row.error(field, "must go from a '\\n\\nHuman:' turn to an '\\n\\nAssistant:' one")
    return messages[:-1], messages[-1]["content"]


def _llmbar(row: _Row, i) -> tuple[Pair, None]:
    prompt = [{"role": "user", "content": row.text("input", empty_ok=True)}]
    outputs = row.text("output_1"), row.text("output_2")
    label = row.int_in("label", 1, 2)  # names the better output
    stem = row.path.name.split(".")[0]
    subset = LLMBAR_SUBSETS.get(stem, f"llmbar-{stem}")
    return Pair(prompt, outputs[label - 1], outputs[2 - label], 1, f"{subset}-{i}", subset), None


def _choice(name, value, allowed):
    if value not in allowed:
        raise UserError(f"{name} {value!r} is unknown; choose one of "
                        f"{', '.join(str(a) for a in allowed)}")


def _counts(counter: Counter) -> str:
    if not counter:
        return "none"
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(counter.items()))
    return f"{sum(counter.values())} ({reasons})"


# ---- tokenization and batching ----

def _encode(tokenizer, prompt, response, max_length, truncate) -> tuple[Encoded | None, bool]:
    """(Encoded or None if dropped, whether the prompt was cut)."""
    enc = tokenizer.encode_chat(prompt + [{"role": "assistant", "content": response}])
    ids, start = enc.ids, enc.assistant_start
    if len(ids) <= max_length:
        return Encoded(ids, start), False
    cut = len(ids) - max_length
    if truncate is None or cut > start - 1:  # the first token (BOS) and the response stay whole
        return None, False
    return Encoded(ids[:1] + ids[1 + cut:], start - cut), True


def _check_encoding(max_length, truncate):
    if not isinstance(max_length, int) or max_length < 2:
        raise UserError(f"max_length must be an int >= 2, got {max_length!r}")
    _choice("truncate", truncate, TRUNCATIONS + (None,))


def _report_encoding(report, what, n, kept, cut, max_length, truncate, truncatable=True):
    line = f"encoded {n} {what} at max_length {max_length}: kept {kept}"
    if truncate:
        line += (f" ({cut} with the prompt cut from the left), dropped {n - kept} whose "
                 f"response alone is too long")
    else:
        line += f", dropped {n - kept} longer than that"
    report(line)
    if n and not kept:
        fix = "" if truncate or not truncatable else " or pass --truncate prompt-left"
        raise UserError(f"all {n} {what} are longer than max_length {max_length}; "
                        f"raise --max-length{fix}")


def encode_rated(rows, tokenizer, max_length, truncate=None, report=print,
                 truncatable=True) -> tuple[list[Encoded], list[list[float]]]:
    """Tokenize ratings rows; returns the kept sequences and their labels. `truncatable`:
    whether the command offers --truncate, which an error then suggests."""
    _check_encoding(max_length, truncate)
    seqs, labels, cut = [], [], 0
    for row in rows:
        enc, was_cut = _encode(tokenizer, row.prompt, row.response, max_length, truncate)
        if enc is not None:
            seqs.append(enc)
            labels.append(list(row.labels))
            cut += was_cut
    _report_encoding(report, "rows", len(rows), len(seqs), cut, max_length, truncate,
                     truncatable)
    return seqs, labels


def encode_pairs(pairs, tokenizer, max_length, truncate=None,
                 report=print) -> list[tuple[Encoded, Encoded, int]]:
    """Tokenize pairs into (chosen, rejected, strength); a pair is kept or dropped whole."""
    _check_encoding(max_length, truncate)
    out, cut = [], 0
    for p in pairs:
        chosen, cut_c = _encode(tokenizer, p.prompt, p.chosen, max_length, truncate)
        rejected, cut_r = _encode(tokenizer, p.prompt, p.rejected, max_length, truncate)
        if chosen is not None and rejected is not None:
            out.append((chosen, rejected, p.strength))
            cut += cut_c or cut_r
    _report_encoding(report, "pairs", len(pairs), len(out), cut, max_length, truncate)
    return out


def collate(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens (B, T) long and the mask of real tokens (B, T) bool."""
    if not seqs:
        raise ValueError("collate needs at least one sequence")
    tokens = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return tokens, mask


# A layout of a micro-batch with one more pass through the model (a batch of similar lengths,
# a shared prompt) is taken only when it saves at least this fraction of the padded positions:
# each pass has its own fixed costs (weight-gradient products, small-operation overhead).
MIN_GAIN = 0.1


def length_groups(lengths: list[int], max_groups=3, min_gain=MIN_GAIN) -> list[list[int]]:
    """Rows split into at most `max_groups` batches of similar length, each padded only to its
    own longest row: index lists, shortest rows first. The split is the one with the fewest
    padded positions (dynamic programming over the rows sorted by length); each batch more is
    taken only when it saves at least `min_gain` of the positions of the best split with one
    batch fewer."""
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    L = [lengths[i] for i in order]
    n, inf = len(L), float("inf")
    # cost[g][i]: fewest positions for the i shortest rows in g batches; start[g][i]: where
    # the last of those batches begins (its rows i' in [start, i) are padded to L[i - 1]).
    cost = [[0] + [inf] * n] + [[inf] * (n + 1) for _ in range(max_groups)]
    start = [[0] * (n + 1) for _ in range(max_groups + 1)]
    for g in range(1, max_groups + 1):
        for i in range(1, n + 1):
            for j in range(g - 1, i):
                c = cost[g - 1][j] + (i - j) * L[i - 1]
                if c < cost[g][i]:
                    cost[g][i], start[g][i] = c, j
    g = 1
    while g < min(max_groups, n) and cost[g + 1][n] <= (1 - min_gain) * cost[g][n]:
        g += 1
    groups, i = [], n
    for k in range(g, 0, -1):
        groups.append(order[start[k][i]:i])
        i = start[k][i]
    return groups[::-1]


def padded_positions(lengths: list[int], groups: list[list[int]]) -> int:
    """Positions computed when each index list of `groups` is one batch padded to its longest
    row: what the batch layouts compare."""
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def in_input_order(parts, groups):
    """Row outputs computed batch by batch (`parts`, one tensor per index list of `groups`),
    concatenated and put back in the order of the rows' indices."""
    if len(parts) == 1 and groups[0] == list(range(len(groups[0]))):
        return parts[0]
    n = sum(map(len, groups))
    where = torch.empty(n, dtype=torch.long)
    where[[i for g in groups for i in g]] = torch.arange(n)
    return torch.cat(parts)[where.to(parts[0].device)]


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share (their prompt, unless truncation cut the two
    differently), keeping at least one token of each out of it: the reward is read at the last
    token, which must follow."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return min(n, len(a) - 1, len(b) - 1)


def common_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens all of `seqs` share (`shared_prefix`, which keeps a token of
    each out of it); 0 for a single sequence, which has nothing to share."""
    return min((shared_prefix(seqs[0], other) for other in seqs[1:]), default=0)


def collate_shared(seqs: list[list[int]], rows: list[int], pad_id: int):
    """Sequences of which those with the same entry of `rows` continue one prompt (a pair's
    chosen and rejected answers, a REINFORCE prompt's k samples), as a batch whose prompts
    are computed once (`Transformer.reward(tokens, mask, prompts)`): the continuations after
    their group's common prefix (N, Lt), in input order, right-padded, with their mask, and
    `prompts` = (the prefixes (G, Lp) left-padded, their mask, `rows` as a tensor). Groups
    are numbered 0..G-1; a group whose sequences share nothing, or of one sequence, gets an
    empty, fully padded prefix."""
    if not all(seqs):
        raise ValueError("collate_shared needs a token in every sequence")
    members = {}
    for seq, r in zip(seqs, rows):
        members.setdefault(r, []).append(seq)
    if sorted(members) != list(range(len(members))):
        raise ValueError("collate_shared: rows must number the groups 0, 1, ...")
    cut = [common_prefix(members[r]) for r in range(len(members))]
    tokens, mask = collate([seq[cut[r]:] for seq, r in zip(seqs, rows)], pad_id)
    width = max(cut)
    prefix = torch.full((len(members), width), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros(prefix.shape, dtype=torch.bool)
    for r, n in enumerate(cut):
        if n:
            prefix[r, width - n:] = torch.tensor(members[r][0][:n], dtype=torch.long)
            prefix_mask[r, width - n:] = True
    return tokens, mask, (prefix, prefix_mask, torch.tensor(rows, dtype=torch.long))


def collate_pairs(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """`collate_shared` of preference pairs [(chosen ids, rejected ids)]: the P chosen rows
    first, then the P rejected ones; pair i is group i."""
    if not all(c and r for c, r in pairs):
        raise ValueError("collate_pairs needs a token in every sequence")
    return collate_shared([c for c, _ in pairs] + [r for _, r in pairs],
                          list(range(len(pairs))) * 2, pad_id)


def batches(lengths: list[int], batch_size: int, seed: int, epoch: int, shuffle=True,
            bucket=True) -> list[list[int]]:
    """Index lists of `batch_size` (the last may be smaller), the same for the same (seed, epoch).

    Bucketing: shuffle, sort chunks of 50 batches by length, cut them into batches, shuffle the
    batches; padding then stays small while batch composition stays random.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive int, got {batch_size!r}")
    n = len(lengths)
    if not shuffle:
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if bucket:
        length = np.asarray(lengths)
        chunks = [order[i:i + 50 * batch_size] for i in range(0, n, 50 * batch_size)]
        order = np.concatenate([c[np.argsort(length[c], kind="stable")] for c in chunks] or [order])
    cut = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    full = [b for b in cut if len(b) == batch_size]
    rest = [b for b in cut if len(b) < batch_size]  # at most one: it stays last
    return [full[i] for i in rng.permutation(len(full))] + rest
