"""Several test (and validation) positives per user, from convert.py's ratio split of one's own
CSV: a 2-process torchrun evaluates as one process does (sampled and full ranking, every
figure), a run selects on validation and stops at --threshold, --mode test prints and writes a
row per positive (--ranks_output), recommendations leave out the training and validation items
but not the test ones, tune.py searches and tests on it, and compare_models' per-user figures
count several positives as ncf.py does."""
import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import convert
import dataloading
import ncf
import synthetic
import tune
from conftest import ENV, ROOT, flags
from logger.logger import read_log

BENCHMARKS = os.path.join(ROOT, 'benchmarks')
USERS, ITEMS = 120, 80
# the cache's own negatives per user (test and validation): runs that ask for as many use them
NEGATIVES = 20
# fp32 and no dropout: the same figures on every run of one machine
RUN = dict(valid_negative=NEGATIVES, dropout=0, precision='fp32')


@pytest.fixture(scope='module')
def ratio_cache(tmp_path_factory):
    """120 users, 80 items, 3,000 timestamped interactions (25 a user on average) as a
    user_id,item_id,timestamp CSV read through --columns, split 70/15/15 per user at random."""
    directory = tmp_path_factory.mktemp('ratio')
    ratings = directory / 'ratings.csv'
    synthetic.write_csv(str(ratings), synthetic.generate(users=USERS, items=ITEMS, rows=3000,
                                                         groups=4, seed=7))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        convert.main(['--path', str(ratings), '--output', str(directory / 'cache'),
                      '--columns', 'user=user_id', 'item=item_id', 'timestamp=timestamp',
                      '--split', 'ratio', '--ratios', '0.7', '0.15', '0.15', '--min_ratings',
                      '1', '--valid_negative', str(NEGATIVES)])
    return str(directory / 'cache')


@pytest.fixture(scope='module')
def dataset(ratio_cache):
    return dataloading.load_dataset(ratio_cache, 'cpu', log=lambda *args: None)


@pytest.fixture(scope='module')
def trained(ratio_cache, tmp_path_factory):
    """Two epochs on the ratio cache, kept: (checkpoint directory, ncf.main's result, the lines
    it printed, the log's records)."""
    directory = tmp_path_factory.mktemp('trained')
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = ncf.main(flags(ratio_cache, **RUN, epochs=2, metrics_at=[5],
                                checkpoint_dir=directory / 'ck', log_path=directory / 'log.json'))
    return (str(directory / 'ck'), result, printed.getvalue().splitlines(),
            read_log(directory / 'log.json'))


def epochs_of(records):
    return [record['data'] for record in records if isinstance(record['step'], list)
            and record['step']]


def summaries_of(records):
    return [record['data'] for record in records if record['step'] == []]


def ranking_figures(figures):
    """A log record's figures that depend on the rankings alone (not the loss, which training
    in two processes rounds otherwise, nor the time)."""
    return {name: value for name, value in figures.items()
            if not any(word in name for word in ('loss', 'time', 'throughput', 'target'))}


def test_the_cache_holds_several_positives_per_user(dataset):
    for split in ('test', 'validation'):
        users, _ = dataset.positives(split)
        counts = np.bincount(users.numpy(), minlength=USERS)
        assert users.tolist() == sorted(users.tolist())
        assert (counts >= 1).all() and (counts > 1).sum() > USERS // 2, counts


# 1. A 2-process torchrun evaluates as one process --------------------------------------------


def torchrun(arguments):
    """ncf.py with `arguments` under a 2-process torchrun (gloo on the loopback device), to the
    end."""
    loopback = {'GLOO_SOCKET_IFNAME': 'lo'} if os.path.exists('/sys/class/net/lo') else {}
    return subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(ROOT, 'ncf.py')] + [str(a) for a in arguments],
        capture_output=True, text=True, env={**ENV, 'PYTHONPATH': ROOT, **loopback},
        timeout=300)


@pytest.mark.parametrize('mode', ['sampled', 'full'])
def test_two_process_torchrun_gives_one_process_figures(ratio_cache, tmp_path, capsys, mode):
    """Each epoch's validation figures and the selected model's test figures, every one of
    them (HR, NDCG, precision, recall, MAP at both Ks, MRR; in full ranking coverage and
    popularity), are those of one process: each process ranks its share of the users (a
    user's positives all in one share) and the sums are all-reduced. Training in two processes
    rounds the weights otherwise, but no ranking changes: equal up to the order of the sums."""
    run = dict(**RUN, epochs=2, eval_mode=mode, metrics_at=[5])
    ncf.main(flags(ratio_cache, **run, log_path=tmp_path / 'one.json'))
    capsys.readouterr()
    completed = torchrun(flags(ratio_cache, **run, log_path=tmp_path / 'two.json'))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert 'processes: 2' in completed.stdout and f'{mode} evaluation' in completed.stdout
    one, two = read_log(tmp_path / 'one.json'), read_log(tmp_path / 'two.json')
    figures = [ranking_figures(data) for data in epochs_of(one) + summaries_of(one)]
    assert len(figures) == 3
    expected = {'precision@10', 'recall@10', 'map@10', 'hr@5', 'ndcg@5', 'precision@5',
                'recall@5', 'map@5', 'mrr'}
    if mode == 'full':
        expected |= {'coverage@10', 'popularity@10', 'coverage@5', 'popularity@5'}
    for epoch in figures[:2]:
        assert {f'valid_{name}' for name in expected | {'hr@10', 'ndcg@10'}} <= set(epoch)
    assert {f'test_{name}' for name in expected | {'hr@10', 'ndcg@10'}} <= set(figures[2])
    assert figures[2]['selected_epoch'] in (0, 1)
    others = [ranking_figures(data) for data in epochs_of(two) + summaries_of(two)]
    assert len(others) == 3
    for mine, theirs in zip(figures, others):
        assert set(mine) == set(theirs)
        for name, value in mine.items():
            assert theirs[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


# 2. Training selects on validation and stops at the threshold --------------------------------


def test_training_selects_on_validation_and_tests_several_positives(trained):
    _, result, out, records = trained
    assert any(line.startswith('Load data done') and '#valid=' in line for line in out)
    epoch_lines = [line for line in out if line.startswith('Epoch ')]
    assert len(epoch_lines) == 2
    assert all(' validation HR@10 = ' in line for line in epoch_lines), epoch_lines
    assert any('New best validation hr! Saving the model to:' in line for line in out)
    assert sum(line.strip().startswith('Precision@10 = ') for line in out) == 3  # 2 epochs, test
    tests = [line for line in out if line.startswith('Test of ')]
    assert len(tests) == 1
    assert tests[0].startswith(f'Test of the model of epoch {result["best_epoch"]} (selected '
                               'on validation hr): ')
    tested = result['test']
    assert tested.several is True and tested.catalogue is None
    assert f'HR@10 = {tested.hr:.4f}, NDCG@10 = {tested.ndcg:.4f}' in tests[0]
    assert set(tested.at) == {10, 5}
    for hr, ndcg, precision, recall, map_ in tested.at.values():
        assert 0 < hr <= 1 and 0 < ndcg <= 1 and 0 < map_ <= 1
        assert 0 < precision <= 1 and 0 < recall <= hr
    epochs = epochs_of(records)
    assert [figures['valid_hr@10'] for figures in epochs] == result['hrs']
    assert all('valid_precision@10' in figures and 'hr@10' not in figures
               for figures in epochs)
    summary = summaries_of(records)[-1]
    assert summary['selected_epoch'] == result['best_epoch']
    assert summary['test_hr@10'] == tested.hr and summary['test_recall@5'] == tested.at[5][3]
    assert summary['test_precision@10'] == tested.at[10][2]
    assert summary['test_map@10'] == tested.at[10][4] and summary['test_mrr'] == tested.mrr


def test_threshold_stops_on_validation_after_the_first_epoch(ratio_cache, tmp_path, capsys):
    result = ncf.main(flags(ratio_cache, **RUN, epochs=3, threshold=0.0,
                            log_path=tmp_path / 'log.json'))
    out = capsys.readouterr().out.splitlines()
    assert len(result['hrs']) == 1 and result['best_epoch'] == 0
    assert [line for line in out if line.startswith('Hit threshold of ')] == \
        ['Hit threshold of 0.0']
    assert len([line for line in out if line.startswith('Epoch ')]) == 1
    assert len(epochs_of(read_log(tmp_path / 'log.json'))) == 1
    # the model of that epoch is still tested once, with several positives
    tests = [line for line in out if line.startswith('Test of the model of epoch 0 ')]
    assert len(tests) == 1
    assert result['test'].several and result['summary']['selected_epoch'] == 0


# 3. --mode test and --ranks_output ----------------------------------------------------------


def read_ranks(path):
    with open(path, newline='') as file:
        rows = list(csv.reader(file))
    assert rows[0] == ['user', 'rank']
    return np.array([[int(user), int(rank)] for user, rank in rows[1:]], dtype=np.int64)


@pytest.mark.parametrize('mode', ['sampled', 'full'])
def test_mode_test_prints_both_sets_and_writes_a_row_per_positive(ratio_cache, dataset, trained,
                                                                  tmp_path, capsys,
                                                                  monkeypatch, mode):
    checkpoint_dir = trained[0]
    ranks_path = tmp_path / 'ranks' / 'ranks.csv'
    tested = ncf.main(flags(ratio_cache, **RUN, mode='test', eval_mode=mode, metrics_at=[5],
                            checkpoint_dir=checkpoint_dir, ranks_output=ranks_path,
                            log_path=tmp_path / 'log.json'))
    out = capsys.readouterr().out.splitlines()
    metrics = tested['metrics']
    assert metrics.several and tested['validation'].several
    validation_lines = [line for line in out if line.startswith('Validation: HR@10 = ')]
    test_lines = [line for line in out if line.startswith('Test: HR@10 = ')]
    assert len(validation_lines) == 1 and len(test_lines) == 1, out
    assert test_lines[0] == f'Test: HR@10 = {metrics.hr:.4f}, NDCG@10 = {metrics.ndcg:.4f}'
    precision_lines = [line for line in out if line.startswith('Precision@10 = ')]
    assert len(precision_lines) == 2 and 'Recall@10 = ' in precision_lines[1]
    assert 'MAP@10 = ' in precision_lines[1] and 'Precision@5 = ' in precision_lines[1]
    assert precision_lines[1].startswith(f'Precision@10 = {metrics.at[10][2]:.4f}, Recall@10 = '
                                         f'{metrics.at[10][3]:.4f}, MAP@10 = '
                                         f'{metrics.at[10][4]:.4f}')
    coverage_lines = [line for line in out if line.startswith('Coverage@10 = ')]
    if mode == 'full':
        assert len(coverage_lines) == 2 and set(metrics.catalogue) == {10, 5}
        assert coverage_lines[1].startswith(f'Coverage@10 = {metrics.catalogue[10][0]:.4f}')
    else:
        assert not coverage_lines and metrics.catalogue is None

    # a row per test positive, in user order, each user's in one run of rows
    users, items = dataset.positives('test')
    table = read_ranks(ranks_path)
    assert len(table) == len(users)
    assert table[:, 0].tolist() == users.tolist()
    assert f'Ranks of the {USERS} test users written to {ranks_path} ({len(users)} positives)' \
        in out
    # a user's positives take distinct positions
    for user in range(USERS):
        mine = table[table[:, 0] == user, 1]
        assert len(set(mine.tolist())) == len(mine)
    first = np.minimum.reduceat(table[:, 1], np.unique(table[:, 0], return_index=True)[1])
    assert len(first) == USERS  # every user has a test positive here
    for k in (10, 5):
        assert (first < k).mean() == pytest.approx(metrics.at[k][0], abs=1e-12), k
    assert (1.0 / (first + 1)).mean() == pytest.approx(metrics.mrr, rel=1e-9)
    # compare_models' per-user figures from these ranks average to ncf.py's HR@10 and NDCG@10
    monkeypatch.syspath_prepend(BENCHMARKS)
    import compare_models
    mine, hits, gains = compare_models.per_user_figures(str(ranks_path))
    assert mine.tolist() == list(range(USERS))
    assert hits.mean() == pytest.approx(metrics.hr, abs=1e-12)
    assert gains.mean() == pytest.approx(metrics.ndcg, rel=1e-9)


# 4. Recommendations ---------------------------------------------------------------------------


def test_recommend_leaves_out_training_and_validation_items_not_test_ones(ratio_cache, dataset,
                                                                        trained, tmp_path):
    """Every item: each user gets exactly the items outside their training and validation
    interactions, their test items among them."""
    output = tmp_path / 'recs.csv'
    ncf.main(flags(ratio_cache, base={}, mode='recommend', checkpoint_dir=trained[0],
                   topk=ITEMS, output=output, device='cpu', precision='fp32'))
    with open(os.path.join(ratio_cache, 'user_ids.csv'), newline='') as file:
        user_ids = [row[0] for row in csv.reader(file)][1:]
    with open(os.path.join(ratio_cache, 'item_ids.csv'), newline='') as file:
        item_ids = [row[0] for row in csv.reader(file)][1:]
    user_index = {user: k for k, user in enumerate(user_ids)}
    item_index = {item: k for k, item in enumerate(item_ids)}
    with open(output, newline='') as file:
        rows = list(csv.reader(file))[1:]
    recommended = {}
    for user, _, item, _ in rows:
        recommended.setdefault(user_index[user], set()).add(item_index[item])

    def by_user(pairs):
        found = {}
        for user, item in zip(pairs[0].tolist(), pairs[1].tolist()):
            found.setdefault(user, set()).add(item)
        return found

    training = by_user((dataset.train_users, dataset.train_items))
    validation = by_user(dataset.positives('validation'))
    test = by_user(dataset.positives('test'))
    assert sorted(recommended) == list(range(USERS))
    tested_somewhere = 0
    for user in range(USERS):
        known = training.get(user, set()) | validation.get(user, set())
        assert recommended[user] == set(range(ITEMS)) - known, user
        assert test[user] <= recommended[user]
        tested_somewhere += len(test[user])
    assert tested_somewhere == len(dataset.positives('test')[0])


# 5. tune.py ----------------------------------------------------------------------------------


def test_tune_searches_on_validation_and_tests_the_best_trial(ratio_cache, tmp_path, capsys):
    space = tmp_path / 'space.json'
    space.write_text(json.dumps({'learning_rate': {'low': 0.002, 'high': 0.03, 'log': True},
                                 'factors': {'choices': [4, 8]}, 'batch_size': 1024,
                                 'optimizer': 'adam'}))
    output = tmp_path / 'out'
    tune.main(['--data', ratio_cache, '--model', 'mf', '-e', '2', '--valid_negative',
               str(NEGATIVES), '--device', 'cpu', '--precision', 'fp32', '--seed', '3',
               '--space', str(space), '--output', str(output), '--trials', '2'])
    assert 'Best of 2 trials' in capsys.readouterr().out
    written = json.loads((output / 'best.json').read_text())
    assert written['trials'] == 2 and written['best_trial'] in (0, 1)
    for split in ('validation', 'test'):
        figures = written[split]
        assert {'hr@10', 'ndcg@10', 'precision@10', 'recall@10', 'map@10', 'mrr',
                'loss'} <= set(figures), figures
        assert 0 < figures['hr@10'] <= 1 and 0 < figures['precision@10'] <= 1
    assert written['validation']['hr@10'] == pytest.approx(written['best_value'], abs=1e-12)
    # best.json's test figures are those of its best_model.pth, tested by ncf.py
    again = ncf.main(['--data', ratio_cache, '--mode', 'test', '--load_checkpoint_path',
                      str(output / 'best_model.pth'), '--valid_negative', str(NEGATIVES),
                      '--device', 'cpu', '--precision', 'fp32', '--log_path',
                      str(tmp_path / 'log.json')])
    assert again['hr'] == pytest.approx(written['test']['hr@10'], abs=1e-12)
    assert again['metrics'].at[10][2] == pytest.approx(written['test']['precision@10'],
                                                       abs=1e-12)
    assert again['metrics'].mrr == pytest.approx(written['test']['mrr'], rel=1e-9)


# 6. compare_models' per-user figures ----------------------------------------------------------


def test_per_user_figures_of_several_positives_by_hand(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import compare_models
    assert compare_models.TOPK == 10
    # user 0: positions 0, 3, 12 (two hits of three); user 1: 10, 15 (none); user 3: 2 (one
    # positive); user 5: twelve positives on top (more than K: the ideal is K of them)
    rows = [(0, 0), (0, 3), (0, 12), (1, 10), (1, 15), (3, 2)] + [(5, p) for p in range(12)]
    path = tmp_path / 'ranks.csv'
    path.write_text('user,rank\n' + ''.join(f'{user},{rank}\n' for user, rank in rows))
    users, hits, gains = compare_models.per_user_figures(str(path))
    assert users.tolist() == [0, 1, 3, 5]
    assert hits.tolist() == [1, 0, 1, 1]

    def dcg(positions):
        return sum(1 / math.log2(p + 2) for p in positions)
    expected = [dcg([0, 3]) / dcg([0, 1, 2]), 0.0, dcg([2]) / dcg([0]), 1.0]
    assert gains.tolist() == pytest.approx(expected, rel=1e-12)
    assert gains[0] == pytest.approx((1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3) + 0.5))
