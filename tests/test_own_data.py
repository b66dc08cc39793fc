"""convert.py on one's own interaction files: the readers (--columns, --separator, --no_header,
Parquet), text ids kept as written (through recommend), file order as time order, the filters
(rating threshold, repeated pairs, k-core) and the ratio and time splits, their record in
metadata.json and the fingerprint, and each bad input in one line with nothing written."""
import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import convert
import dataloading
import ncf
from conftest import fails, snapshot
from ncflib.cache import (ITEM_IDS_FILE, METADATA_FILE, TEST_FILE, TEST_NEGATIVES_FILE,
                          TRAIN_FILE, USER_IDS_FILE)

# (user, item, rating, timestamp), in file order. Text ids, one that looks like a number ('007':
# text here, as the other items are) and one with non-ASCII letters.
ROWS = [('alice', 'sku-9', 4.0, 30), ('bob', 'hat', 5.0, 12), ('alice', '007', 2.0, 10),
        ('carol', 'sku-9', 1.0, 5), ('bob', 'sku-10', 3.0, 40), ('alice', 'ünï', 5.0, 20),
        ('carol', 'hat', 4.5, 7), ('bob', 'sku-9', 2.5, 1), ('carol', '007', 3.5, 50),
        ('alice', 'hat', 1.0, 45)]


def write(path, text):
    path.write_text(text, encoding='utf-8')
    return str(path)


def run(source, output, *extra, negatives=1):
    """convert.main into `output` with small-data defaults; returns `output`."""
    convert.main(['--path', str(source), '--output', str(output), '--valid_negative',
                  str(negatives), *extra])
    return output


def ids(cache, name):
    with open(cache / name, newline='', encoding='utf-8') as file:
        return [row[0] for row in csv.reader(file)][1:]


def tensors(cache):
    return [torch.load(cache / name, weights_only=True).tolist()
            for name in (TRAIN_FILE, TEST_FILE, TEST_NEGATIVES_FILE)]


def metadata(cache):
    return json.loads((cache / METADATA_FILE).read_text())


def parts(cache):
    """(train, validation, test) of a cache as sets of (user id, item id) as written, checking
    that no part holds a pair twice."""
    dataset = dataloading.load_dataset(str(cache), 'cpu', log=lambda *args: None)
    users, items = ids(cache, USER_IDS_FILE), ids(cache, ITEM_IDS_FILE)
    result = []
    none = (torch.zeros(0, dtype=torch.int64),) * 2
    valid = dataset.positives('validation') if dataset.has_validation else none
    for pair in ((dataset.train_users, dataset.train_items), valid, dataset.positives('test')):
        listed = [(users[u], items[i]) for u, i in zip(pair[0].tolist(), pair[1].tolist())]
        assert len(listed) == len(set(listed))
        result.append(set(listed))
    return result


@pytest.mark.parametrize('extra', [[], ['--rating_threshold', '2']],
                         ids=['leave_one_out', 'rating_threshold'])
def test_every_reader_gives_the_same_cache_and_ids_as_written(tmp_path, extra):
    """A CSV with its own header names, order and an extra column, a headerless TSV read by
    position, a '::' file, a ';' file named by --separator and Parquet: one cache, and the id
    maps hold the ids as the file writes them."""
    table = pa.table({'who': [r[0] for r in ROWS], 'what': [r[1] for r in ROWS],
                      'stars': [r[2] for r in ROWS], 'when': [r[3] for r in ROWS]})
    pq.write_table(table, tmp_path / 'data.parquet')
    named = ['--columns', 'user=who', 'item=what', 'rating=stars', 'timestamp=when']
    by_position = ['--no_header', '--columns', 'user=0', 'item=1', 'rating=2', 'timestamp=3']
    sources = {
        'csv': (write(tmp_path / 'data.csv', 'when,extra,what,who,stars\n' + ''.join(
            f'{t},x,{i},{u},{r}\n' for u, i, r, t in ROWS)), named),
        'tsv': (write(tmp_path / 'data.tsv', ''.join(
            f'{u}\t{i}\t{r}\t{t}\n' for u, i, r, t in ROWS)), by_position),
        'dat': (write(tmp_path / 'data.dat', ''.join(
            f'{u}::{i}::{r}::{t}\n' for u, i, r, t in ROWS)), by_position),
        'semicolon': (write(tmp_path / 'data.txt', 'who;what;stars;when\n' + ''.join(
            f'{u};{i};{r};{t}\n' for u, i, r, t in ROWS)), named + ['--separator', 'semicolon']),
        'parquet': (str(tmp_path / 'data.parquet'), named),
    }
    caches = {name: tensors(run(path, tmp_path / name, '--min_ratings', '2', *flags, *extra))
              for name, (path, flags) in sources.items()}
    assert all(cache == caches['csv'] for cache in caches.values()), caches
    for name in sources:
        assert ids(tmp_path / name, USER_IDS_FILE) == ['alice', 'bob', 'carol']
        assert ids(tmp_path / name, ITEM_IDS_FILE) == ['sku-9', 'hat', '007', 'sku-10', 'ünï']
    train, test, _ = caches['csv']
    if not extra:  # each user's latest: alice hat@45, bob sku-10@40, carol 007@50
        assert test == [[0, 1], [1, 3], [2, 2]]
        assert sorted(train) == [[0, 0], [0, 2], [0, 4], [1, 0], [1, 1], [2, 0], [2, 1]]
    else:  # rated under 2: alice's hat, carol's sku-9; alice's latest is now sku-9@30
        assert test == [[0, 0], [1, 3], [2, 2]]
        assert sorted(train) == [[0, 2], [0, 4], [1, 0], [1, 1], [2, 1]]
        assert metadata(tmp_path / 'parquet')['filters']['below_rating_threshold'] == 2


def test_text_ids_round_trip_through_recommend(tmp_path):
    """A model trained on a cache of text ids recommends in those ids: the CSV names 'alice'
    and exactly her items outside training, as the file writes them."""
    source = write(tmp_path / 'data.csv', 'who,what,when\n' + ''.join(
        f'{u},{i},{t}\n' for u, i, _, t in ROWS))
    cache = run(source, tmp_path / 'cache', '--columns', 'user=who', 'item=what',
                'timestamp=when', '--min_ratings', '2')
    checkpoints, output = tmp_path / 'checkpoints', tmp_path / 'recs.csv'
    ncf.main(['--data', str(cache), '-e', '1', '-b', '8', '-k', '1', '--checkpoint_dir',
              str(checkpoints), '--log_path', str(tmp_path / 'log.json'), '--valid_negative',
              '1', '-f', '8', '--layers', '16', '8', '--device', 'cpu'])
    ncf.main(['--data', str(cache), '--mode', 'recommend', '--checkpoint_dir', str(checkpoints),
              '--users', 'alice', '--output', str(output), '-k', '3'])
    with open(output, newline='', encoding='utf-8') as file:
        rows = list(csv.reader(file))
    assert rows[0] == ['user_id', 'rank', 'item_id', 'score']
    # alice trains on 007@10, ünï@20, sku-9@30 (hat@45 is her test): the rest is hat, sku-10
    assert [row[0] for row in rows[1:]] == ['alice', 'alice']
    assert {row[2] for row in rows[1:]} == {'hat', 'sku-10'}


def test_zero_padded_ids_are_kept_as_written(tmp_path):
    """Ids that look like integers but are written with leading zeros ('007', '0100') stay as
    written, in a text file as in Parquet."""
    text = 'u,i,t\n007,0100,1\n007,0200,2\n008,0100,3\n008,0300,4\n'
    cache = run(write(tmp_path / 'data.csv', text), tmp_path / 'cache', '--columns', 'user=u',
                'item=i', 'timestamp=t', '--min_ratings', '2')
    assert ids(cache, USER_IDS_FILE) == ['007', '008']
    assert ids(cache, ITEM_IDS_FILE) == ['0100', '0200', '0300']


NO_TIME = 'user,item\nu1,c\nu2,a\nu1,a\nu2,c\nu1,b\nu3,b\nu2,d\nu3,a\n'


@pytest.mark.parametrize('extra', [
    [], ['--k_core', '1'], ['--split', 'ratio', '--ratios', '0.7', '0.3', '--ratio_order', 'time']],
    ids=['leave_one_out', 'own_leave_one_out', 'ratio_time'])
def test_without_a_timestamp_the_file_order_is_the_time_order(tmp_path, extra):
    """No timestamp column: each user's test positive is their last row in the file."""
    cache = run(write(tmp_path / 'data.csv', NO_TIME), tmp_path / 'cache', '--columns',
                'user=user', 'item=item', '--min_ratings', '2', *extra)
    train, _, test = parts(cache)
    assert test == {('u1', 'b'), ('u2', 'd'), ('u3', 'a')}
    assert train == {('u1', 'c'), ('u1', 'a'), ('u2', 'a'), ('u2', 'c'), ('u3', 'b')}


def test_rating_threshold_then_the_latest_copy_of_a_pair(tmp_path):
    """Rows rated under the threshold go first (counted), then each pair keeps its latest copy
    (counted): with --ratio_order time, a pair repeated late lands in the test part."""
    text = 'u,i,r,t\n' + ''.join(f'{u},{i},{r},{t}\n' for u, i, r, t in [
        ('u1', 'a', 5, 1), ('u1', 'b', 4, 2), ('u1', 'c', 1, 3), ('u1', 'd', 4, 4),
        ('u1', 'a', 4, 9),      # a again, latest of u1: a is tested, not trained
        ('u2', 'b', 4, 5), ('u2', 'a', 5, 1), ('u2', 'c', 2, 8),
        ('u2', 'd', 5, 2), ('u2', 'b', 1, 9),      # b again, but under the threshold: dropped
        ('u2', 'e', 2.9, 3)])
    cache = run(write(tmp_path / 'data.csv', text), tmp_path / 'cache', '--columns', 'user=u',
                'item=i', 'rating=r', 'timestamp=t', '--rating_threshold', '3', '--min_ratings',
                '1', '--split', 'ratio', '--ratios', '0.5', '0.5', '--ratio_order', 'time')
    train, _, test = parts(cache)
    assert train | test == {('u1', 'a'), ('u1', 'b'), ('u1', 'd'), ('u2', 'a'), ('u2', 'b'),
                            ('u2', 'd')}
    assert test == {('u1', 'a'), ('u1', 'd'), ('u2', 'b'), ('u2', 'd')}
    filters = metadata(cache)['filters']
    assert filters['below_rating_threshold'] == 4 and filters['repeated_pairs'] == 1
    assert filters['rating_threshold'] == 3 and filters['k_core_rounds'] == []


def test_k_core_repeats_to_a_fixed_point(tmp_path):
    """--k_core 2: e and g go, then u4 (left with f), then f (left with u5), then u5 (left with
    a): four rounds, and every survivor has 2 interactions or more."""
    rows = [('u1', 'a'), ('u1', 'b'), ('u2', 'a'), ('u2', 'b'), ('u4', 'e'), ('u4', 'f'),
            ('u5', 'f'), ('u5', 'g'), ('u5', 'a'), ('u6', 'c'), ('u6', 'h'), ('u7', 'h'),
            ('u7', 'c')]
    text = 'user,item,time\n' + ''.join(f'{u},{i},{t}\n' for t, (u, i) in enumerate(rows))
    cache = run(write(tmp_path / 'data.csv', text), tmp_path / 'cache', '--columns',
                'user=user', 'item=item', 'timestamp=time', '--k_core', '2', '--min_ratings', '2')
    assert ids(cache, USER_IDS_FILE) == ['u1', 'u2', 'u6', 'u7']
    assert ids(cache, ITEM_IDS_FILE) == ['a', 'b', 'c', 'h']
    train, _, test = parts(cache)
    kept = train | test
    for user in ('u1', 'u2', 'u6', 'u7'):
        assert sum(u == user for u, _ in kept) >= 2
    for item in ('a', 'b', 'c', 'h'):
        assert sum(i == item for _, i in kept) >= 2
    assert kept == {('u1', 'a'), ('u1', 'b'), ('u2', 'a'), ('u2', 'b'), ('u6', 'c'),
                    ('u6', 'h'), ('u7', 'c'), ('u7', 'h')}
    filters = metadata(cache)['filters']
    assert filters['k_core_rounds'] == [{'users': 0, 'items': 2, 'rows': 2},
                                        {'users': 1, 'items': 0, 'rows': 1},
                                        {'users': 0, 'items': 1, 'rows': 1},
                                        {'users': 1, 'items': 0, 'rows': 1}]
    assert (filters['user_minimum'], filters['item_minimum']) == (2, 2)


def random_file(path, seed=0, users=30, items=40, late_user=False):
    """A shuffled user,item,timestamp CSV of integer ids (users 500.., items 100..), some pairs
    repeated at another time; returns {(user id, item id): latest timestamp}."""
    rng = np.random.default_rng(seed)
    rows = [(str(500 + u), str(100 + i), int(rng.integers(0, 1000))) for u in range(users)
            for i in rng.choice(items, int(rng.integers(4, 16)), replace=False)]
    rows += [(u, i, int(rng.integers(0, 1000))) for u, i, _ in
             (rows[k] for k in rng.choice(len(rows), 15, replace=False))]
    if late_user:  # every interaction at 900 or later: nothing to train on before a cutoff
        rows += [('late', str(100 + i), 900 + i) for i in range(5)]
        rows += [(user, '199', when) for user, when in (('500', 400), ('501', 600),
                                                        ('502', 700))]  # at the cutoffs
    rows = [rows[k] for k in rng.permutation(len(rows))]
    write(path, 'user,item,timestamp\n' + ''.join(f'{u},{i},{t}\n' for u, i, t in rows))
    latest = {}
    for u, i, t in rows:
        latest[u, i] = max(t, latest.get((u, i), t))
    return latest


COLUMNS = ['--columns', 'user=user', 'item=item', 'timestamp=timestamp', '--min_ratings', '1']
RATIO = ['--split', 'ratio', '--ratios', '0.7', '0.15', '0.15']


@pytest.mark.parametrize('order', ['random', 'time'])
def test_ratio_split_rules(tmp_path, order):
    """Train, validation and test partition each user's distinct interactions; each held-out
    part is the user's n x ratio, rounded; no test pair is trained; in time order every
    held-out pair is later than every trained one; the seed fixes a random split."""
    latest = random_file(tmp_path / 'data.csv')
    flags = [*COLUMNS, *RATIO, '--ratio_order', order]
    cache = run(tmp_path / 'data.csv', tmp_path / 'a', *flags, negatives=5)
    train, valid, test = parts(cache)
    assert train | valid | test == set(latest)
    assert len(train) + len(valid) + len(test) == len(latest)
    assert not train & test and not train & valid and not valid & test
    for user in {u for u, _ in latest}:
        n = sum(u == user for u, _ in latest)
        for part in (valid, test):
            assert abs(sum(u == user for u, _ in part) - n * 0.15) <= 0.5 + 1e-9
        assert any(u == user for u, _ in train)
        if order == 'time':
            trained = [t for (u, i), t in latest.items() if u == user and (u, i) in train]
            held = [t for (u, i), t in latest.items() if u == user and (u, i) in valid | test]
            tested = [t for (u, i), t in latest.items() if u == user and (u, i) in test]
            validated = [t for (u, i), t in latest.items() if u == user and (u, i) in valid]
            assert min(held, default=1e9) >= max(trained)
            assert min(tested, default=1e9) >= max(validated, default=-1)
    assert tensors(run(tmp_path / 'data.csv', tmp_path / 'b', *flags, negatives=5)) \
        == tensors(cache)
    other = run(tmp_path / 'data.csv', tmp_path / 'c', *flags, '--seed', '2', negatives=5)
    if order == 'random':
        assert parts(other)[2] != test
    else:  # the seed only draws the negatives
        assert parts(other) == [train, valid, test]
    assert metadata(cache)['split'] == 'ratio'


def test_popularity_test_negatives_through_conversion_and_load(tmp_path):
    """convert.py --test_negative_sampling popularity: test negatives outside each user's
    training and validation pairs, validation ones outside the training pairs, -1 rows for a
    user without a positive; recorded, and drawn the same way again at load time for another
    --valid_negative."""
    random_file(tmp_path / 'data.csv')
    cache = run(tmp_path / 'data.csv', tmp_path / 'cache', *COLUMNS, *RATIO,
                '--test_negative_sampling', 'popularity', negatives=6)
    assert metadata(cache)['test_negative_sampling'] == 'popularity'
    for count in (None, 9):
        dataset = dataloading.load_dataset(str(cache), 'cpu', valid_negative=count,
                                           log=lambda *args: None)
        trained = set(zip(dataset.train_users.tolist(), dataset.train_items.tolist()))
        validated = set(zip(*(part.tolist() for part in dataset.positives('validation'))))
        popular = set(dataset.train_items.tolist())
        for negatives, known, split in ((dataset.test_negatives, trained | validated, 'test'),
                                        (dataset.valid_negatives, trained, 'validation')):
            held = set(dataset.positives(split)[0].tolist())
            assert negatives.shape[1] == (count or 6)
            for user, row in enumerate(negatives.tolist()):
                if user not in held:
                    assert row == [-1] * len(row)
                    continue
                assert all((user, item) not in known and item in popular for item in row)


@pytest.mark.parametrize('cutoffs', [['600'], ['400', '700']])
def test_time_split_rules(tmp_path, cutoffs):
    """Train before the first cutoff, validation between two, test from the last on; users
    without a training row (all of theirs late) are dropped, and counted."""
    latest = random_file(tmp_path / 'data.csv', late_user=True)
    cache = run(tmp_path / 'data.csv', tmp_path / 'cache', *COLUMNS, '--split', 'time',
                '--time_cutoff', *cutoffs, negatives=5)
    first, last = float(cutoffs[0]), float(cutoffs[-1])
    trained_users = {u for (u, _), t in latest.items() if t < first}
    assert 'late' not in trained_users and 'late' not in ids(cache, USER_IDS_FILE)
    train, valid, test = parts(cache)
    kept = {pair: t for pair, t in latest.items() if pair[0] in trained_users}
    assert train == {pair for pair, t in kept.items() if t < first}
    assert valid == {pair for pair, t in kept.items() if first <= t < last}
    assert test == {pair for pair, t in kept.items() if t >= last}
    assert {u for u, _ in test} <= {u for u, _ in train} and test and train
    assert {('500', '199'), ('501', '199'), ('502', '199')} <= train | valid | test
    assert bool(valid) == (len(cutoffs) == 2)
    data = metadata(cache)
    assert data['filters']['rows_of_users_without_training'] == sum(
        u not in trained_users for u, _ in latest)
    assert data['split'] == 'time'
    assert data['split_parameters'] == {'cutoffs': [float(c) for c in cutoffs]}


def test_split_parameters_are_recorded_and_in_the_fingerprint(tmp_path):
    """metadata.json records the split's parameters; other ratios give another fingerprint,
    even where the tensors come out the same, and the same ones the same fingerprint."""
    random_file(tmp_path / 'data.csv')
    fingerprints = {}
    for name, ratios in (('a', ['0.8', '0.1', '0.1']), ('b', ['0.8', '0.1', '0.1']),
                         ('c', ['0.7', '0.15', '0.15'])):
        cache = run(tmp_path / 'data.csv', tmp_path / name, *COLUMNS, '--split', 'ratio',
                    '--ratios', *ratios, negatives=5)
        fingerprints[name] = metadata(cache)['fingerprint']
        assert dataloading.load_dataset(str(cache), 'cpu').fingerprint == fingerprints[name]
    assert metadata(tmp_path / 'a')['split_parameters'] == {
        'ratios': [0.8, 0.1, 0.1], 'order': 'random', 'seed': 1, 'order_of_rows': 'timestamp'}
    assert fingerprints['a'] == fingerprints['b'] != fingerprints['c']
    # two interactions each: 0.5 0.5 and 0.6 0.4 both test one, the latest
    two_each = write(tmp_path / 'two.csv', 'user,item,timestamp\nu,a,1\nu,b,2\nv,a,3\nv,b,1\n'
                                                  'w,c,5\nw,d,6\n')
    same = [metadata(run(two_each, tmp_path / f'two{k}', *COLUMNS, '--split', 'ratio',
                         '--ratio_order', 'time', '--ratios', *ratios))
            for k, ratios in enumerate((['0.5', '0.5'], ['0.6', '0.4']))]
    assert same[0]['tensors'] == same[1]['tensors']
    assert same[0]['fingerprint'] != same[1]['fingerprint']


SMALL_FILE = ('user,item,rating,timestamp\nu1,a,4,10\nu1,b,3,20\nu2,c,5,30\nu2,d,2,40\n'
              'u3,e,1,50\n')
BAD = {  # case: (file contents, flags, what the line says)
    'unknown column': (SMALL_FILE, ['--columns', 'user=user', 'item=product'],
                       'lacks the column(s) product'),
    'position beyond the columns': (SMALL_FILE, ['--no_header', '--columns', 'user=0',
                                                 'item=7'], 'no column 7'),
    'ratio leaves nothing to train on': (
        SMALL_FILE, ['--split', 'ratio', '--ratios', '0.5', '0.5'],
        'leaves user u3 (1 interactions) nothing to train on'),
    'time cutoff after the data': (SMALL_FILE, ['--split', 'time', '--time_cutoff', '51'],
                                   'outside the time range'),
    'time cutoff before the data': (SMALL_FILE, ['--split', 'time', '--time_cutoff', '10'],
                                    'outside the time range'),
    'empty after filtering': (SMALL_FILE, ['--k_core', '3'], 'nothing of'),
    'threshold above every rating': (SMALL_FILE, ['--rating_threshold', '6'],
                                     'has a rating of at least 6 (the highest is 5)'),
    'an id written two ways': ('user,item,rating,timestamp\nx,a,1,1\n7,b,1,2\n007,c,1,3\n',
                               [], 'writes the id 7 in several ways'),
    'an integer id written two ways': ('user,item,rating,timestamp\n7,a,1,1\n007,b,1,2\n'
                                       '8,a,1,3\n', [], 'writes the id 7 in several ways'),
    'validation holdout with ratio': (SMALL_FILE, ['--split', 'ratio', '--validation_holdout'],
                                      '--validation_holdout is for --split leave_one_out'),
    'validation holdout with time': (SMALL_FILE, ['--split', 'time', '--time_cutoff', '25',
                                                  '--validation_holdout'],
                                     '--validation_holdout is for --split leave_one_out'),
    'ratios not summing to 1': (SMALL_FILE, ['--split', 'ratio', '--ratios', '0.5', '0.3',
                                             '0.1'], 'summing to 1'),
    'time cutoff without time split': (SMALL_FILE, ['--time_cutoff', '25'],
                                       '--time_cutoff is for --split time'),
    'min_ratings 0': (SMALL_FILE, ['--split', 'ratio', '--min_ratings', '0'], 'at least 1'),
}


@pytest.mark.parametrize('case', BAD)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    """Each bad input: exit status 1, one line naming it; no new directory, and a cache already
    there is left byte for byte as it was."""
    text, extra, fragment = BAD[case]
    source = write(tmp_path / 'data.csv', text)
    columns = [] if '--columns' in extra else ['--columns', 'user=user', 'item=item',
                                               'rating=rating', 'timestamp=timestamp']
    if '--no_header' in extra:
        source = write(tmp_path / 'data.csv', text.split('\n', 1)[1])
    argv = ['--path', source, '--valid_negative', '1', *columns, *extra]
    argv += [] if '--min_ratings' in extra else ['--min_ratings', '1' if '--split' in extra
                                                 else '2']
    fails(convert.main, argv + ['--output', str(tmp_path / 'new')], capsys, fragment)
    assert not (tmp_path / 'new').exists()
    good = write(tmp_path / 'good.csv', SMALL_FILE)
    old = run(good, tmp_path / 'old', '--min_ratings', '2', '--columns', 'user=user',
              'item=item', 'timestamp=timestamp')
    capsys.readouterr()
    before = snapshot(old)
    fails(convert.main, argv + ['--output', str(old)], capsys, fragment)
    assert snapshot(old) == before
