"""ExPO: model extrapolation from a weak model past a strong one (METHOD.md 4, step 3).

    θ = θ_s + α (θ_s − θ_w)

with θ_w the weak model (stage 1, helpfulness regression) and θ_s the strong one (stage 2, Scaled
BT initialised from stage 1). Every tensor is extrapolated, the reward head included; α = 0 gives
back the strong model. The arithmetic is float32 whatever the weights' dtype (θ_s − θ_w of two
close bfloat16 models would mostly round to zero), and the result is cast back to the strong
model's dtype.

Not confirmed (METHOD.md 4): the paper's best factor 1.52 may be α here, or the factor β of
θ_w + β (θ_s − θ_w). The two are the same family: θ_w + β (θ_s − θ_w) = θ_s + (β − 1)(θ_s − θ_w),
so α = β − 1 (β = 1.52 would be α = 0.52). That is why the factor is swept on validation data
(`--alphas`, `sweep`) rather than fixed.

    python -m minirm.expo --weak A --strong B --alpha 1.52 --out C
    python -m minirm.expo --weak A --strong B --alphas 0.5,1,1.52,2 --val VAL --out C

An existing non-empty --out folder is replaced only with --force, and never when it is (or holds)
one of the inputs.
"""

import copy
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch

from minirm.cliargs import opt
from minirm.data import FORMATS
from minirm.errors import UserError, cli
from minirm.rewardbench import is_correct
from minirm.runs import check_out_folder
from minirm.score import (RewardSettings, encode_all, resolve_device, resolve_max_length,
                          reward_reading, stored_dtype)
from minirm.scoring import score_pairs


def check_compatible(weak_state, strong_state):
    """The same tensor names and shapes in both, or a UserError naming the first that differs."""
    for name in sorted(set(weak_state) ^ set(strong_state)):
        which = "weak" if name in weak_state else "strong"
        raise UserError(f"tensor {name!r} is only in the {which} model; ExPO needs two models "
                        "of the same architecture (the strong one trained from the weak one)")
    for name, w in weak_state.items():
        if tuple(w.shape) != tuple(strong_state[name].shape):
            raise UserError(f"tensor {name!r} has shape {tuple(w.shape)} in the weak model but "
                            f"{tuple(strong_state[name].shape)} in the strong one; ExPO needs "
                            "two models of the same architecture")


def extrapolate_tensor(weak, strong, alpha):
    """θ_s + α(θ_s − θ_w) in float32, cast back to the strong tensor's dtype (METHOD.md 4)."""
    s, w = strong.float(), weak.to(strong.device).float()
    return (s + alpha * (s - w)).to(strong.dtype)


def extrapolate(weak_state: dict, strong_state: dict, alpha: float) -> dict:
    """ExPO over every tensor: {name: θ_s + α(θ_s − θ_w)} (METHOD.md 4, step 3)."""
    check_compatible(weak_state, strong_state)
    return {name: extrapolate_tensor(weak_state[name], s, alpha)
            for name, s in strong_state.items()}


@torch.no_grad()
def _load_extrapolated(model, weak_state, strong_state, alpha):
    for name, t in model.state_dict().items():
        t.copy_(extrapolate_tensor(weak_state[name], strong_state[name], alpha))


def pairwise_accuracy(model, encoded_pairs, pad_id, batch_size=16, reward_index=0,
                      weights=None, reward_fn=None, progress=False):
    """Fraction of pairs with reward(chosen) > reward(rejected), strictly (METHOD.md 6)."""
    chosen, rejected = score_pairs(model, encoded_pairs, pad_id, batch_size, weights,
                                   reward_index, progress, reward_fn)
    return is_correct(chosen, rejected).float().mean().item()


def sweep(weak_model, strong_model, alphas, val_encoded_pairs, pad_id, batch_size=16,
          reward_index=0, weights=None, token0=False, progress=False, report=None):
    """Try each α on validation pairs; returns (best α, {α: accuracy}, model with the best α).

    The best is the highest pairwise accuracy; a tie goes to the α listed first. Neither input
    model is changed: the extrapolated weights go into one copy of the strong model.
    `token0` reads rewards as the logit of token 0 (released-style models, METHOD.md 9).
    """
    if not alphas:
        raise UserError("ExPO needs at least one alpha to try")
    if not val_encoded_pairs:
        raise UserError("ExPO needs validation pairs to pick alpha")
    weak_state, strong_state = weak_model.state_dict(), strong_model.state_dict()
    check_compatible(weak_state, strong_state)
    model = copy.deepcopy(strong_model)
    reward_fn = None
    if token0:
        from minirm.released import token0_reward
        reward_fn = token0_reward(model)
    table = {}
    for alpha in alphas:
        _load_extrapolated(model, weak_state, strong_state, alpha)
        table[alpha] = pairwise_accuracy(model, val_encoded_pairs, pad_id, batch_size,
                                         reward_index, weights, reward_fn, progress)
        if report:
            report(f"alpha {alpha:g}: validation accuracy {table[alpha]:.4f}")
    best = max(table, key=lambda a: (table[a], -list(table).index(a)))
    _load_extrapolated(model, weak_state, strong_state, best)
    return best, table, model


def format_sweep(table, best) -> str:
    lines = [f"{'alpha':>8}  {'val accuracy':>12}"]
    for alpha, acc in table.items():
        lines.append(f"{alpha:>8g}  {acc:>12.4f}" + ("  <- best" if alpha == best else ""))
    return "\n".join(lines)


# ---- the command ----

@dataclass
class ExpoSettings(RewardSettings):
    weak: str = opt(None, "weak model folder θ_w (stage 1: helpfulness regression)")
    strong: str = opt(None, "strong model folder θ_s (stage 2: Scaled BT from stage 1)")
    out: str = opt(None, "folder to write θ_s + α(θ_s − θ_w) to")
    alpha: float = opt(None, "the extrapolation factor α")
    alphas: str = opt(None, "comma-separated factors to sweep on --val; the best is written")
    val: str = opt(None, "validation preference file for --alphas")
    format: str = opt(None, "format of --val, unset: detected from the fields", choices=FORMATS)
    split: str = opt(None, "split of a HelpSteer2-Preference --val file, unset: val",
                     choices=("train", "val"))
    force: bool = opt(False, "replace an existing --out folder")


def parse_alphas(text):
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise UserError(f"--alphas {text!r}: expected comma-separated numbers like "
                        "0.5,1,1.52,2") from None
    if not alphas:
        raise UserError("--alphas is empty; give comma-separated numbers like 0.5,1,1.52,2")
    check_alpha(*alphas)
    return alphas


def check_alpha(*alphas):
    for a in alphas:
        if not math.isfinite(a):  # float() reads "nan" and "inf"; either would ruin every weight
            raise UserError(f"alpha {a} is not a finite number; give factors like 0.5 or 1.52")


@cli
def main(argv=None):
    from minirm.checkpoint import load_model, load_tokenizer, save_model
    from minirm.cliargs import parse
    from minirm.data import load_pairs

    s = parse(ExpoSettings, argv, "python -m minirm.expo",
              "ExPO: extrapolate from a weak model past a strong one (METHOD.md 4).")
    if s.weak is None or s.strong is None or s.out is None:
        raise UserError("--weak, --strong and --out are required")
    if (s.alpha is None) == (s.alphas is None):
        raise UserError("pass --alpha A, or --alphas A,B,... with --val FILE to pick the best")
    if s.alphas is not None and s.val is None:
        raise UserError("--alphas needs --val FILE: validation pairs to pick the best alpha")
    alphas = parse_alphas(s.alphas) if s.alphas is not None else None
    if s.alpha is not None:
        check_alpha(s.alpha)
    # Before two models are loaded: never over a file, an input or (without --force) a model.
    check_out_folder(s.out, {"--weak": s.weak, "--strong": s.strong, "--val": s.val}, s.force)
    print("expo: " + json.dumps({k: v for k, v in asdict(s).items() if v is not None}))
    # Read the validation pairs first: a bad file fails before two models are loaded.
    pairs = load_pairs(s.val, format=s.format, split=s.split or "val") if alphas else None
    device = resolve_device(s.device, gpu_default=alphas is not None)  # a GPU only to score
    dtype = s.dtype or stored_dtype(s.strong)
    strong, cfg = load_model(s.strong, dtype=dtype, device=device, attention=s.attention)
    weak, _ = load_model(s.weak, dtype=dtype, device=device, attention=s.attention)
    tokenizer = load_tokenizer(s.strong, chat_format=s.chat_format)
    record = {"weak": s.weak, "strong": s.strong}
    if alphas is None:
        # In place, tensor by tensor (each new tensor depends on its own old value only), so
        # no third copy of the model is held.
        check_compatible(weak.state_dict(), strong.state_dict())
        _load_extrapolated(strong, weak.state_dict(), strong.state_dict(), s.alpha)
        model, record["alpha"] = strong, s.alpha
    else:
        _, index, weights = reward_reading(strong, s.reward, s.reward_index, s.weights,
                                           where=s.strong)
        val = encode_all(pairs, tokenizer, resolve_max_length(s.max_length, cfg))
        best, table, model = sweep(weak, strong, alphas, val, tokenizer.pad_id, s.batch_size,
                                   index, weights, token0=s.reward == "token0",
                                   progress=sys.stderr.isatty())
        print(format_sweep(table, best))
        record.update(alpha=best, val=s.val, sweep={str(a): acc for a, acc in table.items()})
    save_model(model, s.out, tokenizer,
               extra_files={"expo.json": json.dumps(record, indent=2) + "\n"})
    print(f"wrote {s.out}: θ_s + {record['alpha']:g}·(θ_s − θ_w), {dtype}")


if __name__ == "__main__":
    main()
