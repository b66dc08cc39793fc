"""ncf.py and inference.py given bad input or hit by a fault: one line on stderr, a non-zero exit,
no traceback, and every file that was there before unchanged. Then end to end: a checkpoint of
other data, two runs sharing a directory, and kill -9 at random points of a training run."""
import concurrent.futures
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import ncf
from conftest import FP32, ROOT, TINY, assert_one_line_error, snapshot

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def replace(path, content):
    os.remove(path)  # the copies are symlinks or hard copies: never write through one
    with open(path, 'wb') as file:
        file.write(content)


def truncated(path):
    with open(path, 'rb') as file:
        return file.read()[:os.path.getsize(path) // 2]


def more_items(world):
    import json
    path = os.path.join(world, 'data', 'metadata.json')
    metadata = json.load(open(path))
    metadata['n_items'] += 5
    replace(path, json.dumps(metadata).encode())


def hold_lock(world):
    """Another run holds the checkpoint directory: a process keeping its lock."""
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time; sys.path.insert(0, sys.argv[1]); '
         'import checkpoints; lock = checkpoints.DirectoryLock(sys.argv[2]); '
         'print("held", flush=True);'
         ' time.sleep(120)', ROOT, os.path.join(world, 'ck')], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'held'
    return holder


def other_data_checkpoint(world):
    """model.pth of a run on other data with the same shapes: another fingerprint."""
    state = torch.load(os.path.join(world, 'ck', 'model.pth'), weights_only=True)
    state._metadata[''][checkpoints.FINGERPRINT_KEY] = '0123456789abcdef'
    os.remove(os.path.join(world, 'ck', 'model.pth'))
    torch.save(state, os.path.join(world, 'ck', 'model.pth'))


NCF_CASES = {  # name: (arguments after --data, setup(world) or None, fragment of the line)
    'data missing': (['--data', '{world}/nowhere'], None, 'is not a directory'),
    'data is a file': (['--data', '{world}/data/metadata.json'], None, 'is not a directory'),
    'zero-byte tensor file': ([], lambda w: replace(f'{w}/data/train_ratings.pt', b''),
                              'train_ratings.pt is empty (0 bytes)'),
    'truncated tensor file': ([], lambda w: replace(f'{w}/data/test_ratings.pt',
                                                    truncated(f'{w}/data/test_ratings.pt')),
                              'cannot read'),
    'metadata claims more items': ([], more_items, 'says 205 items, but the tensors hold 200'),
    'negative learning rate': (['-l', '-1'], None, '--learning_rate must be positive'),
    'nan learning rate': (['-l', 'nan'], None, '--learning_rate must be a finite number'),
    'beta1 above 1': (['-b1', '1.5'], None, '--beta1 must be in [0, 1)'),
    'zero eps': (['--eps', '0'], None, '--eps must be positive'),
    'valid_negative beyond the catalogue': (['--valid_negative', '20000'], None,
                                            'more than the catalogue (200 items)'),
    'checkpoint_dir is a file': (['--checkpoint_dir', '{world}/data/metadata.json'], None,
                                 'is not a directory'),
    'checkpoint_dir under a file': (['--checkpoint_dir', '{world}/data/metadata.json/ck'], None,
                                    'is not a directory'),
    'log_path is a directory': (['--log_path', '{world}/data'], None, 'is a directory'),
    'log_path under a file': (['--log_path', '{world}/data/metadata.json/log.json'], None,
                              'is a file, not a directory'),
    'tensorboard is a file': (['--tensorboard', '{world}/data/metadata.json'], None,
                              'is not a directory'),
    'recommend output is a directory': (['--mode', 'recommend', '--output', '{world}/data'],
                                        None, 'is a directory'),
    'zero-byte model.pth': (['--mode', 'test'], lambda w: replace(f'{w}/ck/model.pth', b''),
                            'model.pth is empty (0 bytes)'),
    'truncated model.pth': (['--mode', 'test'],
                            lambda w: replace(f'{w}/ck/model.pth', truncated(f'{w}/ck/model.pth')),
                            'cannot read checkpoint'),
    'zero-byte last.pth': (['--resume'], lambda w: replace(f'{w}/ck/last.pth', b''),
                           'last.pth is empty (0 bytes)'),
    'resume without last.pth': (['--resume'], lambda w: os.remove(f'{w}/ck/last.pth'),
                                'last.pth does not exist'),
    'resume with another learning rate': (['--resume', '-l', '0.02'], None,
                                          '--learning_rate 0.01 -> 0.02'),
    'resume with another batch and seed': (['--resume', '-b', '1024', '-s', '2'], None,
                                           '--batch_size 2048 -> 1024, --seed 1 -> 2'),
    'checkpoint of other data (test)': (['--mode', 'test'], other_data_checkpoint,
                                        'was trained on other data'),
    'checkpoint of other data (recommend)': (['--mode', 'recommend'], other_data_checkpoint,
                                             'was trained on other data'),
    'checkpoint directory in use': ([], hold_lock, 'is in use by pid'),
    'contradicting precision flags': (['--amp', '--opt_level', 'O0'], None, 'contradict'),
    'plain and compile': (['--plain', '--impl', 'compile'], None, '--plain means --impl eager'),
    'unknown flag': (['--batchsize', '5'], None, 'unrecognized arguments'),
}

INFERENCE_CASES = {
    'log_path is a directory': (['--log_path', '{world}/data'], None, 'is a directory'),
    'zero-byte checkpoint': (['--load_checkpoint_path', '{world}/ck/model.pth'],
                             lambda w: replace(f'{w}/ck/model.pth', b''), 'is empty (0 bytes)'),
    'a foreign checkpoint': (['--load_checkpoint_path', '{world}/data/metadata.json'], None,
                             'cannot read checkpoint'),
    'bad batch sizes': (['--batch_sizes', '1,x'], None, 'comma-separated integers'),
    'fp16 on a CPU': (['--precision', 'fp16'], None, 'fp16 needs CUDA'),
    'odd first layer': (['--layers', '33', '16'], None, 'must be even'),
    'negative table size': (['--n_users', '-3'], None, 'must be positive'),
}


def make_world(base, tiny_data, trained):
    world = str(base)
    shutil.copytree(tiny_data, os.path.join(world, 'data'))
    shutil.copytree(trained, os.path.join(world, 'ck'))
    return world


def run_case(world, program, arguments, setup):
    holder = setup(world) if setup else None
    try:
        before = snapshot(world)
        # the case's own arguments come last: they override these
        if program == 'ncf.py':
            base = ['--data', f'{world}/data', '--checkpoint_dir', f'{world}/ck', '-e', '3'] + FP32
        else:
            base = ['--device', 'cpu', '--num_batches', '1', '--batch_sizes', '8', '--log_path',
                    f'{world}/inference.json']
        arguments = base + [a.format(world=world) for a in arguments]
        completed = subprocess.run([sys.executable, os.path.join(ROOT, program)] + arguments,
                                   capture_output=True, text=True, cwd=world, env=ENV,
                                   timeout=300)
        return completed, before, snapshot(world)
    finally:
        if holder is not None and hasattr(holder, 'kill'):
            holder.kill()
            holder.wait()


@pytest.fixture(scope='module')
def outcomes(tiny_data, trained, tmp_path_factory):
    """Every case of both tables, run as subprocesses two at a time (each starts Python and
    torch: ~1.7 s)."""
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for program, cases in (('ncf.py', NCF_CASES), ('inference.py', INFERENCE_CASES)):
            for name, (arguments, setup, _) in cases.items():
                world = make_world(tmp_path_factory.mktemp('world'), tiny_data, trained)
                jobs[program, name] = pool.submit(run_case, world, program, arguments, setup)
        return {key: job.result() for key, job in jobs.items()}


@pytest.mark.parametrize('program, name', [('ncf.py', name) for name in NCF_CASES]
                         + [('inference.py', name) for name in INFERENCE_CASES])
def test_bad_input_is_one_line_and_changes_nothing(program, name, outcomes):
    completed, before, after = outcomes[program, name]
    fragment = (NCF_CASES if program == 'ncf.py' else INFERENCE_CASES)[name][2]
    assert completed.returncode in (1, 2), completed.stderr[-2000:]
    assert_one_line_error(completed, fragment)
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert after == before  # nothing written, nothing changed


# ----------------------------------------------------------------------------------------------
# Faults during a run, and the cases end to end

def test_test_mode_evaluates_where_it_cannot_log(tiny_data, trained, tmp_path):
    world = make_world(tmp_path, tiny_data, trained)
    os.remove(os.path.join(world, 'ck', 'log.json'))
    os.mkdir(os.path.join(world, 'ck', 'log.json'))  # log.json cannot be appended to
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'ncf.py'), '--data', f'{world}/data', '--mode',
         'test', '--checkpoint_dir', f'{world}/ck'] + FP32, capture_output=True, text=True,
        env=ENV, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert 'HR@10 = ' in completed.stdout
    assert 'is not writable: this evaluation is not logged' in completed.stderr


def test_a_full_disk_while_saving_is_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    import errno

    def no_space(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(checkpoints, 'atomic_torch_save', no_space)
    with pytest.raises(SystemExit) as exit_info:
        ncf.main(['--data', tiny_data, '-e', '2', '--checkpoint_dir', str(tmp_path / 'ck')]
                 + FP32)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err
    assert f'cannot write {tmp_path / "ck" / "model.pth"}: No space left on device' in err
    assert 'no epoch finished' in err


@pytest.mark.parametrize('signal_number, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_training_says_what_it_kept(signal_number, code, tiny_data, tmp_path):
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'ncf.py'), '--data', tiny_data, '-e', '300',
         '--checkpoint_dir', str(tmp_path / 'ck')] + FP32, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=ENV)
    for line in process.stdout:  # interrupt during the third epoch
        if line.startswith('Epoch 1:'):
            break
    time.sleep(0.05)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith('ncf.py: interrupted: ') and 'kept (--resume continues from it)' in err
    epoch = int(err.split(' from epoch ')[1].split()[0])
    state = torch.load(tmp_path / 'ck' / 'last.pth', weights_only=True)
    assert state['history']['epoch'] == epoch >= 0
    assert not [name for name in os.listdir(tmp_path / 'ck') if name.endswith('.tmp')]


def test_a_checkpoint_of_other_data_is_refused_unless_allowed(tiny_data, trained, tmp_path,
                                                              capsys):
    """The same ratings, shuffled, then converted: the same shapes, another id mapping."""
    import csv

    import convert
    ratings = os.path.join(os.path.dirname(tiny_data), 'ratings.csv')
    with open(ratings, newline='') as file:
        rows = list(csv.reader(file))
    random.Random(0).shuffle(rows[1:])
    shuffled = tmp_path / 'shuffled.csv'
    with open(shuffled, 'w', newline='') as file:
        csv.writer(file).writerows(rows)
    convert.main(['--path', str(shuffled), '--output', str(tmp_path / 'other'),
                  '--valid_negative', '50'])
    other = ['--data', str(tmp_path / 'other'), '--checkpoint_dir', trained,
             '--log_path', str(tmp_path / 'log.json')] + FP32
    with pytest.raises(SystemExit):
        ncf.main(other + ['--mode', 'test'])
    assert_one_line_error(capsys.readouterr().err, 'was trained on other data',
                          '--allow_other_data')
    ncf.main(other + ['--mode', 'test', '--allow_other_data'])
    assert 'used anyway, as --allow_other_data says' in capsys.readouterr().out
    # the reference's model.pth, a plain state dict without a fingerprint, loads with a notice
    state = torch.load(os.path.join(trained, 'model.pth'), weights_only=True)
    plain = tmp_path / 'reference.pth'
    torch.save(dict(state), plain)
    ncf.main(['--data', tiny_data, '--mode', 'test', '--load_checkpoint_path', str(plain),
              '--log_path', str(tmp_path / 'log.json')] + FP32)
    assert 'records no data fingerprint' in capsys.readouterr().out


def test_one_training_run_per_checkpoint_directory(tiny_data, tmp_path):
    directory = tmp_path / 'shared'
    first = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'ncf.py'), '--data', tiny_data, '-e', '1000',
         '--checkpoint_dir', str(directory)] + FP32, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=ENV)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if line.startswith('Epoch 0:'):
            break
    second = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'ncf.py'), '--data', tiny_data, '-e', '2',
         '--checkpoint_dir', str(directory), '-s', '2'] + FP32, capture_output=True, text=True,
        env=ENV, timeout=300)
    assert_one_line_error(second, f'is in use by pid {first.pid} on')
    first.send_signal(signal.SIGINT)  # the first run was never disturbed: stop it now
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130 and 'kept (--resume continues from it)' in err, err
    best = max(float(line.split('HR@10 = ')[1].split(',')[0])
               for line in lines + out.splitlines() if line.startswith('Epoch '))
    from logger import plot
    plot.epoch_series(str(directory / 'log.json'))  # one run's log, readable
    tested = ncf.main(['--data', tiny_data, '--mode', 'test', '--checkpoint_dir', str(directory),
                       '--log_path', os.devnull] + FP32)
    assert tested['hr'] == pytest.approx(best, abs=1e-4)  # model.pth is the first run's best


def test_kill_9_at_random_points_never_leaves_a_checkpoint_that_loads_wrong(tiny_data,
                                                                             tmp_path):
    arguments = ['--data', tiny_data, '-e', '12', '--dropout', '0.3'] + TINY
    uninterrupted = ncf.main(arguments + ['--log_path', os.devnull])
    directory = tmp_path / 'ck'
    generator = random.Random(5)
    for attempt in range(4):
        resume = ['--resume'] if (directory / 'last.pth').exists() else []
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, 'ncf.py')] + arguments
            + ['--checkpoint_dir', str(directory)] + resume, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)  # as many threads as this process: the same numbers
        time.sleep(generator.uniform(1.8, 3.0))  # torch starts in ~1.7 s; an epoch ~0.1 s
        process.kill()
        process.wait()
        if (directory / 'last.pth').exists():
            state = checkpoints.read(str(directory / 'last.pth'))
            epoch = state['history']['epoch']
            assert len(state['history']['hrs']) == epoch + 1
            best = torch.load(directory / 'model.pth', weights_only=True)
            assert best.keys() == state['model'].keys()
    resumed = ncf.main(arguments + ['--checkpoint_dir', str(directory)]
                       + (['--resume'] if (directory / 'last.pth').exists() else []))
    assert resumed['hrs'] == uninterrupted['hrs']
    # a killed writer's temporary file is removed by the next write of the same file
    assert not [name for name in os.listdir(directory) if name.startswith('.last.pth.')]
