"""convert.py: the reference's split, the test negatives, the formats, the cache it writes (as a
whole, locked, durable), and every bad input and fault: one line, nothing half-written."""
import csv
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess

import pytest
import torch

import convert
import dataloading
import synthetic
from conftest import (HOLDING_PYTHON, PYTHON, ROOT, assert_one_line_error, fails, private_mounts,
                      read_only, run_script, snapshot, wait_for_handlers)
from ncflib import files
from ncflib.cache import (ITEM_IDS_FILE, METADATA_FILE, TEST_FILE, TEST_NEGATIVES_FILE,
                          TRAIN_FILE, USER_IDS_FILE, VALID_FILE, VALID_NEGATIVES_FILE,
                          read_metadata, tensor_sha256, validation_seed)

# Known answers. With --min_ratings 3, u3 (one row) goes; first appearance maps u2 -> 0, u1 -> 1,
# u4 -> 2 and b -> 0, a -> 1, c -> 2, d -> 3, f -> 4, e -> 5. u1 in time order: c@3, a@5, b@5 (a
# tie: file order), a@7 (a repeat of (u1, a): dropped, the earliest stays). So u1's latest is b;
# u2's is a@20, u4's f@3.
HAND_WRITTEN = """user_id,item_id,rating,timestamp
u2,b,4,10
u1,a,3,5
u1,b,5,5
u1,c,1,3
u3,a,2,1
u1,a,3,7
u2,a,5,20
u2,c,4,15
u4,d,1,1
u4,f,1,3
u4,e,1,2
"""
EXPECTED_TRAIN = [[0, 0], [0, 2], [1, 2], [1, 1], [2, 3], [2, 5]]
EXPECTED_TEST = [[0, 1], [1, 0], [2, 4]]


def write(path, text):
    with open(path, 'w') as file:
        file.write(text)
    return str(path)


def load(directory, name):
    return torch.load(os.path.join(directory, name), weights_only=True)


def read_ids(path):
    with open(path, newline='') as file:
        return [row[0] for row in csv.reader(file)]


def test_split_known_answers(tmp_path):
    source = write(tmp_path / 'ratings.csv', HAND_WRITTEN)
    output = tmp_path / 'cache'
    convert.main(['--path', source, '--output', str(output), '--min_ratings', '3',
                  '--valid_negative', '5'])
    assert load(output, TRAIN_FILE).tolist() == EXPECTED_TRAIN
    assert load(output, TEST_FILE).tolist() == EXPECTED_TEST
    negatives = load(output, TEST_NEGATIVES_FILE)
    assert negatives.shape == (3, 5)
    for user, row in enumerate(negatives.tolist()):
        training_items = {item for u, item in EXPECTED_TRAIN if u == user}
        assert not training_items & set(row) and all(0 <= item < 6 for item in row)
    for name in (TRAIN_FILE, TEST_FILE, TEST_NEGATIVES_FILE):
        assert load(output, name).dtype == torch.int64
    assert read_ids(output / USER_IDS_FILE) == ['user_id', 'u2', 'u1', 'u4']
    assert read_ids(output / ITEM_IDS_FILE) == ['item_id', 'b', 'a', 'c', 'd', 'f', 'e']
    metadata = json.loads((output / METADATA_FILE).read_text())
    assert metadata['n_users'] == 3 and metadata['n_items'] == 6
    assert metadata['n_train'] == 6 and metadata['n_test'] == 3
    assert metadata['dropped_users'] == 1 and metadata['dropped_repeats'] == 1
    assert metadata['source_file'] == 'ratings.csv' and len(metadata['source_sha256']) == 64
    assert (metadata['min_ratings'], metadata['valid_negative'], metadata['seed']) == (3, 5, 1)
    assert not [name for name in os.listdir(output) if name.endswith('.tmp')]


def test_all_four_formats_give_the_same_cache(tmp_path):
    rows = [(7, 30, 4.0, 100), (7, 10, 3.0, 90), (7, 20, 5.0, 95), (9, 10, 2.0, 50),
            (9, 40, 1.0, 60), (9, 30, 3.5, 55), (8, 20, 1.0, 1)]
    files = {
        'ratings.csv': 'userId,movieId,rating,timestamp\n'
                       + ''.join(f'{u},{i},{r},{t}\n' for u, i, r, t in rows),
        'ratings.dat': ''.join(f'{u}::{i}::{int(r)}::{t}\n' for u, i, r, t in rows),
        'u.data': ''.join(f'{u}\t{i}\t{int(r)}\t{t}\n' for u, i, r, t in rows),
        'mine.csv': 'timestamp,item_id,user_id,extra\n'
                    + ''.join(f'{t},{i},{u},x\n' for u, i, r, t in rows),
    }
    caches = []
    for name, text in files.items():
        output = tmp_path / name.replace('.', '_')
        convert.main(['--path', write(tmp_path / name, text), '--output', str(output),
                      '--min_ratings', '3', '--valid_negative', '4'])
        caches.append([load(output, f).tolist() for f in (TRAIN_FILE, TEST_FILE,
                                                           TEST_NEGATIVES_FILE)])
        assert read_ids(output / USER_IDS_FILE) == ['user_id', '7', '9']
    assert all(cache == caches[0] for cache in caches)
    assert caches[0][1] == [[0, 0], [1, 3]]  # latest: 7 -> 30 (item 0), 9 -> 40 (item 3)
    formats = [json.loads((tmp_path / n.replace('.', '_') / METADATA_FILE).read_text())
               ['source_format'] for n in files]
    assert formats == ['ml-20m', 'ml-1m', 'ml-100k', 'csv']


def test_test_negatives_avoid_training_items_and_follow_the_seed(tmp_path, ml100k):
    runs = {}
    for name, seed in (('a', 1), ('b', 1), ('c', 2)):
        convert.main(['--path', ml100k, '--output', str(tmp_path / name), '--seed', str(seed)])
        runs[name] = {f: (tmp_path / name / f).read_bytes() for f in (TRAIN_FILE, TEST_FILE,
                                                                     TEST_NEGATIVES_FILE)}
    assert runs['a'] == runs['b']
    assert runs['a'][TEST_NEGATIVES_FILE] != runs['c'][TEST_NEGATIVES_FILE]
    assert runs['a'][TRAIN_FILE] == runs['c'][TRAIN_FILE]

    train = load(tmp_path / 'a', TRAIN_FILE)
    negatives = load(tmp_path / 'a', TEST_NEGATIVES_FILE)
    n_items = 1682
    train_keys = set((train[:, 0] * n_items + train[:, 1]).tolist())
    users = torch.arange(len(negatives)).unsqueeze(1).expand_as(negatives)
    assert not train_keys & set((users * n_items + negatives).flatten().tolist())
    assert negatives.min() >= 0 and negatives.max() < n_items


def test_paper_test_negatives_are_distinct_and_never_an_interaction(tmp_path, capsys):
    """--test_negative_sampling paper: distinct items the user never interacted with (neither a
    training item nor the test positive), recorded in metadata.json, and drawn the same way
    when ncf.py draws another number at load time; too few such items is one line."""
    import dataloading
    import synthetic

    ratings = tmp_path / 'ratings.csv'
    synthetic.write_csv(str(ratings), synthetic.generate(users=80, items=60, rows=2400, groups=3,
                                                         seed=2))
    convert.main(['--path', str(ratings), '--output', str(tmp_path / 'paper'),
                  '--valid_negative', '20', '--test_negative_sampling', 'paper'])
    metadata = json.loads((tmp_path / 'paper' / METADATA_FILE).read_text())
    assert metadata['test_negative_sampling'] == 'paper'
    for count in (20, 25):  # the cache's, and drawn anew at load time
        dataset = dataloading.load_dataset(str(tmp_path / 'paper'), torch.device('cpu'), count)
        interactions = set(zip(dataset.train_users.tolist(), dataset.train_items.tolist())) | \
            set(enumerate(dataset.test_items.tolist()))
        for user, row in enumerate(dataset.test_negatives.tolist()):
            assert len(row) == count and len(set(row)) == count
            assert not any((user, item) in interactions for item in row)
        assert '(paper)' in dataset.metadata['test_negatives']
    free = min(60 - sum(1 for pair in interactions if pair[0] == user) for user in range(80))
    with pytest.raises(SystemExit):
        convert.main(['--path', str(ratings), '--output', str(tmp_path / 'few'),
                      '--valid_negative', str(free + 1), '--test_negative_sampling', 'paper'])
    assert 'distinct test negatives to draw' in capsys.readouterr().err
    assert not (tmp_path / 'few').exists()


def test_real_ml100k_counts(tmp_path, ml100k):
    convert.main(['--path', ml100k, '--output', str(tmp_path)])
    metadata = json.loads((tmp_path / METADATA_FILE).read_text())
    assert (metadata['n_users'], metadata['n_items']) == (943, 1682)
    assert load(tmp_path, TEST_FILE).shape == (943, 2)
    assert load(tmp_path, TRAIN_FILE).shape == (99057, 2)
    assert load(tmp_path, TEST_NEGATIVES_FILE).shape == (943, 100)
    assert metadata['source_sha256'] == \
        '06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490'
    test = load(tmp_path, TEST_FILE)
    assert test[:, 0].tolist() == list(range(943))  # row u holds user u
    assert len(read_ids(tmp_path / USER_IDS_FILE)) == 944


BAD_INPUTS = {
    'missing file': (None, ['--path', 'nowhere.csv'], 'does not exist'),
    'empty file': ('', [], 'is empty'),
    'unknown format': ('a;b;c\n1;2;3\n', [], 'cannot tell the format'),
    'missing columns': ('user_id,timestamp\n1,2\n', ['--format', 'csv'], 'item_id'),
    'non-numeric timestamp': ('user_id,item_id,timestamp\n1,2,yesterday\n', [],
                              'non-numeric timestamp'),
    'no user left': (HAND_WRITTEN, ['--min_ratings', '50'], 'no user has at least 50'),
    'header only': ('user_id,item_id,timestamp\n', [], 'holds no interactions'),
    'missing value': ('user_id,item_id,timestamp\n1,,5\n1,2,6\n', [], 'without a item'),
    'every item': ('user_id,item_id,timestamp\nu1,x,1\nu1,y,2\nu2,x,1\nu2,y,2\n',
                   ['--min_ratings', '2', '--valid_negative', '1'],
                   'user u1 has interacted with every item'),
    'malformed rows': ('user_id,item_id,timestamp\n1,2,3\n1,2\n', [], 'cannot read'),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    text, extra, fragment = BAD_INPUTS[case]
    output = tmp_path / 'cache'
    path = ['--path', write(tmp_path / 'input.csv', text)] if text is not None else []
    with pytest.raises(SystemExit) as exit_info:
        convert.main(path + ['--output', str(output)] + extra)
    assert exit_info.value.code != 0
    assert_one_line_error(capsys.readouterr().err, fragment)
    assert not output.exists()


def test_output_not_writable(tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    with pytest.raises(SystemExit):
        convert.main(['--path', write(tmp_path / 'r.csv', HAND_WRITTEN),
                      '--output', str(blocker / 'cache'), '--min_ratings', '3'])
    assert_one_line_error(capsys.readouterr().err, 'not a directory')


def test_cli_reports_bad_input_without_traceback(tmp_path):
    completed = run_script('convert.py', '--path', str(tmp_path / 'missing.csv'),
                           '--output', str(tmp_path / 'out'))
    assert completed.returncode == 1
    assert_one_line_error(completed, 'does not exist')


def test_string_ids_that_look_numeric_at_first(tmp_path):
    # Arrow infers column types from the first block: ids that turn into strings much further
    # down must still be read (as strings), not rejected.
    lines = [f'{u},{i},{t}' for u in range(1, 3) for i, t in zip(range(1, 40000), range(40000))]
    lines += [f'user-x,{i},{i}' for i in range(40000, 40024)]
    source = write(tmp_path / 'r.csv', 'user_id,item_id,timestamp\n' + '\n'.join(lines) + '\n')
    convert.main(['--path', source, '--output', str(tmp_path / 'out'), '--valid_negative', '2'])
    assert read_ids(tmp_path / 'out' / USER_IDS_FILE) == ['user_id', '1', '2', 'user-x']


def test_an_interrupted_rewrite_keeps_the_previous_cache(tmp_path, monkeypatch, capsys):
    source = write(tmp_path / 'ratings.csv', HAND_WRITTEN)
    output = tmp_path / 'cache'
    arguments = ['--path', source, '--output', str(output), '--min_ratings', '3',
                 '--valid_negative', '5']
    convert.main(arguments)
    before = snapshot(output)
    assert METADATA_FILE in before

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:  # Ctrl-C while the new files are being written
        patch.setattr(convert, 'id_map_bytes', crash)
        with pytest.raises(SystemExit) as exit_info:
            convert.main(arguments + ['--seed', '2'])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == \
        f'convert.py: interrupted: the previous cache in {output} is unchanged'
    assert snapshot(output) == before  # whole, loadable, and no temporary file left

    # Ctrl-C during the renames is held until they are done: the new cache is complete.
    commit = files.FileSet.commit

    def commit_with_a_signal(self, last=None):
        os.kill(os.getpid(), signal.SIGINT)
        return commit(self, last)
    with monkeypatch.context() as patch:
        patch.setattr(files.FileSet, 'commit', commit_with_a_signal)
        with pytest.raises(SystemExit) as exit_info:
            convert.main(arguments + ['--seed', '2'])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == \
        f'convert.py: interrupted: the new cache in {output} is complete'
    after = snapshot(output)
    assert after[TRAIN_FILE] == before[TRAIN_FILE] and after[TEST_FILE] == before[TEST_FILE]
    assert after[TEST_NEGATIVES_FILE] != before[TEST_NEGATIVES_FILE]  # the new seed's
    assert json.loads(after[METADATA_FILE])['seed'] == 2
    assert sorted(after) == sorted(before)


def test_metadata_identifies_the_data(tmp_path):
    source = write(tmp_path / 'ratings.csv', HAND_WRITTEN)
    convert.main(['--path', source, '--output', str(tmp_path / 'a'), '--min_ratings', '3',
                  '--valid_negative', '2'])
    metadata = json.loads((tmp_path / 'a' / METADATA_FILE).read_text())
    assert metadata['version'] == 3
    id_maps = (tmp_path / 'a' / USER_IDS_FILE).read_bytes() + \
        (tmp_path / 'a' / ITEM_IDS_FILE).read_bytes()
    assert metadata['id_maps_sha256'] == hashlib.sha256(id_maps).hexdigest()
    assert metadata['source_sha256'] == hashlib.sha256(HAND_WRITTEN.encode()).hexdigest()
    # every tensor's shape and the sha256 of its values
    for name, (shape, values) in {TRAIN_FILE: ([6, 2], EXPECTED_TRAIN),
                                  TEST_FILE: ([3, 2], EXPECTED_TEST)}.items():
        assert metadata['tensors'][name] == {
            'shape': shape, 'sha256': hashlib.sha256(torch.tensor(values).numpy().tobytes())
            .hexdigest()}
    assert metadata['tensors'][TEST_NEGATIVES_FILE]['shape'] == [3, 2]
    # the fingerprint: the source, the id maps and the split (training and test tensors)
    split = hashlib.sha256(f"{metadata['tensors'][TRAIN_FILE]['sha256']}:"
                           f"{metadata['tensors'][TEST_FILE]['sha256']}".encode()).hexdigest()
    assert metadata['fingerprint'] == hashlib.sha256(
        f"{metadata['source_sha256']}:{metadata['id_maps_sha256']}:{split}".encode()
    ).hexdigest()[:16]
    # Another seed draws other test negatives from the same data: the same fingerprint.
    convert.main(['--path', source, '--output', str(tmp_path / 'b'), '--min_ratings', '3',
                  '--valid_negative', '2', '--seed', '5'])
    assert json.loads((tmp_path / 'b' / METADATA_FILE).read_text())['fingerprint'] == \
        metadata['fingerprint']
    # Other data, another fingerprint.
    other = write(tmp_path / 'other.csv', HAND_WRITTEN.replace('u4,f,1,3', 'u4,g,1,3'))
    convert.main(['--path', other, '--output', str(tmp_path / 'c'), '--min_ratings', '3',
                  '--valid_negative', '2'])
    assert json.loads((tmp_path / 'c' / METADATA_FILE).read_text())['fingerprint'] != \
        metadata['fingerprint']


@pytest.mark.parametrize('name, text', [
    ('ratings.csv', 'userId,movieId,rating,timestamp\n1,10,4,5\n1,20,3,6\n2,10,2,7\n2,30,1,8\n'),
    ('mine.csv', 'user_id,item_id,timestamp\n1,10,5\n1,20,6\n2,10,7\n2,30,8\n'),
    ('u.data', '1\t10\t4\t5\n1\t20\t3\t6\n2\t10\t2\t7\n2\t30\t1\t8\n'),
])
def test_a_byte_order_mark_is_accepted(tmp_path, name, text):
    caches = []
    for bom in ('', '\ufeff'):
        output = tmp_path / f'cache{len(bom)}'
        convert.main(['--path', write(tmp_path / name, bom + text), '--output', str(output),
                      '--min_ratings', '2', '--valid_negative', '1'])
        caches.append({name: data for name, data in snapshot(output).items()
                       if name != METADATA_FILE})
        assert read_ids(output / USER_IDS_FILE) == ['user_id', '1', '2']
    assert caches[0] == caches[1]


def test_a_header_with_blanks_after_the_commas(tmp_path):
    spaced = HAND_WRITTEN.replace(',', ', ')
    caches = []
    for name, text in (('plain.csv', HAND_WRITTEN), ('spaced.csv', spaced)):
        output = tmp_path / name.replace('.csv', '')
        convert.main(['--path', write(tmp_path / name, text), '--output', str(output),
                      '--min_ratings', '3', '--valid_negative', '2'])
        caches.append({name: data for name, data in snapshot(output).items()
                       if name != METADATA_FILE})
    assert caches[0] == caches[1]


def test_crlf_line_ends_and_negative_timestamps_read_as_plain(tmp_path):
    """Windows line ends, and timestamps before 1970 (shifted by a constant: the same order)."""
    header, *rows = HAND_WRITTEN.splitlines()
    shifted = [row.rsplit(',', 1) for row in rows]
    texts = {'plain': HAND_WRITTEN, 'crlf': HAND_WRITTEN.replace('\n', '\r\n'),
             'before_1970': '\n'.join([header] + [f'{row},{int(time) - 1000}'
                                                  for row, time in shifted]) + '\n'}
    caches = []
    for name, text in texts.items():
        convert.main(['--path', write(tmp_path / f'{name}.csv', text), '--output',
                      str(tmp_path / name), '--min_ratings', '3', '--valid_negative', '2'])
        caches.append({name: data for name, data in snapshot(tmp_path / name).items()
                       if name != METADATA_FILE})
    assert caches[0] == caches[1] == caches[2]


def test_a_file_that_cannot_be_read_for_its_sha256_is_one_line(tmp_path):
    with pytest.raises(convert.UsageError, match='cannot read .*gone.csv: No such file'):
        convert.FileHash(str(tmp_path / 'gone.csv')).hexdigest()


def test_a_run_that_finds_another_writing_leaves_its_directory_alone(tmp_path, monkeypatch,
                                                                       capsys):
    """Two conversions into one new --output at once: this one made the directory, the other
    locked it first and is writing there. This one fails in one line, and must not remove the
    directory the other writes in."""
    output = tmp_path / 'new'
    other = []
    real_lock = convert.DirectoryLock

    def the_other_locks_first(directory, rule):
        other.append(real_lock(directory, rule))  # and has written nothing yet
        return real_lock(directory, rule)
    monkeypatch.setattr(convert, 'DirectoryLock', the_other_locks_first)
    try:
        with pytest.raises(SystemExit):
            convert.main(['--path', write(tmp_path / 'r.csv', HAND_WRITTEN), '--output',
                          str(output), '--min_ratings', '3', '--valid_negative', '2'])
    finally:
        for lock in other:
            lock.release()
    assert_one_line_error(capsys.readouterr().err, f'{output} is in use by pid',
                          'one conversion at a time into a cache')
    assert output.is_dir()  # the other one goes on writing there


def test_the_input_is_never_one_of_the_outputs(tmp_path, capsys):
    cache = tmp_path / 'cache'
    cache.mkdir()
    source = write(cache / TRAIN_FILE, HAND_WRITTEN)
    with pytest.raises(SystemExit):
        convert.main(['--path', source, '--output', str(cache), '--format', 'csv'])
    assert_one_line_error(capsys.readouterr().err, f'--path {source} is the {TRAIN_FILE} '
                          'convert.py writes in --output')
    assert (cache / TRAIN_FILE).read_text() == HAND_WRITTEN


# ------------------------------------------------------------------------------------------------
# Bad input and faults: one line, a non-zero exit, every file as it was

@pytest.fixture(scope='module')
def small(tmp_path_factory):
    """Two small ratings files (A and B: other users, items and rows) and a cache of A."""
    directory = tmp_path_factory.mktemp('small')
    paths = {}
    for name, (users, items, rows, seed) in {'a': (300, 200, 9000, 1),
                                             'b': (320, 210, 9600, 2)}.items():
        paths[name] = str(directory / f'{name}.csv')
        synthetic.write_csv(paths[name], synthetic.generate(users=users, items=items, rows=rows,
                                                            groups=4, seed=seed))
    paths['cache'] = str(directory / 'cache')
    convert.main(['--path', paths['a'], '--output', paths['cache'], '--valid_negative', '50'])
    return paths


@pytest.fixture
def old_cache(small, tmp_path):
    """A copy of the cache of A at tmp_path/cache: the previous cache a run must not harm."""
    shutil.copytree(small['cache'], tmp_path / 'cache')
    return str(tmp_path / 'cache')


HEADER = 'user_id,item_id,timestamp\n'
CASES = {
    # name: (ratings file contents or None for none, extra arguments, exit status, fragment)
    'missing file': (None, [], 1, 'does not exist'),
    'zero-byte file': ('', [], 1, 'is empty'),
    'empty first line': ('\n\n1,2,3\n', [], 1, 'empty first line'),
    'binary garbage': (bytes(range(256)) * 8, [], 1, 'cannot tell the format'),
    'unknown format': ('a;b;c\n1;2;3\n', [], 1, 'cannot tell the format'),
    'header only': (HEADER, [], 1, 'holds no interactions'),
    'malformed row': (HEADER + '1,2,3\n1,2\n', [], 1, "Expected 3 columns, got 2: '1,2'"),
    'missing value': (HEADER + '1,,5\n1,2,6\n', [], 1, 'without a item'),
    'blank id': (HEADER + 'u1,a,1\n ,b,2\nu1,c,3\n', [], 1, 'has 1 rows without a user'),
    'header only, CRLF': (HEADER.replace('\n', '\r\n'), [], 1, 'holds no interactions'),
    'truncated last line': ('userId,movieId,rating,timestamp\n1,2,4.0,5\n1,3,4.0,6\n1,4', [],
                            1, 'cannot read'),
    'missing column behind a BOM': ('\ufeffuserId,rating,timestamp\n1,2,3\n',
                                    ['--format', 'ml-20m'], 1, 'lacks the column(s) movieId'),
    'missing columns': ('user_id,timestamp\n1,2\n', ['--format', 'csv'], 1, 'item_id'),
    'non-numeric timestamp': (HEADER + '1,2,3\n1,3,soon\n', [], 1, 'non-numeric timestamp'),
    'no user left': ('A', ['--min_ratings', '500'], 1, 'no user has at least 500'),
    'every item': ('user_id,item_id,timestamp\nu1,x,1\nu1,y,2\nu2,x,1\nu2,y,2\n',
                   ['--min_ratings', '2', '--valid_negative', '1'], 1,
                   'user u1 has interacted with every item'),
    '--valid_negative beyond the catalogue': ('A', ['--valid_negative', '201'], 1,
                                              '--valid_negative 201 is more than the 200 items'),
    '--valid_negative 0': ('A', ['--valid_negative', '0'], 1, 'at least 1'),
    '--min_ratings 1': ('A', ['--min_ratings', '1'], 1, 'at least 2'),
    '--seed out of range': ('A', ['--seed', str(2 ** 64)], 1, 'out of range'),
    'no user to validate on': (HEADER + 'u1,a,1\nu1,b,2\nu2,c,1\nu2,c,2\nu2,a,3\n',
                               ['--min_ratings', '2', '--valid_negative', '1',
                                '--validation_holdout'], 1,
                               'no user of RATINGS has 3 distinct interactions (a training, a '
                               'validation and a test one) after --min_ratings and repeated '
                               'pairs: there is nothing to validate on'),
    'a directory as --path': ('DIR', [], 1, 'is a directory'),
    'output is a file': ('A', ['--output', 'FILE'], 1, 'is not a directory'),
    'output under a file': ('A', ['--output', 'FILE/cache'], 1, 'is not a directory'),
    'unknown format name': ('A', ['--format', 'ml-5m'], 2, 'invalid choice'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, small, old_cache, tmp_path, capsys):
    contents, extra, code, fragment = CASES[case]
    path = str(tmp_path / 'ratings.csv')
    if contents == 'A':
        shutil.copy(small['a'], path)
    elif contents == 'DIR':
        os.mkdir(path)
    elif isinstance(contents, bytes):
        (tmp_path / 'ratings.csv').write_bytes(contents)
    elif contents is not None:
        (tmp_path / 'ratings.csv').write_text(contents, encoding='utf-8')
    (tmp_path / 'FILE').write_text('not a directory')
    extra = [str(tmp_path / a) if a.startswith('FILE') else a for a in extra]
    output = [] if '--output' in extra else ['--output', old_cache]
    before = snapshot(tmp_path)
    fails(convert.main, ['--path', path, *output, *extra], capsys,
          fragment.replace('RATINGS', path), code=code)
    assert snapshot(tmp_path) == before


def run(argv, prefix=(), timeout=120):
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_read_only_output(small, old_cache, tmp_path):
    before = snapshot(tmp_path)
    script = [PYTHON, os.path.join(ROOT, 'convert.py'), '--path', small['b']]
    with read_only(old_cache) as prefix:
        completed = run(script + ['--output', old_cache], prefix)
    assert_one_line_error(completed, 'is read-only')
    assert snapshot(tmp_path) == before
    with read_only(tmp_path) as prefix:
        completed = run(script + ['--output', str(tmp_path / 'new' / 'cache')], prefix)
    assert_one_line_error(completed, 'cannot be created')
    assert snapshot(tmp_path) == before


FULL_DISK_DRIVER = '''
import json, os, shutil, subprocess, sys
mount, old, source, python, script = sys.argv[1:]
cache = os.path.join(mount, 'cache')
shutil.copytree(old, cache)
def snapshot():  # the lock file names the run that holds the cache: not the user's
    return {n: open(os.path.join(cache, n), 'rb').read() for n in sorted(os.listdir(cache))
            if n != '.lock'}
before = snapshot()
space = os.statvfs(mount)
with open(os.path.join(mount, 'filler'), 'wb') as filler:  # leave 64 KiB free
    filler.write(b'x' * (space.f_bavail * space.f_frsize - 65536))
completed = subprocess.run([python, script, '--path', source, '--output', cache,
                            '--valid_negative', '50'], capture_output=True, text=True)
print(json.dumps({'returncode': completed.returncode, 'stderr': completed.stderr,
                  'unchanged': snapshot() == before, 'files': sorted(os.listdir(cache))}))
'''


INJECTED_FULL_DISK = '''
import builtins, errno, os, runpy, sys
space = [65536]
real_open = builtins.open
class Filling:
    def __init__(self, file):
        self._file = file
    def write(self, data):
        size = memoryview(data).nbytes
        if size > space[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        space[0] -= size
        return self._file.write(data)
    def __getattr__(self, name):
        return getattr(self._file, name)
    def __enter__(self):
        return self
    def __exit__(self, *exception):
        return self._file.__exit__(*exception)
def filling_open(file, mode='r', *args, **kwargs):
    opened = real_open(file, mode, *args, **kwargs)
    return Filling(opened) if any(m in mode for m in 'wax+') else opened
builtins.open = filling_open
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def test_convert_full_disk_keeps_the_previous_cache(small, old_cache, tmp_path):
    if private_mounts():
        mount = tmp_path / 'tmpfs'
        mount.mkdir()
        driver = tmp_path / 'driver.py'
        driver.write_text(FULL_DISK_DRIVER)
        completed = run(['unshare', '-m', 'sh', '-c', 'mount -t tmpfs -o size=2m tmpfs "$0" && '
                         'exec "$@"', str(mount), PYTHON, str(driver), str(mount), old_cache,
                         small['b'], PYTHON, os.path.join(ROOT, 'convert.py')])
        assert completed.returncode == 0, completed.stderr
        result = json.loads(completed.stdout)
        assert result['unchanged'] and result['files'] == sorted(os.listdir(old_cache))
        completed = subprocess.CompletedProcess([], result['returncode'], '', result['stderr'])
        cache = os.path.join(str(mount), 'cache')
    else:
        before = snapshot(tmp_path)
        completed = run([PYTHON, '-c', INJECTED_FULL_DISK, os.path.join(ROOT, 'convert.py'),
                         '--path', small['b'], '--output', old_cache, '--valid_negative', '50'])
        assert snapshot(tmp_path) == before
        cache = old_cache
    assert_one_line_error(completed, 'No space left on device',
                          f'the previous cache in {cache} is unchanged')
    assert completed.returncode == 1
    assert completed.stderr.splitlines()[-1].startswith(
        f'convert.py: error: cannot write {cache}/')


@pytest.mark.parametrize('signum, when', [(signal.SIGINT, 'reading'),
                                          (signal.SIGTERM, 'staging')])
def test_convert_interrupted_keeps_the_previous_cache(signum, when, small, old_cache, tmp_path):
    arguments = [os.path.join(ROOT, 'convert.py'), '--path', small['b'], '--output', old_cache,
                 '--valid_negative', '50']
    if when == 'staging':
        (tmp_path / 'holding.py').write_text(HOLDING_PYTHON)
        arguments = [str(tmp_path / 'holding.py')] + arguments
    before = snapshot(tmp_path)
    process = subprocess.Popen([PYTHON, *arguments], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if when == 'staging':
        for line in process.stderr:
            if line.startswith('[test] staged'):
                break
    else:
        wait_for_handlers(process)
    process.send_signal(signum)
    stderr = process.stderr.read()
    assert process.wait(60) == 128 + signum
    assert 'Traceback' not in stderr
    assert stderr.splitlines()[-1] == \
        f'convert.py: interrupted: the previous cache in {old_cache} is unchanged'
    assert snapshot(tmp_path) == before  # no temporary file left either


KILL_DRIVER = '''
import os, random, shutil, signal, sys, time
sys.path.insert(0, sys.argv[1])
import convert, torch  # noqa: F401 (loaded before forking)
sources, output, copies = sys.argv[2:4], sys.argv[4], sys.argv[5]
runs, seed = int(sys.argv[6]), int(sys.argv[7])
rng = random.Random(seed)
def start(source):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.dup2(write, 2)
        try:
            convert.main(['--path', source, '--output', output, '--valid_negative', '50'])
        finally:
            os._exit(0)
    os.close(write)
    stream = os.fdopen(read)
    for line in stream:  # from the split on, the work is the cache's
        if line.startswith('[convert] split'):
            break
    return pid, stream, time.perf_counter()
pid, stream, began = start(sources[1])  # a whole run, to time the work after the split
os.waitpid(pid, 0)
span = time.perf_counter() - began
stream.read()
for run in range(runs):
    pid, stream, began = start(sources[run % 2])
    delay = rng.uniform(0, 1.2 * span)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    stream.read()
    shutil.copytree(output, os.path.join(copies, str(run)))
    print(f'run {run}: killed after {delay * 1000:.1f} ms of {span * 1000:.1f}')
'''


def test_kill_9_at_random_points_never_leaves_a_mixed_cache(small, old_cache, tmp_path):
    driver = tmp_path / 'driver.py'
    driver.write_text(KILL_DRIVER)
    copies = tmp_path / 'copies'
    copies.mkdir()
    runs = 6
    completed = run([PYTHON, str(driver), ROOT, small['a'], small['b'], old_cache, str(copies),
                     str(runs), str(random.randrange(1 << 30))])
    assert completed.returncode == 0, completed.stderr
    fresh = {}  # source sha256: the cache a whole conversion of it writes
    for name in ('a', 'b'):
        output = tmp_path / f'fresh_{name}'
        convert.main(['--path', small[name], '--output', str(output), '--valid_negative', '50'])
        metadata = json.loads((output / 'metadata.json').read_text())
        fresh[metadata['source_sha256']] = fresh[name] = snapshot(output)
    outcomes = []  # per run: which cache it left
    for run_index in range(runs):
        cache = copies / str(run_index)
        files = {name: data for name, data in snapshot(cache).items() if not name.endswith('.tmp')}
        if 'metadata.json' not in files:
            outcomes.append('untrusted')  # killed during the renames: nothing trusts it
            continue
        metadata = json.loads(files['metadata.json'])
        outcomes.append('new' if files == fresh['ab'[run_index % 2]] else 'old')
        dataset = dataloading.load_dataset(str(cache), torch.device('cpu'))
        assert (dataset.n_users, dataset.n_items) == (metadata['n_users'], metadata['n_items'])
        assert len(dataset.train_users) == metadata['n_train']
        assert files == fresh[metadata['source_sha256']], (run_index, completed.stdout)
    print(completed.stdout, outcomes)
    # The temporary files the killed runs left are removed by the next write of their paths.
    convert.main(['--path', small['a'], '--output', old_cache, '--valid_negative', '50'])
    assert snapshot(old_cache) == fresh['a']


# The NCF paper's own files ------------------------------------------------------------------

def paper_split(directory, users=50, items=40, negatives=20, seed=0):
    """A split in the NCF paper's three files at `directory`/toy.*, and what they hold."""
    generator = random.Random(seed)
    train, test, negative = [], [], []
    for user in range(users):
        chosen = generator.sample(range(items), 12)
        for when, item in enumerate(chosen[:-1]):
            train.append((user, item, 5 - when % 5, 1000 + 7 * when))
        test.append((user, chosen[-1]))
        free = [item for item in range(items) if item not in chosen]
        negative.append(generator.sample(free, negatives))
    generator.shuffle(train)  # the paper's are by user, but nothing depends on it
    prefix = str(directory / 'toy')
    write(prefix + '.train.rating', ''.join(f'{u}\t{i}\t{r}\t{t}\n' for u, i, r, t in train))
    write(prefix + '.test.rating', ''.join(f'{u}\t{i}\t5\t9999\n' for u, i in test))
    write(prefix + '.test.negative', ''.join(
        f'({u},{i})\t' + '\t'.join(map(str, row)) + '\n' for (u, i), row in zip(test, negative)))
    return prefix, train, test, negative


def test_the_papers_files_round_trip_exactly(tmp_path, capsys):
    """Their split and negatives, ids kept, in the order given; ncf.py evaluates with them as
    they are (drawing other negatives is refused)."""
    import ncf
    from conftest import flags

    prefix, train, test, negative = paper_split(tmp_path)
    for path in (prefix, prefix + '.test.negative'):  # the prefix, or any of the files
        output = tmp_path / os.path.basename(path).replace('.', '_')
        convert.main(['--path', path, '--output', str(output)])
        metadata = json.loads((output / METADATA_FILE).read_text())
        assert (metadata['split'], metadata['test_negative_sampling'],
                metadata['source_format'], metadata['valid_negative']) == \
            ('given', 'given', 'paper', 20)
        assert (metadata['n_users'], metadata['n_items'], metadata['n_train']) == (50, 40, 550)
        stored = load(output, TRAIN_FILE).tolist()
        assert sorted(map(tuple, stored)) == sorted((u, i) for u, i, _, _ in train)
        by_user = [user for user, _ in stored]
        assert by_user == sorted(by_user)
        # within a user, by time
        times = {(u, i): t for u, i, _, t in train}
        assert all(times[tuple(a)] < times[tuple(b)] for a, b in zip(stored, stored[1:])
                   if a[0] == b[0])
        assert load(output, TEST_FILE).tolist() == [list(pair) for pair in test]
        assert load(output, TEST_NEGATIVES_FILE).tolist() == negative
        assert read_ids(output / USER_IDS_FILE) == ['user_id'] + [str(u) for u in range(50)]
    source = b''.join(open(prefix + suffix, 'rb').read()
                      for suffix in ('.train.rating', '.test.rating', '.test.negative'))
    assert metadata['source_sha256'] == hashlib.sha256(source).hexdigest()
    capsys.readouterr()
    fails(ncf.main, flags(str(output), epochs=1, valid_negative=30, log_path=tmp_path / 'log.json'),
          capsys, "--valid_negative 30, but the cache's 20 test negatives per user are its "
          "source's own")
    result = ncf.main(flags(str(output), epochs=1, valid_negative=20,
                            log_path=tmp_path / 'log.json'))
    assert 0 < result['best_hr'] <= 1


def test_the_papers_files_round_trip_whatever_their_line_ends_and_order(tmp_path):
    """CRLF line ends, blank lines and lines in any order: the same cache as the plain files."""
    prefix, *_ = paper_split(tmp_path)
    convert.main(['--path', prefix, '--output', str(tmp_path / 'plain')])
    generator = random.Random(1)
    for suffix in ('.train.rating', '.test.rating', '.test.negative'):
        rows = paper_rows(prefix + suffix)
        generator.shuffle(rows)
        with open(prefix + suffix, 'w', newline='') as file:
            file.write('\r\n' + ''.join('\t'.join(row) + '\r\n\r\n' for row in rows))
    convert.main(['--path', prefix, '--output', str(tmp_path / 'edited')])
    for name in (TRAIN_FILE, TEST_FILE, TEST_NEGATIVES_FILE, USER_IDS_FILE, ITEM_IDS_FILE):
        assert (tmp_path / 'plain' / name).read_bytes() == \
            (tmp_path / 'edited' / name).read_bytes()


def break_line(path, index, replacement):
    with open(path) as file:
        lines = file.read().splitlines(keepends=True)
    lines[index] = replacement
    write(path, ''.join(lines))


def paper_rows(path):
    """The tab-separated fields of each line of one of the paper's files."""
    with open(path) as file:
        return [line.rstrip('\n').split('\t') for line in file]


def write_rows(path, rows):
    write(path, ''.join('\t'.join(map(str, row)) + '\n' for row in rows))


def set_field(suffix, index, field, value):
    """A break: field `field` of line `index` (both 0-based) of PREFIX`suffix` set to `value`,
    or to value(PREFIX) where it is callable."""
    def breaks(prefix):
        rows = paper_rows(prefix + suffix)
        rows[index][field] = str(value(prefix) if callable(value) else value)
        write_rows(prefix + suffix, rows)
    return breaks


def held_out_item_of(user):
    return lambda prefix: paper_rows(prefix + '.test.rating')[user][1]


def training_item_of(user):
    return lambda prefix: next(item for u, item, *_ in paper_rows(prefix + '.train.rating')
                               if u == str(user))


def negative_of(user, index):
    return lambda prefix: paper_rows(prefix + '.test.negative')[user][1 + index]


def append(suffix, text):
    return lambda prefix: write(prefix + suffix, open(prefix + suffix).read() + text)


def replace_text(suffix, old, new):
    return lambda prefix: write(prefix + suffix, open(prefix + suffix).read().replace(old, new))


def drop_training_of(user):
    def breaks(prefix):
        rows = paper_rows(prefix + '.train.rating')
        write_rows(prefix + '.train.rating', [row for row in rows if row[0] != str(user)])
    return breaks


def every_negative_line(items):
    """A break: each user's line lists `items` as its negatives."""
    def breaks(prefix):
        rows = paper_rows(prefix + '.test.negative')
        write_rows(prefix + '.test.negative', [[row[0], *items] for row in rows])
    return breaks


def one_training_item_each(prefix):
    """A break for --validation_holdout: each user keeps one training item, rated twice."""
    rows = paper_rows(prefix + '.train.rating')
    first = {row[0]: row for row in reversed(rows)}
    write_rows(prefix + '.train.rating', [first[row[0]][:3] + row[3:] for row in rows])


def both(*breaks):
    return lambda prefix: [each(prefix) for each in breaks]


# Each: (how the files are broken, extra arguments, fragments of the one line). paper_split's
# files: users 0..49, items 0..39, 11 training lines per user (550 in all, shuffled), 20
# negatives per user; line k (1-based) of the test files is user k - 1's.
PAPER_CASES = {
    'a test user missing': (lambda p: break_line(p + '.test.rating', 7, ''), [],
                            'toy.test.rating lacks user 7'),
    'a test user twice': (set_field('.test.rating', 7, 0, 8), [],
                          'toy.test.rating, line 9: user 8 again (first on line 8)'),
    'a test user without training ratings': (
        drop_training_of(3), [],
        'toy.test.rating, line 4: user 3 has no rating in toy.train.rating'),
    'a negative test user': (set_field('.test.rating', 2, 0, -2), [],
                             'toy.test.rating, line 3: user -2 is out of range'),
    'a test item beyond every training item': (
        both(set_field('.test.rating', 3, 1, 40), set_field('.test.negative', 3, 0, '(3,40)')),
        [], 'toy.test.rating, line 4: user 3: test item 40 is outside the catalogue, items '
            '0..39 (up to the largest item of toy.train.rating'),
    'a negative beyond every training item': (
        set_field('.test.negative', 0, 20, 40), [],
        'toy.test.negative, line 1: user 0: negative 40 is outside the catalogue, items 0..39'),
    'a negative that is the test item': (
        set_field('.test.negative', 3, 6, held_out_item_of(3)), [],
        ('toy.test.negative, line 4: user 3: negative ', ' is their test item')),
    'a negative the user rated in training': (
        set_field('.test.negative', 3, 6, training_item_of(3)), [],
        ('toy.test.negative, line 4: user 3: negative ', ' is an item they rated in '
                                                         'toy.train.rating')),
    'a negative listed twice': (
        set_field('.test.negative', 3, 6, negative_of(3, 0)), [],
        ('toy.test.negative, line 4: user 3: negative ', ' is listed twice')),
    'more negatives than the catalogue has items': (
        every_negative_line(range(40)), [],
        'toy.test.negative, line 1: user 0 has 40 negatives, but the catalogue has only 39 '
        'items besides a test item'),
    'a negative line for another item': (
        set_field('.test.negative', 3, 0, '(3,39)'), [],
        'toy.test.negative, line 4: the line of user 3 is for item 39, but the test rating of '
        'user 3'),
    'a negative line for a user twice': (
        set_field('.test.negative', 2, 0, '(7,1)'), [],
        'toy.test.negative, line 8: user 7 again (first on line 3)'),
    'a negative line missing': (lambda p: break_line(p + '.test.negative', 7, ''), [],
                                'toy.test.negative lacks user 7'),
    'a training user out of range': (
        append('.train.rating', '50\t1\t5\t1\n'), [],
        'toy.train.rating, line 551: user 50 is out of range: the users of toy.test.rating are '
        '0..49'),
    'an item id beyond int32': (
        set_field('.train.rating', 10, 1, 2 ** 31), [],
        ('toy.train.rating, line 11: user ', ': item 2147483648 is outside 0..2147483646')),
    'a field that is not an integer': (
        set_field('.train.rating', 10, 2, 'five'), [],
        "toy.train.rating, line 11: field 3 is not an integer: 'five'"),
    'negative lines of unequal length': (
        lambda p: break_line(p + '.test.negative', 5, '(5,1)\t2\t3\n'), [],
        "toy.test.negative, line 6 has 3 tab-separated fields, not 21: '(5,1)\\t2\\t3'"),
    'a negative line without its pair': (
        set_field('.test.negative', 0, 0, 'x'), [],
        "toy.test.negative, line 1: does not start with (user,item): 'x'"),
    'a space-separated negatives file': (
        replace_text('.test.negative', '\t', ' '), [],
        "toy.test.negative, line 1: no tab in the line (the NCF paper's files are "
        "tab-separated): '(0,"),
    'a space-separated training file': (replace_text('.train.rating', '\t', ' '), [],
                                        'toy.train.rating, line 1: no tab in the line'),
    'a file of NUL bytes': (lambda p: write(p + '.test.negative', '\0' * 300), [],
                            "toy.test.negative, line 1: no tab in the line (the NCF paper's "
                            "files are tab-separated): '\\x00\\x00"),
    'only empty lines': (lambda p: write(p + '.test.rating', '\n\n'), [],
                         'toy.test.rating holds only empty lines'),
    'no negatives file': (lambda p: os.remove(p + '.test.negative'), [],
                          'toy.test.negative does not exist'),
    'an option of our own split': (None, ['--valid_negative', '99'],
                                   '--valid_negative does not apply to the NCF paper\'s files'),
    'a seed without a validation holdout': (
        None, ['--seed', '3'], "--seed does not apply to the NCF paper's files: they hold their "
                               'own split and test negatives (it seeds validation negatives, '
                               'with --validation_holdout)'),
    'a seed out of range': (None, ['--validation_holdout', '--seed', str(-2 ** 63 - 1)],
                            'out of range'),
    'no user to validate on': (
        one_training_item_each, ['--validation_holdout'],
        '--validation_holdout: no user of PREFIX.train.rating rated 2 items in training (a '
        'validation and a training one): there is nothing to validate on'),
    'paper format for other files': (None, ['--path', 'ratings.csv', '--format', 'paper'],
                                     'names none of the NCF paper\'s files'),
}


@pytest.mark.parametrize('case', sorted(PAPER_CASES))
def test_malformed_paper_files_are_one_line_and_change_nothing(case, tmp_path, capsys):
    breaks, extra, fragments = PAPER_CASES[case]
    prefix, *_ = paper_split(tmp_path)
    write(tmp_path / 'ratings.csv', 'user_id,item_id,timestamp\n1,2,3\n')
    convert.main(['--path', prefix, '--output', str(tmp_path / 'cache')])  # the previous cache
    capsys.readouterr()
    if breaks:
        breaks(prefix)
    before = snapshot(tmp_path)
    fragments = (fragments,) if isinstance(fragments, str) else fragments
    fails(convert.main, ['--path', prefix, '--output', str(tmp_path / 'cache'), *extra],
          capsys, *(fragment.replace('PREFIX', prefix) for fragment in fragments))
    assert snapshot(tmp_path) == before


def test_a_fifo_is_refused_as_input(tmp_path, capsys):
    """A FIFO (or a device) is no file to read twice, for its sha256 and its rows: named so, not
    'does not exist'. (Outside what snapshot reads: reading a FIFO waits for a writer.)"""
    prefix, *_ = paper_split(tmp_path)
    convert.main(['--path', prefix, '--output', str(tmp_path / 'cache')])
    capsys.readouterr()
    before = snapshot(tmp_path / 'cache')
    os.mkfifo(tmp_path / 'ratings.csv')
    fails(convert.main, ['--path', str(tmp_path / 'ratings.csv'), '--output',
                         str(tmp_path / 'cache')], capsys, 'ratings.csv is not a regular file')
    os.remove(prefix + '.test.rating')
    os.mkfifo(prefix + '.test.rating')
    fails(convert.main, ['--path', prefix, '--output', str(tmp_path / 'cache')], capsys,
          'toy.test.rating is not a regular file')
    assert snapshot(tmp_path / 'cache') == before


NULS = b'\0' * 2000
ESCAPE = b'\x1b[2J'  # a terminal's "clear the screen"


@pytest.mark.parametrize('name, contents, extra', [
    ('ratings.csv', NULS, []),
    ('ratings.csv', NULS, ['--format', 'ml-20m']),
    ('ratings.csv', NULS, ['--format', 'ml-1m']),
    ('ratings.csv', b'user_id,item_id,timestamp\n1,2,3\n1,3,' + ESCAPE + b'\n', []),
    ('ratings.csv', b'user_id,item_id,timestamp\n1,2,3\n1,' + ESCAPE + b'\n', []),
    ('ratings.csv', b'user_id,item_id,timestamp\nu' + ESCAPE + b',x,1\nu' + ESCAPE + b',y,2\n',
     ['--min_ratings', '2', '--valid_negative', '1']),
    ('toy.train.rating', NULS, []),
    ('toy.test.negative', b'(0,1)\t2\t' + ESCAPE + b'\n', []),
    ('toy.test.negative', b'(0,' + ESCAPE + b')\t2\t3\n', []),
])
def test_a_quoted_piece_of_a_file_is_escaped_and_short(name, contents, extra, tmp_path, capsys):
    """A message that quotes the file shows its piece escaped (no control character reaches the
    terminal) and cut short."""
    prefix, *_ = paper_split(tmp_path)
    (tmp_path / name).write_bytes(contents)
    path = prefix if name.startswith('toy.') else str(tmp_path / name)
    with pytest.raises(SystemExit):
        convert.main(['--path', path, '--output', str(tmp_path / 'cache'), *extra])
    [line] = [line for line in capsys.readouterr().err.splitlines() if 'error' in line]
    assert line.isprintable(), line
    assert '\\x00' * 15 not in line and ('\\x00' in line or '\\x1b' in line), line


@pytest.mark.parametrize('sampling', ['recipe', 'paper'])
def test_negatives_avoid_the_right_pairs_when_pairs_repeat(sampling, tmp_path):
    """The negatives are drawn outside the split's own sorted pair keys (no second sort): with
    repeated pairs dropped, recipe avoids every training pair, paper every interaction."""
    path = repeating_ratings(tmp_path / 'ratings.csv')
    convert.main(['--path', path, '--output', str(tmp_path / 'cache'), '--valid_negative', '3',
                  '--test_negative_sampling', sampling, '--min_ratings', '2'])
    metadata = json.loads((tmp_path / 'cache' / METADATA_FILE).read_text())
    assert metadata['dropped_repeats'] > 300
    train = {tuple(pair) for pair in load(tmp_path / 'cache', TRAIN_FILE).tolist()}
    test = {tuple(pair) for pair in load(tmp_path / 'cache', TEST_FILE).tolist()}
    negatives = load(tmp_path / 'cache', TEST_NEGATIVES_FILE).tolist()
    avoided = train | test if sampling == 'paper' else train
    assert not any((user, item) in avoided for user, row in enumerate(negatives)
                   for item in row)


def repeating_ratings(path):
    """40 users, 30 rows each over 25 items: about one pair in three repeats an earlier one."""
    generator = random.Random(1)
    rows = ['user_id,item_id,timestamp']
    for user in range(40):
        for when in range(30):
            rows.append(f'u{user},i{generator.randrange(25)},{when}')
    return write(path, '\n'.join(rows) + '\n')



# The validation holdout ---------------------------------------------------------------------

# sha256 of the metadata.json convert.py wrote before the holdout existed, for each of
# plain_conversions: it records every tensor's shape and sha256 and the id maps' sha256, so an
# equal one is the same cache.
METADATA_BEFORE_THE_HOLDOUT = {
    'hand': 'b3829eb659eaa1a23ee8e7207b87dd3c392e7b2ccbf8ee4d81fed27ab2a012e0',
    'repeating': 'e6027de19d34ae6697f27953f70c5d63f912a5bc0b57a259a1cf9a274e463a53',
    'paper': 'a33ed7982fda8face4205eac4f01b5cc126bebb8c9bb358739ee043c7d553fe5',
}
PLAIN_CACHE = [TRAIN_FILE, TEST_FILE, TEST_NEGATIVES_FILE, METADATA_FILE, USER_IDS_FILE,
               ITEM_IDS_FILE]


def plain_conversions(directory):
    """{name: convert.py's arguments but --output}: the hand-written ratings, ratings whose
    pairs repeat (paper sampling) and the NCF paper's files, in `directory`."""
    return {
        'hand': ['--path', write(directory / 'ratings.csv', HAND_WRITTEN), '--min_ratings', '3',
                 '--valid_negative', '5'],
        'repeating': ['--path', repeating_ratings(directory / 'repeating.csv'), '--min_ratings',
                      '2', '--valid_negative', '3', '--test_negative_sampling', 'paper'],
        'paper': ['--path', paper_split(directory)[0]],
    }


def test_without_the_holdout_the_cache_is_as_before(tmp_path):
    """Byte for byte what convert.py wrote before --validation_holdout existed; and a cache with
    a holdout converted again without one is that cache too (no validation file left)."""
    for name, argv in plain_conversions(tmp_path).items():
        output = tmp_path / name
        convert.main(argv + ['--output', str(output)])
        assert hashlib.sha256((output / METADATA_FILE).read_bytes()).hexdigest() == \
            METADATA_BEFORE_THE_HOLDOUT[name], name
        assert sorted(snapshot(output)) == sorted(PLAIN_CACHE)
        metadata = json.loads((output / METADATA_FILE).read_text())
        for tensor, recorded in metadata['tensors'].items():
            assert tensor_sha256(load(output, tensor)) == recorded['sha256']
        rewritten = tmp_path / f'{name}_rewritten'
        convert.main(argv + ['--output', str(rewritten), '--validation_holdout'])
        assert (rewritten / VALID_FILE).exists()
        convert.main(argv + ['--output', str(rewritten)])
        assert snapshot(rewritten) == snapshot(output)


# Known answers (--min_ratings 2). First appearance maps u1..u4 -> 0..3 and a -> 0, c -> 1,
# b -> 2, e -> 3, d -> 4, f -> 5. u1 in time order: a@1, c@5, b@5 (a tie: file order), a@8 (a
# repeat: dropped, the earliest stays), d@9: test d, validation b, training a, c. u2 has two
# interactions, u3 two once its repeat is dropped: no validation positive, their training kept.
# u4 in time order: e@1, a@2, b@3: test b, validation a, training e.
HOLDOUT_RATINGS = """user_id,item_id,timestamp
u1,a,1
u1,c,5
u2,a,3
u1,b,5
u3,e,1
u1,a,8
u4,a,2
u1,d,9
u2,b,4
u3,e,2
u3,f,3
u4,e,1
u4,b,3
"""
HOLDOUT_TRAIN = [[0, 0], [0, 1], [1, 0], [2, 3], [3, 3]]
HOLDOUT_TEST = [[0, 4], [1, 2], [2, 5], [3, 2]]
HOLDOUT_VALID = [[0, 2], [1, -1], [2, -1], [3, 0]]


def test_validation_holdout_known_answers(tmp_path, capsys):
    source = write(tmp_path / 'ratings.csv', HOLDOUT_RATINGS)
    plain, held = tmp_path / 'plain', tmp_path / 'held'
    argv = ['--path', source, '--min_ratings', '2', '--valid_negative', '3']
    convert.main(argv + ['--output', str(plain)])
    capsys.readouterr()
    convert.main(argv + ['--output', str(held), '--validation_holdout'])
    assert '[convert] validation holdout: 2 users with a validation positive, 2 without (under 3 ' \
        'distinct interactions); drew 3 validation negatives per user (recipe)' in \
        capsys.readouterr().err
    assert load(held, TRAIN_FILE).tolist() == HOLDOUT_TRAIN
    assert load(held, TEST_FILE).tolist() == HOLDOUT_TEST
    assert load(held, VALID_FILE).tolist() == HOLDOUT_VALID
    negatives = load(held, VALID_NEGATIVES_FILE)
    assert negatives.dtype == load(held, VALID_FILE).dtype == torch.int64
    assert negatives.shape == (4, 3) and (negatives[1:3] == -1).all()
    for user in (0, 3):
        training = {item for u, item in HOLDOUT_TRAIN if u == user}
        assert all(0 <= item < 6 and item not in training for item in negatives[user].tolist())
    # the test set, its negatives and the id maps are those of the cache without the holdout
    for name in (TEST_FILE, TEST_NEGATIVES_FILE, USER_IDS_FILE, ITEM_IDS_FILE):
        assert (held / name).read_bytes() == (plain / name).read_bytes()

    metadata = json.loads((held / METADATA_FILE).read_text())
    before = json.loads((plain / METADATA_FILE).read_text())
    assert metadata['validation'] == {'holdout': 'latest', 'users': 2, 'users_without': 2,
                                      'negatives': 'recipe', 'seed': 2 ** 32 + 1}
    assert (metadata['n_train'], metadata['n_valid'], metadata['n_test']) == (5, 2, 4)
    assert list(metadata)[:7] == ['version', 'n_users', 'n_items', 'n_train', 'n_test',
                                  'n_valid', 'valid_negative']
    unchanged = set(before) - {'n_train', 'tensors', 'fingerprint'}
    assert {key: metadata[key] for key in unchanged} == {key: before[key] for key in unchanged}
    for name, shape in ((VALID_FILE, [4, 2]), (VALID_NEGATIVES_FILE, [4, 3])):
        assert metadata['tensors'][name] == {'shape': shape,
                                             'sha256': tensor_sha256(load(held, name))}
    # the fingerprint covers the validation positives: another split, another fingerprint
    split = hashlib.sha256(':'.join(metadata['tensors'][name]['sha256'] for name in (
        TRAIN_FILE, TEST_FILE, VALID_FILE)).encode()).hexdigest()
    assert metadata['fingerprint'] == hashlib.sha256(
        f"{metadata['source_sha256']}:{metadata['id_maps_sha256']}:{split}".encode()
    ).hexdigest()[:16] != before['fingerprint']
    read_metadata(str(held))  # which checks the fingerprint


def few_and_many_ratings(path):
    """60 users with 2 to 10 rows over 25 items, at times 0..9: ties in time, repeated pairs,
    and users with under 3 distinct interactions."""
    generator = random.Random(2)
    rows = ['user_id,item_id,timestamp']
    for user in range(60):
        for _ in range(2 + user % 9):
            rows.append(f'u{user},i{generator.randrange(25)},{generator.randrange(10)}')
    return write(path, '\n'.join(rows) + '\n')


def by_user(pairs):
    """{user: [item, ...]} of [user, item] rows, in their order."""
    items = {}
    for user, item in pairs:
        items.setdefault(user, []).append(item)
    return items


@pytest.mark.parametrize('sampling', ['recipe', 'paper'])
def test_validation_holdout_rules_and_negatives(sampling, tmp_path):
    """Each user's latest training interaction becomes the validation positive where a training
    one stays; the test set is untouched; the validation negatives avoid what the sampling
    says, as if the test set did not exist, and follow the seed."""
    argv = ['--path', few_and_many_ratings(tmp_path / 'ratings.csv'), '--min_ratings', '2',
            '--valid_negative', '6', '--test_negative_sampling', sampling]
    for name, extra in (('plain', []), ('held', ['--validation_holdout']),
                        ('again', ['--validation_holdout']),
                        ('seed2', ['--validation_holdout', '--seed', '2'])):
        convert.main(argv + ['--output', str(tmp_path / name), *extra])
    plain, held = tmp_path / 'plain', tmp_path / 'held'
    metadata = json.loads((held / METADATA_FILE).read_text())
    n_users, n_items = metadata['n_users'], metadata['n_items']
    assert metadata['dropped_repeats'] > 20

    training_before = by_user(load(plain, TRAIN_FILE).tolist())  # by user, then time
    valid = load(held, VALID_FILE).tolist()
    assert [user for user, _ in valid] == list(range(n_users))
    expected_train = []
    for user in range(n_users):
        items = training_before.get(user, [])
        assert valid[user][1] == (items[-1] if len(items) >= 2 else -1)
        expected_train += [[user, item] for item in (items[:-1] if len(items) >= 2 else items)]
    train = load(held, TRAIN_FILE).tolist()
    assert train == expected_train
    validated = [user for user, item in valid if item >= 0]
    assert metadata['validation']['users'] == len(validated) and 0 < len(validated) < n_users
    training = {tuple(pair) for pair in train}
    assert not any((user, valid[user][1]) in training for user in validated)
    for name in (TEST_FILE, TEST_NEGATIVES_FILE, USER_IDS_FILE, ITEM_IDS_FILE):
        assert (held / name).read_bytes() == (plain / name).read_bytes()

    negatives = load(held, VALID_NEGATIVES_FILE).tolist()
    avoided = training | {(user, valid[user][1]) for user in validated} if sampling == 'paper' \
        else training
    for user, row in enumerate(negatives):
        if user not in validated:
            assert row == [-1] * 6
            continue
        assert all(0 <= item < n_items and (user, item) not in avoided for item in row)
        if sampling == 'paper':
            assert len(set(row)) == 6
    assert metadata['validation']['negatives'] == sampling
    assert snapshot(tmp_path / 'again') == snapshot(held)
    other_seed = tmp_path / 'seed2'
    assert (other_seed / VALID_FILE).read_bytes() == (held / VALID_FILE).read_bytes()
    assert (other_seed / VALID_NEGATIVES_FILE).read_bytes() != \
        (held / VALID_NEGATIVES_FILE).read_bytes()


def ratings_with_test_items(path, choice):
    """30 users with 6 distinct items out of 20 each, then each one's latest interaction, the
    test positive: the `choice`-th item they have not rated. The items appear first in the
    training rows, so the id maps do not depend on `choice`."""
    generator = random.Random(3)
    rows, tests = ['user_id,item_id,timestamp'], []
    for user in range(30):
        items = generator.sample(range(20), 6)
        rows += [f'u{user},i{item},{when}' for when, item in enumerate(items)]
        tests.append(f'u{user},i{[i for i in range(20) if i not in items][choice]},9')
    return write(path, '\n'.join(rows + tests) + '\n')


@pytest.mark.parametrize('sampling', ['recipe', 'paper'])
def test_validation_never_depends_on_the_test_positives(sampling, tmp_path):
    caches = []
    for choice in (0, 1):
        caches.append(tmp_path / f'choice{choice}')
        convert.main(['--path', ratings_with_test_items(tmp_path / f'{choice}.csv', choice),
                      '--output', str(caches[-1]), '--min_ratings', '2', '--valid_negative', '5',
                      '--test_negative_sampling', sampling, '--validation_holdout'])
    first, second = (snapshot(cache) for cache in caches)
    assert first[TEST_FILE] != second[TEST_FILE]
    for name in (TRAIN_FILE, VALID_FILE, VALID_NEGATIVES_FILE, USER_IDS_FILE, ITEM_IDS_FILE):
        assert first[name] == second[name], name


def test_the_papers_files_with_a_validation_holdout(tmp_path, capsys):
    """Each user's latest training rating (ties: the later line) is cut out of the training
    file, with any earlier rating of the same item; a user with a single training item keeps
    it. The test set stays the files'; the validation negatives are drawn as the paper draws."""
    prefix, train, test, negative = paper_split(tmp_path)
    rows = sorted(train, key=lambda row: (row[0], row[3]))  # by user, then time
    by_user_rows = [rows[11 * user:11 * (user + 1)] for user in range(50)]
    # user 0: their two latest ratings at one time, the earlier of them on the later line
    tied = (0, by_user_rows[0][9][1], 5, by_user_rows[0][10][3])
    rows = [row for row in rows if row != by_user_rows[0][9]] + [tied]
    rows = [row for row in rows if row[0] != 1] + [by_user_rows[1][0]]  # user 1: one rating
    rows.append((2, by_user_rows[2][10][1], 1, 1))  # user 2 rated their latest item before
    write_rows(prefix + '.train.rating', rows)
    expected = [row[-1][1] for row in by_user_rows]
    expected[0], expected[1] = tied[1], -1
    argv = ['--path', prefix, '--validation_holdout', '--seed', '7']
    convert.main(argv + ['--output', str(tmp_path / 'held')])
    assert '[convert] validation holdout: 49 users with a validation positive, 1 without (a ' \
        'single item in training); drew 20 validation negatives per user (paper)' in \
        capsys.readouterr().err
    held = tmp_path / 'held'
    assert load(held, VALID_FILE).tolist() == [[user, item] for user, item in enumerate(expected)]
    kept = [(user, item) for user, item, *_ in rows if item != expected[user]]
    assert sorted(map(tuple, load(held, TRAIN_FILE).tolist())) == sorted(kept)
    assert load(held, TEST_FILE).tolist() == [list(pair) for pair in test]
    assert load(held, TEST_NEGATIVES_FILE).tolist() == negative
    metadata = json.loads((held / METADATA_FILE).read_text())
    assert metadata['validation'] == {'holdout': 'latest', 'users': 49, 'users_without': 1,
                                      'negatives': 'paper', 'seed': validation_seed(7)}
    assert (metadata['n_train'], metadata['n_valid'], metadata['source_rows']) == \
        (len(kept), 49, len(rows) + 50)
    assert (metadata['split'], metadata['seed'], metadata['valid_negative']) == ('given', None, 20)
    interactions = {(user, item) for user, item, *_ in rows}
    for user, row in enumerate(load(held, VALID_NEGATIVES_FILE).tolist()):
        if user == 1:
            assert row == [-1] * 20
            continue
        assert len(set(row)) == 20 and not any((user, item) in interactions for item in row)
    convert.main(argv + ['--output', str(tmp_path / 'again')])
    convert.main(argv[:-1] + ['8', '--output', str(tmp_path / 'seed8')])
    assert snapshot(tmp_path / 'again') == snapshot(held)
    assert (tmp_path / 'seed8' / VALID_NEGATIVES_FILE).read_bytes() != \
        (held / VALID_NEGATIVES_FILE).read_bytes()
    read_metadata(str(held))
