"""The NCF paper's own pre-split files (He et al., 2017; its repository's Data/ directory), read
as they are: `convert.py --path PREFIX --format paper` caches the paper's split and test
negatives exactly, so that HR@10 and NDCG@10 on them are the paper's protocol.

    PREFIX.train.rating    user<TAB>item<TAB>rating<TAB>timestamp, the training interactions
    PREFIX.test.rating     the same, one line per user: the test positive
    PREFIX.test.negative   (user,item)<TAB>negative<TAB>negative...: each test positive's
                           negatives (99 in the paper's files)

Ids are the files' own (0-based, kept as they are): users 0..n-1, each with one test rating;
items below one more than the largest item of the training and test ratings. No re-split, no
re-draw. Anything else (a user without a test rating, a negative line whose (user,item) is not
that user's test rating, lines of unequal length, an id out of range) is a one-line UsageError.
No torch here: numpy and pyarrow read the files.
"""
import os

from ncflib.cli import UsageError

SUFFIXES = ('.train.rating', '.test.rating', '.test.negative')


def prefix_of(path):
    """The PREFIX of the paper's files that `path` names (the prefix itself or one of the three
    files), or None when it names none of them."""
    for suffix in SUFFIXES:
        if path.endswith(suffix):
            return path[:-len(suffix)]
    return path if os.path.isfile(path + SUFFIXES[0]) else None


def paths(prefix):
    """The three files, each checked to be there."""
    files = [prefix + suffix for suffix in SUFFIXES]
    for path in files:
        if not os.path.isfile(path):
            raise UsageError(f'{path} does not exist: the paper\'s split is three files, '
                             f'{", ".join(os.path.basename(f) for f in files)}')
        if os.path.getsize(path) == 0:
            raise UsageError(f'{path} is empty')
    return files


def _read(path, columns, first_as_text=False):
    """The tab-separated integer columns of `path` as numpy arrays (the first as text, where
    first_as_text); UsageError naming the file where it does not parse."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    names = [f'c{index}' for index in range(columns)]
    types = {name: pa.int64() for name in names}
    if first_as_text:
        types['c0'] = pa.string()
    try:
        table = pacsv.read_csv(path, pacsv.ReadOptions(column_names=names),
                               pacsv.ParseOptions(delimiter='\t'),
                               pacsv.ConvertOptions(column_types=types))
    except pa.ArrowInvalid as error:
        raise UsageError(f'{path} is not one of the NCF paper\'s files: '
                         f'{str(error).splitlines()[0]}') from None
    for name, column in zip(names, table.columns):
        if column.null_count:
            raise UsageError(f'{path} has a line without field {names.index(name) + 1}')
    return [column.to_numpy() for column in table.columns]


def _fields(path):
    """How many tab-separated fields the first line of `path` has."""
    with open(path, 'rb') as file:
        return len(file.readline().rstrip(b'\r\n').split(b'\t'))


def read(prefix):
    """The paper's split as convert.py's `split` returns one (user-ordered numpy arrays, ids
    kept), and the test negatives, an int64 numpy array [n_users, negatives per user]."""
    import numpy as np
    import pyarrow as pa

    train_path, test_path, negative_path = paths(prefix)
    train_user, train_item, _, train_time = _read(train_path, 4)
    test_user, test_item, _, _ = _read(test_path, 4)
    n_users = len(test_user)
    order = np.argsort(test_user, kind='stable')
    test_user, test_item = test_user[order], test_item[order]
    if test_user[0] != 0 or test_user[-1] != n_users - 1 or (np.diff(test_user) != 1).any():
        missing = sorted(set(range(int(test_user.max()) + 1)) - set(test_user.tolist()))
        what = (f'lacks user {missing[0]}' if missing else 'has a user twice' if
                test_user.min() >= 0 else f'has user {test_user.min()}')
        raise UsageError(f'{test_path} {what}: users must be 0..n-1, each with one test rating')
    if len(train_user) and (train_user.min() < 0 or train_user.max() >= n_users):
        raise UsageError(f'{train_path} has user ids outside 0..{n_users - 1} (the users of '
                         f'{os.path.basename(test_path)}): {train_user.min()}..'
                         f'{train_user.max()}')
    items = np.concatenate((train_item, test_item))
    if items.min() < 0:
        raise UsageError(f'{train_path} or {test_path} has a negative item id ({items.min()})')
    n_items = int(items.max()) + 1

    fields = _fields(negative_path)
    if fields < 2:
        raise UsageError(f'{negative_path} lists no negatives after its (user,item)')
    columns = _read(negative_path, fields, first_as_text=True)
    pairs, negatives = columns[0], np.stack(columns[1:], axis=1)
    try:  # '(12,345)': the user and the test item of the line
        pair = np.array([text.strip('()').split(',') for text in pairs.tolist()], dtype=np.int64)
    except ValueError:
        raise UsageError(f'{negative_path}: a line does not start with (user,item)') from None
    if pair.ndim != 2 or pair.shape[1] != 2:
        raise UsageError(f'{negative_path}: a line does not start with (user,item)')
    if len(pair) != n_users or not np.array_equal(np.sort(pair[:, 0]), np.arange(n_users)):
        raise UsageError(f'{negative_path} has {len(pair)} lines for the {n_users} users of '
                         f'{os.path.basename(test_path)}: one line per user')
    order = np.argsort(pair[:, 0], kind='stable')
    pair, negatives = pair[order], negatives[order]
    wrong = np.nonzero(pair[:, 1] != test_item)[0]
    if len(wrong):
        user = int(wrong[0])
        raise UsageError(f'{negative_path}: the line of user {user} is for item '
                         f'{pair[user, 1]}, but the test rating of user {user} in '
                         f'{os.path.basename(test_path)} is item {test_item[user]}')
    if negatives.min() < 0 or negatives.max() >= n_items:
        raise UsageError(f'{negative_path} has item ids outside 0..{n_items - 1} (the items of '
                         f'the training and test ratings): {negatives.min()}..{negatives.max()}')

    order = np.lexsort((train_time, train_user))  # by user, then time (stable)
    ids = [pa.array(np.arange(count)) for count in (n_users, n_items)]
    split = dict(train_users=train_user[order], train_items=train_item[order],
                 test_users=test_user, test_items=test_item, n_users=n_users, n_items=n_items,
                 user_values=ids[0], item_values=ids[1], duplicates=0, dropped_users=0)
    return split, negatives.astype(np.int64)
