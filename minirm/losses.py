"""The reward-model losses of the paper (METHOD.md section 3), in float32.

Notation: r = reward, Δ = r(x, y_chosen) - r(x, y_rejected), m = |preference strength| in
{1, 2, 3}, σ = sigmoid. Every batch loss is a plain mean over samples or pairs (the Scaled BT
loss is not divided by Σm). `-log σ(z)` is computed as `softplus(-z)`, which is exact and does
not overflow for large |z|.
"""

import torch
import torch.nn.functional as F

MISSING = -100  # label of an attribute the annotators did not give (METHOD.md 3)


def regression(out, labels):
    """SteerLM regression: mean of (out - label)^2 over present (sample, attribute) entries.

    out, labels: (B, n_attributes); labels are the raw 0..4 ratings, -100 where missing.
    """
    out, labels = out.float(), labels.float()
    present = labels != MISSING
    err = torch.where(present, out - labels, torch.zeros_like(out))
    return (err ** 2).sum() / present.sum().clamp(min=1)


def helpfulness(out, labels):
    """Helpfulness-only regression: mean of (r(x, y) - helpfulness)^2. out (B,) or (B, 1)."""
    return ((out.float().reshape(-1) - labels.float().reshape(-1)) ** 2).mean()


def bradley_terry(delta, strength=None):
    """Bradley-Terry: mean of -log σ(Δ)."""
    return F.softplus(-delta.float()).mean()


def margin_bt(delta, strength):
    """BT with margin: mean of -log σ(Δ - m)."""
    return F.softplus(-(delta.float() - strength.float())).mean()


def scaled_bt(delta, strength):
    """Scaled BT (the paper's): mean of -m · log σ(Δ)."""
    return (strength.float() * F.softplus(-delta.float())).mean()


PAIR_LOSSES = {"bt": bradley_terry, "margin-bt": margin_bt, "scaled-bt": scaled_bt}
RATING_LOSSES = {"regression": regression, "helpfulness": helpfulness}
OBJECTIVES = tuple(RATING_LOSSES) + tuple(PAIR_LOSSES)


def pair_accuracy(delta):
    """Pairwise accuracy: chosen strictly above rejected (ties count as wrong, METHOD.md 6)."""
    return (delta > 0).float().mean()
