#!/usr/bin/env bash
# The GPU check, prepared to run once on a machine with CUDA (an H100 or H200), in under 6 minutes:
#   1. the CUDA tests: every implementation == eager in fp32 on CUDA, bf16/fp16 within tolerance,
#      the Triton kernels against torch on the GPU;
#   2. benchmarks/throughput.py on ML-20m-shaped synthetic data, batch 2^20: the reference's
#      configuration (eager fp16 AMP), each knob, compile (the default) and fused, in one run;
#   3. learning: per-epoch HR@10 of the default beside --plain --precision fp32 (3 epochs), and
#      the default's compile time with a warm cache;
#   4. --mode recommend for every user, and inference.py, default beside --plain fp16;
#   5. one JSON summary of it all: summary.json.
# Everything goes to OUT (default ./gpu-check). Each step runs even if one before it failed.
#   bash benchmarks/gpu_check.sh [EPOCHS]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-./gpu-check}
EPOCHS=${1:-3}
WORK=${WORK:-/tmp/ncf-bench}
DATA="${WORK}/synthetic-ml-20m/cache"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${WORK}/inductor}
mkdir -p "${OUT}" "${WORK}"
step() { echo "== $* ($(date +%T))" >&2; }

step gpu
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "${OUT}/gpu.txt"

step CUDA tests
python -m pytest -q tests -k "cuda or fused or gpu" 2>&1 | tail -15 > "${OUT}/tests.txt"
cat "${OUT}/tests.txt"

step throughput
python benchmarks/throughput.py --workdir "${WORK}" > "${OUT}/throughput.json" \
    2> "${OUT}/throughput.txt"
tail -8 "${OUT}/throughput.txt"

step "HR@10 per epoch: default, then --plain --precision fp32"
python ncf.py --data "${DATA}" -e "${EPOCHS}" --checkpoint_dir "${WORK}/default" \
    > "${OUT}/hr_default.txt" 2>&1
python ncf.py --data "${DATA}" -e "${EPOCHS}" --plain --precision fp32 \
    --checkpoint_dir "${WORK}/plain" > "${OUT}/hr_plain.txt" 2>&1
grep -hE '^(Precision|Compiled|Epoch|best_)' "${OUT}/hr_default.txt" "${OUT}/hr_plain.txt"

step recommend for all users
python ncf.py --data "${DATA}" --mode recommend --checkpoint_dir "${WORK}/default" \
    --output "${WORK}/recs.csv" > "${OUT}/recommend.txt" 2>&1
tail -1 "${OUT}/recommend.txt"

step inference.py
python inference.py --batch_sizes 65536,1048576 --log_path "${WORK}/inference.json" \
    > "${OUT}/inference_default.txt" 2>&1
python inference.py --plain --precision fp16 --batch_sizes 65536,1048576 \
    --log_path "${WORK}/inference_plain.json" > "${OUT}/inference_plain.txt" 2>&1
tail -3 "${OUT}/inference_default.txt" "${OUT}/inference_plain.txt"

step summary
python - "${OUT}" <<'PY'
import json, os, re, sys
out = sys.argv[1]

def read(name):
    path = os.path.join(out, name)
    return open(path).read() if os.path.exists(path) else ''

def hrs(text):
    return [float(x) for x in re.findall(r'^Epoch \d+: HR@10 = ([0-9.]+)', text, re.M)]

def inference(text):
    rows = re.findall(r'^\s*(\d+)\s+([0-9.e+]+)\s', text, re.M)
    return {int(size): float(rate) for size, rate in rows}

throughput = read('throughput.json').strip().splitlines()
default, plain = read('hr_default.txt'), read('hr_plain.txt')
compiled = re.search(r'Compiled .* in ([0-9.]+) s', default)
recommend = re.search(r'in ([0-9.]+) s after loading', read('recommend.txt'))
summary = {
    'gpu': read('gpu.txt').strip().splitlines()[-1:],
    'tests': read('tests.txt').strip().splitlines()[-1:],
    'throughput': json.loads(throughput[-1]) if throughput else None,
    'hr_default': hrs(default), 'hr_plain_fp32': hrs(plain),
    'warm_compile_s': float(compiled.group(1)) if compiled else None,
    'recommend_all_users_s': float(recommend.group(1)) if recommend else None,
    'inference_default': inference(read('inference_default.txt')),
    'inference_plain_fp16': inference(read('inference_plain.txt')),
}
with open(os.path.join(out, 'summary.json'), 'w') as file:
    json.dump(summary, file, indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != 'throughput'}, indent=1))
PY
