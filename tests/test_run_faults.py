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
import dataloading
import inference
import ncf
import runtime
import training
from conftest import FP32, ROOT, TINY, assert_one_line_error, replace_tensor, snapshot
from evaluation import Evaluation, NonFiniteScores

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
                             'is not a checkpoint: not a file torch.save writes'),
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
            # the world's ck holds a trained run: a new one may replace it (once every check
            # has passed, which none of these cases does)
            base = ['--data', f'{world}/data', '--checkpoint_dir', f'{world}/ck', '-e', '3',
                    '--overwrite_checkpoints'] + FP32
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
        resume = ['--resume'] if (directory / 'last.pth').exists() else \
            ['--overwrite_checkpoints']  # a run killed before its first epoch left its log
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
                       + (['--resume'] if (directory / 'last.pth').exists()
                          else ['--overwrite_checkpoints']))
    assert resumed['hrs'] == uninterrupted['hrs']
    # a killed writer's temporary file is removed by the next write of the same file
    assert not [name for name in os.listdir(directory) if name.startswith('.last.pth.')]


# ----------------------------------------------------------------------------------------------
# What a run reports can be trusted: no perfect score from a broken model, no tampered cache
# taken as good, no input or other run overwritten.

def fails(arguments, fragment, capsys, main=ncf.main, code=1):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == code
    assert_one_line_error(capsys.readouterr().err, fragment)


def with_nan_weight(trained, tmp_path, name='final.weight'):
    state = torch.load(os.path.join(trained, 'model.pth'), weights_only=True)
    state[name][0, 0] = float('nan')
    path = tmp_path / 'nan.pth'
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize('mode', [['--mode', 'test'], ['--mode', 'test', '--eval_mode', 'full'],
                                  ['--mode', 'recommend'], ['-e', '1']])
def test_a_checkpoint_with_nan_weights_is_refused(mode, tiny_data, trained, tmp_path, capsys):
    """A NaN in final.weight once scored HR@10 = 1.0 (NaN compares false)."""
    path = with_nan_weight(trained, tmp_path)
    before = snapshot(tmp_path)
    fails(['--data', tiny_data, '--load_checkpoint_path', path, '--log_path',
           str(tmp_path / 'log.json')] + mode + FP32,
          f'checkpoint {path} holds weights that are not finite (NaN or infinite) in '
          'final.weight: not a usable model', capsys)
    fails(['--load_checkpoint_path', path, '--device', 'cpu', '--log_path',
           str(tmp_path / 'log.json')], 'holds weights that are not finite', capsys,
          main=inference.main)
    assert snapshot(tmp_path) == before


def test_non_finite_scores_fail_the_evaluation_in_both_modes(tiny_data, trained):
    dataset = dataloading.load_dataset(tiny_data, torch.device('cpu'))
    exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                          dataset.n_users, dataset.n_items)
    plan = runtime.resolve('cpu', precision='fp32', impl='eager')
    model = plan.build_model(dataset.n_users, dataset.n_items, 8, [32, 16, 8], 0.5)
    checkpoints.load_model_state(model, checkpoints.read(os.path.join(trained, 'model.pth')),
                                 'model.pth')
    with torch.no_grad():
        model.mf_user_embed.weight[7] = float('inf')  # user 7's scores: NaN or infinite
    for mode in ('sampled', 'full'):
        evaluation = Evaluation(plan, dataset, model, 10, mode, exclusion)
        with pytest.raises(NonFiniteScores, match=r'of \S+ scores are not finite'):
            evaluation()


def test_training_that_diverges_stops_in_one_line_and_keeps_the_best(tiny_data, tmp_path,
                                                                     capsys, monkeypatch):
    """Weights turned NaN in epoch 2: the run stops before evaluating or saving them;
    model.pth keeps the best of epochs 0 and 1, last.pth epoch 1."""
    real_epoch = training.Trainer.epoch
    calls = []

    def epoch_that_breaks(self, *args, **kwargs):
        result = real_epoch(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.model.final.weight.fill_(float('nan'))
        return result
    monkeypatch.setattr(training.Trainer, 'epoch', epoch_that_breaks)
    directory = tmp_path / 'ck'
    with pytest.raises(SystemExit) as exit_info:
        ncf.main(['--data', tiny_data, '-e', '5', '--checkpoint_dir', str(directory)] + FP32)
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, 'training diverged in epoch 2 (weights are not finite',
                          f'{directory / "last.pth"} from epoch 1 kept')
    hrs = [float(line.split('HR@10 = ')[1].split(',')[0])
           for line in captured.out.splitlines() if line.startswith('Epoch ')]
    assert len(hrs) == 2
    assert checkpoints.read(str(directory / 'last.pth'))['history']['epoch'] == 1
    monkeypatch.setattr(training.Trainer, 'epoch', real_epoch)
    tested = ncf.main(['--data', tiny_data, '--mode', 'test', '--checkpoint_dir',
                       str(directory), '--log_path', os.devnull] + FP32)
    assert tested['hr'] == pytest.approx(max(hrs), abs=1e-4)
    # a learning rate that blows the weights up in the first steps: the loss is not finite
    fails(['--data', tiny_data, '-e', '2', '--checkpoint_dir', str(tmp_path / 'huge')] + FP32
          + ['-l', '1e30'], 'training diverged in epoch 0 (the training loss is nan', capsys)
    assert not (tmp_path / 'huge' / 'model.pth').exists()


def tampered(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    return data


def test_a_tampered_cache_is_refused(tiny_data, trained, tmp_path, capsys):
    """Each tensor's sha256, the counts and the id maps' sha256 in metadata.json are checked:
    negatives set to the positive once gave HR 1.0; swapped id lines exchanged two users'
    recommendations."""
    import json

    data = tampered(tiny_data, tmp_path)
    test = torch.load(data / 'test_ratings.pt', weights_only=True)
    negatives = test[:, 1:].expand(-1, 50).contiguous()  # every negative is the positive
    os.remove(data / 'test_negatives.pt')
    torch.save(negatives, data / 'test_negatives.pt')
    fails(['--data', str(data), '--mode', 'test', '--checkpoint_dir', trained] + FP32,
          'test_negatives.pt has changed since convert.py wrote it', capsys)

    data = tampered(tiny_data, tmp_path / 'counts')
    metadata = json.loads((data / 'metadata.json').read_text())
    metadata['n_train'] += 1
    (data / 'metadata.json').write_text(json.dumps(metadata))
    fails(['--data', str(data), '--mode', 'test', '--checkpoint_dir', trained] + FP32,
          f'says n_train {metadata["n_train"]}, but the tensors hold {metadata["n_train"] - 1}',
          capsys)

    data = tampered(tiny_data, tmp_path / 'ids')
    lines = (data / 'user_ids.csv').read_text().splitlines(keepends=True)
    lines[1], lines[2] = lines[2], lines[1]
    (data / 'user_ids.csv').write_text(''.join(lines))
    fails(['--data', str(data), '--mode', 'recommend', '--checkpoint_dir', trained] + FP32,
          'user_ids.csv or item_ids.csv in', capsys)


def test_a_checkpoint_of_another_split_is_other_data(tiny_data, trained, tmp_path, capsys):
    """The fingerprint covers the split: the same ratings and ids with one training pair moved
    are other data, even with metadata.json rewritten to match."""
    data = tampered(tiny_data, tmp_path)
    train = torch.load(data / 'train_ratings.pt', weights_only=True)
    train[7, 1] = (train[7, 1] + 1) % 200
    replace_tensor(data, 'train_ratings.pt', train)
    fails(['--data', str(data), '--mode', 'test', '--checkpoint_dir', trained] + FP32,
          'was trained on other data', capsys)


def test_a_cache_without_digests_and_its_checkpoints_still_load(tiny_data, trained, tmp_path,
                                                                 capsys):
    """A cache of version 2 loads with a notice, and a checkpoint that recorded version 2's
    fingerprint (the source and the id maps) passes on the version-3 cache of the same data."""
    import json

    from cache_layout import fingerprint
    data = tampered(tiny_data, tmp_path)
    metadata = json.loads((data / 'metadata.json').read_text())
    old_fingerprint = fingerprint(metadata['source_sha256'], metadata['id_maps_sha256'])
    state = torch.load(os.path.join(trained, 'model.pth'), weights_only=True)
    state._metadata[''][checkpoints.FINGERPRINT_KEY] = old_fingerprint
    torch.save(state, tmp_path / 'old.pth')
    tested = ncf.main(['--data', str(data), '--mode', 'test', '--load_checkpoint_path',
                       str(tmp_path / 'old.pth'), '--log_path', os.devnull] + FP32)
    assert 'converted before the fingerprint covered the split' in capsys.readouterr().out
    del metadata['tensors']
    metadata.update(version=2, fingerprint=old_fingerprint)
    (data / 'metadata.json').write_text(json.dumps(metadata))
    again = ncf.main(['--data', str(data), '--mode', 'test', '--load_checkpoint_path',
                      str(tmp_path / 'old.pth'), '--log_path', os.devnull] + FP32)
    assert again['hr'] == tested['hr']
    assert 'records no tensor digests (cache version 2)' in capsys.readouterr().out


@pytest.mark.parametrize('flag, target, what', [
    ('--log_path', 'data/train_ratings.pt', "the cache's train_ratings.pt"),
    ('--log_path', 'ck/model.pth', '--load_checkpoint_path'),
    ('--output', 'data/user_ids.csv', "the cache's user_ids.csv"),
])
def test_no_output_over_an_input(flag, target, what, tiny_data, trained, tmp_path, capsys):
    world = make_world(tmp_path, tiny_data, trained)
    mode = ['--mode', 'recommend'] if flag == '--output' else ['-e', '1']
    before = snapshot(world)
    fails(['--data', f'{world}/data', '--load_checkpoint_path', f'{world}/ck/model.pth', flag,
           f'{world}/{target}'] + mode + FP32, f'{flag} {world}/{target} is {what}, which this '
          'run reads: it would be overwritten', capsys)
    fails(['--load_checkpoint_path', f'{world}/ck/model.pth', '--log_path',
           f'{world}/ck/model.pth', '--device', 'cpu'], 'is --load_checkpoint_path, which this '
          'run reads', capsys, main=inference.main)
    assert snapshot(world) == before


def test_a_fresh_run_never_replaces_another_runs_checkpoints(tiny_data, trained, tmp_path,
                                                             capsys):
    world = make_world(tmp_path, tiny_data, trained)
    before = snapshot(world)
    fails(['--data', f'{world}/data', '-e', '1', '--checkpoint_dir', f'{world}/ck'] + FP32,
          f"--checkpoint_dir {world}/ck holds another run's model.pth, last.pth, log.json: "
          '--resume continues that run, --overwrite_checkpoints starts a new one', capsys)
    assert snapshot(world) == before
    result = ncf.main(['--data', f'{world}/data', '-e', '1', '--checkpoint_dir', f'{world}/ck',
                       '--overwrite_checkpoints'] + FP32)
    state = checkpoints.read(f'{world}/ck/last.pth')
    assert state['history']['epoch'] == 0 and state['history']['hrs'] == result['hrs']


def test_recommend_into_a_new_directory(tiny_data, trained, tmp_path):
    output = tmp_path / 'new' / 'dir' / 'recs.csv'
    ncf.main(['--data', tiny_data, '--mode', 'recommend', '--checkpoint_dir', trained, '-k', '2',
              '--output', str(output)] + FP32)
    assert output.read_text().splitlines()[0] == 'user_id,rank,item_id,score'


def test_messages_say_what_is_wrong(tiny_data, trained, tmp_path, capsys):
    text = tmp_path / 'notes.txt'
    text.write_text('hello, this is not a checkpoint\n')
    fails(['--data', tiny_data, '--mode', 'test', '--load_checkpoint_path', str(text)] + FP32,
          f'{text} is not a checkpoint: not a file torch.save writes', capsys)
    if os.path.exists('/dev/full'):
        fails(['--data', tiny_data, '-e', '1', '--log_path', '/dev/full'] + FP32,
              'cannot write /dev/full: No space left on device', capsys)


def test_inference_out_of_memory_is_one_line(tmp_path, capsys):
    fails(['--batch_sizes', '100000000000', '--device', 'cpu', '--precision', 'fp32',
           '--n_users', '50', '--n_items', '40', '-f', '4', '--layers', '8', '4', '--log_path',
           str(tmp_path / 'log.json')], 'out of memory at batch size 100000000000 on cpu',
          capsys, main=inference.main)


@pytest.mark.parametrize('program', ['ncf.py', 'inference.py'])
def test_ctrl_c_while_torch_loads_is_one_line(program, tmp_path):
    """The handlers are in place from the script's first lines (before torch loads): a Ctrl-C
    as soon as they are, whenever it lands, is one line."""
    from test_data_faults import wait_for_handlers
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, program), '--data',
                                str(tmp_path), '--log_path', str(tmp_path / 'log.json')][
        :None if program == 'ncf.py' else 2] + (['--log_path', str(tmp_path / 'log.json')]
                                                if program == 'inference.py' else []),
        stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for_handlers(process)
    process.send_signal(signal.SIGINT)
    stderr = process.stderr.read()
    assert process.wait(60) == 130, stderr
    assert stderr.startswith(f'{program}: interrupted: ') and stderr.count('\n') == 1, stderr
    assert os.listdir(tmp_path) == []


def test_a_worker_killed_outright_leaves_one_line_on_the_other(tiny_data, tmp_path):
    """kill -9 of one torchrun process: the other's collective fails, or torchrun stops it
    first; either way its stderr is one line (each worker's own, from --log-dir)."""
    logs = tmp_path / 'logs'
    launch = subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         '--log-dir', str(logs), '--redirects', '3', os.path.join(ROOT, 'ncf.py'), '--data',
         tiny_data, '-e', '1000', '--checkpoint_dir', str(tmp_path / 'ck')] + FP32,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**ENV, 'PYTHONPATH': ROOT})
    try:
        deadline = time.monotonic() + 180
        while True:
            rank0 = list(logs.glob('*/attempt_0/0/stdout.log'))
            if rank0 and 'Epoch 0:' in rank0[0].read_text():
                break
            assert time.monotonic() < deadline and launch.poll() is None
            time.sleep(0.1)
        pid = int((rank0[0].parent.parent / '1' / 'pid').read_text()) \
            if (rank0[0].parent.parent / '1' / 'pid').exists() else worker_pid(launch.pid, 1)
        os.kill(pid, signal.SIGKILL)
        launch.wait(120)
    finally:
        if launch.poll() is None:
            launch.kill()
    stderr = (rank0[0].parent / 'stderr.log').read_text()
    assert 'Traceback' not in stderr and stderr.count('\n') == 1, stderr
    assert stderr.startswith('ncf.py: '), stderr
    assert ('another process of this run failed or was stopped' in stderr
            or 'interrupted' in stderr), stderr
    assert 'kept (--resume continues from it)' in stderr, stderr


def worker_pid(agent, rank):
    """The pid of torchrun's worker of `rank` (a child of the agent, with RANK in its
    environment)."""
    for child in open(f'/proc/{agent}/task/{agent}/children').read().split():
        with open(f'/proc/{child}/environ', 'rb') as file:
            if f'RANK={rank}'.encode() in file.read().split(b'\0'):
                return int(child)
    raise AssertionError(f'no worker of rank {rank} under {agent}')
