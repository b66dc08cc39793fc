"""The cache convert.py writes and ncf.py reads, one directory per dataset: its files, its
version, the digests that identify it, its metadata and id maps. No torch here: convert.py and
prepare.py handle a cache without loading torch (dataloading.py loads its tensors)."""
import csv
import hashlib
import io
import json
import os

from ncflib.cli import UsageError

TRAIN_FILE = 'train_ratings.pt'        # int64 [n_train, 2]: user, item
TEST_FILE = 'test_ratings.pt'          # int64 [n_users, 2]: row u holds user u's test positive
TEST_NEGATIVES_FILE = 'test_negatives.pt'  # int64 [n_users, valid_negative]
METADATA_FILE = 'metadata.json'        # written last: a cache without it is not trusted
USER_IDS_FILE = 'user_ids.csv'         # line k (after the header) holds the original id of user k
ITEM_IDS_FILE = 'item_ids.csv'
# With a validation holdout (convert.py --validation_holdout), as the test set's: row u holds
# user u's validation positive (-1 where the user has too few interactions for one) and their
# validation negatives (-1 throughout for such a user).
VALID_FILE = 'valid_ratings.pt'        # int64 [n_users, 2]
VALID_NEGATIVES_FILE = 'valid_negatives.pt'  # int64 [n_users, valid_negative]
TENSOR_FILES = (TRAIN_FILE, TEST_FILE, TEST_NEGATIVES_FILE)
VALIDATION_FILES = (VALID_FILE, VALID_NEGATIVES_FILE)
CACHE_FILES = TENSOR_FILES + VALIDATION_FILES + (METADATA_FILE, USER_IDS_FILE, ITEM_IDS_FILE)
# 3: metadata.json records each tensor's shape and sha256, and the fingerprint covers the split.
CACHE_VERSION = 3
# The reference's split and test candidates: users with at least MIN_RATINGS interactions,
# VALID_NEGATIVE test negatives per user, drawn with SEED.
MIN_RATINGS = 20
VALID_NEGATIVE = 100
SEED = 1
# How test negatives are drawn (metadata.json's test_negative_sampling; a cache without it:
# recipe). recipe: the reference's, uniform with replacement over the items the user has no
# training pair with (a repeat, or the test positive itself, counts once in evaluation);
# paper: the NCF paper's, distinct items the user never interacted with. A cache of the NCF
# paper's own files has its source's negatives instead, drawn by nobody here: 'given'.
# popularity: RecBole's popN, with replacement, in proportion to each item's training
# interactions, over the items the user has no training pair with.
TEST_NEGATIVE_SAMPLINGS = ('recipe', 'paper', 'popularity')
# The splits whose test (and validation) tensors hold any number of positives per user, as
# (user, item) rows sorted by user (metadata.json's split); the others hold row u: user u's.
SEVERAL_POSITIVES_SPLITS = ('ratio', 'time')
# MovieLens 20M after that split (the reference's data; benchmarks and torch.hub default to it).
ML_20M_USERS, ML_20M_ITEMS, ML_20M_RATINGS = 138_493, 26_744, 20_000_263


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


def split_sha256(tensors, parameters=None):
    """One digest of the split from {file name: {'sha256': ...}}: the training and test tensors,
    and the validation positives where the cache holds a validation holdout (not the negatives,
    as for the test set), and the split's parameters where it has any (metadata.json's
    split_parameters: a ratio or time split)."""
    names = (TRAIN_FILE, TEST_FILE) + ((VALID_FILE,) if VALID_FILE in tensors else ())
    parts = [tensors[name]['sha256'] for name in names]
    if parameters:
        parts.append(json.dumps(parameters, sort_keys=True))
    return hashlib.sha256(':'.join(parts).encode()).hexdigest()


def validation_seed(seed):
    """The seed of the validation negatives, for the test negatives' `seed`: another stream, so
    that the test negatives are those of the same cache without a validation holdout and the
    validation negatives never depend on them."""
    return (seed + 2 ** 32) % 2 ** 64


def read_metadata(data_dir, log=print):
    """metadata.json of the cache in `data_dir`, checked for what loading needs. A cache older
    than version 3 (no tensor digests) is read with a one-line notice."""
    if not data_dir or not os.path.isdir(data_dir):
        raise UsageError(f'--data {data_dir!r} is not a directory: run prepare_dataset.sh first')
    path = os.path.join(data_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise UsageError(f'{data_dir} has no {METADATA_FILE}: the cache is missing or incomplete; '
                         'run prepare_dataset.sh or convert.py again')
    try:
        with open(path) as file:
            metadata = json.load(file)
        int(metadata['n_users']), int(metadata['n_items'])
        version = metadata.get('version', 1)
        tensors = metadata.get('tensors')
        if version >= CACHE_VERSION and not (isinstance(tensors, dict) and all(
                isinstance(tensors.get(name), dict) for name in TENSOR_FILES)):
            raise ValueError(f'no tensor digests in a cache of version {version}')
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f'{path} is not convert.py metadata: {error}') from None
    if version > CACHE_VERSION:
        raise UsageError(f'{path} is of cache version {version}, newer than this ncf reads '
                         f'({CACHE_VERSION}): update ncf')
    if not isinstance(tensors, dict):
        log(f'Notice: the cache in {data_dir} records no tensor digests (cache version '
            f'{version}): its tensors are not checked against {METADATA_FILE}; '
            'prepare_dataset.sh or convert.py converts it again')
    check_fingerprint(metadata, path)
    return metadata


def check_fingerprint(metadata, path):
    """The fingerprint metadata.json records is the one its own digests give (source, id maps
    and, where recorded, the split): an edited fingerprint would pass a checkpoint of other
    data as this data's, or refuse this data's own."""
    recorded = metadata.get('fingerprint')
    parts = [metadata.get(key) for key in ('source_sha256', 'id_maps_sha256')]
    if recorded is None or not all(isinstance(part, str) for part in parts):
        return  # caches before version 2 have none
    tensors = metadata.get('tensors')
    split = None
    if isinstance(tensors, dict) and all(isinstance(tensors.get(name), dict) and 'sha256' in
                                         tensors[name] for name in (TRAIN_FILE, TEST_FILE)):
        split = split_sha256(tensors, metadata.get('split_parameters'))
    if recorded != fingerprint(*parts, split):
        raise UsageError(f'{path} records fingerprint {recorded}, but its source, id maps and '
                         f'tensors give {fingerprint(*parts, split)}: metadata.json was edited; '
                         'run prepare_dataset.sh or convert.py again')


def check_counts(metadata, path, counts):
    """metadata.json's counts (n_train, n_test, valid_negative, where it has them) are the
    tensors' `counts`."""
    for name, count in counts.items():
        if name in metadata and metadata[name] != count:
            raise UsageError(f'{path} says {name} {metadata[name]}, but the tensors hold '
                             f'{count}: the cache is inconsistent; run convert.py again')


def read_id_maps(data_dir, metadata):
    """(user ids, item ids): the original ids in mapped order (line k after the header: mapped
    id k), as strings, checked against metadata.json's id_maps_sha256 where it has one."""
    data, digest = [], hashlib.sha256()
    for name in (USER_IDS_FILE, ITEM_IDS_FILE):
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise UsageError(f'{path} is missing: recommend mode needs the id maps convert.py '
                             'writes (run it again to get them)')
        with open(path, 'rb') as file:
            data.append(file.read())
        digest.update(data[-1])
    recorded = metadata.get('id_maps_sha256')
    if recorded is not None and digest.hexdigest() != recorded:
        raise UsageError(f'{USER_IDS_FILE} or {ITEM_IDS_FILE} in {data_dir} has changed since '
                         f'convert.py wrote it (their sha256 is not what {METADATA_FILE} '
                         'records): run prepare_dataset.sh or convert.py again')
    maps = []
    for name, raw, count in zip((USER_IDS_FILE, ITEM_IDS_FILE), data,
                                (metadata['n_users'], metadata['n_items'])):
        path = os.path.join(data_dir, name)
        rows = list(csv.reader(io.StringIO(raw.decode('utf-8', errors='replace'), newline='')))
        if not rows or len(rows[0]) != 1:
            raise UsageError(f'{path} is not an id map: expected a one-column CSV with a header')
        maps.append([row[0] if row else '' for row in rows[1:]])
        if len(maps[-1]) != count:
            raise UsageError(f'{path} holds {len(maps[-1])} ids, but {METADATA_FILE} says '
                             f'{count}: the cache is inconsistent; run convert.py again')
    return maps
