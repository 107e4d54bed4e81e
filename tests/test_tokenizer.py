"""Tokenizer and chat formats (METHOD.md section 8) against token sequences assembled by hand.

Two small tokenizers stand in for the real ones, built here with the `tokenizers` library:
- "llama3": byte-level BPE with Llama-3's pre-tokenizer regex and BOS-adding post-processor,
  bytes at ids 0..255, one merge ("\n\n" -> 256, as the real vocabulary has one), and the
  Llama-3 special tokens at their real ids (128000, 128006, 128007, 128009).
- "chatml": SmolLM2's layout: <|endoftext|>, <|im_start|>, <|im_end|> at ids 0, 1, 2 and byte b
  at id 3 + b.
"""

import json
import random

import pytest
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors

from minirm.errors import UserError
from minirm.tokenizer import (CHATML_DEFAULT_SYSTEM, LLAMA3_SYSTEM_HEADER, ChatEncoding, Tokenizer,
                              _bytes_to_unicode, chat_prompt)

BOT, EOT_TEXT, SH, EH, EOT = 128000, 128001, 128006, 128007, 128009
LLAMA3_SPECIALS = {"<|begin_of_text|>": BOT, "<|end_of_text|>": EOT_TEXT,
                   "<|start_header_id|>": SH, "<|end_header_id|>": EH, "<|eot_id|>": EOT}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
ENDOFTEXT, IM_START, IM_END = 0, 1, 2

QA = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "1+1=2"}]
MULTI = QA + [{"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "4"}]
SYSTEM = [{"role": "system", "content": "Be brief."}] + QA


def llama3_tokenizer_json(path):
    byte_char = _bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    nl = byte_char[ord("\n")]
    vocab[nl + nl] = 256
    vocab.update(LLAMA3_SPECIALS)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[(nl, nl)]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(LLAMA3_SPECIALS))
    tok.post_processor = processors.TemplateProcessing(  # what the real file does with specials on
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", BOT)])
    tok.save(str(path))
    return path


def chatml_tokenizer_json(path):
    byte_char = _bytes_to_unicode()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({byte_char[b]: 3 + b for b in range(256)})
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path))
    return path


def write_folder(folder, kind, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    make = {"llama3": llama3_tokenizer_json, "chatml": chatml_tokenizer_json}[kind]
    make(folder / "tokenizer.json")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def llama3(tmp_path):
    return Tokenizer.from_folder(write_folder(tmp_path / "l3", "llama3"), chat_format="llama3")


@pytest.fixture
def chatml(tmp_path):
    return Tokenizer.from_folder(write_folder(tmp_path / "cm", "chatml"), chat_format="chatml")


def l3(text):
    """Hand tokenization for the llama3 test vocabulary: bytes, with "\n\n" as id 256."""
    out = []
    for i, part in enumerate(text.split("\n\n")):
        out += [256] * (i > 0) + list(part.encode())
    return out


def l3_turn(role, content):
    return [SH, *l3(role), EH, 256, *l3(content), EOT]


def cm(text):
    return [3 + b for b in text.encode()]


def cm_turn(role, content):
    return [IM_START, *cm(role + "\n" + content), IM_END]


# ---- the byte-level toy tokenizer ----

def test_byte_level_layout():
    tok = Tokenizer.byte_level()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    assert tok.stop_ids == {257}
    assert all(tok.encode(chr(b)) == [b] for b in range(128))  # ASCII: one byte, one id
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode(range(128)) == "".join(map(chr, range(128)))


def test_byte_level_round_trip():
    rng = random.Random(0)
    tok = Tokenizer.byte_level()
    for _ in range(20):
        chars = [chr(rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0xD800),
                                 rng.randrange(0xE000, 0x110000)])) for _ in range(50)]
        text = "".join(chars)
        assert tok.encode(text) == list(text.encode("utf-8"))
        assert tok.decode(tok.encode(text)) == text


def test_encode_adds_no_special_tokens_and_decode_skips_them(llama3):
    tok = Tokenizer.byte_level()
    assert tok.encode("<|bos|>") == list(b"<|bos|>")  # special-token text stays text
    assert tok.encode("hi", bos=True) == [256, ord("h"), ord("i")]
    assert tok.decode([256, ord("h"), 258, ord("i"), 257]) == "hi"
    assert llama3.encode("hi") == list(b"hi")  # the file's post-processor would add a BOS
    assert llama3.encode("hi", bos=True) == [BOT, *b"hi"]


def test_toy_chat_format():
    tok = Tokenizer.byte_level()
    enc = tok.encode_chat([{"role": "system", "content": "s"}] + QA)
    assert enc.ids == [256, *b"System: s\nUser: What is 1+1?\nAssistant: 1+1=2", 257]
    assert enc.ids[enc.assistant_start:] == [*b"1+1=2", 257]
    prompt = tok.encode_chat(chat_prompt("hi"), add_generation_prompt=True)
    assert prompt == ChatEncoding([256, *b"User: hi\nAssistant: "], None)


# ---- llama3 ----

def test_llama3_single_turn(llama3):
    enc = llama3.encode_chat(QA)
    assert enc.ids == [BOT, *l3_turn("system", LLAMA3_SYSTEM_HEADER),
                       *l3_turn("user", "What is 1+1?"), *l3_turn("assistant", "1+1=2")]
    assert enc.ids.count(BOT) == 1 and enc.ids[-1] == EOT
    assert enc.ids[enc.assistant_start:] == [*l3("1+1=2"), EOT]


def test_llama3_system_multi_turn_and_stripping(llama3):
    messages = [{"role": "system", "content": " Be brief.\n"}] + MULTI
    messages[1] = {"role": "user", "content": "\n  What is 1+1?  "}
    enc = llama3.encode_chat(messages)
    assert enc.ids == [BOT, *l3_turn("system", LLAMA3_SYSTEM_HEADER + "Be brief."),
                       *l3_turn("user", "What is 1+1?"), *l3_turn("assistant", "1+1=2"),
                       *l3_turn("user", "And 2+2?"), *l3_turn("assistant", "4")]
    assert enc.ids.count(BOT) == 1
    assert enc.ids[enc.assistant_start:] == [ord("4"), EOT]  # the final assistant message


def test_llama3_generation_prompt(llama3):
    enc = llama3.encode_chat(chat_prompt("Hi"), add_generation_prompt=True)
    assert enc.ids == [BOT, *l3_turn("system", LLAMA3_SYSTEM_HEADER), *l3_turn("user", "Hi"),
                       SH, *b"assistant", EH, 256]
    assert enc.assistant_start is None
    assert llama3.encode_chat(chat_prompt("Hi")).ids[-1] == EOT


def test_llama3_special_tokens(llama3):
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id, llama3.eot_id) == (BOT, EOT, EOT, EOT)
    assert llama3.stop_ids == {EOT}
    assert llama3.vocab_size == EOT + 1
    # Special-token text inside a message stays text: no second BOS, no early end of turn.
    enc = llama3.encode_chat(chat_prompt("<|begin_of_text|><|eot_id|>"))
    assert enc.ids.count(BOT) == 1 and enc.ids.count(EOT) == 2


# ---- chatml ----

def test_chatml_default_system_and_single_turn(chatml):
    enc = chatml.encode_chat(QA)
    nl = cm("\n")
    assert enc.ids == [*cm_turn("system", CHATML_DEFAULT_SYSTEM), *nl,
                       *cm_turn("user", "What is 1+1?"), *nl, *cm_turn("assistant", "1+1=2")]
    assert enc.ids[0] == IM_START == chatml.bos_id and ENDOFTEXT not in enc.ids  # no extra BOS
    assert enc.ids[-1] == IM_END  # no "\n" after the final <|im_end|>
    assert enc.ids[enc.assistant_start:] == [*cm("1+1=2"), IM_END]


def test_chatml_system_multi_turn_and_generation_prompt(chatml):
    nl = cm("\n")
    enc = chatml.encode_chat([{"role": "system", "content": "Be brief."}] + MULTI)
    assert enc.ids == [*cm_turn("system", "Be brief."), *nl, *cm_turn("user", "What is 1+1?"), *nl,
                       *cm_turn("assistant", "1+1=2"), *nl, *cm_turn("user", "And 2+2?"), *nl,
                       *cm_turn("assistant", "4")]
    assert enc.ids[enc.assistant_start:] == [*cm("4"), IM_END]
    enc = chatml.encode_chat(chat_prompt("Hi"), add_generation_prompt=True)
    assert enc.ids == [*cm_turn("system", CHATML_DEFAULT_SYSTEM), *nl, *cm_turn("user", "Hi"), *nl,
                       IM_START, *cm("assistant\n")]
    assert chatml.stop_ids == {IM_END}


# ---- message checks ----

@pytest.mark.parametrize("messages, gen, match", [
    ([], False, "non-empty"),
    ([{"role": "assistant", "content": "x"}], False, "expected"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False, "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], False, "expected"),
    ([{"role": "system", "content": "s"}], False, "user message"),
    ([{"role": "robot", "content": "x"}], False, "role"),
    ([{"role": "user", "content": None}], False, "content"),
    (QA, True, "ends with a user message"),
])
def test_bad_messages(messages, gen, match):
    with pytest.raises(UserError, match=match):
        Tokenizer.byte_level().encode_chat(messages, add_generation_prompt=gen)


# ---- files ----

def test_from_folder_detects_format_and_special_tokens(tmp_path):
    config = {"bos_token": {"content": "<|begin_of_text|>", "lstrip": False},
              "eos_token": "<|end_of_text|>",
              "chat_template": "{% for m in messages %}<|start_header_id|>...{% endfor %}"}
    tok = Tokenizer.from_folder(write_folder(tmp_path / "a", "llama3", config))
    assert tok.chat_format == "llama3"
    assert tok.stop_ids == {EOT_TEXT, EOT} and tok.pad_id == EOT_TEXT

    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
              "chat_template": "{% for m in messages %}{{'<|im_start|>' + m['role']}}{% endfor %}"}
    tok = Tokenizer.from_folder(write_folder(tmp_path / "b", "chatml", config))
    assert (tok.chat_format, tok.bos_id, tok.eos_id, tok.pad_id) == ("chatml", 1, 2, 2)


def test_from_folder_other_template_places(tmp_path):
    named = [{"name": "tool_use", "template": "{{ x }}"},
             {"name": "default", "template": "{{ '<|im_start|>' }}"}]  # older configs
    folder = write_folder(tmp_path / "a", "chatml", {"chat_template": named})
    assert Tokenizer.from_folder(folder).chat_format == "chatml"
    folder = write_folder(tmp_path / "b", "llama3", {"bos_token": "<|begin_of_text|>"})
    (folder / "chat_template.jinja").write_text("{{ '<|start_header_id|>' }}")  # newer ones
    assert Tokenizer.from_folder(folder).chat_format == "llama3"


def test_from_folder_chat_format_key_and_flag(tmp_path):
    folder = write_folder(tmp_path / "a", "chatml", {"chat_format": "chatml", "chat_template": "x"})
    assert Tokenizer.from_folder(folder).chat_format == "chatml"
    with pytest.raises(UserError, match="--chat-format"):
        Tokenizer.from_folder(write_folder(tmp_path / "b", "chatml"))
    with pytest.raises(UserError, match="unknown"):
        Tokenizer.from_folder(folder, chat_format="alpaca")
    with pytest.raises(UserError, match="<|start_header_id|>"):  # llama3 tokens not in vocab
        Tokenizer.from_folder(folder, chat_format="llama3")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer\.json not found"):
        Tokenizer.from_folder(tmp_path, chat_format="toy")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(UserError, match=r"tokenizer\.json is not a valid"):
        Tokenizer.from_folder(tmp_path, chat_format="toy")
    Tokenizer.byte_level().save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(UserError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_folder(tmp_path)


def test_save_round_trip(tmp_path, llama3):
    for tok, folder in [(Tokenizer.byte_level(), tmp_path / "toy"), (llama3, tmp_path / "l3")]:
        tok.save(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["chat_format"] == tok.chat_format and "chat_template" in config
        again = Tokenizer.from_folder(folder)
        for name in ("chat_format", "bos_id", "eos_id", "pad_id", "stop_ids", "vocab_size"):
            assert getattr(again, name) == getattr(tok, name), name
        assert again.encode_chat(MULTI) == tok.encode_chat(MULTI)
        assert again.encode("<|eot_id|> é") == tok.encode("<|eot_id|> é")


# ---- the same ids as Hugging Face transformers with the saved chat_template ----

HF_CASES = [(QA, False), (SYSTEM, False), (MULTI, False), (chat_prompt("Hi there"), True),
            ([{"role": "system", "content": "  Be brief. "}] + MULTI[:3], True),
            ([{"role": "user", "content": " 2024\n\n- a list\n"},
              {"role": "assistant", "content": "ok"}], False)]


@pytest.mark.parametrize("kind", ["llama3", "chatml", "toy"])
def test_same_ids_as_transformers(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    if kind == "toy":
        tok = Tokenizer.byte_level()
    else:
        tok = Tokenizer.from_folder(write_folder(tmp_path / "src", kind), chat_format=kind)
    tok.save(tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for messages, gen in HF_CASES:
        theirs = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                        return_dict=False)
        ours = tok.encode_chat(messages, add_generation_prompt=gen).ids
        # SmolLM2's template ends every turn with "\n", the last one too; we stop at <|im_end|>.
        if kind == "chatml" and not gen:
            assert theirs[-len(cm("\n")):] == cm("\n")
            theirs = theirs[:-len(cm("\n"))]
        assert ours == theirs, messages
