"""The NCF paper's own pre-split files (He et al., 2017; its repository's Data/ directory), read
as they are: `convert.py --path PREFIX --format paper` caches the paper's split and test
negatives exactly, so that HR@10 and NDCG@10 on them are the paper's protocol.

    PREFIX.train.rating    user<TAB>item<TAB>rating<TAB>timestamp, the training interactions
    PREFIX.test.rating     the same, one line per user: the test positive
    PREFIX.test.negative   (user,item)<TAB>negative<TAB>negative...: each test positive's
                           negatives (99 in the paper's files)

Ids are the files' own (0-based, kept as they are): users 0..n-1, each with one test rating and
at least one training rating; the catalogue is the paper's (its Dataset.py sizes it from the
training file): items 0..m-1, m one more than the largest training item. A test item or a
negative must be in it, and each user's negatives must be distinct items other than their test
item and the items they rated in training. No re-split, no re-draw (convert.py's
--validation_holdout only cuts each user's latest training rating out: hold_out_latest).
Anything else is a one-line
UsageError naming the file and, where it is on one, the line (1-based, as an editor numbers it)
and its user; the checks are vectorised (Pinterest's files have 55,187 users). No torch here:
numpy and pyarrow read the files.
"""
import os
import re

from ncflib.cli import UsageError, arrow_reason, excerpt

SUFFIXES = ('.train.rating', '.test.rating', '.test.negative')
RATING_FIELDS = 4  # user, item, rating, timestamp
# The catalogue is as large as the largest item id: item_ids.csv lists each of its items and a
# model holds an embedding row for each. An id beyond int32's range is a mistake, not an item.
MAX_ITEMS = 2 ** 31 - 1
# A field as Arrow reads an int64: blanks around it trimmed, 0x... as hexadecimal.
INTEGER = re.compile(rb' *(?P<number>-?(?P<hex>0x)?[0-9a-fA-F]+) *')
# The (user,item) that starts a negatives line; 18 digits always fit an int64.
PAIR = r'^\s*\(\s*(?P<user>-?[0-9]{1,18})\s*,\s*(?P<item>-?[0-9]{1,18})\s*\)\s*$'


def prefix_of(path):
    """The PREFIX of the paper's files that `path` names (the prefix itself or one of the three
    files), or None when it names none of them."""
    for suffix in SUFFIXES:
        if path.endswith(suffix):
            return path[:-len(suffix)]
    return path if os.path.exists(path + SUFFIXES[0]) else None


def paths(prefix):
    """The three files, each checked to be there and readable."""
    files = [prefix + suffix for suffix in SUFFIXES]
    for path in files:
        if not os.path.exists(path):
            raise UsageError(f'{path} does not exist: the paper\'s split is three files, '
                             f'{", ".join(os.path.basename(f) for f in files)}')
        if not os.path.isfile(path):
            raise UsageError(f'{path} is not a regular file (a directory, a FIFO or a device)')
        if not os.access(path, os.R_OK):
            raise UsageError(f'cannot read {path}: permission denied')
        if os.path.getsize(path) == 0:
            raise UsageError(f'{path} is empty')
    return files


def read(prefix):
    """The paper's split as convert.py's `split` returns one (user-ordered numpy arrays, ids
    kept), and the test negatives, an int64 numpy array [n_users, negatives per user]."""
    import numpy as np
    import pyarrow as pa

    train_path, test_path, negative_path = paths(prefix)
    train_user, train_item, _, train_time = _read(train_path, RATING_FIELDS)
    test_user, test_item, _, _ = _read(test_path, RATING_FIELDS)
    test_rows = _one_row_per_user(test_path, test_user)
    n_users = len(test_rows)
    n_items = _catalogue(train_path, train_user, train_item, test_path, n_users)
    _check_test_ratings(test_path, test_user, test_item, test_rows, train_path, train_user,
                        n_items)
    test_item = test_item[test_rows]  # by user

    negative_user, negative_item, negatives = _read_negatives(negative_path)
    negative_rows = _one_row_per_user(negative_path, negative_user, test_path, n_users)
    wrong = np.nonzero(negative_item != test_item[negative_user])[0]
    if len(wrong):
        row, user = wrong[0], int(negative_user[wrong[0]])
        raise _line_error(negative_path, row, f'the line of user {user} is for item '
                          f'{negative_item[row]}, but the test rating of user {user} in '
                          f'{os.path.basename(test_path)} is item {test_item[user]}')
    negatives = negatives[negative_rows]
    _check_negatives(negative_path, negatives, negative_rows, test_item, train_user, train_item,
                     n_items, train_path)

    order = np.lexsort((train_time, train_user))  # by user, then time (stable)
    ids = [pa.array(np.arange(count)) for count in (n_users, n_items)]
    split = dict(train_users=train_user[order], train_items=train_item[order],
                 test_users=test_user[test_rows], test_items=test_item, n_users=n_users,
                 n_items=n_items, user_values=ids[0], item_values=ids[1], duplicates=0,
                 dropped_users=0)
    return split, negatives


def hold_out_latest(split, prefix):
    """Cut each user's latest training rating (by timestamp; ties: the later line of the file)
    out of `split`'s training ratings (read's, in place) as their validation positive, as Rendle
    et al. did; an earlier rating of that same item goes with it (the pair is the validation
    positive). A user who rated a single item in training keeps their ratings, without a
    validation positive. Returns the users with one and their validation items."""
    import numpy as np

    users, items = split['train_users'], split['train_items']  # by user, then time
    last = np.empty(len(users), dtype=bool)
    last[:-1] = users[1:] != users[:-1]
    last[-1] = True
    latest = np.empty(split['n_users'], dtype=np.int64)  # every user has a training rating
    latest[users[last]] = items[last]
    held_out = items == latest[users]
    validated = np.bincount(users[~held_out], minlength=split['n_users']) > 0
    if not validated.any():
        raise UsageError(f'--validation_holdout: no user of {prefix}{SUFFIXES[0]} rated 2 items '
                         'in training (a validation and a training one): there is nothing to '
                         'validate on')
    held_out &= validated[users]
    split['train_users'], split['train_items'] = users[~held_out], items[~held_out]
    validated_users = np.nonzero(validated)[0]
    return validated_users, latest[validated_users]


# Reading --------------------------------------------------------------------------------------

def _read(path, fields, text_fields=0):
    """The `fields` tab-separated columns of `path`, in file order: integers as numpy arrays,
    but for the first `text_fields` ones (text, as Arrow arrays). Arrow skips empty lines: a
    row's line is found again (_line_number) where one is reported."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    names = [f'c{index}' for index in range(fields)]
    types = {name: pa.string() if index < text_fields else pa.int64()
             for index, name in enumerate(names)}
    try:
        # no quoting: a quote in these files is a fault, not a field that spans lines
        table = pacsv.read_csv(path, pacsv.ReadOptions(column_names=names),
                               pacsv.ParseOptions(delimiter='\t', quote_char=False),
                               pacsv.ConvertOptions(column_types=types, null_values=[]))
    except pa.ArrowInvalid as error:
        raise (_malformed_line(path, fields, text_fields) or
               UsageError(f'{path} is not one of the NCF paper\'s files: '
                          f'{arrow_reason(error)}')) from None
    if table.num_rows == 0:
        raise UsageError(f'{path} holds only empty lines')
    return [column.combine_chunks() if index < text_fields else column.to_numpy()
            for index, column in enumerate(table.columns)]


def _read_negatives(path):
    """The user and item of each line's (user,item), and its negatives [lines, count], in file
    order."""
    import numpy as np
    import pyarrow.compute as pc

    number, line = next(_lines(path), (None, None))
    if line is None:
        raise UsageError(f'{path} holds only empty lines')
    fields = len(line.split(b'\t'))
    if fields < 2:
        raise UsageError(f'{path}, line {number}: {_no_tab(line)}')
    columns = _read(path, fields, text_fields=1)
    pairs = pc.extract_regex(columns[0], PAIR)
    unmatched = np.nonzero(~pc.is_valid(pairs).to_numpy(zero_copy_only=False))[0]
    if len(unmatched):
        row = unmatched[0]
        raise _line_error(path, row, f'does not start with (user,item): '
                          f'{excerpt(columns[0][row].as_py())}')
    user, item = (pc.cast(pairs.field(name), 'int64').to_numpy() for name in ('user', 'item'))
    return user, item, np.stack(columns[1:], axis=1)


def _lines(path):
    """(number, bytes) of each line of `path` that is not empty, the lines as Arrow's reader
    splits them: for error messages, and the first line."""
    # Latin-1 decodes any byte, and back; universal newlines end lines at \n, \r\n or \r.
    with open(path, encoding='latin-1', newline=None) as file:
        for number, line in enumerate(file, 1):
            if line != '\n':
                yield number, line.rstrip('\n').encode('latin-1')


def _line_number(path, row):
    """The number of the line of `path` that holds Arrow's row `row` (0-based)."""
    return next(number for index, (number, _) in enumerate(_lines(path)) if index == row)


def _line_error(path, row, message):
    return UsageError(f'{path}, line {_line_number(path, row)}: {message}')


def _no_tab(line):
    return f'no tab in the line (the NCF paper\'s files are tab-separated): {excerpt(line)}'


def _malformed_line(path, fields, text_fields):
    """The first line of `path` that is not `fields` tab-separated fields, integers but for the
    first `text_fields`, as a UsageError naming it; None when there is none."""
    for number, line in _lines(path):
        values = line.split(b'\t')
        if len(values) == 1:
            return UsageError(f'{path}, line {number}: {_no_tab(line)}')
        if len(values) != fields:
            return UsageError(f'{path}, line {number} has {len(values)} tab-separated fields, '
                              f'not {fields}: {excerpt(line)}')
        for index in range(text_fields, fields):
            if not _is_int64(values[index]):
                return UsageError(f'{path}, line {number}: field {index + 1} is not an '
                                  f'integer: {excerpt(values[index])}')
    return None


def _is_int64(field):
    """Whether Arrow reads the bytes `field` as an int64."""
    match = INTEGER.fullmatch(field)
    try:
        value = int(match['number'], 16 if match['hex'] else 10) if match else None
    except ValueError:  # hexadecimal digits without 0x
        return False
    return value is not None and -2 ** 63 <= value < 2 ** 63


# Checking ------------------------------------------------------------------------------------

def _one_row_per_user(path, users, users_of=None, n_users=None):
    """The row of each user 0..n-1 in `users` (a file's user column), checked to hold each of
    them once; n is that of the file `users_of` (n_users), or else one more than the largest
    user in `users`."""
    import numpy as np

    if users_of is None:
        negative = np.nonzero(users < 0)[0]
        if len(negative):
            raise _line_error(path, negative[0], f'user {users[negative[0]]} is out of range: '
                              'users must be 0..n-1')
        n_users = int(users.max()) + 1
    else:
        _check_users(path, users, users_of, n_users)
    order = np.argsort(users, kind='stable')
    ordered = users[order]
    repeats = order[1:][ordered[1:] == ordered[:-1]]
    if len(repeats):
        row = repeats.min()
        first = order[np.searchsorted(ordered, users[row])]
        raise _line_error(path, row, f'user {users[row]} again (first on line '
                          f'{_line_number(path, first)}): one line per user')
    missing = np.nonzero(ordered != np.arange(len(ordered)))[0]
    if len(missing) or len(ordered) < n_users:
        user = missing[0] if len(missing) else len(ordered)
        raise UsageError(f'{path} lacks user {user}: users must be 0..{n_users - 1}, each on '
                         'one line')
    return order


def _check_users(path, users, users_of, n_users):
    """Every user of `path` is one of the users 0..n_users-1 of the file `users_of`."""
    import numpy as np

    outside = np.nonzero((users < 0) | (users >= n_users))[0]
    if len(outside):
        raise _line_error(path, outside[0], f'user {users[outside[0]]} is out of range: the '
                          f'users of {os.path.basename(users_of)} are 0..{n_users - 1}')


def _catalogue(train_path, train_user, train_item, test_path, n_users):
    """The number of items: one more than the largest training item, as the paper's Dataset.py
    counts them; the training users checked to be those of the test ratings."""
    import numpy as np

    _check_users(train_path, train_user, test_path, n_users)
    bad_item = np.nonzero((train_item < 0) | (train_item >= MAX_ITEMS))[0]
    if len(bad_item):
        row = bad_item[0]
        raise _line_error(train_path, row, f'user {train_user[row]}: item {train_item[row]} is '
                          f'outside 0..{MAX_ITEMS - 1}, the ids a catalogue can have')
    return int(train_item.max()) + 1


def _check_test_ratings(test_path, test_user, test_item, test_rows, train_path, train_user,
                        n_items):
    """Every test user has a training rating, and a test item in the catalogue."""
    import numpy as np

    untrained = np.nonzero(np.bincount(train_user, minlength=len(test_rows)) == 0)[0]
    if len(untrained):
        user = untrained[0]
        raise _line_error(test_path, test_rows[user], f'user {user} has no rating in '
                          f'{os.path.basename(train_path)}: every user needs training ratings')
    outside = np.nonzero((test_item < 0) | (test_item >= n_items))[0]
    if len(outside):
        row = outside[0]
        raise _line_error(test_path, row, f'user {test_user[row]}: test item {test_item[row]} is '
                          f'{_outside_catalogue(n_items, train_path)}')


def _outside_catalogue(n_items, train_path):
    return (f'outside the catalogue, items 0..{n_items - 1} (up to the largest item of '
            f'{os.path.basename(train_path)}, as the NCF paper sizes it)')


def _check_negatives(path, negatives, rows, test_item, train_user, train_item, n_items,
                     train_path):
    """Each user's negatives (negatives[user], on Arrow's row rows[user] of `path`): fewer than
    the catalogue's other items, in it, and distinct items that are neither the user's test item
    nor one they rated in training."""
    import numpy as np

    count = negatives.shape[1]
    if count > n_items - 1:
        raise _line_error(path, rows[0], f'user 0 has {count} negatives, but the catalogue has '
                          f'only {n_items - 1} items besides a test item (items 0..'
                          f'{n_items - 1}, up to the largest of {os.path.basename(train_path)})')
    # Sorted, a user's repeats are side by side, and the keys below ascend, which makes
    # searchsorted fast.
    ordered = np.sort(negatives, axis=1)

    def refuse(bad, what):
        """Refuse the first user for whom `bad` [users, count] holds, saying `what`."""
        users, columns = np.nonzero(bad)
        if len(users):
            user = users[0]
            raise _line_error(path, rows[user], f'user {user}: negative '
                              f'{ordered[user, columns[0]]} {what}')

    refuse((ordered < 0) | (ordered >= n_items), f'is {_outside_catalogue(n_items, train_path)}')
    refuse(ordered == test_item[:, None], 'is their test item')
    trained = np.sort(train_user * n_items + train_item)
    keys = np.arange(len(ordered))[:, None] * n_items + ordered
    found = np.minimum(np.searchsorted(trained, keys), len(trained) - 1)
    refuse(trained[found] == keys, f'is an item they rated in {os.path.basename(train_path)}')
    repeated = np.zeros(ordered.shape, dtype=bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    refuse(repeated, 'is listed twice')
