"""logger/: the JSON log in dllogger's layout, and logger.plot's curves from one or several
logs; every bad input in one line, nothing half-written."""
import os
import subprocess
import sys

import pytest

from conftest import PYTHON, ROOT, assert_one_line_error, fails, read_only, snapshot
from logger import Logger, plot


def write_log(path, epochs=3):
    logger = Logger(str(path))
    logger.log('PARAMETER', {'lr': 0.01})
    for epoch in range(1, epochs + 1):
        logger.log((epoch,), {'hr@10': 0.5 + epoch / 100, 'ndcg@10': 0.3, 'train_loss': 0.4,
                              'validation_loss': 0.2, 'train_throughput': 1e5,
                              'eval_throughput': 1e6})
    logger.log((), {'best_accuracy': 0.53})
    logger.close()


def test_plot_writes_a_png_from_one_or_several_logs(trained, tmp_path, capsys):
    pytest.importorskip('matplotlib')
    log = os.path.join(trained, 'log.json')
    for logs in ([log], [log, log]):
        output = tmp_path / f'curves{len(logs)}.png'
        plot.main(logs + ['-o', str(output)] + (['--labels', 'a', 'b'] if len(logs) == 2 else []))
        data = output.read_bytes()
        assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 10000
        import matplotlib.image
        assert matplotlib.image.imread(output).shape[:2] == (825, 1210)
    not_a_log = tmp_path / 'notes.json'
    not_a_log.write_text('{"hello": 1}\n')
    fails(plot.main, [str(not_a_log), '-o', str(tmp_path / 'x.png')], capsys,
          'is not a training log')
    assert not (tmp_path / 'x.png').exists()


def test_plot_without_matplotlib_says_so(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    fails(plot.main, [os.path.join(trained, 'log.json'), '-o', str(tmp_path / 'x.png')], capsys,
          'needs matplotlib: pip install matplotlib')


CASES = {
    'missing log': (['NOWHERE.json'], 'does not exist'),
    'log is a directory': (['DIR'], 'is a directory'),
    'zero-byte log': (['EMPTY'], 'is not a training log'),
    'binary garbage': (['GARBAGE'], 'is not a training log'),
    'output is a directory': (['LOG', '-o', 'DIR'], 'is a directory'),
    'output under a file': (['LOG', '-o', 'FILE/c.png'], 'cannot be written'),
    'output is the log': (['LOG', '-o', 'LOG'], 'is one of the logs'),
    'labels for other logs': (['LOG', '--labels', 'a', 'b'], '2 labels for 1 logs'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, capsys):
    arguments, fragment = CASES[case]
    write_log(tmp_path / 'log.json')
    (tmp_path / 'DIR').mkdir()
    (tmp_path / 'FILE').write_text('x')
    (tmp_path / 'EMPTY').write_bytes(b'')
    (tmp_path / 'GARBAGE').write_bytes(bytes(range(256)) * 4)
    placeholders = {'LOG': 'log.json', 'DIR': 'DIR', 'FILE': 'FILE', 'EMPTY': 'EMPTY',
                    'GARBAGE': 'GARBAGE', 'NOWHERE.json': 'NOWHERE.json'}
    arguments = [str(tmp_path / placeholders[a.split('/')[0]]) + a[len(a.split('/')[0]):]
                 if a.split('/')[0] in placeholders else a for a in arguments]
    if '-o' not in arguments:
        arguments += ['-o', str(tmp_path / 'curves.png')]
    before = snapshot(tmp_path)
    fails(plot.main, arguments, capsys, fragment)
    assert snapshot(tmp_path) == before


def test_read_only_output(tmp_path):
    write_log(tmp_path / 'log.json')
    before = snapshot(tmp_path)
    with read_only(tmp_path) as prefix:
        completed = subprocess.run([*prefix, PYTHON, '-m', 'logger.plot',
                                    str(tmp_path / 'log.json'), '-o',
                                    str(tmp_path / 'curves.png')], capture_output=True,
                                   text=True, timeout=120, cwd=ROOT)
    assert_one_line_error(completed, 'read-only')
    assert snapshot(tmp_path) == before


def test_plot_a_torn_log_from_anywhere(tmp_path):
    """A log whose writer was killed mid-line, and another one appended to it, plots what is
    readable, says what it skipped, and runs as a script or a module from another directory."""
    pytest.importorskip('matplotlib')
    log = tmp_path / 'log.json'
    write_log(log, epochs=2)
    text = log.read_text()
    log.write_text(text[:-40])  # killed mid-line
    logger = Logger(str(log), append=True)  # a resumed run appends
    logger.log((3,), {'hr@10': 0.6})
    logger.close()
    with open(log, 'a') as file:
        file.write('DLLL {"type": "LOG", "step": [4], "da\x00ta": \n')  # garbled
        file.write('DLLL 7\nDLLL {"type": "LOG", "step": ["x"], "data": {"hr@10": 1}}\n')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    as_script = subprocess.run([PYTHON, os.path.join(ROOT, 'logger', 'plot.py'), str(log),
                                '-o', 'new/dir/curves.png'], capture_output=True, text=True,
                               timeout=120, cwd=elsewhere)
    assert as_script.returncode == 0, as_script.stderr
    assert (elsewhere / 'new' / 'dir' / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    warning = [line for line in as_script.stderr.splitlines() if 'warning' in line]
    # line 4: torn, line 5: the resumed run's first record, 6 and 7: garbled
    assert warning == [f'logger.plot: warning: skipped 3 unreadable line(s) of {log} '
                       '(line 4, 6, 7)'], as_script.stderr
    assert plot.epoch_series(str(log))['hr@10'] == ([1, 2, 3], [0.51, 0.52, 0.6])
    as_module = subprocess.run([PYTHON, '-m', 'logger.plot', str(log), '-o', 'c.png'],
                               capture_output=True, text=True, cwd=elsewhere,
                               env={**os.environ, 'PYTHONPATH': ROOT})
    assert as_module.returncode == 0, as_module.stderr
    assert (elsewhere / 'c.png').exists()


def test_plot_says_which_values_it_skipped(tmp_path):
    """A record whose value is not a number (a hand-edited log, say) is left out of the curve,
    with a warning that names it."""
    log = tmp_path / 'log.json'
    write_log(log, epochs=3)
    logger = Logger(str(log), append=True)
    logger.log((2,), {'hr@10': 'high'})
    logger.close()
    warnings = []
    series = plot.epoch_series(str(log), warnings)
    assert series['hr@10'] == ([1, 3], [0.51, 0.53])
    assert warnings == [f'skipped values that are not numbers in {log}: hr@10 of epoch 2']
