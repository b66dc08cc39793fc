"""synthetic.py, prepare_dataset.sh and download_dataset.sh."""
import hashlib
import json
import os
import sys
import zipfile

import numpy as np
import pytest

import synthetic
from conftest import assert_one_line_error, run_script


def test_synthetic_is_movielens_shaped_and_deterministic():
    user, item, rating, timestamp = synthetic.generate(users=300, items=200, rows=12000, seed=5)
    again = synthetic.generate(users=300, items=200, rows=12000, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((user, item, rating, timestamp), again))
    other = synthetic.generate(users=300, items=200, rows=12000, seed=6)
    assert not np.array_equal(item, other[1])
    assert len(user) == 12000
    assert np.bincount(user)[1:].min() >= synthetic.MIN_ROWS_PER_USER
    assert set(np.unique(user)) == set(range(1, 301))
    assert set(np.unique(item)) == set(range(1, 201))
    assert len(np.unique(user * 1000 + item)) == 12000  # no repeated pair
    assert np.all(np.diff(user) >= 0)  # grouped by user, as MovieLens files are


def test_synthetic_has_planted_structure():
    # Users of one group share more items with their closest neighbour than popularity alone
    # makes them share: compare with the same generator without groups (affinity 0).
    def neighbour_overlap(affinity):
        user, item, _, _ = synthetic.generate(users=400, items=300, rows=16000, groups=4,
                                              affinity=affinity, seed=1)
        matrix = np.zeros((400, 300))
        matrix[user - 1, item - 1] = 1
        overlap = matrix @ matrix.T
        np.fill_diagonal(overlap, 0)
        return np.median(overlap.max(1) / overlap.mean(1))
    assert neighbour_overlap(0.9) > 1.3 * neighbour_overlap(0.0)


def test_synthetic_cli_rejects_impossible_shapes(tmp_path):
    completed = run_script('synthetic.py', '--output', str(tmp_path / 'r.csv'), '--users', '10',
                           '--items', '30', '--rows', '5000')
    assert_one_line_error(completed, 'distinct interactions')
    assert not (tmp_path / 'r.csv').exists()


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


@pytest.mark.parametrize('n_train, flags', [(19_861_507, ''),
                                            (99_057, ' -b 4096 -l 0.002 -b1 0.9 -b2 0.999'),
                                            (2_900, ' -b 512 -l 0.002 -b1 0.9 -b2 0.999')])
def test_prepare_prints_a_training_command_that_fits(tmp_path, n_train, flags):
    """ML-20m keeps the reference's command; smaller data gets a batch well under an epoch."""
    ratings = tmp_path / 'raw' / 'ml-20m' / 'ratings.csv'
    ratings.parent.mkdir(parents=True)
    ratings.write_text('userId,movieId,rating,timestamp\n1,2,3.0,4\n')
    cache = tmp_path / 'cache'
    cache.mkdir()
    (cache / 'metadata.json').write_text(json.dumps({
        'version': 3, 'source_sha256': sha256(ratings), 'min_ratings': 20,
        'valid_negative': 100, 'seed': 1, 'n_train': n_train}))
    completed = prepare('ml-20m', str(tmp_path / 'raw'), str(cache), cwd=tmp_path)
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
