"""RewardBench v1 scoring (METHOD.md 6) against tables computed by hand."""

import pytest
import torch

from minirm.rewardbench import (EXAMPLE_COUNTS, SECTION_NAMES, SECTIONS, format_table,
                                is_correct, score_table)


def test_official_map_and_counts():
    assert set(SECTIONS) == set(EXAMPLE_COUNTS)
    assert set(SECTIONS.values()) == set(SECTION_NAMES)
    assert EXAMPLE_COUNTS["math-prm"] == 984
    # The filtered split has 2,985 rows, math-prm counted as its real 447 (METHOD.md 6).
    assert sum(EXAMPLE_COUNTS.values()) - 984 + 447 == 2985
    assert sum(1 for s in SECTIONS.values() if s == "Reasoning") == 7


def test_correct_is_strictly_greater():
    chosen, rejected = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 0.5])
    assert is_correct(chosen, rejected).tolist() == [False, True, False]  # a tie is wrong


def test_partial_table_by_hand():
    table = score_table({
        "math-prm": [True, True, True, False],        # 0.75, weighted 984 (not 4, not 447)
        "hep-python": [True, False],                  # 0.5, weighted 164
        "llmbar-natural": [True, False, True, False],  # 0.5, weighted 100
        "mt-bench-hard": [True],                      # 1.0, weighted 37
        "my-own-subset": [True, False, False],        # in no section
        "alpacaeval-easy": [],                        # no rows: absent
    })
    assert table["subsets"] == {
        "math-prm": {"accuracy": 0.75, "n": 4},
        "hep-python": {"accuracy": 0.5, "n": 2},
        "llmbar-natural": {"accuracy": 0.5, "n": 4},
        "mt-bench-hard": {"accuracy": 1.0, "n": 1},
        "my-own-subset": {"accuracy": pytest.approx(1 / 3), "n": 3},
    }
    sections = table["sections"]
    assert sections["Reasoning"] == pytest.approx((0.75 * 984 + 0.5 * 164) / (984 + 164))
    assert sections["Reasoning"] == pytest.approx(820 / 1148)
    assert sections["Chat Hard"] == pytest.approx((0.5 * 100 + 1.0 * 37) / 137)
    assert sections["Chat"] is None and sections["Safety"] is None
    assert table["overall"] is None
    text = format_table(table)
    assert "absent" in text and "my-own-subset" in text and "(no section)" in text


def test_full_table_by_hand():
    # A subset with fewer rows than official (xstest-should-respond: 4 of 250) weighs 250.
    table = score_table({
        "alpacaeval-easy": [True, False],                   # 0.5  x 100
        "mt-bench-easy": [True],                            # 1.0  x 28
        "llmbar-adver-manual": [True, True, False, False],  # 0.5  x 46
        "xstest-should-respond": [True, True, True, False],  # 0.75 x 250
        "donotanswer": [False, False],                      # 0.0  x 136
        "math-prm": [True, False],                          # 0.5  x 984
        "hep-go": [True],                                   # 1.0  x 164
    })
    chat = (50 + 28) / 128
    chat_hard = 0.5
    safety = 187.5 / 386
    reasoning = (492 + 164) / 1148
    assert table["sections"] == {"Chat": pytest.approx(chat), "Chat Hard": pytest.approx(0.5),
                                 "Safety": pytest.approx(safety),
                                 "Reasoning": pytest.approx(reasoning)}
    assert table["overall"] == pytest.approx((chat + chat_hard + safety + reasoning) / 4)
    # (0.609375 + 0.5 + 0.485751 + 0.571429) / 4
    assert table["overall"] == pytest.approx(0.5416387, abs=1e-6)
    assert "overall" in format_table(table)
