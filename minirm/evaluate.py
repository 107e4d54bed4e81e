"""Evaluate a reward model: pairwise accuracy on any preference file, and the RewardBench v1
table (per subset, per section, overall; METHOD.md 6) when the rows carry RewardBench subsets.

    python -m minirm.evaluate --model DIR --data ../shared/data/rewardbench-mini.jsonl \\
        [--json results.json] [--reward token0 | --reward-index 0 | --weights steerlm-b]

A pair is correct iff reward(chosen) > reward(rejected), strictly (a tie is wrong). The file is
read by `minirm.data.load_pairs` (any of its formats, detected from the fields or `--format`).
No row is dropped silently: a conversation longer than `--max-length` (default: the model's
context) has its prompt cut from the left and the count of cut rows is printed; a pair whose
response alone is longer is scored on the end of its response (BOS + the last max_length - 1
tokens, where the reward is read) and counted too.

`--json PATH` writes {"pairs", "accuracy", "subsets", "sections", "overall"} atomically: `pairs`
is the number scored, `accuracy` the fraction correct over them, `subsets` name ->
{"accuracy", "n"} ({} for a file without subsets), `sections` the four RewardBench sections ->
score or null when none of its subsets is present, and `overall` null unless all four are.
Scores are fractions in [0, 1]; the printed table shows percent.
"""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass

from minirm.cliargs import opt
from minirm.data import FORMATS
from minirm.errors import UserError, cli
from minirm.rewardbench import format_table, is_correct, score_table
from minirm.runs import check_not_input
from minirm.score import ReadSettings, load_reader, write_atomic


@dataclass
class EvaluateSettings(ReadSettings):
    data: str = opt(None, "preference or RewardBench file to evaluate on")
    format: str = opt(None, "format of --data, unset: detected from the fields",
                      choices=FORMATS)
    split: str = opt(None, "split of a HelpSteer2-Preference file", choices=("train", "val"))
    json: str = opt(None, "also write the results to this JSON file")


def evaluate(reader, pairs, report=print, progress=False) -> dict:
    """Score `pairs` with a RewardReader; returns the results dict (see the module docstring)."""
    encoded = reader.encode(pairs, report)
    chosen, rejected = reader.pair_rewards(encoded, progress)
    correct = is_correct(chosen, rejected).tolist()  # METHOD.md 6: strictly greater
    by_subset = {}
    for pair, ok in zip(pairs, correct):
        if pair.subset is not None:
            by_subset.setdefault(pair.subset, []).append(ok)
    return {"pairs": len(correct), "accuracy": sum(correct) / len(correct),
            **score_table(by_subset)}


def format_results(result: dict) -> str:
    lines = []
    if result["subsets"]:
        lines += [format_table(result), ""]
    lines.append(f"pairwise accuracy: {100 * result['accuracy']:.1f}% over "
                 f"{result['pairs']} pairs")
    return "\n".join(lines)


def evaluate_folder(model, data, format=None, split=None, report=lambda *_: None,
                    **settings) -> dict:
    """Evaluate the reward model folder `model` on the file `data` in-process (for recipes)."""
    from minirm.data import load_pairs

    reader = load_reader(ReadSettings(model=str(model), **settings))
    pairs = load_pairs(data, format=format, split=split, report=report)
    return evaluate(reader, pairs, report)


@cli
def main(argv=None):
    from minirm.cliargs import parse
    from minirm.data import load_pairs

    s = parse(EvaluateSettings, argv, "python -m minirm.evaluate",
              "Pairwise accuracy and the RewardBench v1 table of a reward model.")
    if s.model is None or s.data is None:
        raise UserError("--model and --data are required: python -m minirm.evaluate "
                        "--model DIR --data FILE")
    check_not_input(s.json, "--json", {"--data": s.data})  # the results must not replace it
    from minirm.distributed import env_rank
    if env_rank() != 0:  # under torchrun --tp, rank 0 alone prints and writes
        sys.stdout, s.json = open(os.devnull, "w"), None
    print("evaluate: " + json.dumps({k: v for k, v in asdict(s).items() if v is not None}))
    pairs = load_pairs(s.data, format=s.format, split=s.split)  # a bad file fails fast
    reader = load_reader(s)
    device = next(reader.model.parameters()).device
    print(f"model {s.model} on {device}: reward = {reader.what}, max_length "
          f"{reader.max_length}")
    t0 = time.perf_counter()
    result = evaluate(reader, pairs, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - t0
    print(f"scored {result['pairs']} pairs in {seconds:.1f} s")
    print(format_results(result))
    if s.json:
        write_atomic(s.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {s.json}")
    return result


if __name__ == "__main__":
    main()
