"""Shared fixtures: tiny random Hugging Face Llama checkpoints made by `transformers` itself."""

import os
import warnings
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def make_hf_llama(folder, seed=0, seq_cls=0, **overrides):
    """Save a tiny random LlamaForCausalLM (or ForSequenceClassification) with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=2)
    kw.update(overrides)
    if seq_cls:
        kw["num_labels"] = seq_cls
    cfg = transformers.LlamaConfig(**kw)
    torch.manual_seed(seed)
    cls = (transformers.LlamaForSequenceClassification if seq_cls
           else transformers.LlamaForCausalLM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(cfg).eval()
        # Random init leaves norms at one; perturb them so the test sees their weights.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(folder)
    return model


@pytest.fixture
def hf_llama(tmp_path):
    def make(**kw):
        folder = tmp_path / f"hf{len(list(tmp_path.iterdir()))}"
        return make_hf_llama(folder, **kw), folder
    return make


def snapshot(path):
    """Every file under `path` (or the file itself) with its bytes: a byte-for-byte check that
    a refused command wrote, moved and deleted nothing."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def refused(capsys, call, match):
    """call() exits with status 2 and one line on stderr, "error: ...", holding `match`;
    returns that line."""
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as e:
        call()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert match in err[0], err
    return err[0]

