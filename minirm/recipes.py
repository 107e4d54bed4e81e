"""The paper's multi-stage recipes on top of `train_stage`.

- `helpsteer2-preference` (METHOD.md section 4, the paper's best model): helpfulness-only
  regression, then Scaled BT initialised from it (head included), then ExPO extrapolating from
  the regression model past the BT model, with the factor picked on validation pairs.
- `paper-table` (METHOD.md section 5): every variant of the paper's comparison trained on the
  same data for each seed, printed in the paper's layout with mean and spread over seeds.

Without `--data`, ToySteer is generated under OUT/data (a new folder per seed in paper-table).
"""

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

from minirm.errors import UserError

# The rows of the paper's table (METHOD.md section 5): (label, objective, initialised from).
PAPER_ROWS = [
    ("regression, 5 attributes", "regression", None),
    ("regression, helpfulness only", "helpfulness", None),
    ("BT from scratch, regular", "bt", None),
    ("BT from scratch, margin", "margin-bt", None),
    ("BT from scratch, scaled", "scaled-bt", None),
    ("BT from regression, regular", "bt", "helpfulness"),
    ("BT from regression, margin", "margin-bt", "helpfulness"),
    ("BT from regression, scaled", "scaled-bt", "helpfulness"),
    ("scaled + ExPO", "expo", None),
]


def parse_floats(text, flag):
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError(f"--{flag} is empty")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"--{flag} must be finite numbers, got {text!r}")
    return values


def parse_seeds(text):
    seeds = parse_floats(text, "seeds")
    if not all(v.is_integer() and v >= 0 for v in seeds):
        raise UserError(f"--seeds must be comma-separated non-negative integers, got {text!r}")
    return [int(v) for v in seeds]


def ensure_data(s, out: Path, seed: int, report):
    """The data folder: --data, or ToySteer generated (once) under OUT/data."""
    if s.data is not None:
        return Path(s.data)
    from minirm import toysteer
    folder = out / "data"
    if not (folder / "preference").exists():
        toysteer.generate(folder, seed=seed, n_prompts=s.toy_prompts)
        report(f"generated ToySteer (seed {seed}) in {folder}")
    return folder


def expo_stage(s, weak, strong, out: Path, grid, report, model_dir=None):
    """ExPO (METHOD.md section 4, step 3): pick alpha on validation pairs, save the model."""
    model_dir = Path(model_dir or out / "model")
    from minirm import data as D
    from minirm.checkpoint import save_model
    from minirm.expo import sweep
    from minirm.train import _write_json, data_paths

    alphas = parse_floats(s.expo_alphas, "expo-alphas")
    val_pairs = None
    if s.val is not None:
        val_pairs = D.load_pairs(s.val, format=s.format, report=lambda *_: None)
    elif s.data is None or Path(s.data).is_dir():
        prefs = data_paths(ensure_data(s, out.parent, s.seed, report))[2]
        if prefs is not None:
            val_pairs = D.load_helpsteer2_preference(prefs, split="val", rounding=s.rounding,
                                                     report=lambda *_: None)
    if not val_pairs:
        raise UserError("ExPO needs validation pairs to pick its factor: pass --val FILE")
    tok = strong.tokenizer
    max_len = s.max_length or min(4096, strong.model.cfg.max_seq_len)
    val = D.encode_pairs(val_pairs, tok, max_len, "prompt-left", report=lambda *_: None)
    best_alpha, table, model = sweep(weak.model, strong.model, alphas, val, tok.pad_id)
    for a, acc in table.items():
        report(f"[expo] alpha {a:g}: validation accuracy {acc:.4f}")
    acc = table[best_alpha]
    if grid is None or grid.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_model(model, model_dir, tok)
        _write_json(out / "results.json", {"val_accuracy": acc, "alpha": best_alpha,
                                           "sweep": {str(k): v for k, v in table.items()}})
    report(f"[expo] best alpha {best_alpha:g}: validation accuracy {acc:.4f}, model in "
           f"{model_dir}")
    return best_alpha, acc, model


def helpsteer2_preference(s, out: Path, grid, report):
    from minirm.train import _write_json, train_stage

    data = ensure_data(s, out, s.seed, report)
    stage1 = train_stage(s, "helpfulness", out / "1-helpfulness", data, s.init_from, grid,
                         name="1-helpfulness", report=report, run_out=out)
    stage2 = train_stage(s, "scaled-bt", out / "2-scaled-bt", data, stage1.out / "model", grid,
                         name="2-scaled-bt", report=report, run_out=out)
    alpha, acc, final = expo_stage(s, stage1, stage2, out / "3-expo", grid, report,
                                   model_dir=out / "model")
    stages = {"helpfulness": {"val_accuracy": stage1.val_accuracy},
              "scaled-bt": {"val_accuracy": stage2.val_accuracy},
              "expo": {"val_accuracy": acc, "alpha": alpha}}
    results = {"stages": stages, "val_accuracy": acc, "model": str(out / "model")}
    if grid is None or grid.is_main:
        _write_json(out / "results.json", results)
        report("\n" + format_stage_table(stages))
        report(f"final model (ExPO, alpha {alpha:g}): {out / 'model'}; "
               f"validation accuracy {acc:.4f}")
    return results


def format_stage_table(stages):
    lines = ["| stage | validation accuracy |", "|---|---|"]
    for name, r in stages.items():
        acc = r["val_accuracy"]
        lines.append(f"| {name} | {'n/a' if acc is None else f'{acc:.4f}'} |")
    return "\n".join(lines)


def paper_table(s, out: Path, grid, report):
    from minirm.train import _write_json, train_stage

    seeds = parse_seeds(s.seeds)
    results = {label: [] for label, _, _ in PAPER_ROWS}
    rewardbench = {label: [] for label, _, _ in PAPER_ROWS}
    for seed in seeds:
        run = out / f"seed{seed}"
        ss = replace(s, seed=seed)
        data = ensure_data(ss, run, seed, report)
        trained = {}
        for label, objective, init in PAPER_ROWS:
            key = f"{objective}" + (f"-from-{init}" if init else "")
            if objective == "expo":
                _, acc, model = expo_stage(ss, trained["helpfulness"],
                                           trained["scaled-bt-from-helpfulness"],
                                           run / "expo", grid, report)
                folder = run / "expo" / "model"
            else:
                init_from = trained[init].out / "model" if init else None
                stage = train_stage(ss, objective, run / key, data, init_from, grid,
                                    name=f"seed{seed}/{key}", report=report, run_out=out)
                trained[key] = stage
                acc, folder = stage.val_accuracy, stage.out / "model"
            results[label].append(acc)
            if s.rewardbench:
                rewardbench[label].append(score_rewardbench(folder, s.rewardbench))
    table = {"seeds": seeds, "rows": {}}
    for label, _, _ in PAPER_ROWS:
        table["rows"][label] = {"val_accuracy": results[label],
                                "rewardbench": rewardbench[label] or None}
    if grid is None or grid.is_main:
        _write_json(out / "results.json", table)
        report("\n" + format_paper_table(table))
    return table


def score_rewardbench(folder, path):
    from minirm.evaluate import evaluate_folder
    return evaluate_folder(folder, path)


def mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def format_paper_table(table):
    """The paper's layout (METHOD.md section 5), in percent, mean ± std over seeds."""
    sections = ("overall", "Chat", "Chat Hard", "Safety", "Reasoning")
    has_rb = any(r["rewardbench"] for r in table["rows"].values())
    head = "| variant | val accuracy |" + (
        "".join(f" RB {s} |" for s in sections) if has_rb else "")
    lines = [f"seeds: {table['seeds']}", head, "|---" * (head.count("|") - 1) + "|"]
    for label, r in table["rows"].items():
        row = f"| {label} | {mean_spread(r['val_accuracy'])} |"
        if has_rb:
            for sec in sections:
                vals = [(rb["overall"] if sec == "overall" else rb["sections"].get(sec))
                        for rb in (r["rewardbench"] or [])]
                row += f" {mean_spread(vals)} |"
        lines.append(row)
    return "\n".join(lines)


def run_recipe(s, out: Path, grid, report):
    parse_floats(s.expo_alphas, "expo-alphas")  # fail now, not after hours of training
    if s.recipe == "paper-table":
        parse_seeds(s.seeds)
    out.mkdir(parents=True, exist_ok=True)
    if s.recipe == "helpsteer2-preference":
        return helpsteer2_preference(s, out, grid, report)
    if s.recipe == "paper-table":
        return paper_table(s, out, grid, report)
    raise UserError(f"unknown --recipe {s.recipe!r}")


def load_results(out: Path):
    return json.loads((out / "results.json").read_text())
