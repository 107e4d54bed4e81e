"""Where the time of one batch-1 `generate` call goes: the bench's `gpu-decode` call (64 tokens
after a 32-token prompt, sampling), timed, then run once more under torch's profiler.

    python benchmarks/profile_decode.py                        # llama-3.1-8b on the GPU
    python benchmarks/profile_decode.py --eager                # without compile=True
    python benchmarks/profile_decode.py --preset debug --device cpu --new-tokens 8   # a check

It prints the call's wall time and its fraction of the bandwidth limit (bytes of weights a
token over `bench.measure_limits`' bandwidth), then the device's busy time split by kind of
kernel (products, attention, compiled fused kernels, the rest) with the largest kernels by
total time, and the time the device sat idle within the call. On a GPU, with the steps
replayed from a CUDA graph, the idle time is what launches and Python still cost. On the CPU
the "kernels" are torch's operators, which the steps in C++ (`minirm.decode`) do not show.
"""

import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minirm import bench  # noqa: E402
from minirm.errors import ArgumentParser, UserError, cli  # noqa: E402
from minirm.generate import generate, release  # noqa: E402
from minirm.score import resolve_device  # noqa: E402

# Kinds of kernel, by name: the first pattern a name matches.
KINDS = [
    ("products", r"gemv|gemm|cublas|cutlass|nvjet|sm\d+_xmma|aten::(mm|addmm|matmul|linear)"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("compiled (triton)", r"triton"),
    ("copies", r"copy|memcpy|memset|index_copy|cat"),
]


def kind(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name, re.I)), "other")


@cli
def main(argv=None):
    ap = ArgumentParser(prog="python benchmarks/profile_decode.py",
                        description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--eager", action="store_true", help="generate without compile=True")
    ap.add_argument("--top", type=int, default=12, help="kernels listed (default 12)")
    a = ap.parse_args(argv)
    if a.new_tokens < 1 or a.prompt < 1 or a.top < 1:
        raise UserError("--new-tokens, --prompt and --top must be at least 1")
    device = torch.device(resolve_device(a.device))
    model = bench._gpu_model(a.preset, device).eval()
    cfg, N = model.cfg, a.new_tokens
    gen = torch.Generator().manual_seed(2)
    prompt = [bench.random_tokens(cfg, 1, a.prompt, gen)[0].tolist()]
    sampler = torch.Generator(device).manual_seed(3)
    call = bench.synced(lambda: generate(model, prompt, N, temperature=1.0, pad_id=cfg.pad_id,
                                         generator=sampler, compile=not a.eager), device)
    print("the first call: compiling (unless --eager) and capturing the graph ...", flush=True)
    start = time.perf_counter()
    call()
    print(f"first call (compiling, capturing): {time.perf_counter() - start:.1f} s")
    walls = []
    for _ in range(5):
        start = time.perf_counter()
        call()
        walls.append(time.perf_counter() - start)
    wall = sorted(walls)[2]
    weight = model.tok_embeddings.weight
    weight_bytes = weight.element_size() * (
        cfg.n_params(include_embedding=False) + (weight.numel() if cfg.tie_embeddings else 0))
    # The bench's bandwidth limit: a 2 GiB bf16 matrix on a GPU; the CPU check takes the small
    # one of --quick, which caches hold (its fraction means nothing).
    shapes = bench.FULL if device.type == "cuda" else bench.QUICK
    limit = bench.measure_limits(shapes, 3, device)["bandwidth_bytes_per_s"]
    print(f"{a.preset}, {N} tokens after {a.prompt}: {wall * 1e3:.1f} ms a call (median of 5), "
          f"{N / wall:.1f} tokens/s, {weight_bytes * N / wall / limit:.0%} of "
          f"{limit / 1e9:.0f} GB/s")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        call()
    on_device = "cuda" if device.type == "cuda" else "cpu"
    totals, counts = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type.name.lower() != on_device:
            continue
        if on_device == "cpu" and e.cpu_parent is not None:
            continue  # an operator inside another is counted in its parent
        totals[e.name] += e.time_range.elapsed_us()
        counts[e.name] += 1
    busy = sum(totals.values()) / 1e3
    by_kind = defaultdict(float)
    for name, us in totals.items():
        by_kind[kind(name)] += us / 1e3
    print(f"\n{'device busy':20} {busy:9.1f} ms of {wall * 1e3:.1f} "
          f"({max(wall * 1e3 - busy, 0):.1f} ms idle), {sum(counts.values())} kernels")
    for k, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {k:18} {ms:9.1f} ms  {ms / N:7.3f} ms a token")
    print(f"\n{'kernel':70} {'calls':>6} {'ms':>8}")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"{name[:70]:70} {counts[name]:6} {us / 1e3:8.2f}")
    release(model)


if __name__ == "__main__":
    main()
