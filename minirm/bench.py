"""Benchmarks: minirm beside Hugging Face `transformers`, and both beside the machine's limits.

    python -m minirm.bench [--cases train,score,reinforce,generate,attention] [--repeats 5]
        [--json PATH]
    python -m minirm.bench --device cuda [--cases gpu-train,gpu-decode] --json PATH

Every case runs minirm and its `transformers` equivalent in this one process, at the same shapes,
in float32, on the same torch threads. Each is called once to warm up, then the two are timed in
turns (minirm, transformers, minirm, ...) so that load from other jobs falls on both alike, and
the median of `--repeats` calls is reported with ratio = minirm / transformers. Without
`transformers` installed its column stays empty. Weights are random (seeded) and copied from the
minirm model into the `transformers` one through the checkpoint name map, so both compute the
same numbers (the scoring case checks that they do).

Cases, on the `smollm2-135m` shape (`--quick`: the `debug` preset and tiny sizes, for the tests):
- `train`: one reward-model step, forward + backward + gradient clipping + AdamW (fused, for
  both: minirm's Trainer and transformers' Trainer default), on 8 x 256 tokens (4 pairs,
  Bradley-Terry loss), against LlamaForSequenceClassification(sdpa). Tokens/s,
  and FLOP/s from `ModelConfig.flops_per_token` (6N + attention, as nanoGPT's MFU).
  minirm runs the rows as train.py does (`train.batch_rewards`), transformers padded to the
  longest row, as TRL's RewardTrainer collates them. Two more steps: `train, shared prompts`,
  4 pairs whose two rows share their first 85 tokens (a third of each row, as in the pairs of
  RewardBench-mini), which minirm computes once; `train, real lengths`, 4 pairs with the
  lengths of a training batch of RewardBench-mini (743 tokens, 75% of the padded positions),
  which minirm splits into batches of similar length. Tokens/s count real tokens.
- `score`: rewards of 32 sequences of 32..256 tokens in batches of 16 under inference mode.
  minirm sorts them by length (`scoring.score_sequences`); transformers gets right-padded batches
  in input order, as a pipeline does. Sequences/s.
- `reinforce`: the log-prob work of a REINFORCE rollout batch (`minirm.reinforce`): 4 prompts
  with the lengths of `train` real lengths' prompts, 4 sampled responses of 3..79 tokens each
  (random ids), the policy's and the reference's log-probs without gradients, then the policy
  loss forward and backward. minirm runs each prompt once for its samples
  (`sft.shared_prompt_logprobs`); transformers gets TRL's layout (prompts left-padded, each
  response right after them) and computes logits at the responses' positions only
  (`logits_to_keep`). Samples/s; the two agree on the log-probs.
- `generate`: 64 new tokens sampled at temperature 1 (no top-k / top-p, no stop id) after a
  32-token prompt (batch 1) or 8 left-padded prompts of 24..40 tokens, against
  `generate(do_sample=True)`. New tokens/s, prefill included. minirm decodes through
  `minirm.packed` on the CPU (the projections in whichever layout decodes faster on this
  machine: oneDNN-packed, BLAS, or the streamed kernel's, whose steps, sampling and
  bookkeeping after the prefill run in C++, `minirm.decode`), chosen and packed by the warm-up
  call and reused, as by any caller that generates more than once with the same weights. A
  second row for each batch times `generate(compile=True)` (`minirm.graphs`: the steps
  compiled where they are not one C++ call), in turns with the first and transformers; its
  warm-up call compiles.
- `attention`: the three backends, forward + backward, causal, B = 1 with smollm2's heads (9
  query, 3 key/value, head_dim 64) in the model's (B, T, H, D) layout, at 512, 2048 and 4096
  tokens, against transformers' `sdpa_attention_forward`. Time, and peak memory: the most bytes
  allocated and not yet freed at any moment of one call, summed over the profiler's allocation
  events (`profile_memory=True`); inputs are not counted, the output and gradients are.

On a GPU (`--device cuda`), in bfloat16, against the same `transformers` classes:
- `gpu-train`: the reward-model step as train.py takes it on a GPU (bf16 weights under bf16
  autocast, fused AdamW) with activation checkpointing, on one pair of 4096-token sequences of
  the `llama-3.2-1b` shape. Tokens/s; utilisation is model FLOPs (6N + attention; the
  recomputed forward is not counted) over the measured bf16 matmul rate. A second row times
  the step with the blocks compiled (`train.py --compile`).
- `gpu-decode`: batch-1 sampling of 64 tokens after 32 on the `llama-3.1-8b` shape; the
  fraction is the bytes of weights read per second over the measured bandwidth. minirm's steps
  replay a CUDA graph (`minirm.graphs`), captured in the warm-up call and kept for the timed
  ones, as for any run of `generate` calls; a second row times the graph of compiled steps
  (`generate(compile=True)`), a third the steps run eagerly.
On the CPU these two run only with `--quick` (debug shape, float32), which is how the tests
cover their code; the limits are then measured in bf16 on the GPU (8192^2 matmul, 32768^2
matrix-vector).

The machine's limits are measured first, in the same run: float32 matmul FLOP/s (n x n by n x n,
the faster of torch's BLAS and oneDNN, which minirm's training and scoring use: `minirm.onednn`)
and memory bandwidth (bytes of an n x n matrix read by one matrix-vector product of torch's
BLAS: the access pattern of batch-1 decoding; 256 MiB, or 1 GiB past a processor's cache of
480 MiB, `matvec_size`; on the CPU the faster of the matrix in plain
memory and in huge pages, where minirm's streamed layout keeps its weights:
`minirm.streamed.HugePages`), each from the fastest of 10 or more calls (a median let other
jobs on the machine pull the ceiling under what the cases reach).
`fraction_of_limit` is, for training, its FLOP/s over the matmul FLOP/s (model FLOP
utilisation), and for batch-1 decoding, the bytes of weights read per second (every weight once
per new token) over the bandwidth.

What it simplifies: wall-clock time on the CPU (no CUDA events); one process and its threads; a
median, not a confidence interval (the spread of repeats is not reported).
"""

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minirm.cliargs import opt
from minirm.errors import UserError, cli

CPU_CASES = ("train", "score", "reinforce", "generate", "attention")
GPU_CASES = ("gpu-train", "gpu-decode")
CASES = CPU_CASES + GPU_CASES


@dataclass
class BenchSettings:
    cases: str = opt(None, "comma-separated cases to run, of " + ", ".join(CASES)
                     + "; unset: all of the device's")
    repeats: int = opt(5, "timed calls per case and library; the median is reported")
    quick: bool = opt(False, "tiny shapes (the debug preset): seconds instead of minutes, for tests")
    json: str = opt(None, "also write the results to this JSON file")
    threads: int = opt(None, "torch threads for both libraries, unset: torch's default")
    device: str = opt("cpu", "cpu, or cuda for the GPU cases (" + ", ".join(GPU_CASES) + ")",
                      choices=("cpu", "cuda"))


@dataclass
class Shapes:
    preset: str
    train: tuple = (8, 256)               # batch, tokens
    # The second training case: the tokens of each row that are its pair's shared prompt, a
    # third, as in the pairs of ../shared/data/rewardbench-mini.jsonl (SmolLM2's tokenizer).
    train_prompt: int = 85
    # The third: the lengths of a training batch of 4 of those pairs (the second batch
    # `data.batches` draws with seed 0 at max length 512), as (shared prompt, chosen's rest,
    # rejected's rest). Padded to its longest row, 75% of the positions are real tokens, near
    # the median over all batches (79%).
    train_real: tuple = ((40, 22, 79), (57, 35, 62), (46, 3, 75), (46, 78, 11))
    score: tuple = (32, 32, 256, 16)      # sequences, shortest, longest, batch size
    # REINFORCE's log-prob passes: prompt lengths (those of train_real), samples per prompt,
    # and the range of response lengths (that of train_real's answers).
    reinforce: tuple = ((40, 57, 46, 46), 4, (3, 79))
    prompt: int = 32                      # generation prompt tokens (batch 1; batch 8 varies)
    new_tokens: int = 64
    gen_batches: tuple = (1, 8)
    heads: tuple = (9, 3, 64)             # attention: query heads, kv heads, head_dim
    attn_lens: tuple = (512, 2048, 4096)
    matmul_n: int = 2048                  # limits: n x n float32 matmul
    # limits: an n x n float32 matrix times a vector; 0: 8192 (256 MiB), or more where the
    # processor's last-level cache is over half of that (`matvec_size`)
    matvec_n: int = 0
    # The GPU cases (part 3 of the performance targets), in bfloat16 on CUDA:
    gpu_train_preset: str = "llama-3.2-1b"
    gpu_train: tuple = (2, 4096)          # one pair of 4096-token sequences per step
    gpu_decode_preset: str = "llama-3.1-8b"
    gpu_matmul_n: int = 8192              # limits on a GPU: bf16 n x n matmul
    gpu_matvec_n: int = 32768             # and a bf16 n x n matrix (2 GiB: past any cache) x vector


FULL = Shapes("smollm2-135m")
QUICK = Shapes("debug", train=(2, 16), train_prompt=5, train_real=((3, 2, 9), (5, 1, 1)),
               score=(4, 4, 16, 2), reinforce=((9, 7), 2, (1, 4)), prompt=4, new_tokens=8,
               gen_batches=(1, 2), heads=(4, 2, 8), attn_lens=(32, 64), matmul_n=128,
               matvec_n=256, gpu_train_preset="debug", gpu_train=(2, 16),
               gpu_decode_preset="debug", gpu_matmul_n=128, gpu_matvec_n=256)


@dataclass
class Row:
    name: str
    unit: str
    minirm: float
    transformers: float | None = None
    ratio: float | None = None            # minirm / transformers
    fraction_of_limit: float | None = None
    note: str = ""


def row(name, unit, ours, theirs=None, fraction=None, note=""):
    ratio = ours / theirs if theirs else None
    return Row(name, unit, ours, theirs, ratio, fraction, note)


# ------------------------------------------------------------------------------------ measuring

def timed(ours, theirs=None, repeats=5):
    """Median seconds of `ours()` and `theirs()`: one warm-up call each, then timed in turns."""
    medians, _ = timed_in_turns([f for f in (ours, theirs) if f is not None], repeats)
    return medians[0], (medians[1] if theirs is not None else None)


def timed_in_turns(fns, repeats=5):
    """Median seconds of each of `fns` (one warm-up call each, then timed in turns), and the
    seconds of each warm-up call."""
    firsts = []
    for f in fns:
        t0 = time.perf_counter()
        f()
        firsts.append(time.perf_counter() - t0)
    times = [[] for _ in fns]
    gc.collect()
    gc.disable()  # no collection pauses inside a timed call (a full one takes ~0.1-1 s here)
    try:
        for _ in range(repeats):
            for t, f in zip(times, fns):
                t0 = time.perf_counter()
                f()
                t.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return [statistics.median(t) for t in times], firsts


def peak_bytes(fn):
    """Most bytes held at once by what `fn()` allocates (CPU): a running sum of the profiler's
    allocation (+) and free (-) events, in time order."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # else each profile prints two USDT lines
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, n in events:
        held += n
        peak = max(peak, held)
    return peak


def fastest(fn, repeats):
    """Shortest time of `repeats` calls after a warm-up: a ceiling is what the machine can do
    when nothing else gets in the way, so the limits take the best call, not the median."""
    from minirm.onednn import fastest_of
    return fastest_of([fn], repeats)[0]


def synced(fn, device):
    """fn, returning only once the device has finished its work (CUDA runs asynchronously)."""
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return call


def last_level_cache() -> int:
    """Bytes of the processor's largest cache as Linux reports it (sysfs), 0 where unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip()  # "480M", "2048K"
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0))
        except (OSError, ValueError, IndexError):
            pass
    return max(sizes, default=0)


def matvec_size(sh: Shapes) -> int:
    """n for the bandwidth limit's n x n float32 matrix on the CPU: `Shapes.matvec_n` if set,
    else 8192 (256 MiB), or the multiple of 1024 past twice the last-level cache when that is
    larger. A matrix that a cache holds in part streams faster than memory allows: on a Xeon
    host reporting 480 MiB of L3, the fastest of 12 products read a 256 MiB matrix at
    35.6-36.9 GB/s and a 1 GiB one at 33.0-33.6, in turns; SmolLM2-135M's 538 MB of weights
    do not fit either."""
    if sh.matvec_n:
        return sh.matvec_n
    past = math.isqrt(2 * last_level_cache() // 4) // 1024 * 1024 + 1024
    return max(8192, past)


def measure_limits(sh: Shapes, repeats: int, device=torch.device("cpu")) -> dict:
    """Matmul FLOP/s and memory bandwidth (bytes/s) of this machine and thread count: float32
    on the CPU, bfloat16 on a GPU (the dtype each one's cases run in)."""
    gpu = device.type == "cuda"
    n, nv = (sh.gpu_matmul_n, sh.gpu_matvec_n) if gpu else (sh.matmul_n, matvec_size(sh))
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t = fastest(synced(lambda: a @ b, device), max(repeats, 10))
    if not gpu and torch.backends.mkldnn.is_available():  # the CPU's other float32 product
        from minirm.onednn import product
        t = min(t, fastest(lambda: product(a, b.t()), max(repeats, 10)))
    matmul = 2 * n ** 3 / t
    del a, b
    m = torch.randn(nv, nv, device=device, dtype=dtype)  # far larger than the caches
    x = torch.randn(nv, device=device, dtype=dtype)
    t = fastest(synced(lambda: torch.mv(m, x), device), max(repeats, 10))
    if not gpu:  # the same matrix in 2 MiB pages: 5-10% faster to stream on the Xeon
        from minirm.streamed import huge_page_tensor
        huge = huge_page_tensor(m.numel()).view_as(m).copy_(m)
        del m  # one copy at a time: 1 GiB each past a large cache
        t = min(t, fastest(lambda: torch.mv(huge, x), max(repeats, 10)))
        m = huge
    return {"matmul_flops": matmul, "bandwidth_bytes_per_s": m.numel() * m.element_size() / t}


def machine(device=torch.device("cpu")) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    tf = _transformers()
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": tf.__version__ if tf else None,
            "python": platform.python_version(), "load_average": list(os.getloadavg()),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


# ---------------------------------------------------------------------------- the twin models

def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    return transformers


def hf_twin(tf, model, cls_name):
    """The `transformers` model of the same config, with minirm's weights, SDPA attention, on
    the same device in the same dtype."""
    from minirm.checkpoint import name_map
    from minirm.config import to_hf

    hf_cfg = to_hf(model.cfg)
    hf_cfg.pop("torch_dtype")
    weight = model.tok_embeddings.weight
    with weight.device:  # built in place (an 8B model on a GPU), then given minirm's weights
        hf = getattr(tf, cls_name)._from_config(tf.LlamaConfig(**hf_cfg),
                                                attn_implementation="sdpa", dtype=weight.dtype)
    ours = model.state_dict()
    wanted = hf.state_dict()
    state = {hf_name: ours[name] for hf_name, name in name_map(model.cfg).items()
             if hf_name in wanted}
    missing, _ = hf.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"}, f"weights not copied to transformers: {missing}"
    return hf


def random_tokens(cfg, n, length, gen):
    """Ids from 3 up that are never the pad id (transformers looks for it to find the last
    token): draw from one id fewer and step over the pad id."""
    t = torch.randint(3, cfg.vocab_size - 1, (n, length), generator=gen)
    return t + (t >= cfg.pad_id).long()


# ---------------------------------------------------------------------------------------- cases

def case_train(sh, tf, limits, repeats):
    from minirm import onednn
    from minirm.config import preset
    from minirm.data import collate
    from minirm.losses import bradley_terry
    from minirm.model import Transformer
    from minirm.train import batch_rewards
    from minirm.trainer import adamw

    cfg = preset(sh.preset, n_outputs=1)
    B, T = sh.train
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return random_tokens(cfg, 1, n, gen)[0].tolist()

    # Each case: B sequences, the chosen of each pair first, then the rejected.
    plain = random_tokens(cfg, B, T, gen).tolist()
    shared = [ids(sh.train_prompt) for _ in range(B // 2)]
    shared = [p + ids(T - sh.train_prompt) for p in shared * 2]
    real = [ids(n) for n, _, _ in sh.train_real]
    real = ([p + ids(c) for p, (_, c, _) in zip(real, sh.train_real)]
            + [p + ids(r) for p, (_, _, r) in zip(real, sh.train_real)])
    cases = {"train": plain, "train, shared prompts": shared, "train, real lengths": real}

    def stepper(model, rewards, n_pairs):
        # minirm's Trainer optimizer for both: fused AdamW, which is also what transformers'
        # Trainer (and so TRL's RewardTrainer) uses by default with torch >= 2.8.
        opt = adamw(model, 0.1, 1e-5, (0.9, 0.98))

        def step():  # as Trainer.update: zero, forward, backward, clip, AdamW
            opt.zero_grad(set_to_none=True)
            r = rewards()
            bradley_terry(r[:n_pairs] - r[n_pairs:]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return step

    out, limit = [], limits["matmul_flops"]
    for name, seqs in cases.items():
        # minirm as train.py runs a micro-batch (`batch_rewards`: length groups, or the
        # pairs' shared prompts once); transformers on the batch padded to its longest row,
        # as TRL's RewardTrainer collates it.
        tokens, mask = collate(seqs, cfg.pad_id)
        n_pairs, n_tokens = len(seqs) // 2, int(mask.sum())
        model = Transformer(cfg).init_weights(seed=0).train()
        with torch.no_grad():  # the same rewards as the padded batch
            torch.testing.assert_close(
                batch_rewards(model, seqs, cfg.pad_id, "cpu", pairs=n_pairs),
                model.reward(tokens, mask), rtol=1e-4, atol=1e-4)
        ours = stepper(model, lambda: batch_rewards(model, seqs, cfg.pad_id, "cpu",
                                                    pairs=n_pairs)[:, 0], n_pairs)
        theirs = None
        if tf:
            hf = hf_twin(tf, model, "LlamaForSequenceClassification").train()
            theirs = stepper(hf, lambda: hf(input_ids=tokens, attention_mask=mask).logits[:, 0],
                             n_pairs)
        t_ours, t_theirs = timed(ours, theirs, repeats)
        # The work of the real tokens (padding and shared prompts counted as the whole rows'),
        # so that a faster layout shows as more tokens/s.
        flops = sum(cfg.flops_per_token(len(x)) * len(x) for x in seqs)
        tps = [None if t is None else n_tokens / t for t in (t_ours, t_theirs)]
        fps = [None if t is None else flops / t for t in (t_ours, t_theirs)]
        if name == "train":
            wq = model.layers[0].attention.wq.weight
            dnn = (onednn.applies(tokens.new_empty(1, cfg.dim, dtype=wq.dtype), wq)
                   and onednn.faster_here())
            note = (f"{B}x{T} tokens, {cfg.flops_per_token(T) / 1e9:.2f} GFLOP/token; "
                    f"minirm's products in {'oneDNN' if dnn else 'BLAS'}")
            if fps[1]:
                note += f"; transformers at {fps[1] / limit:.0%} of matmul"
            out += [row(name, "tokens/s", tps[0], tps[1], fps[0] / limit, note),
                    row("train FLOP/s", "FLOP/s", fps[0], fps[1], fps[0] / limit,
                        "6N + attention")]
        elif name == "train, shared prompts":
            out.append(row(name, "tokens/s", tps[0], tps[1], fps[0] / limit,
                           f"{n_pairs} pairs of {T}-token rows sharing their first "
                           f"{sh.train_prompt}, which minirm computes once"))
        else:
            out.append(row(name, "tokens/s", tps[0], tps[1], fps[0] / limit,
                           f"{n_pairs} pairs, {n_tokens} tokens in rows of "
                           f"{min(map(len, seqs))}..{tokens.shape[1]}; transformers pads "
                           f"them to {tokens.numel()} positions"))
        del model
    return out


def case_score(sh, tf, limits, repeats):
    from minirm.config import preset
    from minirm.data import collate
    from minirm.model import Transformer
    from minirm.scoring import score_sequences

    cfg = preset(sh.preset, n_outputs=1)
    n, lo, hi, bs = sh.score
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    seqs = [random_tokens(cfg, 1, L, gen)[0].tolist() for L in lengths]
    model = Transformer(cfg).init_weights(seed=0).eval()

    def ours():
        return score_sequences(model, seqs, cfg.pad_id, batch_size=bs)[:, 0]

    theirs, note = None, f"{n} sequences of {lo}..{hi} tokens, batches of {bs}"
    if tf:
        hf = hf_twin(tf, model, "LlamaForSequenceClassification").eval()

        @torch.inference_mode()
        def theirs():
            out = []
            for i in range(0, n, bs):  # input order, right padding
                tokens, mask = collate(seqs[i:i + bs], cfg.pad_id)
                out.append(hf(input_ids=tokens, attention_mask=mask).logits[:, 0])
            return torch.cat(out)
        same = torch.allclose(ours(), theirs(), rtol=1e-3, atol=1e-4)
        note += "; rewards agree" if same else "; REWARDS DIFFER from transformers"
    t_ours, t_theirs = timed(ours, theirs, repeats)
    return [row("score", "sequences/s", n / t_ours, t_theirs and n / t_theirs, None, note)]


def case_reinforce(sh, tf, limits, repeats):
    from minirm.config import preset
    from minirm.data import collate
    from minirm.generate import left_pad
    from minirm.model import Transformer
    from minirm.reinforce import policy_loss
    from minirm.sft import response_mask, shared_prompt_logprobs

    cfg = preset(sh.preset)
    prompt_lengths, k, (lo, hi) = sh.reinforce
    gen = torch.Generator().manual_seed(3)
    prompts = [random_tokens(cfg, 1, n, gen)[0].tolist() for n in prompt_lengths]
    prompts = [p for p in prompts for _ in range(k)]  # the k samples of a prompt, adjacent
    responses = [random_tokens(cfg, 1, n, gen)[0].tolist()
                 for n in torch.randint(lo, hi + 1, (len(prompts),), generator=gen).tolist()]
    n = len(prompts)
    seqs = [p + r for p, r in zip(prompts, responses)]
    tokens, mask = collate(seqs, cfg.pad_id)  # as a rollout holds them (`Reinforce.rollout`)
    targets = response_mask(list(map(len, prompts)), list(map(len, seqs)), tokens.shape[1])
    advantage = torch.randn(n, generator=gen)
    model = Transformer(cfg).init_weights(seed=0).train()

    def passes(model, logprobs, response):
        """A rollout batch's three passes: the policy's and the reference's log-probs (the
        same weights here), then the policy's loss, forward and backward."""
        with torch.no_grad():
            logprobs(), logprobs()
        policy_loss(logprobs(), response, advantage).backward()
        model.zero_grad(set_to_none=True)

    def ours_logprobs():
        return shared_prompt_logprobs(model, tokens, mask, targets)

    def ours():
        passes(model, ours_logprobs, targets)

    theirs = None
    note = (f"{len(prompt_lengths)} prompts of {min(prompt_lengths)}..{max(prompt_lengths)} "
            f"tokens x {k} samples of {lo}..{hi}: two log-prob passes and a forward + backward; "
            f"minirm computes each prompt once")
    if tf:
        hf = hf_twin(tf, model, "LlamaForCausalLM").train()
        # TRL's layout: the prompts left-padded, each row's response right after, and the
        # logits of the responses' positions only (`logits_to_keep`).
        q, q_mask = left_pad(prompts, cfg.pad_id)
        r, r_mask = collate(responses, cfg.pad_id)
        ids, ids_mask = torch.cat((q, r), 1), torch.cat((q_mask, r_mask), 1)
        positions = (ids_mask.long().cumsum(1) - 1).clamp(min=0)

        def theirs_logprobs():
            logits = hf(input_ids=ids, attention_mask=ids_mask, position_ids=positions,
                        logits_to_keep=r.shape[1] + 1).logits[:, -r.shape[1] - 1:-1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, r[..., None])[..., 0]
            return logp * r_mask

        def theirs():
            passes(hf, theirs_logprobs, r_mask)

        with torch.no_grad():
            same = torch.allclose(ours_logprobs()[targets], theirs_logprobs()[r_mask],
                                  rtol=1e-3, atol=1e-3)
        note += "; log-probs agree" if same else "; LOG-PROBS DIFFER from transformers"
    t_ours, t_theirs = timed(ours, theirs, repeats)
    return [row("reinforce log-probs", "samples/s", n / t_ours, t_theirs and n / t_theirs,
                None, note)]


def case_generate(sh, tf, limits, repeats):
    from minirm import decode
    from minirm.config import preset
    from minirm.generate import generate, left_pad
    from minirm.model import Transformer
    from minirm.packed import layout_in_use

    cfg = preset(sh.preset)
    model = Transformer(cfg).init_weights(seed=0).eval()
    hf = None
    if tf:
        hf = hf_twin(tf, model, "LlamaForCausalLM").eval()
        hf.generation_config.eos_token_id = None  # never stop early: always new_tokens tokens
    # Batch-1 decoding reads every weight once per token; a tied head reads the embedding.
    weight_bytes = 4 * (cfg.n_params(include_embedding=False)
                        + (cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0))
    rows, N, P = [], sh.new_tokens, sh.prompt
    for B in sh.gen_batches:
        gen = torch.Generator().manual_seed(2)
        lengths = [P] if B == 1 else torch.randint(P * 3 // 4, P * 5 // 4 + 1, (B,),
                                                   generator=gen).tolist()
        prompts = [random_tokens(cfg, 1, L, gen)[0].tolist() for L in lengths]

        def ours_with(compile):
            def ours():
                out = generate(model, prompts, N, temperature=1.0, pad_id=cfg.pad_id,
                               generator=gen, compile=compile)
                assert out.tokens.shape == (B, N)
            return ours

        fns = [ours_with(False), ours_with(True)]
        if hf is not None:
            tokens, mask = left_pad(prompts, cfg.pad_id)

            def theirs():
                out = hf.generate(input_ids=tokens, attention_mask=mask, do_sample=True,
                                  max_new_tokens=N, temperature=1.0, top_k=0, top_p=1.0,
                                  pad_token_id=cfg.pad_id)
                assert out.shape == (B, tokens.shape[1] + N)
            fns.append(theirs)
        before = decode.steps_run
        (t_ours, t_compiled, *t_theirs), firsts = timed_in_turns(fns, repeats)
        whole = decode.steps_run > before
        t_theirs = t_theirs[0] if t_theirs else None
        tps = [None if t is None else B * N / t for t in (t_ours, t_theirs)]
        fraction, note = None, f"{N} new tokens after {min(lengths)}..{max(lengths)}"
        if layout_in_use(model):
            note += f"; {layout_in_use(model)} layout"
        if whole:
            note += "; steps and sampling in C++ (minirm.decode)"
        if B == 1:
            fraction = weight_bytes * tps[0] / limits["bandwidth_bytes_per_s"]
            note += f"; {weight_bytes / 2**20:.0f} MiB of weights a token"
            if tps[1]:
                note += (f"; transformers at "
                         f"{weight_bytes * tps[1] / limits['bandwidth_bytes_per_s']:.0%}")
        rows.append(row(f"generate batch {B}", "new tokens/s", tps[0], tps[1], fraction, note))
        compiled = B * N / t_compiled
        rows.append(row(f"generate batch {B}, compiled steps", "new tokens/s", compiled,
                        tps[1], fraction and fraction * compiled / tps[0],
                        "generate(compile=True): the same C++ steps, nothing compiled" if whole
                        else f"generate(compile=True); the first call, compiling, took "
                        f"{firsts[1]:.0f} s"))
    return rows


def case_attention(sh, tf, limits, repeats):
    from minirm.attention import BACKENDS, attention
    from minirm.config import ModelConfig

    Hq, Hkv, D = sh.heads
    hf_sdpa = None
    if tf:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        gqa = torch.nn.Module()  # what sdpa_attention_forward reads from the attention module
        gqa.num_key_value_groups, gqa.is_causal = Hq // Hkv, True

        def hf_sdpa(q, k, v):
            return sdpa_attention_forward(gqa, q, k, v, None, scaling=D ** -0.5)[0].transpose(1, 2)
    rows = []
    for T in sh.attn_lens:
        g = torch.Generator().manual_seed(T)
        # The model's layout: (B, T, H, D) projections seen as (B, H, T, D).
        q, dout = (torch.randn(1, T, Hq, D, generator=g).transpose(1, 2) for _ in range(2))
        k, v = (torch.randn(1, T, Hkv, D, generator=g).transpose(1, 2) for _ in range(2))

        def fwd_bwd(f):
            def run():
                q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
                f(q_, k_, v_).backward(dout)
                return q_.grad, k_.grad, v_.grad
            return run

        theirs = fwd_bwd(hf_sdpa) if hf_sdpa else None
        mem_theirs = peak_bytes(theirs) if theirs else None
        for backend in BACKENDS:  # transformers timed again beside each, in turns
            ours = fwd_bwd(lambda q, k, v: attention(q, k, v, None, backend=backend,
                                                     block=ModelConfig.flash_block))
            mem_ours = peak_bytes(ours)
            t_ours, t_theirs = timed(ours, theirs, repeats)
            name = f"attention {backend} T={T}"
            rows.append(row(name, "ms fwd+bwd", 1e3 * t_ours, t_theirs and 1e3 * t_theirs,
                            note="transformers column: its sdpa_attention_forward"))
            rows.append(row(name + " memory", "MiB peak", mem_ours / 2**20,
                            mem_theirs and mem_theirs / 2**20))
    return rows


LLAMA3_PAD = 128004  # <|finetune_right_pad_id|> in Llama-3.1's tokenizer


def gpu_config(name, n_outputs=0):
    """Preset `name` with a pad id: the Llama-3 presets name none, and transformers needs one
    to find each row's last token in a batch (random_tokens then never draws it)."""
    from minirm.config import preset

    cfg = preset(name, n_outputs=n_outputs)
    return cfg if cfg.pad_id is not None else preset(name, n_outputs=n_outputs, pad_id=LLAMA3_PAD)


def _gpu_model(name, device, n_outputs=0):
    """A seeded random model of preset `name` on `device`: bfloat16 on a GPU (the reward head
    stays float32), float32 on the CPU (which runs these cases only at --quick sizes)."""
    from minirm.model import Transformer

    with device:
        model = Transformer(gpu_config(name, n_outputs)).init_weights(seed=0)
    return model.cast(torch.bfloat16) if device.type == "cuda" else model


def _peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def case_gpu_train(sh, tf, limits, repeats, device):
    """A reward-model step as train.py takes it on a GPU: bfloat16 weights under bf16 autocast,
    activation checkpointing, fused AdamW; utilisation is model FLOPs (6N + attention, the
    recomputed forward not counted) over the measured bf16 matmul rate."""
    from minirm.losses import bradley_terry
    from minirm.trainer import adamw

    B, T = sh.gpu_train
    model = _gpu_model(sh.gpu_train_preset, device, n_outputs=1).train()
    model.activation_checkpointing = True
    cfg = model.cfg
    tokens = random_tokens(cfg, B, T, torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def stepper(m, rewards):
        opt = adamw(m, 0.1, 1e-5, (0.9, 0.98))

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                r = rewards()
            bradley_terry(r[:B // 2] - r[B // 2:]).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
        return synced(step, device)

    ours = stepper(model, lambda: model.reward(tokens, mask)[:, 0])
    theirs = None
    if tf:
        hf = hf_twin(tf, model, "LlamaForSequenceClassification").train()
        (getattr(hf, "activation_checkpointing_enable", None)  # its name in newer transformers
         or hf.gradient_checkpointing_enable)()
        theirs = stepper(hf, lambda: hf(input_ids=tokens, attention_mask=mask).logits[:, 0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_ours, t_theirs = timed(ours, theirs, repeats)
    flops = cfg.flops_per_token(T) * B * T
    limit = limits["matmul_flops"]
    tps = [None if t is None else B * T / t for t in (t_ours, t_theirs)]
    note = (f"{sh.gpu_train_preset}, {B}x{T} tokens, activation checkpointing, "
            f"{flops / B / T / 1e9:.2f} GFLOP/token")
    if t_theirs:
        note += f"; transformers at {flops / t_theirs / limit:.0%} of matmul"
    if _peak_gib(device):
        note += f"; peak {_peak_gib(device):.1f} GiB (the larger library's)"
    rows = [row("gpu-train", "tokens/s", tps[0], tps[1], flops / t_ours / limit, note)]
    if device.type == "cuda":  # the same step with its blocks compiled (train.py --compile)
        model.compile_blocks()
        compiled = stepper(model, lambda: model.reward(tokens, mask)[:, 0])
        t0 = time.perf_counter()
        compiled()
        first = time.perf_counter() - t0
        t, _ = timed(compiled, None, repeats)
        rows.append(row("gpu-train, compiled blocks", "tokens/s", B * T / t, tps[1],
                        flops / t / limit, f"Transformer.compile_blocks(); the first step, "
                        f"compiling, took {first:.0f} s"))
    return rows


def case_gpu_decode(sh, tf, limits, repeats, device):
    """Batch-1 sampling after a 32-token prompt; the fraction is the bytes of weights read per
    second (every weight once per new token) over the measured bandwidth."""
    from minirm.generate import generate, left_pad

    model = _gpu_model(sh.gpu_decode_preset, device).eval()
    cfg, N = model.cfg, sh.new_tokens
    gen = torch.Generator().manual_seed(2)
    prompt = [random_tokens(cfg, 1, sh.prompt, gen)[0].tolist()]
    sampler = torch.Generator(device).manual_seed(3)

    def ours_with(cuda_graphs, compile=False):
        return synced(lambda: generate(model, prompt, N, temperature=1.0, pad_id=cfg.pad_id,
                                       generator=sampler, cuda_graphs=cuda_graphs,
                                       compile=compile), device)
    ours = ours_with(True)
    theirs = None
    if tf:
        hf = hf_twin(tf, model, "LlamaForCausalLM").eval()
        hf.generation_config.eos_token_id = None
        tokens, mask = left_pad(prompt, cfg.pad_id, device)
        theirs = synced(lambda: hf.generate(
            input_ids=tokens, attention_mask=mask, do_sample=True, max_new_tokens=N,
            temperature=1.0, top_k=0, top_p=1.0, pad_token_id=cfg.pad_id), device)
    t_ours, t_theirs = timed(ours, theirs, repeats)
    weight = model.tok_embeddings.weight
    weight_bytes = weight.element_size() * (
        cfg.n_params(include_embedding=False) + (weight.numel() if cfg.tie_embeddings else 0))
    bw = limits["bandwidth_bytes_per_s"]
    tps = [None if t is None else N / t for t in (t_ours, t_theirs)]
    note = (f"{sh.gpu_decode_preset}, {N} new tokens after {sh.prompt}; "
            f"{weight_bytes / 2**30:.2f} GiB of weights a token")
    if tps[1]:
        note += f"; transformers at {weight_bytes * tps[1] / bw:.0%}"
    rows = [row("gpu-decode batch 1", "new tokens/s", tps[0], tps[1],
                weight_bytes * tps[0] / bw, note)]
    if device.type == "cuda":  # the graph of compiled steps; what a graph is worth
        (t_compiled,), (first,) = timed_in_turns([ours_with(True, compile=True)], repeats)
        rows.append(row("gpu-decode batch 1, compiled steps", "new tokens/s", N / t_compiled,
                        tps[1], weight_bytes * N / t_compiled / bw,
                        f"generate(compile=True): the graph replays compiled steps; the first "
                        f"call, compiling, took {first:.0f} s"))
        t_eager, _ = timed(ours_with(False), None, repeats)
        rows.append(row("gpu-decode batch 1, eager steps", "new tokens/s", N / t_eager,
                        tps[1], weight_bytes * N / t_eager / bw,
                        "the same without CUDA graphs (generate(cuda_graphs=False))"))
    return rows


RUNNERS = {"train": case_train, "score": case_score, "reinforce": case_reinforce,
           "generate": case_generate, "attention": case_attention,
           "gpu-train": case_gpu_train, "gpu-decode": case_gpu_decode}


# --------------------------------------------------------------------------------------- output

def _num(x):
    if x is None:
        return "-"
    if abs(x) >= 1e6:
        return f"{x:.3g}"
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"


def format_table(result) -> str:
    m, lim = result["machine"], result["limits"]
    lines = [f"machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['threads']} torch "
             f"threads, torch {m['torch']}, transformers {m['transformers'] or 'not installed'}",
             f"load average (1, 5, 15 min) at start: "
             + ", ".join(f"{x:.2f}" for x in m["load_average"])
             + f"; at end: " + ", ".join(f"{x:.2f}" for x in m["load_average_end"]),
             *([f"gpu: {m['gpu']}"] if m.get("gpu") else []),
             f"limits: {'bfloat16' if m.get('gpu') else 'float32'} matmul "
             f"{lim['matmul_flops'] / 1e9:.1f} GFLOP/s, memory bandwidth "
             f"{lim['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s"
             + (f" (a {m['bandwidth_matrix_bytes'] / 2**20:.4g} MiB matrix)"
                if "bandwidth_matrix_bytes" in m else ""), ""]
    head = ("case", "unit", "minirm", "transformers", "ratio", "of limit", "note")
    body = [(c["name"], c["unit"], _num(c["minirm"]), _num(c["transformers"]),
             "-" if c["ratio"] is None else f"{c['ratio']:.2f}",
             "-" if c["fraction_of_limit"] is None else f"{c['fraction_of_limit']:.0%}",
             c["note"]) for c in result["cases"]]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: " | ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip()
    lines += [fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, body)]
    lines.append("ratio = minirm / transformers: above 1 is better for rates, below 1 for ms "
                 "and MiB")
    return "\n".join(lines)


def run(s: BenchSettings, progress=False) -> dict:
    own = GPU_CASES if s.device == "cuda" else CPU_CASES
    selected = [c.strip() for c in (s.cases or ",".join(own)).split(",") if c.strip()]
    unknown = [c for c in selected if c not in CASES]
    if unknown or not selected:
        raise UserError(f"--cases {s.cases!r}: unknown case {unknown[0] if unknown else ''!r}; "
                        f"choose from {', '.join(CASES)}")
    if s.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible to torch here; run the "
                            "GPU cases on a machine with one, or drop --device")
        if set(selected) - set(GPU_CASES):
            raise UserError(f"--device cuda runs only the GPU cases ({', '.join(GPU_CASES)}); "
                            f"the others measure the CPU")
    elif set(selected) & set(GPU_CASES) and not s.quick:
        raise UserError(f"{', '.join(sorted(set(selected) & set(GPU_CASES)))} at full size "
                        "needs --device cuda (on the CPU they run only with --quick)")
    if s.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {s.repeats}")
    if s.threads is not None and s.threads < 1:
        raise UserError(f"--threads must be at least 1, got {s.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads or threads)
    try:
        return _run(s, selected, progress)
    finally:
        torch.set_num_threads(threads)


def _run(s, selected, progress):
    sh = QUICK if s.quick else FULL
    tf = _transformers()
    t0 = time.perf_counter()
    device = torch.device(s.device)
    result = {"machine": machine(device), "settings": asdict(s)}
    limits = measure_limits(sh, s.repeats, device)
    result["limits"] = limits
    nv = sh.gpu_matvec_n if device.type == "cuda" else matvec_size(sh)
    result["machine"]["bandwidth_matrix_bytes"] = nv * nv * (2 if device.type == "cuda" else 4)
    cases = selected
    if progress:
        from tqdm import tqdm
        cases = tqdm(selected, desc="bench", unit="case", leave=False)
    rows = []
    for name in cases:
        if progress:
            cases.set_postfix(case=name)
        if name in GPU_CASES:
            rows += RUNNERS[name](sh, tf, limits, s.repeats, device)
        else:
            rows += RUNNERS[name](sh, tf, limits, s.repeats)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["cases"] = [asdict(r) for r in rows]
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["seconds"] = time.perf_counter() - t0
    return result


@cli
def main(argv=None):
    from minirm.cliargs import describe, parse

    s = parse(BenchSettings, argv, "python -m minirm.bench",
              "Speed of minirm against Hugging Face transformers and the machine's limits.")
    print("bench: " + json.dumps(json.loads(describe(s))))
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    print(f"torch threads: {s.threads or torch.get_num_threads()}; load average {load:.2f} on {cores} cores"
          + ("  (HIGH: other jobs are running, timings are noisy)" if load > 0.5 * cores else ""))
    if _transformers() is None:
        print("transformers is not installed: its column stays empty")
    result = run(s, progress=sys.stderr.isatty())
    print(format_table(result))
    print(f"bench took {result['seconds']:.0f} s")
    if s.json:
        tmp = f"{s.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, s.json)
        print(f"wrote {s.json}")
    return result


if __name__ == "__main__":
    main()
