#!/usr/bin/env bash
# The GPU check, prepared to run once on a machine with CUDA (e.g. a lent H100):
#   1. the test suite, whose CUDA tests run there (AMP, fused Adam);
#   2. benchmarks/throughput.py on ML-20m-shaped synthetic data, plain and fast path;
#   3. learning: per-epoch HR@10 of the fast path (defaults) beside the plain fp32 path.
# Results go to OUT (default ./gpu-check): tests.txt, throughput.json, hr_fast.txt, hr_plain.txt.
#   bash benchmarks/gpu_check.sh [EPOCHS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-./gpu-check}
EPOCHS=${1:-5}
mkdir -p "${OUT}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "${OUT}/gpu.txt"

python -m pytest -q tests 2>&1 | tail -5 | tee "${OUT}/tests.txt"

WORK=${WORK:-/tmp/ncf-bench}
python benchmarks/throughput.py --workdir "${WORK}" | tail -1 | tee "${OUT}/throughput.json"

DATA="${WORK}/synthetic-ml-20m/cache"
python ncf.py --data "${DATA}" -e "${EPOCHS}" | grep -E '^Epoch|best_' | tee "${OUT}/hr_fast.txt"
python ncf.py --data "${DATA}" -e "${EPOCHS}" --plain --precision fp32 | grep -E '^Epoch|best_' \
    | tee "${OUT}/hr_plain.txt"
