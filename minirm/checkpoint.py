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
interrupted save never leaves a half-written model where a good one was. Replacing a folder takes
two renames (old out of the way, new in); a process killed between them leaves the old one as
`.NAME.old`, which the next load or save of NAME puts back (`recover_dir`). A write that fails
for want of disk space is a UserError, and the previous folder stays as it was.
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
from minirm.errors import UserError, write_failure
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
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({e!r}); "
                            "re-export the checkpoint") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: 'weight_map' must map tensor names to file names; "
                            "re-export the checkpoint")
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


def _check_and_read(folder: Path, cfg: ModelConfig, expected: dict, dtype, head_optional=False,
                    shards=None, device="cpu"):
    """Read every expected tensor, converted to `dtype`, checking names, shapes and dtypes.

    Whole tensors are zero-copy views of the memory-mapped files (pages are read when touched).
    `shards` (minirm name -> (dim, start, end), from `parallel.shard_specs`; tensor-parallel
    loading) asks for slices instead: each is cut from the mapping with safetensors' get_slice,
    copied into memory of its own, and its file unmapped at once, so host memory stays near the
    size of this rank's shard and no rank ever holds a whole tensor.
    """
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
            # The reward head stays float32 whatever the model's dtype (METHOD.md section 2).
            want = torch.float32 if ours.startswith("score.") else dtype
            if shards is None:
                if path not in handles:
                    handles[path] = _open(path).__enter__()
                t = _read(handles[path], path, hf_name, shapes[ours])
                state[ours] = t.to(device=device, dtype=want)
            else:
                with _open(path) as f:
                    t = _read(f, path, hf_name, shapes[ours], shards.get(ours))
                    state[ours] = torch.empty(t.shape, dtype=want, device=device).copy_(t)
                    del t  # the last view of the mapping: the file is unmapped on exit
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return state


def _read(f, path, hf_name, shape, shard=None):
    """One tensor (or the slice `shard` = (dim, start, end) of it) from an open file."""
    sl = f.get_slice(hf_name)
    if tuple(sl.get_shape()) != shape:
        raise UserError(f"{path}: tensor {hf_name!r} has shape {tuple(sl.get_shape())} but "
                        f"config.json implies {shape}; the config does not match the weights")
    if shard is None:
        t = f.get_tensor(hf_name)
    else:
        dim, start, end = shard
        t = sl[start:end] if dim == 0 else sl[:, start:end]
    if not t.is_floating_point():
        raise UserError(f"{path}: tensor {hf_name!r} has dtype {t.dtype}; minirm "
                        "loads floating-point weights only (dequantise it first)")
    return t


def model_folder(spec) -> Path:
    """The folder a model argument names, or a clear error when it names nothing."""
    folder = Path(spec)
    recover_dir(folder)
    if not folder.is_dir():
        raise UserError(f"{spec}: neither a model preset ({', '.join(PRESETS)}) nor a "
                        "model folder")
    return folder


def load_model(spec, dtype=None, device=None, n_outputs=None, attention=None, seed=0,
               grid=None):
    """A model from a preset name (random weights) or a Hugging Face folder.

    `n_outputs` asks for a reward head: a folder without one gets a freshly initialised head
    (starting reward-model training from a language model); a folder whose head has another
    size is an error. `grid` (from `minirm.distributed.init`) returns the model tensor-parallel
    on grid.device: from a folder, each rank reads only its own slices (see `parallel`).
    Returns (model, cfg).
    """
    from minirm.parallel import parallelize, retie, shard_specs

    dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or torch.float32)
    device = device or (grid.device if grid is not None else "cpu")
    overrides = {} if attention is None else {"attention": attention}
    if str(spec) in PRESETS:
        if n_outputs is not None:
            overrides["n_outputs"] = n_outputs
        cfg = preset(str(spec), **overrides)
        model = Transformer(cfg).init_weights(seed=seed).cast(dtype)
        if grid is not None:  # every rank draws the same full weights, then keeps its slice
            parallelize(model, grid)
        return model.to(device), cfg
    folder = model_folder(spec)
    cfg = from_hf(folder)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    fresh_head = False
    if n_outputs is not None and n_outputs != cfg.n_outputs:
        if cfg.n_outputs:
            raise UserError(f"{folder}: the checkpoint's reward head has {cfg.n_outputs} "
                            f"outputs but {n_outputs} were asked for")
        cfg.n_outputs, fresh_head = n_outputs, True
    with torch.device("meta"):
        model = Transformer(cfg)
    if grid is not None:
        parallelize(model, grid)  # checks divisibility before anything is read
    state = _check_and_read(folder, cfg, name_map(cfg), dtype, head_optional=fresh_head,
                            shards=shard_specs(model) if grid is not None else None,
                            device=device)
    if fresh_head:  # seeded, so that every rank of a grid draws the same head
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(n_outputs, cfg.dim, generator=gen) * cfg.dim ** -0.5
        state["score.weight"] = weight.to(device)
        state["score.bias"] = torch.zeros(n_outputs, device=device)
    if "output.weight" in model.state_dict() and "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]  # a tied tensor-parallel head
    model.load_state_dict(state, assign=True, strict=True)
    retie(model)
    return model.to(device), cfg


def load_weights(model, folder, grid=None):
    """Load a saved folder's weights into an existing model of the same config (resuming).

    Under tensor parallelism each rank reads only its slices, as `load_model` does.
    """
    grid = grid if grid is not None and grid.tp_size > 1 else None
    dtype = next(p.dtype for n, p in model.named_parameters() if not n.startswith("score."))
    device = next(model.parameters()).device
    saved, _ = load_model(folder, dtype=dtype, device=device, attention=model.cfg.attention,
                          grid=grid)
    model.load_state_dict(saved.state_dict(), strict=True)
    return model


def load_tokenizer(spec, chat_format=None):
    """The tokenizer that goes with a model: byte-level for the toy presets, else the folder's."""
    from minirm.tokenizer import Tokenizer

    if str(spec) in PRESETS:
        if PRESETS[str(spec)].vocab_size == 259:
            return Tokenizer.byte_level()
        raise UserError(f"preset {spec!r} has no bundled tokenizer; pass a model folder")
    return Tokenizer.from_folder(model_folder(spec), chat_format=chat_format)


def hf_state_dict(model) -> dict:
    """minirm state -> Hugging Face names (tied output weights are not stored twice)."""
    ours_to_hf = {v: k for k, v in name_map(model.cfg).items()}
    state = model.state_dict()
    return {ours_to_hf[k]: v for k, v in state.items() if k in ours_to_hf}


def save_model(model, out, tokenizer=None, max_shard_bytes=DEFAULT_SHARD_BYTES, state=None,
               extra_files=None, binary_files=None):
    """Write `model` as a Hugging Face folder at `out`, atomically (temp folder + rename)."""
    out = Path(out)
    state = hf_state_dict(model) if state is None else state
    dtypes = {t.dtype for n, t in state.items() if not n.startswith("score.")}
    dtype_name = {v: k for k, v in DTYPES.items()}.get(dtypes.pop() if dtypes else None,
                                                        "float32")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        _write_weights(tmp, state, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(to_hf(model.cfg, dtype_name), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for name, obj in (binary_files or {}).items():  # e.g. optimizer state for resuming
            torch.save(obj, tmp / name)
        ordinary_permissions(tmp)
        _fsync_dir(tmp)
        replace_dir(tmp, out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        why = write_failure(e)
        if why is None:
            raise
        kept = f"the previous {out} is untouched" if out.is_dir() else "nothing was written"
        raise UserError(f"{out}: could not save the model: {why}; {kept}. Free some disk "
                        "space (or choose another output folder) and run again") from None
    return out


def ordinary_permissions(path):
    """mkdtemp and mkstemp make private entries (0700, 0600); give a finished folder (and the
    files in it) or file the permissions a new one gets under the user's umask."""
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    if path.is_dir():
        path.chmod(0o777 & ~umask)
        for f in path.iterdir():
            f.chmod(0o666 & ~umask)
    else:
        path.chmod(0o666 & ~umask)


def save_model_parallel(model, out, grid, **kw):
    """`save_model` called on every rank of a run: a tensor-parallel model is gathered to rank
    0, which writes the same Hugging Face folder as a single process would; without a process
    group (grid None) it is plain `save_model`."""
    if grid is None or grid.world == 1:
        return save_model(model, out, **kw)
    from minirm.distributed import barrier
    from minirm.parallel import gathered_hf_state

    state = gathered_hf_state(model, grid) if grid.tp_size > 1 and grid.dp_rank == 0 else None
    if grid.is_main:
        save_model(model, out, state=state, **kw)
    barrier()
    return Path(out)


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


def _old_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def replace_dir(tmp: Path, out: Path):
    """Move the finished folder `tmp` to `out`; an old `out` is removed only after that.

    The old folder steps aside as `.NAME.old` first: a process killed between the two renames
    leaves no `out`, and `recover_dir` puts the old one back. After them the old folder is
    renamed to a temporary name before it is removed, so `.NAME.old` is never half deleted.
    A file (not a folder) at `out` is refused before anything moves: it is never replaced.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    recover_dir(out)
    old = _old_name(out)
    if old.exists():  # out is whole: an earlier replace was killed after its swap
        shutil.rmtree(old)
    if out.exists():
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _fsync_parent(out)
        # Renamed before removal: a removal cut short leaves a name only a save cleans up.
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)
        _fsync_parent(out)


def recover_dir(out: Path):
    """Undo a replace that was killed between its two renames: the old folder comes back."""
    out = Path(out)
    old = _old_name(out)
    if not out.exists() and old.is_dir():
        os.rename(old, out)


def _fsync_parent(path: Path):
    """Make a rename durable (a power cut after it must not bring the old name back)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders: the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
