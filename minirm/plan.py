"""How much GPU memory one rank needs, before renting the GPUs.

    python -m minirm.plan --model llama-3.1-70b --tp 8 --dp 4 --seq 4096 --batch 1

The model is built on the meta device (shapes, no memory) and parallelized exactly as training
would (`minirm.parallel.parallelize`) for tensor-parallel rank 0, which holds the largest shard
when the vocabulary splits unevenly; no process group is needed. Per rank it counts:

- weights and gradients in --dtype (the reward head is float32 whatever the dtype);
- AdamW's two moments in float32, 8 bytes a parameter, plus float32 master weights (4 more)
  only with --master-weights. (torch.optim.AdamW keeps the moments in the parameters' dtype,
  so a pure-bf16 run needs 4 bytes less a parameter: these figures are the safe side.)
- activations that autograd saves for backward in one micro-batch of --batch x --seq tokens,
  itemised per layer below, without and with activation checkpointing (which keeps each
  block's input and recomputes one block at a time during backward).

Data parallelism is plain gradient averaging (minirm.distributed): every dp rank holds a whole
tp shard with its optimizer states, so dp changes the global batch, not memory per rank.
Not counted: the CUDA context and allocator fragmentation (budget 1-3 GB), temporary buffers
inside one operation, a KV cache (generation only).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from minirm.cliargs import opt, parse
from minirm.config import PRESETS, from_hf, preset
from minirm.distributed import Grid
from minirm.errors import UserError, cli
from minirm.model import Transformer
from minirm.parallel import check_divisible, parallelize

BYTES = {"bf16": 2, "fp32": 4}


@dataclass
class PlanSettings:
    model: str = opt("llama-3.1-8b", f"a preset ({', '.join(PRESETS)}) or a model folder")
    tp: int = opt(1, "tensor-parallel degree")
    dp: int = opt(1, "data-parallel degree")
    seq: int = opt(4096, "sequence length of a micro-batch")
    batch: int = opt(1, "micro-batch size per dp rank (sequences)")
    dtype: str = opt("bf16", "weights, gradients and activations", choices=list(BYTES))
    gpu_memory: str = opt("80GB", "memory of one GPU (GB = 1e9 bytes, GiB = 2^30)")
    n_outputs: int = opt(-1, "reward head outputs (0: a language model; -1: the model's own)")
    attention: str = opt("sdpa", "attention backend: flash/sdpa save O(T) per head, "
                                 "reference the T x T probabilities",
                         choices=["reference", "flash", "sdpa"])
    master_weights: bool = opt(False, "count float32 master weights (4 bytes a parameter)")
    json: str = opt("", "also write the figures to this JSON file")


def parse_bytes(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|G|TB|TiB|MB|MiB)?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"--gpu-memory {text!r}: expected a size like 80GB or 141GiB")
    unit = (m.group(2) or "GB").lower()
    scale = {"gb": 1e9, "g": 1e9, "gib": 2**30, "tb": 1e12, "tib": 2**40, "mb": 1e6,
             "mib": 2**20}[unit]
    return float(m.group(1)) * scale


def model_config(s: PlanSettings):
    cfg = preset(s.model) if s.model in PRESETS else None
    if cfg is None:
        if not Path(s.model).is_dir():
            raise UserError(f"--model {s.model}: neither a preset ({', '.join(PRESETS)}) nor a "
                            "model folder")
        cfg = from_hf(s.model)
    if s.n_outputs >= 0:
        cfg.n_outputs = s.n_outputs
    cfg.attention = s.attention
    return cfg


def count_params(cfg, tp: int):
    """(parameters of tp rank 0, of which in the float32 reward head, of the whole model)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    whole = sum(p.numel() for p in model.parameters())
    parallelize(model, Grid(tp_size=tp, tp_rank=0))  # no process group: shapes only
    head = sum(p.numel() for p in model.score.parameters()) if model.score is not None else 0
    return sum(p.numel() for p in model.parameters()), head, whole


def activation_bytes(cfg, tp, seq, batch, e, attention, checkpointing):
    """Bytes autograd saves for one micro-batch on one tp rank (see the module docstring).

    Per token and layer, with h = dim, d = head_dim and this rank's hq, hkv heads and f ffn:
      2 RMSNorms     (4 + e) h each: the float32 input and the normalised output
      2 matmul inputs  e h each: the normed x read by wq/wk/wv, and by w1/w3
      RoPE           2 (hq + hkv) d e: q, k and their rolled halves
      attention      flash/sdpa: q, k, v, out (hq + 2 hkv + hq) d e, log-sum-exp 4 hq;
                     reference: also softmax probabilities hq S (4 + e), the mask S bytes
      wo input       hq d e
      SwiGLU         4 f e: w1 x, silu(w1 x), w3 x, and the product read by w2
    then the final norm, and for a language model the logits and the float32 log-softmax
    (e + 8 bytes per token and vocabulary entry of this rank).
    """
    h, d = cfg.dim, cfg.head_dim
    hq, hkv, f = cfg.n_heads // tp, cfg.n_kv_heads // tp, cfg.ffn_dim // tp
    vocab = -(-cfg.vocab_size // tp)
    attn = (2 * hq + 2 * hkv) * d * e + 4 * hq
    if attention == "reference":
        attn += hq * d * e + hq * seq * (4 + (e if e < 4 else 0)) + seq
    layer = 2 * (4 + e) * h + 2 * e * h + 2 * (hq + hkv) * d * e + attn + hq * d * e + 4 * f * e
    head = (4 + e) * h + (0 if cfg.n_outputs and not cfg.tie_embeddings else (e + 8) * vocab)
    tokens = seq * batch
    if checkpointing:  # block inputs for every layer, plus one block recomputed at a time
        return tokens * (cfg.n_layers * e * h + layer + head)
    return tokens * (cfg.n_layers * layer + head)


def plan(s: PlanSettings) -> dict:
    for name in ("tp", "dp", "seq", "batch"):
        if getattr(s, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(s, name)}")
    cfg = model_config(s)
    check_divisible(cfg, s.tp)
    e = BYTES[s.dtype]
    n, n_head, whole = count_params(cfg, s.tp)
    weights = (n - n_head) * e + n_head * 4
    optimizer = n * (8 + (4 if s.master_weights else 0))
    act = {ck: activation_bytes(cfg, s.tp, s.seq, s.batch, e, s.attention, ck)
           for ck in (False, True)}
    limit = parse_bytes(s.gpu_memory)
    base = 2 * weights + optimizer  # gradients take what the weights take
    return {
        "model": s.model, "tp": s.tp, "dp": s.dp, "world": s.tp * s.dp, "seq": s.seq,
        "batch": s.batch, "dtype": s.dtype, "attention": s.attention,
        "params_total": whole,
        "params_per_rank": n,
        "bytes_per_rank": {"weights": weights, "gradients": weights, "optimizer": optimizer,
                           "activations": act[False], "total": base + act[False]},
        "activations_with_checkpointing": act[True],
        "total_with_checkpointing": base + act[True],
        "gpu_memory": limit, "fits": base + act[False] <= limit,
        "fits_with_checkpointing": base + act[True] <= limit,
        "master_weights": s.master_weights,
    }


def human(n: float, unit: str = "B") -> str:
    """1.76e10 -> '17.64 GB' (decimal units, as GPU memory is sold)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def report(r: dict) -> str:
    b = r["bytes_per_rank"]
    yes = {True: "yes", False: "no"}
    states = "2 x fp32 moments" + (" + fp32 master weights" if r["master_weights"]
                                   else ", no fp32 master weights")
    rows = [("weights", b["weights"], r["dtype"]), ("gradients", b["gradients"], r["dtype"]),
            ("optimizer", b["optimizer"], f"AdamW: {states}"),
            ("activations", b["activations"],
             f"{human(r['activations_with_checkpointing'])} with activation checkpointing"),
            ("total", b["total"],
             f"{human(r['total_with_checkpointing'])} with activation checkpointing")]
    return "\n".join([
        f"{r['model']}: tp={r['tp']} x dp={r['dp']} = {r['world']} GPUs, micro-batch "
        f"{r['batch']} x {r['seq']} tokens per rank (global batch {r['batch'] * r['dp']}), "
        f"attention {r['attention']}",
        f"{'parameters':12} {human(r['params_per_rank'], ''):>10}  per rank "
        f"(whole model {human(r['params_total'], '')})",
        *(f"{name:12} {human(v):>10}  {note}" for name, v, note in rows),
        f"fits {human(r['gpu_memory'])}: {yes[r['fits']]} "
        f"(with activation checkpointing: {yes[r['fits_with_checkpointing']]})",
    ])


@cli
def main(argv=None):
    s = parse(PlanSettings, argv, "python -m minirm.plan", __doc__.split("\n\n")[0])
    r = plan(s)
    print(report(r))
    if s.json:
        from minirm.score import write_atomic  # a bad path is one line, not a traceback
        write_atomic(s.json, json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
