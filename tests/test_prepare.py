"""synthetic.py, prepare_dataset.sh and download_dataset.sh."""
import json
import os
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


def test_prepare_synthetic_from_any_directory_and_skips_done_work(tmp_path):
    raw = tmp_path / 'raw'
    first = run_script('prepare_dataset.sh', 'synthetic', str(raw), cwd=str(tmp_path),
                       env={'PYTHON': __import__('sys').executable})
    assert first.returncode == 0, first.stderr
    cache = raw / 'cache' / 'synthetic'
    metadata = json.loads((cache / 'metadata.json').read_text())
    assert metadata['n_users'] == synthetic.DEFAULT_USERS
    assert f'python ncf.py --data {cache}' in first.stdout
    second = run_script('prepare_dataset.sh', 'synthetic', str(raw), cwd=str(tmp_path),
                        env={'PYTHON': __import__('sys').executable})
    assert 'Using cached preprocessed data' in second.stdout
    # Other options regenerate the file and, since it is newer, the cache.
    third = run_script('prepare_dataset.sh', 'synthetic', str(raw), str(tmp_path / 'small'),
                       '--users', '100', '--items', '80', '--rows', '3000', cwd=str(tmp_path),
                       env={'PYTHON': __import__('sys').executable})
    assert third.returncode == 0, third.stderr
    assert json.loads((tmp_path / 'small' / 'metadata.json').read_text())['n_users'] == 100


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
