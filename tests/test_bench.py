"""The benchmark runs on tiny shapes and writes its JSON. No timing is checked: machines are
noisy, so speed lives in `python -m minirm.bench`, never in pass/fail tests."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from minirm import bench

CASE_KEYS = {"name", "unit", "minirm", "transformers", "ratio", "fraction_of_limit"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    bench.main(["--quick", "--repeats", "1", "--threads", "1", "--json", str(path)])
    assert torch.get_num_threads() == threads  # --threads is undone afterwards
    return json.loads(path.read_text())


def test_json_structure(quick):
    assert {"machine", "limits", "cases"} <= set(quick)
    assert quick["machine"]["threads"] == 1 and quick["machine"]["cpu"]
    assert set(quick["limits"]) == {"matmul_flops", "bandwidth_bytes_per_s"}
    assert all(v > 0 for v in quick["limits"].values())
    names = [c["name"] for c in quick["cases"]]
    for prefix in ("train", "score", "reinforce log-probs", "generate batch 1",
                   "generate batch 1, compiled steps", "generate batch 2",
                   "attention reference", "attention flash", "attention sdpa"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert len(names) == len(set(names))


def test_numbers_are_positive(quick):
    has_hf = quick["machine"]["transformers"] is not None
    for case in quick["cases"]:
        assert CASE_KEYS <= set(case), case
        assert case["minirm"] > 0, case
        if has_hf:
            assert case["transformers"] > 0 and case["ratio"] > 0, case
            assert case["ratio"] == pytest.approx(case["minirm"] / case["transformers"])
        else:
            assert case["transformers"] is None and case["ratio"] is None, case
        if case["fraction_of_limit"] is not None:
            assert case["fraction_of_limit"] > 0, case
    fractions = {c["name"]: c["fraction_of_limit"] for c in quick["cases"]}
    assert fractions["train"] and fractions["generate batch 1"]
    if has_hf:  # the two libraries computed the same numbers
        notes = {c["name"]: c["note"] for c in quick["cases"]}
        assert "rewards agree" in notes["score"]
        assert "log-probs agree" in notes["reinforce log-probs"]


def test_without_transformers_the_column_is_empty(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "_transformers", lambda: None)
    result = bench.run(bench.BenchSettings(cases="score", quick=True, repeats=1, threads=1))
    (case,) = result["cases"]
    assert case["minirm"] > 0 and case["transformers"] is None and case["ratio"] is None


def test_table_names_every_case(quick):
    table = bench.format_table(quick)
    assert "load average" in table and "matmul" in table
    for case in quick["cases"]:
        assert case["name"] in table


def gpu_cases(device):
    return bench.run(bench.BenchSettings(cases="gpu-train,gpu-decode", quick=True, repeats=1,
                                         threads=1, device=device))


def test_the_bandwidth_matrix_is_past_twice_the_last_level_cache(monkeypatch):
    """256 MiB (n = 8192) unless the last-level cache is over 128 MiB, then the next multiple of
    1024 past twice the cache; an explicit size stays; the cache's size read from sysfs."""
    for cache, n in ((0, 8192), (32 << 20, 8192), (480 << 20, 16384), (1 << 30, 23552)):
        monkeypatch.setattr(bench, "last_level_cache", lambda c=cache: c)
        assert bench.matvec_size(bench.FULL) == n
        assert n * n * 4 >= 2 * cache
    assert bench.matvec_size(bench.QUICK) == 256
    monkeypatch.undo()
    if os.path.exists("/sys/devices/system/cpu/cpu0/cache/index0/size"):  # Linux
        assert bench.last_level_cache() > 0


def test_gpu_cases_run_at_quick_sizes_on_the_cpu():
    """The GPU cases' code, on the CPU in float32 at the debug shape (no GPU in CI)."""
    result = gpu_cases("cpu")
    assert result["machine"]["gpu"] is None
    names = [c["name"] for c in result["cases"]]
    assert names == ["gpu-train", "gpu-decode batch 1"]
    for case in result["cases"]:
        assert case["minirm"] > 0 and case["fraction_of_limit"] > 0, case
    assert "activation checkpointing" in result["cases"][0]["note"]


def test_gpu_shapes_have_a_pad_id_that_random_tokens_avoid():
    """The Llama-3 presets name no pad id; the GPU cases give them Llama-3.1's, which
    transformers needs for a batch, and never draw it as a token."""
    for name in (bench.FULL.gpu_train_preset, bench.FULL.gpu_decode_preset):
        cfg = bench.gpu_config(name, n_outputs=1)
        assert cfg.pad_id == bench.LLAMA3_PAD < cfg.vocab_size
        ids = bench.random_tokens(cfg, 4, 4096, torch.Generator().manual_seed(0))
        assert not (ids == cfg.pad_id).any() and int(ids.max()) < cfg.vocab_size
    assert bench.gpu_config("debug").pad_id == 258  # a preset's own stays


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cases_on_cuda():
    result = gpu_cases("cuda")
    assert result["machine"]["gpu"]
    assert all(c["minirm"] > 0 and c["fraction_of_limit"] > 0 for c in result["cases"])


def test_decode_profile_splits_a_call_by_kind_of_kernel(capsys):
    """benchmarks/profile_decode.py (run on a GPU by benchmarks/gpu.sh), here on the CPU at the
    debug shape, eager: torch's operators stand in for the kernels."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_decode.py"
    spec = importlib.util.spec_from_file_location("profile_decode", path)
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    profile.main(["--preset", "debug", "--device", "cpu", "--new-tokens", "4", "--prompt", "4",
                  "--eager"])
    out = capsys.readouterr().out
    assert re.search(r"debug, 4 tokens after 4: [\d.]+ ms a call .* tokens/s", out), out
    busy = float(re.search(r"device busy +([\d.]+) ms", out).group(1))
    kinds = dict((k.strip(), float(ms)) for k, ms in
                 re.findall(r"^  (\w[\w ()]*?) +([\d.]+) ms +[\d.]+ ms a token$", out, re.M))
    assert kinds["products"] > 0 and kinds["attention"] > 0, out
    assert sum(kinds.values()) == pytest.approx(busy, abs=0.1 * len(kinds)), out
    assert profile.kind("std::enable_if<...>gemvx_kernel<...>") == "products"
    assert profile.kind("triton_per_fused_add_mul_rsqrt_0") == "compiled (triton)"
    assert profile.kind("flash_fwd_splitkv_kernel") == "attention"
    for argv, message in ((["--new-tokens", "0"], "must be at least 1"),
                          (["--device", "tpu"], "--device tpu: not a device minirm runs on")):
        with pytest.raises(SystemExit) as e:
            profile.main(["--preset", "debug", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("argv,match", [
    (["--cases", "train,warp"], "unknown case 'warp'"),
    (["--cases", "gpu-train"], "gpu-train at full size needs --device cuda"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--quick", "--threads", "0"], "--threads must be at least 1"),
    (["--quick", "--device", "cuda"], "no CUDA device is visible"),
])
def test_bad_flags_are_one_line_and_status_2(capsys, argv, match):
    if torch.cuda.is_available() and "--device" in argv:
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
