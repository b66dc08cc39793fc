"""Convert raw ratings (MovieLens or any user,item,timestamp CSV) into the tensors ncf.py reads.

    python convert.py --path RATINGS --output DIR [--valid_negative 100] [--seed 1]
                      [--min_ratings 20] [--format F] [--test_negative_sampling recipe|paper]
                      [--validation_holdout]
    python convert.py --path data/ml-1m --output DIR [--validation_holdout [--seed 1]]
                                                              # the NCF paper's own files
    python convert.py --path FILE --output DIR --columns user=C item=C [rating=C] [timestamp=C]
                      [--rating_threshold R] [--k_core K] [--split ratio|time ...]
                                                              # one's own data (README)

The reference recipe's split: drop users with fewer than `min_ratings` interactions, map user and
item ids to 0..n-1 in order of first appearance, order each user's interactions by timestamp
(stable: ties keep file order), drop repeated (user, item) pairs keeping the earliest, hold out
each user's latest interaction as the test positive and train on the rest. Then draw
`valid_negative` test negatives per user: uniformly with replacement from the items the user has
no training interaction with (the recipe's), or, with --test_negative_sampling paper, distinct
items the user never interacted with (the NCF paper's); metadata.json records which. The NCF
paper's own files (PREFIX.train.rating, .test.rating, .test.negative; ncflib/paper_files.py) are
cached as they are instead: their split and their negatives, ids kept (metadata.json's split and
test_negative_sampling: given).

With --validation_holdout, each user's latest training interaction is also held out, as the
validation positive (users with under 3 distinct interactions, or in the paper's files a single
training item, have none and keep their training), with validation negatives drawn as the test
negatives are, as if the test set did not exist (the paper's files: as the NCF paper draws), from
a generator of their own. The test positives and negatives stay those of the same conversion
without it; without it, the cache is as it always was.

The cache's metadata.json records each tensor's shape and sha256, the source file's sha256, a
sha256 over the id maps and the `fingerprint` derived from the source, the id maps and the split
(the data's identity, as checkpoints record it). A cache is
replaced as a whole: a failed, full-disk or interrupted (Ctrl-C, SIGTERM) run ends in one line
and leaves the previous cache as it was, and a run killed outright leaves either a consistent
cache or one without metadata.json, which nothing trusts.

One's own data (--columns, or any of the filters or splits below; ncflib/interactions.py):
read through a mapping of its columns; then, in this order, ratings under --rating_threshold
dropped, a user-item pair's latest copy kept, k-core filtering to a fixed point; then
leave-one-out, a per-user --split ratio (random or in time order) or a global --split time
cutoff, whose test and validation sets hold any number of positives per user.

Vectorised throughout: an ML-20m-sized file takes seconds (see README, "Preprocessing speed").
"""
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import sys
import threading
import time

from ncflib import paper_files
from ncflib.cache import (CACHE_FILES, CACHE_VERSION, ITEM_IDS_FILE, METADATA_FILE, MIN_RATINGS,
                          SEED, TEST_FILE, TEST_NEGATIVE_SAMPLINGS, TEST_NEGATIVES_FILE,
                          TRAIN_FILE, USER_IDS_FILE, VALID_FILE, VALID_NEGATIVE,
                          VALID_NEGATIVES_FILE, VALIDATION_FILES, fingerprint, split_sha256,
                          tensor_sha256, validation_seed)
from ncflib.cli import (ArgumentParser, UsageError, check_writable_directory, deferred_signals,
                        disk_full_error, excerpt, handle_signals_late, import_held, run_main,
                        same_file)
from ncflib.files import DirectoryLock, FileSet
from ncflib.interactions import (RATIO_ORDERS, SEPARATORS, SPLITS, factorize, header_line,
                                 header_names, validation_rows)

# numpy, pyarrow and torch (and dataloading, which imports it) load where they are first needed:
# a bad input or output is reported at once, and Ctrl-C or SIGTERM find run_main's handlers in
# place almost from the start.

NEGATIVE_CHUNK_USERS = 16384
PAPER = 'paper'  # --format of the NCF paper's own files (ncflib/paper_files.py)

# Each MovieLens layout (and the generic CSV): how to read it (interactions.read_text) and which
# of its columns hold user, item, rating (where it has one) and timestamp.
FORMATS = {
    'ml-20m': dict(delimiter=',', header=True, integer_ids=True, roles=dict(
        user='userId', item='movieId', rating='rating', timestamp='timestamp')),
    'ml-1m': dict(delimiter='::', header=False, integer_ids=True,
                  names=('user', 'item', 'rating', 'timestamp'),
                  roles=dict(user='user', item='item', rating='rating', timestamp='timestamp')),
    'ml-100k': dict(delimiter='\t', header=False, integer_ids=True,
                    names=('user', 'item', 'rating', 'timestamp'),
                    roles=dict(user='user', item='item', rating='rating', timestamp='timestamp')),
    'csv': dict(delimiter=',', header=True,
                roles=dict(user='user_id', item='item_id', timestamp='timestamp')),
}


def stage(message, since):
    """A timed progress line on stderr; returns the time, for the next stage."""
    now = time.perf_counter()
    print(f'[convert] {message} ({now - since:.2f} s)', file=sys.stderr, flush=True)
    return now


def detect_format(path):
    """Name the format of `path` from its first line (see FORMATS)."""
    first = header_line(path)
    if not first:
        raise UsageError(f'{path} has an empty first line: expected a header or a first rating')
    names = header_names(first, ',')
    if '::' in first:
        return 'ml-1m'
    if set(FORMATS['ml-20m']['roles'].values()) <= set(names):
        return 'ml-20m'
    if set(FORMATS['csv']['roles'].values()) <= set(names):
        return 'csv'
    fields = first.split('\t')
    if len(fields) == 4 and all(field.strip().lstrip('-').isdigit() for field in fields):
        return 'ml-100k'
    raise UsageError(f'cannot tell the format of {path} from its first line {excerpt(first)}: '
                     'expected ML-20m ratings.csv, ML-1m ratings.dat, ML-100k u.data or a CSV '
                     'whose header has user_id,item_id,timestamp (or name one with --format)')


def split(columns, min_ratings, validation_holdout=False):
    """The reference's split, vectorised. Returns a dict of numpy arrays and id dictionaries;
    with `validation_holdout`, each user's latest training interaction is the validation
    positive (validation_rows) and the rest is training.

    columns: {'user', 'item', 'timestamp'} Arrow arrays (ids of any type, numeric timestamps),
    consumed as they are used, to bound peak memory on ML-20m-sized input.
    """
    import numpy as np
    import pyarrow as pa
    import torch

    from ncflib.interactions import user_time_order

    user, user_values = factorize(columns.pop('user'))
    counts = np.bincount(user)
    kept_users = counts >= min_ratings
    if not kept_users.any():
        raise UsageError(f'no user has at least {min_ratings} interactions '
                         f'(the most any user has is {counts.max()}); lower --min_ratings')
    items = columns.pop('item')
    # without a timestamp column, the file's order is the time order
    timestamps = columns.pop('timestamp').to_numpy() if 'timestamp' in columns else \
        np.arange(len(user), dtype=np.int64)
    if not kept_users.all():
        kept_rows = kept_users[user]
        # Users keep their order of first appearance among the users that remain.
        user = (np.cumsum(kept_users, dtype=np.int32) - 1)[user[kept_rows]]
        user_values = user_values.filter(pa.array(kept_users))
        items = items.filter(pa.array(kept_rows))
        timestamps = timestamps[kept_rows]
    item, item_values = factorize(items)
    del items
    n_users, n_items = len(user_values), len(item_values)

    order = user_time_order(user, timestamps, n_users)
    del timestamps
    user, item = user[order], item[order]
    del order

    # Drop repeated (user, item) pairs, keeping the earliest: sorting the pair keys (stably,
    # so each pair's copies stay in time order) puts the copies side by side.
    pairs = user.astype(np.int64)
    pairs *= n_items
    pairs += item
    sorted_pairs, by_pair = torch.sort(torch.from_numpy(pairs), stable=True)
    del pairs
    repeat = torch.zeros(len(user), dtype=torch.bool)
    repeat[by_pair[1:]] = sorted_pairs[1:] == sorted_pairs[:-1]
    pa.default_memory_pool().release_unused()  # the Arrow columns are gone by now
    duplicates = int(repeat.sum())
    kept_rows = np.nonzero(~repeat.numpy())[0] if duplicates else None
    if duplicates:
        user, item = user[kept_rows], item[kept_rows]

    # Each user's last row (in time order) is the test positive.
    last = np.empty(len(user), dtype=bool)
    last[:-1] = user[1:] != user[:-1]
    last[-1] = True
    # The distinct pairs' keys, sorted, and which of them are test (and validation) positives:
    # the negatives are drawn outside them (dataloading.ItemExclusion) without sorting them
    # again.
    first_copies = ~repeat[by_pair]
    rows = kept_rows, len(repeat), by_pair, first_copies
    result = dict(n_users=n_users, n_items=n_items, user_values=user_values,
                  item_values=item_values, duplicates=duplicates,
                  dropped_users=int((~kept_users).sum()), pair_keys=sorted_pairs[first_copies],
                  test_keys=sorted_pair_mask(last, *rows), test_users=user[last],
                  test_items=item[last])
    training = ~last
    if validation_holdout:
        valid = validation_rows(user, last)
        result.update(valid_keys=sorted_pair_mask(valid, *rows), valid_users=user[valid],
                      valid_items=item[valid])
        training &= ~valid
    del sorted_pairs, by_pair, repeat, first_copies, rows
    result.update(train_users=user[training], train_items=item[training])
    return result


def sorted_pair_mask(mask, kept_rows, n_rows, by_pair, first_copies):
    """A mask over the distinct rows (kept_rows of the n_rows, None: all) as a mask over the
    sorted distinct pair keys (the rows in by_pair order, first copies only)."""
    import torch

    rows = torch.from_numpy(mask)
    if kept_rows is not None:
        rows = torch.zeros(n_rows, dtype=torch.bool)
        rows[torch.from_numpy(kept_rows[mask])] = True
    return rows[by_pair][first_copies]


def sample_test_negatives(result, keys, test_keys, count, seed, sampling='recipe'):
    """`count` test negatives per user of the split `result`, as `sampling` says
    (dataloading.draw_test_negatives), outside the split's own sorted pair `keys` (recipe: but
    the test positives, `test_keys`)."""
    import torch

    if sampling != 'paper':  # the recipe's: outside the training pairs only
        keys = keys[~test_keys]
    return draw_negatives(result, keys, count, torch.Generator().manual_seed(seed), sampling)


def sample_validation_negatives(result, keys, test_keys, valid_keys, count, seed, sampling):
    """The validation negatives, drawn as the test negatives are, as if the test set did not
    exist: outside the pre-holdout training pairs (paper), or outside the training pairs that
    remain (recipe); `valid_keys` marks the validation positives among the sorted pair `keys`."""
    before_test = ~test_keys
    keys, valid_keys = keys[before_test], valid_keys[before_test]
    if sampling != 'paper':
        keys = keys[~valid_keys]
    return draw_validation_negatives(result, keys, count, seed, sampling)


def draw_validation_negatives(result, keys, count, seed, sampling):
    """`count` validation negatives per user outside the pairs of the sorted `keys`, from a
    generator of their own (cache.validation_seed: the test negatives' stays as it is); -1
    throughout for a user without a validation positive."""
    import torch

    generator = torch.Generator().manual_seed(validation_seed(seed))
    negatives = draw_negatives(result, keys, count, generator, sampling)
    negatives[result['valid_positives'][:, 1] < 0] = -1
    return negatives


def pair_keys(users, items, n_items):
    """The sorted keys (user * n_items + item, int64) of the given pairs."""
    import numpy as np
    import torch

    keys = users.astype(np.int64) * n_items
    keys += items
    keys.sort()
    return torch.from_numpy(keys)


def draw_negatives(result, keys, count, generator, sampling):
    """dataloading.draw_test_negatives outside the pairs whose sorted `keys` are given, in
    chunks of users that bound the memory."""
    from dataloading import ItemExclusion, draw_test_negatives

    import torch

    exclusion = ItemExclusion.from_sorted_keys(keys, result['n_users'], result['n_items'])
    user_values = result['user_values']
    return draw_test_negatives(exclusion, count, generator, sampling, NEGATIVE_CHUNK_USERS,
                               user_name=lambda user: shown_id(user_values[user].as_py()),
                               popular=torch.from_numpy(result['train_items'].astype('int64')))


def validation_positives(n_users, users, items):
    """int64 [n_users, 2]: row u holds u and their validation item, or -1 for none."""
    import numpy as np
    import torch

    positives = np.full(n_users, -1, dtype=np.int64)
    positives[users] = items
    return torch.from_numpy(np.stack([np.arange(n_users), positives], axis=1))


def validation_line(result, count, sampling, why_without):
    """The stage line of a validation holdout: its counts and its negatives."""
    users = validation_users(result)
    return (f'validation holdout: {users:,} users with a validation positive, '
            f'{result["n_users"] - users:,} without ({why_without}); drew {count} validation '
            f'negatives per user ({sampling})')


def validation_metadata(result, sampling, seed):
    """metadata.json's record of a validation holdout."""
    users = validation_users(result)
    return {'holdout': 'latest', 'users': users, 'users_without': result['n_users'] - users,
            'negatives': sampling, 'seed': validation_seed(seed)}


def validation_users(result):
    """How many users have a validation positive."""
    return int((result['valid_positives'][:, 1] >= 0).sum())


def shown_id(value):
    """An original id (a file's text) for a message: as it is where it is short and printable,
    else escaped and cut (paper_files.excerpt)."""
    text = str(value)
    return text if text.isprintable() and len(text) <= 60 else excerpt(text)


def id_map_bytes(header, values):
    """The bytes of an id map: a header line, then line k holds the original id of mapped id k."""
    text = io.StringIO(newline='')
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow([header])
    writer.writerows([value] for value in values.to_pylist())
    return text.getvalue().encode('utf-8')


def cache_tensors(result, test_negatives, validation_negatives=None):
    """The cache's tensors by file name, in the order they are written: the validation ones
    only with a validation holdout."""
    import numpy as np
    import torch

    tensors = {}
    for name, (users, items) in ((TRAIN_FILE, ('train_users', 'train_items')),
                                 (TEST_FILE, ('test_users', 'test_items'))):
        tensors[name] = torch.from_numpy(np.stack([result[users], result[items]], axis=1)
                                         .astype(np.int64))
    tensors[TEST_NEGATIVES_FILE] = test_negatives.contiguous()
    if validation_negatives is not None:
        tensors[VALID_FILE] = result['valid_positives']
        tensors[VALID_NEGATIVES_FILE] = validation_negatives.contiguous()
    return tensors


def write_cache(output, tensors, result, metadata, progress=None):
    """Write the cache, replacing any previous one in `output` as a whole.

    Every file goes to a temporary name beside its place first; only when all are written are
    they renamed into place, metadata.json removed before the first rename and renamed last
    (files.FileSet). So until then the previous cache stays whole and loadable (an interrupted
    or failed run leaves it as it was), and a process killed outright during the renames leaves
    no metadata.json: a cache is trusted only with a metadata.json written after all its files.
    A previous cache's validation files that the new one lacks are removed after that: nothing
    trusts them once metadata.json no longer lists them.
    tensors: cache_tensors'; result: the split's, for the id maps. Adds each tensor's shape and
    sha256, id_maps_sha256 and the fingerprint to `metadata`.
    progress: a dict whose 'committed' is set once the new cache is in place.
    """
    import torch

    try:  # whether this run made the directory: one run can, however many start at once
        os.makedirs(output)
        created = True
    except FileExistsError:
        created = False
    lock = None
    try:
        # two conversions into one cache never interleave their files
        lock = DirectoryLock(output, 'one conversion at a time into a cache')
        with FileSet() as files:
            recorded = {}
            for name, tensor in tensors.items():
                def write(temporary):
                    with open(temporary, 'wb') as file:
                        torch.save(tensor, file)
                files.write(os.path.join(output, name), write)
                recorded[name] = {'shape': list(tensor.shape), 'sha256': tensor_sha256(tensor)}
            id_maps = hashlib.sha256()
            for name, header, values in ((USER_IDS_FILE, 'user_id', result['user_values']),
                                         (ITEM_IDS_FILE, 'item_id', result['item_values'])):
                data = id_map_bytes(header, values)
                id_maps.update(data)
                files.write_bytes(os.path.join(output, name), data)
            metadata['tensors'] = recorded
            metadata['id_maps_sha256'] = id_maps.hexdigest()
            metadata['fingerprint'] = fingerprint(metadata['source_sha256'],
                                                  metadata['id_maps_sha256'],
                                                  split_sha256(recorded,
                                                               metadata.get('split_parameters')))
            metadata_path = os.path.join(output, METADATA_FILE)
            files.write_bytes(metadata_path, (json.dumps(metadata, indent=2) + '\n').encode())
            with deferred_signals():  # a signal during the renames is raised after them
                files.commit(last=metadata_path)
                if progress is not None:
                    progress['committed'] = True
                for name in set(VALIDATION_FILES) - set(tensors):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(output, name))
    except BaseException:
        # Leave no empty directory behind, but only one this run created and locked: a run that
        # found another one writing there leaves that one's directory alone.
        if created and lock is not None:
            try:
                os.rmdir(output)
            except OSError:
                pass
        raise
    finally:
        if lock is not None:
            lock.release()


class FileHash:
    """sha256 of a file (of several, one after the other), computed in a background thread
    (hashlib releases the GIL)."""

    def __init__(self, *paths):
        self._digest = hashlib.sha256()
        self._error = None
        self._thread = threading.Thread(target=self._run, args=paths, daemon=True)
        self._thread.start()

    def _run(self, *paths):
        for path in paths:
            try:
                with open(path, 'rb') as file:
                    while chunk := file.read(1 << 22):
                        self._digest.update(chunk)
            except OSError as error:  # reported by hexdigest, in the main thread
                self._error = UsageError(f'cannot read {path}: {error.strerror or error}')
                return

    def hexdigest(self):
        self._thread.join()
        if self._error:
            raise self._error
        return self._digest.hexdigest()


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--path', required=True,
                        help='ratings file: ML-20m ratings.csv, ML-1m ratings.dat, ML-100k u.data, '
                             'or a CSV whose header has user_id,item_id,timestamp; or the NCF '
                             "paper's files, PREFIX (or any of PREFIX.train.rating, "
                             '.test.rating, .test.negative)')
    parser.add_argument('--output', required=True, help='directory for the cached tensors')
    parser.add_argument('--format', choices=sorted(FORMATS) + [PAPER], default=None,
                        help="input format (default: detected from the first line; paper: the "
                             "NCF paper's files, from their names)")
    parser.add_argument('--valid_negative', type=int, default=VALID_NEGATIVE,
                        help='number of test (and validation) negatives per user')
    parser.add_argument('--min_ratings', type=int, default=MIN_RATINGS,
                        help='drop users with fewer interactions than this')
    parser.add_argument('--test_negative_sampling', choices=TEST_NEGATIVE_SAMPLINGS,
                        default='recipe',
                        help="recipe: the reference's, uniform with replacement over the items "
                             'without a training pair; paper: the NCF paper\'s, distinct items '
                             'the user never interacted with; popularity: RecBole\'s popN, with '
                             'replacement, in proportion to training interactions, over the '
                             'items without a training pair')
    parser.add_argument('-s', '--seed', type=int, default=SEED,
                        help='seed for the test negatives (and, from another stream, the '
                             'validation negatives)')
    parser.add_argument('--validation_holdout', action='store_true',
                        help="hold out each user's latest training interaction as the validation "
                             'positive, with validation negatives drawn as the test negatives '
                             "are (the NCF paper's files: cut out of their training ratings)")
    own = parser.add_argument_group(
        "one's own data (README, \"Your own data\"): filters, in this order, then the split")
    own.add_argument('--columns', nargs='+', metavar='ROLE=COLUMN', default=None,
                     help='read --path through this mapping of its columns (header names, or '
                          '0-based positions with --no_header): user=... item=... and optionally '
                          'rating=... timestamp=... (without a timestamp, the file order is the '
                          'time order). CSV, TSV, ::-separated or Parquet (.parquet, .pq)')
    own.add_argument('--separator', default=None,
                     help='field separator of a text file read with --columns: a character or '
                          f'one of {", ".join(SEPARATORS)} (default: tab for .tsv, :: for .dat, '
                          'else a comma)')
    own.add_argument('--no_header', action='store_true',
                     help='the text file read with --columns has no header line')
    own.add_argument('--rating_threshold', type=float, default=None, metavar='R',
                     help='keep only interactions rated R or more (explicit ratings as implicit '
                          'feedback)')
    own.add_argument('--k_core', type=int, default=None, metavar='K',
                     help='drop users and items with fewer than K interactions, repeatedly '
                          'until none is left (users: fewer than max(K, --min_ratings))')
    own.add_argument('--split', choices=SPLITS, default='leave_one_out',
                     help="leave_one_out: each user's latest interaction is the test (the "
                          "reference's); ratio: --ratios of each user's interactions; time: "
                          'train before --time_cutoff, test from it')
    own.add_argument('--ratios', nargs='+', type=float, default=[0.8, 0.1, 0.1],
                     metavar='R', help='--split ratio: TRAIN [VALIDATION] TEST shares of each '
                                       "user's interactions, summing to 1")
    own.add_argument('--ratio_order', choices=RATIO_ORDERS, default='random',
                     help="--split ratio: which of a user's interactions are held out: drawn "
                          'at random (stratified per user, from --seed) or the latest')
    own.add_argument('--time_cutoff', nargs='+', default=None, metavar='T',
                     help='--split time: test from T on (a timestamp, or an ISO date); two '
                          'cutoffs T1 T2: validation from T1, test from T2')
    args = parser.parse_args(argv)
    args.given = parser.given_flags(argv)
    return args


OWN_DATA_FLAGS = ('columns', 'separator', 'no_header', 'rating_threshold', 'k_core', 'split',
                  'ratios', 'ratio_order', 'time_cutoff')


def check_split_arguments(args):
    """The flags of one's own data, alone and together; normalises --ratios to three."""
    if args.columns and args.format:
        raise UsageError('--columns reads the file through its own mapping: leave out --format')
    for name in ('separator', 'no_header'):
        if name in args.given and not args.columns:
            raise UsageError(f'--{name} is for a file read with --columns')
    if not args.columns and args.path.lower().endswith(('.parquet', '.pq')):
        raise UsageError(f'{args.path}: name the columns of a Parquet file with --columns '
                         'user=... item=... [rating=...] [timestamp=...]')
    if args.rating_threshold is not None and not math.isfinite(args.rating_threshold):
        raise UsageError(f'--rating_threshold must be a finite number, not '
                         f'{args.rating_threshold}')
    if args.k_core is not None and args.k_core < 1:
        raise UsageError(f'--k_core must be at least 1, not {args.k_core}')
    for name, split in (('ratios', 'ratio'), ('ratio_order', 'ratio'), ('time_cutoff', 'time')):
        if name in args.given and args.split != split:
            raise UsageError(f'--{name} is for --split {split}')
    if args.split != 'leave_one_out' and args.validation_holdout:
        raise UsageError(f'--validation_holdout is for --split leave_one_out: --split '
                         f'{args.split} holds out its validation part itself (three --ratios, '
                         'or two --time_cutoff)')
    if args.split == 'ratio':
        ratios = args.ratios
        if len(ratios) not in (2, 3) or not all(math.isfinite(r) and r >= 0 for r in ratios) \
                or abs(sum(ratios) - 1) > 1e-6 or ratios[0] <= 0 or ratios[-1] <= 0:
            raise UsageError(f'--ratios {" ".join(map(str, ratios))}: two or three shares '
                             '(train [validation] test), train and test above 0, summing to 1')
        args.ratios = [ratios[0], 0.0, ratios[1]] if len(ratios) == 2 else list(ratios)
    if args.split == 'time':
        if not args.time_cutoff or len(args.time_cutoff) > 2:
            raise UsageError('--split time needs --time_cutoff T (test from T) or T1 T2 '
                             '(validation from T1, test from T2)')
        from ncflib.interactions import parse_time
        cutoffs = [parse_time(text) for text in args.time_cutoff]
        if len(cutoffs) == 2 and not cutoffs[0] < cutoffs[1]:
            raise UsageError(f'--time_cutoff {" ".join(args.time_cutoff)}: the validation '
                             'cutoff comes before the test cutoff')


def check_arguments(args):
    """Everything that can be checked before reading the input; raises UsageError. Returns the
    PREFIX of the NCF paper's files where --path names them, else None."""
    prefix = paper_files.prefix_of(args.path) if args.format in (None, PAPER) else None
    if args.format == PAPER and prefix is None:
        raise UsageError(f'--path {args.path} names none of the NCF paper\'s files (PREFIX, or '
                         f'PREFIX{", PREFIX".join(paper_files.SUFFIXES)})')
    if prefix is not None:
        # their own split and negatives: the options that make ours do not apply
        for name in ('valid_negative', 'min_ratings', 'seed', 'test_negative_sampling',
                     *OWN_DATA_FLAGS):
            if name in args.given and not (name == 'seed' and args.validation_holdout):
                raise UsageError(f'--{name} does not apply to the NCF paper\'s files: they hold '
                                 'their own split and test negatives'
                                 + (' (it seeds validation negatives, with --validation_holdout)'
                                    if name == 'seed' else ''))
        inputs = paper_files.paths(prefix)
    else:
        check_ratings_file(args)
        check_split_arguments(args)
        inputs = [args.path]
    if not -2 ** 63 <= args.seed < 2 ** 64:
        raise UsageError(f'--seed {args.seed} is out of range (a 64-bit integer)')
    check_writable_directory(args.output, '--output')
    for path in inputs:
        for name in CACHE_FILES:
            if same_file(path, os.path.join(args.output, name)):
                raise UsageError(f'--path {path} is the {name} convert.py writes in --output '
                                 f'{args.output}: it would be overwritten; write the cache '
                                 'elsewhere')
    return prefix


def check_ratings_file(args):
    if os.path.isdir(args.path):
        raise UsageError(f'--path {args.path} is a directory, not a ratings file')
    if not os.path.exists(args.path):
        raise UsageError(f'ratings file {args.path} does not exist')
    if not os.path.isfile(args.path):  # read twice (its sha256, its rows): no FIFO or device
        raise UsageError(f'--path {args.path} is not a regular file (a FIFO or a device)')
    if not os.access(args.path, os.R_OK):
        raise UsageError(f'cannot read {args.path}: permission denied')
    if os.path.getsize(args.path) == 0:
        raise UsageError(f'{args.path} is empty')
    if args.valid_negative < 1:
        raise UsageError('--valid_negative must be at least 1')
    if args.min_ratings < 2 and args.split == 'leave_one_out':
        raise UsageError('--min_ratings must be at least 2 (one test and one training interaction)')
    if args.min_ratings < 1:
        raise UsageError('--min_ratings must be at least 1')


def convert(args, progress=None):
    start = time.perf_counter()
    prefix = check_arguments(args)
    if prefix is not None:
        return convert_paper_files(args, prefix, progress, start)
    fmt = args.format or (None if args.columns else detect_format(args.path))
    import_held('numpy', 'pyarrow.csv', 'pyarrow.compute', 'torch', 'dataloading')
    source_hash = FileHash(args.path)

    columns, label = read_input(args, fmt)
    rows = len(columns['user'])
    now = stage(f'read {rows:,} rows of {args.path} as {label}'
                + ('' if 'timestamp' in columns else
                   " (no timestamp column: the file's order is the time order)"), start)
    if not reference_split(args):
        return convert_own(args, columns, label, source_hash, progress, start, now)
    result = split(columns, args.min_ratings, args.validation_holdout)
    now = stage(f'split: {result["n_users"]:,} users, {result["n_items"]:,} items, '
                f'{len(result["train_users"]):,} training rows, {result["dropped_users"]:,} users '
                f'with under {args.min_ratings} interactions and {result["duplicates"]:,} '
                'repeated pairs dropped', now)
    if args.valid_negative > result['n_items']:
        raise UsageError(f'--valid_negative {args.valid_negative} is more than the '
                         f'{result["n_items"]:,} items of {args.path}')
    if args.validation_holdout and not len(result['valid_users']):
        raise UsageError(f'--validation_holdout: no user of {args.path} has 3 distinct '
                         'interactions (a training, a validation and a test one) after '
                         '--min_ratings and repeated pairs: there is nothing to validate on')
    keys, test_keys = result.pop('pair_keys'), result.pop('test_keys')
    test_negatives = sample_test_negatives(result, keys, test_keys, args.valid_negative,
                                           args.seed, args.test_negative_sampling)
    now = stage(f'drew {args.valid_negative} test negatives per user '
                f'({args.test_negative_sampling})', now)
    validation_negatives = None
    if args.validation_holdout:
        result['valid_positives'] = validation_positives(
            result['n_users'], result.pop('valid_users'), result.pop('valid_items'))
        validation_negatives = sample_validation_negatives(
            result, keys, test_keys, result.pop('valid_keys'), args.valid_negative, args.seed,
            args.test_negative_sampling)
        now = stage(validation_line(result, args.valid_negative, args.test_negative_sampling,
                                    'under 3 distinct interactions'), now)
    del keys, test_keys
    metadata = {
        **source_metadata(args, 'recipe', source_hash, label, rows),
        'dropped_users': result['dropped_users'],
        'dropped_repeats': result['duplicates'],
    }
    if args.validation_holdout:
        metadata['validation'] = validation_metadata(result, args.test_negative_sampling,
                                                     args.seed)
    write(args.output, result, cache_tensors(result, test_negatives, validation_negatives),
          metadata, progress, now, start)


def source_metadata(args, split, source_hash, label, rows):
    """metadata.json's record of a ratings file's split and source."""
    return {'split': split, 'test_negative_sampling': args.test_negative_sampling,
            'min_ratings': args.min_ratings, 'seed': args.seed,
            'source_file': os.path.basename(args.path), 'source_sha256': source_hash.hexdigest(),
            'source_format': label, 'source_rows': rows}


def reference_split(args):
    """Whether the reference's split applies: leave-one-out without the filters of one's own
    data (which keep a pair's latest copy and filter items too)."""
    return args.split == 'leave_one_out' and args.rating_threshold is None and not args.k_core


def read_input(args, fmt):
    """({role: Arrow array}, what the file was read as): through --columns where given, else
    as the MovieLens layout or generic CSV `fmt`."""
    from ncflib import interactions

    if args.columns:
        mapping = interactions.parse_column_mapping(args.columns)
        if args.rating_threshold is not None and 'rating' not in mapping:
            raise UsageError('--rating_threshold needs the rating column: add rating=COLUMN to '
                             '--columns')
        if interactions.is_parquet(args.path):
            return interactions.read_parquet(args.path, mapping), 'Parquet'
        delimiter = interactions.delimiter_of(args.path, args.separator)
        spec = interactions.text_spec(args.path, mapping, delimiter, not args.no_header)
        return (interactions.read_text(args.path, spec, f'{delimiter!r}-separated'),
                f'{delimiter!r}-separated, columns ' + ', '.join(
                    f'{role}={column}' for role, column in mapping.items()))
    spec = dict(FORMATS[fmt])
    roles = dict(spec['roles'])
    if args.rating_threshold is None:
        roles.pop('rating', None)
    elif 'rating' not in roles:
        raise UsageError(f'--rating_threshold: {args.path} ({fmt}) has no rating column; name '
                         'its columns with --columns user=... item=... rating=...')
    return interactions.read_text(args.path, dict(spec, roles=roles), fmt), fmt


def convert_own(args, columns, label, source_hash, progress, start, now):
    """One's own data: the filters, then leave-one-out, a per-user ratio split or a global time
    cutoff (ncflib/interactions.py); test (and validation) negatives drawn as the reference's
    are, outside the interactions known before them."""
    import numpy as np

    from ncflib import interactions

    rows = len(columns['user'])
    has_time = 'timestamp' in columns
    user_minimum, item_minimum = max(args.k_core or 1, args.min_ratings), args.k_core or 1
    data = interactions.filtered(args.path, columns, args.rating_threshold, user_minimum,
                                 item_minimum)
    removed = data['removed']
    now = stage(filters_line(args, data, user_minimum, item_minimum), now)
    user, item, when = data['user'], data['item'], data['time']
    user_values, item_values = data['user_values'], data['item_values']
    parameters = {}
    if args.split == 'leave_one_out':
        parts = interactions.leave_one_out_parts(user, args.validation_holdout)
    elif args.split == 'ratio':
        parts, n_train = interactions.ratio_parts(user, args.ratios, args.ratio_order, args.seed)
        short = np.flatnonzero(n_train < 1)
        if len(short):
            count = int(np.sum(user == short[0]))
            raise UsageError(f'--ratios {" ".join(map(str, args.ratios))} leaves user '
                             f'{shown_id(user_values[int(short[0])].as_py())} ({count} '
                             'interactions) nothing to train on: raise the training ratio, '
                             '--min_ratings or --k_core')
        parameters = {'ratios': list(args.ratios), 'order': args.ratio_order,
                      'seed': args.seed, 'order_of_rows': 'timestamp' if has_time else 'file'}
    else:
        if not has_time:
            raise UsageError('--split time needs a timestamp column (--columns timestamp=...)')
        cutoffs = [interactions.parse_time(text) for text in args.time_cutoff]
        first, last = when.min(), when.max()
        if not (first < cutoffs[0] and cutoffs[-1] <= last):
            raise UsageError(f'--time_cutoff {" ".join(args.time_cutoff)} is outside the time '
                             f'range of {args.path}, {first:g} to {last:g}: a cutoff must leave '
                             'interactions before it to train on and after it to test on')
        parts = interactions.time_parts(when, cutoffs)
        trained = np.zeros(data['n_users'], dtype=bool)
        trained[user[parts == 0]] = True
        kept = trained[user]
        removed['rows_of_users_without_training'] = int((~kept).sum())
        user, user_values = interactions.compact(user, kept, user_values)
        item, item_values = interactions.compact(item, kept, item_values)
        parts = parts[kept]
        parameters = {'cutoffs': cutoffs}
    del when
    n_users, n_items = len(user_values), len(item_values)
    if args.valid_negative > n_items:
        raise UsageError(f'--valid_negative {args.valid_negative} is more than the '
                         f'{n_items:,} items left of {args.path}')
    if not (parts == 2).any():
        raise UsageError(f'--split {args.split} leaves no test interaction of {args.path}')
    validating = args.validation_holdout or (args.split == 'ratio' and args.ratios[1] > 0) \
        or (args.split == 'time' and len(args.time_cutoff) == 2)
    if validating and not (parts == 1).any():
        raise UsageError(f'--split {args.split} leaves no validation interaction of '
                         f'{args.path}: there is nothing to validate on')
    result = dict(n_users=n_users, n_items=n_items, user_values=user_values,
                  item_values=item_values)
    for part, name in enumerate(('train', 'valid', 'test')):
        result[f'{name}_users'], result[f'{name}_items'] = user[parts == part], item[parts == part]
    one_per_user = args.split == 'leave_one_out'
    negatives = own_negatives(result, args, one_per_user, validating, user, item, parts)
    now = stage(f'split ({args.split}): {len(result["train_users"]):,} training, '
                f'{len(result["valid_users"]):,} validation and {len(result["test_users"]):,} '
                f'test interactions of {n_users:,} users on {n_items:,} items; drew '
                f'{args.valid_negative} negatives per user ({args.test_negative_sampling})', now)
    metadata = {
        **source_metadata(args, args.split, source_hash, label, rows),
        'filters': {'rating_threshold': args.rating_threshold, 'k_core': args.k_core,
                    'user_minimum': user_minimum, 'item_minimum': item_minimum, **removed},
        'split_parameters': parameters,
        'test_users': len(np.unique(result['test_users'])),
    }
    if validating:
        metadata['validation'] = (
            validation_metadata(result, args.test_negative_sampling, args.seed)
            if one_per_user else
            {'holdout': args.split, 'users': len(np.unique(result['valid_users'])),
             'positives': len(result['valid_users']), 'negatives': args.test_negative_sampling,
             'seed': validation_seed(args.seed)})
    write(args.output, result, cache_tensors(result, *negatives), metadata, progress, now, start)


def filters_line(args, data, user_minimum, item_minimum):
    """The stage line of the filters: what each removed, in order, and what is left."""
    removed = data['removed']
    parts = []
    if args.rating_threshold is not None:
        parts.append(f'{removed["below_rating_threshold"]:,} rows rated under '
                     f'{args.rating_threshold:g}')
    parts.append(f'{removed["repeated_pairs"]:,} repeated pairs (the latest copy kept)')
    rounds = removed['k_core_rounds']
    if user_minimum > 1 or item_minimum > 1:
        parts.append(f'{len(rounds)} round(s) of users under {user_minimum} and items under '
                     f'{item_minimum} interactions' + (': ' + '; '.join(
                         f'{step["users"]:,} users, {step["items"]:,} items ({step["rows"]:,} '
                         'rows)' for step in rounds) if rounds else ''))
    return (f'filters dropped {", then ".join(parts)}; left: {data["n_users"]:,} users, '
            f'{data["n_items"]:,} items, {len(data["user"]):,} interactions')


def own_negatives(result, args, one_per_user, validating, user, item, parts):
    """(test negatives, validation negatives or None): [n_users, --valid_negative] each, drawn
    as the reference's (cache.TEST_NEGATIVE_SAMPLINGS) outside the interactions known before
    them (test: training and validation; validation: training), the paper's outside all of
    the user's; -1 rows for a user without a positive there. user, item, parts: every row and
    its part (0 train, 1 validation, 2 test). Also sets the validation positives' tensor in
    `result`."""
    import numpy as np
    import torch

    from dataloading import ItemExclusion, draw_test_negatives

    count, sampling = args.valid_negative, args.test_negative_sampling
    user_values = result['user_values']
    tensors = {name: torch.from_numpy(result[name].astype(np.int64)) for name in (
        'train_users', 'train_items', 'valid_users', 'valid_items', 'test_users', 'test_items')}
    # One sort of every pair's key (user * n_items + item, distinct) with its part in the low
    # bits: each set of pairs the negatives are drawn outside of is a filter of it, in order.
    keyed = user.astype(np.int64) * result['n_items']
    keyed += item
    keyed <<= 2
    keyed += parts
    keyed.sort()
    key_parts = (keyed & 3).astype(np.int8)
    keyed >>= 2
    index = {'train': 0, 'valid': 1, 'test': 2}

    def draw(known, positives, generator):
        known = [index[part] for part in known] + ([index[positives]] if sampling == 'paper'
                                                   else [])
        exclusion = ItemExclusion.from_sorted_keys(
            torch.from_numpy(keyed[np.isin(key_parts, known)]), result['n_users'],
            result['n_items'])
        negatives = draw_test_negatives(
            exclusion, count, generator, sampling, NEGATIVE_CHUNK_USERS,
            user_name=lambda user: shown_id(user_values[user].as_py()),
            popular=tensors['train_items'])
        held = torch.zeros(result['n_users'], dtype=torch.bool)
        held[tensors[f'{positives}_users']] = True
        negatives[~held] = -1
        return negatives

    test = draw(('train', 'valid'), 'test', torch.Generator().manual_seed(args.seed))
    valid = None
    if validating:
        valid = draw(('train',), 'valid',
                     torch.Generator().manual_seed(validation_seed(args.seed)))
        if one_per_user:
            result['valid_positives'] = validation_positives(
                result['n_users'], result['valid_users'], result['valid_items'])
        else:
            result['valid_positives'] = torch.stack([tensors['valid_users'],
                                                     tensors['valid_items']], 1)
    return test, valid


def convert_paper_files(args, prefix, progress, start):
    """The NCF paper's own files, cached as they are (ncflib/paper_files.py), with, on request,
    a validation holdout cut out of their training ratings."""
    import_held('numpy', 'pyarrow.csv', 'torch', 'dataloading')
    import torch

    inputs = paper_files.paths(prefix)
    source_hash = FileHash(*inputs)
    result, negatives = paper_files.read(prefix)
    source_rows = len(result['train_users']) + len(result['test_users'])
    now = stage(f'read the NCF paper\'s split {prefix}.*: {result["n_users"]:,} users, '
                f'{result["n_items"]:,} items, {len(result["train_users"]):,} training rows, '
                f'{negatives.shape[1]} test negatives per user', start)
    validation_negatives = None
    if args.validation_holdout:
        # the training file's pairs, before the holdout: train and validation
        keys = pair_keys(result['train_users'], result['train_items'], result['n_items'])
        result['valid_positives'] = validation_positives(
            result['n_users'], *paper_files.hold_out_latest(result, prefix))
        validation_negatives = draw_validation_negatives(result, keys, negatives.shape[1],
                                                         args.seed, 'paper')
        now = stage(validation_line(result, negatives.shape[1], 'paper',
                                    'a single item in training'), now)
    metadata = {
        'split': 'given',
        'test_negative_sampling': 'given',
        'min_ratings': None,
        'seed': None,
        'source_file': ', '.join(os.path.basename(path) for path in inputs),
        'source_sha256': source_hash.hexdigest(),
        'source_format': PAPER,
        'source_rows': source_rows,
        'dropped_users': 0,
        'dropped_repeats': 0,
    }
    if args.validation_holdout:
        metadata['validation'] = validation_metadata(result, 'paper', args.seed)
    write(args.output, result, cache_tensors(result, torch.from_numpy(negatives),
                                             validation_negatives),
          metadata, progress, now, start)


def write(output, result, tensors, metadata, progress, now, start):
    """write_cache, with the counts in front of `metadata` (what the split did), its failures in
    one line, and the closing lines."""
    counts = {'n_train': len(result['train_users']), 'n_test': len(result['test_users'])}
    if 'validation' in metadata:
        counts['n_valid'] = metadata['validation'].get('positives',
                                                       metadata['validation']['users'])
    metadata = {'version': CACHE_VERSION, 'n_users': result['n_users'],
                'n_items': result['n_items'], **counts,
                'valid_negative': tensors[TEST_NEGATIVES_FILE].shape[1], **metadata}
    try:
        write_cache(output, tensors, result, metadata, progress)
    except OSError as error:
        if disk_full_error(error):
            raise  # run_main says so, and what was kept
        where = error.filename or output
        raise UsageError(f'cannot write {where}: {error.strerror or error}; '
                         f'{describe_kept(output, progress)}') from None
    stage(f'wrote {output} (fingerprint {metadata["fingerprint"]})', now)
    print(f'[convert] done in {time.perf_counter() - start:.1f} s', file=sys.stderr)


def describe_kept(output, progress):
    """What a run that stops early leaves in `output`, for its last line."""
    if progress and progress.get('committed'):
        return f'the new cache in {output} is complete'
    if progress and progress.get('had_cache'):
        return f'the previous cache in {output} is unchanged'
    return f'nothing was written to {output}'


def main(argv=None):
    args = parse_args(argv)
    progress = {'had_cache': os.path.isfile(os.path.join(args.output, METADATA_FILE)),
                'committed': False}
    run_main('convert.py', convert, args, progress,
             kept=lambda: describe_kept(args.output, progress))


if __name__ == '__main__':
    handle_signals_late('convert.py')  # a signal after the work, too, is one line
    main()
