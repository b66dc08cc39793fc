"""ncflib/cli.py: the one-line contract itself: messages that stay one readable line, a signal
after the work said in one line too, and the check that a run's outputs are apart from
everything else it uses."""
import signal
import subprocess

import pytest

from conftest import PYTHON, ROOT
from ncflib import cli
from ncflib.cli import UsageError


def test_a_message_quoting_bytes_stays_one_readable_line(capsys):
    def fail():
        raise UsageError('the first line is "\x00\x00\x1b[2J\r\nx"')
    with pytest.raises(SystemExit):
        cli.run_main('demo', fail)
    assert capsys.readouterr().err == 'demo: error: the first line is "\\x00\\x00\\x1b[2J\\r\\nx"\n'


@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize('handling', ['handle_signals_early', 'handle_signals_late'])
def test_a_signal_after_the_work_says_what_was_kept(handling, signum, code):
    """Between run_main's return and the process's end (a script's last lines, torch's own
    shutdown), a signal still ends in one line, saying what the finished run left."""
    script = (f'import sys, time; sys.path.insert(0, {ROOT!r}); from ncflib import cli; '
              f"cli.{handling}('demo'); "
              "cli.run_main('demo', lambda: None, kept='the cache in X is complete'); "
              "print('returned', flush=True); time.sleep(120)")
    process = subprocess.Popen([PYTHON, '-c', script], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == 'returned\n'
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code
    assert err == 'demo: interrupted: the cache in X is complete\n'


def test_paths_apart(tmp_path):
    model, log = str(tmp_path / 'ck' / 'model.pth'), str(tmp_path / 'log.json')
    cli.check_paths_apart({str(tmp_path / 'data.pt'): 'the data'}, {model: 'model', log: 'log'},
                          {str(tmp_path / 'ck'): 'the directory'})
    cases = [
        ({log: 'the data'}, {log: 'the log'}, {}, 'the log is the data, which this run reads'),
        ({}, [(log, 'the log'), (log, 'the model')], {},
         'the log is the model, which this run writes too'),
        ({}, {log: 'the log'}, {log: 'the directory'}, 'the log is the directory, a directory'),
        ({}, {model: 'the model', f'{model}/log.json': 'the log'}, {},
         'the log would be inside the model, a file this run writes'),
        ({}, {model: 'the model'}, {f'{model}/tb': 'the board'},
         'the board would be inside the model'),
    ]
    for reads, writes, directories, message in cases:
        with pytest.raises(UsageError, match=message):
            cli.check_paths_apart(reads, writes, directories)
    (tmp_path / 'link').symlink_to(tmp_path / 'data.pt')
    with pytest.raises(UsageError, match='which this run reads'):
        cli.check_paths_apart({str(tmp_path / 'data.pt'): 'the data'},
                              {str(tmp_path / 'link'): 'the log'})


def test_an_interrupted_script_says_one_line_however_many_signals_follow():
    """A terminal's Ctrl-C reaches a benchmark and its child, which the benchmark then passes
    on: a signal after the first one's line is ignored, not a second line."""
    script = (f'import atexit, os, signal, sys; sys.path.insert(0, {ROOT!r}); '
              'from ncflib import cli; cli.handle_signals_late("demo"); '
              'atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT)); '
              'cli.run_main("demo", lambda: os.kill(os.getpid(), signal.SIGTERM), kept="X")')
    done = subprocess.run([PYTHON, '-c', script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143
    assert done.stderr == 'demo: interrupted: X\n'


def test_a_signal_after_an_error_line_adds_no_line():
    """torchrun stops the other processes of a run whose process failed: the failed one's
    error line is its only line."""
    script = (f'import os, signal, sys; sys.path.insert(0, {ROOT!r}); from ncflib import cli; '
              'cli.handle_signals_late("demo")\n'
              'def fail(): raise cli.UsageError("bad input")\n'
              'try: cli.run_main("demo", fail)\n'
              'finally: os.kill(os.getpid(), signal.SIGTERM)')
    done = subprocess.run([PYTHON, '-c', script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143
    assert done.stderr == 'demo: error: bad input\n'
