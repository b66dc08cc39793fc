"""Anyone's interaction file, for convert.py: reading a delimited or Parquet file through a
mapping of its columns to user, item, rating and timestamp; the filters, in their order (a
rating threshold, a user-item pair's repeats kept once, k-core); and the splits beside the
reference's leave-one-out: a per-user ratio split (random or in time order) and a global time
cutoff. Vectorised numpy over Arrow columns; torch only where its sort is the faster one.
"""
import re

from ncflib.cli import DISK_FULL, UsageError, arrow_reason, excerpt

BOM = '\ufeff'  # a UTF-8 byte order mark, as some editors write at the start of a CSV
ROLES = ('user', 'item', 'rating', 'timestamp')
PARQUET_SUFFIXES = ('.parquet', '.pq')
SEPARATORS = {'comma': ',', 'tab': '\t', 'semicolon': ';', 'pipe': '|', 'space': ' ',
              'colons': '::'}
SPLITS = ('leave_one_out', 'ratio', 'time')
RATIO_ORDERS = ('random', 'time')
INTEGER = re.compile(r'^[+-]?[0-9]+$')
CANONICAL_INTEGER = re.compile(r'^(0|-?[1-9][0-9]{0,17})$')  # as int64 writes it back


def header_line(path):
    """The first line of `path`, decoded, without a byte order mark or surrounding blanks."""
    try:
        with open(path, 'rb') as file:
            line = file.readline(1 << 16)
    except OSError as error:
        raise UsageError(f'cannot read {path}: {error.strerror or error}') from None
    return line.decode('utf-8', errors='replace').removeprefix(BOM).strip()


def header_names(header, delimiter):
    """Column names of a header line, without blanks or quotes around them."""
    return [name.strip().strip('"').strip() for name in header.split(delimiter)]


def parse_column_mapping(entries):
    """{'user': column, ...} from ROLE=COLUMN entries (convert.py --columns); user and item are
    required, rating and timestamp optional."""
    mapping = {}
    for entry in entries:
        role, equals, column = entry.partition('=')
        role, column = role.strip(), column.strip()
        if not equals or role not in ROLES or not column:
            raise UsageError(f'--columns {entry!r}: expected ROLE=COLUMN with ROLE one of '
                             f'{", ".join(ROLES)}')
        if role in mapping:
            raise UsageError(f'--columns names the {role} column twice')
        mapping[role] = column
    missing = [role for role in ('user', 'item') if role not in mapping]
    if missing:
        raise UsageError(f'--columns lacks {" and ".join(missing)}=COLUMN')
    if len(set(mapping.values())) != len(mapping):
        raise UsageError('--columns maps one column to two roles')
    return dict(sorted(mapping.items(), key=lambda entry: ROLES.index(entry[0])))


def is_parquet(path):
    return path.lower().endswith(PARQUET_SUFFIXES)


def delimiter_of(path, separator):
    """The field delimiter of a text file: --separator's (a name of SEPARATORS or the text),
    else from the name: tab for .tsv, '::' for .dat, else a comma."""
    if separator:
        return SEPARATORS.get(separator, separator)
    lower = path.lower()
    return '\t' if lower.endswith(('.tsv', '.tab')) else '::' if lower.endswith('.dat') else ','


def text_spec(path, mapping, delimiter, header):
    """How read_text reads a delimited file whose columns `mapping` names ({role: header name,
    or 0-based position without a header})."""
    if len(delimiter) != 1 and delimiter != '::':
        raise UsageError(f'--separator {delimiter!r}: one character, or ::')
    if header:
        return dict(delimiter=delimiter, header=True, roles=mapping)
    first = header_line(path)
    fields = len(first.split(delimiter)) if first else 0
    for column in mapping.values():
        if not column.isdigit():
            raise UsageError(f'--columns {column!r}: without a header, name columns by their '
                             '0-based position')
        if int(column) >= fields:
            raise UsageError(f'{path} has {fields} column(s) in its first line, so no column '
                             f'{column} (0-based)'
                             + (f'; is the separator {delimiter!r}?' if fields == 1 else ''))
    names = [f'column {index}' for index in range(fields)]
    return dict(delimiter=delimiter, header=False, names=names,
                roles={role: names[int(column)] for role, column in mapping.items()})


def read_text(path, spec, label):
    """Return {role: Arrow array} in file order, for the roles of `spec` ({'delimiter',
    'header', 'names' without a header, 'roles': {role: column name}}): ids as int64 where
    every one is an integer, else as trimmed text; ratings as float64; timestamps as int64,
    float64 or (date-times) seconds. label: what the file is read as, for messages."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    delimiter, roles = spec['delimiter'], spec['roles']
    # Arrow's reader takes a one-character delimiter: '::' is read as ':', with an empty column
    # between any two fields (so an id holding a colon cannot be read there).
    gapped = delimiter == '::'
    read_options = pacsv.ReadOptions(block_size=1 << 24)
    if not spec['header']:
        names = list(spec['names'])
    else:
        # The header as read here (no byte order mark, blanks and quotes around names removed:
        # 'user_id, item_id' names user_id and item_id), not as Arrow would read it.
        header = header_line(path)
        names = header_names(header, delimiter)
        missing = [column for column in roles.values() if column not in names]
        if missing:
            raise UsageError(f'{path} ({label}) lacks the column(s) {", ".join(missing)} '
                             f'in its header: {excerpt(header)}')
        if len(set(names)) != len(names):
            raise UsageError(f'{path} ({label}) names a column twice in its header: '
                             f'{excerpt(header)}')
        read_options.skip_rows = 1
    read_options.column_names = [part for index, name in enumerate(names) for part in (
        (name, f'gap {index}') if gapped else (name,))][:2 * len(names) - 1 if gapped else None]
    columns = list(roles.values())
    # Explicit types read fastest and leanest (inference holds twice the memory); a column that
    # does not parse as such is read again: timestamps as floats, then as date-times. Ids are
    # read as text (integers where every one is written as an integer is: '007' stays '007'),
    # but for MovieLens (`integer_ids`), whose ids are integers.
    fallbacks = {role: ([pa.int64()] if spec.get('integer_ids') else []) + [pa.string()]
                 if role in ('user', 'item') else
                 [pa.float64()] if role == 'rating' else
                 [pa.int64(), pa.float64(), pa.timestamp('s')] for role in roles}
    reasons = {}  # each role's first conversion error: it names the value that is no number
    while True:
        types = {roles[role]: kinds[0] for role, kinds in fallbacks.items()}
        convert_options = pacsv.ConvertOptions(include_columns=columns, column_types=types)
        try:
            table = pacsv.read_csv(path, read_options, pacsv.ParseOptions(delimiter=delimiter[0]),
                                   convert_options)
            break
        except pa.ArrowInvalid as error:
            message = arrow_reason(error)
            failed = [role for role, column in roles.items() if 'conversion error' in message
                      and f'column #{names.index(column) * (2 if gapped else 1)}:' in message]
            if not failed:
                raise UsageError(f'cannot read {path} as {label}: {message}') from None
            role = failed[0]
            reasons.setdefault(role, message)
            fallbacks[role].pop(0)
            if not fallbacks[role]:
                raise UsageError(f'non-numeric {role} in {path}: {reasons[role]}') from None
        except OSError as error:
            if error.errno in DISK_FULL:
                raise
            raise UsageError(f'cannot read {path}: {error.strerror or error}') from None
    return checked_columns(path, table, roles)


def read_parquet(path, mapping):
    """As read_text, for a Parquet file: {role: Arrow array} of the columns `mapping` names."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        unknown = [column for column in mapping.values() if column not in names]
        if unknown:
            raise UsageError(f'{path} has no column {", ".join(map(repr, unknown))}: its columns '
                             f'are {excerpt(", ".join(names), 200)}')
        table = pq.read_table(path, columns=list(mapping.values()))
    except OSError as error:
        if getattr(error, 'errno', None) in DISK_FULL:
            raise
        raise UsageError(f'cannot read {path} as Parquet: {arrow_reason(error)}') from None
    except UsageError:
        raise
    except Exception as error:  # pyarrow's ArrowInvalid for a file that is not Parquet
        raise UsageError(f'cannot read {path} as Parquet: {arrow_reason(error)}') from None
    return checked_columns(path, table, mapping)


def checked_columns(path, table, roles):
    """{role: array} of a read table: every value present, text ids trimmed and not mixed with
    numbers, other types as read_text gives them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        raise UsageError(f'{path} holds no interactions')
    columns = {}
    for role, column in zip(roles, table.columns):  # chunked as read: no copy into one
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        where = f'{path}, column {roles[role]!r} ({role})'
        missing = column.null_count
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            # 'u1, a' holds the ids u1 and a, not ' a'
            column = pc.utf8_trim_whitespace(column.cast(pa.string()))
            # a blank id is no id, as a blank number is (Arrow reads '' as a string, not null)
            missing += pc.sum(pc.equal(column, '')).as_py() or 0
        if missing:
            raise UsageError(f'{path} has {missing} rows without a {role}')
        if role in ('user', 'item'):
            column = checked_ids(where, column)
        elif pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
            column = column.cast(pa.timestamp('s')).cast(pa.int64())
        elif pa.types.is_integer(column.type) and role == 'timestamp':
            column = column.cast(pa.int64())
        elif pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            column = column.cast(pa.float64())
            if not pc.all(pc.is_finite(column)).as_py():
                raise UsageError(f'{where} holds a value that is not finite')
        else:
            raise UsageError(f'{where} holds {column.type} values, not numbers')
        columns[role] = column
    return columns


def checked_ids(where, column):
    """An id column as int64, where every id is an integer written as int64 writes it back, or
    as text, kept as written ('007', 'u7'). Text that writes one integer two ways ('7' and
    '007') is refused: whether those are one id or two is the file's to say."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(column.type):
        return column.cast(pa.int64())
    if not pa.types.is_string(column.type):
        raise UsageError(f'{where} holds {column.type} ids: ids are integers or text')
    distinct = pc.unique(column)
    if pc.all(pc.match_substring_regex(distinct, CANONICAL_INTEGER.pattern)).as_py():
        return column.cast(pa.int64())
    numeric = pc.filter(distinct, pc.match_substring_regex(distinct, INTEGER.pattern))
    if len(numeric):
        try:
            values = pc.cast(numeric, pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return column  # integers beyond int64: text, as written
        if len(pc.unique(values)) < len(values):
            counts = pc.value_counts(values)
            twice = pc.filter(counts, pc.greater(counts.field('counts'), 1))[0]['values']
            spellings = pc.filter(numeric, pc.equal(values, twice)).to_pylist()
            raise UsageError(f'{where} writes the id {twice.as_py()} in several ways '
                             f'({", ".join(map(repr, spellings[:3]))}): one id or several? '
                             'write each id one way')
    return column


def factorize(column):
    """int32 codes 0..n-1 in order of first appearance, and the original values in that order."""
    import pyarrow.compute as pc

    values = pc.unique(column)  # Arrow keeps first-appearance order
    return pc.index_in(column, values).to_numpy(), values


def user_time_order(user, timestamps, n_users):
    """The row order by (user, timestamp), stable (ties keep file order): one sort of one
    int64 key."""
    import numpy as np
    import torch

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
    return torch.sort(torch.from_numpy(key), stable=True).indices.numpy()


def keep_latest_copy(user, item, n_items):
    """Which rows (in (user, time) order) to keep so that each user-item pair is kept once, its
    latest copy: a bool mask."""
    import numpy as np
    import torch

    pairs = user.astype(np.int64) * n_items
    pairs += item
    sorted_pairs, by_pair = torch.sort(torch.from_numpy(pairs), stable=True)
    del pairs
    earlier = torch.zeros(len(user), dtype=torch.bool)  # a later copy of the pair follows
    earlier[by_pair[:-1]] = sorted_pairs[:-1] == sorted_pairs[1:]
    return ~earlier.numpy()


def k_core(user, item, n_users, n_items, user_minimum, item_minimum):
    """Rows kept when users with fewer than `user_minimum` rows and items with fewer than
    `item_minimum` are dropped, again and again until none is left (a fixed point): (mask,
    rounds), rounds a list of {'users', 'items', 'rows'} removed in each round."""
    import numpy as np

    kept = np.ones(len(user), dtype=bool)
    rounds = []
    while True:
        user_counts = np.bincount(user[kept], minlength=n_users)
        item_counts = np.bincount(item[kept], minlength=n_items)
        short_users = (user_counts > 0) & (user_counts < user_minimum)
        short_items = (item_counts > 0) & (item_counts < item_minimum)
        if not short_users.any() and not short_items.any():
            return kept, rounds
        dropped = kept & (short_users[user] | short_items[item])
        rounds.append({'users': int(short_users.sum()), 'items': int(short_items.sum()),
                       'rows': int(dropped.sum())})
        kept &= ~dropped


def compact(codes, kept_rows, values):
    """Codes renumbered 0..m-1 over the rows kept (in the old codes' order, so that first
    appearance stays the order), and the values of those that remain."""
    import numpy as np
    import pyarrow as pa

    present = np.zeros(len(values), dtype=bool)
    present[codes[kept_rows]] = True
    renumber = np.cumsum(present, dtype=np.int64) - 1
    return renumber[codes[kept_rows]].astype(np.int32), values.filter(pa.array(present))


def filtered(path, columns, rating_threshold, user_minimum, item_minimum):
    """The filters, in their order: ratings below `rating_threshold` dropped (None: none);
    each user-item pair kept once, its latest copy; users with fewer than `user_minimum` rows
    and items with fewer than `item_minimum` dropped until none is left. Returns a dict: user,
    item and time (numpy, rows in (user, time) order), their values (Arrow: the original ids in
    first-appearance order), n_users, n_items and what each filter removed. Without a
    timestamp column, the file's order is the time order."""
    import numpy as np
    import pyarrow.compute as pc

    rows = len(columns['user'])
    removed = {'source_rows': rows}
    if rating_threshold is not None:
        rating = columns.pop('rating')
        keep = pc.greater_equal(rating, rating_threshold)
        kept = pc.sum(keep).as_py() or 0
        if not kept:
            raise UsageError(f'no interaction of {path} has a rating of at least '
                             f'{rating_threshold:g} (the highest is '
                             f'{pc.max(rating).as_py():g}): lower --rating_threshold')
        removed['below_rating_threshold'] = rows - kept
        columns = {role: column.filter(keep) for role, column in columns.items()}
    columns.pop('rating', None)
    user, user_values = factorize(columns.pop('user'))
    item, item_values = factorize(columns.pop('item'))
    time = columns.pop('timestamp').to_numpy() if 'timestamp' in columns else \
        np.arange(len(user), dtype=np.int64)
    order = user_time_order(user, time, len(user_values))
    user, item, time = user[order], item[order], time[order]
    del order
    latest = keep_latest_copy(user, item, len(item_values))
    removed['repeated_pairs'] = int((~latest).sum())
    user, item, time = user[latest], item[latest], time[latest]
    kept, rounds = k_core(user, item, len(user_values), len(item_values), user_minimum,
                          item_minimum)
    removed['k_core_rounds'] = rounds
    if not kept.any():
        raise UsageError(f'nothing of {path} is left once users with under {user_minimum} '
                         f'interactions and items with under {item_minimum} are dropped: lower '
                         '--k_core or --min_ratings')
    user, user_values = compact(user, kept, user_values)
    item, item_values = compact(item, kept, item_values)
    return dict(user=user, item=item, time=time[kept], user_values=user_values,
                item_values=item_values, n_users=len(user_values), n_items=len(item_values),
                removed=removed)


def user_starts(user):
    """Where each user's rows start, for rows grouped by user (user 0 first)."""
    import numpy as np

    return np.flatnonzero(np.r_[True, user[1:] != user[:-1]])


def leave_one_out_parts(user, validation_holdout):
    """Each row's part (0 train, 1 validation, 2 test): each user's latest row is the test
    positive and, with `validation_holdout`, the one before it the validation positive where
    the user has 3 rows or more."""
    import numpy as np

    parts = np.zeros(len(user), dtype=np.int8)
    last = np.r_[user[1:] != user[:-1], True]
    parts[last] = 2
    if validation_holdout:
        parts[validation_rows(user, last)] = 1
    return parts


def validation_rows(user, last):
    """Which rows hold a validation positive: each user's latest training row (the one before
    their test row, `last`), for users with 3 rows or more (a training row stays). `user`: the
    distinct rows' users, in (user, time) order."""
    import numpy as np

    valid = np.zeros(len(user), dtype=bool)
    same_user = user[1:] == user[:-1]  # row k + 1 is of row k's user
    valid[1:-1] = last[2:] & same_user[1:] & same_user[:-1]
    return valid


def ratio_parts(user, ratios, order, seed):
    """Each row's part (0 train, 1 validation, 2 test), rows grouped by user in time order: of a
    user's n rows, round(n x test ratio) are test and round(n x validation ratio) validation
    (half rounds up), the latest ones (order 'time': validation before test), or drawn at
    random (order 'random', stratified per user, from `seed`); the rest trains. ratios:
    (train, validation, test). Also returns each user's training count."""
    import numpy as np

    n_rows = len(user)
    starts = user_starts(user)
    counts = np.diff(np.r_[starts, n_rows])
    n_test = np.floor(counts * ratios[2] + 0.5).astype(np.int64)
    n_valid = np.floor(counts * ratios[1] + 0.5).astype(np.int64)
    n_train = counts - n_test - n_valid
    row_user = np.repeat(np.arange(len(starts)), counts)
    position = np.arange(n_rows) - starts[row_user]
    if order == 'random':  # each row's rank within its user, at random
        rng = np.random.default_rng(seed % 2 ** 64)
        shuffled = np.lexsort((rng.random(n_rows), row_user))
        position[shuffled] = np.arange(n_rows) - starts[row_user[shuffled]]
    parts = np.zeros(n_rows, dtype=np.int8)
    parts[position >= n_train[row_user]] = 1
    parts[position >= (n_train + n_valid)[row_user]] = 2
    return parts, n_train


def time_parts(time, cutoffs):
    """Each row's part by global cutoffs: before the first, train; from the last on, test;
    between two cutoffs, validation."""
    import numpy as np

    parts = np.zeros(len(time), dtype=np.int8)
    parts[time >= cutoffs[0]] = 1 if len(cutoffs) == 2 else 2
    if len(cutoffs) == 2:
        parts[time >= cutoffs[1]] = 2
    return parts


def parse_time(text):
    """A --time_cutoff: a number (the timestamp column's unit) or an ISO date(-time), UTC, as
    seconds."""
    import datetime

    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f'--time_cutoff {text!r} is neither a number nor an ISO date') from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()
