"""Checkpoint loading errors and config parsing: every mismatch names the tensor or file."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minirm.checkpoint import load_model, save_model
from minirm.config import PRESETS, from_hf, preset
from minirm.errors import UserError


@pytest.fixture
def saved(tmp_path):
    model, cfg = load_model("debug", n_outputs=1, seed=0)
    folder = save_model(model, tmp_path / "m")
    return folder


def rewrite(folder, fn):
    path = folder / "model.safetensors"
    state = load_file(path)
    fn(state)
    save_file(state, path)


def test_missing_tensor(saved):
    rewrite(saved, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(saved)


def test_unexpected_tensor(saved):
    rewrite(saved, lambda s: s.__setitem__("model.layers.7.mlp.up_proj.weight", torch.zeros(2)))
    with pytest.raises(UserError, match="unexpected tensor 'model.layers.7.mlp.up_proj.weight'"):
        load_model(saved)


def test_wrong_shape_names_both_shapes(saved):
    rewrite(saved, lambda s: s.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(UserError, match=r"'model.norm.weight' has shape \(63,\).*\(64,\)"):
        load_model(saved)


def test_wrong_dtype(saved):
    rewrite(saved, lambda s: s.__setitem__("model.norm.weight",
                                           torch.ones(64, dtype=torch.int8)))
    with pytest.raises(UserError, match="'model.norm.weight' has dtype torch.int8"):
        load_model(saved)


def test_corrupt_and_missing_files(saved):
    (saved / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="corrupt safetensors file"):
        load_model(saved)
    (saved / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        load_model(saved)
    (saved / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        load_model(saved)


def test_config_mismatch_reports_shape(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="config does not match the weights"):
        load_model(saved)


def test_head_size_mismatch_is_an_error(saved):
    with pytest.raises(UserError, match="reward head has 1 outputs but 5"):
        load_model(saved, n_outputs=5)


def test_fresh_head_on_a_language_model(tmp_path):
    lm, _ = load_model("debug", seed=0)
    folder = save_model(lm, tmp_path / "lm")
    rm, cfg = load_model(folder, n_outputs=5)
    assert cfg.n_outputs == 5 and rm.score.weight.shape == (5, 64)
    assert torch.equal(rm.score.bias, torch.zeros(5))


def test_bfloat16_loading_keeps_head_float32(saved):
    model, _ = load_model(saved, dtype="bfloat16")
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert model.score.weight.dtype == torch.float32


def test_save_replaces_atomically(tmp_path):
    model, _ = load_model("debug", seed=0)
    out = save_model(model, tmp_path / "m")
    save_model(model, out)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left


@pytest.mark.parametrize("bad,match", [
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"architectures": ["LlamaForQuestionAnswering"]}, "architecture"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_configs(tmp_path, bad, match):
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 10, "intermediate_size": 8, **bad}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=match):
        from_hf(tmp_path)


def test_llama31_config_reads_rope_scaling(tmp_path):
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
          "intermediate_size": 14336, "vocab_size": 128256, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "max_position_embeddings": 131072,
          "tie_word_embeddings": False, "bos_token_id": 128000,
          "eos_token_id": [128001, 128008, 128009],
          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert from_hf(tmp_path) == PRESETS["llama-3.1-8b"]


def test_preset_sizes():
    # Published parameter counts: Llama-3.1-8B 8.03B, 70B 70.6B, SmolLM2-135M 134.5M.
    assert preset("llama-3.1-8b").n_params() == pytest.approx(8.03e9, rel=2e-3)
    assert preset("llama-3.1-70b").n_params() == pytest.approx(70.55e9, rel=2e-3)
    assert preset("smollm2-135m").n_params() == pytest.approx(134.5e6, rel=2e-3)
    with pytest.raises(UserError, match="unknown model preset 'llama-3-8b'"):
        preset("llama-3-8b")


def test_saved_folders_get_ordinary_permissions(tmp_path):
    """The temporary folder of an atomic save is private (0700); the finished checkpoint has
    the permissions of any new file under the umask, so other users and tools can read it."""
    import os

    umask = os.umask(0o022)
    try:
        model, _ = load_model("debug", seed=0)
        out = save_model(model, tmp_path / "m")
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o644}
