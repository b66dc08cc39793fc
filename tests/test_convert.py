"""convert.py: the reference's split, the test negatives, the formats and every bad input."""
import csv
import hashlib
import json
import os
import signal

import pytest
import torch

import convert
import utils
from conftest import assert_one_line_error, run_script, snapshot
from dataloading import (ITEM_IDS_FILE, METADATA_FILE, TEST_FILE, TEST_NEGATIVES_FILE, TRAIN_FILE,
                         USER_IDS_FILE)

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
    commit = utils.FileSet.commit

    def commit_with_a_signal(self, last=None):
        os.kill(os.getpid(), signal.SIGINT)
        return commit(self, last)
    with monkeypatch.context() as patch:
        patch.setattr(utils.FileSet, 'commit', commit_with_a_signal)
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


def test_a_run_that_finds_another_writing_leaves_its_directory_alone(tmp_path, monkeypatch,
                                                                       capsys):
    """Two conversions into one new --output at once: this one made the directory, the other
    locked it first and is writing there. This one fails in one line, and must not remove the
    directory the other writes in."""
    output = tmp_path / 'new'
    other = []
    real_lock = convert.lock_directory

    def the_other_locks_first(directory):
        other.append(real_lock(directory))  # and has written nothing yet
        return real_lock(directory)
    monkeypatch.setattr(convert, 'lock_directory', the_other_locks_first)
    try:
        with pytest.raises(SystemExit):
            convert.main(['--path', write(tmp_path / 'r.csv', HAND_WRITTEN), '--output',
                          str(output), '--min_ratings', '3', '--valid_negative', '2'])
    finally:
        for descriptor in other:
            os.close(descriptor)
    assert_one_line_error(capsys.readouterr().err, 'another process is writing')
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


def test_publishing_renames_are_durable(tmp_path, monkeypatch):
    """Each file's data reaches the disk before the rename that publishes it, and the
    directory's entry after it (a power loss leaves the old file or the whole new one)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(('fsync', os.readlink(f'/proc/self/fd/{descriptor}')))
        return real_fsync(descriptor)

    def replace(source, target):
        events.append(('rename', str(target)))
        return real_replace(source, target)
    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    target = tmp_path / 'model.pth'
    utils.atomic_write(str(target), lambda temporary: open(temporary, 'w').write('x'))
    assert [kind for kind, _ in events] == ['fsync', 'rename', 'fsync']
    assert events[0][1].startswith(str(tmp_path / '.model.pth.'))
    assert events[2] == ('fsync', str(tmp_path))

    events.clear()
    convert.main(['--path', write(tmp_path / 'r.csv', HAND_WRITTEN), '--output',
                  str(tmp_path / 'cache'), '--min_ratings', '3', '--valid_negative', '2'])
    renames = [target for kind, target in events if kind == 'rename']
    assert renames[-1] == str(tmp_path / 'cache' / METADATA_FILE)  # metadata.json last
    synced = [path for kind, path in events if kind == 'fsync']
    for name in (TRAIN_FILE, TEST_FILE, TEST_NEGATIVES_FILE, USER_IDS_FILE, ITEM_IDS_FILE):
        staged = [path for path in synced if os.path.basename(path).startswith(f'.{name}.')]
        assert staged, name  # its data synced before the renames
        assert events.index(('fsync', staged[0])) < events.index(('rename', renames[0]))
    last = events.index(('rename', renames[-1]))
    assert ('fsync', str(tmp_path / 'cache')) in events[:last]  # the others' entries first
    assert events[last + 1] == ('fsync', str(tmp_path / 'cache'))
