"""synthetic.py: MovieLens-shaped ratings with planted structure, deterministic for a seed;
every bad input in one line, nothing half-written."""
import os
import subprocess

import numpy as np
import pytest

import synthetic
from conftest import PYTHON, ROOT, assert_one_line_error, fails, read_only, snapshot
from conftest import wait_for_handlers


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


CASES = {
    'impossible shape': (['--users', '10', '--items', '30', '--rows', '5000'],
                         'distinct interactions'),
    'no users': (['--users', '0'], 'must be positive'),
    'output is a directory': (['--output', 'DIR'], 'is a directory'),
    'output under a file': (['--output', 'FILE/r.csv'], 'cannot be written'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, capsys):
    arguments, fragment = CASES[case]
    (tmp_path / 'FILE').write_text('not a directory')
    (tmp_path / 'DIR').mkdir()
    (tmp_path / 'r.csv').write_text('previous')
    arguments = [str(tmp_path / a) if a.startswith(('FILE', 'DIR')) else a for a in arguments]
    if '--output' not in arguments:
        arguments += ['--output', str(tmp_path / 'r.csv')]
    before = snapshot(tmp_path)
    fails(synthetic.main, arguments, capsys, fragment)
    assert snapshot(tmp_path) == before


def test_read_only_and_interrupted(tmp_path):
    output = tmp_path / 'r.csv'
    output.write_text('previous')
    before = snapshot(tmp_path)
    script = [PYTHON, os.path.join(ROOT, 'synthetic.py'), '--output', str(output)]
    with read_only(tmp_path) as prefix:
        completed = subprocess.run([*prefix, *script], capture_output=True, text=True,
                                   timeout=120)
    assert_one_line_error(completed, 'read-only')
    assert snapshot(tmp_path) == before

    process = subprocess.Popen(script + ['--rows', '2000000', '--users', '20000', '--items',
                                         '4000'], stderr=subprocess.PIPE, text=True)
    wait_for_handlers(process)
    process.terminate()
    stderr = process.stderr.read()
    assert process.wait(30) == 143, stderr
    # before its work starts, or during it: one line either way
    assert stderr in (f'synthetic.py: interrupted: {output} is unchanged\n',
                      'synthetic.py: interrupted: nothing was written\n')
    assert snapshot(tmp_path) == before
