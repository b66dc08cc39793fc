#!/usr/bin/env bash
# Prepare a dataset for ncf.py: fetch (or reuse) the raw ratings, then convert them to cached tensors.
#
#   ./prepare_dataset.sh [DATASET] [RAW_DIR] [CACHE_DIR] [--validation_holdout] [SYNTHETIC_OPTIONS]
#
#   DATASET    ml-20m (default), ml-25m, ml-32m, ml-10m, ml-1m, ml-100k, or synthetic (built in,
#              no download)
#   RAW_DIR    where DATASET.zip is kept or downloaded to (default ./data; the Docker image uses /data)
#   CACHE_DIR  where the tensors go (default RAW_DIR/cache/DATASET)
#   --validation_holdout  passed to convert.py: each user's latest training interaction is held
#              out as a validation positive, with validation negatives (any dataset)
#   SYNTHETIC_OPTIONS  for synthetic only, passed to synthetic.py, e.g. for ML-20m's shape:
#              --users 138493 --items 26744 --rows 20000000 --layout ml-20m
#
# Work already done is skipped, by content rather than by date: the ratings file is extracted
# again when DATASET.zip changes (its sha256 is recorded beside the extracted file), and the
# cache is reused only when it was converted from a ratings file with the same sha256 (digests
# are remembered in FILE.sha256, keyed by the file's size, times and inode). Put DATASET.zip in
# RAW_DIR yourself to work offline. PYTHON picks the interpreter. Ctrl-C or SIGTERM stops it
# with one line, leaving the previous cache as it was.
set -euo pipefail

case ${1:-} in
    -h|--help)
        sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
        exit 0 ;;
esac

fail() { echo "prepare_dataset.sh: error: $*" >&2; exit 1; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DATASET_NAME=${1:-ml-20m}
RAW_DATADIR=${2:-./data}
CACHED_DATADIR=${3:-${RAW_DATADIR}/cache/${DATASET_NAME}}
for positional in "${@:1:3}"; do
    case ${positional} in
        -*) fail "${positional} stands where DATASET, RAW_DIR or CACHE_DIR goes:" \
                 "options come after all three" ;;
    esac
done
shift $(( $# < 3 ? $# : 3 ))
# convert.py's option, for any dataset; every other option is synthetic.py's
CONVERT_OPTIONS=()
SYNTHETIC_OPTIONS=()
for option in "$@"; do
    case ${option} in
        --validation_holdout) CONVERT_OPTIONS=(--validation_holdout) ;;
        *) SYNTHETIC_OPTIONS+=("${option}") ;;
    esac
done
set -- ${SYNTHETIC_OPTIONS[@]+"${SYNTHETIC_OPTIONS[@]}"}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=$(command -v python || command -v python3) || fail "no python found: set PYTHON"
fi

# The ratings file inside each archive: ML-20m's CSV layout for ml-25m and ml-32m, ML-1m's '::'
# layout for ml-10m (convert.py tells them apart by their first line).
case ${DATASET_NAME} in
    ml-20m|ml-25m|ml-32m) MEMBER=${DATASET_NAME}/ratings.csv ;;
    ml-10m) MEMBER=ml-10M100K/ratings.dat ;;
    ml-1m) MEMBER=ml-1m/ratings.dat ;;
    ml-100k) MEMBER=ml-100k/u.data ;;
    synthetic) MEMBER=synthetic/ratings.csv ;;
    *) fail "unsupported dataset ${DATASET_NAME} (ml-20m, ml-25m, ml-32m, ml-10m, ml-1m, ml-100k or synthetic)" ;;
esac
if [ "${DATASET_NAME}" != synthetic ] && [ $# -gt 0 ]; then
    fail "options after CACHE_DIR (but --validation_holdout) are for the synthetic dataset only: $*"
fi
RATINGS_PATH=${RAW_DATADIR}/${MEMBER}
ZIP_PATH=${RAW_DATADIR}/${DATASET_NAME}.zip

# Every step runs in the background while the script waits for it, so that Ctrl-C or SIGTERM
# reach the trap at once: the step is told to stop (SIGTERM: it cleans up and says in one line
# what it kept), or, between steps or before the step could set up its handler, the script says
# so itself.
if [ -f "${CACHED_DATADIR}/metadata.json" ]; then
    KEPT="the previous cache in ${CACHED_DATADIR} is unchanged"
else
    KEPT="no cache was written to ${CACHED_DATADIR}"
fi
CHILD=
run() {
    "$@" &
    CHILD=$!
    local status=0
    wait "${CHILD}" || status=$?
    CHILD=
    return "${status}"
}
catches_term() {  # whether process $1 handles SIGTERM (then it says itself what it kept)
    local mask
    mask=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null) || return 1
    [ -n "${mask}" ] && (( (16#${mask: -4} >> 14) & 1 ))
}
interrupted() {
    trap '' INT TERM
    local said=
    if [ -n "${CHILD}" ]; then
        if catches_term "${CHILD}"; then said=yes; fi
        kill -TERM "${CHILD}" 2>/dev/null || true
        wait "${CHILD}" 2>/dev/null || true
    fi
    [ -n "${said}" ] || echo "prepare_dataset.sh: interrupted: ${KEPT}" >&2
    exit "$1"
}
trap 'interrupted 130' INT
trap 'interrupted 143' TERM

# The Python side (prepare.py): checks, extraction, digests and the cache decision, each ending
# in one line on failure.
helper() { run "${PYTHON}" "${SCRIPT_DIR}/prepare.py" --kept "${KEPT}" "$@"; }

helper check "${RAW_DATADIR}" "${CACHED_DATADIR}" "${RATINGS_PATH}"

if [ "${DATASET_NAME}" = synthetic ]; then
    # Regenerate when the options change; the stamp records those of the file on disk, and is
    # removed first, so that it never describes another file.
    STAMP=${RAW_DATADIR}/synthetic/options
    if [ ! -f "${RATINGS_PATH}" ] || [ "$(cat "${STAMP}" 2>/dev/null)" != "$*" ]; then
        echo "Generating synthetic ratings at ${RATINGS_PATH}"
        rm -f "${STAMP}"
        run "${PYTHON}" "${SCRIPT_DIR}/synthetic.py" --output "${RATINGS_PATH}" "$@"
        echo "$*" > "${STAMP}"
    else
        echo "Using ${RATINGS_PATH}"
    fi
else
    if [ ! -f "${ZIP_PATH}" ] && [ ! -f "${RATINGS_PATH}" ]; then
        echo "${ZIP_PATH} not found, downloading..."
        run "${SCRIPT_DIR}/download_dataset.sh" "${DATASET_NAME}" "${RAW_DATADIR}"
    fi
    if [ -f "${ZIP_PATH}" ]; then
        helper extract "${ZIP_PATH}" "${MEMBER}" "${RATINGS_PATH}"
    else
        echo "Using ${RATINGS_PATH} (no ${ZIP_PATH} to check it against)"
    fi
fi

status=0
helper decide "${RATINGS_PATH}" "${CACHED_DATADIR}" ${CONVERT_OPTIONS[@]+"${CONVERT_OPTIONS[@]}"} \
    || status=$?
if [ "${status}" -eq 3 ]; then  # prepare.py decide: convert
    t0=$(date +%s)
    run "${PYTHON}" "${SCRIPT_DIR}/convert.py" --path "${RATINGS_PATH}" \
        --output "${CACHED_DATADIR}" ${CONVERT_OPTIONS[@]+"${CONVERT_OPTIONS[@]}"}
    echo "Finished preprocessing in $(( $(date +%s) - t0 )) seconds"
elif [ "${status}" -ne 0 ]; then
    exit "${status}"
fi

echo "Dataset ${DATASET_NAME} prepared at: ${CACHED_DATADIR}"
helper command "${CACHED_DATADIR}"
