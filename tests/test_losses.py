"""The paper's losses (METHOD.md section 3) against numbers computed by hand."""

import math

import pytest
import torch

from minirm import losses

T = torch.tensor


def test_regression_masks_missing_attributes():
    # Present entries: (1-0)^2 = 1, (3-3)^2 = 0, (4-2)^2 = 4; the -100 label is ignored.
    out = T([[1.0, 2.0], [3.0, 4.0]])
    labels = T([[0.0, -100.0], [3.0, 2.0]])
    assert losses.regression(out, labels).item() == pytest.approx(5 / 3)


def test_helpfulness_regression():
    assert losses.helpfulness(T([1.0, 2.0]), T([3.0, 2.0])).item() == pytest.approx(2.0)


def test_bradley_terry():
    # -log σ(0) = log 2 = 0.693147; -log σ(1) = log(1 + e^-1) = 0.313262
    assert losses.bradley_terry(T([0.0, 1.0])).item() == pytest.approx(
        (math.log(2) + math.log(1 + math.exp(-1))) / 2, abs=1e-6)
    assert losses.bradley_terry(T([0.0, 1.0])).item() == pytest.approx(0.503204, abs=1e-6)


def test_margin_bt():
    # -log σ(2 - 1) = 0.313262; -log σ(0 - 2) = log(1 + e^2) = 2.126928
    assert losses.margin_bt(T([2.0, 0.0]), T([1.0, 2.0])).item() == pytest.approx(
        (0.313262 + 2.126928) / 2, abs=1e-6)


def test_scaled_bt_is_not_normalised_by_total_strength():
    # (3 · log 2 + 1 · 0.313262) / 2 pairs, not / (3 + 1)
    assert losses.scaled_bt(T([0.0, 1.0]), T([3.0, 1.0])).item() == pytest.approx(
        (3 * math.log(2) + 0.313262) / 2, abs=1e-6)


def test_losses_are_stable_for_large_margins_and_float32_under_bf16():
    delta = T([-200.0, 200.0], dtype=torch.bfloat16)
    loss = losses.bradley_terry(delta)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(100.0)
    assert torch.isfinite(losses.scaled_bt(delta, T([3.0, 3.0])))


def test_pair_accuracy_counts_ties_as_wrong():
    assert losses.pair_accuracy(T([1.0, 0.0, -1.0, 2.0])).item() == 0.5
