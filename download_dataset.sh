#!/usr/bin/env bash
# Download a MovieLens archive from GroupLens and check its published MD5.
#
#   ./download_dataset.sh DATASET RAW_DIR      DATASET: ml-20m | ml-25m | ml-32m | ml-10m | ml-1m | ml-100k
#
# Writes RAW_DIR/DATASET.zip, or nothing: a failed, mismatched or interrupted download (Ctrl-C,
# SIGTERM) says so in one line and leaves no partial file; one left by a download killed outright
# is removed by the next. NCF_DOWNLOAD_URL overrides the base URL (a mirror, or a local copy:
# file:///path/to/dir).
set -euo pipefail

PROGRAM=download_dataset.sh
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
fail() { echo "${PROGRAM}: error: $*" >&2; exit 1; }
case ${1:-} in
    -h|--help) usage; exit 0 ;;
esac
[ $# -eq 2 ] || fail "expected DATASET and RAW_DIR (usage: ${PROGRAM} DATASET RAW_DIR)"
DATASET_NAME=$1
RAW_DATADIR=$2
BASE_URL=${NCF_DOWNLOAD_URL:-https://files.grouplens.org/datasets/movielens}

# MD5 sums GroupLens publishes beside each archive (DATASET.zip.md5). Each is also pinned by
# public code we checked them against (2026-11-30): ml-100k, ml-1m, ml-10m, ml-20m and ml-25m
# by eli-osherovich/papers_with_code (arxiv_1912.09140/movielens_config.py); ml-32m by projects
# that fetch files.grouplens.org/datasets/movielens/ml-32m.zip with pooch
# (known_hash="md5:d472be33...") or quote ml-32m.zip.md5 in their download scripts.
case ${DATASET_NAME} in
    ml-20m) MD5=cd245b17a1ae2cc31bb14903e1204af3 ;;
    ml-25m) MD5=6b51fb2759a8657d3bfcbfc42b592ada ;;
    ml-32m) MD5=d472be332d4daa821edc399621853b57 ;;
    ml-10m) MD5=ce571fd55effeba0271552578f2648bd ;;
    ml-1m) MD5=c4d9eecfca2ab87c1945afe126590906 ;;
    ml-100k) MD5=0e33842e24a9c977be4e0107933c0723 ;;
    *) fail "unsupported dataset ${DATASET_NAME} (ml-20m, ml-25m, ml-32m, ml-10m, ml-1m or ml-100k)" ;;
esac
command -v curl > /dev/null || fail "curl is not installed; put ${DATASET_NAME}.zip in ${RAW_DATADIR}/ by hand and run again"

URL="${BASE_URL}/${DATASET_NAME}.zip"
ZIP_PATH="${RAW_DATADIR}/${DATASET_NAME}.zip"

# RAW_DIR: a directory that exists writable or can be created (creating nothing yet).
existing=${RAW_DATADIR}
while [ ! -e "${existing}" ]; do existing=$(dirname "${existing}"); done
[ -d "${existing}" ] || fail "RAW_DIR ${RAW_DATADIR} is not a directory (${existing} is a file)"
[ -w "${existing}" ] && [ -x "${existing}" ] || fail "RAW_DIR ${RAW_DATADIR} is not writable (${existing} is read-only)"
[ ! -d "${ZIP_PATH}" ] || fail "${ZIP_PATH} is a directory"
mkdir -p "${RAW_DATADIR}"

# The partial download is .DATASET.zip.PID.XXXXXX.part: the ones of dead downloads go first.
for stale in "${RAW_DATADIR}/.${DATASET_NAME}.zip."*.part; do
    [ -e "${stale}" ] || continue
    pid=${stale#"${RAW_DATADIR}/.${DATASET_NAME}.zip."}
    pid=${pid%%.*}
    if [[ ${pid} =~ ^[0-9]+$ ]] && ! kill -0 "${pid}" 2>/dev/null && [ ! -d "/proc/${pid}" ]; then
        rm -f "${stale}"
    fi
done
PARTIAL=$(mktemp "${RAW_DATADIR}/.${DATASET_NAME}.zip.$$.XXXXXX.part")
trap 'rm -f "${PARTIAL}"' EXIT

# curl runs in the background while the script waits, so that Ctrl-C or SIGTERM reach the trap
# at once: it stops curl, and the EXIT trap removes the partial file.
CHILD=
interrupted() {
    trap '' INT TERM
    if [ -n "${CHILD}" ]; then
        kill -TERM "${CHILD}" 2>/dev/null || true
        wait "${CHILD}" 2>/dev/null || true
    fi
    echo "${PROGRAM}: interrupted: no ${ZIP_PATH} was written" >&2
    exit "$1"
}
trap 'interrupted 130' INT
trap 'interrupted 143' TERM

echo "Downloading ${URL}" >&2
curl --fail --location --silent --show-error --retry 2 --output "${PARTIAL}" "${URL}" 2>/dev/null &
CHILD=$!
status=0
wait "${CHILD}" || status=$?
CHILD=
if [ "${status}" -eq 23 ]; then  # curl's "write error"
    fail "cannot write the download of ${URL} to ${RAW_DATADIR}/ (is the disk full?); no ${ZIP_PATH} was written"
elif [ "${status}" -ne 0 ]; then
    fail "could not download ${URL}; put ${DATASET_NAME}.zip in ${RAW_DATADIR}/ by hand and run again"
fi
ACTUAL=$(md5sum "${PARTIAL}" | cut -d' ' -f1)
if [ "${ACTUAL}" != "${MD5}" ]; then
    fail "${URL} has MD5 ${ACTUAL}, GroupLens publishes ${MD5}; put a good ${DATASET_NAME}.zip in ${RAW_DATADIR}/ by hand and run again"
fi
mv "${PARTIAL}" "${ZIP_PATH}"
echo "Saved ${ZIP_PATH}" >&2
