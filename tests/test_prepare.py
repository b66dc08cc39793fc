"""prepare_dataset.sh (with prepare.py, its Python side) and download_dataset.sh: work done once,
by content; every bad input and fault in one line, nothing half-written."""
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile

import pytest

import convert
import synthetic
from conftest import (HOLDING_PYTHON, PYTHON, ROOT, assert_one_line_error, read_only,
                      run_script, snapshot)


def prepare(*arguments, cwd):
    return run_script('prepare_dataset.sh', *arguments, cwd=str(cwd),
                      env={'PYTHON': sys.executable, 'NCF_DOWNLOAD_URL': 'http://127.0.0.1:9'})


def sha256(path):
    with open(path, 'rb') as file:
        return hashlib.sha256(file.read()).hexdigest()


SMALL = ['--users', '300', '--items', '200', '--rows', '9000']


def test_prepare_synthetic_from_any_directory_and_reconverts_what_changed(tmp_path):
    raw = tmp_path / 'raw'
    cache = raw / 'cache' / 'synthetic'
    ratings = raw / 'synthetic' / 'ratings.csv'
    # Generated with these options already (in this process: one start of torch fewer).
    synthetic.write_csv(str(ratings), synthetic.generate(users=300, items=200, rows=9000))
    (raw / 'synthetic' / 'options').write_text(' '.join(SMALL) + '\n')
    first = prepare('synthetic', str(raw), str(cache), *SMALL, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f'Using {ratings}' in first.stdout
    metadata = json.loads((cache / 'metadata.json').read_text())
    assert metadata['n_users'] == 300 and metadata['source_sha256'] == sha256(ratings)
    # An epoch is 8,700 x 5 samples: the printed command's batch fits 16 times in it.
    assert f'python ncf.py --data {cache} -b 2048 -l 0.002 -b1 0.9 -b2 0.999\n' in first.stdout
    second = prepare('synthetic', str(raw), str(cache), *SMALL, cwd=tmp_path)
    assert 'Using cached preprocessed data' in second.stdout
    assert 'Preprocessing' not in second.stdout

    # A cache changed since convert.py wrote it (ncf.py would refuse it) is converted again.
    import torch
    negatives = cache / 'test_negatives.pt'
    converted = negatives.read_bytes()
    os.remove(negatives)
    torch.save(torch.zeros(300, 100, dtype=torch.long), negatives)
    again = prepare('synthetic', str(raw), str(cache), *SMALL, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert 'it has changed since convert.py wrote it' in again.stdout
    assert negatives.read_bytes() == converted

    # Other options regenerate the file, and the cache follows.
    third = prepare('synthetic', str(raw), str(cache), '--users', '100', '--items', '150',
                    '--rows', '3000', cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert 'the ratings file has changed since it was converted' in third.stdout
    assert json.loads((cache / 'metadata.json').read_text())['n_users'] == 100

    # A ratings file replaced by another of the same size with an older modification time.
    stat = os.stat(ratings)
    lines = ratings.read_text().splitlines(keepends=True)
    user, item, timestamp = lines[-1].rstrip('\n').split(',')
    lines[-1] = f'{user},{item},{timestamp[::-1]}\n'  # same length, another time
    replacement = tmp_path / 'replacement.csv'
    replacement.write_text(''.join(lines))
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10 ** 12))
    os.replace(replacement, ratings)
    assert os.stat(ratings).st_size == stat.st_size
    fourth = prepare('synthetic', str(raw), str(cache), '--users', '100', '--items', '150',
                     '--rows', '3000', cwd=tmp_path)
    assert fourth.returncode == 0, fourth.stderr
    assert f'Hashing {ratings}' in fourth.stdout
    assert 'the ratings file has changed since it was converted' in fourth.stdout
    assert json.loads((cache / 'metadata.json').read_text())['source_sha256'] == sha256(ratings)


def test_prepare_converts_again_when_the_validation_holdout_changes(tmp_path):
    """--validation_holdout goes to convert.py (the other options to synthetic.py, wherever it
    stands among them); a cache with the holdout is reused only when it is asked for, and one
    without only when it is not."""
    raw = tmp_path / 'raw'
    cache = raw / 'cache' / 'synthetic'
    ratings = raw / 'synthetic' / 'ratings.csv'
    synthetic.write_csv(str(ratings), synthetic.generate(users=300, items=200, rows=9000))
    (raw / 'synthetic' / 'options').write_text(' '.join(SMALL) + '\n')
    convert.main(['--path', str(ratings), '--output', str(cache)])  # without the holdout
    first = prepare('synthetic', str(raw), str(cache), '--validation_holdout', *SMALL,
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f'Using {ratings}' in first.stdout  # not generated again
    assert '(the cache was converted without a validation holdout)' in first.stdout
    metadata = json.loads((cache / 'metadata.json').read_text())
    assert metadata['validation']['users'] == metadata['n_valid'] > 0
    assert (cache / 'valid_ratings.pt').exists()
    second = prepare('synthetic', str(raw), str(cache), *SMALL[:2], '--validation_holdout',
                     *SMALL[2:], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert 'Using cached preprocessed data' in second.stdout
    assert ', with a validation holdout)' in second.stdout and 'Preprocessing' not in second.stdout
    third = prepare('synthetic', str(raw), str(cache), *SMALL, cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert '(the cache was converted with a validation holdout)' in third.stdout
    assert 'validation' not in json.loads((cache / 'metadata.json').read_text())
    assert not (cache / 'valid_ratings.pt').exists()


def test_prepare_a_movielens_dataset_with_a_validation_holdout(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    with zipfile.ZipFile(raw / 'ml-100k.zip', 'w') as archive:
        archive.writestr('ml-100k/u.data', u_data(1))
    completed = prepare('ml-100k', str(raw), str(raw / 'cache'), '--validation_holdout',
                        cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert 'validation holdout: 300 users with a validation positive' in completed.stderr
    metadata = json.loads((raw / 'cache' / 'metadata.json').read_text())
    assert metadata['n_valid'] == 300 and metadata['validation']['negatives'] == 'recipe'


def test_prepare_decide_takes_only_the_validation_holdout(tmp_path):
    ratings = tmp_path / 'ratings.csv'
    ratings.write_text('user_id,item_id,timestamp\n1,2,3\n')
    completed = run_script('prepare.py', 'decide', str(ratings), str(tmp_path / 'cache'),
                           '--seed')
    assert_one_line_error(completed, 'prepare.py decide takes no option --seed (only '
                                     '--validation_holdout)')
    assert completed.returncode == 1 and not (tmp_path / 'cache').exists()


def u_data(seed):
    user, item, rating, timestamp = synthetic.generate(users=300, items=200, rows=9000,
                                                       groups=4, seed=seed)
    return ''.join(f'{u}\t{i}\t{int(r)}\t{t}\n' for u, i, r, t in
                   zip(user, item, rating, timestamp))


def test_prepare_extracts_and_converts_again_when_the_zip_changes(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    cache = raw / 'cache' / 'ml-100k'
    ratings = raw / 'ml-100k' / 'u.data'
    contents = {seed: u_data(seed) for seed in (1, 2)}
    with zipfile.ZipFile(raw / 'ml-100k.zip', 'w') as archive:
        archive.writestr('ml-100k/u.data', contents[1])
    first = prepare('ml-100k', str(raw), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert 'Extracting ml-100k/u.data' in first.stdout and 'Preprocessing' in first.stdout
    metadata = json.loads((cache / 'metadata.json').read_text())
    assert metadata['source_sha256'] == hashlib.sha256(contents[1].encode()).hexdigest()

    # Unchanged: nothing is extracted, converted or even hashed again (the digests are
    # remembered beside the files).
    sidecars = {path: os.stat(path).st_mtime_ns
                for path in (f'{raw}/ml-100k.zip.sha256', f'{ratings}.sha256')}
    second = prepare('ml-100k', str(raw), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert 'Hashing' not in second.stdout and 'Extracting' not in second.stdout
    assert 'Using cached preprocessed data' in second.stdout
    assert {path: os.stat(path).st_mtime_ns for path in sidecars} == sidecars

    # Another zip in its place: extracted and converted again.
    with zipfile.ZipFile(raw / 'ml-100k.zip', 'w') as archive:
        archive.writestr('ml-100k/u.data', contents[2])
    third = prepare('ml-100k', str(raw), cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert 'the zip has changed since it was last extracted' in third.stdout
    assert 'the ratings file has changed since it was converted' in third.stdout
    metadata = json.loads((cache / 'metadata.json').read_text())
    assert metadata['source_sha256'] == hashlib.sha256(contents[2].encode()).hexdigest()

    # No zip at all: the extracted file is used as it is.
    os.remove(raw / 'ml-100k.zip')
    fourth = prepare('ml-100k', str(raw), cwd=tmp_path)
    assert 'no ' in fourth.stdout and 'Using cached preprocessed data' in fourth.stdout


# Each newer preset: the archive's member, and how its ratings are laid out there.
PRESETS = {'ml-25m': ('ml-25m/ratings.csv', 'ml-20m'), 'ml-32m': ('ml-32m/ratings.csv', 'ml-20m'),
           'ml-10m': ('ml-10M100K/ratings.dat', 'ml-1m')}


def ratings_text(layout, seed=3):
    user, item, rating, timestamp = synthetic.generate(users=300, items=200, rows=9000,
                                                       groups=4, seed=seed)
    rows = zip(user, item, rating, timestamp)
    if layout == 'ml-1m':  # '::'-separated, no header, as ML-1m's and ML-10m's ratings.dat
        return ''.join(f'{u}::{i}::{r}::{t}\n' for u, i, r, t in rows)
    return 'userId,movieId,rating,timestamp\n' + ''.join(f'{u},{i},{r},{t}\n'
                                                         for u, i, r, t in rows)


@pytest.mark.parametrize('dataset', sorted(PRESETS))
def test_each_newer_preset_extracts_its_ratings_and_converts_them(dataset, tmp_path):
    """A small zip of the preset's layout, put there by hand (offline), prepares as the real
    one would: its member extracted, read in its format, the same split as any other file."""
    member, layout = PRESETS[dataset]
    raw = tmp_path / 'raw'
    raw.mkdir()
    text = ratings_text(layout)
    with zipfile.ZipFile(raw / f'{dataset}.zip', 'w') as archive:
        archive.writestr(member, text)
        archive.writestr(f'{member.split("/")[0]}/README.txt', 'not ratings')
    completed = prepare(dataset, str(raw), cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert f'Extracting {member}' in completed.stdout
    metadata = json.loads((raw / 'cache' / dataset / 'metadata.json').read_text())
    assert metadata['source_format'] == layout
    assert metadata['source_sha256'] == hashlib.sha256(text.encode()).hexdigest()
    assert (metadata['n_users'], metadata['n_train'] + metadata['n_test']) == (300, 9000)
    assert f'Dataset {dataset} prepared at' in completed.stdout
    # without the zip, the download is tried from GroupLens's place for this preset
    os.remove(raw / f'{dataset}.zip')
    shutil.rmtree(raw / member.split('/')[0])
    failed = prepare(dataset, str(raw), cwd=tmp_path)
    assert_one_line_error(failed, f'http://127.0.0.1:9/{dataset}.zip', 'by hand')


@pytest.mark.parametrize('n_train, flags', [(19_861_507, ''),
                                            (99_057, ' -b 4096 -l 0.002 -b1 0.9 -b2 0.999'),
                                            (2_900, ' -b 512 -l 0.002 -b1 0.9 -b2 0.999')])
def test_prepare_prints_a_training_command_that_fits(tmp_path, n_train, flags):
    """ML-20m keeps the reference's command; smaller data gets a batch well under an epoch
    (prepare.py's last step, on a cache of that size)."""
    cache = tmp_path / 'cache'
    cache.mkdir()
    (cache / 'metadata.json').write_text(json.dumps({'version': 3, 'n_train': n_train}))
    completed = run_script('prepare.py', 'command', str(cache))
    assert completed.returncode == 0, completed.stderr
    assert f'You can now run the training with: python ncf.py --data {cache}{flags}\n' \
        in completed.stdout
    assert f'torchrun --nproc_per_node=<number_of_GPUs> ncf.py --data {cache}{flags}\n' \
        in completed.stdout


def test_prepare_reuses_a_zip_put_there_by_hand(tmp_path, ml100k):
    raw = tmp_path / 'raw'
    raw.mkdir()
    with zipfile.ZipFile(raw / 'ml-100k.zip', 'w') as archive:
        archive.write(ml100k, 'ml-100k/u.data')
    completed = run_script('prepare_dataset.sh', 'ml-100k', str(raw), cwd=str(tmp_path),
                           env={'PYTHON': __import__('sys').executable,
                                'NCF_DOWNLOAD_URL': 'http://127.0.0.1:9'})
    assert completed.returncode == 0, completed.stderr
    metadata = json.loads((raw / 'cache' / 'ml-100k' / 'metadata.json').read_text())
    assert (metadata['n_users'], metadata['n_items'], metadata['n_train']) == (943, 1682, 99057)


def test_failed_download_is_one_line_and_leaves_no_partial_zip(tmp_path):
    raw = tmp_path / 'raw'
    completed = run_script('prepare_dataset.sh', 'ml-1m', str(raw),
                           env={'NCF_DOWNLOAD_URL': 'http://127.0.0.1:9'})
    assert completed.returncode != 0
    assert_one_line_error(completed, 'http://127.0.0.1:9/ml-1m.zip', 'by hand')
    assert os.listdir(raw) == []


def test_corrupt_zip_and_wrong_checksum(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    (raw / 'ml-1m.zip').write_bytes(b'not a zip')
    completed = run_script('prepare_dataset.sh', 'ml-1m', str(raw))
    assert_one_line_error(completed, 'cannot extract ml-1m/ratings.dat')
    assert not (raw / 'ml-1m').exists() or os.listdir(raw / 'ml-1m') == []

    mirror = tmp_path / 'mirror'
    mirror.mkdir()
    (mirror / 'ml-100k.zip').write_bytes(b'tampered')
    completed = run_script('download_dataset.sh', 'ml-100k', str(tmp_path / 'dl'),
                           env={'NCF_DOWNLOAD_URL': f'file://{mirror}'})
    assert_one_line_error(completed, 'MD5')
    assert os.listdir(tmp_path / 'dl') == []


@pytest.mark.parametrize('arguments', [('ml-5m',), ('ml-1m', 'raw', 'cache', '--users', '3')])
def test_prepare_rejects_bad_arguments(tmp_path, arguments):
    completed = run_script('prepare_dataset.sh', *arguments, cwd=str(tmp_path))
    assert_one_line_error(completed)


# ------------------------------------------------------------------------------------------------
# Bad input and faults: one line, a non-zero exit, every file as it was

def command(script, *args):
    return [os.path.join(ROOT, script), *args]


def run(argv, prefix=(), cwd=None, timeout=120):
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or ROOT, env={**os.environ, 'PYTHON': PYTHON})


def check_case(completed, before, after, fragment):
    assert_one_line_error(completed, fragment)
    assert completed.returncode == 1 or completed.returncode == 2, completed.stderr
    assert after == before, sorted(set(after) ^ set(before)) or 'a file changed'


def zip_of(path, member, contents):
    import zipfile
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr(member, contents)


PREPARE_CASES = {
    # name: (arguments, setup of tmp_path, fragment)
    'unknown dataset': (['ml-5m', 'raw'], None, 'unsupported dataset ml-5m'),
    'options for a MovieLens dataset': (['ml-1m', 'raw', 'cache', '--users', '3'], None,
                                        'options after CACHE_DIR'),
    'an option before CACHE_DIR': (['ml-100k', 'raw', '--validation_holdout'], None,
                                   '--validation_holdout stands where DATASET, RAW_DIR or '
                                   'CACHE_DIR goes: options come after all three'),
    'RAW_DIR is a file': (['ml-100k', 'FILE'], None, 'RAW_DIR'),
    'CACHE_DIR is a file': (['synthetic', 'raw', 'FILE'], None, 'CACHE_DIR'),
    'CACHE_DIR under a file': (['synthetic', 'raw', 'FILE/cache'], None, 'CACHE_DIR'),
    'corrupt zip': (['ml-1m', 'raw'], lambda raw: (raw / 'ml-1m.zip').write_bytes(b'not a zip'),
                    'cannot extract ml-1m/ratings.dat'),
    'zip without the ratings': (['ml-100k', 'raw'],
                                lambda raw: zip_of(raw / 'ml-100k.zip', 'ml-100k/README', 'hi'),
                                'cannot extract ml-100k/u.data'),
    'garbage ratings': (['ml-100k', 'raw'],
                        lambda raw: zip_of(raw / 'ml-100k.zip', 'ml-100k/u.data', 'a;b\n'),
                        'cannot tell the format'),
    'bad synthetic options': (['synthetic', 'raw', 'cache', '--users', '0'], None,
                              'must be positive'),
}


@pytest.mark.parametrize('case', list(PREPARE_CASES))
def test_prepare_bad_input(case, tmp_path):
    arguments, setup, fragment = PREPARE_CASES[case]
    (tmp_path / 'raw').mkdir()
    (tmp_path / 'FILE').write_text('not a directory')
    if setup:
        setup(tmp_path / 'raw')
    if case == 'garbage ratings':  # extracted already: only the conversion fails
        assert run(command('prepare_dataset.sh', *arguments), cwd=tmp_path).returncode == 1
    before = snapshot(tmp_path)
    completed = run(command('prepare_dataset.sh', *arguments), cwd=tmp_path)
    check_case(completed, before, snapshot(tmp_path), fragment)


def test_prepare_read_only_raw_dir(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    zip_of(raw / 'ml-100k.zip', 'ml-100k/u.data', '1\t2\t3\t4\n')
    before = snapshot(tmp_path)
    with read_only(raw) as prefix:
        completed = run(command('prepare_dataset.sh', 'ml-100k', str(raw),
                                str(tmp_path / 'cache')), prefix)
    check_case(completed, before, snapshot(tmp_path), 'read-only')


def test_prepare_help():
    for flag in ('-h', '--help'):
        completed = run(command('prepare_dataset.sh', flag))
        assert completed.returncode == 0 and completed.stderr == ''
        assert completed.stdout.startswith('Prepare a dataset for ncf.py')
        assert './prepare_dataset.sh [DATASET] [RAW_DIR] [CACHE_DIR]' in completed.stdout
    completed = run(command('download_dataset.sh', '--help'))
    assert completed.returncode == 0
    assert 'DATASET: ml-20m | ml-25m | ml-32m | ml-10m | ml-1m | ml-100k' in completed.stdout


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    """A small ratings file and a cache of other data."""
    directory = tmp_path_factory.mktemp('small')
    paths = {'a': str(directory / 'a.csv'), 'b': str(directory / 'b.csv'),
             'cache': str(directory / 'cache')}
    for name, seed in (('a', 1), ('b', 2)):
        synthetic.write_csv(paths[name], synthetic.generate(users=300, items=200, rows=9000,
                                                            groups=4, seed=seed))
    convert.main(['--path', paths['b'], '--output', paths['cache'], '--valid_negative', '50'])
    return paths


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_prepare_interrupted_keeps_the_previous_cache(signum, small, tmp_path):
    """SIGTERM to the script while convert.py writes; Ctrl-C (SIGINT to the whole process
    group, as a terminal sends it) likewise."""
    raw = tmp_path / 'raw'
    (raw / 'synthetic').mkdir(parents=True)
    shutil.copy(small['a'], raw / 'synthetic' / 'ratings.csv')
    (raw / 'synthetic' / 'options').write_text('\n')
    shutil.copytree(small['cache'], raw / 'cache' / 'synthetic')  # a cache of other data
    before = snapshot(raw / 'cache')
    (tmp_path / 'holding.py').write_text(HOLDING_PYTHON)
    python = tmp_path / 'python'
    python.write_text(f'#!/bin/sh\nexec {PYTHON} {tmp_path / "holding.py"} "$@"\n')
    python.chmod(0o755)
    process = subprocess.Popen(command('prepare_dataset.sh', 'synthetic', str(raw)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, 'PYTHON': str(python)})
    for line in process.stderr:
        if line.startswith('[test] staged'):
            break
    if signum == signal.SIGTERM:
        process.send_signal(signum)
    else:
        os.killpg(process.pid, signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    lines = stderr.strip().splitlines()
    assert 'Traceback' not in stderr
    assert lines[-1].endswith(f'interrupted: the previous cache in {raw}/cache/synthetic is '
                              'unchanged'), stderr
    assert sum('interrupted' in line for line in lines) == 1
    assert snapshot(raw / 'cache') == before


DOWNLOAD_CASES = {
    'no arguments': ([], 'expected DATASET and RAW_DIR'),
    'unsupported dataset': (['ml-5m', 'dl'], 'unsupported dataset ml-5m'),
    'RAW_DIR is a file': (['ml-100k', 'FILE'], 'not a directory'),
    'RAW_DIR under a file': (['ml-100k', 'FILE/dl'], 'not a directory'),
    'wrong MD5': (['ml-100k', 'dl'], 'MD5'),
    'unreachable': (['ml-1m', 'dl'], 'could not download'),
}


@pytest.mark.parametrize('case', list(DOWNLOAD_CASES))
def test_download_bad_input(case, tmp_path):
    arguments, fragment = DOWNLOAD_CASES[case]
    (tmp_path / 'FILE').write_text('not a directory')
    (tmp_path / 'mirror').mkdir()
    (tmp_path / 'mirror' / 'ml-100k.zip').write_bytes(b'tampered')
    before = snapshot(tmp_path)
    env = {**os.environ, 'NCF_DOWNLOAD_URL': f'file://{tmp_path}/mirror'}
    completed = subprocess.run(command('download_dataset.sh', *arguments), capture_output=True,
                               text=True, cwd=tmp_path, env=env, timeout=60)
    after = snapshot(tmp_path)
    after.pop('dl/', None)  # RAW_DIR is created, and stays empty
    check_case(completed, before, after, fragment)


def test_download_read_only_raw_dir(tmp_path):
    before = snapshot(tmp_path)
    with read_only(tmp_path) as prefix:
        completed = run(command('download_dataset.sh', 'ml-100k', str(tmp_path)), prefix)
    check_case(completed, before, snapshot(tmp_path), 'not writable')


@contextlib.contextmanager
def stalling_server():
    """An HTTP server that accepts and then sends nothing: a download that hangs."""
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(4)
    connections = []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                connections.append(server.accept()[0])
    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f'http://127.0.0.1:{server.getsockname()[1]}'
    finally:
        server.close()
        for connection in connections:
            connection.close()


def test_download_interrupted_and_stale_partials(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    dead = subprocess.run([PYTHON, '-c', 'import os; print(os.getpid())'], capture_output=True,
                          text=True).stdout.strip()
    stale = raw / f'.ml-100k.zip.{dead}.AbC123.part'  # left by a download killed outright
    live = raw / f'.ml-100k.zip.{os.getpid()}.AbC123.part'  # a running download's
    stale.write_bytes(b'partial')
    live.write_bytes(b'partial')
    with stalling_server() as url:
        process = subprocess.Popen(command('download_dataset.sh', 'ml-100k', str(raw)),
                                   stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, 'NCF_DOWNLOAD_URL': url})
        assert process.stderr.readline().startswith('Downloading')
        time.sleep(0.2)
        process.terminate()
        stderr = process.stderr.read()
        assert process.wait(30) == 143
    assert stderr.strip() == f'download_dataset.sh: interrupted: no {raw}/ml-100k.zip was written'
    assert sorted(os.listdir(raw)) == [live.name]
