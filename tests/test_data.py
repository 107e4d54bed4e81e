"""Loaders, the paper's post-processing (METHOD.md 1.2), tokenization and batching.

The HelpSteer2-Preference fixture is written by hand, one row per case, with the expected result
worked out in the comments; every other format gets a small fixture of its own.
"""

import gzip
import json
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minirm.data import (FORMATS, MISSING, Encoded, Pair, Rated, batches, collate, collate_pairs,
                         encode_pairs, encode_rated, length_groups, load_helpsteer2_preference,
                         load_pairs, load_ratings, preference_from_annotations,
                         split_helpsteer_prompt)
from minirm.errors import UserError
from minirm.tokenizer import Tokenizer

MULTI = "Hi\n<extra_id_1>Assistant\nHello!\n<extra_id_1>User\nAdd: 1+1"


def write(path, rows):
    """rows: dicts (one JSON line each) or ready-made strings; .gz names are gzipped."""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def hs2(similar, split="train", prompt="Q", r1="one", r2="two", **extra):
    row = {"split": split, "prompt": prompt, "response_1": r1, "response_2": r2,
           "preference_strength": 0, "preference_statement": "", "preference_elaboration": "",
           "three_most_similar_preferences": [{"statement": "", "elaboration": "", "strength": s}
                                              for s in similar],
           "all_preferences_unprocessed": [{"strength": s, "justification": ""} for s in similar]}
    row.update(extra)
    return row


# (three most similar strengths, expected under half-away, under half-even); a number is the
# kept signed preference, a string the drop reason.
CASES = [
    ([-2, -1, -2], -2, -2),                      # mean -5/3: response_1 better
    ([1, 2, 1], 1, 1),                           # mean 4/3: response_2 better
    ([-1, 2, 1], "spread > 2", "spread > 2"),    # max - min = 3
    ([1, 0, -1], "rounds to 0", "rounds to 0"),
    ([3, 0, 2], "spread > 2", "spread > 2"),     # spread 3 wins over the mean (5/3)
    ([-100, 2, 3], 3, 2),                        # -100 left out: mean 2.5
    ([-100, 0, 1], 1, "rounds to 0"),            # mean 0.5
    ([-100, -1, -2], -2, -2),                    # mean -1.5: away from zero and to even agree
    ([-100, -100, -100], "all -100", "all -100"),
]


@pytest.fixture
def preference_file(tmp_path):
    rows = [hs2(s, r1=f"one {i}", r2=f"two {i}") for i, (s, _, _) in enumerate(CASES)]
    rows += [hs2([-3, -3, -2], split="val", prompt=MULTI), hs2([2, 2, 2], split="validation")]
    return write(tmp_path / "preference.jsonl.gz", rows)


@pytest.mark.parametrize("rounding", ["half-away", "half-even"])
def test_preference_post_processing(preference_file, rounding):
    column = 1 if rounding == "half-away" else 2
    lines = []
    pairs = load_helpsteer2_preference(preference_file, "train", rounding, report=lines.append)
    expected = {i: case[column] for i, case in enumerate(CASES)}
    kept = {i: v for i, v in expected.items() if isinstance(v, int)}
    assert len(pairs) == len(kept)
    for pair, (i, value) in zip(pairs, kept.items()):
        assert pair.strength == abs(value)
        # Sign convention: negative = response_1 is better.
        assert (pair.chosen, pair.rejected) == ((f"one {i}", f"two {i}") if value < 0
                                                else (f"two {i}", f"one {i}"))
    reasons = Counter(v for v in expected.values() if isinstance(v, str))
    assert len(lines) == 1 and f"kept {len(kept)} of {len(CASES)}" in lines[0]
    for reason, n in reasons.items():
        assert f"{reason}: {n}" in lines[0]


def test_preference_split_and_multi_turn(preference_file):
    val = load_helpsteer2_preference(preference_file, "val", report=lambda s: None)
    assert [p.strength for p in val] == [3, 2]  # "validation" counts as val
    assert val[0].chosen == "one" and val[0].prompt == split_helpsteer_prompt(MULTI)
    both = load_pairs(preference_file, report=lambda s: None)  # detected, no split: all rows
    assert len(both) == 2 + sum(isinstance(c[1], int) for c in CASES)
    with pytest.raises(UserError, match="split 'tran' is unknown"):
        load_helpsteer2_preference(preference_file, "tran")


def test_preference_from_annotations_by_hand():
    assert preference_from_annotations([-100, 1, 2], "half-away") == (2, None)  # 1.5 -> 2
    assert preference_from_annotations([-100, 1, 2], "half-even") == (2, None)  # 1.5 -> 2
    assert preference_from_annotations([-100, 2, 3], "half-even") == (2, None)  # 2.5 -> 2
    assert preference_from_annotations([-100, -3, -2], "half-away") == (-3, None)
    assert preference_from_annotations([0, 0, 1], "half-away") == (0, "rounds to 0")


def test_no_usable_pair_left(tmp_path):
    path = write(tmp_path / "tie.jsonl", [hs2([0, 0, 0]), hs2([-3, 0, 3])])
    with pytest.raises(UserError, match=r"tie.jsonl: no usable pair left.*rounds to 0: 1.*"
                                        r"spread > 2: 1"):
        load_helpsteer2_preference(path, report=lambda s: None)


def test_split_helpsteer_prompt():
    assert split_helpsteer_prompt("Hello") == [{"role": "user", "content": "Hello"}]
    assert [m["role"] for m in split_helpsteer_prompt(MULTI)] == ["user", "assistant", "user"]
    assert split_helpsteer_prompt(MULTI)[1]["content"] == "Hello!"
    with pytest.raises(ValueError):
        split_helpsteer_prompt("a\n<extra_id_1>User\nb")


def test_load_ratings(tmp_path):
    rows = [{"prompt": MULTI, "response": "2", "helpfulness": 4, "correctness": 4,
             "coherence": 4, "complexity": 1, "verbosity": 0},
            {"prompt": MULTI, "response": "3", "helpfulness": 1, "correctness": 0}]
    rated = load_ratings(write(tmp_path / "train.jsonl.gz", rows))
    assert rated[0] == Rated(split_helpsteer_prompt(MULTI), "2", [4, 4, 4, 1, 0])
    assert rated[1].labels == [1, 0, MISSING, MISSING, MISSING]


# ---- other formats ----

USER_Q = [{"role": "user", "content": "q"}]
FIXTURES = {  # format -> (file name, rows, expected pairs)
    "trl": ("trl.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": USER_Q, "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}], "margin": 2},
        {"prompt": "q", "chosen": "a", "rejected": "b", "preference_strength": -3}],
        [Pair(USER_Q, "a", "b"), Pair(USER_Q, "a", "b", 2), Pair(USER_Q, "a", "b", 3)]),
    "implicit": ("implicit.jsonl.gz", [  # TRL's implicit prompt: whole conversations
        {"chosen": USER_Q + [{"role": "assistant", "content": "a"}],
         "rejected": USER_Q + [{"role": "assistant", "content": "b"}]}],
        [Pair(USER_Q, "a", "b")]),
    "hh": ("hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: q\n\nAssistant: good",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: q\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:"}],
        [Pair([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
              + USER_Q, "good", "bad")]),
    "rewardbench": ("rb.jsonl", [
        {"id": 7, "subset": "xstest-should-refuse", "prompt": "q", "chosen": "a",
         "rejected": "b"}],
        [Pair(USER_Q, "a", "b", 1, "7", "xstest-should-refuse")]),
    "llmbar": ("Natural.json", [  # a JSON list over several lines, as LLMBar's files are
        '[\n  {"input": "q", "output_1": "x", "output_2": "y", "label": 2},',
        '  {"input": "q",\n   "output_1": "x", "output_2": "y", "label": 1}\n]'],
        [Pair(USER_Q, "y", "x", 1, "llmbar-natural-0", "llmbar-natural"),
         Pair(USER_Q, "x", "y", 1, "llmbar-natural-1", "llmbar-natural")]),
}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_formats_detected_and_read(tmp_path, name):
    file, rows, expected = FIXTURES[name]
    path = write(tmp_path / file, rows)
    lines = []
    assert load_pairs(path, report=lines.append) == expected
    fmt = "trl" if name == "implicit" else name
    assert f"({fmt})" in lines[-1]
    assert load_pairs(path, format=fmt, report=lambda s: None) == expected
    if name == "hh":
        assert "empty answer: 1" in lines[-1]


def test_unknown_format(tmp_path):
    path = write(tmp_path / "x.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match="--format 'alpaca' is unknown.*" + ", ".join(FORMATS)):
        load_pairs(path, format="alpaca")
    with pytest.raises(UserError, match="cannot tell the format"):
        load_pairs(write(tmp_path / "y.jsonl", [{"question": "q"}]))


OK_TRL = {"prompt": "q", "chosen": "a", "rejected": "b"}
OK_RATED = {"prompt": "q", "response": "a", "helpfulness": 3}
# (loader, rows, line of the error, the field named, text expected in the message)
BAD = [
    ("pairs", [OK_TRL, '{"prompt": "q", "chosen": '], 2, None, "malformed JSON"),
    ("pairs", [OK_TRL, "[1, 2]"], 2, None, "expected a JSON object"),
    ("pairs", [OK_TRL, {"prompt": "q", "chosen": "a"}], 2, "rejected", "is missing"),
    ("pairs", [OK_TRL, OK_TRL, {**OK_TRL, "chosen": "  "}], 3, "chosen", "is empty"),
    ("pairs", [{**OK_TRL, "rejected": 3}], 1, "rejected", "must be a string"),
    ("pairs", [{**OK_TRL, "margin": 1.5}], 1, "margin", "must be an int"),
    ("pairs", [{**OK_TRL, "prompt": [{"role": "bot", "content": "q"}]}], 1, "prompt[0]", "role"),
    ("pairs", [{**OK_TRL, "prompt": [{"role": "assistant", "content": "q"}]}], 1, "prompt",
     "not a valid conversation"),
    ("pairs", [hs2([1, 1, 1]), hs2([1, 1, 1], preference_strength=4)], 2,
     "preference_strength", "-3..3"),
    ("pairs", [hs2([1, 1, 1], preference_strength="2")], 1, "preference_strength", "an int"),
    ("pairs", [hs2([1, 7, 1])], 1, "three_most_similar_preferences[1].strength", "-100"),
    ("pairs", [hs2([])], 1, "three_most_similar_preferences", "non-empty list"),
    ("pairs", [hs2([1, 1, 1], r2="")], 1, "response_2", "is empty"),
    ("pairs", [hs2([1, 1, 1], prompt="a\n<extra_id_1>User\nb")], 1, "prompt", "two user"),
    ("pairs", [{"chosen": "Human: q", "rejected": "\n\nHuman: q\n\nAssistant: a"}], 1, "chosen",
     "transcript"),
    ("llmbar", ['[{"input": "q", "output_1": "x", "output_2": "y", "label": 1},',
                '\n{"input": "q", "output_1": "x", "output_2": "y", "label": 3}]'], 3, "label",
     "1..2"),
    ("llmbar", ['[{"input": "q", "output_1": "x", "output_2": "y", "label": 1},', '{"input"]'], 2,
     None, "malformed JSON"),
    ("ratings", [OK_RATED, {**OK_RATED, "response": ""}], 2, "response", "is empty"),
    ("ratings", [OK_RATED, {**OK_RATED, "helpfulness": 7}], 2, "helpfulness", "0..4"),
    ("ratings", [{"prompt": "q", "response": "a"}], 1, "helpfulness", "all missing"),
    ("ratings", [{"response": "a", "helpfulness": 1}], 1, "prompt", "is missing"),
]


@pytest.mark.parametrize("loader, rows, line, field, text", BAD)
def test_bad_input_names_file_line_and_field(tmp_path, loader, rows, line, field, text):
    path = write(tmp_path / ("Natural.json" if loader == "llmbar" else "bad_file.jsonl"), rows)
    with pytest.raises(UserError) as e:
        (load_ratings if loader == "ratings" else load_pairs)(path)
    message = str(e.value)
    assert str(path) in message and f"line {line}:" in message and text in message
    assert field is None or f"field {field!r}" in message
    assert "\n" not in message  # one line


def test_unreadable_files(tmp_path):
    data = gzip.compress(("\n".join([json.dumps(OK_TRL)] * 2000) + "\n").encode())
    cut = write(tmp_path / "cut.jsonl.gz", [])
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut.jsonl.gz line \d+: unreadable gzip"):
        load_pairs(cut, report=lambda s: None)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(OK_TRL).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin.jsonl line 2: not UTF-8"):
        load_pairs(latin)
    with pytest.raises(UserError, match="not found"):
        load_ratings(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="holds no rows"):
        load_pairs(write(tmp_path / "empty.jsonl", ["", "  "]))


# ---- tokenization and batching ----

TOK = Tokenizer.byte_level()
OVERHEAD = 20  # toy format: <|bos|> "User: " q "\n" "Assistant: " a <|eos|>


def test_encode_pairs_drop_versus_prompt_left():
    pairs = [Pair(USER_Q, "a" * 5, "b" * 3, 2),              # 26 tokens: fits
             Pair([{"role": "user", "content": "p" * 30}], "a" * 5, "b"),  # 55: too long
             Pair(USER_Q, "a" * 40, "b")]                     # response alone too long
    lines = []
    out = encode_pairs(pairs, TOK, 40, report=lines.append)
    assert len(out) == 1 and out[0][2] == 2 and "kept 1, dropped 2" in lines[0]
    chosen, rejected, _ = out[0]
    assert len(chosen.ids) == OVERHEAD + 1 + 5 and TOK.decode(chosen.ids[chosen.start:]) == "aaaaa"

    out = encode_pairs(pairs, TOK, 40, truncate="prompt-left", report=lines.append)
    assert "kept 2 (1 with the prompt cut from the left), dropped 1" in lines[1]
    chosen, rejected, strength = out[1]
    assert len(chosen.ids) == len(rejected.ids) == 40
    assert chosen.ids[0] == TOK.bos_id and chosen.ids[-1] == TOK.eos_id
    assert TOK.decode(chosen.ids[chosen.start:]) == "aaaaa"
    assert TOK.decode(chosen.ids[1:chosen.start]).endswith("p\nAssistant: ")
    with pytest.raises(UserError, match="all 1 pairs are longer"):
        encode_pairs(pairs[2:], TOK, 40, report=lambda s: None)


def test_encode_rated():
    rows = [Rated(USER_Q, "abc", [1, 2, 3, 4, 0]), Rated(USER_Q, "x" * 50, [0] * 5)]
    lines = []
    seqs, labels = encode_rated(rows, TOK, 30, report=lines.append)
    assert seqs == [Encoded(TOK.encode_chat(USER_Q + [{"role": "assistant", "content": "abc"}])
                            .ids, 20)]  # bos, "User: q\n", "Assistant: "
    assert labels == [[1, 2, 3, 4, 0]] and "dropped 1" in lines[0]
    # Every row too long: the fix offered is the command's own (sft has no --truncate).
    with pytest.raises(UserError, match=r"raise --max-length or pass --truncate prompt-left$"):
        encode_rated(rows[1:], TOK, 30, report=lines.append)
    with pytest.raises(UserError, match=r"longer than max_length 30; raise --max-length$"):
        encode_rated(rows[1:], TOK, 30, report=lines.append, truncatable=False)


def test_collate():
    tokens, mask = collate([[5, 6, 7], [8]], pad_id=0)
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


@pytest.mark.parametrize("shuffle, bucket", [(True, True), (True, False), (False, False)])
def test_batches_cover_each_index_once_and_repeat(shuffle, bucket):
    lengths = [(7 * i) % 23 for i in range(103)]
    got = batches(lengths, 10, seed=1, epoch=2, shuffle=shuffle, bucket=bucket)
    assert sorted(i for b in got for i in b) == list(range(103))
    assert [len(b) for b in got] == [10] * 10 + [3]
    assert got == batches(lengths, 10, seed=1, epoch=2, shuffle=shuffle, bucket=bucket)
    if shuffle:
        assert got != batches(lengths, 10, seed=1, epoch=3, shuffle=shuffle, bucket=bucket)
    else:
        assert got[0] == list(range(10))


def test_length_groups_pad_least():
    """Rows of lengths 5, 100, 7, 98, 6, 50 padded as one batch: 6 x 100 = 600 positions. Two
    batches: {5, 6, 7} and {50, 98, 100}, 21 + 300 = 321. Three: 21 + 50 + 200 = 271, which
    saves more than 10% of 321, so it is taken."""
    assert length_groups([5, 100, 7, 98, 6, 50]) == [[0, 4, 2], [5], [3, 1]]
    assert length_groups([5, 100, 7, 98, 6, 50], max_groups=2) == [[0, 4, 2], [5, 3, 1]]
    # 3 x 10 + 1 x 11 = 41 against 44: under 10% saved, so one batch.
    assert length_groups([10, 11, 10, 10]) == [[0, 2, 3, 1]]
    # Each batch more must save 10% over one batch fewer: 180 -> 167 (two) is too little, so
    # three (161, 11% under one batch) are not taken either.
    assert length_groups([54, 60, 47]) == [[2, 0, 1]]
    assert length_groups([10] * 8) == [list(range(8))]
    assert length_groups([]) == []


def test_collate_pairs_cuts_at_the_shared_prefix():
    pairs = [([1, 2, 3, 4], [1, 2, 5]), ([7, 8], [7, 8, 9]), ([4, 5], [6])]
    tokens, mask, (prefix, prefix_mask, rows) = collate_pairs(pairs, 0)
    # Shared: [1, 2]; [7] (one token of each is kept out of it); nothing.
    assert prefix.tolist() == [[1, 2], [0, 7], [0, 0]]
    assert prefix_mask.tolist() == [[True, True], [False, True], [False, False]]
    assert tokens.tolist() == [[3, 4], [8, 0], [4, 5], [5, 0], [8, 9], [6, 0]]
    assert mask.sum(-1).tolist() == [2, 1, 2, 1, 2, 1]
    assert rows.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="a token in every sequence"):
        collate_pairs([([], [1, 2, 3])], 0)


def test_batches_bucket_by_length():
    lengths = list(range(200))[::-1]  # one chunk of 50 batches: each batch is a run of lengths
    for b in batches(lengths, 4, seed=0, epoch=0):
        assert sorted(lengths[i] for i in b) == list(range(min(lengths[i] for i in b),
                                                            max(lengths[i] for i in b) + 1))


# ---- fuzz: bad bytes never escape as anything but a UserError ----

VALID = (json.dumps(hs2([1, 2, 1])) + "\n" + json.dumps(OK_TRL) + "\n").encode()
FIELDS = ["prompt", "response", "chosen", "rejected", "response_1", "response_2", "split",
          "preference_strength", "three_most_similar_preferences", "helpfulness", "margin",
          "subset", "id", "input", "output_1", "output_2", "label", "role", "content", "strength"]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-200, 200) | st.floats()
                    | st.text(max_size=8) | st.sampled_from(["\n\nHuman: q\n\nAssistant: a"]),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4), max_leaves=10)


def _load_all(path):
    for load in (lambda: load_pairs(path, report=lambda s: None), lambda: load_ratings(path)):
        try:
            load()
        except UserError as e:
            assert "\n" not in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(
    st.binary(max_size=200),
    st.integers(0, len(VALID)).map(lambda n: VALID[:n]),
    st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=3)).map(
        lambda t: VALID[:t[0]] + t[1] + VALID[t[0] + 1:]),
    st.lists(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6), min_size=1, max_size=3)
    .map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode())),
    gz=st.booleans())
def test_fuzz_only_user_errors(tmp_path_factory, data, gz):
    path = tmp_path_factory.mktemp("fuzz") / ("f.jsonl.gz" if gz else "f.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    _load_all(path)
