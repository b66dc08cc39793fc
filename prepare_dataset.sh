#!/usr/bin/env bash
# Prepare a dataset for ncf.py: fetch (or reuse) the raw ratings, then convert them to cached tensors.
#
#   ./prepare_dataset.sh [DATASET] [RAW_DIR] [CACHE_DIR] [SYNTHETIC_OPTIONS...]
#
#   DATASET    ml-20m (default), ml-1m, ml-100k, or synthetic (built in, no download)
#   RAW_DIR    where DATASET.zip is kept or downloaded to (default ./data; the Docker image uses /data)
#   CACHE_DIR  where the tensors go (default RAW_DIR/cache/DATASET)
#   SYNTHETIC_OPTIONS  for synthetic only, passed to synthetic.py, e.g. for ML-20m's shape:
#              --users 138493 --items 26744 --rows 20000000 --layout ml-20m
#
# Work already done is skipped: an existing zip, extracted ratings, or an up-to-date cache.
# Put DATASET.zip in RAW_DIR yourself to work offline. PYTHON picks the interpreter.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DATASET_NAME=${1:-ml-20m}
RAW_DATADIR=${2:-./data}
CACHED_DATADIR=${3:-${RAW_DATADIR}/cache/${DATASET_NAME}}
shift $(( $# < 3 ? $# : 3 ))
if [ -z "${PYTHON:-}" ]; then
    PYTHON=$(command -v python || command -v python3)
fi

fail() { echo "prepare_dataset.sh: error: $*" >&2; exit 1; }

case ${DATASET_NAME} in
    ml-20m) MEMBER=ml-20m/ratings.csv ;;
    ml-1m) MEMBER=ml-1m/ratings.dat ;;
    ml-100k) MEMBER=ml-100k/u.data ;;
    synthetic) MEMBER=synthetic/ratings.csv ;;
    *) fail "unsupported dataset ${DATASET_NAME} (ml-20m, ml-1m, ml-100k or synthetic)" ;;
esac
if [ "${DATASET_NAME}" != synthetic ] && [ $# -gt 0 ]; then
    fail "options after CACHE_DIR are for the synthetic dataset only: $*"
fi
RATINGS_PATH=${RAW_DATADIR}/${MEMBER}
mkdir -p "${RAW_DATADIR}"

if [ "${DATASET_NAME}" = synthetic ]; then
    # Regenerate when the options change; the stamp records those of the file on disk.
    STAMP=${RAW_DATADIR}/synthetic/options
    if [ ! -f "${RATINGS_PATH}" ] || [ "$(cat "${STAMP}" 2>/dev/null)" != "$*" ]; then
        echo "Generating synthetic ratings at ${RATINGS_PATH}"
        "${PYTHON}" "${SCRIPT_DIR}/synthetic.py" --output "${RATINGS_PATH}" "$@"
        echo "$*" > "${STAMP}"
    else
        echo "Using ${RATINGS_PATH}"
    fi
else
    ZIP_PATH=${RAW_DATADIR}/${DATASET_NAME}.zip
    if [ ! -f "${RATINGS_PATH}" ]; then
        if [ ! -f "${ZIP_PATH}" ]; then
            echo "${ZIP_PATH} not found, downloading..."
            "${SCRIPT_DIR}/download_dataset.sh" "${DATASET_NAME}" "${RAW_DATADIR}"
        fi
        echo "Extracting ${MEMBER} from ${ZIP_PATH}"
        # Extract to a temporary name, then rename: an interrupted run leaves no half file.
        "${PYTHON}" - "${ZIP_PATH}" "${MEMBER}" "${RATINGS_PATH}" <<'EOF' || exit 1
import os, shutil, sys, zipfile
archive, member, target = sys.argv[1:]
try:
    with zipfile.ZipFile(archive) as zipped, zipped.open(member) as source:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target + '.part', 'wb') as sink:
            shutil.copyfileobj(source, sink, 1 << 22)
    os.replace(target + '.part', target)
except (zipfile.BadZipFile, KeyError, OSError) as error:
    if os.path.exists(target + '.part'):
        os.remove(target + '.part')
    sys.exit(f'prepare_dataset.sh: error: cannot extract {member} from {archive}: {error}')
EOF
    else
        echo "Using ${RATINGS_PATH}"
    fi
fi

if [ -f "${CACHED_DATADIR}/metadata.json" ] && [ "${CACHED_DATADIR}/metadata.json" -nt "${RATINGS_PATH}" ]; then
    echo "Using cached preprocessed data in ${CACHED_DATADIR}"
else
    echo "Preprocessing ${RATINGS_PATH} into ${CACHED_DATADIR}"
    t0=$(date +%s)
    "${PYTHON}" "${SCRIPT_DIR}/convert.py" --path "${RATINGS_PATH}" --output "${CACHED_DATADIR}"
    echo "Finished preprocessing in $(( $(date +%s) - t0 )) seconds"
fi

echo "Dataset ${DATASET_NAME} prepared at: ${CACHED_DATADIR}"
echo "You can now run the training with: python ncf.py --data ${CACHED_DATADIR}"
echo "or, on several GPUs: torchrun --nproc_per_node=<number_of_GPUs> ncf.py --data ${CACHED_DATADIR}"
