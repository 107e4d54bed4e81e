"""Reliability (issue 8): bad input is one line and exit status 2, a crash or Ctrl-C loses no
checkpoint, a non-finite loss stops the run, and rewards do not depend on batching.

Bad-input cases tried here (the README's reliability section quotes these numbers; the last
test checks this table against the lists in this file):

| bad input                                          | cases | how                              |
|----------------------------------------------------|------:|----------------------------------|
| `python -m minirm.train`                           |    24 | main([...]) + capsys             |
| `python -m minirm.evaluate`                        |    22 | main([...]) + capsys             |
| `python -m minirm.score`                           |     7 | main([...]) + capsys             |
| `python -m minirm.expo`                            |     8 | main([...]) + capsys             |
| `python -m minirm.generate`                        |     7 | main([...]) + capsys             |
| `python -m minirm.convert`                         |     9 | main([...]) + capsys             |
| `python -m minirm.plan`                            |     7 | main([...]) + capsys             |
| `python -m minirm.released`                        |     5 | main([...]) + capsys             |
| `python -m minirm.sft`, `python -m minirm.reinforce` |   8 | main([...]) + capsys             |
| the same in a real process (train)                 |     1 | subprocess: status 2, one line   |
| crafted corrupt GGUF files and safetensors indexes |     5 | the reader raises UserError      |
| all hand-written bad-input cases                   |   103 |                                  |
| fuzz tests, 40 seeded examples each                |     7 | hypothesis                       |

Every command case checks: exit status 2, exactly one line on stderr, starting with "error: "
and containing the expected message. The 7 fuzz tests throw random, truncated and mutated input
at every loader and accept only success or a UserError: JSONL rows near valid ones of every
format (read by the 8 preference/ratings loaders, sft and reinforce, then encoded; the same rows
again as a JSON list), gzip files cut and corrupted, CSV text (no loader reads CSV: load_pairs
must refuse it), safetensors files (random bytes, truncated, random headers, flipped bytes, a
random index.json) under a valid config.json, config.json files with values replaced (wrong
types, out of range, rope scaling incomplete) read by `config.from_hf`, GGUF files (random
bytes, truncated, flipped header bytes) read by `gguf.GGUFFile`, and a whole Llama GGUF with
metadata values and tensor infos replaced, through `convert` and loading the result.

Faults injected besides bad input: a full disk at three points of a save, a real file-size limit
in a command, a full disk under a result file and under the metrics log (6); SIGKILL at 8 random
points of repeated saves, and between the two renames of a replace; SIGINT during training (one
process, and torchrun's whole process group); a NaN loss (stop, and --skip-nonfinite) and a NaN
gradient with a finite loss.

Guarantees after a crash, checked here:
- a process killed (SIGKILL) at random points of `save_model` always leaves a whole checkpoint
  at its path, the previous one or the new one, never a partial one (`recover_dir` puts the old
  one back when the kill fell between the two renames);
- a full disk during a save is one line naming the folder, and the previous checkpoint is
  untouched; no temporary folder is left behind;
- Ctrl-C during training saves a checkpoint at the next step boundary and exits with status 130
  and no traceback; `--resume` then gives the losses of an uninterrupted run. Under torchrun
  (tp=2) every rank stops after the same step and the resumed run matches one process.
Tensor-parallel degree: `test_parallel.py::test_debug_model_tp2_matches_tp1` checks that TP=2
rewards equal TP=1 within 1e-5 (with a left-padded row), so it is not repeated here.
"""

import errno
import gzip
import importlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import snapshot

from minirm import checkpoint, data as D, gguf, losses, toysteer
from minirm.checkpoint import load_model, save_model
from minirm.config import LLAMA3_ROPE_SCALING as LLAMA3_SCALING
from minirm.errors import UserError, cli
from minirm.released import token0_reward
from minirm.scoring import reduce_outputs, score_pairs, score_sequences
from minirm.tokenizer import Tokenizer
from minirm.trainer import NonFiniteError, OptimSettings, Trainer

ROOT = Path(__file__).resolve().parents[1]
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 40))  # 40: the docstring's count
# Seeded (the same examples every run, so CI cannot flake); FUZZ_EXAMPLES=1000 hunts further.
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HAS_CUDA = torch.cuda.is_available()


def _env():
    """For subprocesses: this checkout first, and as many threads as this process uses (the
    same reductions, so the same floats)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "PYTHONDONTWRITEBYTECODE": "1"}


# ---------------------------------------------------------------------------------- files

def gguf_bytes(metadata=(), tensors=(), version=3, magic=b"GGUF", endian="<"):
    """A GGUF file (spec layout): metadata (key, type, value), tensors (name, dims, type, raw)."""
    def string(s):
        b = s.encode()
        return struct.pack(endian + "Q", len(b)) + b

    def value(vtype, v):
        if vtype == gguf.STRING:
            return string(v)
        if vtype == gguf.ARRAY:
            etype, items = v
            return struct.pack(endian + "IQ", etype, len(items)) + b"".join(
                value(etype, x) for x in items)
        return struct.pack(endian + gguf._SCALAR_FORMATS[vtype][1:], v)

    head = magic + struct.pack(endian + "IQQ", version, len(tensors), len(metadata))
    for key, vtype, v in metadata:
        head += string(key) + struct.pack(endian + "I", vtype) + value(vtype, v)
    body, offsets = b"", []
    for *_, raw in tensors:
        body += b"\0" * (-len(body) % 32)
        offsets.append(len(body))
        body += raw
    for (name, dims, ggml_type, _), offset in zip(tensors, offsets):
        head += string(name) + struct.pack(endian + "I", len(dims))
        head += b"".join(struct.pack(endian + "Q", d) for d in dims)
        head += struct.pack(endian + "IQ", ggml_type, offset)
    return head + b"\0" * (-len(head) % 32) + body


LLAMA_META = [
    ("general.architecture", gguf.STRING, "llama"), ("llama.block_count", gguf.UINT32, 1),
    ("llama.embedding_length", gguf.UINT32, 32), ("llama.feed_forward_length", gguf.UINT32, 64),
    ("llama.attention.head_count", gguf.UINT32, 4), ("llama.context_length", gguf.UINT32, 64),
    ("llama.attention.layer_norm_rms_epsilon", gguf.FLOAT32, 1e-5),
    ("tokenizer.ggml.tokens", gguf.ARRAY, (gguf.STRING, ["a", "b", "c"])),
]
Q8_BLOCK = struct.pack("<e", 0.5) + bytes(range(32))


def llama_gguf():
    """A whole tiny Llama GGUF that `convert` turns into a model folder (dim 8, 1 layer, 2/1
    heads, a 5-token vocabulary), as (metadata, tensors) lists for `gguf_bytes`."""
    tokens = ["<|im_start|>", "<|im_end|>", "a", "b", "ab"]
    meta = [("general.architecture", gguf.STRING, "llama"), ("llama.block_count", gguf.UINT32, 1),
            ("llama.embedding_length", gguf.UINT32, 8),
            ("llama.feed_forward_length", gguf.UINT32, 16),
            ("llama.attention.head_count", gguf.UINT32, 2),
            ("llama.attention.head_count_kv", gguf.UINT32, 1),
            ("llama.context_length", gguf.UINT32, 64),
            ("llama.attention.layer_norm_rms_epsilon", gguf.FLOAT32, 1e-5),
            ("tokenizer.ggml.model", gguf.STRING, "gpt2"),
            ("tokenizer.ggml.tokens", gguf.ARRAY, (gguf.STRING, tokens)),
            ("tokenizer.ggml.token_type", gguf.ARRAY, (gguf.INT32, [3, 3, 1, 1, 1])),
            ("tokenizer.ggml.merges", gguf.ARRAY, (gguf.STRING, ["a b"])),
            ("tokenizer.ggml.bos_token_id", gguf.UINT32, 0),
            ("tokenizer.ggml.eos_token_id", gguf.UINT32, 1)]

    def f32(name, *dims):
        n = 1
        for d in dims:
            n *= d
        return (name, dims, gguf.F32, struct.pack(f"<{n}f", *[0.01 * i for i in range(n)]))
    layer = [f32("blk.0.attn_q.weight", 8, 8), f32("blk.0.attn_k.weight", 8, 4),
             f32("blk.0.attn_v.weight", 8, 4), f32("blk.0.attn_output.weight", 8, 8),
             f32("blk.0.ffn_gate.weight", 8, 16), f32("blk.0.ffn_up.weight", 8, 16),
             f32("blk.0.ffn_down.weight", 16, 8), f32("blk.0.attn_norm.weight", 8),
             f32("blk.0.ffn_norm.weight", 8)]
    tensors = [f32("token_embd.weight", 8, 5), f32("output_norm.weight", 8), *layer,
               f32("output.weight", 8, 5)]
    return meta, tensors


VALID_GGUF = gguf_bytes(LLAMA_META, [
    ("token_embd.weight", (4, 2), gguf.F32, struct.pack("<8f", *range(8))),
    ("blk.0.attn_q.weight", (32, 1), gguf.Q8_0, Q8_BLOCK)])


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes)
                     else content.encode("utf-8", "surrogatepass"))  # lone surrogates too
    return path


def rows(*objs):
    return "".join(json.dumps(o) + "\n" for o in objs)


PAIR = {"prompt": "hi", "chosen": "a", "rejected": "b"}
HS2 = {"prompt": "hi", "response_1": "a", "response_2": "b", "preference_strength": 7,
       "split": "train", "three_most_similar_preferences": [{"strength": 2}]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toysteer")
    toysteer.generate(folder, seed=0, n_prompts=60, n_val_prompts=20)
    return folder


@pytest.fixture(scope="module")
def f(tmp_path_factory, toy):
    """Every bad (and a few good) input files and folders the CLI cases use, by name."""
    d = tmp_path_factory.mktemp("bad")
    tok = Tokenizer.byte_level()
    rm, _ = load_model("debug", n_outputs=1, seed=0)
    lm, _ = load_model("debug", seed=0)
    paths = {"tmp": d, "toy": toy, "rm": save_model(rm, d / "rm", tok),
             "lm": save_model(lm, d / "lm", tok)}
    mismatch = shutil.copytree(paths["rm"], d / "mismatch")
    cfg = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    corrupt = shutil.copytree(paths["rm"], d / "corrupt")
    write(corrupt / "model.safetensors", b"\x10\0\0\0\0\0\0\0{not json")
    noweights = shutil.copytree(paths["rm"], d / "noweights")
    (noweights / "model.safetensors").unlink()
    (d / "empty_dir").mkdir()
    resume = d / "resume"  # a run whose checkpoint has a truncated training state
    save_model(rm, resume / "checkpoint", tok,
               binary_files={"trainer_state_rank0.pt": {"step": 1}})
    state = resume / "checkpoint" / "trainer_state_rank0.pt"
    write(state, state.read_bytes()[:50])
    paths.update(mismatch=mismatch, corrupt=corrupt, noweights=noweights, resume=resume,
                 empty_dir=d / "empty_dir")
    gz = gzip.compress(rows(*[PAIR] * 200).encode())
    files = {
        "ok": rows(PAIR), "trunc": '{"prompt": "a", "chosen": "b"\n',
        "csv": "prompt,chosen,rejected\nhi,a,b\n", "empty": "",
        "empty_resp": rows({**PAIR, "rejected": "  "}), "strength": rows(HS2),
        "ties": rows({**PAIR, "margin": 0}), "missing": rows({"prompt": "hi", "chosen": "a"}),
        "notutf8": b'{"prompt": "\xff"}\n', "chat": rows({"messages": [
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}),
    }
    for name, content in files.items():
        paths[name] = write(d / (f"{name}.jsonl" if name != "csv" else "pairs.csv"), content)
    paths["truncgz"] = write(d / "trunc.jsonl.gz", gz[:len(gz) // 2])
    paths["gguf_trunc"] = write(d / "trunc.gguf", VALID_GGUF[:60])
    paths["gguf_q4k"] = write(d / "q4k.gguf", gguf_bytes(tensors=[("w", (256, 1), 12, b"")]))
    paths["gguf_v1"] = write(d / "v1.gguf", gguf_bytes(version=1))
    paths["gguf_be"] = write(d / "be.gguf", gguf_bytes(endian=">"))
    paths["gguf_qwen"] = write(d / "qwen.gguf", gguf_bytes(
        [("general.architecture", gguf.STRING, "qwen2")]))
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------- 1. one error style, every command

TRAIN = "--model debug --objective bt --data {toy} --out {tmp}/t --max-length 128"
EVAL = "--model {rm} --data {ok}"
SCORE = "--model {rm} --prompt hi --response a"
EXPO = "--weak {rm} --strong {rm} --alpha 1 --out {tmp}/x"
CUDA = pytest.mark.skipif(HAS_CUDA, reason="checks the message for a machine without a GPU")
NO_GPU = "no GPU is visible"
NOT_A_DEVICE = "not a device minirm runs on; pass cpu, cuda or cuda:N"
CLI_CASES = {
    "train": [
        (TRAIN.replace("{toy}", "{trunc}"), "line 1: malformed JSON"),
        (TRAIN.replace("{toy}", "{csv}"), "pairs.csv line 1: malformed JSON"),
        (TRAIN + " --batch-size abc", "argument --batch-size: invalid int value: 'abc'"),
        (TRAIN + " --no-such-flag 1", "unrecognized arguments: --no-such-flag 1"),
        (TRAIN + " --format nope", "argument --format: invalid choice: 'nope'"),
        (TRAIN + " --micro-batch-size -1", "--micro-batch-size must be positive, got -1"),
        (TRAIN + " --clip -1", "--clip must be positive, got -1.0"),
        (TRAIN + " --epochs nan", "--epochs must be a finite number, got nan"),
        (TRAIN + " --lr inf", "--lr must be a finite number, got inf"),
        (TRAIN + " --eval-every -1", "--eval-every must be >= 0, got -1"),
        pytest.param(TRAIN + " --device cuda", "--device cuda: no GPU is visible", marks=CUDA),
        (TRAIN + " --device tpu", "--device tpu: " + NOT_A_DEVICE),
        (TRAIN + " --tp 3", "world size 1 is not divisible by tp=3"),
        (TRAIN + " --max-length 1", "max_length must be an int >= 2, got 1"),
        (TRAIN + " --max-length 100000", "--max-length 100000 exceeds the model's context"),
        (TRAIN.replace("bt", "regression").replace("{toy}", "{ok}"),
         "ok.jsonl line 1: field 'response' is missing"),
        (TRAIN.replace("{toy}", "{empty_dir}"), "no preference/preference.jsonl(.gz)"),
        ("--model debug --objective bt --out {tmp}/t", "--objective needs --data"),
        ("--model debug --recipe paper-table --seeds a,b --out {tmp}/t",
         "--seeds must be comma-separated numbers, got 'a,b'"),
        ("--model debug --expo-alphas 1,nan --out {tmp}/t", "--expo-alphas must be finite"),
        (TRAIN.replace("bt", "regression") + " --init-from {rm}",
         "5-attribute regression needs a 5-output head; this checkpoint's head has 1"),
        (TRAIN.replace("debug", "{mismatch}"), "the config does not match the weights"),
        (TRAIN + " --init-from {corrupt}", "corrupt safetensors file"),
        (TRAIN.replace("{tmp}/t", "{resume}") + " --resume", "unreadable training state"),
    ],
    "evaluate": [
        ("--model {rm}", "--model and --data are required"),
        ("--model {lm} --data {ok}", "the model has no reward head"),
        (EVAL + " --batch-size 0", "--batch-size must be at least 1, got 0"),
        (EVAL + " --reward-index 4", "--reward-index 4 is out of range"),
        (EVAL + " --max-length 100000", "--max-length 100000 must be in 2..256"),
        (EVAL + " --json {ok}/x.json", "x.json: cannot write it"),
        (EVAL + " --format hh", "field 'chosen' must be a transcript"),
        (EVAL + " --weights steerlm-a", "--weights combines 5 attribute outputs"),
        pytest.param(EVAL + " --device cuda", "--device cuda: no GPU is visible", marks=CUDA),
        (EVAL + " --device cuda:x", "--device cuda:x: " + NOT_A_DEVICE),
        ("--model {rm} --data {empty_resp}", "line 1: field 'rejected' is empty"),
        ("--model {rm} --data {strength}",
         "line 1: field 'preference_strength' must be an int in -3..3, got 7"),
        ("--model {rm} --data {ties}", "no usable pair left"),
        ("--model {rm} --data {missing}", "line 1: cannot tell the format from the fields"),
        ("--model {rm} --data {missing} --format trl", "line 1: field 'rejected' is missing"),
        ("--model {rm} --data {notutf8}", "line 1: not UTF-8 text"),
        ("--model {rm} --data {truncgz}", "unreadable gzip data"),
        ("--model {rm} --data {empty}", "holds no rows"),
        ("--model {rm} --data {tmp}/nope.jsonl", "nope.jsonl not found"),
        ("--model {corrupt} --data {ok}", "corrupt safetensors file"),
        ("--model {noweights} --data {ok}", "no model.safetensors"),
        (EVAL + " --split test", "argument --split: invalid choice: 'test'"),
    ],
    "score": [
        ("--model {rm} --prompt hi", "--prompt needs one or more --response"),
        (SCORE + " --data {ok}", "pass either --prompt with one or more --response"),
        ("--model {rm} --data {ok} --response a", "--response goes with --prompt"),
        ("--model {rm} --data {ok} --out {ok}/x", "cannot write it"),
        ("--model {rm} --prompt hi --response ' '", "--response number 1 is empty"),
        (SCORE + " --chat-format llama3", "is not in the tokenizer's vocabulary"),
        (SCORE.replace("{rm}", "{mismatch}"), "the config does not match the weights"),
    ],
    "expo": [
        ("--weak {rm} --strong {lm} --alpha 1 --out {tmp}/x", "is only in the strong model"),
        (EXPO.replace("--alpha 1", "--alphas 1,x --val {ok}"), "expected comma-separated"),
        (EXPO.replace("--alpha 1", "--alpha nan"), "alpha nan is not a finite number"),
        ("--weak {rm} --strong {rm} --alpha 1", "--weak, --strong and --out are required"),
        (EXPO.replace("--alpha 1", "--alphas 1"), "--alphas needs --val FILE"),
        (EXPO + " --alphas 1", "pass --alpha A, or --alphas"),
        (EXPO.replace("--strong {rm}", "--strong {tmp}/nope"), "neither a model preset"),
        (EXPO.replace("--alpha 1", "--alphas 0,1 --val {trunc}"), "malformed JSON"),
    ],
    "generate": [
        ("--model {lm} --prompt hi --max-new-tokens 0", "--max-new-tokens must be at least 1"),
        ("--model {lm} --prompt hi --device tpu", "--device tpu: " + NOT_A_DEVICE),
        pytest.param("--model {lm} --prompt hi --device cuda", NO_GPU, marks=CUDA),
        ("--model {lm} --prompt hi --top-p 2", "--top-p must be in (0, 1], got 2.0"),
        ("--model {lm} --prompt hi --max-new-tokens 1000", "exceeds the model's context of 256"),
        ("--model {tmp}/nope --prompt hi", "neither a model preset"),
        ("--model {lm} --prompt hi --temperature -1", "--temperature must be >= 0"),
    ],
    "convert": [
        ("gguf {csv} --out {tmp}/c", "not a GGUF file (magic number b'prom', expected b'GGUF')"),
        ("gguf {tmp}/nope.gguf --out {tmp}/c", "no such GGUF file"),
        ("gguf {csv} --out {rm}", "is not empty; choose another --out or pass --force"),
        ("gguf {gguf_trunc} --out {tmp}/c", "truncated GGUF file"),
        ("gguf {gguf_q4k} --out {tmp}/c", "has type Q4_K, which this reader cannot dequantise"),
        ("gguf {gguf_v1} --out {tmp}/c", "GGUF version 1 is not supported"),
        ("gguf {gguf_be} --out {tmp}/c", "a big-endian GGUF file"),
        ("gguf {gguf_qwen} --out {tmp}/c", "architecture 'qwen2' is not supported"),
        ("--out {tmp}/c", "invalid choice: '{tmp}/c'"),
    ],
    "plan": [
        ("--model debug --tp 3", "n_kv_heads=2 is not divisible by tp=3; use tp in 1, 2"),
        ("--model debug --gpu-memory lots", "--gpu-memory 'lots': expected a size"),
        ("--model debug --seq 0", "--seq must be at least 1, got 0"),
        ("--model debug --tp 0", "--tp must be at least 1, got 0"),
        ("--model {empty_dir}", "no config.json"),
        ("--model debug --json {ok}/x.json", "x.json: cannot write it"),
        ("--model debug --dtype fp8", "argument --dtype: invalid choice: 'fp8'"),
    ],
    "released": [
        ("--model {lm} --out {tmp}/r", "no reward head to export"),
        ("--model {rm} --out {tmp}/r --reward-index 2", "--reward-index 2 is out of range"),
        ("--model {rm} --out {tmp}/r --weights steerlm-b", "--weights combines 5"),
        ("--model {tmp}/nope --out {tmp}/r", "neither a model preset"),
        ("--model {rm}", "--model and --out are required"),
    ],
    "sft": [
        ("--model debug --data {chat} --out {tmp}/s",
         "line 1: field 'messages' must end with the assistant's message"),
        ("--model debug --data {ok} --out {tmp}/s --lr nan", "--lr must be a finite number"),
        ("--model debug --data {ok} --out {tmp}/s --device tpu", "--device tpu: " + NOT_A_DEVICE),
        pytest.param("--model debug --out {tmp}/s --device cuda", NO_GPU, marks=CUDA),
    ],
    "reinforce": [
        ("--k 1 --out {tmp}/rl", "the leave-one-out baseline (METHOD.md 7.4) needs at least 2"),
        ("--clip inf --out {tmp}/rl", "--clip must be a finite number"),
        ("--device tpu --out {tmp}/rl", "--device tpu: " + NOT_A_DEVICE),
        pytest.param("--device cuda --out {tmp}/rl", NO_GPU, marks=CUDA),
    ],
}
CASES = [pytest.param(cmd, *(c.values if hasattr(c, "values") else c),
                      marks=getattr(c, "marks", ()), id=f"{cmd}-{i}")
         for cmd, cases in CLI_CASES.items() for i, c in enumerate(cases)]


def fill(template, paths):
    return [re.sub(r"\{(\w+)\}", lambda m: paths[m.group(1)], a) for a in shlex.split(template)]


@pytest.mark.parametrize("command,argv,message", CASES)
def test_bad_input_is_one_line_and_status_2(command, argv, message, f, capsys):
    main = importlib.import_module(f"minirm.{command}").main
    with pytest.raises(SystemExit) as e:
        main(fill(argv, f))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.sub(r"\{(\w+)\}", lambda m: f[m.group(1)], message) in lines[0]


REAL_PROCESS_CASES = [  # one is enough: each costs a Python with torch
    (["minirm.train", "--batch-size", "abc"], "invalid int value: 'abc'"),
]


@pytest.mark.parametrize("argv,message", REAL_PROCESS_CASES)
def test_bad_input_in_a_real_process(argv, message):
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr


def test_environment_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    @cli
    def full(argv=None):
        raise OSError(errno.ENOSPC, "No space left on device", "out/metrics.jsonl")

    @cli
    def bug(argv=None):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "minirm/nope.py")

    with pytest.raises(SystemExit) as e:
        full([])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: out/metrics.jsonl: No space left on device (the "
                                       "disk is full); free some space or choose another "
                                       "--out, then run again\n")
    with pytest.raises(FileNotFoundError):  # not the user's: a traceback, as any bug
        bug([])


# ------------------------------------------------------------------------ fuzzing loaders

KEYS = ["prompt", "chosen", "rejected", "response", "response_1", "response_2", "messages",
        "preference_strength", "three_most_similar_preferences", "split", "subset", "id",
        "input", "output_1", "output_2", "label", "margin", "helpfulness", "verbosity",
        "role", "content", "strength"]
VALID_ROWS = [
    PAIR, {**PAIR, "subset": "chat", "id": 3}, {**PAIR, "margin": -2},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [
        {"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant",
                                                              "content": "b"}]},
    {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
    {"input": "hi", "output_1": "a", "output_2": "b", "label": 1},
    {**HS2, "preference_strength": 2, "three_most_similar_preferences": [
        {"strength": 2}, {"strength": 3}, {"strength": -100}]},
    {"prompt": "hi\n<extra_id_1>Assistant\nyo\n<extra_id_1>User\nok", "response": "a",
     "helpfulness": 3, "correctness": 2, "coherence": 4, "complexity": 1, "verbosity": 2},
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "a"}]},
]
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from(
    [-100, -3, 0, 1, 2, 3, 4, 5, 1.5, 2.0, float("1e308")]) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.sampled_from(["user", "assistant", "system", "\ud800", "",
                                             "\n\nHuman: x", "\n\nAssistant: y", "train",
                                             "<|bos|>", "<|eos|>", "<|user|>", "\x00",
                                             "<extra_id_1>Assistant", "<|im_start|>"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=5), c, max_size=4), max_leaves=12)


@st.composite
def jsonl_rows(draw):
    """A row near a valid one of some format (a field dropped or replaced), or anything."""
    if draw(st.booleans()):
        row = dict(draw(st.sampled_from(VALID_ROWS)))
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.sampled_from(sorted(row) + KEYS))
            if draw(st.booleans()):
                row.pop(key, None)
            else:
                row[key] = draw(values)
        text = json.dumps(row, ensure_ascii=draw(st.booleans()))
    else:
        text = json.dumps(draw(values))
    return text[:draw(st.integers(0, len(text)))] if draw(st.integers(0, 5)) == 0 else text


def _optional(module):
    try:  # sft and reinforce are newer than this test: fuzz their loaders when they exist
        return importlib.import_module(f"minirm.{module}")
    except ImportError:
        return None


def all_loaders():
    quiet = {"report": lambda *_: None}
    loaders = {"load_pairs": lambda p: D.load_pairs(p, **quiet),
               "load_ratings": D.load_ratings,
               "helpsteer2 val": lambda p: D.load_helpsteer2_preference(p, "val", **quiet)}
    for fmt in D.FORMATS:
        loaders[fmt] = lambda p, fmt=fmt: D.load_pairs(p, format=fmt, **quiet)
    sft, reinforce = _optional("sft"), _optional("reinforce")
    if sft is not None:
        loaders["sft.load_chats"] = sft.load_chats
    if reinforce is not None:
        loaders["reinforce.load_prompts"] = reinforce.load_prompts
    return loaders


def only_user_errors(path, loaders=None):
    """Every loader reads `path`, or says what is wrong with a UserError; nothing else."""
    tok = Tokenizer.byte_level()
    for load in (loaders or all_loaders()).values():
        try:
            got = load(path)
            if got and isinstance(got[0], D.Pair):
                D.encode_pairs(got, tok, 64, "prompt-left", report=lambda *_: None)
            elif got and isinstance(got[0], D.Rated):
                D.encode_rated(got, tok, 64, "prompt-left", report=lambda *_: None)
        except UserError:
            pass


@FUZZ
@given(lines=st.lists(jsonl_rows() | st.binary(max_size=30).map(
    lambda b: b.decode("latin-1")), min_size=0, max_size=4))
def test_fuzz_jsonl_at_every_loader(lines):
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "f.jsonl", "\n".join(lines))
        only_user_errors(path)
        llmbar = write(Path(d) / "Natural.json", "[" + ",\n".join(lines) + "]")
        only_user_errors(llmbar)  # a JSON list, as LLMBar ships


@FUZZ
@given(n=st.integers(1, 40), cut=st.floats(0, 1), flip=st.integers(0, 2000))
def test_fuzz_truncated_and_corrupt_gzip(n, cut, flip):
    raw = bytearray(gzip.compress(rows(*[VALID_ROWS[i % len(VALID_ROWS)] for i in range(n)])
                                  .encode()))
    raw = raw[:int(len(raw) * cut)]
    if raw and flip % 3 == 0:
        raw[flip % len(raw)] ^= 0x55
    with tempfile.TemporaryDirectory() as d:
        only_user_errors(write(Path(d) / "f.jsonl.gz", bytes(raw)))


@FUZZ
@given(table=st.lists(st.lists(st.text(max_size=8), min_size=1, max_size=4), max_size=5),
       header=st.booleans())
def test_fuzz_csv_text_given_to_load_pairs(table, header):
    import csv
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(["prompt", "chosen", "rejected"])
    writer.writerows(table)
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "pairs.csv", out.getvalue())
        only_user_errors(path, {"load_pairs": lambda p: D.load_pairs(p, report=lambda *_: None)})


@pytest.fixture(scope="module")
def valid_folder(tmp_path_factory):
    model, _ = load_model("debug", n_outputs=1, seed=0)
    return save_model(model, tmp_path_factory.mktemp("valid") / "m")


header_dicts = st.dictionaries(  # safetensors headers: tensor name -> dtype, shape, offsets
    st.sampled_from(["model.norm.weight", "score.bias", "x", "__metadata__"]),
    st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from(["F32", "F16", "I8", "BOOL", "Q", 3]),
        "shape": st.lists(st.integers(-2, 70), max_size=3) | values,
        "data_offsets": st.lists(st.integers(-5, 10**6), max_size=3)}),
    max_size=3)


@FUZZ
@given(kind=st.sampled_from(["random", "truncated", "header", "flipped", "index"]),
       blob=st.binary(max_size=200), cut=st.floats(0, 1), header=header_dicts,
       index=values, data=st.data())
def test_fuzz_safetensors_at_load_model(valid_folder, kind, blob, cut, header, index, data):
    valid = (valid_folder / "model.safetensors").read_bytes()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "m"
        folder.mkdir()
        shutil.copy(valid_folder / "config.json", folder)
        if kind == "random":
            content = blob
        elif kind == "truncated":
            content = valid[:int(len(valid) * cut)]
        elif kind == "header":
            text = json.dumps(header).encode()
            size = data.draw(st.sampled_from([len(text), len(text) + 1, len(text) - 1, 2**40]))
            content = struct.pack("<Q", size) + text + blob
        elif kind == "flipped":
            content = bytearray(valid)
            for _ in range(data.draw(st.integers(1, 4))):
                content[data.draw(st.integers(0, 800))] = data.draw(st.integers(0, 255))
            content = bytes(content)
        else:  # an index.json of any JSON value, beside a valid shard
            content = valid
            write(folder / "model.safetensors.index.json", json.dumps(index))
        write(folder / ("weights.safetensors" if kind == "index" else "model.safetensors"),
              content)
        try:
            load_model(folder)
        except UserError:
            pass


HF_CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "intermediate_size", "head_dim",
                  "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                  "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                  "architectures", "model_type", "num_labels", "tie_word_embeddings"]
rope_dicts = st.fixed_dictionaries({}, optional={
    k: st.sampled_from([1.0, 4.0, 8192, 0, -1.0, "8", None, float("nan")])
    for k in ("factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings")}).map(lambda d: {"rope_type": "llama3", **d})


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(HF_CONFIG_KEYS),
                             values | rope_dicts | st.integers(-3, 300), max_size=4),
       dropped=st.lists(st.sampled_from(HF_CONFIG_KEYS), max_size=2))
def test_fuzz_config_json_at_from_hf(edits, dropped):
    """A Llama config.json with values replaced or keys dropped: from_hf gives a config that
    builds a model, or a UserError."""
    from minirm.config import from_hf, preset, to_hf
    from minirm.model import Transformer

    hf = {**to_hf(preset("debug", rope_scaling=LLAMA3_SCALING)), **edits}
    for k in dropped:
        hf.pop(k, None)
    with tempfile.TemporaryDirectory() as d:
        write(Path(d) / "config.json", json.dumps(hf))
        try:
            cfg = from_hf(d)
        except UserError:
            return
    with torch.device("meta"):
        Transformer(cfg)


@FUZZ
@given(kind=st.sampled_from(["random", "magic", "truncated", "flipped"]),
       blob=st.binary(max_size=300), cut=st.integers(0, len(VALID_GGUF)), data=st.data())
def test_fuzz_gguf_headers(kind, blob, cut, data):
    from minirm.convert import model_config

    if kind == "random":
        content = blob
    elif kind == "magic":
        content = b"GGUF" + blob
    elif kind == "truncated":
        content = VALID_GGUF[:cut]
    else:
        content = bytearray(VALID_GGUF)
        for _ in range(data.draw(st.integers(1, 4))):
            content[data.draw(st.integers(0, 400))] = data.draw(st.integers(0, 255))
        content = bytes(content)
    with tempfile.TemporaryDirectory() as d:
        try:
            with gguf.GGUFFile(write(Path(d) / "m.gguf", content)) as g:
                for name in g.tensors:
                    g.get(name)
                model_config(g)
        except UserError:
            pass


gguf_values = st.one_of(
    st.tuples(st.just(gguf.UINT32), st.integers(0, 2**32 - 1)),
    st.tuples(st.just(gguf.INT32), st.integers(-2**31, 2**31 - 1)),
    st.tuples(st.just(gguf.UINT64), st.integers(0, 2**64 - 1)),
    st.tuples(st.just(gguf.FLOAT32), st.floats(width=32)),
    st.tuples(st.just(gguf.BOOL), st.booleans()),
    st.tuples(st.just(gguf.STRING), st.text(max_size=8) | st.sampled_from(["llama", "gpt2"])),
    st.tuples(st.just(gguf.ARRAY), st.tuples(st.just(gguf.STRING), st.lists(
        st.sampled_from(["a", "b", "a b", "ab", "", "c d"]), max_size=6))),
    st.tuples(st.just(gguf.ARRAY), st.tuples(st.just(gguf.INT32), st.lists(
        st.integers(-3, 7), max_size=6))),
    st.tuples(st.just(gguf.ARRAY), st.tuples(st.just(gguf.ARRAY), st.lists(
        st.tuples(st.just(gguf.UINT8), st.lists(st.integers(0, 255), max_size=2)),
        max_size=2))))
GGUF_KEYS = [k for k, _, _ in llama_gguf()[0]] + [
    "general.alignment", "llama.attention.key_length", "llama.rope.dimension_count",
    "llama.rope.freq_base", "llama.rope.scaling.type", "llama.expert_count",
    "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.eot_token_id", "tokenizer.chat_template"]


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(GGUF_KEYS), st.none() | gguf_values),
                      max_size=3),
       tensor_edits=st.lists(st.tuples(st.integers(0, 12), st.sampled_from(
           ["drop", "dims", "type"]), st.lists(st.integers(0, 20), min_size=1, max_size=3),
           st.sampled_from([0, 1, 3, 8, 12, 99])), max_size=2))
def test_fuzz_gguf_metadata_and_tensor_infos_through_convert(edits, tensor_edits):
    """A valid Llama GGUF with metadata values or tensor infos replaced: `convert` writes a
    folder that loads, or refuses with a UserError."""
    from minirm.convert import convert_gguf

    meta, tensors = llama_gguf()
    meta = dict((k, (t, v)) for k, t, v in meta)
    for key, value in edits:
        meta.pop(key, None) if value is None else meta.__setitem__(key, value)
    for i, what, dims, ggml_type in tensor_edits:
        if i >= len(tensors):
            continue
        name, old_dims, old_type, raw = tensors[i]
        if what == "drop":
            tensors.pop(i)
        else:
            tensors[i] = (name, tuple(dims) if what == "dims" else old_dims,
                          ggml_type if what == "type" else old_type, raw)
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "m.gguf", gguf_bytes(
            [(k, t, v) for k, (t, v) in meta.items()], tensors))
        try:
            convert_gguf(path, Path(d) / "out")
            load_model(Path(d) / "out")
        except UserError:
            pass


CRAFTED = {  # corrupt files the fuzzers above reach rarely or never: each was a crash once
    "gguf alignment 0": ("gguf", gguf_bytes([("general.alignment", gguf.UINT32, 0)]),
                         "general.alignment 0 is not a positive integer"),
    "gguf nested arrays": ("gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack(
        "<Q", 1) + b"k" + struct.pack("<I", gguf.ARRAY) + struct.pack(
        "<IQ", gguf.ARRAY, 1) * 5000 + struct.pack("<IQ", gguf.UINT8, 0),
        "GGUF metadata nested too deeply"),
    "gguf dims overflow": ("gguf", gguf_bytes(tensors=[("w", (2**40, 2**40), gguf.F32, b"")]),
                           "truncated GGUF file: tensor 'w' ends at byte"),
    "index map is a list": ("index", {"weight_map": ["model.safetensors"]},
                            "'weight_map' must map tensor names to file names"),
    "index file not a name": ("index", {"weight_map": {"model.norm.weight": 5}},
                              "'weight_map' must map tensor names to file names"),
}


@pytest.mark.parametrize("kind,content,message", CRAFTED.values(), ids=list(CRAFTED))
def test_crafted_corrupt_files(kind, content, message, valid_folder, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        if kind == "gguf":
            gguf.GGUFFile(write(tmp_path / "m.gguf", content))
        else:
            folder = shutil.copytree(valid_folder, tmp_path / "m")
            write(folder / "model.safetensors.index.json", json.dumps(content))
            load_model(folder)


# -------------------------------------------------------------------- 2. no data loss

KILL_SCRIPT = r"""
import os, random, signal, sys, time
import torch
torch.set_num_threads(1)
from minirm.checkpoint import load_model, save_model
from minirm.config import LLAMA3_ROPE_SCALING as LLAMA3_SCALING

out, rounds = sys.argv[1], int(sys.argv[2])
model, _ = load_model("debug", n_outputs=1, seed=0)

def save(version):  # the version is in the weights and in the training state
    with torch.no_grad():
        model.score.bias.fill_(version)
    save_model(model, out, binary_files={"trainer_state_rank0.pt": {"step": version}})

save(0)
rng, last = random.Random(0), 0
for _ in range(rounds):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child saves new versions until it is killed
        os.close(r)
        version = last
        while True:
            version += 1
            save(version)
            os.write(w, b"%d\n" % version)
    os.close(w)
    time.sleep(rng.uniform(0.02, 0.25))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        done = [int(v) for v in f.read().split()]
    last = done[-1] if done else last
    print(last, flush=True)  # the newest version whose save returned
    sys.stdin.readline()     # the test has checked the folder
"""


def test_kill_during_save_leaves_a_whole_checkpoint(tmp_path):
    """SIGKILL at random points of save_model, 8 times: each time the folder holds one whole
    version, the last one saved or the one being saved, and loads."""
    out, rounds = tmp_path / "ckpt", 8
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), str(rounds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    try:
        versions, recovered, set_aside = [], 0, 0
        for _ in range(rounds):
            line = proc.stdout.readline()
            assert line, "the saving process died"
            last = int(line)
            recovered += not out.exists()  # killed between the two renames of a replace
            model, _ = load_model(out)     # puts a set-aside folder back, checks every tensor
            version = model.score.bias.item()
            state = torch.load(out / "trainer_state_rank0.pt", weights_only=False)
            assert version in (last, last + 1) and state["step"] == version
            versions.append(version)
            # Besides the checkpoint only what the next save removes: a killed save's temporary
            # folder, or the whole previous version set aside by a replace killed after its swap.
            others = [p.name for p in tmp_path.iterdir() if p != out]
            assert all(n.startswith(".ckpt.tmp-") or n == ".ckpt.old" for n in others), others
            set_aside += ".ckpt.old" in others
            proc.stdin.write("\n")
            proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert versions[-1] > 0, versions  # the kills did land during saves
    save_model(load_model(out)[0], out)  # the next save leaves the folder alone, clean
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    print(f"versions after each kill: {versions}; killed between the renames: {recovered}, "
          f"after them: {set_aside}")


def test_kill_between_the_two_renames_keeps_the_old_checkpoint(tmp_path):
    model, _ = load_model("debug", n_outputs=1, seed=0)
    out = save_model(model, tmp_path / "m")
    old = load_model(out)[0].state_dict()
    os.rename(out, tmp_path / ".m.old")  # what a kill right after the first rename leaves
    again, _ = load_model(out)  # put back
    for name, t in again.state_dict().items():
        assert torch.equal(t, old[name]), name
    os.rename(out, tmp_path / ".m.old")
    with torch.no_grad():
        model.score.bias.fill_(7)
    save_model(model, out)  # a save in that state also gives a whole folder
    assert load_model(out)[0].score.bias.item() == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _full_disk_after(n_bytes):
    """A writer that writes n_bytes then fails as a full disk does."""
    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device", path)
    return save_file


@pytest.mark.parametrize("where", ["weights", "training state", "config.json"])
def test_full_disk_is_reported_and_the_old_checkpoint_survives(tmp_path, monkeypatch, where):
    model, _ = load_model("debug", n_outputs=1, seed=0)
    out = save_model(model, tmp_path / "m", binary_files={"state.pt": {"step": 1}})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if where == "weights":
        monkeypatch.setattr(checkpoint, "save_file", _full_disk_after(1000))
    elif where == "training state":  # torch.save hides the OS error in a RuntimeError
        def torch_save(obj, path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "704 vs 598")
        monkeypatch.setattr(torch, "save", torch_save)
    else:
        real = Path.write_text

        def write_text(self, text, *a, **kw):
            if self.name == "config.json":
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real(self, text, *a, **kw)
        monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(UserError, match=r"m: could not save the model: .*; the previous .*m "
                                        r"is untouched\. Free some disk space") as e:
        save_model(model, out, binary_files={"state.pt": {"step": 2}})
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left


def test_real_file_size_limit_during_a_command_is_one_line(tmp_path, f):
    """A real short write (RLIMIT_FSIZE: the kernel refuses to grow a file, as on a full disk)
    through safetensors, in `python -m minirm.expo`: status 2, one line, old output intact."""
    import resource

    out = shutil.copytree(f["rm"], tmp_path / "expo_out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([sys.executable, "-m", "minirm.expo", "--weak", f["rm"], "--strong",
                           f["rm"], "--alpha", "0.5", "--out", str(out), "--force"],
                          capture_output=True,
                          text=True, env=_env(), preexec_fn=limit, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "could not save the model" in proc.stderr
    assert "File too large" in proc.stderr and "is untouched" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".expo_out")]


def test_unwritable_result_file_is_one_line(tmp_path, monkeypatch):
    from minirm.score import write_atomic

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    write_atomic(tmp_path / "r.json", "old")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(UserError, match=r"r.json: cannot write it \(the disk is full\)"):
        write_atomic(tmp_path / "r.json", "new")
    monkeypatch.undo()
    assert (tmp_path / "r.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def train_args(out, data, *extra):
    return ["--model", "debug", "--data", str(data), "--out", str(out), "--batch-size", "8",
            "--lr", "1e-3", "--warmup-steps", "2", "--eval-every", "0", "--save-every", "100",
            "--max-length", "128", "--objective", "helpfulness", "--epochs", "1", *extra]


def losses_of(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().split("\n")
            if line]


def test_ctrl_c_saves_at_a_step_boundary_and_resume_matches(tmp_path, toy):
    """SIGINT to `python -m minirm.train` once its first step is logged: a checkpoint at the
    next step boundary, exit status 130, no traceback; --resume then logs the losses of a run
    never interrupted (15 steps in all)."""
    import threading

    from minirm.train import main

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "minirm.train",
                             *train_args(cut, toy)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())

    def ctrl_c():  # meanwhile this process trains the uninterrupted reference
        metrics = cut / "metrics.jsonl"
        while proc.poll() is None:
            if metrics.exists() and metrics.read_text():
                proc.send_signal(signal.SIGINT)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=ctrl_c)
    watcher.start()
    try:
        main(train_args(tmp_path / "full", toy))
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
        watcher.join()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "stopped at step" in stdout, stdout + stderr
    stopped = int(re.search(r"stopped at step (\d+)", stdout).group(1))
    state = torch.load(cut / "checkpoint" / "trainer_state_rank0.pt", weights_only=False)
    assert state["step"] == stopped == len(losses_of(cut))  # a step boundary, nothing lost
    assert not (cut / "model").exists()

    full = losses_of(tmp_path / "full")
    assert stopped < len(full) == 15
    main(train_args(cut, toy, "--resume"))
    assert losses_of(cut) == pytest.approx(full, rel=1e-6, abs=1e-7)


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step(tmp_path, toy):
    """Ctrl-C in a terminal reaches torchrun and both workers (one process group): both ranks
    stop after the same step, save their state and exit 130; --resume under torchrun then
    gives the losses of an uninterrupted single-process run (tp=2 equals tp=1 to 1e-6)."""
    from minirm.train import main

    cut = tmp_path / "cut"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "minirm.train"]
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*torchrun, *train_args(cut, toy, "--tp", "2")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        metrics = cut / "metrics.jsonl"
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if metrics.exists() and metrics.read_text():
                os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
                break
            time.sleep(0.01)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped at step" in stdout, stdout + stderr
    assert "KeyboardInterrupt" not in stderr, stderr  # no rank was cut off mid-step
    stopped = int(re.search(r"stopped at step (\d+)", stdout).group(1))
    states = [torch.load(cut / "checkpoint" / f"trainer_state_rank{r}.pt", weights_only=False)
              for r in (0, 1)]
    assert [st["step"] for st in states] == [stopped, stopped] == [len(losses_of(cut))] * 2
    assert not (cut / "model").exists()

    main(train_args(tmp_path / "full", toy))
    full = losses_of(tmp_path / "full")
    assert stopped < len(full) == 15
    done = subprocess.run([*torchrun, *train_args(cut, toy, "--tp", "2", "--resume")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert losses_of(cut) == pytest.approx(full, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ 3. numerical safety

def _nan_on_call(monkeypatch, n):
    """Make the scaled-BT loss NaN on its n-th call (step n: one micro-batch per step)."""
    real, calls = losses.PAIR_LOSSES["scaled-bt"], []

    def loss(delta, strength):
        calls.append(1)
        out = real(delta, strength)
        return out * float("nan") if len(calls) == n else out
    monkeypatch.setitem(losses.PAIR_LOSSES, "scaled-bt", loss)


def nan_args(out, data, *extra):
    return ["--model", "debug", "--data", str(data), "--out", str(out), "--objective",
            "scaled-bt", "--batch-size", "8", "--lr", "1e-3", "--epochs", "1", "--eval-every",
            "0", "--max-length", "128", *extra]


def test_non_finite_loss_stops_the_run_naming_step_and_batch(tmp_path, toy, monkeypatch,
                                                              capsys):
    from minirm.train import main

    _nan_on_call(monkeypatch, 3)
    with pytest.raises(SystemExit) as e:
        main(nan_args(tmp_path / "nan", toy))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: non-finite loss at step 3 \(batch of 8 training items "
                        r"\[(\d+, ){7}\d+\]\); lower the learning rate or pass "
                        r"--skip-nonfinite to skip such batches", last), last
    assert len(losses_of(tmp_path / "nan")) == 2  # steps 1 and 2 logged, nothing trained on NaN


def test_skip_nonfinite_skips_the_batch_and_goes_on(tmp_path, toy, monkeypatch):
    from minirm.train import main

    _nan_on_call(monkeypatch, 3)
    main(nan_args(tmp_path / "skip", toy, "--skip-nonfinite"))
    records = [json.loads(line) for line in
               (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", 0) for r in records] == [0, 0, 1, 0, 0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for i, r in enumerate(records) if i != 2)
    model, _ = load_model(tmp_path / "skip" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_non_finite_gradient_with_a_finite_loss(tmp_path):
    model, _ = load_model("debug", n_outputs=1, seed=0)
    model.score.weight.register_hook(lambda g: g * float("nan"))
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))

    def loss_fn(batch):
        return model.reward(tokens).square().mean(), 2, {}

    trainer = Trainer(model, OptimSettings(lr=1e-3, warmup_steps=0), tmp_path, 4)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 1 \(batch of 2"):
        trainer.train_step([None], loss_fn, 2, batch_desc="batch of 2 training items [0, 1]")
    skipping = Trainer(model, OptimSettings(lr=1e-3, warmup_steps=0), tmp_path, 4,
                       skip_nonfinite=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert skipping.train_step([None], loss_fn, 2)["skipped"] == 1
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name  # the update was skipped, weights untouched


def test_reward_head_and_losses_stay_float32_under_bf16_autocast():
    model, _ = load_model("debug", n_outputs=5, seed=0, dtype="bfloat16")
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert model.score.weight.dtype == model.score.bias.dtype == torch.float32
    tokens = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.reward(tokens, mask)
        delta, strength = out[:2, 0] - out[2:, 0], torch.tensor([1.0, 3.0])
        pair_losses = [fn(delta, strength) for fn in losses.PAIR_LOSSES.values()]
        labels = torch.tensor([[3.0, 2, 4, 1, -100]] * 4)
        rating_losses = [losses.regression(out, labels), losses.helpfulness(out[:, 0],
                                                                            labels[:, 0])]
    assert out.dtype == torch.float32
    assert all(loss.dtype == torch.float32 for loss in pair_losses + rating_losses)
    sum(pair_losses + rating_losses).backward()
    assert model.score.weight.grad.dtype == torch.float32
    assert model.score.weight.dtype == torch.float32


# ------------------------------------------------------------- 4. independent of batching

@pytest.fixture(scope="module")
def rm():
    model, _ = load_model("debug", n_outputs=2, seed=0)
    return model.eval()


def test_rewards_do_not_depend_on_batch_size_or_order(rm):
    gen = random.Random(0)
    seqs = [[gen.randrange(256) for _ in range(gen.randrange(1, 40))] for _ in range(19)]
    want = torch.stack([score_sequences(rm, [s], pad_id=258)[0] for s in seqs])  # one by one
    for batch_size in (3, 8, 32):
        got = score_sequences(rm, seqs, pad_id=258, batch_size=batch_size)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    order = list(range(len(seqs)))
    gen.shuffle(order)
    shuffled = score_sequences(rm, [seqs[i] for i in order], pad_id=258, batch_size=8)
    torch.testing.assert_close(shuffled, want[order], atol=1e-5, rtol=0)


def test_samples_of_one_prompt_share_it_and_keep_their_rewards(rm):
    """score_sequences(group=k), as a REINFORCE rollout is scored: runs of k sequences continue
    one prompt, computed once per batch where that saves positions. Every sequence gets the
    reward it gets alone (the head's, and a language model's token-0 logit), at any batch
    size; a batch of long prompts takes the shared layout, one of long answers does not."""
    gen = random.Random(2)

    def ids(n):
        return [gen.randrange(256) for _ in range(n)]

    seqs = []
    for prompt, longest in ((30, 3), (25, 5), (2, 40), (40, 1), (1, 30)):
        p = ids(prompt)
        seqs += [p + ids(gen.randrange(1, longest + 1)) for _ in range(3)]
    lm, _ = load_model("debug", seed=1)
    for model, fn in ((rm, None), (lm, token0_reward(lm))):
        alone = torch.stack([score_sequences(model, [s], 258, reward_fn=fn)[0] for s in seqs])
        calls, reward = [], fn or model.reward

        def spy(tokens, mask, prompts=None):
            calls.append(prompts is not None)
            return reward(tokens, mask, prompts=prompts)

        for batch_size in (3, 7, 32):
            calls.clear()
            got = score_sequences(model, seqs, 258, batch_size, reward_fn=spy, group=3)
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
            if batch_size == 3:  # one group a batch: the three with long prompts share
                assert len(calls) == 5 and calls.count(True) == 3
    with pytest.raises(ValueError, match="a token in every sequence"):
        D.collate_shared([[1, 2], []], [0, 0], 0)


def test_batch_plans_by_hand():
    """Runs of k sequences share their prompt when that computes fewer positions in all."""
    from minirm.scoring import plan_batches

    p, q = list(range(10, 20)), list(range(20, 30))
    seqs = [p + [1], p + [2], q + [3], q + [4]]
    # Plain: 4 x 11 = 44 positions; shared: 2 prompts x 10 + 4 x 1 = 24.
    assert plan_batches(seqs, 4, group=2) == [([0, 1, 2, 3], True)]
    assert plan_batches(seqs, 4) == [([0, 1, 2, 3], False)]
    # Answers of 30 and 2 tokens after a 1-token prompt: a run as one batch computes 1 + 2 x 30
    # (sharing saves under 10% of 62), twice; sorted one by one, 2 x 3 + 2 x 31 = 68.
    long, short = list(range(30)), [1, 2]
    seqs = [[5] + long, [5] + short, [6] + short, [6] + long]
    assert plan_batches(seqs, 2, group=2) == [([1, 2], False), ([0, 3], False)]
    assert plan_batches(seqs[:3], 2, group=2) == plan_batches(seqs[:3], 2)  # not whole runs
    assert plan_batches(seqs, 1, group=2) == plan_batches(seqs, 1)  # a run exceeds a batch


def test_pair_rewards_are_those_of_each_sequence_alone(rm):
    """score_pairs gives chosen and rejected the rewards they get alone, in any batch size, with
    the weighted or indexed reward, and with the token-0 reward of a language model."""
    gen = random.Random(1)

    def ids(n):
        return [gen.randrange(256) for _ in range(n)]

    pairs = []
    for _ in range(9):
        prompt = ids(gen.randrange(0, 30))
        pairs.append((D.Encoded(prompt + ids(gen.randrange(1, 20)), 0),
                      D.Encoded(prompt + ids(gen.randrange(1, 20)), 0), 1))
    pairs.append((D.Encoded([5, 6, 7], 0), D.Encoded([5, 6, 7, 8], 0), 1))  # one inside the other
    alone = torch.stack([score_sequences(rm, [e.ids], pad_id=258)[0]
                         for c, r, _ in pairs for e in (c, r)])
    for batch_size in (2, 5, 32):
        for weights, index in ((None, 0), (None, 1), ((0.3, 0.7), 0)):
            chosen, rejected = score_pairs(rm, pairs, 258, batch_size, weights, index)
            want = reduce_outputs(alone, weights, index)
            torch.testing.assert_close(chosen, want[0::2], atol=1e-5, rtol=0)
            torch.testing.assert_close(rejected, want[1::2], atol=1e-5, rtol=0)
    lm, _ = load_model("debug", seed=1)
    token0 = token0_reward(lm)
    chosen, rejected = score_pairs(lm, pairs, 258, 4, reward_fn=token0)
    with torch.no_grad():
        want = torch.stack([lm(torch.tensor([e.ids]))[0, -1, 0] for c, r, _ in pairs
                            for e in (c, r)])
    torch.testing.assert_close(chosen, want[0::2], atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, want[1::2], atol=1e-5, rtol=0)
    assert score_pairs(rm, [], 258)[0].shape == (0,)


@torch.no_grad()
def test_rewards_do_not_depend_on_the_padding_side(rm):
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 11, 7, 16]
    seqs = [torch.randint(0, 256, (n,), generator=gen) for n in lengths]
    T = max(lengths)
    right = torch.full((4, T), 258)
    left = torch.full((4, T), 258)
    right_mask = torch.zeros(4, T, dtype=torch.bool)
    left_mask = torch.zeros(4, T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        right[i, :len(s)], right_mask[i, :len(s)] = s, True
        left[i, T - len(s):], left_mask[i, T - len(s):] = s, True
    alone = torch.cat([rm.reward(s[None]) for s in seqs])
    torch.testing.assert_close(rm.reward(right, right_mask), alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(rm.reward(left, left_mask), alone, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- 5. the count

def test_the_docstring_table_counts_the_cases():
    """The table above is what the README quotes: keep it equal to the lists in this file."""
    table = {name.strip(" `"): int(n) for name, n in
             re.findall(r"^\| (.+?)\s+\|\s+(\d+) \|", __doc__, re.M)}
    for cmd in ("train", "evaluate", "score", "expo", "generate", "convert", "plan",
                "released"):
        assert table[f"python -m minirm.{cmd}"] == len(CLI_CASES[cmd]), cmd
    assert table["python -m minirm.sft`, `python -m minirm.reinforce"] == (
        len(CLI_CASES["sft"]) + len(CLI_CASES["reinforce"]))
    assert table["the same in a real process (train)"] == len(REAL_PROCESS_CASES)
    assert table["crafted corrupt GGUF files and safetensors indexes"] == len(CRAFTED)
    assert table["all hand-written bad-input cases"] == (
        len(CASES) + len(REAL_PROCESS_CASES) + len(CRAFTED))
    fuzz = [n for n in globals() if n.startswith("test_fuzz_")]
    assert table["fuzz tests, 40 seeded examples each"] == len(fuzz)


# ------------------------------------------------------------------------- outputs never lost

def _one_line_status_2(main, argv, capsys, message):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_a_file_as_out_folder_is_refused_and_kept(f, tmp_path, capsys):
    """released/expo --out FILE: refused up front; the file is not moved aside, no folder is
    written in its place and no temporary folder is left (checkpoint.replace_dir too)."""
    from minirm import expo, released

    out = write(tmp_path / "afile.txt", "keep me\n")
    for main, argv in ((released.main, ["--model", f["rm"]]),
                       (expo.main, ["--weak", f["rm"], "--strong", f["rm"], "--alpha", "1"])):
        for force in ([], ["--force"]):
            _one_line_status_2(main, argv + ["--out", out] + force, capsys,
                               f"{out} exists and is not a folder; choose another --out")
            assert out.read_text() == "keep me\n"
            assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]
    rm, _ = load_model(f["rm"])
    with pytest.raises(UserError, match="exists and is not a folder"):
        save_model(rm, out)  # a library caller is refused before anything moves
    assert out.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


def test_a_file_as_out_folder_in_a_real_process(f, tmp_path):
    out = write(tmp_path / "afile.txt", "keep me\n")
    proc = subprocess.run([sys.executable, "-m", "minirm.released", "--model", f["rm"],
                           "--out", str(out)], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "afile.txt exists and is not a folder" in proc.stderr
    assert out.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


@pytest.mark.parametrize("command,flag", [("evaluate", "--json"), ("score", "--out")])
@pytest.mark.parametrize("how", ["same", "relative", "symlink"])
def test_results_never_overwrite_the_data_file(command, flag, how, f, tmp_path, capsys,
                                               monkeypatch):
    main = importlib.import_module(f"minirm.{command}").main
    data = Path(shutil.copy(f["ok"], tmp_path / "data.jsonl"))
    before = data.read_bytes()
    out = data
    if how == "relative":
        monkeypatch.chdir(tmp_path)
        out = Path("sub", "..", "data.jsonl")
        (tmp_path / "sub").mkdir()
    elif how == "symlink":
        out = tmp_path / "link.jsonl"
        out.symlink_to(data)
    _one_line_status_2(main, ["--model", f["rm"], "--data", data, flag, out], capsys,
                       f"{flag} {out} is the --data file: the results would overwrite it")
    assert data.read_bytes() == before


def test_released_and_expo_never_replace_their_inputs(f, tmp_path, capsys):
    """An --out that is (or holds) an input is refused, --force or not; the input is intact."""
    from minirm import expo, released

    run = tmp_path / "run"
    model = shutil.copytree(f["rm"], run / "model")
    before = snapshot(run)
    for out in (model, run, model / "."):
        for force in ([], ["--force"]):
            _one_line_status_2(released.main, ["--model", model, "--out", out, *force], capsys,
                               f"refusing to replace {out}: it ")
            _one_line_status_2(expo.main, ["--weak", f["rm"], "--strong", model, "--alpha",
                                           "1", "--out", out, *force], capsys,
                               "--strong (" + str(model) + "), which this command reads")
            assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in run.iterdir()) == ["model"]


def test_released_and_expo_replace_a_model_folder_only_with_force(f, tmp_path, capsys):
    from minirm import expo, released

    commands = {"released": (released.main, ["--model", f["rm"]]),
                "expo": (expo.main, ["--weak", f["rm"], "--strong", f["rm"], "--alpha", "1"])}
    for name, (main, argv) in commands.items():
        out = shutil.copytree(f["lm"], tmp_path / name)
        before = snapshot(out)
        _one_line_status_2(main, argv + ["--out", out], capsys,
                           f"{out} is not empty; choose another --out or pass --force to "
                           "replace it")
        assert snapshot(out) == before
        main([str(a) for a in argv + ["--out", out, "--force"]])
        assert snapshot(out) != before and (out / "config.json").exists()
        (tmp_path / f"{name}-empty").mkdir()  # an empty folder needs no --force
        main([str(a) for a in argv + ["--out", tmp_path / f"{name}-empty"]])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert "replace an existing --out folder" in released.ReleasedSettings.__dataclass_fields__[
        "force"].metadata["help"]
    assert "replace an existing --out folder" in expo.ExpoSettings.__dataclass_fields__[
        "force"].metadata["help"]
