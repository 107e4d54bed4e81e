"""`python -m minirm.plan`: per-rank shard sizes against the whole model, and its bad input."""

import json

import pytest

from minirm import plan
from minirm.config import preset


def run(*argv):
    return plan.main(list(argv))


def replicated(cfg):
    """Parameters every tp rank holds whole: the RMSNorm gains and the reward head."""
    return (2 * cfg.n_layers + 1) * cfg.dim + (cfg.dim + 1) * cfg.n_outputs


@pytest.mark.parametrize("model,tp,n_outputs", [
    ("llama-3.1-70b", 8, 0), ("llama-3.1-8b", 4, 1), ("smollm2-135m", 3, 0),
    ("llama-3.2-1b", 2, 0)])
def test_shards_add_up_to_the_whole_model(model, tp, n_outputs, capsys):
    r = run("--model", model, "--tp", str(tp), "--n-outputs", str(n_outputs))
    cfg = preset(model, n_outputs=n_outputs)
    whole = cfg.n_params() + (cfg.dim + 1) * n_outputs
    if n_outputs and not cfg.tie_embeddings:
        whole -= cfg.vocab_size * cfg.dim  # a reward model has no language-model head
    assert r["params_total"] == whole
    # Sharded tensors split exactly (these vocabularies divide by tp), replicated ones repeat.
    assert r["params_per_rank"] * tp - (tp - 1) * replicated(cfg) == whole


def test_llama_70b_at_tp8(tmp_path, capsys):
    out = tmp_path / "plan.json"
    run("--model", "llama-3.1-70b", "--tp", "8", "--dp", "4", "--seq", "4096", "--batch", "1",
        "--json", str(out))
    printed = capsys.readouterr().out
    assert "8.82 B  per rank" in printed and "17.64 GB  bf16" in printed
    r = json.loads(out.read_text())
    assert r["params_per_rank"] == pytest.approx(8.8e9, rel=0.01)
    b = r["bytes_per_rank"]
    assert b["weights"] == pytest.approx(17.6e9, rel=0.01)
    assert b["gradients"] == b["weights"] and b["optimizer"] == 8 * r["params_per_rank"]
    assert b["total"] == b["weights"] + b["gradients"] + b["optimizer"] + b["activations"]
    assert r["activations_with_checkpointing"] < b["activations"]
    assert r["fits"] is False  # 163 GB: replicated AdamW states do not fit an 80 GB GPU
    r = run("--model", "llama-3.1-70b", "--tp", "8", "--gpu-memory", "141GB", "--dtype", "bf16")
    assert r["fits_with_checkpointing"] is True


def test_activations_scale_with_tokens_and_shrink_with_tp():
    a = run("--model", "llama-3.1-8b", "--seq", "1024")["bytes_per_rank"]["activations"]
    b = run("--model", "llama-3.1-8b", "--seq", "2048")["bytes_per_rank"]["activations"]
    c = run("--model", "llama-3.1-8b", "--seq", "1024", "--batch", "2")
    assert b == 2 * a == c["bytes_per_rank"]["activations"]
    d = run("--model", "llama-3.1-8b", "--seq", "1024", "--tp", "2")
    assert d["bytes_per_rank"]["activations"] < a
    ref = run("--model", "llama-3.1-8b", "--seq", "1024", "--attention", "reference")
    assert ref["bytes_per_rank"]["activations"] > a  # the T x T probabilities


def test_fp32_and_master_weights():
    r = run("--model", "llama-3.1-8b", "--dtype", "fp32", "--master-weights")
    n = r["params_per_rank"]
    assert r["bytes_per_rank"]["weights"] == 4 * n and r["bytes_per_rank"]["optimizer"] == 12 * n


def test_model_folder(tmp_path):
    from minirm.checkpoint import load_model, save_model
    model, cfg = load_model("debug", n_outputs=1)
    folder = save_model(model, tmp_path / "m")
    r = run("--model", str(folder), "--tp", "2")
    assert r["params_total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("argv,message", [
    (["--model", "llama-3.1-70b", "--tp", "3"],
     "error: n_kv_heads=8 is not divisible by tp=3; use tp in 1, 2, 4, 8"),
    (["--model", "llama-3.1-8b", "--gpu-memory", "lots"],
     "error: --gpu-memory 'lots': expected a size like 80GB or 141GiB"),
    (["--model", "llama-3-8b"], "error: --model llama-3-8b: neither a preset"),
    (["--model", "debug", "--seq", "0"], "error: --seq must be at least 1, got 0"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_only_rank_0_prints_errors(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        run("--model", "llama-3.1-70b", "--tp", "3")
    assert e.value.code == 2 and capsys.readouterr().err == ""
