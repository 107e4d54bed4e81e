"""Hugging Face Llama checkpoints in and out.

A model folder is the Hugging Face layout: `config.json`, `model.safetensors` or shards listed in
`model.safetensors.index.json`, `tokenizer.json` and `tokenizer_config.json` (with the chat
format). One explicit name map takes Hugging Face names to minirm's; saving inverts it.

Loading builds the model on the meta device and loads tensors with `assign=True`, so a model is
never held twice in memory. Nothing is skipped silently: a missing or unexpected tensor, a wrong
shape or a non-float dtype is an error naming the tensor. A reward head is stored as
`score.weight` / `score.bias` (the layout of `LlamaForSequenceClassification`; `transformers`
itself has no bias there and ignores `score.bias` with a warning).

Saving writes into a temporary folder beside the target and renames it at the end, so an
interrupted save never leaves a half-written model where a good one was.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minirm.config import PRESETS, ModelConfig, from_hf, preset, to_hf
from minirm.errors import UserError
from minirm.model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Hugging Face name -> minirm name. {i} is the layer index.
LAYER_NAMES = {
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",            # untied models only
    "score.weight": "score.weight",               # reward models only
    "score.bias": "score.bias",
}
# Buffers some older exports store; derived from the config, so safe to ignore by name.
DERIVED = (".rotary_emb.inv_freq",)

DEFAULT_SHARD_BYTES = 5 * 2**30


def name_map(cfg: ModelConfig) -> dict:
    """Every Hugging Face tensor name this config expects -> the minirm parameter name."""
    names = {}
    for i in range(cfg.n_layers):
        names.update({hf.format(i=i): ours.format(i=i) for hf, ours in LAYER_NAMES.items()})
    for hf, ours in GLOBAL_NAMES.items():
        if ours == "output.weight" and (cfg.tie_embeddings or cfg.n_outputs):
            continue
        if ours.startswith("score.") and not cfg.n_outputs:
            continue
        names[hf] = ours
    return names


def weight_files(folder: Path) -> dict:
    """Hugging Face tensor name -> the safetensors file that holds it."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({e!r}); "
                            "re-export the checkpoint") from None
        return {name: folder / fname for name, fname in weight_map.items()}
    if single.exists():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json; "
                    "a model folder needs its weights in safetensors")


def _open(path: Path):
    if not path.exists():
        raise UserError(f"{path}: weight file listed in the index is missing")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: corrupt safetensors file ({e}); re-download or re-export "
                        "it") from None


def _check_and_read(folder: Path, cfg: ModelConfig, expected: dict, dtype, head_optional=False):
    """Read every expected tensor, converted to `dtype`, checking names, shapes and dtypes."""
    files = weight_files(folder)
    present = {n for n in files if not n.endswith(DERIVED)}
    if head_optional:  # a language model becoming a reward model leaves its lm_head behind
        present.discard("lm_head.weight")
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise UserError(f"{folder}: unexpected tensor {unexpected[0]!r} "
                        f"({len(unexpected)} in all) for this config.json; the config does not "
                        "match the weights")
    missing = sorted(set(expected) - present)
    if head_optional:
        missing = [m for m in missing if not m.startswith("score.")]
    if missing:
        raise UserError(f"{folder}: missing tensor {missing[0]!r} ({len(missing)} in all); "
                        "the checkpoint is incomplete or the config does not match it")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    state = {}
    handles = {}
    try:
        for hf_name, ours in expected.items():
            if hf_name not in files:
                continue
            path = files[hf_name]
            if path not in handles:
                handles[path] = _open(path).__enter__()
            t = handles[path].get_tensor(hf_name)
            if tuple(t.shape) != shapes[ours]:
                raise UserError(f"{path}: tensor {hf_name!r} has shape {tuple(t.shape)} but "
                                f"config.json implies {shapes[ours]}; the config does not "
                                "match the weights")
            if not t.is_floating_point():
                raise UserError(f"{path}: tensor {hf_name!r} has dtype {t.dtype}; minirm "
                                "loads floating-point weights only (dequantise it first)")
            # The reward head stays float32 whatever the model's dtype (METHOD.md section 2).
            state[ours] = t.to(torch.float32 if ours.startswith("score.") else dtype)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return state


def load_model(spec, dtype=None, device="cpu", n_outputs=None, attention=None, seed=0):
    """A model from a preset name (random weights) or a Hugging Face folder.

    `n_outputs` asks for a reward head: a folder without one gets a freshly initialised head
    (starting reward-model training from a language model); a folder whose head has another
    size is an error. Returns (model, cfg).
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or torch.float32)
    overrides = {} if attention is None else {"attention": attention}
    if str(spec) in PRESETS:
        if n_outputs is not None:
            overrides["n_outputs"] = n_outputs
        cfg = preset(str(spec), **overrides)
        model = Transformer(cfg).init_weights(seed=seed)
        return model.to(device).cast(dtype), cfg
    folder = Path(spec)
    if not folder.is_dir():
        raise UserError(f"{spec}: neither a model preset ({', '.join(PRESETS)}) nor a "
                        "model folder")
    cfg = from_hf(folder)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    fresh_head = False
    if n_outputs is not None and n_outputs != cfg.n_outputs:
        if cfg.n_outputs:
            raise UserError(f"{folder}: the checkpoint's reward head has {cfg.n_outputs} "
                            f"outputs but {n_outputs} were asked for")
        cfg.n_outputs, fresh_head = n_outputs, True
    state = _check_and_read(folder, cfg, name_map(cfg), dtype, head_optional=fresh_head)
    with torch.device("meta"):
        model = Transformer(cfg)
    if fresh_head:
        head = torch.nn.Linear(cfg.dim, n_outputs, dtype=torch.float32)
        torch.nn.init.normal_(head.weight, std=cfg.dim ** -0.5)
        torch.nn.init.zeros_(head.bias)
        state["score.weight"], state["score.bias"] = head.weight.data, head.bias.data
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device), cfg


def load_tokenizer(spec, chat_format=None):
    """The tokenizer that goes with a model: byte-level for the toy presets, else the folder's."""
    from minirm.tokenizer import Tokenizer

    if str(spec) in PRESETS:
        if PRESETS[str(spec)].vocab_size == 259:
            return Tokenizer.byte_level()
        raise UserError(f"preset {spec!r} has no bundled tokenizer; pass a model folder")
    return Tokenizer.from_folder(spec, chat_format=chat_format)


def hf_state_dict(model) -> dict:
    """minirm state -> Hugging Face names (tied output weights are not stored twice)."""
    ours_to_hf = {v: k for k, v in name_map(model.cfg).items()}
    state = model.state_dict()
    return {ours_to_hf[k]: v for k, v in state.items() if k in ours_to_hf}


def save_model(model, out, tokenizer=None, max_shard_bytes=DEFAULT_SHARD_BYTES, state=None,
               extra_files=None):
    """Write `model` as a Hugging Face folder at `out`, atomically (temp folder + rename)."""
    out = Path(out)
    state = hf_state_dict(model) if state is None else state
    dtypes = {t.dtype for n, t in state.items() if not n.startswith("score.")}
    dtype_name = {v: k for k, v in DTYPES.items()}.get(dtypes.pop() if dtypes else None,
                                                        "float32")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_weights(tmp, state, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(to_hf(model.cfg, dtype_name), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _fsync_dir(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_weights(folder: Path, state: dict, max_shard_bytes: int):
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / fname), metadata=meta)
        weight_map.update({n: fname for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _fsync_dir(folder: Path):
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def replace_dir(tmp: Path, out: Path):
    """Move the finished folder `tmp` to `out`; an old `out` is removed only after that."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
