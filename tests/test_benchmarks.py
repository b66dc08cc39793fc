"""The benchmarks run: benchmarks/throughput.py times every knob of the plan in one run, and
benchmarks/compare_models.py compares the NCF family (the figures themselves come from benchmark
runs, never from tests)."""
import json
import os
import subprocess
import sys

from conftest import ROOT
from ncflib import runtime


def test_throughput_benchmark_attributes_every_knob(tiny_data):
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks', 'throughput.py'), '--data', tiny_data,
         '--device', 'cpu', '--batch_size', '4096', '--steps', '2', '-f', '8', '--layers', '32',
         '16', '8', '--impl', 'cpu_fused'], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result['shape']['n_users'] == 300 and result['batch_size'] == 4096
    names = [row['row'] for row in result['rows']]
    chosen = result['default_precision']  # measured faster on this CPU
    other = 'bf16' if chosen == 'fp32' else 'fp32'
    assert names == ['baseline: eager fp32'] + (['+ bf16'] if chosen == 'bf16' else []) + \
        ['+ fused Adam', f'+ micro-batches of {runtime.CPU_MICRO_BATCH}', 'cpu_fused',
         f'cpu_fused, {other}']
    assert result['rows'][-1]['precision'] == other
    assert result['default'] == 'cpu_fused' and result['baseline'] == 'baseline: eager fp32'
    assert result['default_over_other_precision'] > 0
    for row in result['rows']:
        for key in ('train_step_samples_per_s', 'train_epoch_samples_per_s',
                    'eval_samples_per_s', 'first_step_s'):
            assert row[key] > 0
    for key in ('train_speedup', 'train_step_speedup', 'eval_speedup'):
        assert result[key] > 0


def test_compare_models_trains_each_model_and_reports_both_protocols(tiny_data, tmp_path):
    """benchmarks/compare_models.py end to end on the tiny data, briefly: GMF and MLP, then the
    paper's NeuMF from them (one seed: each run is two ncf.py processes); a table, JSON with
    every run, and a plot."""
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
    gmf, mlp, neumf = (result['summary'][name]['parameters']
                       for name in ('gmf', 'mlp', 'neumf_pretrained'))
    assert neumf == gmf + mlp - 1  # one output layer (8 + 8 + 1) for two (8 + 1 each)
    assert 'pretrained_gmf' in ' '.join(runs[2]['flags'])
    table = (tmp_path / 'out' / 'results.md').read_text()
    assert '| neumf_pretrained | ' in table and ' ± ' in table
    assert (tmp_path / 'out' / 'results.png').stat().st_size > 0
    bad = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks', 'compare_models.py'), '--data',
         tiny_data, '--flags', 'ncf=-e 1', '--out', str(tmp_path / 'bad')],
        capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and '--flags takes MODEL="FLAGS"' in bad.stderr


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

    from ncflib import models
    peaks = gpu_memory.measured('cpu', 60, 50, 3000, models.ModelShape(factors=8,
                                layers=(32, 16, 8)), 1024, 4, 100, 'fp32')
    assert peaks == {'data': None, 'model': None, 'epoch drawn': None,
                     '3 training steps': None, 'evaluation': None}
