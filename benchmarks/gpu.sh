#!/usr/bin/env bash
# On a machine with a CUDA GPU: the tests that run only there, then the bench's GPU cases,
# written as benchmarks/gpu-<model>.txt and .json (under $OUT instead when it is set), then
# benchmarks/profile_decode.py's split of the decoding call (gpu-<model>-decode-profile.txt).
#     bash benchmarks/gpu.sh                      # every GPU case
#     CASES=gpu-decode bash benchmarks/gpu.sh     # one of them
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: no CUDA GPU is visible; run it on a machine with one" >&2
    exit 2
fi
out=${OUT:-benchmarks}
# "NVIDIA H200" -> gpu-h200, "NVIDIA H100 80GB HBM3" -> gpu-h100-80gb-hbm3
name=gpu-$(python -c "import torch; print('-'.join(torch.cuda.get_device_name().lower().split()[1:]))")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
tests=0  # a failing test still lets the bench run; the script then exits with the failure
python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_graphs.py \
    tests/test_bench.py::test_gpu_cases_on_cuda || tests=$?
python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_reliability.py -k cuda || tests=$?
python -m minirm.bench --device cuda ${CASES:+--cases "$CASES"} --json "$out/$name.json" \
    | tee "$out/$name.txt"
if [[ -z "${CASES:-}" || "$CASES" == *gpu-decode* ]]; then  # where the decoding call's time goes
    python benchmarks/profile_decode.py | tee "$out/$name-decode-profile.txt" || tests=$?
fi
exit $tests
