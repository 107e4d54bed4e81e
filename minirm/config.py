"""Model configuration: one dataclass with derived sizes, named presets, and `from_hf`.

Every preset cites where its numbers come from. `from_hf` reads a Hugging Face Llama
`config.json` and refuses anything it cannot reproduce exactly (another architecture, another
rope type) instead of approximating it.
"""

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from minirm.errors import UserError

ATTENTION_BACKENDS = ("reference", "flash", "sdpa")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")


def check_rope_scaling(rope: dict):
    """Llama-3 scaling needs all four numbers, each positive, and high_freq > low_freq."""
    if not isinstance(rope, dict):
        raise UserError(f"rope_scaling={rope!r} must be an object with "
                        f"{', '.join(ROPE_SCALING_KEYS)}")
    missing = [k for k in ROPE_SCALING_KEYS if k not in rope]
    if missing:
        raise UserError(f"llama3 rope scaling lacks {', '.join(missing)}; "
                        f"it needs {', '.join(ROPE_SCALING_KEYS)}")
    for k in ROPE_SCALING_KEYS:
        if not _is_number(rope[k]) or not 0 < rope[k] < math.inf:
            raise UserError(f"rope scaling {k}={rope[k]!r} must be a positive number")
    if rope["high_freq_factor"] <= rope["low_freq_factor"]:
        raise UserError(f"rope scaling high_freq_factor={rope['high_freq_factor']} must be "
                        f"above low_freq_factor={rope['low_freq_factor']}")


@dataclass
class ModelConfig:
    dim: int = 64                    # hidden size
    n_layers: int = 2
    n_heads: int = 4                 # query heads
    n_kv_heads: int = 2              # key/value heads (grouped-query attention when < n_heads)
    vocab_size: int = 256
    ffn_dim: int = 128               # SwiGLU inner size
    head_dim: int | None = None      # derived: dim // n_heads unless a checkpoint says otherwise
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}, or None for plain RoPE.
    rope_scaling: dict | None = None
    max_seq_len: int = 512
    tie_embeddings: bool = False
    n_outputs: int = 0               # reward head outputs; 0 = a plain language model
    # One of ATTENTION_BACKENDS: "reference" is the readable path, "flash" the hand-written
    # FlashAttention-2, "sdpa" PyTorch's fused kernel (the fastest, so the default).
    attention: str = "sdpa"
    flash_block: int = 128           # key block size of the flash backend (benchmarks/README.md)
    bos_id: int | None = None
    eos_ids: tuple = ()              # generation stops at any of these
    pad_id: int | None = None

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim",
                     "max_seq_len", "flash_block", "head_dim"):
            value = getattr(self, name)
            if value is None and name == "head_dim":
                continue
            if not _is_int(value) or value < 1:
                raise UserError(f"{name}={value!r} must be a positive integer")
        if self.n_outputs is None or not _is_int(self.n_outputs) or self.n_outputs < 0:
            raise UserError(f"n_outputs={self.n_outputs!r} must be a whole number, 0 or more")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise UserError(f"{name}={value!r} must be a positive number")
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        self.eos_ids = tuple(self.eos_ids)
        for name, ids in (("bos_id", [self.bos_id]), ("pad_id", [self.pad_id]),
                          ("eos_ids", self.eos_ids)):
            for i in ids:
                if i is not None and (not _is_int(i) or not 0 <= i < self.vocab_size):
                    raise UserError(f"{name}={i!r} must be a token id in 0..{self.vocab_size - 1}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.attention not in ATTENTION_BACKENDS:
            raise UserError(f"attention backend {self.attention!r} is unknown; "
                            f"choose one of {', '.join(ATTENTION_BACKENDS)}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not divisible by "
                            f"n_kv_heads={self.n_kv_heads}; grouped-query attention needs it")
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} is odd; RoPE rotates pairs of dimensions")

    @property
    def n_rep(self) -> int:
        """Query heads that share one key/value head."""
        return self.n_heads // self.n_kv_heads

    def n_params(self, include_embedding: bool = True) -> int:
        d, f, hd = self.dim, self.ffn_dim, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d
        out = 0 if self.tie_embeddings else self.vocab_size * d
        total = self.n_layers * per_layer + d + out
        return total + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N plus attention, as in nanoGPT/PaLM."""
        n = self.n_params(include_embedding=False)
        attn = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6 * n + attn

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


LLAMA3_ROPE_SCALING = {  # METHOD.md section 10: Llama-3.1 8B and 70B
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA32_ROPE_SCALING = {  # meta-llama/Llama-3.2-1B config.json
    "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS = {
    # Tiny, for tests: every code path (GQA, tied embeddings off, reward head) in milliseconds.
    "debug": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259,
                         ffn_dim=128, max_seq_len=256, bos_id=256, eos_ids=(257,), pad_id=258),
    # The ToySteer model: byte-level vocabulary (256 bytes + BOS/EOS/PAD), trained from scratch on
    # CPU in minutes by `python -m minirm.train`. Sized by us to fit that budget.
    "toy": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=259,
                       ffn_dim=384, max_seq_len=512, bos_id=256, eos_ids=(257,), pad_id=258),
    # METHOD.md section 10 / HuggingFaceTB/SmolLM2-135M-Instruct config.json.
    "smollm2-135m": ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                                ffn_dim=1536, norm_eps=1e-5, rope_theta=100000.0,
                                max_seq_len=8192, tie_embeddings=True, bos_id=1, eos_ids=(2,),
                                pad_id=2),
    # meta-llama/Llama-3.2-1B config.json (16 layers, hidden 2048, 32/8 heads, ffn 8192, tied).
    "llama-3.2-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                vocab_size=128256, ffn_dim=8192, rope_theta=500000.0,
                                rope_scaling=LLAMA32_ROPE_SCALING, max_seq_len=131072,
                                tie_embeddings=True, bos_id=128000,
                                eos_ids=(128001, 128008, 128009)),
    # METHOD.md section 10: Llama-3.1-8B.
    "llama-3.1-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                vocab_size=128256, ffn_dim=14336, rope_theta=500000.0,
                                rope_scaling=LLAMA3_ROPE_SCALING, max_seq_len=131072,
                                bos_id=128000, eos_ids=(128001, 128008, 128009)),
    # METHOD.md section 10: Llama-3.1-70B.
    "llama-3.1-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                 vocab_size=128256, ffn_dim=28672, rope_theta=500000.0,
                                 rope_scaling=LLAMA3_ROPE_SCALING, max_seq_len=131072,
                                 bos_id=128000, eos_ids=(128001, 128008, 128009)),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset (exact name), optionally with fields replaced."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)} "
                        "(or pass a model folder)")
    return replace(PRESETS[name], **overrides)


def _as_tuple(x):
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def from_hf(path) -> ModelConfig:
    """Read a Hugging Face Llama `config.json` (a file or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no config.json; a model folder needs the Hugging Face "
                        "config.json beside its safetensors") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); re-export the checkpoint") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object")
    if hf.get("model_type", "llama") != "llama":
        raise UserError(f"{path}: model_type {hf.get('model_type')!r} is not supported; "
                        "minirm implements the Llama architecture only")
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    supported = {"LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModel"}
    if not set(archs) <= supported:
        raise UserError(f"{path}: architecture {archs} is not supported; "
                        f"expected one of {sorted(supported)}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise UserError(f"{path}: {key}=true is not supported (Llama-3 has no biases)")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters")
    rope_theta = hf.get("rope_theta")
    scaling = None
    if rope is not None and not isinstance(rope, dict):
        raise UserError(f"{path}: rope_scaling / rope_parameters must be an object, "
                        f"got {rope!r}; fix config.json")
    if rope:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_theta = rope.get("rope_theta", rope_theta)
        if rope_type == "llama3":
            try:
                check_rope_scaling(rope)
            except UserError as e:
                raise UserError(f"{path}: {e}; fix rope_scaling in config.json") from None
            scaling = {k: rope[k] for k in ROPE_SCALING_KEYS}
        elif rope_type != "default":
            raise UserError(f"{path}: rope type {rope_type!r} is not supported; "
                            "minirm implements plain RoPE and Llama-3 scaling ('llama3')")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "intermediate_size", "head_dim", "max_position_embeddings",
                "num_labels"):
        value = hf.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise UserError(f"{path}: {key}={value!r} must be a positive integer; "
                            "fix config.json")
    for key, value in (("rms_norm_eps", hf.get("rms_norm_eps")), ("rope_theta", rope_theta)):
        if value is not None and (not _is_number(value) or not 0 < value < math.inf):
            raise UserError(f"{path}: {key}={value!r} must be a positive number; fix config.json")
    pad_id = hf.get("pad_token_id")
    if _is_int(pad_id) and pad_id < 0:  # some exports write -1 for "no pad token"
        pad_id = None
    vocab = hf.get("vocab_size")
    for key, ids in (("bos_token_id", [hf.get("bos_token_id")]), ("pad_token_id", [pad_id]),
                     ("eos_token_id", _as_tuple(hf.get("eos_token_id")))):
        bad = [i for i in ids if i is not None and not (_is_int(i) and 0 <= i < (vocab or 1))]
        if bad and vocab:
            raise UserError(f"{path}: {key}={bad[0]!r} is not a token id in 0..{vocab - 1}; "
                            "fix config.json")
    try:
        n_outputs = 0
        if "LlamaForSequenceClassification" in archs:
            n_outputs = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
        cfg = ModelConfig(
            dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"], ffn_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim"), norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0), rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), n_outputs=n_outputs,
            bos_id=hf.get("bos_token_id"), eos_ids=_as_tuple(hf.get("eos_token_id")),
            pad_id=pad_id,
        )
    except KeyError as e:
        raise UserError(f"{path}: missing key {e.args[0]!r} in config.json") from None
    except UserError as e:  # ids out of range, heads that do not divide, ...
        raise UserError(f"{path}: {e}; fix config.json") from None
    return cfg


def to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict:
    """The Hugging Face `config.json` for this config (inverse of `from_hf`)."""
    hf = {
        "architectures": ["LlamaForSequenceClassification" if cfg.n_outputs
                          else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": torch_dtype,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": (list(cfg.eos_ids) if len(cfg.eos_ids) > 1
                         else (cfg.eos_ids[0] if cfg.eos_ids else None)),
        "pad_token_id": cfg.pad_id,
    }
    if cfg.rope_scaling:
        hf["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    if cfg.n_outputs:
        hf["num_labels"] = cfg.n_outputs
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.n_outputs)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.n_outputs)}
        hf["problem_type"] = "regression"
    return hf


def llama3_inv_freq(cfg: ModelConfig):
    """RoPE inverse frequencies with Llama-3 scaling (the `llama3` rope type).

    Long wavelengths (beyond original_context / low_freq_factor) are divided by `factor`, short
    ones (below original_context / high_freq_factor) are kept, and the band between is a linear
    blend of the two.
    """
    import torch

    hd = cfg.head_dim
    # float32 throughout, the arithmetic Hugging Face uses, so logits match to the last bits.
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = cfg.rope_scaling
    if not s:
        return inv
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, blended, scaled)
