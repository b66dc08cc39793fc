"""The benchmarks run: benchmarks/throughput.py times every knob of the plan in one run (the
figures themselves come from benchmark runs, never from tests)."""
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
