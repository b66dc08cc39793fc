"""ncf.py on a cache with a validation holdout (convert.py --validation_holdout): the epochs
evaluate, select and stop on the validation set, the selected model is tested once at the end
(and --mode test of its model.pth gives the same figures), the test set never sways the selection
(two caches that differ only in the test positives select alike), --threshold stops on
validation, a resumed run selects and tests as an uninterrupted one; without a holdout, the
output keeps the reference's wording."""
import os
import re
import shutil

import numpy as np
import pytest
import torch

import convert
import dataloading
import ncf
import synthetic
from conftest import SMALL, flags
from logger.logger import read_log
from ncflib import training
from ncflib.cache import (ITEM_IDS_FILE, TEST_FILE, TEST_NEGATIVES_FILE, TRAIN_FILE,
                          USER_IDS_FILE, VALID_FILE, VALID_NEGATIVES_FILE)
from ncflib.cli import UsageError

# SMALL's sizes (60 users, 50 items: a run of 6 epochs takes well under a second), on the CPU
# in fp32 (the same figures on every CPU but for rounding, as test_golden_numbers), with dropout:
# its masks come from the global generator, so anything that draws from it before or between the
# epochs (a peek at the test set, say) changes the figures. One implementation throughout.
HELD = {**SMALL, 'learning_rate': 0.02, 'dropout': 0.3, 'device': 'cpu'}
CACHE_NEGATIVES = SMALL['valid_negative']  # the caches' test and validation negatives per user
EPOCH_LINE = re.compile(r'Epoch (\d+): validation HR@10 = ([\d.]+), NDCG@10 = ([\d.]+), ')
TEST_LINE = re.compile(r'Test of the model of epoch (\d+) \(selected on validation hr\): '
                       r'(HR@10 = [\d.]+, NDCG@10 = [\d.]+), test_loss = ([\d.]+)$')


def ratings_file(path, variant, users=60, items=50, rows=1400, seed=4):
    """Synthetic ratings (synthetic.generate's) as a user,item,timestamp CSV: each user's rows
    in time order with times 0, 1, ..., then, at the end of the file and latest of all, each
    user's test row. variant 0: the test item is the user's latest as generated; 1: the smallest
    item the user never rated instead. Every item occurs in the rows before the test rows, so
    the id maps (numbered in order of first appearance) and every split but the test positives
    are the same for both variants."""
    user, item, _, timestamp = synthetic.generate(users=users, items=items, rows=rows,
                                                  groups=3, seed=seed)
    order = np.lexsort((timestamp, user))  # by user, then time (stable)
    user, item = user[order], item[order]
    lines, tests, trained = ['user_id,item_id,timestamp'], [], set()
    for someone in np.unique(user):
        rated = item[user == someone].tolist()
        lines += [f'u{someone},i{thing},{when}' for when, thing in enumerate(rated[:-1])]
        trained.update(rated[:-1])
        test = rated[-1] if variant == 0 else min(set(range(1, items + 1)) - set(rated))
        tests.append(f'u{someone},i{test},{10 ** 6}')
    assert trained == set(range(1, items + 1))  # the id maps never depend on the test rows
    with open(path, 'w') as file:
        file.write('\n'.join(lines + tests) + '\n')
    return str(path)


@pytest.fixture(scope='session')
def caches(tmp_path_factory):
    """{'a': a cache with a validation holdout, 'b': the same but for each user's test positive,
    'plain': the ratings of 'a' without a holdout}."""
    base = tmp_path_factory.mktemp('holdout')
    made = {}
    for name, variant, extra in (('a', 0, ['--validation_holdout']),
                                 ('b', 1, ['--validation_holdout']), ('plain', 0, [])):
        convert.main(['--path', ratings_file(base / f'{name}.csv', variant), '--output',
                      str(base / name), '--valid_negative', str(CACHE_NEGATIVES), *extra])
        made[name] = str(base / name)
    return made


def train(capsys, cache, log, **overrides):
    """ncf.main on `cache` with HELD's flags and `overrides`, logging to `log`: (its result,
    the lines it printed, the log's records)."""
    result = ncf.main(flags(cache, base=HELD, log_path=log, **overrides))
    return result, capsys.readouterr().out.splitlines(), read_log(log)


def epochs_of(records):
    """The log's per-epoch records' data, in order."""
    return [record['data'] for record in records if isinstance(record['step'], list)
            and record['step']]


def summaries_of(records):
    return [record['data'] for record in records if record['step'] == []]


def steady(figures):
    """A log record's figures without those of time (throughputs, seconds)."""
    return {name: value for name, value in figures.items()
            if 'time' not in name and 'throughput' not in name}


# 1. A run end to end --------------------------------------------------------------------------


def test_a_holdout_run_selects_on_validation_and_tests_once(caches, tmp_path, capsys):
    result, out, records = train(capsys, caches['a'], tmp_path / 'log.json', epochs=5,
                                 metrics_at=[5], checkpoint_dir=tmp_path / 'ck')
    selected = result['best_epoch']
    assert result['hrs'].index(max(result['hrs'])) == selected
    # (this data's) selected model is not the last one: what is tested below is the selected
    assert 0 < selected < 4, result['hrs']
    assert any(line.startswith('Load data done') and '#test=60, #valid=60' in line
               for line in out)

    # every epoch line is of the validation set; the test, once, of the selected model
    epoch_lines = [line for line in out if line.startswith('Epoch ')]
    assert [EPOCH_LINE.match(line).group(1) for line in epoch_lines] == ['0', '1', '2', '3', '4']
    assert [float(EPOCH_LINE.match(line).group(2)) for line in epoch_lines] == pytest.approx(
        result['hrs'], abs=5e-5)
    assert sum('New best validation hr! Saving the model to:' in line for line in out) >= 1
    tests = [line for line in out if line.startswith('Test of ')]
    assert len(tests) == 1 and sum('Test' in line for line in out) == 1, out
    test_line = TEST_LINE.match(tests[0])
    assert test_line and int(test_line.group(1)) == selected, tests
    tested = result['test']
    assert test_line.group(2) == f'HR@10 = {tested.hr:.4f}, NDCG@10 = {tested.ndcg:.4f}'
    assert out[out.index(tests[0]) + 1].strip().startswith('HR@5 = ')  # --metrics_at's line
    assert out.index(tests[0]) > out.index(epoch_lines[-1])

    # the log: validation figures per epoch, the test's in the summary alone
    epochs = epochs_of(records)
    assert len(epochs) == 5
    for figures, hr in zip(epochs, result['hrs']):
        assert figures['valid_hr@10'] == pytest.approx(hr)
        assert {'valid_ndcg@10', 'valid_hr@5', 'valid_ndcg@5', 'valid_mrr'} <= set(figures)
        assert not [name for name in figures if name.startswith('test_')]
        assert 'hr@10' not in figures and 'ndcg@10' not in figures
    summary = summaries_of(records)[-1]
    assert summary == result['summary']
    assert summary['selected_epoch'] == selected == summary['best_epoch']
    assert summary['test_hr@10'] == tested.hr and summary['test_ndcg@10'] == tested.ndcg
    assert summary['test_loss'] == tested.loss
    assert summary['test_hr@5'] == tested.at[5][0] and summary['test_mrr'] == tested.mrr
    assert not [name for name in summary if name.startswith('valid_')]

    # --mode test of the model.pth kept: the selected model, both sets, the same figures
    again, out, records = train(capsys, caches['a'], tmp_path / 'log.json', mode='test',
                                checkpoint_dir=tmp_path / 'ck')
    validation_lines = [line for line in out if line.startswith('Validation: ')]
    test_lines = [line for line in out if line.startswith('Test: ')]
    assert len(validation_lines) == 1 and len(test_lines) == 1, out
    assert out.index(validation_lines[0]) < out.index(test_lines[0])
    assert test_lines[0] == f'Test: {test_line.group(2)}'
    assert validation_lines[0] == (f'Validation: HR@10 = {result["hrs"][selected]:.4f}, '
                                   f'NDCG@10 = {epochs[selected]["valid_ndcg@10"]:.4f}')
    assert any(line.startswith(f'test_loss = {test_line.group(3)}, ') for line in out), out
    assert again['hr'] == pytest.approx(tested.hr, abs=1e-9)
    assert again['ndcg'] == pytest.approx(tested.ndcg, rel=1e-6)
    assert again['metrics'].loss == pytest.approx(tested.loss, rel=1e-5)
    assert again['validation'].hr == pytest.approx(result['hrs'][selected], abs=1e-9)
    assert again['validation'].ndcg == pytest.approx(epochs[selected]['valid_ndcg@10'],
                                                     rel=1e-6)
    # appended to the training's log: one record with both sets' figures
    appended = summaries_of(records)[-1]
    assert appended['test_hr@10'] == again['hr'] and appended['valid_hr@10'] == \
        again['validation'].hr
    assert 'valid_loss' in appended and 'test_loss' in appended
    assert len(epochs_of(records)) == 5  # nothing else added


# 2. The test set never sways the selection ---------------------------------------------------


def test_the_two_caches_differ_only_in_the_test_positives(caches):
    def read(cache, name):
        with open(os.path.join(cache, name), 'rb') as file:
            return file.read()
    for name in (TRAIN_FILE, VALID_FILE, VALID_NEGATIVES_FILE, USER_IDS_FILE, ITEM_IDS_FILE):
        assert read(caches['a'], name) == read(caches['b'], name), name
    assert read(caches['a'], TEST_FILE) != read(caches['b'], TEST_FILE)
    first, second = (torch.load(os.path.join(caches[name], TEST_FILE), weights_only=True)
                     for name in 'ab')
    assert torch.equal(first[:, 0], second[:, 0])
    assert bool((first[:, 1] != second[:, 1]).all())  # every user's test positive differs


@pytest.mark.parametrize('evaluation', [{}, {'valid_negative': 15, 'seed': 3},
                                        {'eval_mode': 'full'}],
                         ids=['cache negatives', 'negatives drawn at load time', 'full ranking'])
def test_selection_never_reads_the_test_set(evaluation, caches, tmp_path, capsys):
    runs = {}
    for name in 'ab':
        runs[name] = train(capsys, caches[name], tmp_path / f'{name}.json', epochs=5,
                           checkpoint_dir=tmp_path / name, **evaluation)
    (first, first_out, first_log), (second, second_out, second_log) = runs['a'], runs['b']
    assert first['hrs'] == second['hrs'] and first['train_losses'] == second['train_losses']
    assert first['best_epoch'] == second['best_epoch']
    assert first['summary']['selected_epoch'] == second['summary']['selected_epoch']
    assert [steady(figures) for figures in epochs_of(first_log)] == \
        [steady(figures) for figures in epochs_of(second_log)]
    assert [EPOCH_LINE.match(line).groups() for line in first_out if line.startswith('Epoch')] \
        == [EPOCH_LINE.match(line).groups() for line in second_out if line.startswith('Epoch')]
    # the selected models are the same weights
    models = [torch.load(tmp_path / name / 'model.pth', weights_only=True) for name in 'ab']
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][key], models[1][key]) for key in models[0])
    # ... tested on different test sets: their figures differ
    assert (first['test'].hr, first['test'].ndcg, first['test'].loss) != \
        (second['test'].hr, second['test'].ndcg, second['test'].loss)


def test_loading_without_the_test_set(caches, tmp_path):
    """load_dataset(..., with_test=False) needs no test file (both deleted here), gives the
    training pairs and the validation set as a full load does, and draws the same validation
    negatives at load time: they never depend on the test set."""
    cpu = torch.device('cpu')
    blind = shutil.copytree(caches['a'], tmp_path / 'blind')
    for name in (TEST_FILE, TEST_NEGATIVES_FILE):
        os.remove(blind / name)
    notices = []
    for redraw in ({}, {'valid_negative': 15, 'seed': 3}):
        full = dataloading.load_dataset(caches['a'], cpu, log=notices.append, **redraw)
        other = dataloading.load_dataset(caches['b'], cpu, log=notices.append, **redraw)
        loaded = dataloading.load_dataset(str(blind), cpu, log=notices.append, with_test=False,
                                          **redraw)
        assert loaded.test_items is None and loaded.test_negatives is None
        assert (loaded.n_users, loaded.n_items) == (full.n_users, full.n_items) == (60, 50)
        for dataset in (full, other):
            for name in ('train_users', 'train_items', 'valid_items', 'valid_negatives'):
                assert torch.equal(getattr(loaded, name), getattr(dataset, name)), name
        assert loaded.valid_negatives.shape == (60, redraw.get('valid_negative', 20))
    assert len(notices) == 3 and all(notice.startswith('Drawing 15 test negatives')
                                     for notice in notices)
    with pytest.raises(UsageError, match='test_ratings.pt is missing'):  # a full load needs it
        dataloading.load_dataset(str(blind), cpu)


def test_loading_without_the_test_set_where_items_are_only_tested(tmp_path):
    """Items that only ever are test positives (the last ones numbered) are in the catalogue
    without the test set too: their rows are there, nothing of the other tensors names them."""
    lines = ['user_id,item_id,timestamp']
    for user in range(4):  # items user .. user + 2, at times 0, 1, 2
        lines += [f'u{user},i{user + when},{when}' for when in range(3)]
    lines.append('u0,only_tested,9')
    (tmp_path / 'ratings.csv').write_text('\n'.join(lines) + '\n')
    convert.main(['--path', str(tmp_path / 'ratings.csv'), '--output', str(tmp_path / 'cache'),
                  '--min_ratings', '2', '--valid_negative', '2', '--validation_holdout'])
    for name in (TEST_FILE, TEST_NEGATIVES_FILE):
        os.remove(tmp_path / 'cache' / name)
    loaded = dataloading.load_dataset(str(tmp_path / 'cache'), torch.device('cpu'),
                                      log=lambda *_: None, with_test=False)
    assert (loaded.n_users, loaded.n_items) == (4, 7) and loaded.test_items is None
    assert loaded.valid_items.tolist() == [2, 2, 3, 4]  # i5 and only_tested: test positives
    assert int(loaded.train_items.max()) == 3
    assert 0 <= int(loaded.valid_negatives.min()) and int(loaded.valid_negatives.max()) < 7


# 3. --threshold stops on validation ----------------------------------------------------------


def test_threshold_stops_on_the_validation_metric(caches, tmp_path, capsys):
    first, _, _ = train(capsys, caches['a'], tmp_path / 'first.json', epochs=6)
    hrs = first['hrs']
    # the first epoch after the first whose validation HR beats every one before it
    stop = next((epoch for epoch in range(1, len(hrs) - 1) if hrs[epoch] > max(hrs[:epoch])),
                None)
    assert stop is not None, f'(this data) no epoch before the last improves: {hrs}'
    threshold = hrs[stop]
    result, out, records = train(capsys, caches['a'], tmp_path / 'log.json', epochs=6,
                                 threshold=threshold)
    assert result['hrs'] == hrs[:stop + 1]
    assert [line for line in out if line.startswith('Hit threshold of ')] == \
        [f'Hit threshold of {threshold}']
    assert len([line for line in out if line.startswith('Epoch ')]) == stop + 1
    assert len(epochs_of(records)) == stop + 1
    tests = [line for line in out if line.startswith('Test of ')]
    assert len(tests) == 1 and TEST_LINE.match(tests[0]).group(1) == str(stop)
    assert out.index(tests[0]) > out.index(f'Hit threshold of {threshold}')
    assert result['summary']['selected_epoch'] == stop == result['best_epoch']
    assert summaries_of(records)[-1]['test_hr@10'] == result['test'].hr


# 4. Without a holdout: the reference's wording ----------------------------------------------


def test_without_a_holdout_nothing_says_validation_or_test(caches, tmp_path, capsys):
    result, out, records = train(capsys, caches['plain'], tmp_path / 'log.json', epochs=2,
                                 checkpoint_dir=tmp_path / 'ck')
    assert result['test'] is None and 'selected_epoch' not in result['summary']
    epoch_lines = [line for line in out if line.startswith('Epoch ')]
    assert len(epoch_lines) == 2
    assert all(re.match(r'Epoch \d: HR@10 = [\d.]+, NDCG@10 = ', line) for line in epoch_lines)
    for wording in ('validation HR', 'Test', 'selected on', 'New best validation', '#valid='):
        assert not [line for line in out if wording in line], wording
    assert any(line.startswith('New best hr! Saving the model to:') for line in out)
    for figures in epochs_of(records) + summaries_of(records):
        assert not [name for name in figures if name.startswith(('valid_', 'test_'))]
        assert 'selected_epoch' not in figures
    assert all('hr@10' in figures for figures in epochs_of(records))

    tested, out, records = train(capsys, caches['plain'], tmp_path / 'log.json', mode='test',
                                 checkpoint_dir=tmp_path / 'ck')
    assert tested['validation'] is None
    assert not [line for line in out if line.startswith(('Validation', 'Test'))]
    assert f'HR@10 = {tested["hr"]:.4f}, NDCG@10 = {tested["ndcg"]:.4f}' in out
    assert any(line.startswith('validation_loss = ') for line in out)
    appended = summaries_of(records)[-1]
    assert appended['hr@10'] == tested['hr'] and 'validation_loss' in appended
    assert not [name for name in appended if name.startswith(('valid_', 'test_'))]


# 5. A resumed run selects and tests as an uninterrupted one ----------------------------------


def test_resume_selects_and_tests_as_an_uninterrupted_run(caches, tmp_path, monkeypatch,
                                                          capsys):
    whole, _, _ = train(capsys, caches['a'], tmp_path / 'whole.json', epochs=6,
                        checkpoint_dir=tmp_path / 'whole')
    selected = whole['best_epoch']
    # (this data's) selection is early: the resumed run's epochs, selected + 2 to 5, improve on
    # nothing, and the model it tests is the one model.pth kept
    assert selected < 4, whole['hrs']

    real_epoch = training.Trainer.epoch
    calls = []

    def crash_after_the_selected_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == selected + 3:
            raise KeyboardInterrupt  # stopped while training epoch selected + 2
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(training.Trainer, 'epoch', crash_after_the_selected_epoch)
    with pytest.raises(SystemExit) as exit_info:
        ncf.main(flags(caches['a'], base=HELD, epochs=6, checkpoint_dir=tmp_path / 'ck',
                       log_path=tmp_path / 'log.json'))
    assert exit_info.value.code == 130
    interrupted = capsys.readouterr()
    assert f'from epoch {selected + 1} kept' in interrupted.err
    assert not [line for line in interrupted.out.splitlines() if line.startswith('Test')]
    monkeypatch.setattr(training.Trainer, 'epoch', real_epoch)

    resumed, out, records = train(capsys, caches['a'], tmp_path / 'log.json', epochs=6,
                                  checkpoint_dir=tmp_path / 'ck', resume=True)
    assert resumed['hrs'] == whole['hrs'] and resumed['best_epoch'] == selected
    assert resumed['summary']['selected_epoch'] == selected
    assert (resumed['test'].hr, resumed['test'].ndcg) == (whole['test'].hr, whole['test'].ndcg)
    assert resumed['test'].loss == pytest.approx(whole['test'].loss, rel=1e-6)
    assert [line.split(': ')[0] for line in out if line.startswith('Epoch ')] == \
        [f'Epoch {epoch}' for epoch in range(selected + 2, 6)]
    assert all('validation HR@10' in line for line in out if line.startswith('Epoch '))
    tests = [line for line in out if line.startswith('Test of ')]
    assert len(tests) == 1 and TEST_LINE.match(tests[0]).group(1) == str(selected)
    assert [record['step'] for record in records if isinstance(record['step'], list)
            and record['step']] == [[epoch] for epoch in range(6)]
    assert [summary.get('selected_epoch') for summary in summaries_of(records)
            if 'selected_epoch' in summary] == [selected]


# ML-100k, where it is here -------------------------------------------------------------------


def test_ml100k_with_a_holdout(ml100k, tmp_path, capsys):
    """The real data: every user (each has 20 ratings or more) has a validation positive; the
    run selects on validation and --mode test of its model.pth tests as the run did."""
    convert.main(['--path', ml100k, '--output', str(tmp_path / 'cache'), '--valid_negative',
                  '50', '--validation_holdout'])
    run = dict(base={**HELD, 'batch_size': 4096, 'valid_negative': 50},
               checkpoint_dir=tmp_path / 'ck', log_path=tmp_path / 'log.json')
    result = ncf.main(flags(str(tmp_path / 'cache'), epochs=3, **run))
    out = capsys.readouterr().out
    assert '#user=943, #item=1682' in out and '#test=943, #valid=943' in out
    assert sum(line.startswith('Test of the model of epoch') for line in out.splitlines()) == 1
    assert result['hrs'][result['best_epoch']] == max(result['hrs']) > 0.2
    tested = ncf.main(flags(str(tmp_path / 'cache'), mode='test', **run))
    assert tested['hr'] == pytest.approx(result['test'].hr, abs=1e-9)
    assert tested['validation'].hr == pytest.approx(max(result['hrs']), abs=1e-9)
