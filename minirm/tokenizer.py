"""Text to token ids and back, and the chat formats of METHOD.md section 8, written out in Python.

A `Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (the Rust BPE engine, read from
`tokenizer.json`) and adds what a reward model needs on top: the special tokens and the chat
format. Chat formats are plain Python, not a jinja template: like Meta's llama3 `chat_format.py`,
`encode_chat` appends token ids piece by piece (special tokens looked up by their string, text
encoded on its own), so a conversation holds exactly one BOS and we know where the final assistant
message starts. A jinja `chat_template` equivalent to each format is only written by `save`, for
Hugging Face `transformers` users of the folder; minirm never executes it.

Simplifications:
- Text never turns into special tokens: `<|eot_id|>` typed inside a message is encoded as plain
  characters, as Meta's tokenizer does (`transformers`' apply_chat_template would make it a real
  end-of-turn).
- Three formats only: "llama3" (Llama-3.1 Instruct, no tools), "chatml" (SmolLM2-Instruct) and
  "toy" (for the byte-level tokenizer of the debug models).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from minirm.errors import UserError

CHAT_FORMATS = ("llama3", "chatml", "toy")
ROLES = ("system", "user", "assistant")

# METHOD.md section 8: Llama-3.1 always opens with this system block, system message or not.
LLAMA3_SYSTEM_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
# METHOD.md section 8: SmolLM2-Instruct's system prompt when the conversation has none.
CHATML_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# (bos, eos) used when tokenizer_config.json does not name them: the Instruct models' choices.
DEFAULT_BOS_EOS = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "toy": ("<|bos|>", "<|eos|>"),
}

# Jinja versions of the three formats, written into tokenizer_config.json for `transformers`.
# They must produce the same ids as `encode_chat`; tests/test_tokenizer.py checks that.
CHAT_TEMPLATES = {
    "llama3": (
        "{{- '<|begin_of_text|>' }}"
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system_message = messages[0]['content'] | trim %}"
        "{%- set messages = messages[1:] %}"
        "{%- else %}{%- set system_message = '' %}{%- endif %}"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n"
        "Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n'"
        " + system_message + '<|eot_id|>' }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    # SmolLM2-Instruct's own template; it ends every turn, the last one too, with "\n".
    "chatml": (
        "{%- for message in messages %}"
        "{%- if loop.first and message['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
        "trained by Hugging Face<|im_end|>\\n' }}"
        "{%- endif %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "toy": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- 'Assistant: ' + message['content'] + eos_token }}"
        "{%- else %}{{- message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'Assistant: ' }}{%- endif %}"
    ),
}


@dataclass
class ChatEncoding:
    ids: list[int]
    assistant_start: int | None  # index of the final assistant message's first content token


def chat_prompt(text: str) -> list[dict]:
    """A one-turn conversation: the user asks `text`."""
    return [{"role": "user", "content": text}]


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, chat_format: str, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None):
        if chat_format not in CHAT_FORMATS:
            raise UserError(f"chat format {chat_format!r} is unknown; "
                            f"choose one of {', '.join(CHAT_FORMATS)}")
        self._tok = tok
        self._tok.encode_special_tokens = True  # text is text; see the module docstring
        self.chat_format = chat_format
        default_bos, default_eos = DEFAULT_BOS_EOS[chat_format]
        self.bos_token = bos_token or default_bos
        self.eos_token = eos_token or default_eos
        self.pad_token = pad_token
        # Fail now, not in the middle of a dataset, if the format's tokens are missing.
        self._eot_token = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>",
                           "toy": self.eos_token}[chat_format]
        needed = {"llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
                  "chatml": ["<|im_start|>"], "toy": [self.bos_token]}[chat_format]
        for token in needed + [self._eot_token, self.bos_token, self.eos_token, pad_token]:
            if token is not None:
                self._special_id(token)

    # ---- loading and saving ----

    @classmethod
    def from_folder(cls, path, chat_format: str | None = None) -> "Tokenizer":
        """Load `path/tokenizer.json`; special tokens and chat format from tokenizer_config.json.

        `chat_format` (the --chat-format flag) wins over the config's "chat_format" key, which
        wins over what the config's `chat_template` looks like.
        """
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"{file} not found; put the model's Hugging Face tokenizer.json there")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a plain Exception
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{file} is not a valid tokenizer.json ({reason}); download it again")
        config = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{config_file} is not valid JSON ({e}); fix or delete it")
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():  # newer transformers
            template = (folder / "chat_template.jinja").read_text()
        chat_format = chat_format or config.get("chat_format") or _detect_format(template)
        if chat_format is None:
            raise UserError(f"cannot tell the chat format of {folder}: pass "
                            f"--chat-format with one of {', '.join(CHAT_FORMATS)}")
        special = {key: _token_string(config.get(key), config_file) for key in
                   ("bos_token", "eos_token", "pad_token")}
        return cls(tok, chat_format, **special)

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """The toy tokenizer: ids 0..255 are the bytes, 256..258 are <|bos|>, <|eos|>, <|pad|>.

        Any UTF-8 text encodes and decodes exactly. Built as a BPE with no merges over the GPT-2
        byte alphabet (each byte is shown as one printable character), ordered so byte b is id b.
        """
        vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>"])  # ids 256, 257, 258
        return cls(tok, "toy", "<|bos|>", "<|eos|>", "<|pad|>")

    def save(self, folder) -> None:
        """Write tokenizer.json and tokenizer_config.json (with a jinja chat_template)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "clean_up_tokenization_spaces": False,  # so transformers decodes as we do
            "chat_format": self.chat_format,
            "chat_template": CHAT_TEMPLATES[self.chat_format],
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # ---- plain text ----

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text`; a BOS in front only when asked, never any other special token."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._special_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self._special_id(self.pad_token) if self.pad_token is not None else self.eos_id

    @property
    def eot_id(self) -> int:
        """The chat format's end-of-turn token: where a reward model reads its score."""
        return self._special_id(self._eot_token)

    @property
    def stop_ids(self) -> set[int]:
        return {self.eos_id, self.eot_id}

    @property
    def vocab_size(self) -> int:
        # The largest id + 1, not a count: vocabularies may have holes (reserved ids).
        return max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    def _special_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise UserError(f"special token {token!r} is not in the tokenizer's vocabulary; "
                            f"check tokenizer_config.json or pass another --chat-format "
                            f"(now {self.chat_format!r})")
        return i

    # ---- chat ----

    def encode_chat(self, messages: list[dict],
                    add_generation_prompt: bool = False) -> ChatEncoding:
        """Token ids of a conversation in this tokenizer's chat format (METHOD.md section 8).

        `messages`: an optional system message, then user and assistant messages alternating,
        starting with user. The ids start with exactly one BOS (chatml: its leading <|im_start|>).
        A conversation that ends in an assistant message ends at that message's end-of-turn token
        (<|eot_id|>, <|im_end|>, or <|eos|> for toy), with no "\\n" after it, so the last token is
        where a reward model reads the score (METHOD.md section 9). With `add_generation_prompt`
        the last message must be the user's and the ids end with the assistant header.
        """
        check_messages(messages, add_generation_prompt)
        build = {"llama3": self._llama3, "chatml": self._chatml, "toy": self._toy}[self.chat_format]
        ids, starts = build(messages, add_generation_prompt)
        final_is_assistant = messages[-1]["role"] == "assistant"
        return ChatEncoding(ids, starts[-1] if final_is_assistant else None)

    # Each builder returns (ids, [where each message's content starts]).

    def _llama3(self, messages, add_generation_prompt):
        sp = self._special_id
        ids, starts = [sp("<|begin_of_text|>")], []

        def header(role):
            ids.extend([sp("<|start_header_id|>"), *self.encode(role), sp("<|end_header_id|>")])
            ids.extend(self.encode("\n\n"))

        system = ""
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        header("system")
        ids.extend(self.encode(LLAMA3_SYSTEM_HEADER + system) + [sp("<|eot_id|>")])
        for message in messages:
            header(message["role"])
            starts.append(len(ids))
            ids.extend(self.encode(message["content"].strip()) + [sp("<|eot_id|>")])
        if add_generation_prompt:
            header("assistant")
        return ids, starts

    def _chatml(self, messages, add_generation_prompt):
        # No separate BOS: SmolLM2-Instruct was trained on chats opening with <|im_start|> (its
        # bos_token). Were a chatml tokenizer's bos another token (SmolLM2 base: <|endoftext|>),
        # prepending it would still show the model a start it never saw in chat training.
        # "\n" separates turns (it comes before each <|im_start|> but the first), so the
        # conversation ends at its last <|im_end|>. Encoding "role\n" apart from the content
        # (unlike llama3, chatml does not strip it) can differ from transformers when a message
        # starts with two or more white-space characters ("\n  " may be one token there).
        sp = self._special_id
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": CHATML_DEFAULT_SYSTEM}] + messages
        ids, starts = [], []

        def header(role):
            if ids:
                ids.extend(self.encode("\n"))
            ids.extend([sp("<|im_start|>"), *self.encode(role + "\n")])

        for message in messages:
            header(message["role"])
            starts.append(len(ids))
            ids.extend(self.encode(message["content"]) + [sp("<|im_end|>")])
        if add_generation_prompt:
            header("assistant")
        return ids, starts

    def _toy(self, messages, add_generation_prompt):
        # <|bos|>System: s\nUser: u\nAssistant: a<|eos|>User: ...   (the eos ends each answer)
        ids, starts = [self.bos_id], []
        for message in messages:
            ids.extend(self.encode(message["role"].capitalize() + ": "))
            starts.append(len(ids))
            if message["role"] == "assistant":
                ids.extend(self.encode(message["content"]) + [self.eos_id])
            else:
                ids.extend(self.encode(message["content"] + "\n"))
        if add_generation_prompt:
            ids.extend(self.encode("Assistant: "))
        return ids, starts


def check_messages(messages, add_generation_prompt):
    """An optional system message, then user/assistant alternating from user; else UserError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("a conversation must be a non-empty list of {'role', 'content'} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"message {i} must be a dict with a string 'content', got {m!r:.80}")
        if m.get("role") not in ROLES:
            raise UserError(f"message {i} has role {m.get('role')!r}; "
                            f"use one of {', '.join(ROLES)}")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise UserError("a conversation needs a user message after the system message")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = i + len(messages) - len(turns)
            raise UserError(f"message {where} has role {m['role']!r} but {expected!r} was "
                            f"expected: after an optional first system message, user and "
                            f"assistant alternate, starting with user")
    if add_generation_prompt and turns[-1]["role"] != "user":
        raise UserError("add_generation_prompt needs a conversation that ends with a user message")


def _detect_format(template) -> str | None:
    """The chat format a Hugging Face chat_template (a string or a list of named ones) is for."""
    if isinstance(template, list):  # older configs: [{"name": ..., "template": ...}, ...]
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    if not isinstance(template, str):
        return None
    if "<|start_header_id|>" in template:
        return "llama3"
    if "<|im_start|>" in template:
        return "chatml"
    return None


def _token_string(value, config_file) -> str | None:
    """A special token in tokenizer_config.json: "<s>" or {"content": "<s>", ...} or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"{config_file}: a special token must be a string or {{'content': ...}}, "
                    f"got {value!r:.80}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, used by byte-level BPE tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # control bytes and the space map to 256, 257, ... in order
            table[b] = chr(256 + extra)
            extra += 1
    return table
