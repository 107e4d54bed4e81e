"""Supervised fine-tuning: the loss masks the prompt (by hand), runs on chat JSONL and on
ToySteer, and bad rows are one-line errors."""

import json
import math

import pytest
import torch

from conftest import refused, snapshot

from minirm import sft
from minirm.checkpoint import load_model
from minirm.data import Encoded


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on cores shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_response_mask_by_hand():
    # Row 0: 5 tokens, response from index 3; row 1: 4 tokens (then padding), response from 2.
    # Column t is the target token t + 1.
    got = sft.response_mask([3, 2], [5, 4], T=5)
    assert got.tolist() == [[False, False, True, True],
                            [False, True, True, False]]


class FixedLogits(torch.nn.Module):
    """A "model" whose next-token distribution at each position is given."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(probs).log()[None])

    def forward(self, tokens, mask=None):
        return self.logits_from(self.norm(self.body(tokens, mask)))

    # The model's stages, with the "hidden states" the logits themselves.
    def embed_together(self, *tokens):
        return [None for _ in tokens]

    def body(self, tokens, mask=None, embedded=None):
        return self.logits

    def norm(self, h):
        return h

    def logits_from(self, h):
        return h


def test_loss_masks_prompt_tokens_by_hand():
    # <bos>=0, prompt 1 2, response 3 1 (the last is its end token); vocabulary of 4.
    seq = Encoded(ids=[0, 1, 2, 3, 1], start=3)
    probs = [[0.97, 0.01, 0.01, 0.01],   # t=0 -> target 1 (prompt): p = 0.01, not counted
             [0.97, 0.01, 0.01, 0.01],   # t=1 -> target 2 (prompt): p = 0.01, not counted
             [0.20, 0.10, 0.20, 0.50],   # t=2 -> target 3 (response): p = 0.5
             [0.25, 0.25, 0.25, 0.25],   # t=3 -> target 1 (response end): p = 0.25
             [0.97, 0.01, 0.01, 0.01]]   # t=4: nothing follows
    loss, n = sft.sft_loss(FixedLogits(probs), [seq], pad_id=0)
    assert n == 2
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2, rel=1e-6)


def test_gradient_never_reaches_prompt_predictions():
    seq = Encoded(ids=[0, 1, 2, 3, 1], start=3)
    model = FixedLogits([[0.25] * 4] * 5)
    loss, _ = sft.sft_loss(model, [seq], pad_id=0)
    loss.backward()
    grad = model.logits.grad[0].abs().sum(-1)
    assert grad[:2].tolist() == [0.0, 0.0] and grad[4].item() == 0.0
    assert grad[2].item() > 0 and grad[3].item() > 0


@pytest.mark.parametrize("tied", [False, True])
def test_logprobs_at_targets_only(tied):
    """token_logprobs(targets=) runs the output layer at the wanted predictions alone: the same
    log-probs and gradients there as the full logits give, 0 elsewhere (float64)."""
    from minirm.config import preset
    from minirm.model import Transformer

    model = Transformer(preset("debug", tie_embeddings=tied)).init_weights(seed=2).double()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 8:] = False
    targets = sft.response_mask([4, 2, 9], [12, 8, 12], 12)
    full = sft.token_logprobs(model, tokens, mask)
    got = sft.token_logprobs(model, tokens, mask, targets=targets)
    torch.testing.assert_close(got, full * targets, rtol=0, atol=1e-12)
    w = torch.randn(full.shape, generator=g, dtype=torch.float64)
    g_got = torch.autograd.grad((got * w).sum(), model.parameters())
    g_want = torch.autograd.grad((full * targets * w).sum(), model.parameters())
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_grouped_logprobs_are_each_rows_own():
    """grouped_logprobs runs rows of unlike lengths as batches of similar length; each row gets
    the log-probs and gradients it gets alone (float64), in input order, 0 off its targets."""
    from minirm.config import preset
    from minirm.data import collate
    from minirm.model import Transformer

    model = Transformer(preset("debug")).init_weights(seed=4).double()
    g = torch.Generator().manual_seed(1)
    lengths, starts = [5, 40, 6, 38, 4], [2, 10, 3, 30, 1]
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    tokens, mask = collate(seqs, 258)
    targets = sft.response_mask(starts, lengths, tokens.shape[1])
    got = sft.grouped_logprobs(model, tokens, mask, targets)
    assert got.shape == (5, 39)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    g_got = torch.autograd.grad((got * w).sum(), model.parameters())
    want = torch.zeros_like(got)
    total = 0
    for i, s in enumerate(seqs):  # each row alone, unpadded
        x = torch.tensor([s])
        lp = sft.token_logprobs(model, x, None) * targets[i, :len(s) - 1]
        want[i, :len(s) - 1] = lp[0].detach()
        total = total + (lp[0] * w[i, :len(s) - 1]).sum()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g_want = torch.autograd.grad(total, model.parameters())
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_logprobs_run_each_prompt_once(checkpointing):
    """REINFORCE's k samples of a prompt: shared_prompt_logprobs runs each distinct prompt once
    and gives the log-probs and gradients of grouped_logprobs (float64; that test checks those
    against each row alone), with activation checkpointing too. Rows whose prompts are all
    distinct, or whose targets are not one run, take grouped_logprobs' own path."""
    from minirm.config import preset
    from minirm.data import collate
    from minirm.model import SharedPrompts, Transformer

    model = Transformer(preset("debug")).init_weights(seed=4).double()
    model.activation_checkpointing = checkpointing
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (15, 22, 1)]
    rows = [0, 0, 1, 2, 1, 1, 0]  # a 1-token response, responses of 30 tokens and more
    responses = [torch.randint(0, 256, (n,), generator=g).tolist()
                 for n in (3, 1, 30, 7, 34, 2, 9)]
    seqs = [prompts[r] + x for r, x in zip(rows, responses)]
    tokens, mask = collate(seqs, 258)
    targets = sft.response_mask([len(prompts[r]) for r in rows], list(map(len, seqs)),
                                tokens.shape[1])
    passes, body = [], model.body

    def spy(tokens, *args, cache=None, **kwargs):
        passes.append((tokens.shape, cache and type(cache)))
        return body(tokens, *args, cache=cache, **kwargs)

    model.body = spy
    want = sft.grouped_logprobs(model, tokens, mask, targets)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    g_want = torch.autograd.grad((want * w).sum(), model.parameters())
    passes.clear()
    got = sft.shared_prompt_logprobs(model, tokens, mask, targets)
    assert passes[0] == ((3, 22), SharedPrompts)  # the distinct prompts, left-padded
    assert sum(shape[0] for shape, _ in passes[1:]) == 7
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g_got = torch.autograd.grad((got * w).sum(), model.parameters())
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Distinct prompts; a gap in row 0's targets; row 0's targets stopping before its end;
    # row 0 left-padded.
    for keep, case in (([1, 3, 2], None), (list(range(7)), "gap"), (list(range(7)), "short"),
                       (list(range(7)), "left")):
        t, m, tg = tokens[keep], mask[keep], targets[keep].clone()
        n = len(seqs[0])
        if case == "gap":
            tg[0, len(prompts[0])] = False
        elif case == "short":
            tg[0, n - 2] = False
        elif case == "left":  # row 0 moved to the right end of its row, targets with it
            shift = t.shape[1] - n
            t[0], m[0], tg[0] = t[0].roll(shift), m[0].roll(shift), tg[0].roll(shift)
        passes.clear()
        got = sft.shared_prompt_logprobs(model, t, m, tg)
        assert all(cache is None for _, cache in passes)
        torch.testing.assert_close(got, sft.grouped_logprobs(model, t, m, tg), rtol=0, atol=0)


def write_chats(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CHATS = [
    {"messages": [{"role": "user", "content": "Copy: abc"},
                  {"role": "assistant", "content": "abc"}]},
    {"prompt": "Copy: xyz", "response": "xyz"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "response": "Hello."},
] * 6


def test_finetune_on_chat_jsonl_then_again_from_the_folder(tmp_path):
    data = write_chats(tmp_path / "chats.jsonl", CHATS)
    out = tmp_path / "run"
    sft.main(["--model", "debug", "--data", data, "--out", str(out), "--epochs", "4",
              "--batch-size", "6", "--lr", "1e-2", "--warmup-steps", "1", "--eval-every", "0"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert json.loads((out / "config.json").read_text())["resolved"]["steps"] == 12
    model, cfg = load_model(out / "model")
    assert cfg.n_outputs == 0
    # A folder is fine-tuned with the fine-tuning defaults (lr 1e-5), here for one step.
    sft.main(["--model", str(out / "model"), "--data", data, "--val", data, "--out",
              str(tmp_path / "again"), "--batch-size", "18"])
    again = json.loads((tmp_path / "again" / "config.json").read_text())["resolved"]
    assert again["lr"] == 1e-5 and again["steps"] == 1
    assert "val_loss" in json.loads((tmp_path / "again" / "metrics.jsonl").read_text())


def test_toysteer_default_path(tmp_path, capsys):
    sft.main(["--model", "debug", "--toy-prompts", "40", "--epochs", "1", "--out",
              str(tmp_path)])
    assert (tmp_path / "data" / "train.jsonl.gz").exists()
    assert (tmp_path / "model" / "config.json").exists()
    text = capsys.readouterr().out
    assert "encoded 80 conversations" in text          # both rows of every prompt
    assert "greedy: true task score" in text and "sampled (T=1): true task score" in text


@pytest.mark.parametrize("row,match", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "must end with the assistant's"),
    ({"prompt": "Hi"}, "field 'response' is missing"),
    ({"text": "Hi"}, "field 'messages' is missing"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "must be a message with a role"),
])
def test_bad_rows_are_one_line_and_status_2(tmp_path, capsys, row, match):
    data = write_chats(tmp_path / "bad.jsonl", [CHATS[0], row])
    with pytest.raises(SystemExit) as e:
        sft.main(["--model", "debug", "--data", data, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and "line 2" in err[0], err


# ---- the output folder: an earlier run is never lost, --resume only continues one ----------

def _refused(capsys, argv, match):
    return refused(capsys, lambda: sft.main([str(a) for a in argv]), match)


def test_out_resume_and_force(tmp_path, capsys, monkeypatch):
    """--out a file: refused; an earlier run there: refused without --force; --resume with no
    checkpoint, or with other settings than the interrupted run's: refused, nothing written;
    Ctrl-C names the --out to resume."""
    from minirm.trainer import Trainer

    data = write_chats(tmp_path / "chats.jsonl", CHATS)
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    argv = ["--model", "debug", "--data", data, "--epochs", "2", "--batch-size", "6",
            "--warmup-steps", "1", "--eval-every", "0", "--out"]
    _refused(capsys, argv + [afile], f"--out {afile} exists and is not a folder")
    _refused(capsys, argv + [afile / "x"], f"{afile} is a file, not a folder")
    assert afile.read_text() == "keep me"
    _refused(capsys, argv + [tmp_path / "typo", "--resume"],
             f"--resume: no checkpoint in {tmp_path / 'typo'}")
    _refused(capsys, argv[:-1] + ["--resume"], "--resume needs --out RUN")
    assert not (tmp_path / "typo").exists()

    done = tmp_path / "done"
    sft.main([str(a) for a in argv + [done]])
    before = snapshot(done)
    _refused(capsys, argv + [done, "--lr", "1e-2"], f"--out {done} already holds a finished "
             "run")
    assert snapshot(done) == before
    sft.main([str(a) for a in argv + [done, "--lr", "1e-2", "--force"]])
    assert json.loads((done / "config.json").read_text())["lr"] == 1e-2

    step = Trainer.train_step

    def interrupted(self, *a, **kw):  # Ctrl-C arrives during step 2
        out = step(self, *a, **kw)
        self.stop_requested = self.step == 2
        return out
    monkeypatch.setattr(Trainer, "train_step", interrupted)
    cut = tmp_path / "cut"
    with pytest.raises(SystemExit):
        sft.main([str(a) for a in argv + [cut]])
    assert f"(continue with --out {cut} --resume)" in capsys.readouterr().out
    monkeypatch.setattr(Trainer, "train_step", step)
    before = snapshot(cut)
    _refused(capsys, argv + [cut], f"--out {cut} holds an interrupted run")
    line = _refused(capsys, argv + [cut, "--resume", "--batch-size", "3"],
                    "--batch-size 3 (the run has 6)")
    assert "--model" not in line and "--epochs" not in line, line
    assert snapshot(cut) == before
    sft.main([str(a) for a in argv + [cut, "--resume", "--save-every", "5"]])
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 6  # steps 1 to 6, once
