"""MovieLens-shaped synthetic ratings with planted structure, for offline runs and benchmarks.

Every user belongs to one of `groups` latent taste groups and so does every item. A user's
interactions come from the items of their own group with probability `affinity`, otherwise
from the whole catalogue, and in both cases in proportion to a Zipf-like item popularity.
A popularity ranking therefore recovers only part of the signal, while a model that learns
user and item embeddings (NeuMF) can also learn the group structure.

Deterministic for a seed; vectorised, so ML-20m's shape (20M rows) takes seconds.

    python synthetic.py --output data/synthetic/ratings.csv               # small default
    python synthetic.py --output ratings.csv --layout ml-20m \\
        --users 138493 --items 26744 --rows 20000000                        # ML-20m's shape
"""
import os
import sys

from ncflib.cache import ML_20M_ITEMS, ML_20M_USERS
from ncflib.cli import (ArgumentParser, UsageError, check_output_file, handle_signals_late,
                        import_held, run_main)
from ncflib.files import atomic_write

# Defaults: small enough that the Quick start trains on it in about a minute on a CPU.
DEFAULT_USERS = 3000
DEFAULT_ITEMS = 1500
DEFAULT_ROWS = 180_000
DEFAULT_GROUPS = 16
DEFAULT_AFFINITY = 0.75
STRUCTURED_REDRAWS = 3
UNIFORM_REDRAWS = 50
MIN_ROWS_PER_USER = 20  # as MovieLens: every user has rated at least 20 movies
FIRST_TIMESTAMP = 789_652_009  # ML-20m's first and last rating times (1995-01-09, 2015-03-31)
LAST_TIMESTAMP = 1_427_784_002

# MovieLens shapes (users, items, rows) that the benchmarks generate: ML-1m's and ML-20m's
# after the reference's split, ML-32m's from GroupLens's description (200,948 users, 87,585
# movies, 32,000,204 ratings).
SHAPES = {
    'ml-1m': (6_040, 3_706, 1_000_000),
    'ml-20m': (ML_20M_USERS, ML_20M_ITEMS, 20_000_000),
    'ml-32m': (200_948, 87_585, 32_000_000),
}

# The CSV layouts convert.py reads: ML-20m's header, or the generic one.
LAYOUTS = {
    'ml-20m': ('userId', 'movieId', 'rating', 'timestamp'),
    'generic': ('user_id', 'item_id', 'timestamp'),
}


def generate(users=DEFAULT_USERS, items=DEFAULT_ITEMS, rows=DEFAULT_ROWS, groups=DEFAULT_GROUPS,
             affinity=DEFAULT_AFFINITY, seed=1):
    """Return (user, item, rating, timestamp) arrays of `rows` interactions, 1-based ids.

    Every user has at least MIN_ROWS_PER_USER rows, every item appears at least once and,
    as in MovieLens, no (user, item) pair repeats (a user with more rows than there are items
    cannot have that, so no user gets more than half the catalogue). Rows come grouped by user,
    as in the MovieLens files.
    """
    import numpy as np  # here, not at the top: a bad --output is reported at once

    if users < 1 or items < 1 or groups < 1:
        raise ValueError('users, items and groups must be positive')
    if rows < max(users * MIN_ROWS_PER_USER, items):
        raise ValueError(f'rows must be at least {MIN_ROWS_PER_USER} per user and one per item '
                         f'({max(users * MIN_ROWS_PER_USER, items)} here)')
    if rows > users * max(items // 2, MIN_ROWS_PER_USER) or items < 2 * MIN_ROWS_PER_USER:
        raise ValueError(f'{users} users cannot have {rows} distinct interactions with {items} '
                         f'items: at most half the catalogue each, and at least '
                         f'{2 * MIN_ROWS_PER_USER} items')
    if not 0.0 <= affinity <= 1.0:
        raise ValueError('affinity must be in [0, 1]')
    rng = np.random.default_rng(seed)

    # Activity is heavy-tailed across users, as in MovieLens.
    activity = rng.lognormal(0.0, 1.0, users)
    per_user = MIN_ROWS_PER_USER + rng.multinomial(rows - users * MIN_ROWS_PER_USER,
                                                   activity / activity.sum())
    cap = max(items // 2, MIN_ROWS_PER_USER)
    while (excess := int(np.maximum(per_user - cap, 0).sum())) > 0:
        per_user = np.minimum(per_user, cap)
        room = (cap - per_user) * activity
        per_user += rng.multinomial(excess, room / room.sum())
    row_user = np.repeat(np.arange(users, dtype=np.int64), per_user)

    user_group = rng.integers(0, groups, users)
    item_group = rng.integers(0, groups, items)
    popularity = 1.0 / (rng.permutation(items) + 10.0) ** 0.9

    # Draw from the whole catalogue by inverse CDF of the popularity.
    global_cdf = np.cumsum(popularity)
    global_cdf /= global_cdf[-1]

    # Draw from the user's group: items ordered by group, each group's CDF shifted to [g, g + 1],
    # so one search of (group + uniform) lands inside that group's segment.
    by_group = np.argsort(item_group, kind='stable')
    sorted_groups = item_group[by_group]
    weights = popularity[by_group]
    group_totals = np.bincount(sorted_groups, weights=weights, minlength=groups)
    within = np.cumsum(weights) - np.concatenate(([0.0], np.cumsum(group_totals)))[sorted_groups]
    group_cdf = sorted_groups + within / np.maximum(group_totals[sorted_groups], 1e-300)

    def draw(row_group):
        drawn_global = np.searchsorted(global_cdf, rng.random(len(row_group)), side='right')
        position = np.searchsorted(group_cdf, row_group + rng.random(len(row_group)), side='left')
        drawn_group = by_group[np.minimum(position, items - 1)]
        # A group without items sends its users to the whole catalogue.
        in_group = (rng.random(len(row_group)) < affinity) & (group_totals[row_group] > 0)
        return np.where(in_group, drawn_group, drawn_global)

    row_item = draw(user_group[row_user])
    # Every item appears at least once (its row stands at a random place and is never redrawn).
    protected = np.zeros(rows, dtype=bool)
    protected[rng.choice(rows, items, replace=False)] = True
    row_item[protected] = np.arange(items)

    # MovieLens has no repeated (user, item) pair: redraw repeats, from the same distribution at
    # first, then uniformly (heavy users may have exhausted their group), until none is left.
    for attempt in range(STRUCTURED_REDRAWS + UNIFORM_REDRAWS):
        repeats = np.flatnonzero(_repeated(row_user, row_item, items, protected))
        if len(repeats) == 0:
            break
        if attempt < STRUCTURED_REDRAWS:
            row_item[repeats] = draw(user_group[row_user[repeats]])
        else:
            row_item[repeats] = rng.integers(0, items, len(repeats))

    timestamp = rng.integers(FIRST_TIMESTAMP, LAST_TIMESTAMP + 1, rows)
    rating = rng.integers(1, 11, rows) / 2.0  # 0.5 .. 5.0 stars, unused by implicit feedback
    return row_user + 1, row_item + 1, rating, timestamp


def _repeated(user, item, items, protected):
    """Mask of the rows whose (user, item) pair another row has: all but one of each pair's
    rows, the one kept being a protected row where there is one."""
    import torch  # its stable sort is several times faster than numpy's on 20M keys

    # The lowest bit puts a pair's protected row first among its copies.
    keys = (user * items + item) * 2 + ~protected
    sorted_keys, order = torch.sort(torch.from_numpy(keys))
    sorted_keys //= 2
    repeated = torch.zeros(len(user), dtype=torch.bool)
    repeated[order[1:]] = sorted_keys[1:] == sorted_keys[:-1]
    return repeated.numpy()


def write_csv(path, columns, layout='generic'):
    """Write (user, item, rating, timestamp) as CSV in one of LAYOUTS, atomically."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    user, item, rating, timestamp = columns
    by_name = {'userId': user, 'user_id': user, 'movieId': item, 'item_id': item,
               'rating': rating, 'timestamp': timestamp}
    header = LAYOUTS[layout]
    table = pa.table({name: by_name[name] for name in header})

    def write(temporary):
        with open(temporary, 'wb') as sink:
            sink.write((','.join(header) + '\n').encode())
            pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False))
    atomic_write(path, write, make_parents=True)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--output', required=True, help='CSV file to write')
    parser.add_argument('--users', type=int, default=DEFAULT_USERS, help='number of users')
    parser.add_argument('--items', type=int, default=DEFAULT_ITEMS, help='number of items')
    parser.add_argument('--rows', type=int, default=DEFAULT_ROWS, help='number of interactions')
    parser.add_argument('--groups', type=int, default=DEFAULT_GROUPS, help='latent taste groups')
    parser.add_argument('--affinity', type=float, default=DEFAULT_AFFINITY,
                        help="probability that an interaction comes from the user's own group")
    parser.add_argument('--layout', choices=sorted(LAYOUTS), default='generic',
                        help='CSV header: generic user_id,item_id,timestamp or ML-20m ratings.csv')
    parser.add_argument('-s', '--seed', type=int, default=1, help='random seed')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    def run():
        check_output_file(args.output, '--output')
        import_held('numpy', 'torch', 'pyarrow.csv')
        try:
            columns = generate(args.users, args.items, args.rows, args.groups, args.affinity,
                               args.seed)
        except ValueError as error:
            raise UsageError(str(error)) from None
        write_csv(args.output, columns, args.layout)
        print(f'Wrote {args.rows:,} interactions of {args.users:,} users on {args.items:,} items '
              f'to {args.output}', file=sys.stderr)
    kept = (f'{args.output} is unchanged' if os.path.exists(args.output)
            else f'nothing was written to {args.output}')
    run_main('synthetic.py', run, kept=kept)


if __name__ == '__main__':
    handle_signals_late('synthetic.py')  # a signal after the work, too, is one line
    main()
