"""The training command: golden losses, exact resume, the combined recipe's head hand-over."""

import json

import pytest
import torch

import conftest
from conftest import snapshot

from minirm import toysteer
from minirm.checkpoint import load_model
from minirm.train import main
from minirm.trainer import Trainer

# First losses of a seeded debug run (scaled BT on ToySteer seed 0, 60 prompts), recorded from
# this code; a numerical change anywhere in model, data order, loss or optimizer moves them.
GOLDEN_BT = [1.220211, 1.127299, 1.438686, 1.573308, 1.521343]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toysteer")
    toysteer.generate(folder, seed=0, n_prompts=60, n_val_prompts=20)
    return folder


def run(out, data, *extra):
    args = ["--model", "debug", "--data", str(data), "--out", str(out), "--batch-size", "8",
            "--lr", "1e-3", "--warmup-steps", "2", "--eval-every", "3", "--save-every", "4",
            "--max-length", "128", "--schedule", "constant", *extra]
    main(args)


def losses_of(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().split("\n")
            if line]


def test_batch_rewards_are_each_rows_own(monkeypatch):
    """batch_rewards splits rows by length or shares pairs' prompts; every row still gets the
    reward and gradients it gets alone (float64), in input order, and each layout is taken where
    it pads the fewest positions."""
    from minirm.config import preset
    from minirm.model import Transformer
    from minirm.train import batch_rewards

    model = Transformer(preset("debug", n_outputs=2)).init_weights(seed=5).double()
    calls = []
    reward = model.reward
    monkeypatch.setattr(model, "reward", lambda t, m, p=None, embedded=None: calls.append(
        (tuple(t.shape), p is not None)) or reward(t, m, p, embedded))
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 256, (n,), generator=g).tolist()

    prompt = ids(30)
    cases = {  # name: (sequences, pairs, the passes expected)
        "ratings of three lengths": ([ids(n) for n in (4, 60, 5, 31, 58, 3)], 0,
                                     [((3, 5), False), ((1, 31), False), ((2, 60), False)]),
        "pairs sharing 30 tokens": ([prompt + ids(4), prompt[:20] + ids(14), prompt + ids(5),
                                     prompt[:20] + ids(13)], 2,
                                    [((4, 14), True)]),  # 2 x 30 + 4 x 14 = 116 < 4 x 34
        "pairs of unlike lengths": ([ids(3), ids(40), ids(50), ids(4)], 2,
                                    [((2, 4), False), ((2, 50), False)]),
    }
    for name, (seqs, pairs, passes) in cases.items():
        calls.clear()
        got = batch_rewards(model, seqs, 258, "cpu", pairs=pairs)
        assert calls == passes, name
        want = torch.cat([reward(torch.tensor([s])) for s in seqs])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=name)
        w = torch.randn(want.shape, generator=g, dtype=torch.float64)
        g_got = torch.autograd.grad((got * w).sum(), model.parameters())
        g_want = torch.autograd.grad((want * w).sum(), model.parameters())
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def test_golden_losses(tmp_path, toy_data):
    run(tmp_path / "bt", toy_data, "--objective", "scaled-bt", "--epochs", "1")
    got = losses_of(tmp_path / "bt")[:len(GOLDEN_BT)]
    assert got == pytest.approx(GOLDEN_BT, rel=1e-4, abs=1e-5)
    results = json.loads((tmp_path / "bt" / "results.json").read_text())
    assert 0.0 <= results["val_accuracy"] <= 1.0
    settings = json.loads((tmp_path / "bt" / "config.json").read_text())
    assert settings["objective"] == "scaled-bt" and settings["resolved"]["lr"] == 1e-3


def test_resume_gives_the_same_losses(tmp_path, toy_data, monkeypatch):
    run(tmp_path / "full", toy_data, "--objective", "helpfulness", "--epochs", "1")
    full = losses_of(tmp_path / "full")

    step = Trainer.train_step

    def interrupted(self, *a, **kw):  # Ctrl-C arrives during step 5
        out = step(self, *a, **kw)
        if self.step == 5:
            self.stop_requested = True
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "cut", toy_data, "--objective", "helpfulness", "--epochs", "1")
    assert stop.value.code == 130
    assert (tmp_path / "cut" / "checkpoint" / "trainer_state_rank0.pt").exists()
    assert not (tmp_path / "cut" / "model").exists()
    monkeypatch.setattr(Trainer, "train_step", step)
    run(tmp_path / "cut", toy_data, "--objective", "helpfulness", "--epochs", "1", "--resume")
    assert losses_of(tmp_path / "cut") == full  # bit for bit
    a, _ = load_model(tmp_path / "full" / "model")
    b, _ = load_model(tmp_path / "cut" / "model")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_init_from_keeps_the_regression_head(tmp_path, toy_data):
    run(tmp_path / "reg", toy_data, "--objective", "regression", "--epochs", "0.3")
    reg, cfg = load_model(tmp_path / "reg" / "model")
    assert cfg.n_outputs == 5
    # zero steps of BT would leave it unchanged; check the head is loaded, not re-initialised,
    # by training with lr 0.
    run(tmp_path / "bt", toy_data, "--objective", "bt", "--epochs", "0.5", "--lr", "0",
        "--init-from", str(tmp_path / "reg" / "model"))
    bt, cfg = load_model(tmp_path / "bt" / "model")
    assert cfg.n_outputs == 5
    assert torch.equal(bt.score.weight, reg.score.weight)
    assert torch.equal(bt.score.bias, reg.score.bias)


@pytest.mark.parametrize("argv,match", [
    (["--objective", "bt", "--data", "nope.jsonl"], "nope.jsonl: no such data file"),
    (["--objective", "bt", "--recipe", "paper-table"], "either --objective"),
    (["--objective", "bt", "--data", "{data}", "--batch-size", "0"], "--batch-size must be"),
    (["--model", "llama-9b", "--objective", "bt", "--data", "{data}"], "neither a model preset"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, toy_data, capsys, argv, match):
    argv = [a.replace("{data}", str(toy_data)) for a in argv] + ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


# ---- the output folder: an earlier run is never lost, --resume only continues one ----------

def refused(capsys, argv, match):
    """main(argv) exits 2 with one line on stderr that holds `match`."""
    return conftest.refused(capsys, lambda: main([str(a) for a in argv]), match)


def interrupt_at(monkeypatch, n):
    """Ctrl-C arrives during step n (as in test_resume_gives_the_same_losses)."""
    step = Trainer.train_step

    def interrupted(self, *a, **kw):
        out = step(self, *a, **kw)
        if self.step == n:
            self.stop_requested = True
        return out
    monkeypatch.setattr(Trainer, "train_step", interrupted)
    return step


def test_resume_with_nothing_to_resume_is_refused(tmp_path, toy_data, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out would be runs/... here
    argv = ["--model", "debug", "--objective", "bt", "--data", toy_data, "--resume"]
    refused(capsys, argv, "--resume needs --out RUN, the folder of the interrupted run")
    refused(capsys, argv + ["--out", "typo-dir"], "--resume: no checkpoint in typo-dir; give "
            "--out the folder of an interrupted run, or drop --resume to start a new run")
    refused(capsys, argv + ["--out", "typo-dir", "--force"], "either --resume")
    assert sorted(tmp_path.iterdir()) == []  # no runs/ folder, no typo-dir


def test_out_that_is_a_file_or_cannot_be_made_is_refused(tmp_path, toy_data, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    argv = ["--model", "debug", "--objective", "bt", "--data", toy_data, "--out"]
    refused(capsys, argv + [afile], f"--out {afile} exists and is not a folder; choose "
            "another --out")
    refused(capsys, argv + [afile / "run"], f"{afile} is a file, not a folder")
    refused(capsys, ["--model", "debug", "--out", afile], "exists and is not a folder")  # recipe
    assert afile.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [afile]


def test_a_finished_run_is_replaced_only_with_force(tmp_path, toy_data, capsys):
    keep = tmp_path / "keep-bt"
    run(keep, toy_data, "--objective", "bt", "--epochs", "0.5")
    before = snapshot(keep)
    argv = ["--model", "debug", "--objective", "margin-bt", "--data", toy_data, "--out", keep,
            "--max-length", "128", "--epochs", "0.5"]
    refused(capsys, argv, f"--out {keep} already holds a finished run ({keep / 'results.json'})"
            "; choose another --out or pass --force to replace it")
    assert snapshot(keep) == before
    main([str(a) for a in argv + ["--force"]])
    assert json.loads((keep / "config.json").read_text())["objective"] == "margin-bt"
    assert snapshot(keep) != before


def test_ctrl_c_names_the_out_to_resume_and_resume_checks_the_settings(tmp_path, toy_data,
                                                                      capsys, monkeypatch):
    cut = tmp_path / "cut"
    step = interrupt_at(monkeypatch, 2)
    with pytest.raises(SystemExit):
        run(cut, toy_data, "--objective", "helpfulness", "--epochs", "1")
    assert f"(continue with --out {cut} --resume)" in capsys.readouterr().out
    monkeypatch.setattr(Trainer, "train_step", step)
    before = snapshot(cut)
    argv = ["--model", "debug", "--data", toy_data, "--out", cut, "--objective", "helpfulness",
            "--lr", "1e-3", "--warmup-steps", "2", "--max-length", "128", "--epochs", "1",
            "--schedule", "constant"]
    refused(capsys, argv, f"--out {cut} holds an interrupted run ({cut / 'checkpoint'}); "
            f"continue it with --out {cut} --resume")
    line = refused(capsys, argv + ["--resume", "--batch-size", "64"],
                   "--resume: settings differ from the run in")
    assert "--batch-size 64 (the run has 8)" in line and "--model" not in line, line
    line = refused(capsys, argv + ["--resume", "--batch-size", "8", "--model", "toy"],
                   "--model toy (the run has debug)")
    assert "batch-size" not in line, line
    assert snapshot(cut) == before  # config.json, metrics and checkpoint as they were
    # what may differ does: how often to validate and save
    run(cut, toy_data, "--objective", "helpfulness", "--epochs", "1", "--resume",
        "--eval-every", "5", "--save-every", "50")
    assert json.loads((cut / "results.json").read_text())["steps"] == len(losses_of(cut)) == 15


def test_a_recipe_resumes_from_its_run_folder(tmp_path, toy_data, capsys, monkeypatch):
    """The Ctrl-C line names the recipe's run folder (not the stage's); a rerun without
    --resume is refused, a --resume with another --lr too, and the run then completes."""
    rec = tmp_path / "rec"
    argv = ["--model", "debug", "--data", toy_data, "--out", rec, "--max-length", "128",
            "--batch-size", "16", "--eval-every", "0", "--expo-alphas", "0,1"]
    step = interrupt_at(monkeypatch, 1)
    with pytest.raises(SystemExit):
        main([str(a) for a in argv])
    out = capsys.readouterr().out
    assert f"checkpoint saved to {rec / '1-helpfulness' / 'checkpoint'} (continue with " \
           f"--out {rec} --resume)" in out, out
    monkeypatch.setattr(Trainer, "train_step", step)
    before = snapshot(rec)
    refused(capsys, argv, f"--out {rec} holds an interrupted run")
    refused(capsys, argv + ["--resume", "--lr", "0.1"], "--lr 0.1 (the run has 0.001)")
    assert snapshot(rec) == before
    main([str(a) for a in argv + ["--resume"]])
    assert (rec / "results.json").exists() and (rec / "model" / "config.json").exists()
    refused(capsys, argv, f"--out {rec} already holds a finished run")
