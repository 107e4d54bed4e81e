"""ToySteer: a synthetic data set in exactly the HelpSteer2 and HelpSteer2-Preference schemas.

HelpSteer2 cannot be downloaded here (METHOD.md 1). ToySteer stands in for it so the whole
pipeline (loaders, the paper's post-processing, regression, Bradley-Terry, ExPO, RLHF) runs end to
end on a tiny byte-level model trained from scratch on a CPU in minutes. The files have the real
names and fields, so the same loaders read them:
    out_dir/train.jsonl.gz, out_dir/validation.jsonl.gz     ratings, two responses per prompt
    out_dir/preference/preference.jsonl.gz                  one pair per prompt, split train/val

Tasks (short, so a sequence stays under about 80 bytes): "Copy: kfqz", "Uppercase: kfqz",
"Reverse: kfqz", "Sort: 3 1 4 2", "Add: 12+7". Each response is the expected answer (55%), or
  - wrong (45%): one or two characters changed (12%), the answer to a neighbouring task (8%:
    the input unchanged, "zqfk" for Copy, "127" for 12+7), or wrong at a glance: random digits
    where letters are due and letters where digits are (15%), or "unknown" (10%);
and independently of that
  - garbled (45%): 1-2 junk bytes ("#$%...") inserted (mild), or one repeated 4-6 times (heavy);
  - padded (65%): "The answer is X.", "Sure! The answer is X.", or that plus " Hope this helps!".

True attributes are computed from the text of a response alone (`attributes`), so `true_score`
can judge any text a policy writes, not only what `generate` made:
  coherence   = 4 - number of junk bytes (bytes other than letters, digits, space, ".", "!"), >= 0
  correctness = 4 * (1 - edit distance / answer length) on what is left once junk and padding are
                removed, >= 0 (so "8" for 3+4 is wrong entirely, "18" for 12+7 half wrong)
  verbosity   = 1 + number of padding pieces ("Sure! ", "The answer is ", " Hope this helps!")
  complexity  = the task's difficulty (copy 0, upper 1, reverse and sort 2, add 3), +1 for a long
                input; the same for both responses of a prompt
  helpfulness = 0.6 correctness + 0.4 coherence - 0.5 max(0, verbosity - 2), within 0..4:
                right beats wrong, clean beats garbled, padding costs a little
`true_score` = helpfulness / 4.

What makes the data learnable in minutes: junk, padding and answers of the wrong kind of character
are visible without comparing the answer with the input, and they decide most preferences. A typo
in a reversal or a wrong sum is not, and decides few (its small helpfulness gap is also where the
simulated annotators disagree most, as in the real data).

Annotators, as HelpSteer2's (3 to 5 of them per row or pair):
- ratings: each reports round(true attribute) plus noise in {-1, 0, +1}, clipped to 0..4; the
  file holds the mean rounded half up.
- preferences: each gives round(0.9 (h2 - h1) + N(0, 0.6)) clipped to -3..3, negative when
  response_1 is better; one in 12 is careless (uniform -3..3); when both responses are bad
  (helpfulness < 1.5) an annotator says -100 ("neither is valid") with probability 0.4.
  `three_most_similar_preferences` are the three annotations of least spread;
  `preference_strength` is their mean without -100s, rounded half away from zero (0 if none).
The post-processing then drops pairs of equal quality (mean rounds to 0), careless
disagreements (spread > 2) and all -100, as on the real file.

Defaults, measured (seed 0): 3,000 train and 250 val prompts, written in under a second. The
post-processing keeps 2,213 train pairs (drops 655 that round to 0, 102 of spread > 2, 30 all
-100) and 180 val pairs (drops 55, 10, 5). On those val pairs a perfect judge of true helpfulness
scores 0.97, one that sees only junk and padding 0.74, one that also sees answers of the wrong
kind and "unknown" 0.90. The "toy" model trained from scratch for 300 steps of 32 (AdamW, lr 1e-3,
10 warm-up steps) reached 0.85-0.88 with Bradley-Terry (seeds 0 and 1 of the data) and 0.83-0.84
with 5-attribute regression (helpfulness output; seed 0).

Simplifications: single-turn prompts only; the statements and elaborations are short templates.

    python -m minirm.toysteer data/toysteer --seed 0
"""

import gzip
import itertools
import json
import math
import random
from pathlib import Path

from minirm.data import NEITHER_VALID, preference_from_annotations
from minirm.errors import ArgumentParser, UserError, cli

N_PROMPTS, N_VAL_PROMPTS = 3000, 250  # the default size: one pair and two ratings rows each
TASKS = {"Copy": 0, "Uppercase": 1, "Reverse": 2, "Sort": 2, "Add": 3}  # task -> complexity
LETTERS = "abcdefghijklmnopqrstuvwxyz"
JUNK = "#$%&*@^~|"
ALLOWED = set(LETTERS + LETTERS.upper() + "0123456789 .!")  # anything else is junk
SURE, ANSWER_IS, HOPE = "Sure! ", "The answer is ", " Hope this helps!"
BETTER = {1: "slightly better than", 2: "better than", 3: "much better than"}


# ---- tasks and the judge ----

def _make_prompt(rng: random.Random) -> str:
    task = rng.choice(list(TASKS))
    if task == "Sort":
        return "Sort: " + " ".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
    if task == "Add":
        return f"Add: {rng.randint(1, 99)}+{rng.randint(1, 99)}"
    return f"{task}: " + "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))


def _parse(prompt: str) -> tuple[str, str, str]:
    """(task, input, expected answer) of a ToySteer prompt."""
    task, _, arg = prompt.partition(": ")
    try:
        if task == "Add":
            a, b = arg.split("+")
            return task, arg, str(int(a) + int(b))
        if arg.strip():
            return task, arg, {"Copy": arg, "Uppercase": arg.upper(), "Reverse": arg[::-1],
                               "Sort": " ".join(sorted(arg.split()))}[task]
    except (KeyError, ValueError):
        pass
    raise UserError(f"{prompt[:60]!r} is not a ToySteer prompt ({', '.join(TASKS)}: ...)")


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def attributes(prompt: str, response: str) -> dict[str, float]:
    """The true HelpSteer2 attributes (0..4, not rounded) of a response; see the docstring."""
    task, arg, expected = _parse(prompt)
    text = "".join(c for c in response if c in ALLOWED)
    coherence = max(0, 4 - (len(response) - len(text)))
    text, verbosity = text.strip(), 1
    for piece in (SURE, ANSWER_IS):
        if text.startswith(piece):
            text, verbosity = text[len(piece):], verbosity + 1
    if text.endswith(HOPE):
        text, verbosity = text[:-len(HOPE)], verbosity + 1
    text = text.removesuffix(".").strip()
    correctness = 4 * max(0.0, 1 - _edit_distance(text, expected) / len(expected))
    long_input = len(arg.replace(" ", "")) >= 6 or (task == "Add" and len(expected) >= 3)
    return {"helpfulness": min(4.0, max(0.0, 0.6 * correctness + 0.4 * coherence
                                        - 0.5 * max(0, verbosity - 2))),
            "correctness": correctness, "coherence": float(coherence),
            "complexity": float(min(4, TASKS[task] + long_input)), "verbosity": float(verbosity)}


def true_score(prompt_text: str, response_text: str) -> float:
    """The real quality of a response in [0, 1]: its true helpfulness / 4."""
    return attributes(prompt_text, response_text)["helpfulness"] / 4


def sample_prompts(n: int, seed: int) -> list[str]:
    """n ToySteer prompts (user messages), e.g. for RLHF rollouts."""
    rng = random.Random(f"toysteer-prompts-{seed}")
    return [_make_prompt(rng) for _ in range(n)]


# ---- responses ----

def _respond(rng: random.Random, prompt: str) -> str:
    task, arg, answer = _parse(prompt)
    kind = rng.choices(["exact", "one", "two", "task", "random", "unsure"],
                       [55, 8, 4, 8, 15, 10])[0]
    if kind in ("one", "two"):
        answer = _typos(rng, answer, 1 if kind == "one" else 2)
    elif kind == "task":  # a neighbouring task's answer: Copy reverses, Add concatenates
        answer = arg[::-1] if task == "Copy" else arg.replace("+", "") if task == "Add" else arg
    elif kind == "random":  # digits for letters and letters for digits: wrong at a glance
        other = LETTERS if answer[0].isdigit() else "0123456789"
        answer = "".join(c if c == " " else rng.choice(other) for c in answer)
    elif kind == "unsure":
        answer = "unknown"
    style = rng.choices(range(4), [35, 25, 15, 25])[0]
    text = [answer, f"{ANSWER_IS}{answer}.", f"{SURE}{ANSWER_IS}{answer}.",
            f"{SURE}{ANSWER_IS}{answer}.{HOPE}"][style]
    garble = rng.choices(["clean", "mild", "heavy"], [55, 25, 20])[0]
    if garble == "heavy":  # one junk byte repeated, as a stuck generator would
        pos = rng.randint(0, len(text))
        text = text[:pos] + rng.choice(JUNK) * rng.randint(4, 6) + text[pos:]
    for _ in range(rng.randint(1, 2) if garble == "mild" else 0):
        pos = rng.randint(0, len(text))
        text = text[:pos] + rng.choice(JUNK) + text[pos:]
    return text


def _alphabet(c: str) -> str:
    return "0123456789" if c.isdigit() else LETTERS.upper() if c.isupper() else LETTERS


def _typos(rng: random.Random, answer: str, n: int) -> str:
    chars = list(answer)
    where = [i for i, c in enumerate(chars) if c != " "]
    for i in rng.sample(where, min(n, len(where))):
        chars[i] = rng.choice(_alphabet(chars[i]).replace(chars[i], ""))
    return "".join(chars)


# ---- annotators ----

def _rate(rng: random.Random, true: dict[str, float]) -> dict[str, int]:
    """HelpSteer2-style ratings: the rounded mean of 3-5 noisy annotators."""
    out = {}
    for name, value in true.items():
        votes = []
        for _ in range(rng.randint(3, 5)):
            u = rng.random()  # noise -1, 0, +1 with probabilities 0.2, 0.6, 0.2
            votes.append(min(4, max(0, math.floor(value + 0.5) + (u > 0.8) - (u < 0.2))))
        out[name] = math.floor(sum(votes) / len(votes) + 0.5)
    return out


def _prefer(rng: random.Random, h1: float, h2: float) -> list[int]:
    """Raw strengths of 3-5 annotators; negative = response_1 better, -100 = neither is valid."""
    votes = []
    for _ in range(rng.randint(3, 5)):
        if max(h1, h2) < 1.5 and rng.random() < 0.4:
            votes.append(NEITHER_VALID)
        elif rng.random() < 1 / 12:  # careless
            votes.append(rng.randint(-3, 3))
        else:
            votes.append(min(3, max(-3, round(0.9 * (h2 - h1) + rng.gauss(0, 0.6)))))
    return votes


def _most_similar(votes: list[int]) -> list[int]:
    """The three annotations of least spread (max - min); the first such three on ties."""
    return list(min(itertools.combinations(votes, 3), key=lambda c: max(c) - min(c)))


def _statement(s: int) -> str:
    if s == NEITHER_VALID:
        return "Neither response is valid."
    if s == 0:
        return "@Response 1 and @Response 2 are about the same."
    a, b = (1, 2) if s < 0 else (2, 1)
    return f"@Response {a} is {BETTER[abs(s)]} @Response {b}."


def _preference_row(rng, split, prompt, r1, r2, h1, h2) -> dict:
    votes = _prefer(rng, h1, h2)
    similar = _most_similar(votes)
    strength = preference_from_annotations(similar, "half-away")[0]
    why = "Judged on correctness, coherence and length."
    return {"split": split, "prompt": prompt, "response_1": r1, "response_2": r2,
            "preference_strength": strength, "preference_statement": _statement(strength),
            "preference_elaboration": why,
            "three_most_similar_preferences": [
                {"statement": _statement(s), "elaboration": why, "strength": s} for s in similar],
            "all_preferences_unprocessed": [
                {"strength": s, "justification": f"{_statement(s)} {why}"} for s in votes]}


# ---- files ----

def _write_jsonl_gz(path: Path, rows: list[dict]):
    """Byte-identical for identical rows: no file name or time stamp in the gzip header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        gz.write(data)


def generate(out_dir, seed: int = 0, n_prompts: int = N_PROMPTS,
             n_val_prompts: int = N_VAL_PROMPTS) -> list[Path]:
    """Write ToySteer's three files into out_dir; the same seed gives the same bytes."""
    if n_prompts < 1 or n_val_prompts < 1:
        raise UserError(f"ToySteer needs at least one train and one val prompt, got "
                        f"{n_prompts} and {n_val_prompts}")
    out_dir, preference, paths = Path(out_dir), [], []
    for split, n, file in (("train", n_prompts, "train.jsonl.gz"),
                           ("val", n_val_prompts, "validation.jsonl.gz")):
        rng, ratings = random.Random(f"toysteer-{seed}-{split}"), []
        for _ in range(n):
            prompt = _make_prompt(rng)
            responses = [_respond(rng, prompt), _respond(rng, prompt)]
            true = [attributes(prompt, r) for r in responses]
            for r, t in zip(responses, true):  # consecutive rows share the prompt, as HelpSteer2
                ratings.append({"prompt": prompt, "response": r, **_rate(rng, t)})
            preference.append(_preference_row(rng, split, prompt, *responses,
                                              *(t["helpfulness"] for t in true)))
        paths.append(out_dir / file)
        _write_jsonl_gz(paths[-1], ratings)
    paths.append(out_dir / "preference" / "preference.jsonl.gz")
    _write_jsonl_gz(paths[-1], preference)
    return paths


@cli
def main(argv=None):
    parser = ArgumentParser(prog="python -m minirm.toysteer", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-prompts", type=int, default=N_PROMPTS)
    parser.add_argument("--n-val-prompts", type=int, default=N_VAL_PROMPTS)
    args = parser.parse_args(argv)
    for path in generate(args.out_dir, args.seed, args.n_prompts, args.n_val_prompts):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
