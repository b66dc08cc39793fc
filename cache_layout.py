"""The cache convert.py writes and ncf.py reads, one directory per dataset: its files, its
version, and the digests that identify it. No torch here: convert.py and prepare_dataset.sh
check a cache without loading torch."""
import hashlib

TRAIN_FILE = 'train_ratings.pt'        # int64 [n_train, 2]: user, item
TEST_FILE = 'test_ratings.pt'          # int64 [n_users, 2]: row u holds user u's test positive
TEST_NEGATIVES_FILE = 'test_negatives.pt'  # int64 [n_users, valid_negative]
METADATA_FILE = 'metadata.json'        # written last: a cache without it is not trusted
USER_IDS_FILE = 'user_ids.csv'         # line k (after the header) holds the original id of user k
ITEM_IDS_FILE = 'item_ids.csv'
TENSOR_FILES = (TRAIN_FILE, TEST_FILE, TEST_NEGATIVES_FILE)
CACHE_FILES = TENSOR_FILES + (METADATA_FILE, USER_IDS_FILE, ITEM_IDS_FILE)
# 3: metadata.json records each tensor's shape and sha256, and the fingerprint covers the split.
CACHE_VERSION = 3


def tensor_sha256(tensor):
    """sha256 of a tensor's values (its bytes, row-major, on the CPU): what metadata.json
    records of each cached tensor, whatever file holds it."""
    return hashlib.sha256(tensor.cpu().contiguous().numpy().tobytes()).hexdigest()


def fingerprint(source_sha256, id_maps_sha256, split_sha256=None):
    """The data's identity, as checkpoints record it: the source file, the id maps and (cache
    version 3) the split, the training and test tensors' sha256. Not the test negatives: another
    seed or count of them evaluates the same data."""
    parts = [source_sha256, id_maps_sha256] + ([split_sha256] if split_sha256 else [])
    return hashlib.sha256(':'.join(parts).encode()).hexdigest()[:16]


def split_sha256(tensors):
    """One digest of the split from {file name: {'sha256': ...}}: the training and test tensors."""
    return hashlib.sha256(f'{tensors[TRAIN_FILE]["sha256"]}:{tensors[TEST_FILE]["sha256"]}'
                          .encode()).hexdigest()
