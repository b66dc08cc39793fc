#!/usr/bin/env bash
# The GPU check, in stages that each fit one command on a lent GPU machine (each under 4 minutes
# on an H100 or H200; every step has its own timeout, and a step that fails or times out does not
# stop the next):
#
#   bash benchmarks/gpu_check.sh tests     the CUDA tests (pytest -m cuda): every implementation
#                                          == eager in fp32 on CUDA, bf16 / fp16 / tf32 within
#                                          tolerance
#   bash benchmarks/gpu_check.sh kernels   the Triton kernel tests on the GPU (pytest -m gpu)
#   bash benchmarks/gpu_check.sh data      the ML-20m-shaped cache alone (CPU work: it can run
#                                          beside tests and kernels)
#   bash benchmarks/gpu_check.sh speed     throughput.py at ML-20m's shape, batch 2^20 (the
#                                          reference's configuration, each knob, compile, fused,
#                                          the default in fp16)
#   bash benchmarks/gpu_check.sh accuracy  HR@10 per epoch of the default beside --plain
#                                          --precision fp32
#   bash benchmarks/gpu_check.sh serve     --mode recommend for every user, --eval_mode full,
#                                          inference.py default beside --plain fp16, and with two
#                                          GPUs the 2-process launch
#   bash benchmarks/gpu_check.sh memory    gpu_memory.py --measure at ML-32m's and ML-20m's shapes:
#                                          the peak memory of each part beside the computed one
#   bash benchmarks/gpu_check.sh summary   OUT/summary.json: every figure, and the ones not taken
#
# The CUDA tests and the Triton kernel tests are two stages: with a cold cache the CUDA tests
# compile six runs under torch.compile (some 25 s each on an H200) and the kernel tests some 30
# Triton kernels (a few seconds each), together past one stage's 4 minutes. Each has its own
# step timeout within them (230 s and 200 s), each runs its tests in JOBS (default 4) processes,
# and the two can run at once beside the data stage (each uses the GPU lightly, and the
# compilers the CPU); a rerun on the same machine finds both compilers' caches in WORK. The
# speed and accuracy stages time the GPU: run them alone.
#
# Every stage but summary (which reads only what the others wrote) first checks that torch,
# triton, pyarrow and gcc (which torch.compile and Triton compile with) are there, the test
# stages also optuna and pytest-xdist (collecting the suite imports optuna; a machine without a
# registry takes them as carried wheels), and stops in one line naming those missing, before any
# work. OUT (default ./gpu-check) collects what each
# step printed; WORK (default /tmp/ncf-gpu) holds the ML-20m-shaped data, the checkpoints and
# torch.compile's and Triton's caches, shared by the stages and by the tests (a stage on a fresh
# machine makes what it needs again). EPOCHS (default 3) epochs for the HR comparison.
set -uo pipefail
STAGES='tests kernels data speed accuracy serve memory summary'
STAGE=${1:-}
if [ -z "${STAGE}" ]; then
    sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
fi
if [[ " ${STAGES} " != *" ${STAGE} "* ]]; then
    echo "gpu_check.sh: error: no stage ${STAGE}: one of ${STAGES// /, }" >&2
    exit 2
fi

# The tools a stage's work needs: one line naming those missing, exit status 1.
require_tools() {
    local missing
    missing=$(python -c 'import importlib.util
import sys
print(" ".join(name for name in sys.argv[1:] if importlib.util.find_spec(name) is None))' \
        "$@" 2>/dev/null) || missing=python
    command -v gcc > /dev/null || missing="${missing:+${missing} }gcc"
    if [ -n "${missing}" ]; then
        echo "gpu_check.sh: error: the ${STAGE} stage needs ${missing// /, }, not found" \
            "(python: $(command -v python || echo none)); nothing was run" >&2
        exit 1
    fi
}
case ${STAGE} in
summary) ;;
tests|kernels) require_tools torch triton pyarrow optuna xdist ;;
*) require_tools torch triton pyarrow ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-./gpu-check}
WORK=${WORK:-/tmp/ncf-gpu}
EPOCHS=${EPOCHS:-3}
JOBS=${JOBS:-4}
DATA="${WORK}/synthetic-ml-20m/cache"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${WORK}/inductor} \
    TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${WORK}/triton}
mkdir -p "${OUT}" "${WORK}"

# step NAME SECONDS COMMAND...: run COMMAND with a timeout, its output to OUT/NAME.txt
step() {
    local name=$1 seconds=$2 status=0
    shift 2
    echo "== ${name} ($(date +%T), at most ${seconds} s)" >&2
    timeout --kill-after=10 "${seconds}" "$@" > "${OUT}/${name}.txt" 2>&1 || status=$?
    [ "${status}" -eq 124 ] && echo "(timed out after ${seconds} s)" >> "${OUT}/${name}.txt"
    echo "${status}" > "${OUT}/${name}.status"
    tail -4 "${OUT}/${name}.txt" >&2
    return 0
}

# The ML-20m-shaped synthetic cache (138,493 users, 26,744 items, 20M rows), once per machine.
data() {
    [ -f "${DATA}/metadata.json" ] || step data 150 python - "${WORK}" <<'PY'
import sys
sys.argv = ['throughput.py', '--workdir', sys.argv[1], '--shape', 'ml-20m']
sys.path.insert(0, 'benchmarks')
import throughput
throughput.prepare_data(throughput.parse_args(sys.argv[1:]), 'ml-20m')
PY
}

# A trained default model for the serving steps (the accuracy stage's, or one epoch now).
model() {
    [ -f "${WORK}/default/model.pth" ] || step model 120 python ncf.py --data "${DATA}" -e 1 \
        --checkpoint_dir "${WORK}/default"
}

case ${STAGE} in
tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "${OUT}/gpu.txt" 2>&1
    cat "${OUT}/gpu.txt" >&2
    step tests 230 python -m pytest -q -n "${JOBS}" -m cuda tests
    ;;
kernels)
    step kernels 200 python -m pytest -q -n "${JOBS}" -m gpu tests
    ;;
data)
    data
    ;;
speed)
    data
    step throughput 200 python benchmarks/throughput.py --data "${DATA}"
    ;;
accuracy)
    data
    rm -rf "${WORK}/default" "${WORK}/plain"
    step hr_default 90 python ncf.py --data "${DATA}" -e "${EPOCHS}" \
        --checkpoint_dir "${WORK}/default"
    step hr_plain 120 python ncf.py --data "${DATA}" -e "${EPOCHS}" --plain --precision fp32 \
        --checkpoint_dir "${WORK}/plain"
    ;;
serve)
    data
    model
    step recommend 90 python ncf.py --data "${DATA}" --mode recommend \
        --checkpoint_dir "${WORK}/default" --output "${WORK}/recs.csv"
    step full_ranking 90 python ncf.py --data "${DATA}" --mode test --eval_mode full \
        --checkpoint_dir "${WORK}/default" --log_path "${WORK}/full.json"
    step inference_default 60 python inference.py --batch_sizes 65536,1048576 \
        --log_path "${WORK}/inference_default.json"
    step inference_plain 60 python inference.py --plain --precision fp16 \
        --batch_sizes 65536,1048576 --log_path "${WORK}/inference_plain.json"
    if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
        step two_gpus 150 python -m torch.distributed.run --standalone --nproc_per_node=2 \
            ncf.py --data "${DATA}" -e 2 --checkpoint_dir "${WORK}/two_gpus"
    fi
    ;;
memory)
    for shape in ml-32m ml-20m; do
        step "memory_${shape}" 150 python benchmarks/gpu_memory.py --shape "${shape}" --measure
    done
    ;;
summary)
    python - "${OUT}" <<'PY'
import json, os, re, sys
out = sys.argv[1]

def read(name):
    path = os.path.join(out, f'{name}.txt')
    return open(path).read() if os.path.exists(path) else ''

def found(pattern, text, kind=float):
    match = re.search(pattern, text, re.M)
    return kind(match.group(1)) if match else None

def hrs(text):
    return [float(x) for x in re.findall(r'^Epoch \d+: HR@10 = ([0-9.]+)', text, re.M)] or None

def inference(text):
    rows = re.findall(r'^\s*(\d+)\s+([0-9.e+]+)\s', text, re.M)
    return {int(size): float(rate) for size, rate in rows} or None

def throughput_figures(text):
    """throughput.py's last line, or, where it was stopped before printing it, the rows it
    printed one per line as each ended (the first is the baseline; default_plan marks the
    default's)."""
    printed = []
    for line in text.splitlines():
        if line.startswith('{'):
            try:
                printed.append(json.loads(line))
            except ValueError:  # a line cut short by the timeout
                pass
    whole = [figures for figures in printed if 'rows' in figures]
    if whole:
        return whole[-1]
    rows = [figures for figures in printed if 'row' in figures]
    if not rows:
        return None
    return {'rows': rows, 'baseline': rows[0]['row'], 'partial': True,
            'default': next((row['row'] for row in rows if row.get('default_plan')), None)}

throughput = throughput_figures(read('throughput'))
rows = {row['row']: row for row in throughput['rows']} if throughput else {}

def train(name):
    return rows[name]['train_epoch_samples_per_s'] if name in rows else None

default, plain = read('hr_default'), read('hr_plain')
figures = {
    'gpu': (read('gpu').strip().splitlines() or [None])[-1],
    'tests': (read('tests').strip().splitlines() or [None])[-1],
    'kernels': (read('kernels').strip().splitlines() or [None])[-1],
    'train_baseline_fp16_samples_per_s': train(throughput['baseline']) if throughput else None,
    'train_compile_samples_per_s': train('compile'),
    'train_fused_samples_per_s': train('fused'),
    'eval_default_samples_per_s': rows.get(throughput['default'], {}).get('eval_samples_per_s')
    if throughput else None,
    'peak_memory_gib': {name: row['peak_memory_gib'] for name, row in rows.items()} or None,
    'hr_default': hrs(default), 'hr_plain_fp32': hrs(plain),
    'compile_s_warm_cache': found(r'Compiled .* in ([0-9.]+) s', default),
    'recommend_all_users_s': found(r'in ([0-9.]+) s after loading', read('recommend')),
    'full_ranking_hr': found(r'^HR@10 = ([0-9.]+)', read('full_ranking')),
    'full_ranking_samples_per_s': found(r'eval_throughput = ([0-9.e+]+)', read('full_ranking')),
    'inference_default': inference(read('inference_default')),
    'inference_plain_fp16': inference(read('inference_plain')),
    'two_gpus_hr': hrs(read('two_gpus')),
}
for shape in ('ml-32m', 'ml-20m'):
    lines = [line for line in read(f'memory_{shape}').splitlines() if line.startswith('{')]
    figures[f'memory_{shape}_measured_gib'] = (json.loads(lines[-1]).get('measured_peak_gib')
                                               if lines else None)
if figures['train_compile_samples_per_s'] and figures['train_baseline_fp16_samples_per_s']:
    for impl in ('compile', 'fused'):
        if figures[f'train_{impl}_samples_per_s']:
            figures[f'{impl}_over_plain_fp16'] = round(
                figures[f'train_{impl}_samples_per_s']
                / figures['train_baseline_fp16_samples_per_s'], 2)
if figures['hr_default'] and figures['hr_plain_fp32']:
    figures['hr_max_difference'] = round(max(
        abs(a - b) for a, b in zip(figures['hr_default'], figures['hr_plain_fp32'])), 4)
figures['not_measured'] = sorted(name for name, value in figures.items() if value is None)
with open(os.path.join(out, 'summary.json'), 'w') as file:
    json.dump({**figures, 'throughput': throughput}, file, indent=1)
print(json.dumps(figures, indent=1))
PY
    ;;
esac
