"""REINFORCE (METHOD.md 7): the formulas by hand, the gradient's direction, re-encoding for a
reward model with another tokenizer, golden numbers and exact resume of a seeded debug run, a
small run that learns, and one-line errors."""

import json
import math

import pytest
import torch

from conftest import refused, snapshot

from minirm import reinforce as R
from minirm.checkpoint import load_model, load_tokenizer, save_model
from minirm.config import preset
from minirm.model import Transformer
from minirm.sft import token_logprobs
from minirm.tokenizer import Tokenizer, chat_prompt
from minirm.trainer import OptimSettings, Trainer

# A seeded debug run (`debug_run`: random debug policy and reward model, 3 rollout batches of
# 4 prompts x 3 samples, 2 optimizer steps each), recorded from this code: a numerical change in
# sampling, scoring, the KL, the baseline, the loss or the optimizer moves them.
GOLDEN = {"reward_mean": [0.0089958198, 0.036720023, 0.013114405],
          "kl": [0.0, 0.1690104, 0.15487276],
          "loss": [-0.0038984888, 0.0030656182, 0.0025722646],
          "response_length": [1.75, 1.6666666, 1.6666666]}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on cores shared with other jobs
    (two threads spin-wait on each other); it also fixes the golden numbers' summation order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- the formulas, by hand ---------------------------------------------------------------

def test_rloo_baseline_and_advantages_by_hand():
    R_ = torch.tensor([1., 2., 3., 6.,    # prompt A: all four ended
                       5., 1., 4., 2.,    # prompt B: sample 1 did not end
                       7., 3., 9., 1.])   # prompt C: only sample 1 ended
    ended = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    A, b = R.rloo_advantages(R_, ended, k=4)
    nan = float("nan")
    # A: b_0 = (2+3+6)/3, b_1 = (1+3+6)/3, b_2 = (1+2+6)/3, b_3 = (1+2+3)/3
    # B: over the ended 0, 2, 3: b_0 = (4+2)/2, b_2 = (5+2)/2, b_3 = (5+4)/2; sample 1: none
    # C: sample 1 has no ended sibling, the others did not end: no baseline, advantage 0
    want_b = [11 / 3, 10 / 3, 3, 2, 3, nan, 3.5, 4.5, nan, nan, nan, nan]
    want_A = [1 - 11 / 3, 2 - 10 / 3, 0, 4, 2, 0, 0.5, -2.5, 0, 0, 0, 0]
    assert A.tolist() == pytest.approx(want_A, abs=1e-6)
    assert b.tolist() == pytest.approx(want_b, abs=1e-6, nan_ok=True)


def test_kl_estimators_by_hand_and_zero_for_the_same_model():
    logp = torch.tensor([[-1.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])          # the third token is not the response's
    # log ratios 0.5 and -1
    assert R.sequence_kl(logp, ref, mask, "abs").item() == pytest.approx(0.75)
    assert R.sequence_kl(logp, ref, mask, "k1").item() == pytest.approx(-0.25)
    k3 = ((math.exp(-0.5) - 1 + 0.5) + (math.exp(1) - 1 - 1)) / 2
    assert R.sequence_kl(logp, ref, mask, "k3").item() == pytest.approx(k3)
    for est in R.KL_ESTIMATORS:
        assert R.sequence_kl(logp, logp, mask, est).item() == 0.0


@pytest.mark.parametrize("estimator", R.KL_ESTIMATORS)
def test_kl_term_is_zero_when_policy_is_the_reference(estimator):
    rl = make_rl(R.ReinforceSettings(k=2, max_new_tokens=6, kl_estimator=estimator))
    ro = rl.rollout([chat_prompt("Copy: abc"), chat_prompt("Add: 1+2")])
    assert ro.kl.shape == (4,) and torch.all(ro.kl == 0)


def test_policy_loss_by_hand():
    logp = torch.tensor([[-1.0, -3.0, -5.0], [-2.0, -4.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    A = torch.tensor([2.0, -1.0])
    # -(1/2) [mean(-1, -3) * 2 + mean(-2, -4, 0) * -1] = -(1/2) (-4 + 2) = 1
    assert R.policy_loss(logp, mask, A).item() == pytest.approx(1.0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_step_moves_the_log_prob_with_the_advantage(sign):
    torch.manual_seed(0)
    model = Transformer(preset("debug")).init_weights(seed=0)
    tokens = torch.tensor([[256, 85, 58, 32, 97, 98, 257]])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    response = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.float32)  # "ab<eos>"
    A = torch.tensor([sign])

    def seq_logp():
        with torch.no_grad():
            return (token_logprobs(model, tokens, mask) * response).sum().item()

    def loss_fn(_):
        return R.policy_loss(token_logprobs(model, tokens, mask), response, A), 1, {}

    before = seq_logp()
    trainer = Trainer(model, OptimSettings(lr=1e-3, warmup_steps=0, weight_decay=0.01),
                      "unused", 1)
    trainer.update([None], loss_fn, 1)
    after = seq_logp()
    assert (after - before) * sign > 0.01, (before, after)


# ---- the reward model's view -------------------------------------------------------------

class RecordingReader:
    """A reward "model" that rewards responses whose last character is a lowercase letter,
    and records the ids it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.max_length, self.seen = tokenizer, 256, []

    def rewards(self, seqs, group=1):
        self.seen += seqs
        self.group = group  # runs of `group` sequences share a prompt
        return torch.tensor([float(97 <= s[-2] <= 122) for s in seqs])


def make_rl(s, reader=None, policy="debug"):
    s = R.resolve(s, preset("debug"))
    tok = load_tokenizer(policy)
    reader = reader or R.load_reward_reader(s, "debug", "float32", "cpu", None)
    model, _ = load_model(policy, seed=0)
    reference, _ = load_model(policy, seed=0)
    reference.requires_grad_(False)
    return R.Reinforce(model, reference, tok, reader, s)


def chatml_byte_tokenizer():
    """The byte-level vocabulary plus ChatML's two tokens: another tokenizer and format."""
    tok = Tokenizer.byte_level()
    tok._tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok._tok, "chatml", "<|im_start|>", "<|im_end|>", "<|pad|>")


def test_generated_ids_are_scored_as_they_are_with_the_same_tokenizer():
    reader = RecordingReader(Tokenizer.byte_level())
    rl = make_rl(R.ReinforceSettings(k=2, max_new_tokens=5, seed=1), reader)
    assert rl.same_tokenizer
    prompts = [chat_prompt("Copy: abc")]
    ro = rl.rollout(prompts)
    for seq, row, m in zip(reader.seen, ro.tokens, ro.mask):
        assert seq == row[m].tolist()  # prompt ids + generated ids, the stop id included
    assert reader.group == 2  # the k = 2 samples of the prompt, one after the other


def test_response_is_re_encoded_for_another_chat_format():
    other = chatml_byte_tokenizer()
    reader = RecordingReader(other)
    rl = make_rl(R.ReinforceSettings(k=2, max_new_tokens=5, seed=1), reader)
    assert not rl.same_tokenizer
    prompts = [chat_prompt("Copy: abc")]
    ro = rl.rollout(prompts)
    for seq, text in zip(reader.seen, ro.texts):
        want = other.encode_chat(prompts[0] + [{"role": "assistant", "content": text}]).ids
        assert seq == want and seq[-1] == other.eos_id


# ---- runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    """A random debug policy whose responses mostly end: besides <|eos|>, every byte >= 128
    ends a response (config.json may list several eos ids), half the vocabulary."""
    folder = tmp_path_factory.mktemp("policy")
    model = Transformer(preset("debug", eos_ids=(257, *range(128, 256)))).init_weights(seed=0)
    return str(save_model(model, folder / "model", Tokenizer.byte_level()))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    from minirm import toysteer
    rows = [{"prompt": p} for p in toysteer.sample_prompts(12, seed=0)]
    rows[1] = {"prompt": [{"role": "user", "content": rows[1]["prompt"]}]}  # a message list
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def debug_run(out, policy, prompts, *extra):
    R.main(["--policy", policy, "--reward-model", "debug", "--prompts", prompts,
            "--out", str(out), "--k", "3", "--prompts-per-step", "4", "--max-new-tokens", "8",
            "--steps", "3", "--optimizer-steps", "2", "--lr", "3e-3", "--save-every", "2",
            *extra])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step_time"} for r in rows]


def interrupted_run(out, policy_folder, prompts_file, monkeypatch):
    """debug_run with Ctrl-C arriving during rollout batch 1 (raises SystemExit 130)."""
    step = R.Reinforce.step

    def interrupted(self, trainer, *a, **kw):
        metrics = step(self, trainer, *a, **kw)
        trainer.stop_requested = True
        return metrics

    with monkeypatch.context() as m:
        m.setattr(R.Reinforce, "step", interrupted)
        return debug_run(out, policy_folder, prompts_file)


def test_golden_debug_run(tmp_path, policy_folder, prompts_file):
    rows = debug_run(tmp_path, policy_folder, prompts_file)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "kl", "response_length", "ended_fraction", "task_score"):
        assert key in rows[0], key
    got = {k: [r[k] for r in rows] for k in GOLDEN}
    for k in GOLDEN:
        assert got[k] == pytest.approx(GOLDEN[k], rel=1e-4, abs=1e-6), (k, got[k])
    assert rows[0]["kl"] == 0.0  # the first rollout comes from the reference itself
    assert (tmp_path / "model" / "config.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["k"] == 3


def test_resume_after_interruption_is_exact(tmp_path, policy_folder, prompts_file,
                                            monkeypatch):
    full = debug_run(tmp_path / "full", policy_folder, prompts_file)
    with pytest.raises(SystemExit) as stop:
        interrupted_run(tmp_path / "cut", policy_folder, prompts_file, monkeypatch)
    assert stop.value.code == 130
    # The sampler's state came back with the checkpoint: the same rollouts, bit for bit.
    assert debug_run(tmp_path / "cut", policy_folder, prompts_file, "--resume") == full


def test_a_small_run_learns_what_the_reward_wants(tmp_path, policy_folder):
    """A debug policy and a hand-made reward (1 when the response ends in a lowercase letter,
    about 1 in 10 at first): the mean reward rises within 15 rollout batches (to about 1)."""
    from minirm import toysteer
    reader = RecordingReader(Tokenizer.byte_level())
    rl = make_rl(R.ReinforceSettings(k=4, max_new_tokens=4, beta=0.0), reader, policy_folder)
    trainer = Trainer(rl.policy, OptimSettings(lr=1e-2, warmup_steps=0, weight_decay=0.01),
                      tmp_path, 100)
    prompts = [chat_prompt(p) for p in toysteer.sample_prompts(8, seed=0)]
    rewards = [rl.step(trainer, prompts)["reward_mean"] for _ in range(15)]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.5, rewards


# ---- bad input -----------------------------------------------------------------------------

def lm_folder(tmp_path, name, **cfg):
    model = Transformer(preset("debug", **cfg)).init_weights(seed=0)
    return str(save_model(model, tmp_path / name, Tokenizer.byte_level()))


BAD_PROMPTS = {
    "malformed": ('{"prompt": "Copy: abc"}\n{"prompt": \n', "line 2: malformed JSON"),
    "empty": ('{"prompt": "  "}\n', "line 1: field 'prompt' is empty"),
    "no-prompt": ('{"text": "Copy: abc"}\n', "line 1: field 'prompt' is missing"),
    "answered": ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", '
                 '"content": "Hello"}]}\n', "line 1: field 'messages' is not a prompt"),
    "no-rows": ("\n", "holds no prompts"),
}


@pytest.mark.parametrize("case,match", [
    ("k1", "--k 1: the leave-one-out baseline"),
    *[(case, match) for case, (_, match) in BAD_PROMPTS.items()],
    ("no-head", "no reward head"),
    ("no-eos", "the policy has no eos token"),
    ("missing", "nope.jsonl not found"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, case, match):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Copy: abc"}\n')
    argv = {"policy": "debug", "reward-model": "debug", "prompts": str(good), "k": "2"}
    if case == "k1":
        argv["k"] = "1"
    elif case in BAD_PROMPTS:
        (tmp_path / "p.jsonl").write_text(BAD_PROMPTS[case][0])
        argv["prompts"] = str(tmp_path / "p.jsonl")
    elif case == "no-head":
        argv["reward-model"] = lm_folder(tmp_path, "lm")
    elif case == "no-eos":
        argv["policy"] = lm_folder(tmp_path, "noeos", eos_ids=())
    elif case == "missing":
        argv["prompts"] = str(tmp_path / "nope.jsonl")
    flat = [x for k, v in argv.items() for x in (f"--{k}", v)]
    with pytest.raises(SystemExit) as e:
        R.main(flat + ["--out", str(tmp_path / "o"), "--steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_toy_models_fall_back_to_training_once(tmp_path):
    """Without the shipped weights, the toy pipeline trains the model once, and a rerun into
    the same folder reuses it; a given model or the shipped folder wins."""
    _shipped_or_trained = R._shipped_or_trained
    calls, lines = [], []

    def train(folder):
        calls.append(folder)
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "config.json").write_text("{}")

    missing, folder = tmp_path / "weights" / "none", tmp_path / "run" / "policy"
    got = _shipped_or_trained(None, missing, folder, train, "the policy", lines.append)
    assert got == str(folder / "model") and calls == [folder]
    assert len(lines) == 1 and str(missing) in lines[0] and "the policy" in lines[0]
    assert _shipped_or_trained(None, missing, folder, train, "the policy", lines.append) \
        == str(folder / "model") and calls == [folder]  # trained once
    shipped = tmp_path / "weights" / "shipped"
    shipped.mkdir(parents=True)
    assert _shipped_or_trained(None, shipped, folder, train, "x", lines.append) == str(shipped)
    assert _shipped_or_trained("my/model", shipped, folder, train, "x", lines.append) == "my/model"
    assert calls == [folder] and len(lines) == 2


# ---- the output folder: an earlier run is never lost, --resume only continues one ----------

def test_out_resume_and_force(tmp_path, policy_folder, prompts_file, capsys, monkeypatch):
    """--out a file, --resume with nothing to resume or other settings than the interrupted
    run's, an earlier run without --force: one line each, status 2, nothing written."""
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    refused(capsys, lambda: debug_run(afile, policy_folder, prompts_file),
             f"--out {afile} exists and is not a folder")
    refused(capsys, lambda: debug_run(tmp_path / "typo", policy_folder, prompts_file,
                                       "--resume"), f"--resume: no checkpoint in {tmp_path}")
    assert afile.read_text() == "keep me" and not (tmp_path / "typo").exists()

    cut = tmp_path / "cut"
    with pytest.raises(SystemExit):
        interrupted_run(cut, policy_folder, prompts_file, monkeypatch)
    assert f"(continue with --out {cut} --resume)" in capsys.readouterr().out
    before = snapshot(cut)
    refused(capsys, lambda: debug_run(cut, policy_folder, prompts_file),
             f"--out {cut} holds an interrupted run")
    refused(capsys, lambda: debug_run(cut, policy_folder, prompts_file, "--resume", "--k",
                                       "2"), "--k 2 (the run has 3)")
    assert snapshot(cut) == before
    debug_run(cut, policy_folder, prompts_file, "--resume")
    before = snapshot(cut)
    refused(capsys, lambda: debug_run(cut, policy_folder, prompts_file),
             f"--out {cut} already holds a finished run ({cut / 'model'})")
    assert snapshot(cut) == before
    assert len(debug_run(cut, policy_folder, prompts_file, "--force", "--steps", "1")) == 1
