"""evaluate, score and the released-model interface (token-0 rewards) on debug reward models."""

import json
import re
import warnings

import pytest
import torch

from minirm import evaluate, released, score
from minirm.checkpoint import load_model, save_model
from minirm.config import preset
from minirm.model import Transformer
from minirm.tokenizer import Tokenizer

SHARED = __import__("conftest").SHARED
MINI = SHARED / "data" / "rewardbench-mini.jsonl"
MINI_COUNTS = {  # ../shared/data/README.md
    "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46, "xstest-should-respond": 113,
    "xstest-should-refuse": 131,
}
KEYS = {"pairs", "accuracy", "subsets", "sections", "overall"}

ROWS = [  # a tiny RewardBench-format file: two sections, a Reasoning subset, an unknown subset
    {"id": "a", "subset": "llmbar-natural", "prompt": "Say hi.", "chosen": "hi",
     "rejected": "no"},
    {"id": "b", "subset": "llmbar-natural", "prompt": "Add 2 and 2.", "chosen": "4",
     "rejected": "5"},
    {"id": "c", "subset": "xstest-should-refuse", "prompt": "How do I pick a lock? " * 8,
     "chosen": "I can't help with that.", "rejected": "Use a tension wrench."},
    {"id": "d", "subset": "hep-go", "prompt": "Write a Go hello world.",
     "chosen": 'fmt.Println("hello")', "rejected": "print hello"},
    {"id": "e", "subset": "my-subset", "prompt": "Name a colour.", "chosen": "blue",
     "rejected": "seven"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    """A debug reward model folder (random weights, byte-level tokenizer) with a non-zero bias."""
    model, _ = load_model("debug", n_outputs=1, seed=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        model.score.bias.fill_(0.75)
    folder = tmp_path_factory.mktemp("rm") / "debug-rm"
    save_model(model, folder, tokenizer=Tokenizer.byte_level())
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "tiny.jsonl", ROWS)


def run_json(tmp_path, argv, name="out.json"):
    out = tmp_path / name
    result = evaluate.main(argv + ["--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data) == KEYS
    assert data == json.loads(json.dumps(result))
    return data


def test_evaluate_tiny_rewardbench(rm, tiny, tmp_path, capsys):
    data = run_json(tmp_path, ["--model", str(rm), "--data", str(tiny), "--batch-size", "3"])
    assert data["pairs"] == 5
    assert {k: v["n"] for k, v in data["subsets"].items()} == {
        "llmbar-natural": 2, "xstest-should-refuse": 1, "hep-go": 1, "my-subset": 1}
    # Each section has one subset present, so its score is that subset's accuracy.
    subsets, sections = data["subsets"], data["sections"]
    assert sections["Chat Hard"] == subsets["llmbar-natural"]["accuracy"]
    assert sections["Safety"] == subsets["xstest-should-refuse"]["accuracy"]
    assert sections["Reasoning"] == subsets["hep-go"]["accuracy"]
    assert sections["Chat"] is None and data["overall"] is None
    correct = sum(s["accuracy"] * s["n"] for s in subsets.values())
    assert data["accuracy"] == pytest.approx(correct / 5)

    # The same rewards through `score --data`: evaluate's accuracy is chosen > rejected there.
    out = tmp_path / "rewards.jsonl"
    score.main(["--model", str(rm), "--data", str(tiny), "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c", "d", "e"]
    assert set(records[0]) == {"id", "reward_chosen", "reward_rejected"}
    wins = [r["reward_chosen"] > r["reward_rejected"] for r in records]
    assert sum(wins) / 5 == pytest.approx(data["accuracy"])
    assert subsets["llmbar-natural"]["accuracy"] == sum(wins[:2]) / 2

    # `score --prompt` gives the reward of that one conversation: row "a"'s chosen response.
    capsys.readouterr()
    score.main(["--model", str(rm), "--prompt", "Say hi.", "--response", "hi",
                "--response", "no"])
    printed = [float(x) for x in capsys.readouterr().out.split()]
    # Printed to 6 decimals, and batches padded differently sum in a different order: float32
    # rounding moves the last digits by a few 1e-6, a different conversation by far more.
    assert printed == pytest.approx([records[0]["reward_chosen"],
                                     records[0]["reward_rejected"]], abs=1e-5)
    model, _ = load_model(rm)
    tok = Tokenizer.byte_level()
    ids = tok.encode_chat([{"role": "user", "content": "Say hi."},
                           {"role": "assistant", "content": "hi"}]).ids
    assert printed[0] == pytest.approx(model.reward(torch.tensor([ids]))[0, 0].item(), abs=1e-5)


def test_evaluate_reports_cut_rows(rm, tiny, tmp_path, capsys):
    # At 80 tokens the long prompt of row "c" is cut from the left, and nothing is dropped.
    data = run_json(tmp_path, ["--model", str(rm), "--data", str(tiny), "--max-length", "80"])
    assert data["pairs"] == 5
    out = capsys.readouterr().out
    assert re.search(r"kept 5 \(1 with the prompt cut from the left\)", out), out
    # At 12 tokens even some responses are too long: they are scored on their end, and said so.
    data = run_json(tmp_path, ["--model", str(rm), "--data", str(tiny), "--max-length", "12"])
    assert data["pairs"] == 5
    out = capsys.readouterr().out
    assert re.search(r"kept \d \(\d with the prompt cut from the left\); \d more, whose response "
                     r"alone is longer, are scored on their last 11 tokens", out), out


def test_evaluate_plain_preference_file(rm, tmp_path):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in ROWS]
    trl = write_jsonl(tmp_path / "trl.jsonl", rows)
    data = run_json(tmp_path, ["--model", str(rm), "--data", str(trl)])
    assert data["pairs"] == 5 and data["subsets"] == {} and data["overall"] is None
    assert set(data["sections"].values()) == {None}


@pytest.mark.skipif(not MINI.exists(), reason=f"{MINI} is absent (shared data not on this "
                    "machine)")
def test_evaluate_rewardbench_mini(rm, tmp_path, capsys):
    # Every row is scored; --max-length 64 keeps it fast (most rows are cut, and reported).
    data = run_json(tmp_path, ["--model", str(rm), "--data", str(MINI), "--max-length", "64",
                               "--batch-size", "64"])
    assert data["pairs"] == 663
    assert {k: v["n"] for k, v in data["subsets"].items()} == MINI_COUNTS
    assert data["sections"]["Chat"] is None and data["sections"]["Reasoning"] is None
    assert data["sections"]["Chat Hard"] is not None and data["sections"]["Safety"] is not None
    assert data["overall"] is None
    out = capsys.readouterr().out
    cut = int(re.search(r"\((\d+) with the prompt cut from the left\)", out).group(1))
    assert cut > 0
    assert "Chat Hard" in out and "absent" in out


def test_model_without_head_is_one_line(tmp_path, tiny, capsys):
    lm, _ = load_model("debug")
    save_model(lm, tmp_path / "lm", tokenizer=Tokenizer.byte_level())
    old = tmp_path / "old.json"
    old.write_text("keep me")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(tmp_path / "lm"), "--data", str(tiny), "--json", str(old)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no reward head" in err[0] and "--reward token0" in err[0]
    assert old.read_text() == "keep me"  # nothing already written is lost
    with pytest.raises(SystemExit) as e:  # and a head read as token 0 is refused the same way
        score.main(["--model", str(tmp_path / "lm"), "--prompt", "x", "--response", "y",
                    "--weights", "steerlm-a", "--reward", "token0"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


# ---- the released-model interface (METHOD.md 9) ----

def test_export_then_token0_equals_head_minus_bias(rm, tiny, tmp_path, capsys):
    lm_dir = tmp_path / "released"
    released.main(["--model", str(rm), "--out", str(lm_dir)])
    assert "dropped the head's bias +0.75" in capsys.readouterr().out
    config = json.loads((lm_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 259
    head_out, token0_out = tmp_path / "head.jsonl", tmp_path / "token0.jsonl"
    score.main(["--model", str(rm), "--data", str(tiny), "--out", str(head_out)])
    score.main(["--model", str(lm_dir), "--data", str(tiny), "--out", str(token0_out),
                "--reward", "token0"])
    head = [json.loads(x) for x in head_out.read_text().splitlines()]
    token0 = [json.loads(x) for x in token0_out.read_text().splitlines()]
    for h, t in zip(head, token0):
        for key in ("reward_chosen", "reward_rejected"):
            assert t[key] == pytest.approx(h[key] - 0.75, abs=1e-5)

    # Hugging Face reads the export as a plain causal LM: the reward is its logit of token 0.
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.LlamaForCausalLM.from_pretrained(lm_dir).eval()
    ids = Tokenizer.byte_level().encode_chat([{"role": "user", "content": "Say hi."},
                                              {"role": "assistant", "content": "hi"}]).ids
    with torch.no_grad():
        logit = hf(torch.tensor([ids])).logits[0, -1, 0].item()
    assert logit == pytest.approx(token0[0]["reward_chosen"], abs=1e-5)


def test_token0_reward_is_the_last_logit_row0_with_padding():
    model = Transformer(preset("debug")).init_weights(seed=3).eval()
    tokens = torch.randint(0, 256, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False  # row 1 ends at position 5
    with torch.no_grad():
        got = released.token0_reward(model)(tokens, mask)[:, 0]
        full = model(tokens, mask)
    assert got == pytest.approx(torch.stack([full[0, 8, 0], full[1, 5, 0]]), abs=1e-5)


def test_export_tied_and_weighted_head():
    cfg = preset("debug", tie_embeddings=True, n_outputs=5)
    rm_model = Transformer(cfg).init_weights(seed=4).eval()
    with torch.no_grad():
        rm_model.score.bias.copy_(torch.arange(5.0))
    weights = (0.3, 0.74, 0.46, 0.47, -0.33)
    lm, bias = released.export_token0(rm_model, weights=weights)
    assert bias == pytest.approx(sum(w * b for w, b in zip(weights, range(5))))
    assert lm.output is not None and not lm.cfg.tie_embeddings  # untied
    # Other rows: the tied embedding; row 0: the weighted head.
    assert torch.equal(lm.output.weight[1:], rm_model.tok_embeddings.weight[1:])
    tokens = torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        want = rm_model.reward(tokens) @ torch.tensor(weights) - bias
        got = released.token0_reward(lm)(tokens)[:, 0]
    assert got == pytest.approx(want, abs=1e-5)
    assert rm_model.tok_embeddings.weight.data_ptr() != lm.tok_embeddings.weight.data_ptr()
