"""The runtime plan: what auto picks where, contradicting flags, and the micro-batches it sets."""
import dataclasses
import json
import os
import re
import warnings

import pytest
import torch

import ncf
from conftest import SMALL, fails, flags
from ncflib import fused, runtime
from ncflib.cli import UsageError
from ncflib.models import ModelShape, NeuMF

CPU, CUDA = torch.device('cpu'), torch.device('cuda', 0)


@pytest.mark.parametrize('native, asked, expected, warns', [
    (True, {}, 'measured', False),
    (False, {}, 'measured', False),
    (True, {'opt_level': 'O0'}, 'fp32', False),
    (True, {'opt_level': 'O2'}, 'bf16', False),
    (True, {'amp': True}, 'bf16', False),
    (False, {'amp': True}, 'bf16', True),             # asked for: bf16, with a warning
    (False, {'precision': 'bf16'}, 'bf16', True),
    (False, {'precision': 'fp32', 'opt_level': 'O0'}, 'fp32', False),
])
def test_precision_on_a_cpu(native, asked, expected, warns, monkeypatch):
    monkeypatch.setattr(runtime, 'cpu_has_native_bf16', lambda: native)
    precision, note, warning = runtime.resolve_precision(
        CPU, **asked, measure=lambda: ('measured', 'precision auto: measured'))
    assert precision == expected
    assert (warning is not None) == warns
    if warns:
        assert 'emulated' in warning and 'auto' in warning
    assert (note == 'precision auto: measured') == (not asked)


@pytest.mark.parametrize('seconds, expected', [({'fp32': 0.040, 'bf16': 0.058}, 'fp32'),
                                               ({'fp32': 0.040, 'bf16': 0.021}, 'bf16')])
def test_cpu_precision_is_the_faster_one_measured_once_and_remembered(seconds, expected,
                                                                      monkeypatch, tmp_path):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    measured = []

    def measure(impl, shape):
        measured.append((impl, shape))
        return seconds
    monkeypatch.setattr(runtime, 'measure_cpu_precisions', measure)
    shape = ModelShape('neumf', 8, [32, 16, 8])
    precision, note = runtime.cpu_precision_by_measurement('cpu_fused', shape)
    assert precision == expected and measured == [('cpu_fused', shape)]
    other = 'bf16' if expected == 'fp32' else 'fp32'
    assert note == (f'precision auto: {expected}, the faster on this CPU (a training step of '
                    f'4096 samples {seconds[expected] * 1000:.1f} ms, '
                    f'{seconds[other] * 1000:.1f} ms in {other}; measured now)')
    remembered = tmp_path / 'ncf' / runtime.CPU_PRECISION_FILE
    again = runtime.cpu_precision_by_measurement('cpu_fused', shape)
    assert again[0] == expected and len(measured) == 1  # not measured again
    assert again[1].endswith(f'remembered in {remembered})')
    # other layers, another implementation, another model: measured anew; an unreadable file:
    # likewise
    runtime.cpu_precision_by_measurement('eager', shape)
    runtime.cpu_precision_by_measurement('cpu_fused', ModelShape('neumf', 8, [64, 32]))
    runtime.cpu_precision_by_measurement('cpu_fused', ModelShape('mf', 8, [32, 16, 8]))
    assert len(measured) == 4 and len(json.loads(remembered.read_text())) == 4
    remembered.write_text('{torn')
    runtime.cpu_precision_by_measurement('cpu_fused', shape)
    assert len(measured) == 5 and len(json.loads(remembered.read_text())) == 1


def test_cpu_precision_measurement_runs_the_model():
    """The real measurement: both precisions timed, the global random state untouched."""
    state = torch.get_rng_state()
    seconds = runtime.measure_cpu_precisions('cpu_fused', ModelShape('neumf', 8, [32, 16, 8]),
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
    for asked, fragment in (({'amp': True, 'opt_level': 'O0'}, 'contradict'),
                            ({'precision': 'fp32', 'opt_level': 'O2'}, 'contradicts'),
                            ({'precision': 'bf16', 'opt_level': 'O0'}, 'contradicts'),
                            ({'precision': 'fp16'}, 'fp16 needs CUDA'),
                            ({'precision': 'tf32'}, 'tf32 needs an Ampere')):
        with pytest.raises(UsageError, match=fragment):
            runtime.resolve_precision(CPU, **asked)


def test_implementation_auto_and_misuse(monkeypatch):
    assert runtime.resolve_impl(CPU) == ('cpu_fused', 'implementation auto: cpu_fused on CPU')
    assert runtime.resolve_impl(CUDA) == ('compile', 'implementation auto: compile on CUDA')
    assert runtime.resolve_impl(CPU, 'compile') == ('compile', None)
    with pytest.raises(UsageError, match='cpu_fused is for CPUs'):
        runtime.resolve_impl(CUDA, 'cpu_fused')
    # Triton defines its own jit helpers (tl.cdiv...) when imported, reading TRITON_INTERPRET:
    # imported first without it, they would break every interpreted kernel after this test
    fused.available()
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(UsageError, match='--impl fused'):
        runtime.resolve_impl(CPU, 'fused')


def test_plan_of_a_cpu(monkeypatch, tmp_path):
    plan = runtime.resolve(runtime.PlanOptions(device='cpu'), ModelShape('neumf', 8, [32, 16]),
                           measure=lambda impl, shape: ('bf16', f'{impl} {list(shape.layers)}'))
    assert (plan.impl, plan.precision, plan.micro_batch, plan.fused_optimizer) == \
        ('cpu_fused', 'bf16', runtime.CPU_MICRO_BATCH, True)
    assert plan.eval_chunk == runtime.CPU_MICRO_BATCH and not plan.compiled
    assert not plan.compile_fallback and plan.device_memory is None
    assert plan.describe().startswith('Precision: bf16, implementation: cpu_fused, device: cpu')
    assert '(cpu_fused [32, 16]; implementation auto: cpu_fused on CPU)' in plan.describe()
    assert plan.scoring_rows(1000, 1040) == runtime.CPU_MICRO_BATCH // 1000
    assert plan.scoring_rows(10 ** 6, 1040) == 1
    baseline = runtime.baseline(plan)
    assert (baseline.impl, baseline.precision, baseline.micro_batch, baseline.fused_optimizer) == \
        ('eager', 'fp32', None, False)
    assert baseline.eval_chunk == 2 ** 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.impl = 'eager'
    # compiled plans keep their compiled code in a persistent cache
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR')
    compiled = runtime.resolve(runtime.PlanOptions(device='cpu', impl='compile',
                                                   precision='fp32',
                                                   compile_cache=str(tmp_path / 'cache')))
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(tmp_path / 'cache')
    assert compiled.compiled and not compiled.compile_fallback  # asked for: no fallback


def test_scoring_chunks_on_cuda_are_sized_by_memory():
    plan = dataclasses.replace(
        runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl='eager')),
        device=CUDA, micro_batch=None, device_memory=80 * 2 ** 30)
    assert plan.scoring_rows(26744, 1040) == runtime.CUDA_SCORING_PAIRS // 26744  # the cap
    small = dataclasses.replace(plan, device_memory=16 * 2 ** 30)
    assert small.scoring_rows(26744, 1040) == 4 * 2 ** 30 // 1040 // 26744
    model = NeuMF(10, 10, 64, [256, 256, 128, 64])
    assert model.scoring_bytes_per_pair(torch.bfloat16) == (256 + 256) * 2 + 16


def test_flags_map_onto_the_plan(capsys):
    assert ncf.parse_args(['--data', 'd', '--plain']).plan_options.impl == 'eager'
    assert ncf.parse_args(['--data', 'd']).plan_options == runtime.PlanOptions()
    options = ncf.parse_args(['--data', 'd', '--device', 'cpu', '--amp', '--compile_cache',
                              'c']).plan_options
    assert options == runtime.PlanOptions(device='cpu', amp=True, compile_cache='c')
    with pytest.raises(SystemExit) as exit_info:
        ncf.parse_args(['--data', 'd', '--plain', '--impl', 'compile'])
    assert exit_info.value.code == 2  # as argparse's own errors
    assert '--plain means --impl eager' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ncf.parse_args(['--help'])
    help_text = ' '.join(capsys.readouterr().out.split())
    assert 'auto: compile on CUDA, cpu_fused on a CPU' in help_text
    assert ('auto: bf16 on a GPU that computes it (Ampere on), else fp16; on a CPU the faster '
            'of fp32 and bf16') in help_text


def run_small(small_data, **overrides):
    return ncf.main(flags(small_data, base=SMALL, **overrides))


def test_a_failing_compiler_runs_eager_where_auto_chose_to_compile(small_data, monkeypatch,
                                                                   capsys):
    """As on a GPU whose Triton is missing or too old: auto's compile goes on eager, saying so
    once; --impl compile, asked for, is an error."""
    import torch._inductor.compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError('no compiler for this GPU')
    eager = run_small(small_data, impl='eager')
    capsys.readouterr()
    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.compile_fx, 'compile_fx', broken)
    monkeypatch.setitem(runtime.AUTO_IMPLEMENTATION, 'cpu', 'compile')
    fallen_back = run_small(small_data)
    captured = capsys.readouterr()
    assert 'implementation: compile, device: cpu' in captured.out
    assert captured.err == ('ncf.py: warning: torch.compile failed (RuntimeError: no compiler '
                            'for this GPU): running eager instead (--impl compile makes this an '
                            'error)\n')
    assert fallen_back['train_losses'] == eager['train_losses']
    assert fallen_back['hrs'] == eager['hrs']
    torch._dynamo.reset()
    fails(ncf.main, flags(small_data, base=SMALL, impl='compile'), capsys,
          'torch.compile failed (RuntimeError: no compiler for this GPU); --impl eager runs '
          'without compiling')
    torch._dynamo.reset()


def test_together_shares_a_failure_and_the_collectives_of_one_process():
    plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl='eager'))
    assert runtime.together(plan, lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(UsageError, match='bad input'):
        runtime.together(plan, lambda: (_ for _ in ()).throw(UsageError('bad input')))
    assert runtime.describe_failure(MemoryError('out of memory'), 3) == \
        'process 3 failed: MemoryError: out of memory'
    assert runtime.all_reduce_sums([1, 2.5], plan) == [1.0, 2.5]
    runtime.barrier(plan)  # one process: nothing to wait for
    gloo = RuntimeError('[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error '
                        '[127.0.0.1]:20386: Connection reset by peer. This is typically caused '
                        'by a remote worker hanging. GLHF!')
    assert runtime.peer_failure(gloo) == 'Read error [127.0.0.1]:20386: Connection reset by peer'
    assert runtime.peer_failure(ValueError('no')) is None


def test_autocast_only_where_the_compute_dtype_is_not_fp32():
    """tf32 computes in fp32 (its TF32 products are a matmul setting): no autocast around it,
    which would only cost each operation a dispatch."""
    plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl='eager'))
    for precision, device, enabled in (('fp32', CPU, False), ('bf16', CPU, True),
                                       ('tf32', CUDA, False), ('fp32', CUDA, False)):
        with warnings.catch_warnings():
            # CUDA's autocast, enabled where there is no CUDA, would warn and disable itself
            warnings.simplefilter('error')
            with dataclasses.replace(plan, precision=precision, device=device).autocast():
                assert torch.is_autocast_enabled(device.type) == enabled, precision


def fake_gpus(monkeypatch, count):
    """torch.cuda as on a machine with `count` GPUs (0: none), for what asks it no more than
    how many there are."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: count > 0)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: count)


def test_any_device_string_or_torch_device(monkeypatch):
    for asked in ('cpu', 'cpu:0', torch.device('cpu')):
        assert runtime.resolve_device(asked) == CPU
    fake_gpus(monkeypatch, 0)
    assert runtime.resolve_device('auto') == CPU
    for asked in ('cuda', 'cuda:0', torch.device('cuda', 1)):
        with pytest.raises(UsageError, match='asked for, but CUDA is not available'):
            runtime.resolve_device(asked)
    for asked, shown in (('mps', 'mps'), ('meta', 'meta'), ('cdua', 'cdua'),
                         (torch.device('meta'), 'meta'), ('cuda:x', 'cuda:x'), (None, 'None')):
        with pytest.raises(UsageError, match=re.escape(
                f"device '{shown}': ncf runs on cpu, cuda or cuda:N")):
            runtime.resolve_device(asked)
    fake_gpus(monkeypatch, 2)
    cuda1 = torch.device('cuda', 1)
    assert runtime.resolve_device('auto') == runtime.resolve_device('cuda') == CUDA
    assert runtime.resolve_device('cuda:1') == runtime.resolve_device(cuda1) == cuda1
    with pytest.raises(UsageError, match=re.escape(
            'device cuda:2, but this machine has 2 GPUs (cuda:0 to cuda:1)')):
        runtime.resolve_device('cuda:2')
    # under torchrun: each process its local rank's GPU, never two on one
    assert runtime.resolve_device('cuda', runtime.Processes(1, 2, 1, 2)) == cuda1
    with pytest.raises(UsageError, match='would put the 2 processes of this machine on one GPU'):
        runtime.resolve_device('cuda:1', runtime.Processes(1, 2, 1, 2))
    with pytest.raises(UsageError, match=re.escape(
            'local rank 0 of 3 processes on this machine (LOCAL_WORLD_SIZE), but it has 2 '
            'GPUs: one process per GPU (torchrun --nproc_per_node 2 at most)')):
        runtime.resolve_device('auto', runtime.Processes(0, 3, 0, 3))


def test_the_plan_of_a_gpu_asked_for_by_index(monkeypatch):
    """What torch.hub's device='cuda:1' resolves to (building on it needs the GPU)."""
    fake_gpus(monkeypatch, 2)
    asked = []

    class Properties:
        total_memory = 80 * 2 ** 30
    monkeypatch.setattr(torch.cuda, 'get_device_properties',
                        lambda device: asked.append(device) or Properties)
    monkeypatch.setattr(torch, 'set_float32_matmul_precision', lambda precision: None)
    plan = runtime.resolve(runtime.PlanOptions(device='cuda:1', precision='fp32', impl='eager'))
    assert plan.device == torch.device('cuda', 1) == asked[0]
    assert plan.device_memory == 80 * 2 ** 30


def torchrun_environment(monkeypatch, rank, world_size, local_rank, local_world_size):
    for name, value in (('RANK', rank), ('WORLD_SIZE', world_size), ('LOCAL_RANK', local_rank),
                        ('LOCAL_WORLD_SIZE', local_world_size)):
        monkeypatch.setenv(name, str(value))


def test_torchrun_binds_each_process_to_its_own_gpu(monkeypatch):
    """NCCL gets the process's GPU (device_id: it connects at once, on that GPU); more
    processes on a machine than GPUs is one line, before NCCL would fail on a shared GPU."""
    import inspect

    import torch.distributed as dist
    assert 'device_id' in inspect.signature(dist.init_process_group).parameters
    calls = []
    fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: calls.append(device))
    monkeypatch.setattr(dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(dist, 'init_process_group', lambda **options: calls.append(options))
    torchrun_environment(monkeypatch, 3, 4, 1, 2)
    assert runtime.join() == runtime.Processes(3, 4, 1, 2)
    cuda1 = torch.device('cuda', 1)
    assert calls == [cuda1, {'backend': 'nccl', 'device_id': cuda1}]
    calls.clear()
    runtime.join(runtime.PlanOptions(device='cpu'))
    assert calls == [{'backend': 'gloo', 'device_id': None}]
    torchrun_environment(monkeypatch, 3, 8, 3, 4)
    with pytest.raises(UsageError, match=re.escape(
            'local rank 3 of 4 processes on this machine (LOCAL_WORLD_SIZE), but it has 2 GPUs')):
        runtime.join()
    # the legacy launcher sets LOCAL_RANK (or --local_rank) but no LOCAL_WORLD_SIZE
    monkeypatch.delenv('LOCAL_WORLD_SIZE')
    monkeypatch.delenv('LOCAL_RANK')
    with pytest.raises(UsageError, match='local rank 2 of 3 processes'):
        runtime.join(local_rank=2)


def test_the_recompile_limit_runs_eager_where_auto_chose_to_compile(monkeypatch, capfd):
    """With fullgraph=True, Dynamo raises FailOnRecompileLimitHit (not a TorchDynamoException)
    past torch._dynamo.config.recompile_limit shapes: auto's compile goes on eager, in one
    warning line (Dynamo's own five are not shown); --impl compile says it in one line."""
    import torch._inductor.compile_fx

    # Dynamo's limit, whatever the backend: Inductor's code generation left out (seconds)
    monkeypatch.setattr(torch._inductor.compile_fx, 'compile_fx',
                        lambda graph, example_inputs, **options: graph.forward)
    compiled = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32',
                                                   impl='compile'))
    auto = dataclasses.replace(compiled, compile_fallback=True, failures_said=set())

    def double(x):
        return x * 2

    def halve(x):
        return x / 2
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        function = auto.compile(double)
        assert [function(torch.ones(n)).sum().item() for n in (1, 2, 3)] == [2, 4, 6]
        assert function.eager
        lines = capfd.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].endswith(
            'warning: torch.compile failed (FailOnRecompileLimitHit: Dynamo recompile limit '
            'exceeded): running eager instead (--impl compile makes this an error)'), lines
        function = compiled.compile(halve)
        assert function(torch.ones(1)).item() == 0.5
        with pytest.raises(runtime.CompileError, match=re.escape(
                'torch.compile failed (FailOnRecompileLimitHit: Dynamo recompile limit '
                'exceeded); --impl eager runs without compiling')):
            function(torch.ones(2))
        assert capfd.readouterr().err == ''
    torch._dynamo.reset()
