"""ExPO (METHOD.md 4, step 3): θ = θ_s + α(θ_s − θ_w), checked against numbers by hand."""

import json

import pytest
import torch

from minirm import expo
from minirm.checkpoint import load_model, save_model
from minirm.data import Encoded
from minirm.errors import UserError
from minirm.expo import extrapolate, sweep
from minirm.tokenizer import Tokenizer


def test_extrapolate_by_hand():
    weak = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0, -1.0]])}
    strong = {"a": torch.tensor([2.0, 2.0]), "b": torch.tensor([[1.0, 1.0]])}
    out = extrapolate(weak, strong, 1.5)
    # a: 2 + 1.5 (2 - 1) = 3.5, 2 + 1.5 (2 - 2) = 2; b: 1 + 1.5 (1 - 0) = 2.5, 1 + 1.5 (1 + 1) = 4
    assert out["a"].tolist() == [3.5, 2.0]
    assert out["b"].tolist() == [[2.5, 4.0]]
    assert extrapolate(weak, strong, 0.0)["a"].tolist() == [2.0, 2.0]   # α = 0: strong
    assert extrapolate(weak, strong, -1.0)["b"].tolist() == [[0.0, -1.0]]  # α = -1: weak
    # The other reading of the paper's factor: θ_w + β(θ_s − θ_w) is α = β − 1.
    beta = 1.52
    other = weak["b"] + beta * (strong["b"] - weak["b"])
    assert torch.allclose(extrapolate(weak, strong, beta - 1)["b"], other)


def test_extrapolate_keeps_dtype_and_computes_in_float32():
    weak = {"w": torch.tensor([1.0, 100.0], dtype=torch.bfloat16)}
    strong = {"w": torch.tensor([1.0078125, 100.0], dtype=torch.bfloat16)}  # 1 + 2^-7
    out = extrapolate(weak, strong, 3.0)["w"]
    assert out.dtype == torch.bfloat16
    # 1.0078125 + 3 · 0.0078125 = 1.03125, exact in bfloat16.
    assert out.tolist() == [1.03125, 100.0]


def test_mismatch_names_the_tensor():
    a = {"x": torch.zeros(2), "y": torch.zeros(3)}
    with pytest.raises(UserError, match="'y'.*only in the weak"):
        extrapolate(a, {"x": torch.zeros(2)}, 1.0)
    with pytest.raises(UserError, match=r"'y' has shape \(3,\).*\(4,\)"):
        extrapolate(a, {"x": torch.zeros(2), "y": torch.zeros(4)}, 1.0)


def debug_rm(seed):
    model, _ = load_model("debug", n_outputs=1, seed=seed)
    with torch.no_grad():  # a head large enough for rewards to differ clearly
        model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def rewards(model, seqs):
    with torch.no_grad():
        return torch.cat([model.reward(torch.tensor([s]))[:, 0] for s in seqs])


def test_sweep_picks_the_best_alpha():
    weak, strong = debug_rm(1), debug_rm(2)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (int(n),), generator=gen).tolist()
            for n in torch.randint(4, 12, (8,), generator=gen)]
    alphas = [0.0, 1.0, 3.0]
    r = {}
    for a in alphas:
        model = debug_rm(2)
        model.load_state_dict(extrapolate(weak.state_dict(), strong.state_dict(), a))
        r[a] = rewards(model, seqs)
    # Pairs oriented by α = 1's rewards: α = 1 gets them all right. Keep some pairs that
    # α = 0 and α = 3 get wrong, so they score lower.
    pairs = []
    for i in range(len(seqs)):
        for j in range(len(seqs)):
            if r[1.0][i] > r[1.0][j]:
                pairs.append((Encoded(seqs[i], 1), Encoded(seqs[j], 1), 1))
    for a in (0.0, 3.0):
        assert any(r[a][seqs.index(c.ids)] < r[a][seqs.index(rj.ids)] for c, rj, _ in pairs)
    before = {k: v.clone() for k, v in strong.state_dict().items()}
    best, table, model = sweep(weak, strong, alphas, pairs, pad_id=258, batch_size=8)
    assert best == 1.0 and table[1.0] == 1.0
    assert table[0.0] < 1.0 and table[3.0] < 1.0
    want = extrapolate(weak.state_dict(), before, 1.0)
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    assert all(torch.equal(strong.state_dict()[k], before[k]) for k in before)  # unchanged
    # A tie goes to the α listed first: with θ_w = θ_s every α gives the same model.
    best, table, _ = sweep(strong, strong, [3.0, 1.0, 0.0], pairs[:4], pad_id=258)
    assert best == 3.0 and len(set(table.values())) == 1


@pytest.fixture
def folders(tmp_path):
    tok = Tokenizer.byte_level()
    save_model(debug_rm(1), tmp_path / "weak", tokenizer=tok)
    save_model(debug_rm(2), tmp_path / "strong", tokenizer=tok)
    return tmp_path


def test_cli_alpha(folders):
    out = folders / "expo"
    expo.main(["--weak", str(folders / "weak"), "--strong", str(folders / "strong"),
               "--alpha", "1.52", "--out", str(out)])
    got, _ = load_model(out)
    want = extrapolate(debug_rm(1).state_dict(), debug_rm(2).state_dict(), 1.52)
    for name, t in got.state_dict().items():
        assert torch.allclose(t, want[name]), name
    assert json.loads((out / "expo.json").read_text())["alpha"] == 1.52
    assert (out / "tokenizer.json").exists()


def test_cli_alphas_sweep(folders, capsys):
    val = folders / "val.jsonl"
    rows = [{"prompt": f"Add {i} and {i}.", "chosen": str(2 * i), "rejected": str(2 * i + 1)}
            for i in range(6)]
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = folders / "best"
    expo.main(["--weak", str(folders / "weak"), "--strong", str(folders / "strong"),
               "--alphas", "0,1,2", "--val", str(val), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "<- best" in printed
    record = json.loads((out / "expo.json").read_text())
    assert set(record["sweep"]) == {"0.0", "1.0", "2.0"}
    assert record["sweep"][str(record["alpha"])] == max(record["sweep"].values())


def test_cli_mismatch_is_one_line(folders, capsys):
    five, _ = load_model("debug", n_outputs=5)
    save_model(five, folders / "five", tokenizer=Tokenizer.byte_level())
    with pytest.raises(SystemExit) as e:
        expo.main(["--weak", str(folders / "five"), "--strong", str(folders / "strong"),
                   "--alpha", "1", "--out", str(folders / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'score.weight'" in err[0]
    assert not (folders / "x").exists()
