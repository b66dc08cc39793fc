"""tune.py: a search on the validation holdout in a real SQLite study, resumed, shared by two
workers, a worker killed or stopped mid-trial, other data or another space refused, and the test
set never read before the search has ended."""
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time

import optuna
import pytest
import torch

from conftest import (PYTHON, ROOT, fails, make_cache, replace_tensor, snapshot,
                      wait_for_handlers)

import ncf  # noqa: E402
import tune  # noqa: E402
from ncflib import tuning  # noqa: E402

# A small space and short trials: each trial trains 2 epochs of a tiny MF in about a second.
SPACE = {'learning_rate': {'low': 0.002, 'high': 0.03, 'log': True},
         'factors': {'choices': [4, 8]}, 'negative_samples': {'low': 1, 'high': 3},
         'batch_size': 1024, 'optimizer': 'adam'}
FIXED = ['--model', 'mf', '-e', '2', '--valid_negative', '30', '--device', 'cpu',
         '--precision', 'fp32', '--seed', '3']
STATES = optuna.trial.TrialState


@pytest.fixture(scope='module')
def holdout_data(tmp_path_factory):
    """A synthetic cache with a validation holdout: 200 users, 150 items."""
    return make_cache(tmp_path_factory.mktemp('holdout'), 200, 150, 8000, 4, 5, 30,
                      '--validation_holdout')


@pytest.fixture(scope='module')
def space_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('space') / 'space.json'
    path.write_text(json.dumps(SPACE))
    return str(path)


def tune_argv(data, output, space, trials, *more):
    return ['--data', data, *FIXED, '--space', space, '--output', str(output), '--trials',
            str(trials), *more]


def load(output, name='ncf-mf'):
    return optuna.load_study(study_name=name, storage=f'sqlite:///{output}/study.db')


def counted(study):
    return [trial for trial in study.trials if tuning.counted(trial)]


def test_search_leaves_its_tables_and_the_best_trial_trains_again_with_ncf(
        holdout_data, space_file, tmp_path, capsys):
    output = tmp_path / 'out'
    summary = tune.main(tune_argv(holdout_data, output, space_file, 3))
    printed = capsys.readouterr().out
    study = load(output)
    assert len(counted(study)) == 3 and [t.number for t in study.trials] == [0, 1, 2]
    assert printed.count('Trial ') == 3 and 'Best of 3 trials' in printed
    best = study.best_trial
    assert summary['best_trial'] == best.number and summary['best_value'] == best.value
    for name in ('trials.csv', 'trials.md', 'best.json', 'best_model.pth', 'history.png'):
        assert (output / name).is_file(), name
    rows = (output / 'trials.csv').read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith('trial,state,valid_hr,best_epoch')
    written = json.loads((output / 'best.json').read_text())
    assert written['params'] == {**{flag: best.params[flag] for flag in best.params},
                                 'batch_size': 1024, 'optimizer': 'adam'}
    # The command in best.json trains that very trial again: the same validation figure each
    # epoch, and its test figure is the search's.
    command = written['ncf_command'].split()
    assert command[:2] == ['python', 'ncf.py']
    again = ncf.main(command[2:])
    assert again['hrs'] == [best.intermediate_values[epoch]
                            for epoch in sorted(best.intermediate_values)]
    assert again['test'].hr == pytest.approx(written['test']['hr@10'], abs=1e-12)
    assert again['test'].ndcg == pytest.approx(written['test']['ndcg@10'], abs=1e-12)
    assert written['validation']['hr@10'] == pytest.approx(best.value, abs=1e-12)
    # the trial's log holds validation figures, named so
    from logger.logger import read_log
    epochs = [entry['data'] for entry in read_log(output / 'trials' / f'{best.number:04d}' /
                                                  'log.json') if entry['step']]
    assert [figures['valid_hr@10'] for figures in epochs] == again['hrs']
    assert not any('hr@10' in figures for figures in epochs)
    # the trial's checkpoint is its best epoch's model
    assert torch.load(output / 'best_model.pth', weights_only=True).keys() == \
        torch.load(output / 'trials' / f'{best.number:04d}' / 'model.pth',
                   weights_only=True).keys()

    # A rerun of the finished study adds no trial and tests nothing again.
    before = snapshot(output / 'trials')
    again = tune.main(tune_argv(holdout_data, output, space_file, 3))
    assert len(load(output).trials) == 3 and again['test'] == summary['test']
    assert snapshot(output / 'trials') == before
    # A larger total continues it: the first trials kept, numbered on.
    params = [t.params for t in study.trials]
    tune.main(tune_argv(holdout_data, output, space_file, 4))
    study = load(output)
    assert [t.number for t in counted(study)] == [0, 1, 2, 3]
    assert [t.params for t in study.trials[:3]] == params


def test_the_search_never_reads_the_test_set(holdout_data, space_file, tmp_path, monkeypatch):
    """Two caches that differ only in each user's test positive give the same trials, figure
    for figure; during the trials the data holds no test set at all."""
    other = tmp_path / 'other'
    import shutil
    shutil.copytree(holdout_data, other)
    test = torch.load(other / 'test_ratings.pt', weights_only=True)
    train = torch.load(other / 'train_ratings.pt', weights_only=True)
    valid = torch.load(other / 'valid_ratings.pt', weights_only=True)
    n_items = int(json.loads((other / 'metadata.json').read_text())['n_items'])
    moved = test.clone()
    for user in range(len(test)):  # another item, none of the user's known ones
        known = set(train[train[:, 0] == user, 1].tolist()) | {int(valid[user, 1]),
                                                              int(test[user, 1])}
        moved[user, 1] = next(item for item in range(n_items) if item not in known)
    replace_tensor(str(other), 'test_ratings.pt', moved)

    seen = []
    run_trial = tuning.run_trial

    def watched(search, trial, values):
        seen.append((search.dataset.test_items, search.dataset.test_negatives))
        return run_trial(search, trial, values)
    monkeypatch.setattr(tuning, 'run_trial', watched)
    studies = []
    for data in (holdout_data, str(other)):
        output = tmp_path / os.path.basename(data)
        tune.main(tune_argv(data, output, space_file, 3))
        studies.append(load(output))
    assert seen == [(None, None)] * 6
    first, second = ([(t.params, t.intermediate_values, t.value) for t in study.trials]
                     for study in studies)
    assert first == second


def test_refusals(holdout_data, tiny_data, space_file, tmp_path, capsys):
    output = tmp_path / 'out'
    # a cache without a validation holdout: one line naming the option, no study made
    fails(tune.main, tune_argv(tiny_data, output, space_file, 2), capsys,
          'no validation holdout', '--validation_holdout')
    assert not (output / 'study.db').exists()
    # flags a trial sets, or that the space varies
    fails(tune.main, tune_argv(holdout_data, output, space_file, 2, '--checkpoint_dir', 'x'),
          capsys, '--checkpoint_dir has no place in a search')
    fails(tune.main, tune_argv(holdout_data, output, space_file, 2, '-l', '0.01'), capsys,
          '--learning_rate is in the search space')
    # bad space files
    for text, fragment in (('{"lr": 1}', 'lr is not a flag a search can vary'),
                           ('{"factors": {"low": 8}}', 'factors: give choices'),
                           ('{"learning_rate": {"low": 0, "high": 1, "log": true}}',
                            'low > 0'),
                           ('{"layers": {"choices": ["64 x"]}}', 'layers are positive sizes'),
                           ('{"optimizer": {"choices": ["adam", "sgd"]}, "learning_rate": '
                            '{"adam": {"low": 0.001, "high": 0.01}}}',
                            'no range for optimizer sgd'),
                           ('{not json', 'is not valid JSON')):
        path = tmp_path / 'bad.json'
        path.write_text(text)
        fails(tune.main, tune_argv(holdout_data, output, str(path), 2), capsys, fragment)
    (tmp_path / 'bad.yaml').write_text('factors: [8\n')
    fails(tune.main, tune_argv(holdout_data, output, str(tmp_path / 'bad.yaml'), 2), capsys,
          'is not valid YAML')
    assert not (output / 'study.db').exists()

    # A study continues only on the same data, space and objective.
    tune.main(tune_argv(holdout_data, output, space_file, 1))
    capsys.readouterr()
    other = tmp_path / 'other'
    import shutil
    shutil.copytree(holdout_data, other)
    train = torch.load(other / 'train_ratings.pt', weights_only=True)
    replace_tensor(str(other), 'train_ratings.pt', train[1:])
    fails(tune.main, tune_argv(str(other), output, space_file, 2), capsys, 'other data')
    space = tmp_path / 'space.yaml'
    space.write_text('factors: {choices: [4, 16]}\nlearning_rate: 0.01\n')
    fails(tune.main, tune_argv(holdout_data, output, str(space), 2), capsys,
          'another search space')
    fails(tune.main, tune_argv(holdout_data, output, space_file, 2, '--metric', 'ndcg'), capsys,
          'another objective')
    fails(tune.main, tune_argv(holdout_data, output, space_file, 2, '--topk', '5'), capsys,
          'another objective')
    assert len(load(output).trials) == 1
    fails(tune.main, tune_argv(holdout_data, output, space_file, 2, '--storage', 'nosuch://x'),
          capsys, '--storage nosuch://x')


def test_default_spaces_are_valid_for_each_model():
    for model, space in tuning.DEFAULT_SPACES.items():
        normal = tuning.check_space(space, 'default')
        point = tuning.suggest(None, normal)
        assert point['optimizer'] == 'adam' and point['learning_rate'] == 1e-4
        assert ('layers' in point) == (model in ('neumf', 'mlp'))
        assert ('weight_decay' in point) == (model != 'mf')


def start_worker(data, output, space, trials, *more):
    return subprocess.Popen([PYTHON, os.path.join(ROOT, 'tune.py'),
                             *tune_argv(data, output, space, trials, *more)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_workers_share_one_study(holdout_data, space_file, tmp_path):
    output = tmp_path / 'out'
    workers = [start_worker(holdout_data, output, space_file, 5) for _ in range(2)]
    results = [worker.communicate(timeout=600) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], results
    study = load(output)
    finished = counted(study)
    assert len(finished) == 5 and len({t.number for t in finished}) == 5
    # both ran trials, and the two drew different points
    lines = [out.count('Trial ') for out, _ in results]
    assert sum(lines) == 5
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == 5
    assert any('Best of 5 trials' in out for out, _ in results)


# A running trial with one to nine of SLOW's 12 epochs reported, read from optuna's tables.
RUNNING_TRIAL = """SELECT number FROM trials JOIN trial_intermediate_values USING (trial_id)
                   WHERE state = 'RUNNING' GROUP BY trial_id HAVING COUNT(*) BETWEEN 1 AND 9"""


def wait_for_running(worker, output, deadline=120):
    """The number of a running trial, once it has trained an epoch (so, well into its
    training: its heartbeat beats) and while at least three of SLOW's 12 epochs remain (a trial
    seen at its end may have ended, and the next one begun, by the time the test stops its
    worker). Each look is one read-only query on a connection closed after it: optuna's own
    storage would create tables where there are none yet and keep its connections open, and a
    worker that waits on a lock over sqlite's timeout fails its commit."""
    database = output / 'study.db'
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert worker.poll() is None, worker.communicate()
        if database.exists():
            try:
                with contextlib.closing(sqlite3.connect(f'file:{database}?mode=ro', uri=True,
                                                        timeout=0.1)) as connection:
                    running = connection.execute(RUNNING_TRIAL).fetchall()
            except sqlite3.Error:  # the worker is creating the study's tables, or writing
                running = []
            if running:
                return running[0][0]
        time.sleep(0.02)
    pytest.fail('no trial started')


# Slower trials, so that a trial is still running when the test stops its worker.
SLOW = ('-b', '256', '-e', '12')


@pytest.mark.parametrize('how', ['kill', 'sigterm'])
def test_a_stopped_worker_s_trial_is_retried_once(holdout_data, space_file, tmp_path, how):
    output = tmp_path / 'out'
    argv = (holdout_data, output, space_file, 2, '--heartbeat', '1', *SLOW)
    worker = start_worker(*argv)
    if how == 'sigterm':
        wait_for_handlers(worker)
    number = wait_for_running(worker, output)
    stopped = time.monotonic()
    worker.send_signal(signal.SIGKILL if how == 'kill' else signal.SIGTERM)
    _, stderr = worker.communicate(timeout=120)
    if how == 'sigterm':
        assert worker.returncode == 128 + signal.SIGTERM, stderr
        assert len(stderr.splitlines()) == 1 and stderr.startswith('tune.py: interrupted: ') \
            and 'the same command continues it' in stderr, stderr
    else:
        assert worker.returncode == -signal.SIGKILL
        time.sleep(max(0.0, stopped + 3 - time.monotonic()))  # past the grace period (2 s)
    worker = start_worker(*argv)
    out, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err
    study = load(output)
    failed = [t for t in study.trials if t.state == STATES.FAIL]
    assert [t.number for t in failed] == [number]
    retried = [t for t in study.trials if t.system_attrs.get('failed_trial') == number]
    assert len(retried) == 1 and retried[0].params == failed[0].params
    assert retried[0].state in (STATES.COMPLETE, STATES.PRUNED)
    assert len(counted(study)) == 2 and 'Best of 2 trials' in out
