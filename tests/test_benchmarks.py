"""The benchmarks run: benchmarks/throughput.py times every knob of the plan in one run (a JSON
line per row as it ends), benchmarks/compare_models.py compares the NCF family and, stopped,
stops its child with it and continues when run again; the other benchmarks and gpu_check.sh's
stages keep the one-line contract (the figures themselves come from benchmark runs, never from
tests)."""
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ENV, PYTHON, ROOT, assert_one_line_error, fails, make_cache
from logger.logger import read_log
from ncflib import runtime

BENCHMARKS = os.path.join(ROOT, 'benchmarks')


def test_throughput_benchmark_attributes_every_knob(tiny_data):
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks', 'throughput.py'), '--data', tiny_data,
         '--device', 'cpu', '--batch_size', '4096', '--steps', '2', '-f', '8', '--layers', '32',
         '16', '8', '--impl', 'cpu_fused'], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    *row_lines, full_line, last = completed.stdout.strip().splitlines()
    result = json.loads(last)
    # each row printed as it ended, as the final JSON has it
    assert [json.loads(line) for line in row_lines] == result['rows']
    full = json.loads(full_line)
    assert full == result['full_ranking'] and full['users'] == 300 and full['n_items'] == 200
    assert full['ranks_only_s'] > 0 and full['all_metrics_s'] > 0
    assert [row['row'] for row in result['rows'] if row['default_plan']] == [result['default']]
    assert result['shape']['n_users'] == 300 and result['batch_size'] == 4096
    names = [row['row'] for row in result['rows']]
    chosen = result['default_precision']  # measured faster on this CPU
    other = 'bf16' if chosen == 'fp32' else 'fp32'
    assert names == ['baseline: eager fp32'] + (['+ bf16'] if chosen == 'bf16' else []) + \
        ['+ fused Adam', f'+ micro-batches of {runtime.CPU_MICRO_BATCH}', 'cpu_fused',
         f'cpu_fused, {other}', 'cpu_fused, sparse updates']
    assert result['rows'][-2]['precision'] == other
    assert [row['embedding_updates'] for row in result['rows']] == ['dense'] * (
        len(names) - 1) + ['sparse']
    assert result['sparse_over_dense_epoch'] > 0
    assert result['default'] == 'cpu_fused' and result['baseline'] == 'baseline: eager fp32'
    assert result['default_over_other_precision'] > 0
    for row in result['rows']:
        for key in ('train_step_samples_per_s', 'train_epoch_samples_per_s',
                    'eval_samples_per_s', 'first_step_s'):
            assert row[key] > 0
    for key in ('train_speedup', 'train_step_speedup', 'eval_speedup'):
        assert result[key] > 0


def test_throughput_times_dense_and_sparse_updates_alone(tiny_data):
    completed = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, 'throughput.py'), '--data', tiny_data,
         '--device', 'cpu', '--batch_size', '4096', '--steps', '2', '-f', '8', '--layers', '32',
         '16', '8', '--only_updates', '--profile', '3'], capture_output=True, text=True,
        timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert [row['embedding_updates'] for row in result['rows']] == ['dense', 'sparse']
    for row in result['rows']:  # --profile: the three operators with the most time per step
        assert len(row['profile']) == 3 and all(name for name, _, _ in row['profile'])
        times = [ms for _, ms, _ in row['profile']]
        assert times == sorted(times, reverse=True) and times[-1] > 0
        assert all(calls > 0 for _, _, calls in row['profile'])
    assert completed.stderr.count('operators with the most self time per step') == 2
    assert result['rows'][1]['hr_after_one_epoch'] > 0 and result['sparse_over_dense_epoch'] > 0
    completed = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, 'throughput.py'), '--data', tiny_data,
         '--device', 'cpu', '--batch_size', '4096', '--steps', '2', '-f', '8', '--layers', '32',
         '16', '8', '--only_updates', '--steps_only', '--impl', 'compile', '--precision',
         'fp32'], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result['sparse_over_dense_step'] > 0 and 'epoch_s' not in result['rows'][0]
    assert [(row['row'], row['precision']) for row in result['rows']] == [
        ('cpu_fused, dense updates', 'fp32'), ('cpu_fused, sparse updates', 'fp32'),
        ('compile (whole step), dense updates', 'fp32'),
        ('compile (whole step), sparse updates', 'fp32')]
    completed = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, 'throughput.py'), '--data', tiny_data,
         '--steps_only'], capture_output=True, text=True, timeout=300)
    assert_one_line_error(completed, '--steps_only goes with --only_updates')
    completed = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, 'throughput.py'), '--data', tiny_data,
         '--profile', '-1'], capture_output=True, text=True, timeout=300)
    assert_one_line_error(completed, '--profile must be at least 0, not -1')
    completed = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, 'throughput.py'), '--data', tiny_data,
         '--device', 'cpu', '--only_updates', '--impl', 'fused'], capture_output=True,
        text=True, timeout=300)
    assert_one_line_error(completed, '--impl fused does not run on cpu here')


def test_throughput_stopped_keeps_the_rows_it_printed(tiny_data):
    """SIGTERM (a stage's timeout) once the first row is printed: that row stays on stdout as a
    JSON line, and the run ends in one line saying how many rows it timed."""
    process = subprocess.Popen(
        [PYTHON, os.path.join(BENCHMARKS, 'throughput.py'), '--data', tiny_data, '--device',
         'cpu', '--batch_size', '4096', '--steps', '2', '-f', '8', '--layers', '32', '16', '8',
         '--impl', 'cpu_fused'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=ENV)
    line = process.stdout.readline()
    assert line, process.communicate()
    first = json.loads(line)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert first['row'] == 'baseline: eager fp32' and first['train_step_samples_per_s'] > 0
    assert 'Traceback' not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith('throughput.py: interrupted: ') and ' rows timed, each printed on ' \
        'stdout as a JSON line' in last
    assert all('rows' not in json.loads(line) for line in stdout.splitlines())


def ranks_figures(path):
    """HR@10 and NDCG@10 of a ranks CSV (ncf.py --ranks_output), as ncf.py counts them."""
    with open(path) as file:
        ranks = [int(line.split(',')[1]) for line in file.read().splitlines()[1:]]
    return (sum(rank < 10 for rank in ranks) / len(ranks),
            sum(1 / math.log2(rank + 2) for rank in ranks if rank < 10) / len(ranks))


def assert_runs_match_their_ranks(out, runs):
    """Each run's figures under both protocols are those of its ranks, its test users' all."""
    for run in runs:
        for protocol in ('sampled', 'full'):
            path = out / 'runs' / f'{run["model"]}-seed{run["seed"]}' / run['ranks'][protocol]
            hr, ndcg = ranks_figures(path)
            assert hr == pytest.approx(run[protocol]['hr'], abs=1e-12)
            assert ndcg == pytest.approx(run[protocol]['ndcg'], abs=1e-12)


def assert_significance(out, result, pairs):
    """The second table and results.json's tests: one row per pair and protocol, p in [0, 1]
    and Holm's never below it."""
    tests = result['significance']
    assert [(t['a'], t['b'], t['protocol']) for t in tests] == [
        (a, b, protocol) for protocol in ('sampled', 'full') for a, b in pairs]
    for test in tests:
        assert test['users'] == 300
        for metric in ('hr', 'ndcg'):
            assert 0 <= test[metric]['p'] <= test[metric]['p_holm'] <= 1
    table = (out / 'results.md').read_text()
    assert 'Paired tests over the 300 test users' in table
    assert '| A | B | protocol | HR@10 A - B | users A / B ahead | p | Holm p |' in table
    assert table.count('| sampled |') == table.count('| full |') == len(pairs)
    return table


def test_compare_models_trains_each_model_and_reports_both_protocols(tiny_data, tmp_path):
    """benchmarks/compare_models.py end to end on the tiny data, briefly: GMF and MLP, then the
    paper's NeuMF from them (one seed: each run is three ncf.py processes); a table, JSON with
    every run, the paired tests, and a plot. No validation holdout: the epoch is selected on
    the test set, as the reference does, and the tables say so."""
    small = '-e 2 -f 8 --layers 32 16 8 --valid_negative 50 -l 0.01 --precision fp32'
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks', 'compare_models.py'), '--data',
         tiny_data, '--models', 'neumf_pretrained', '--seeds', '3', '--device', 'cpu',
         '--out', str(tmp_path / 'out'),
         *[f'--flags={model}={small}' for model in ('gmf', 'mlp', 'neumf_pretrained')]],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert list(result['summary']) == ['gmf', 'mlp', 'neumf_pretrained']
    runs = json.loads((tmp_path / 'out' / 'results.json').read_text())['runs']
    assert [(run['model'], run['seed']) for run in runs] == [
        (model, 3) for model in ('gmf', 'mlp', 'neumf_pretrained')]
    for run in runs:
        assert run['epochs'] == 2 and 0 < run['full']['hr'] <= run['sampled']['hr'] <= 1
        assert 0 < run['full']['mrr'] <= 1 and run['train_seconds'] > 0
        assert run['selected_on'] == 'test'
        # the best epoch's own figures: its test is that of the saved model
        logged = [r['data'] for r in read_log(
            tmp_path / 'out' / 'runs' / f'{run["model"]}-seed3' / 'log.json')
            if isinstance(r['step'], list) and r['step']]
        assert logged[run['best_epoch']]['hr@10'] == max(figures['hr@10'] for figures in logged)
        assert run['sampled']['hr'] == pytest.approx(logged[run['best_epoch']]['hr@10'],
                                                     abs=1e-12)
    assert_runs_match_their_ranks(tmp_path / 'out', runs)
    assert result['selected_on'] == 'test'
    gmf, mlp, neumf = (result['summary'][name]['parameters']
                       for name in ('gmf', 'mlp', 'neumf_pretrained'))
    assert neumf == gmf + mlp - 1  # one output layer (8 + 8 + 1) for two (8 + 1 each)
    assert 'pretrained_gmf' in ' '.join(runs[2]['flags'])
    table = assert_significance(tmp_path / 'out', result, [
        ('gmf', 'mlp'), ('gmf', 'neumf_pretrained'), ('mlp', 'neumf_pretrained')])
    assert '| neumf_pretrained | ' in table and ' ± ' in table
    assert "Epoch selected on: test (the reference's protocol" in table
    assert 'validation' not in table
    assert (tmp_path / 'out' / 'results.png').stat().st_size > 0


def test_compare_models_selects_on_a_validation_holdout(tmp_path, monkeypatch, capsys):
    """A cache with a validation holdout: each run's epoch is the one ncf.py selected on
    validation, every figure is that model's test (the training's own test of it, and the full
    ranking of its model.pth), and the tables say so."""

    monkeypatch.syspath_prepend(BENCHMARKS)
    import compare_models

    cache = make_cache(tmp_path, 300, 200, 12000, 4, 3, 50, '--validation_holdout')
    out = tmp_path / 'out'
    small = '-e 2 -f 8 --layers 32 16 8 --valid_negative 50 -l 0.01 --precision fp32'
    result = compare_models.main(['--data', cache, '--models', 'gmf', 'mf',
                                  '--seeds', '3', '--device', 'cpu', '--out', str(out),
                                  *[f'--flags={model}={small}' for model in ('gmf', 'mf')]])
    capsys.readouterr()
    assert result['selected_on'] == 'validation'
    for run in result['runs']:
        directory = out / 'runs' / f'{run["model"]}-seed3'
        assert run['selected_on'] == 'validation'
        summary = [r['data'] for r in read_log(directory / 'log.json') if r['step'] == []][-1]
        assert run['best_epoch'] == summary['selected_epoch']
        for metric, key in (('hr', 'test_hr@10'), ('ndcg', 'test_ndcg@10'), ('mrr', 'test_mrr')):
            assert run['sampled'][metric] == pytest.approx(summary[key], abs=1e-12)
        full = [r['data'] for r in read_log(directory / 'full.json') if r['step'] == []][-1]
        assert run['full']['hr'] == full['test_hr@10'] and 'valid_hr@10' in full
    assert_runs_match_their_ranks(out, result['runs'])
    table = assert_significance(out, result, [('gmf', 'mf')])
    assert ("Epoch selected on: validation (held out of training: each user's latest "
            "interaction, or the ratio or time split's validation part), by sampled HR@10; every "
            'figure is the selected model\'s, tested once.') in table
    assert 'a validation holdout of 300 users' in table


def test_compare_models_tunes_each_model_with_the_same_budget(tiny_data, tmp_path,
                                                             monkeypatch, capsys):
    """--tune: each model's study of N trials (tune.py, on validation), then its runs with the
    best trial's parameters; refused on a cache without a validation holdout."""
    import optuna

    monkeypatch.syspath_prepend(BENCHMARKS)
    import compare_models

    # short trials: two epochs each
    monkeypatch.setattr(compare_models, 'COMMON_FLAGS', '-e 2 -b 2048 -b1 0.9 -b2 0.999 -n 4')
    fails(compare_models.main, ['--data', tiny_data, '--models', 'mf', '--tune', '2', '--out',
                                str(tmp_path / 'plain')], capsys, '--tune', 'no',
          '--validation_holdout')
    cache = make_cache(tmp_path, 150, 100, 5000, 4, 3, 30, '--validation_holdout')
    out = tmp_path / 'out'
    result = compare_models.main(['--data', cache, '--models', 'mf',
                                  '--seeds', '3', '4', '--device', 'cpu', '--tune', '2',
                                  '--out', str(out), '--flags=mf=--precision fp32'])
    capsys.readouterr()
    best = result['tuned']['mf']
    study = optuna.load_study(study_name='ncf-mf',
                              storage=f'sqlite:///{out}/tuning/mf/study.db')
    assert len(study.trials) == 2 and best['best_trial'] == study.best_trial.number
    from ncflib.flags import parse_args
    for run in result['runs']:  # the tuned values are the ones that count (given last)
        flags = vars(parse_args(['--data', 'x', *run['flags']]))
        assert {flag: flags[flag] for flag in best['params']} == best['params']
    assert (out / 'results.md').read_text().startswith('Each model tuned first with the same '
                                                       'budget: 2 trials')
    with pytest.raises(SystemExit):
        compare_models.parse_args(['--data', 'x', '--tune', '2', '--models',
                                   'neumf_pretrained'])


def test_compare_models_paired_tests_on_known_cases(tmp_path, monkeypatch):
    """The statistics alone: equal models, a clearly better one, McNemar's exact p and Holm's
    adjustment by hand, a ranks file's per-user figures."""
    np = pytest.importorskip('numpy')
    monkeypatch.syspath_prepend(BENCHMARKS)
    import compare_models

    hr = np.array([1.0, 0.0, 1.0, 0.0] * 10)
    ndcg = np.array([0.5, 0.0, 1 / 3, 0.0] * 10)
    same = compare_models.paired_tests(hr, hr.copy(), ndcg, ndcg.copy())
    assert same == {'hr': {'difference': 0.0, 'a_ahead': 0, 'b_ahead': 0, 'p': 1.0},
                    'ndcg': {'difference': 0.0, 'p': 1.0}}
    better = compare_models.paired_tests(np.ones(40), hr, ndcg + 0.2 + np.arange(40) / 1000,
                                         ndcg)
    assert better['hr'] == {'difference': 0.5, 'a_ahead': 20, 'b_ahead': 0, 'p': 2 * 0.5 ** 20}
    assert better['ndcg']['difference'] > 0.2 and better['ndcg']['p'] < 1e-6
    # one seed: 8 users hit by A alone, 2 by B alone: McNemar's exact p, 2 x P(X <= 2), X ~
    # Binomial(10, 1/2) = 2 x 56 / 1024; the concordant users count for nothing
    a = np.array([1.0] * 8 + [0.0] * 2 + [1.0] * 5 + [0.0] * 30)
    b = np.array([0.0] * 8 + [1.0] * 2 + [1.0] * 5 + [0.0] * 30)
    mcnemar = compare_models.paired_tests(a, b, a, b)['hr']
    assert (mcnemar['a_ahead'], mcnemar['b_ahead']) == (8, 2)
    assert mcnemar['p'] == pytest.approx(112 / 1024, rel=1e-12)
    assert compare_models.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert compare_models.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    path = tmp_path / 'ranks.csv'
    path.write_text('user,rank\n0,0\n1,9\n2,10\n4,3\n')
    users, hits, gains = compare_models.per_user_figures(str(path))
    assert users.tolist() == [0, 1, 2, 4] and hits.tolist() == [1, 1, 0, 1]
    assert gains.tolist() == pytest.approx([1, 1 / math.log2(11), 0, 1 / math.log2(5)])


def test_compare_models_bad_input_and_a_failing_run_are_one_line(tiny_data, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import compare_models

    fails(compare_models.main, ['--data', str(tmp_path / 'none'), '--out',
                                str(tmp_path / 'out')], capsys, '--data', 'not a directory')
    fails(compare_models.main, ['--data', tiny_data, '--flags', 'ncf=-e 1', '--out',
                                str(tmp_path / 'out')], capsys, '--flags takes MODEL="FLAGS"',
          code=2)
    assert not (tmp_path / 'out').exists()
    with monkeypatch.context() as patch:  # no scipy: said before any work
        patch.setitem(sys.modules, 'scipy', None)
        patch.setitem(sys.modules, 'scipy.stats', None)
        fails(compare_models.main, ['--data', tiny_data, '--out', str(tmp_path / 'out')],
              capsys, 'the paired tests need scipy: pip install scipy')
    assert not (tmp_path / 'out').exists()
    fails(compare_models.main, ['--data', tiny_data, '--models', 'gmf', '--seeds', '1',
                                '--out', str(tmp_path / 'out'), '--flags', 'gmf=--no_such_flag'],
          capsys, 'training gmf-seed1: ncf.py failed: ', '--no_such_flag',
          str(tmp_path / 'out' / 'runs' / 'gmf-seed1' / 'train.txt'))


# Stopping compare_models: its child ncf.py is frozen (SIGSTOP) once it has saved an epoch, so
# that the signal finds it training on any machine's speed; it goes on (SIGCONT) once the signal
# passed on by compare_models is pending.

def proc_status(pid):
    """{field: value} of /proc/PID/status; {} once the process is gone."""
    try:
        with open(f'/proc/{pid}/status') as file:
            return dict(line.rstrip('\n').split(':\t', 1) for line in file if ':\t' in line)
    except OSError:
        return {}


def has_signal(pid, field, signum):
    """Whether bit `signum` is set in the signal mask `field` (SigIgn, ShdPnd) of `pid`."""
    return bool(int(proc_status(pid).get(field, '0'), 16) >> (signum - 1) & 1)


def command_lines():
    """{pid: argv} of every process this user can see."""
    lines = {}
    for name in os.listdir('/proc'):
        try:
            with open(f'/proc/{name}/cmdline', 'rb') as file:
                lines[int(name)] = file.read().decode(errors='replace').split('\0')
        except (ValueError, OSError):
            continue
    return lines


def parent_of(pid):
    return int(proc_status(pid).get('PPid', 0))


def wait_until(condition, process, what, deadline=240):
    start = time.monotonic()
    while not condition():
        assert process.poll() is None, (what, process.communicate())
        assert time.monotonic() - start < deadline, what
        time.sleep(0.01)


def frozen_training(process, checkpoint_dir):
    """The pid of `process`'s child ncf.py training into `checkpoint_dir`, stopped (SIGSTOP)
    once it has saved an epoch there (its last.pth: it has epochs to go, --epochs 8)."""
    if not os.path.isdir(f'/proc/{process.pid}'):
        pytest.skip('needs /proc to find the child and see its signals')
    frozen = []

    def stopped_after_an_epoch():
        if not os.path.exists(os.path.join(checkpoint_dir, 'last.pth')):
            return False
        for pid, argv in command_lines().items():
            if parent_of(pid) != process.pid or str(checkpoint_dir) not in argv \
                    or '--mode' in argv:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            while proc_status(pid).get('State', 'X')[0] not in 'TtZX':
                time.sleep(0.001)
            if proc_status(pid).get('State', 'X')[0] in 'Tt':
                frozen.append(pid)
                return True
        return False
    wait_until(stopped_after_an_epoch, process, f'a training into {checkpoint_dir}')
    return frozen[0]


SMALL_RUN = '-f 8 --layers 32 16 8 --valid_negative 50 -l 0.01 --precision fp32'


def compare_command(tiny_data, out, **epochs):
    return [PYTHON, os.path.join(BENCHMARKS, 'compare_models.py'), '--data', tiny_data,
            '--models', *epochs, '--seeds', '3', '--device', 'cpu', '--out', str(out),
            *[f'--flags={model}={SMALL_RUN} -e {count}' for model, count in epochs.items()]]


def assert_stopped_cleanly(stderr, out, child):
    """compare_models' last line says what is left; its child is gone (compare_models waited
    for it), as is any other process working in `out`; nothing is half-written."""
    assert 'Traceback' not in stderr, stderr
    lines = [line for line in stderr.splitlines() if 'interrupted' in line or 'error' in line]
    assert len(lines) == 1 and lines[0] == stderr.strip().splitlines()[-1], stderr
    assert not os.path.exists(f'/proc/{child}')
    assert not [argv for argv in command_lines().values() if any(str(out) in a for a in argv)]
    for root, _, names in os.walk(out):
        assert not [name for name in names if name.endswith('.tmp')], root
    assert not (out / 'results.json').exists() and not (out / 'results.md').exists()
    return lines[0]


def test_compare_models_stopped_by_sigterm_stops_its_child_and_the_same_command_continues(
        tiny_data, tmp_path):
    out = tmp_path / 'out'
    command = compare_command(tiny_data, out, gmf=1, mlp=8)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV)
    mlp = out / 'runs' / 'mlp-seed3'
    child = frozen_training(process, mlp)
    process.send_signal(signal.SIGTERM)
    wait_until(lambda: has_signal(child, 'ShdPnd', signal.SIGTERM), process,
               'SIGTERM passed on to ncf.py')
    os.kill(child, signal.SIGCONT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr
    line = assert_stopped_cleanly(stderr, out, child)
    assert line == (f'compare_models.py: interrupted: 1 of 2 runs complete in {out}/runs '
                    '(gmf-seed3); mlp-seed3 stopped in training, its last.pth kept; the same '
                    'command again continues: complete runs are reused, mlp-seed3 resumes from '
                    'its last.pth')
    assert (mlp / 'train.txt').read_text().strip().splitlines()[-1].startswith(
        f'ncf.py: interrupted: {mlp}/last.pth from epoch ')
    gmf = out / 'runs' / 'gmf-seed3'
    finished = {name: (gmf / name).read_bytes() for name in ('result.json', 'train.txt',
                                                             'model.pth')}

    again = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {name: (gmf / name).read_bytes() for name in finished} == finished  # not retrained
    assert f'(reused: {gmf}/result.json)' in again.stderr
    assert 'mlp seed 3: ' in again.stderr and '(resumed from its last.pth)' in again.stderr
    assert 'Resuming after epoch ' in (mlp / 'train.txt').read_text()
    runs = json.loads((out / 'results.json').read_text())['runs']
    assert [(run['model'], run['epochs'], run['resumed']) for run in runs] == [
        ('gmf', 1, False), ('mlp', 8, True)]


def test_compare_models_stopped_by_ctrl_c_says_what_is_left(tiny_data, tmp_path):
    """Ctrl-C at a terminal: SIGINT to the whole process group, compare_models and its child
    alike (the child takes the one passed on as part of the first)."""
    out = tmp_path / 'out'
    process = subprocess.Popen(compare_command(tiny_data, out, gmf=8), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV,
                               start_new_session=True)
    gmf = out / 'runs' / 'gmf-seed3'
    child = frozen_training(process, gmf)
    os.killpg(process.pid, signal.SIGINT)
    wait_until(lambda: has_signal(process.pid, 'SigIgn', signal.SIGINT), process,
               'compare_models taking Ctrl-C')
    os.kill(child, signal.SIGCONT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr
    line = assert_stopped_cleanly(stderr, out, child)
    assert line == (f'compare_models.py: interrupted: 0 of 1 runs complete in {out}/runs; '
                    'gmf-seed3 stopped in training, its last.pth kept; the same command again '
                    'continues: gmf-seed3 resumes from its last.pth')
    log = (gmf / 'train.txt').read_text()
    assert log.count('ncf.py: interrupted: ') == 1 and 'Traceback' not in log


def test_the_other_benchmarks_fail_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import convert_benchmark
    import negative_sampling

    missing = str(tmp_path / 'ratings.csv')
    fails(convert_benchmark.main, ['--path', missing, '--workdir', str(tmp_path / 'work'),
                                   '--repeat', '1'], capsys,
          'convert.py failed: convert.py: error: ', missing, str(tmp_path / 'work'))
    fails(negative_sampling.main, ['--data', str(tmp_path / 'none'), '--device', 'cpu'],
          capsys, '--data', 'not a directory')
    import torchrun_stress
    fails(torchrun_stress.main, ['--runs', '0'], capsys, '--runs and --timeout must be positive')


def test_gpu_memory_adds_up_each_part_and_runs_the_measured_parts(monkeypatch):
    """benchmarks/gpu_memory.py: ML-32m's NeuMF counted by hand, each part's bytes from it, and
    the measured run's parts executed (on a CPU, where no device peak exists) at a tiny size."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, 'benchmarks'))
    import gpu_memory

    result = gpu_memory.main(['--shape', 'ml-32m'])
    users, items = 200_948, 87_585
    # Per row: the GMF table's 64 and the MLP table's 128 (layers[0] / 2); the MLP's Linear
    # layers 256-256-128-64 and the output layer over 64 + 64.
    dense = 256 * 256 + 256 + 256 * 128 + 128 + 128 * 64 + 64 + 128 + 1
    assert result['parameters'] == (users + items) * 192 + dense
    parts = {name if name.startswith('epoch') else name.split(' (')[0]: gib * gpu_memory.GIB
             for name, gib in result['computed_gib'].items()}
    assert parts['weights'] == parts['gradients'] == result['parameters'] * 4
    assert parts['Adam state'] == 2 * parts['weights']
    positives = 32_000_000 - users
    assert parts['data'] == positives * 16 + users * 16 + users * 100 * 8
    samples = positives * 5 // 2 ** 20 * 2 ** 20
    assert parts['epoch (kept)'] == samples * 20  # users and items int64, labels float32
    assert parts['epoch (peak while drawn)'] > parts['epoch (kept)']
    steady = sum(parts[name] for name in ('data', 'weights', 'gradients', 'Adam state'))
    assert result['computed_peak_gib'] * gpu_memory.GIB > steady + parts['activations']
    # sparse updates: the tables' gradients are the touched rows and their copies, at most a
    # batch's (2^20 > either table) a side
    sparse = gpu_memory.main(['--shape', 'ml-32m', '--embedding_updates', 'sparse'])
    gradients = sparse['computed_gib']['gradients (sparse, fp32)'] * gpu_memory.GIB
    assert gradients == 4 * (dense + 2 * (users + items) * 192)
    assert sparse['computed_peak_gib'] == pytest.approx(
        result['computed_peak_gib'] + (gradients - parts['gradients']) / gpu_memory.GIB)

    from ncflib import models
    peaks = gpu_memory.measured('cpu', 60, 50, 3000, models.ModelShape(factors=8,
                                layers=(32, 16, 8)), 1024, 4, 100, 'fp32')
    assert peaks == {'data': None, 'model': None, 'epoch drawn': None,
                     '3 training steps': None, 'evaluation': None}


def test_gpu_memory_at_any_size_and_the_gpus_row_wise_sharding_needs(monkeypatch, capsys):
    """--users, --items and --rows size it on paper; the GPUs of --gpu_gib that hold the
    tables (weights, gradients, two moments: 16 bytes a value) split row-wise with the rest on
    each, and everything that grows with the data split; none where what stays whole does not
    fit; bad sizes in one line."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    import gpu_memory

    users, items = 100_000_000, 2_000_000
    result = gpu_memory.main(['--users', str(users), '--items', str(items), '--rows',
                              str(2_000_000_000), '--gpu_gib', '80'])
    dense = 256 * 256 + 256 + 256 * 128 + 128 + 128 * 64 + 64 + 128 + 1
    assert result['parameters'] == (users + items) * 192 + dense
    assert result['tables_gib'] * gpu_memory.GIB == (users + items) * 192 * 16
    total, fixed = result['computed_peak_gib'], result['fixed_gib']
    assert result['row_wise_gpus'] == {
        'tables': None if total - result['tables_gib'] >= 80 else math.ceil(
            result['tables_gib'] / (80 - (total - result['tables_gib']))),
        'everything': math.ceil((total - fixed) / (80 - fixed))}
    assert result['row_wise_gpus']['tables'] is None  # the epoch drawn whole does not fit
    assert gpu_memory.gpus_needed(10.0, 2.0, 6.0) == 3 and gpu_memory.gpus_needed(1, 7, 6) is None
    small = gpu_memory.main(['--shape', 'ml-1m'])
    assert small['row_wise_gpus'] == {'tables': 1, 'everything': 1}
    fails(gpu_memory.main, ['--users', '10', '--rows', '5'], capsys, '--rows more than --users')


def test_gpu_memory_measure_without_cuda_is_one_line(monkeypatch, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip('CUDA is here: --measure measures')
    monkeypatch.syspath_prepend(BENCHMARKS)
    import gpu_memory

    fails(gpu_memory.main, ['--measure'], capsys, '--measure needs CUDA')


# gpu_check.sh: what runs without a GPU (the usage, the tools check, the summary)

GPU_CHECK = os.path.join(BENCHMARKS, 'gpu_check.sh')


def gpu_check(stage, tmp_path, path=None):
    env = {**ENV, 'OUT': str(tmp_path / 'gpu-check'), 'WORK': str(tmp_path / 'work')}
    if path is not None:
        env['PATH'] = path
    return subprocess.run(['/bin/bash', GPU_CHECK, *([stage] if stage else [])],
                          capture_output=True, text=True, env=env, timeout=60)


def test_gpu_check_lists_its_stages_and_refuses_others(tmp_path):
    usage = gpu_check(None, tmp_path)
    assert usage.returncode == 2
    for stage in ('tests', 'kernels', 'data', 'speed', 'accuracy', 'serve', 'memory', 'summary'):
        assert f'gpu_check.sh {stage} ' in usage.stderr
    unknown = gpu_check('test', tmp_path)
    assert unknown.returncode == 2
    assert_one_line_error(unknown, 'no stage test: one of tests, kernels, data, speed')
    assert not (tmp_path / 'gpu-check').exists()


def test_gpu_check_stops_before_any_work_without_its_tools(tmp_path):
    """A PATH without gcc, then a python without its packages (-S: no site-packages): one line
    naming what is missing, before anything is written (no GPU stage runs here)."""
    bin_directory = tmp_path / 'bin'
    bin_directory.mkdir()
    python = bin_directory / 'python'
    os.symlink(subprocess.run(['sh', '-c', 'command -v dirname'], capture_output=True,
                              text=True).stdout.strip(), bin_directory / 'dirname')
    for options, stage, missing in (('', 'tests', 'needs gcc, not found'),
                                    ('-S', 'kernels',
                                     'needs torch, triton, pyarrow, optuna, xdist, gcc,'),
                                    ('-S', 'speed', 'needs torch, triton, pyarrow, gcc,')):
        python.write_text(f'#!/bin/sh\nexec {PYTHON} {options} "$@"\n')
        python.chmod(0o755)
        completed = gpu_check(stage, tmp_path, path=str(bin_directory))
        assert completed.returncode == 1
        assert_one_line_error(completed, f'gpu_check.sh: error: the {stage} stage {missing}')
        assert not (tmp_path / 'gpu-check').exists() and not (tmp_path / 'work').exists()


def test_gpu_check_summary_uses_the_rows_a_stopped_throughput_printed(tmp_path):
    rows = [{'row': 'baseline: eager fp16', 'impl': 'eager', 'precision': 'fp16',
             'train_epoch_samples_per_s': 7e7, 'eval_samples_per_s': 1e8,
             'peak_memory_gib': 3.0, 'default_plan': False},
            {'row': 'compile', 'impl': 'compile', 'precision': 'bf16',
             'train_epoch_samples_per_s': 1.4e8, 'eval_samples_per_s': 6e8,
             'peak_memory_gib': 2.0, 'default_plan': True}]
    out = tmp_path / 'gpu-check'
    out.mkdir()
    (out / 'throughput.txt').write_text(
        'NVIDIA H200: 138,493 users\n' + ''.join(json.dumps(row) + '\n' for row in rows)
        + '{"row": "fused", "impl": "fu\n(timed out after 200 s)\n')
    completed = gpu_check('summary', tmp_path)
    assert completed.returncode == 0, completed.stderr
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['train_baseline_fp16_samples_per_s'] == 7e7
    assert summary['train_compile_samples_per_s'] == 1.4e8
    assert summary['compile_over_plain_fp16'] == 2.0
    assert summary['eval_default_samples_per_s'] == 6e8
    assert summary['throughput']['partial'] and len(summary['throughput']['rows']) == 2
