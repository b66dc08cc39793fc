"""Convert raw ratings (MovieLens or any user,item,timestamp CSV) into the tensors ncf.py reads.

    python convert.py --path RATINGS --output DIR [--valid_negative 100] [--seed 1]
                      [--min_ratings 20] [--format F] [--test_negative_sampling recipe|paper]
                      [--validation_holdout]
    python convert.py --path data/ml-1m --output DIR [--validation_holdout [--seed 1]]
                                                              # the NCF paper's own files

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

Vectorised throughout: an ML-20m-sized file takes seconds (see README, "Preprocessing speed").
"""
import contextlib
import csv
import hashlib
import io
import json
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
from ncflib.cli import (DISK_FULL, ArgumentParser, UsageError, arrow_reason,
                        check_writable_directory, deferred_signals, disk_full_error, excerpt,
                        handle_signals_late, import_held, run_main, same_file)
from ncflib.files import DirectoryLock, FileSet

# numpy, pyarrow and torch (and dataloading, which imports it) load where they are first needed:
# a bad input or output is reported at once, and Ctrl-C or SIGTERM find run_main's handlers in
# place almost from the start.

BOM = '\ufeff'  # a UTF-8 byte order mark, as some editors write at the start of a CSV
NEGATIVE_CHUNK_USERS = 16384
PAPER = 'paper'  # --format of the NCF paper's own files (ncflib/paper_files.py)

# Each format: how to read it, and which of its columns hold user, item and timestamp.
FORMATS = {
    'ml-20m': dict(delimiter=',', header=True, columns=('userId', 'movieId', 'timestamp')),
    'ml-1m': dict(delimiter=':', header=False,  # '::'-separated: every other column is empty
                  names=('user', 'gap1', 'item', 'gap2', 'rating', 'gap3', 'timestamp'),
                  columns=('user', 'item', 'timestamp')),
    'ml-100k': dict(delimiter='\t', header=False, names=('user', 'item', 'rating', 'timestamp'),
                    columns=('user', 'item', 'timestamp')),
    'csv': dict(delimiter=',', header=True, columns=('user_id', 'item_id', 'timestamp')),
}


def stage(message, since):
    """A timed progress line on stderr; returns the time, for the next stage."""
    now = time.perf_counter()
    print(f'[convert] {message} ({now - since:.2f} s)', file=sys.stderr, flush=True)
    return now


def header_line(path):
    """The first line of `path`, decoded, without a byte order mark or surrounding blanks."""
    try:
        with open(path, 'rb') as file:
            line = file.readline(1 << 16)
    except OSError as error:
        raise UsageError(f'cannot read {path}: {error.strerror or error}') from None
    return line.decode('utf-8', errors='replace').removeprefix(BOM).strip()


def detect_format(path):
    """Name the format of `path` from its first line (see FORMATS)."""
    first = header_line(path)
    if not first:
        raise UsageError(f'{path} has an empty first line: expected a header or a first rating')
    names = header_names(first, ',')
    if '::' in first:
        return 'ml-1m'
    if set(FORMATS['ml-20m']['columns']) <= set(names):
        return 'ml-20m'
    if set(FORMATS['csv']['columns']) <= set(names):
        return 'csv'
    fields = first.split('\t')
    if len(fields) == 4 and all(field.strip().lstrip('-').isdigit() for field in fields):
        return 'ml-100k'
    raise UsageError(f'cannot tell the format of {path} from its first line {excerpt(first)}: '
                     'expected ML-20m ratings.csv, ML-1m ratings.dat, ML-100k u.data or a CSV '
                     'whose header has user_id,item_id,timestamp (or name one with --format)')


def read_interactions(path, fmt):
    """Return {'user', 'item', 'timestamp'}: Arrow arrays, in file order."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    spec = FORMATS[fmt]
    read_options = pacsv.ReadOptions(block_size=1 << 24)
    if not spec['header']:
        read_options.column_names = list(spec['names'])
    else:
        # The header as read here (no byte order mark, blanks and quotes around names removed:
        # 'user_id, item_id' names user_id and item_id), not as Arrow would read it.
        header = header_line(path)
        names = header_names(header, spec['delimiter'])
        missing = [column for column in spec['columns'] if column not in names]
        if missing:
            raise UsageError(f'{path} ({fmt}) lacks the column(s) {", ".join(missing)} '
                             f'in its header: {excerpt(header)}')
        if len(set(names)) != len(names):
            raise UsageError(f'{path} ({fmt}) names a column twice in its header: '
                             f'{excerpt(header)}')
        read_options.column_names = names
        read_options.skip_rows = 1
    user_column, item_column, time_column = spec['columns']
    # Explicit types read fastest and leanest (inference holds twice the memory); a column that
    # does not parse as such is read again: ids as strings, timestamps as floats.
    column_types = {name: pa.int64() for name in spec['columns']}
    while True:
        convert_options = pacsv.ConvertOptions(include_columns=list(spec['columns']),
                                               column_types=column_types)
        try:
            table = pacsv.read_csv(path, read_options,
                                   pacsv.ParseOptions(delimiter=spec['delimiter']),
                                   convert_options)
            break
        except pa.ArrowInvalid as error:
            message = arrow_reason(error)
            failed = [name for name in spec['columns'] if 'conversion error' in message
                      and f'column #{_csv_column_index(path, spec, name)}:' in message]
            if failed == [time_column] and column_types[time_column] == pa.int64():
                column_types[time_column] = pa.float64()
            elif failed == [time_column]:
                raise UsageError(f'non-numeric timestamp in {path}: {message}') from None
            elif failed and column_types[failed[0]] == pa.int64():
                column_types[failed[0]] = pa.string()
            else:
                raise UsageError(f'cannot read {path} as {fmt}: {message}') from None
        except OSError as error:
            if error.errno in DISK_FULL:
                raise
            raise UsageError(f'cannot read {path}: {error.strerror or error}') from None
    if table.num_rows == 0:
        raise UsageError(f'{path} holds no interactions')
    columns = dict(zip(('user', 'item', 'timestamp'), table.columns))
    for name, column in columns.items():
        missing = column.null_count
        if pa.types.is_string(column.type):  # 'u1, a' holds the ids u1 and a, not ' a'
            columns[name] = column = pc.utf8_trim_whitespace(column)
            # a blank id is no id, as a blank number is (Arrow reads '' as a string, not null)
            missing += pc.sum(pc.equal(column, '')).as_py() or 0
        if missing:
            raise UsageError(f'{path} has {missing} rows without a {name}')
    return columns


def _csv_column_index(path, spec, name):
    """Index of column `name` in the file, as Arrow's error messages count columns."""
    if not spec['header']:
        return spec['names'].index(name)
    return header_names(header_line(path), spec['delimiter']).index(name)


def header_names(header, delimiter):
    """Column names of a header line, without blanks or quotes around them."""
    return [name.strip().strip('"').strip() for name in header.split(delimiter)]


def factorize(column):
    """int32 codes 0..n-1 in order of first appearance, and the original values in that order."""
    import pyarrow.compute as pc

    values = pc.unique(column)  # Arrow keeps first-appearance order
    return pc.index_in(column, values).to_numpy(), values


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

    user, user_values = factorize(columns.pop('user'))
    counts = np.bincount(user)
    kept_users = counts >= min_ratings
    if not kept_users.any():
        raise UsageError(f'no user has at least {min_ratings} interactions '
                         f'(the most any user has is {counts.max()}); lower --min_ratings')
    items, timestamps = columns.pop('item'), columns.pop('timestamp').to_numpy()
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

    # Order by (user, timestamp), stable so that ties keep file order: one sort of one key.
    if np.issubdtype(timestamps.dtype, np.integer):
        first = timestamps.min()
        span = int(timestamps.max()) - int(first) + 1
    if not np.issubdtype(timestamps.dtype, np.integer) or n_users * span >= 2 ** 62:
        # Float or far-spread timestamps: their dense rank orders them the same way.
        distinct, timestamps = np.unique(timestamps, return_inverse=True)
        first, span = 0, len(distinct)
    key = user.astype(np.int64)
    key *= span
    key += timestamps
    key -= first
    del timestamps
    order = torch.sort(torch.from_numpy(key), stable=True).indices.numpy()
    del key
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


def validation_rows(user, last):
    """Which rows hold a validation positive: each user's latest training row (the one before
    their test row, `last`), for users with 3 rows or more (a training row stays). `user`: the
    distinct rows' users, in (user, time) order."""
    import numpy as np

    valid = np.zeros(len(user), dtype=bool)
    same_user = user[1:] == user[:-1]  # row k + 1 is of row k's user
    valid[1:-1] = last[2:] & same_user[1:] & same_user[:-1]
    return valid


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

    exclusion = ItemExclusion.from_sorted_keys(keys, result['n_users'], result['n_items'])
    user_values = result['user_values']
    return draw_test_negatives(exclusion, count, generator, sampling, NEGATIVE_CHUNK_USERS,
                               user_name=lambda user: shown_id(user_values[user].as_py()))


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
                                                  split_sha256(recorded))
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
                             'the user never interacted with')
    parser.add_argument('-s', '--seed', type=int, default=SEED,
                        help='seed for the test negatives (and, from another stream, the '
                             'validation negatives)')
    parser.add_argument('--validation_holdout', action='store_true',
                        help="hold out each user's latest training interaction as the validation "
                             'positive, with validation negatives drawn as the test negatives '
                             "are (the NCF paper's files: cut out of their training ratings)")
    args = parser.parse_args(argv)
    args.given = parser.given_flags(argv)
    return args


def check_arguments(args):
    """Everything that can be checked before reading the input; raises UsageError. Returns the
    PREFIX of the NCF paper's files where --path names them, else None."""
    prefix = paper_files.prefix_of(args.path) if args.format in (None, PAPER) else None
    if args.format == PAPER and prefix is None:
        raise UsageError(f'--path {args.path} names none of the NCF paper\'s files (PREFIX, or '
                         f'PREFIX{", PREFIX".join(paper_files.SUFFIXES)})')
    if prefix is not None:
        # their own split and negatives: the options that make ours do not apply
        for name in ('valid_negative', 'min_ratings', 'seed', 'test_negative_sampling'):
            if name in args.given and not (name == 'seed' and args.validation_holdout):
                raise UsageError(f'--{name} does not apply to the NCF paper\'s files: they hold '
                                 'their own split and test negatives'
                                 + (' (it seeds validation negatives, with --validation_holdout)'
                                    if name == 'seed' else ''))
        inputs = paper_files.paths(prefix)
    else:
        check_ratings_file(args)
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
    if args.min_ratings < 2:
        raise UsageError('--min_ratings must be at least 2 (one test and one training interaction)')


def convert(args, progress=None):
    start = time.perf_counter()
    prefix = check_arguments(args)
    if prefix is not None:
        return convert_paper_files(args, prefix, progress, start)
    fmt = args.format or detect_format(args.path)
    import_held('numpy', 'pyarrow.csv', 'pyarrow.compute', 'torch', 'dataloading')
    source_hash = FileHash(args.path)

    columns = read_interactions(args.path, fmt)
    rows = len(columns['user'])
    now = stage(f'read {rows:,} rows of {args.path} as {fmt}', start)
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
        'split': 'recipe',
        'test_negative_sampling': args.test_negative_sampling,
        'min_ratings': args.min_ratings,
        'seed': args.seed,
        'source_file': os.path.basename(args.path),
        'source_sha256': source_hash.hexdigest(),
        'source_format': fmt,
        'source_rows': rows,
        'dropped_users': result['dropped_users'],
        'dropped_repeats': result['duplicates'],
    }
    if args.validation_holdout:
        metadata['validation'] = validation_metadata(result, args.test_negative_sampling,
                                                     args.seed)
    write(args.output, result, cache_tensors(result, test_negatives, validation_negatives),
          metadata, progress, now, start)


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
        counts['n_valid'] = metadata['validation']['users']
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
