"""ToySteer: deterministic, in the HelpSteer2 schemas (the real loaders read it), sane scores."""

import gzip
import json

import pytest

from minirm import toysteer
from minirm.data import ATTRIBUTES, load_helpsteer2_preference, load_pairs, load_ratings
from minirm.errors import UserError


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The default data set, generated once for the module."""
    out = tmp_path_factory.mktemp("toysteer")
    return out, toysteer.generate(out, seed=0)


def test_files_and_determinism(toy, tmp_path):
    out, paths = toy
    assert [p.relative_to(out).as_posix() for p in paths] == [
        "train.jsonl.gz", "validation.jsonl.gz", "preference/preference.jsonl.gz"]
    again = toysteer.generate(tmp_path / "again", seed=0)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    other = toysteer.generate(tmp_path / "other", seed=1, n_prompts=50, n_val_prompts=10)
    assert other[0].read_bytes() != paths[0].read_bytes()


def test_ratings_schema(toy):
    out, _ = toy
    raw = [json.loads(line) for line in gzip.open(out / "train.jsonl.gz", "rt")]
    assert len(raw) == 2 * toysteer.N_PROMPTS
    assert set(raw[0]) == {"prompt", "response", *ATTRIBUTES}
    assert all(r["prompt"] == s["prompt"] for r, s in zip(raw[::2], raw[1::2]))  # two per prompt
    assert all(type(r[a]) is int and 0 <= r[a] <= 4 for r in raw for a in ATTRIBUTES)
    rows = load_ratings(out / "validation.jsonl.gz")
    assert len(rows) == 2 * toysteer.N_VAL_PROMPTS
    for i in range(len(ATTRIBUTES)):  # every attribute varies
        assert len({r.labels[i] for r in rows}) >= 3


def test_preference_schema_and_post_processing(toy):
    out, _ = toy
    path = out / "preference" / "preference.jsonl.gz"
    raw = [json.loads(line) for line in gzip.open(path, "rt")]
    assert {r["split"] for r in raw} == {"train", "val"}
    assert any(a["strength"] == -100 for r in raw for a in r["all_preferences_unprocessed"])
    assert all(len(r["three_most_similar_preferences"]) == 3 for r in raw)
    total = 0
    for split, n in (("train", toysteer.N_PROMPTS), ("val", toysteer.N_VAL_PROMPTS)):
        lines = []
        pairs = load_helpsteer2_preference(path, split, report=lines.append)
        kept = len(pairs)
        total += kept
        assert f"kept {kept} of {n} pairs" in lines[0]
        assert 0.5 * n < kept < 0.9 * n  # some dropped, most kept
        assert {p.strength for p in pairs} == {1, 2, 3}
        if split == "train":
            for reason in ("all -100", "spread > 2", "rounds to 0"):
                assert reason in lines[0]
        # The annotators' preferences follow the true quality.
        right = sum(toysteer.true_score(p.prompt[0]["content"], p.chosen)
                    > toysteer.true_score(p.prompt[0]["content"], p.rejected) for p in pairs)
        assert right > 0.9 * kept
    assert len(load_pairs(path, report=lambda s: None)) == total  # format told from the fields


def test_true_score():
    score = toysteer.true_score
    assert score("Reverse: abcde", "edcba") == 1.0
    assert score("Reverse: abcde", "The answer is edcba.") == 1.0
    assert score("Add: 12+7", "19") == 1.0
    assert score("Sort: 3 1 2", "1 2 3") == 1.0
    assert score("Uppercase: abc", "ABC") == 1.0
    assert score("Copy: xyz", "Sure! The answer is xyz. Hope this helps!") < 1.0
    assert score("Reverse: abcde", "edcba") > score("Reverse: abcde", "edcbb") > \
        score("Reverse: abcde", "abcde")
    assert score("Reverse: abcde", "edc##ba") < score("Reverse: abcde", "edcba")
    assert score("Add: 3+4", "8") < 0.5  # a one-digit answer off by one is wrong entirely
    for junk in ("", "~~~~~~~~", "é" * 50, "19" * 40):
        assert 0.0 <= score("Add: 12+7", junk) < 0.5
    with pytest.raises(UserError, match="not a ToySteer prompt"):
        score("What is the capital of France?", "Paris")
    prompts = toysteer.sample_prompts(20, seed=3)
    assert prompts == toysteer.sample_prompts(20, seed=3) and len(set(prompts)) > 15
    assert all(score(p, toysteer._parse(p)[2]) == 1.0 for p in prompts)
