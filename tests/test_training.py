"""ncf.py end to end on tiny data: learning, sampling, accumulation, torchrun, resume, test mode."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import dataloading
import evaluation
import ncf
import runtime
import training
from conftest import ROOT, TINY, assert_one_line_error, make_cache, replace_tensor
from logger.logger import read_log


def popularity_hr(data_dir, k=10):
    """HR@k of ranking each user's candidates by training popularity (no model)."""
    dataset = dataloading.load_dataset(data_dir, torch.device('cpu'))
    popularity = torch.bincount(dataset.train_items, minlength=dataset.n_items).double()
    candidates = torch.cat((dataset.test_items[:, None], dataset.test_negatives), dim=1)
    # Break ties against the positive, as the model's metric does.
    hits, _ = evaluation.hits_and_ndcg(popularity[candidates],
                                       evaluation.duplicate_mask(candidates), k)
    return hits.item() / dataset.n_users


def test_training_beats_popularity_and_logs(tiny_data, tmp_path, capsys):
    result = ncf.main(['--data', tiny_data, '-e', '6', '--checkpoint_dir', str(tmp_path)] + TINY)
    baseline = popularity_hr(tiny_data)
    assert result['best_hr'] > baseline + 0.05, (result['hrs'], baseline)
    assert result['hrs'][-1] > result['hrs'][0]
    out = capsys.readouterr().out
    assert 'Epoch 5: HR@10 = ' in out and ', train_time = ' in out
    assert (tmp_path / 'model.pth').exists() and (tmp_path / 'last.pth').exists()

    records = read_log(tmp_path / 'log.json')
    parameters = [r for r in records if r['step'] == 'PARAMETER']
    assert any('torch_version' in r['data'] and 'cpu' in r['data'] for r in parameters)
    assert any(r['data'].get('batch_size') == 2048 for r in parameters)
    epochs = [r for r in records if isinstance(r['step'], list) and r['step']]
    assert [r['step'] for r in epochs] == [[e] for e in range(6)]
    for key in ('train_throughput', 'eval_throughput', 'hr@10', 'ndcg@10', 'train_loss',
                'validation_loss'):
        assert all(r['data'][key] > 0 for r in epochs)
    summary = [r for r in records if r['step'] == []][-1]['data']
    assert summary['best_accuracy'] == result['best_hr']
    assert summary['best_epoch'] == result['hrs'].index(result['best_hr'])
    for key in ('best_train_throughput', 'best_eval_throughput', 'time_to_target',
                'time_to_best_model'):
        assert summary[key] > 0


def test_test_mode_reproduces_the_saved_model(tiny_data, tmp_path, capsys):
    result = ncf.main(['--data', tiny_data, '-e', '3', '--checkpoint_dir', str(tmp_path)] + TINY)
    tested = ncf.main(['--data', tiny_data, '--mode', 'test', '--checkpoint_dir', str(tmp_path)]
                      + TINY)
    assert tested['hr'] == result['best_hr']
    assert f"HR@10 = {result['best_hr']:.4f}" in capsys.readouterr().out
    # A state dict saved from DDP (keys prefixed with 'module.') loads in one process.
    state = torch.load(tmp_path / 'model.pth', weights_only=True)
    torch.save({f'module.{key}': value for key, value in state.items()}, tmp_path / 'ddp.pth')
    again = ncf.main(['--data', tiny_data, '--mode', 'test', '--load_checkpoint_path',
                      str(tmp_path / 'ddp.pth')] + TINY)
    assert again['hr'] == result['best_hr']


def test_sampler_draws_every_positive_once_and_ranks_split_the_global_batch():
    users = torch.arange(10).repeat_interleave(3)
    items = torch.arange(30) % 7
    single = dataloading.TrainBatches(users, items, n_items=7, negative_samples=3, batch_size=40)
    assert single.samples == 120 and single.steps == 3 and single.rank_batch == 40
    assert single.micro_slices == [slice(0, 40)]
    u, i, labels = single.epoch(torch.Generator().manual_seed(0))
    assert u.shape == (3, 40)
    assert labels.sum().item() == 30  # every positive exactly once (the batch divides the epoch)
    positive_pairs = sorted(zip(u[labels == 1].tolist(), i[labels == 1].tolist()))
    assert positive_pairs == sorted(zip(users.tolist(), items.tolist()))
    # Each positive's user comes back with 3 negatives.
    assert torch.bincount(u[labels == 0], minlength=10).tolist() == [9] * 10
    assert i.min() >= 0 and i.max() < 7

    # Two ranks with two micro-batches each: together, exactly the single process's batches.
    slices = []
    for rank in range(2):
        batches = dataloading.TrainBatches(users, items, 7, 3, 40, rank=rank, world_size=2,
                                           grads_accumulated=2)
        assert batches.micro_slices == [slice(0, 10), slice(10, 20)] and batches.steps == 3
        slices.append(batches.epoch(torch.Generator().manual_seed(0)))
    for single_part, part0, part1 in zip((u, i, labels), *slices):
        assert torch.equal(torch.cat((part0, part1), dim=1), single_part)


@pytest.mark.parametrize('impl', ['auto', 'compile'])
def test_resume_after_a_crash_matches_an_uninterrupted_run(impl, tiny_data, tmp_path,
                                                           monkeypatch, capsys):
    arguments = ['--data', tiny_data, '-e', '4', '--dropout', '0.3', '--impl', impl] + TINY
    uninterrupted = ncf.main(arguments + ['--checkpoint_dir', str(tmp_path / 'a')])

    real_epoch = training.Trainer.epoch
    calls = []

    def crash_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while training epoch 2
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(training.Trainer, 'epoch', crash_in_epoch_2)
    with pytest.raises(SystemExit) as exit_info:
        ncf.main(arguments + ['--checkpoint_dir', str(tmp_path / 'b')])
    assert exit_info.value.code == 130  # Ctrl-C: one line saying what was kept
    assert capsys.readouterr().err.strip() == (
        f'ncf.py: interrupted: {tmp_path / "b" / "last.pth"} from epoch 1 kept '
        '(--resume continues from it)')
    monkeypatch.setattr(training.Trainer, 'epoch', real_epoch)
    state = torch.load(tmp_path / 'b' / 'last.pth', weights_only=True)
    assert state['history']['epoch'] == 1

    resumed = ncf.main(arguments + ['--checkpoint_dir', str(tmp_path / 'b'), '--resume'])
    if impl == 'compile':
        # inductor's embedding backward adds with atomics: equal up to rounding, not bitwise
        assert resumed['hrs'] == pytest.approx(uninterrupted['hrs'], abs=2.5 / 300)
        assert resumed['train_losses'][2:] == pytest.approx(uninterrupted['train_losses'][2:],
                                                            rel=1e-3)
    else:
        assert resumed['hrs'] == uninterrupted['hrs']
        assert resumed['best_hr'] == uninterrupted['best_hr']
    epochs = [r['step'] for r in read_log(tmp_path / 'b' / 'log.json')
              if isinstance(r['step'], list) and r['step']]
    assert epochs == [[0], [1], [2], [3]]  # the resumed run appends to the log


def test_valid_negative_other_than_the_cache_draws_new_negatives(tiny_data, tmp_path, capsys):
    result = ncf.main(['--data', tiny_data, '-e', '1', '--log_path', str(tmp_path / 'log.json')]
                      + TINY + ['--valid_negative', '20'])
    out = capsys.readouterr().out
    assert 'Drawing 20 test negatives per user with seed 1 (the cache has 50)' in out
    logged = [r['data']['dataset'] for r in read_log(tmp_path / 'log.json')
              if 'dataset' in r['data']]
    assert 'drawn at load time with seed 1 (the cache has 50)' in logged[0]['test_negatives']
    assert 0 < result['best_hr'] <= 1
    dataset = dataloading.load_dataset(tiny_data, torch.device('cpu'), valid_negative=20)
    assert dataset.test_negatives.shape == (300, 20)
    exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items, 300, 200)
    users = torch.arange(300)[:, None].expand(-1, 20)
    assert not exclusion.contains(users, dataset.test_negatives).any()


def free_port_env():
    """The environment of a launch: one thread a process, and gloo on the loopback device
    (rather than whatever interface the host name resolves to)."""
    loopback = {'GLOO_SOCKET_IFNAME': 'lo'} if os.path.exists('/sys/class/net/lo') else {}
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT, **loopback}


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def test_two_process_torchrun_matches_one_process(tiny_data, tmp_path):
    arguments = ['--data', tiny_data, '-e', '2', '--dropout', '0', '--precision', 'fp32'] + TINY
    single = ncf.main(arguments)
    completed = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(ROOT, 'ncf.py')] + arguments
        + ['--checkpoint_dir', str(tmp_path / 'ck')],
        capture_output=True, text=True, env=free_port_env(), timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    epoch_lines = [line for line in completed.stdout.splitlines() if line.startswith('Epoch ')]
    assert len(epoch_lines) == 2  # only rank 0 prints
    assert 'processes: 2' in completed.stdout
    for line, hr in zip(epoch_lines, single['hrs']):
        distributed_hr = float(line.split('HR@10 = ')[1].split(',')[0])
        # Same batches, gradients averaged in another order: the same up to rounding.
        assert distributed_hr == pytest.approx(hr, abs=2 / 300)
    # The DDP run's checkpoint loads in one process.
    tested = ncf.main(['--data', tiny_data, '--mode', 'test', '--checkpoint_dir',
                       str(tmp_path / 'ck'),
                       '--precision', 'fp32'] + TINY)
    best = max(float(line.split('HR@10 = ')[1].split(',')[0]) for line in epoch_lines)
    assert tested['hr'] == pytest.approx(best, abs=1e-4)


def probe_launch(tmp_path, arguments, env=()):
    """tests/torchrun_probe.py under a 2-process torchrun: the completed launch, and what each
    process's Dynamo counted."""
    completed = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(ROOT, 'tests', 'torchrun_probe.py'), str(tmp_path / 'counts')]
        + arguments, capture_output=True, text=True, env={**free_port_env(), **dict(env)},
        timeout=300)
    counts = [json.loads((tmp_path / f'counts.{rank}').read_text()) for rank in range(2)
              if (tmp_path / f'counts.{rank}').exists()]
    return completed, counts


def test_the_compiled_step_is_one_graph_under_torchrun_and_matches_one_process(tiny_data,
                                                                              tmp_path):
    """DDP wraps the compiled step (model and loss), so that Dynamo never traces DDP's own
    forward: one graph per shape, no graph break; and 2 processes train as 1 does."""
    arguments = ['--data', tiny_data, '-e', '2', '--dropout', '0', '--impl', 'compile',
                 '--precision', 'fp32'] + TINY + ['--valid_batch_size', str(150 * 51)]
    # One process in two micro-batches computes in the shapes of each of two processes (half a
    # batch, evaluation chunks of 150 users), so that they find its graphs in the cache.
    single = ncf.main(arguments + ['--grads_accumulated', '2'])
    completed, counts = probe_launch(tmp_path, arguments)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert 'implementation: compile, device: cpu, processes: 2' in completed.stdout
    # per process: the training step (one micro-batch shape) and the evaluation (one chunk shape)
    assert counts == [{'unique_graphs': 2, 'graph_breaks': 0}] * 2
    hrs = [float(line.split('HR@10 = ')[1].split(',')[0])
           for line in completed.stdout.splitlines() if line.startswith('Epoch ')]
    assert hrs == pytest.approx(single['hrs'], abs=2 / 300)


def test_a_process_failing_stops_every_process_with_one_line(tiny_data, tmp_path):
    """Not bad input but an error on one process (as running out of memory would be): the
    others do not wait for it in their next collective; rank 0 names it in one line."""
    completed, _ = probe_launch(tmp_path, ['--data', tiny_data, '-e', '1'] + TINY,
                                env={'NCF_PROBE_FAIL_RANK': '1'})
    assert completed.returncode != 0
    assert ('ncf.py: error: process 1 failed: RuntimeError: injected failure while loading\n'
            in completed.stderr), completed.stderr[-3000:]


def test_reference_launcher_and_a_one_process_checkpoint_under_two_processes(tiny_data,
                                                                           tmp_path):
    ncf.main(['--data', tiny_data, '-e', '1', '--checkpoint_dir', str(tmp_path)] + TINY)
    test = ['--data', tiny_data, '--mode', 'test', '--checkpoint_dir', str(tmp_path),
            '--precision', 'fp32'] + TINY
    single = ncf.main(test)
    completed = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2',
         f'--master_port={free_port()}', os.path.join(ROOT, 'ncf.py')] + test,
        capture_output=True, text=True, env=free_port_env(), timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count('HR@10 = ') == 1
    assert f"HR@10 = {single['hr']:.4f}" in completed.stdout


@pytest.mark.cuda
def test_gpu_mixed_precision_and_fused_adam(tiny_data):
    result = ncf.main(['--data', tiny_data, '-e', '3', '--amp'] +
                      [a for a in TINY if a not in ('--device', 'cpu')] + ['--device', 'cuda'])
    assert result['best_hr'] > popularity_hr(tiny_data)


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit status 1, no traceback.

def damaged(train):
    out_of_range = train.clone()
    out_of_range[5, 0] = 300
    changed_pair = train.clone()
    changed_pair[7, 1] = (changed_pair[7, 1] + 1) % 200
    return {  # case: (file, new content: None removes it, bytes replace it; rewritten: as
        # convert.py would have written it, metadata.json included), error fragment
        'missing file': ('test_negatives.pt', None, False, 'test_negatives.pt is missing'),
        'wrong shape': ('train_ratings.pt', torch.zeros(10, 3, dtype=torch.long), True,
                        'shape [n, 2]'),
        'wrong dtype': ('train_ratings.pt', train.int(), True, 'not int32'),
        'id out of range': ('train_ratings.pt', out_of_range, True, 'outside [0, 300)'),
        'not a tensor file': ('test_ratings.pt', b'garbage', False, 'is not a tensor file'),
        'not a tensor': ('test_ratings.pt', {'a': 1}, True, 'holds a dict'),
        'test rows out of order': ('test_ratings.pt', torch.zeros(300, 2, dtype=torch.long),
                                   True, 'row u must hold user u'),
        'a training pair changed behind metadata.json': (
            'train_ratings.pt', changed_pair, False,
            'train_ratings.pt has changed since convert.py wrote it'),
    }


@pytest.mark.parametrize('case', sorted(damaged(torch.zeros(8, 2, dtype=torch.long))))
def test_bad_data(case, tiny_data, tmp_path, capsys):
    train = torch.load(os.path.join(tiny_data, 'train_ratings.pt'), weights_only=True)
    name, content, rewritten, fragment = damaged(train)[case]
    data_dir = tmp_path / 'data'
    shutil.copytree(tiny_data, data_dir)
    if content is None:
        os.remove(data_dir / name)
    elif isinstance(content, bytes):
        (data_dir / name).write_bytes(content)
    elif rewritten:
        replace_tensor(data_dir, name, content)
    else:
        torch.save(content, data_dir / name)
    with pytest.raises(SystemExit) as exit_info:
        ncf.main(['--data', str(data_dir), '-e', '1', '--checkpoint_dir', str(tmp_path / 'ck')]
                 + TINY)
    assert exit_info.value.code == 1
    assert_one_line_error(capsys.readouterr().err, fragment)
    assert not (tmp_path / 'ck').exists()  # nothing written


@pytest.mark.parametrize('arguments, fragment', [
    (['--layers', '33', '16'], 'must be even'),
    (['-b', '1001', '--grads_accumulated', '2'], 'not divisible by world size 1 x'),
    (['-k', '52'], 'larger than the 51 candidates'),
    (['-b', '10000000'], 'larger than an epoch'),
    (['--amp', '--opt_level', 'O0'], 'contradict'),
    (['--precision', 'fp16'], 'fp16 needs CUDA'),
    (['--opt_level', 'O2', '--precision', 'fp32'], 'contradicts'),
    (['--resume'], '--resume needs --checkpoint_dir'),
    (['--dropout', '1.5'], '--dropout'),
])
def test_bad_flags(arguments, fragment, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ncf.main(['--data', tiny_data, '-e', '1'] + TINY + arguments)
    assert exit_info.value.code == 1
    assert_one_line_error(capsys.readouterr().err, fragment)
    assert os.listdir(tmp_path) == []  # not even a log


def test_bad_paths_and_checkpoints(tiny_data, tmp_path, capsys):
    def fails(arguments, fragment, code=1):
        with pytest.raises(SystemExit) as exit_info:
            ncf.main(arguments)
        assert exit_info.value.code == code
        assert_one_line_error(capsys.readouterr().err, fragment)

    fails(['-e', '1'] + TINY, 'the following arguments are required: --data', code=2)
    fails(['--data', str(tmp_path / 'nowhere')] + TINY, 'is not a directory')
    empty = tmp_path / 'empty'
    empty.mkdir()
    fails(['--data', str(empty)] + TINY, 'has no metadata.json')
    fails(['--data', tiny_data, '--resume', '--checkpoint_dir', str(tmp_path / 'none')] + TINY,
          'last.pth does not exist')
    fails(['--data', tiny_data, '--mode', 'test', '--checkpoint_dir', str(tmp_path / 'none')]
          + TINY, 'model.pth does not exist')
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'PK\x03\x04 not really a zip')
    fails(['--data', tiny_data, '--mode', 'test', '--load_checkpoint_path', str(corrupt)] + TINY,
          'cannot read checkpoint')
    other = tmp_path / 'other'
    ncf.main(['--data', tiny_data, '-e', '1', '--checkpoint_dir', str(other)] + TINY)
    capsys.readouterr()
    wider = [a if a != '8' else '16' for a in TINY]  # -f 16 instead of 8
    fails(['--data', tiny_data, '--mode', 'test', '--checkpoint_dir', str(other)] + wider,
          'mf_user_embed.weight is [300, 8] there, [300, 16] here')
    fails(['--data', tiny_data, '--mode', 'test', '--checkpoint_dir', str(other), '--layers',
           '64', '8'] + TINY[:2] + TINY[6:], 'not a NeuMF of these --layers')
    if not torch.cuda.is_available():
        fails(['--data', tiny_data] + TINY[:-2] + ['--device', 'cuda'], 'CUDA is not available')


def test_cli_error_has_no_traceback(tmp_path):
    completed = subprocess.run([sys.executable, os.path.join(ROOT, 'ncf.py'), '--data',
                                str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert_one_line_error(completed, 'has no metadata.json')


# ----------------------------------------------------------------------------------------------
# Every implementation trains as the eager model does; one pinned run.

@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    """60 users, 50 items: few table rows, for Triton's interpreter (it runs one kernel
    program after another)."""
    return make_cache(tmp_path_factory.mktemp('small'), 60, 50, 1400, 3, 4, 20)


# fp32 and no dropout: the implementations draw dropout masks differently
SMALL = ['-f', '8', '--layers', '16', '8', '-b', '1024', '-l', '0.01', '-b1', '0.9', '-b2', '0.999',
         '--valid_negative', '20', '--dropout', '0', '--precision', 'fp32', '-e', '3']


def run_small(small_data, *flags):
    return ncf.main(['--data', small_data] + SMALL + list(flags))


@pytest.mark.parametrize('device, impl', [
    ('cpu', 'cpu_fused'), ('cpu', 'compile'), ('cpu', 'fused'),
    pytest.param('cuda', 'compile', marks=pytest.mark.cuda),
    pytest.param('cuda', 'fused', marks=pytest.mark.cuda)])
def test_every_implementation_trains_as_eager_does(device, impl, small_data, capsys):
    import fused
    if impl == 'fused' and not fused.available()[0]:
        pytest.skip(fused.available()[1])
    if impl == 'fused' and device == 'cpu' and os.environ.get('TRITON_INTERPRET') != '1':
        pytest.skip("fused runs on a CPU only in Triton's interpreter")
    eager = run_small(small_data, '--impl', 'eager', '--device', device)
    other = run_small(small_data, '--impl', impl, '--device', device)
    assert f'implementation: {impl}, device: {device}' in capsys.readouterr().out
    assert other['train_losses'] == pytest.approx(eager['train_losses'],
                                                  rel=1e-4 if device == 'cpu' else 1e-3)
    assert other['hrs'] == pytest.approx(eager['hrs'], abs=1.5 / 60)  # a tie may flip a user
    assert eager['hrs'][-1] > eager['hrs'][0]


def test_a_failing_compiler_runs_eager_where_auto_chose_to_compile(small_data, monkeypatch,
                                                                   capsys):
    """As on a GPU whose Triton is missing or too old: auto's compile goes on eager, saying so
    once; --impl compile, asked for, is an error."""
    import torch._inductor.compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError('no compiler for this GPU')
    eager = run_small(small_data, '--impl', 'eager')
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
    with pytest.raises(SystemExit) as exit_info:
        run_small(small_data, '--impl', 'compile')
    assert exit_info.value.code == 1
    assert_one_line_error(capsys.readouterr().err, 'torch.compile failed (RuntimeError: no '
                          'compiler for this GPU); --impl eager runs without compiling')
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.parametrize('precision', ['bf16', 'fp16', 'tf32'])
def test_cuda_default_in_reduced_precision_tracks_fp32(precision, small_data):
    reference = run_small(small_data, '--impl', 'eager', '--device', 'cuda')
    mixed = run_small(small_data, '--device', 'cuda', '--precision', precision)
    assert mixed['train_losses'] == pytest.approx(reference['train_losses'], rel=0.02)
    assert mixed['hrs'] == pytest.approx(reference['hrs'], abs=0.05)


def test_golden_numbers(tiny_data):
    """A tiny seeded run whose per-epoch loss and HR are pinned: a change to the data pipeline,
    the model, its initialisation, the sampler or the optimizer shows here. The eager model in
    fp32, whose figures differ between CPUs only at rounding level (measured on 2 vCPU AMD EPYC,
    torch 2.13.0)."""
    result = ncf.main(['--data', tiny_data, '-e', '4', '--impl', 'eager', '--precision', 'fp32']
                      + TINY)
    assert result['train_losses'] == pytest.approx([0.54904, 0.50370, 0.47865, 0.44789],
                                                   rel=1e-3)
    assert result['hrs'] == pytest.approx([0.38333, 0.47, 0.63, 0.71], abs=0.01)
