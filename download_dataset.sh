#!/usr/bin/env bash
# Download a MovieLens archive from GroupLens and check its published MD5.
#
#   ./download_dataset.sh DATASET RAW_DIR      DATASET: ml-20m | ml-1m | ml-100k
#
# Writes RAW_DIR/DATASET.zip, or nothing: a failed or mismatched download leaves no partial file.
# NCF_DOWNLOAD_URL overrides the base URL (a mirror, or a local copy: file:///path/to/dir).
set -euo pipefail

DATASET_NAME=${1:?usage: download_dataset.sh DATASET RAW_DIR}
RAW_DATADIR=${2:?usage: download_dataset.sh DATASET RAW_DIR}
BASE_URL=${NCF_DOWNLOAD_URL:-https://files.grouplens.org/datasets/movielens}

# MD5 sums GroupLens publishes beside each archive (DATASET.zip.md5).
case ${DATASET_NAME} in
    ml-20m) MD5=cd245b17a1ae2cc31bb14903e1204af3 ;;
    ml-1m) MD5=c4d9eecfca2ab87c1945afe126590906 ;;
    ml-100k) MD5=0e33842e24a9c977be4e0107933c0723 ;;
    *) echo "download_dataset.sh: error: unsupported dataset ${DATASET_NAME} (ml-20m, ml-1m or ml-100k)" >&2
       exit 1 ;;
esac

URL="${BASE_URL}/${DATASET_NAME}.zip"
ZIP_PATH="${RAW_DATADIR}/${DATASET_NAME}.zip"
mkdir -p "${RAW_DATADIR}"
PARTIAL=$(mktemp "${ZIP_PATH}.XXXXXX.part")
trap 'rm -f "${PARTIAL}"' EXIT

echo "Downloading ${URL}" >&2
if ! curl --fail --location --silent --show-error --retry 2 --output "${PARTIAL}" "${URL}" 2>/dev/null; then
    echo "download_dataset.sh: error: could not download ${URL}; put ${DATASET_NAME}.zip in ${RAW_DATADIR}/ by hand and run again" >&2
    exit 1
fi
ACTUAL=$(md5sum "${PARTIAL}" | cut -d' ' -f1)
if [ "${ACTUAL}" != "${MD5}" ]; then
    echo "download_dataset.sh: error: ${URL} has MD5 ${ACTUAL}, GroupLens publishes ${MD5}; put a good ${DATASET_NAME}.zip in ${RAW_DATADIR}/ by hand and run again" >&2
    exit 1
fi
mv "${PARTIAL}" "${ZIP_PATH}"
echo "Saved ${ZIP_PATH}" >&2
