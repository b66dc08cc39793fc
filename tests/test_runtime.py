"""The runtime plan: what auto picks where, contradicting flags, and the micro-batches it sets."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import dataloading
import ncf
import runtime
from conftest import ROOT
from neumf import NeuMF
from training import Trainer
from utils import UsageError

CPU, CUDA = torch.device('cpu'), torch.device('cuda', 0)


@pytest.mark.parametrize('native, flags, expected, warns', [
    (True, {}, 'measured', False),
    (False, {}, 'measured', False),
    (True, {'opt_level': 'O0'}, 'fp32', False),
    (True, {'opt_level': 'O2'}, 'bf16', False),
    (True, {'amp': True}, 'bf16', False),
    (False, {'amp': True}, 'bf16', True),             # asked for: bf16, with a warning
    (False, {'precision': 'bf16'}, 'bf16', True),
    (False, {'precision': 'fp32', 'opt_level': 'O0'}, 'fp32', False),
])
def test_precision_on_a_cpu(native, flags, expected, warns, monkeypatch):
    monkeypatch.setattr(runtime, 'cpu_has_native_bf16', lambda: native)
    precision, note, warning = runtime.resolve_precision(
        CPU, **flags, measure=lambda: ('measured', 'precision auto: measured'))
    assert precision == expected
    assert (warning is not None) == warns
    if warns:
        assert 'emulated' in warning and 'auto' in warning
    assert (note == 'precision auto: measured') == (not flags)


@pytest.mark.parametrize('seconds, expected', [({'fp32': 0.040, 'bf16': 0.058}, 'fp32'),
                                               ({'fp32': 0.040, 'bf16': 0.021}, 'bf16')])
def test_cpu_precision_is_the_faster_one_measured_once_and_remembered(seconds, expected,
                                                                      monkeypatch, tmp_path):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    measured = []

    def measure(model_class, factors, layers):
        measured.append((model_class.__name__, factors, layers))
        return seconds
    monkeypatch.setattr(runtime, 'measure_cpu_precisions', measure)
    precision, note = runtime.cpu_precision_by_measurement('cpu_fused', 8, [32, 16, 8])
    assert precision == expected and measured == [('CpuFusedNeuMF', 8, [32, 16, 8])]
    other = 'bf16' if expected == 'fp32' else 'fp32'
    assert note == (f'precision auto: {expected}, the faster on this CPU (a training step of '
                    f'4096 samples {seconds[expected] * 1000:.1f} ms, '
                    f'{seconds[other] * 1000:.1f} ms in {other}; measured now)')
    remembered = tmp_path / 'ncf' / runtime.CPU_PRECISION_FILE
    again = runtime.cpu_precision_by_measurement('cpu_fused', 8, [32, 16, 8])
    assert again[0] == expected and len(measured) == 1  # not measured again
    assert again[1].endswith(f'remembered in {remembered})')
    # other layers, another implementation: measured anew; an unreadable file: likewise
    runtime.cpu_precision_by_measurement('eager', 8, [32, 16, 8])
    runtime.cpu_precision_by_measurement('cpu_fused', 8, [64, 32])
    assert len(measured) == 3 and len(json.loads(remembered.read_text())) == 3
    remembered.write_text('{torn')
    runtime.cpu_precision_by_measurement('cpu_fused', 8, [32, 16, 8])
    assert len(measured) == 4 and len(json.loads(remembered.read_text())) == 1


def test_cpu_precision_measurement_runs_the_model():
    """The real measurement: both precisions timed, the global random state untouched."""
    state = torch.get_rng_state()
    seconds = runtime.measure_cpu_precisions(runtime.model_class('cpu_fused'), 8, [32, 16, 8],
                                             rounds=1)
    assert set(seconds) == {'fp32', 'bf16'} and min(seconds.values()) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_precision_on_cuda_and_contradictions(monkeypatch):
    capability = [(8, 0)]
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability[0])
    assert runtime.resolve_precision(CUDA)[:2] == ('bf16', 'precision auto: bf16 on this GPU')
    assert runtime.resolve_precision(CUDA, 'tf32')[0] == 'tf32'
    assert runtime.resolve_precision(CUDA, 'tf32', opt_level='O0')[0] == 'tf32'
    capability[0] = (7, 0)  # a V100: bf16 only emulated, no TF32
    assert runtime.resolve_precision(CUDA)[:2] == ('fp16', 'precision auto: fp16 on this GPU')
    with pytest.raises(UsageError, match='tf32 needs an Ampere or newer GPU'):
        runtime.resolve_precision(CUDA, 'tf32')
    assert runtime.resolve_precision(CUDA, opt_level='O2')[0] == 'fp16'  # the reference's AMP
    assert runtime.resolve_precision(CUDA, amp=True)[0] == 'fp16'
    assert runtime.resolve_precision(CUDA, opt_level='O0')[0] == 'fp32'
    for flags, fragment in (({'amp': True, 'opt_level': 'O0'}, 'contradict'),
                            ({'precision': 'fp32', 'opt_level': 'O2'}, 'contradicts'),
                            ({'precision': 'bf16', 'opt_level': 'O0'}, 'contradicts'),
                            ({'precision': 'fp16'}, 'fp16 needs CUDA'),
                            ({'precision': 'tf32'}, 'tf32 needs an Ampere')):
        with pytest.raises(UsageError, match=fragment):
            runtime.resolve_precision(CPU, **flags)


def test_implementation_auto_and_misuse(monkeypatch):
    assert runtime.resolve_impl(CPU) == ('cpu_fused', 'implementation auto: cpu_fused on CPU')
    assert runtime.resolve_impl(CUDA) == ('compile', 'implementation auto: compile on CUDA')
    assert runtime.resolve_impl(CPU, 'compile') == ('compile', None)
    with pytest.raises(UsageError, match='cpu_fused is for CPUs'):
        runtime.resolve_impl(CUDA, 'cpu_fused')
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(UsageError, match='--impl fused'):
        runtime.resolve_impl(CPU, 'fused')


def test_plan_of_a_cpu(monkeypatch, tmp_path):
    plan = runtime.resolve('cpu', valid_batch_size=2 ** 20, model_shape=(8, [32, 16]),
                           measure=lambda impl, factors, layers: ('bf16', f'{impl} {layers}'))
    assert (plan.impl, plan.precision, plan.micro_batch, plan.fused_adam) == \
        ('cpu_fused', 'bf16', runtime.CPU_MICRO_BATCH, True)
    assert plan.eval_chunk == runtime.CPU_MICRO_BATCH and not plan.compiled
    assert not plan.compile_fallback and plan.device_memory is None
    assert plan.describe().startswith('Precision: bf16, implementation: cpu_fused, device: cpu')
    assert '(cpu_fused [32, 16]; implementation auto: cpu_fused on CPU)' in plan.describe()
    assert plan.scoring_rows(1000, 1040) == runtime.CPU_MICRO_BATCH // 1000
    assert plan.scoring_rows(10 ** 6, 1040) == 1
    baseline = runtime.baseline(plan)
    assert (baseline.impl, baseline.precision, baseline.micro_batch, baseline.fused_adam) == \
        ('eager', 'fp32', None, False)
    assert baseline.eval_chunk == 2 ** 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.impl = 'eager'
    # compiled plans keep their compiled code in a persistent cache
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR')
    compiled = runtime.resolve('cpu', impl='compile', precision='fp32',
                               compile_cache=str(tmp_path / 'cache'))
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(tmp_path / 'cache')
    assert compiled.compiled and not compiled.compile_fallback  # asked for: no fallback


def test_scoring_chunks_on_cuda_are_sized_by_memory():
    plan = dataclasses.replace(runtime.resolve('cpu', precision='fp32', impl='eager'),
                               device=CUDA, micro_batch=None, device_memory=80 * 2 ** 30)
    assert plan.scoring_rows(26744, 1040) == runtime.CUDA_SCORING_PAIRS // 26744  # the cap
    small = dataclasses.replace(plan, device_memory=16 * 2 ** 30)
    assert small.scoring_rows(26744, 1040) == 4 * 2 ** 30 // 1040 // 26744
    model = NeuMF(10, 10, 64, [256, 256, 128, 64])
    assert model.scoring_bytes_per_pair(torch.bfloat16) == (256 + 256) * 2 + 16


def test_flags_map_onto_the_plan(capsys):
    assert ncf.parse_args(['--data', 'd', '--plain']).impl == 'eager'
    assert ncf.parse_args(['--data', 'd']).impl == 'auto'
    with pytest.raises(SystemExit):
        ncf.parse_args(['--data', 'd', '--plain', '--impl', 'compile'])
    assert '--plain means --impl eager' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ncf.parse_args(['--help'])
    help_text = ' '.join(capsys.readouterr().out.split())
    assert 'auto: compile on CUDA, cpu_fused on a CPU' in help_text
    assert 'auto: bf16 on CUDA (fp16 before Ampere), bf16 on a CPU with native bf16' in help_text


def test_micro_batches_of_any_size_give_the_same_update():
    users = torch.arange(40).repeat_interleave(5)
    items = torch.arange(200) % 31
    plan = dataclasses.replace(runtime.resolve('cpu', precision='fp32', impl='eager'),
                               fused_adam=False)

    def one_epoch(grads_accumulated, max_micro_batch):
        torch.manual_seed(0)
        model = NeuMF(40, 31, 8, [16, 8], dropout=0.0)
        batches = dataloading.TrainBatches(users, items, 31, 1, 400,
                                           grads_accumulated=grads_accumulated,
                                           max_micro_batch=max_micro_batch)
        trainer = Trainer(plan, model, batches, 0.01, (0.9, 0.999), 1e-8)
        loss_sum, count = trainer.epoch(torch.Generator().manual_seed(1))
        return batches, model.state_dict(), loss_sum.item() / count

    _, whole, whole_loss = one_epoch(1, None)
    for grads_accumulated, max_micro_batch, sizes in ((2, None, [200, 200]),
                                                      (4, None, [100] * 4),
                                                      (1, 100, [100] * 4),
                                                      (1, 150, [134, 133, 133]),  # uneven
                                                      (2, 90, [67, 67, 66] * 2)):
        batches, split, split_loss = one_epoch(grads_accumulated, max_micro_batch)
        assert [part.stop - part.start for part in batches.micro_slices] == sizes
        assert split_loss == pytest.approx(whole_loss, rel=1e-6)
        for key in whole:
            assert torch.allclose(whole[key], split[key], atol=1e-6), key


def test_even_split():
    assert dataloading.even_split(2 ** 20, 64) == [16384] * 64
    assert dataloading.even_split(1009, 4) == [253, 252, 252, 252]
    assert sum(dataloading.even_split(12345, 7)) == 12345


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
