"""Checkpoints (ncflib/checkpoints.py) through ncf.py: what a test reads back is what training
saved; a checkpoint is tied to its data and its run; one writer per directory; a fresh run
never replaces another's; a broken or half-written checkpoint never loads."""
import csv
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import convert
import dataloading
import inference
import ncf
from conftest import (ENV, ROOT, assert_one_line_error, fails, flags, make_world,
                      replace_tensor, snapshot)
from logger import plot
from ncflib import checkpoints
from ncflib.cache import fingerprint, read_id_maps
from ncflib.cli import UsageError


def copy_of(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    return data


def test_test_mode_reproduces_the_saved_model(tiny_data, tmp_path, capsys):
    result = ncf.main(flags(tiny_data, epochs=3, checkpoint_dir=tmp_path))
    tested = ncf.main(flags(tiny_data, mode='test', checkpoint_dir=tmp_path))
    assert tested['hr'] == result['best_hr']
    assert f"HR@10 = {result['best_hr']:.4f}" in capsys.readouterr().out
    # A state dict saved from DDP (keys prefixed with 'module.') loads in one process.
    state = torch.load(tmp_path / 'model.pth', weights_only=True)
    torch.save({f'module.{key}': value for key, value in state.items()}, tmp_path / 'ddp.pth')
    again = ncf.main(flags(tiny_data, mode='test', load_checkpoint_path=tmp_path / 'ddp.pth'))
    assert again['hr'] == result['best_hr']


def test_a_checkpoint_of_other_data_is_refused_unless_allowed(tiny_data, trained, tmp_path,
                                                              capsys):
    """The same ratings, shuffled, then converted: the same shapes, another id mapping."""
    ratings = os.path.join(os.path.dirname(tiny_data), 'ratings.csv')
    with open(ratings, newline='') as file:
        rows = list(csv.reader(file))
    random.Random(0).shuffle(rows[1:])
    shuffled = tmp_path / 'shuffled.csv'
    with open(shuffled, 'w', newline='') as file:
        csv.writer(file).writerows(rows)
    convert.main(['--path', str(shuffled), '--output', str(tmp_path / 'other'),
                  '--valid_negative', '50'])
    other = dict(data=tmp_path / 'other', checkpoint_dir=trained, log_path=tmp_path / 'log.json',
                 precision='fp32', mode='test')
    fails(ncf.main, flags(**other), capsys, 'was trained on other data', '--allow_other_data')
    ncf.main(flags(**other, allow_other_data=True))
    assert 'used anyway, as --allow_other_data says' in capsys.readouterr().out
    # the reference's model.pth, a plain state dict without a fingerprint, loads with a notice
    state = torch.load(os.path.join(trained, 'model.pth'), weights_only=True)
    plain = tmp_path / 'reference.pth'
    torch.save(dict(state), plain)
    ncf.main(flags(tiny_data, mode='test', load_checkpoint_path=plain,
                   log_path=tmp_path / 'log.json', precision='fp32'))
    assert 'records no data fingerprint' in capsys.readouterr().out


def test_a_checkpoint_of_another_split_is_other_data(tiny_data, trained, tmp_path, capsys):
    """The fingerprint covers the split: the same ratings and ids with one training pair moved
    are other data, even with metadata.json rewritten to match."""
    data = copy_of(tiny_data, tmp_path)
    train = torch.load(data / 'train_ratings.pt', weights_only=True)
    train[7, 1] = (train[7, 1] + 1) % 200
    replace_tensor(data, 'train_ratings.pt', train)
    fails(ncf.main, flags(data, mode='test', checkpoint_dir=trained, precision='fp32'), capsys,
          'was trained on other data')


def test_a_cache_without_digests_and_its_checkpoints_still_load(tiny_data, trained, tmp_path,
                                                                 capsys):
    """A cache of version 2 loads with a notice, and a checkpoint that recorded version 2's
    fingerprint (the source and the id maps) passes on the version-3 cache of the same data."""
    data = copy_of(tiny_data, tmp_path)
    metadata = json.loads((data / 'metadata.json').read_text())
    old_fingerprint = fingerprint(metadata['source_sha256'], metadata['id_maps_sha256'])
    state = torch.load(os.path.join(trained, 'model.pth'), weights_only=True)
    state._metadata[''][checkpoints.FINGERPRINT_KEY] = old_fingerprint
    torch.save(state, tmp_path / 'old.pth')
    test = flags(data, mode='test', load_checkpoint_path=tmp_path / 'old.pth',
                 log_path=os.devnull, precision='fp32')
    tested = ncf.main(test)
    assert 'converted before the fingerprint covered the split' in capsys.readouterr().out
    del metadata['tensors']
    metadata.update(version=2, fingerprint=old_fingerprint)
    (data / 'metadata.json').write_text(json.dumps(metadata))
    again = ncf.main(test)
    assert again['hr'] == tested['hr']
    assert 'records no tensor digests (cache version 2)' in capsys.readouterr().out


def with_nan_weight(trained, tmp_path, name='final.weight'):
    state = torch.load(os.path.join(trained, 'model.pth'), weights_only=True)
    state[name][0, 0] = float('nan')
    path = tmp_path / 'nan.pth'
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize('mode', [{'mode': 'test'}, {'mode': 'test', 'eval_mode': 'full'},
                                  {'mode': 'recommend'}, {'epochs': 1}])
def test_a_checkpoint_with_nan_weights_is_refused(mode, tiny_data, trained, tmp_path, capsys):
    """A NaN in final.weight once scored HR@10 = 1.0 (NaN compares false)."""
    path = with_nan_weight(trained, tmp_path)
    before = snapshot(tmp_path)
    log = None if mode.get('mode') == 'recommend' else tmp_path / 'log.json'  # writes none
    fails(ncf.main, flags(tiny_data, load_checkpoint_path=path, log_path=log, precision='fp32',
                          **mode), capsys,
          f'checkpoint {path} holds weights that are not finite (NaN or infinite) in '
          'final.weight: not a usable model')
    fails(inference.main, ['--load_checkpoint_path', path, '--device', 'cpu', '--log_path',
                           str(tmp_path / 'log.json')], capsys,
          'holds weights that are not finite')
    assert snapshot(tmp_path) == before


def test_a_fresh_run_never_replaces_another_runs_checkpoints(tiny_data, trained, tmp_path,
                                                             capsys):
    world = make_world(tmp_path, tiny_data, trained)
    before = snapshot(world)
    run = dict(data=f'{world}/data', epochs=1, checkpoint_dir=f'{world}/ck', precision='fp32')
    fails(ncf.main, flags(**run), capsys,
          f"--checkpoint_dir {world}/ck holds another run's model.pth, last.pth, log.json: "
          '--resume continues that run, --overwrite_checkpoints starts a new one')
    assert snapshot(world) == before
    result = ncf.main(flags(**run, overwrite_checkpoints=True))
    state = checkpoints.read(f'{world}/ck/last.pth')
    assert state['history']['epoch'] == 0 and state['history']['hrs'] == result['hrs']


def test_a_full_disk_while_saving_is_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    def no_space(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(checkpoints, 'atomic_torch_save', no_space)
    fails(ncf.main, flags(tiny_data, epochs=2, checkpoint_dir=tmp_path / 'ck', precision='fp32'),
          capsys, f'cannot write {tmp_path / "ck" / "model.pth"}: No space left on device',
          'no epoch finished')


def test_one_training_run_per_checkpoint_directory(tiny_data, tmp_path):
    directory = tmp_path / 'shared'
    first = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'ncf.py')]
        + flags(tiny_data, epochs=1000, threshold=2, checkpoint_dir=directory,
                precision='fp32'),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if line.startswith('Epoch 0:'):
            break
    second = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'ncf.py')]
        + flags(tiny_data, epochs=2, checkpoint_dir=directory, seed=2, precision='fp32'),
        capture_output=True, text=True, env=ENV, timeout=300)
    assert_one_line_error(second, f'is in use by pid {first.pid} on')
    first.send_signal(signal.SIGINT)  # the first run was never disturbed: stop it now
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130 and 'kept (--resume continues from it)' in err, err
    best = max(float(line.split('HR@10 = ')[1].split(',')[0])
               for line in lines + out.splitlines() if line.startswith('Epoch '))
    plot.epoch_series(str(directory / 'log.json'))  # one run's log, readable
    tested = ncf.main(flags(tiny_data, mode='test', checkpoint_dir=directory,
                            log_path=os.devnull, precision='fp32'))
    assert tested['hr'] == pytest.approx(best, abs=1e-4)  # model.pth is the first run's best


def test_kill_9_at_random_points_never_leaves_a_checkpoint_that_loads_wrong(tiny_data,
                                                                             tmp_path):
    run = dict(data=tiny_data, epochs=12, dropout=0.3)
    uninterrupted = ncf.main(flags(**run, log_path=os.devnull))
    directory = tmp_path / 'ck'
    generator = random.Random(5)
    for attempt in range(4):
        # a run killed before its first epoch left its log: the next one starts over
        again = {'resume': True} if (directory / 'last.pth').exists() else \
            {'overwrite_checkpoints': True}
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, 'ncf.py')]
            + flags(**run, checkpoint_dir=directory, **again), stdout=subprocess.DEVNULL,
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
    again = {'resume': True} if (directory / 'last.pth').exists() else \
        {'overwrite_checkpoints': True}
    resumed = ncf.main(flags(**run, checkpoint_dir=directory, **again))
    assert resumed['hrs'] == uninterrupted['hrs']
    # a killed writer's temporary file is removed by the next write of the same file
    assert not [name for name in os.listdir(directory) if name.startswith('.last.pth.')]


# The family's checkpoints -------------------------------------------------------------------

@pytest.mark.parametrize('model', ['neumf', 'gmf', 'mlp', 'mf'])
def test_each_models_checkpoint_through_test_recommend_inference_and_hub(model, family,
                                                                         tiny_data, tmp_path):
    """A checkpoint records its model and sizes; test and recommend modes, inference.py and
    torch.hub build that model from it, whatever the flags' defaults say."""
    directory, result = family[model]
    best = os.path.join(directory, 'model.pth')
    state = checkpoints.read(best)
    recorded = checkpoints.recorded_model(state)
    assert recorded['model'] == model
    assert recorded == checkpoints.recorded_model(checkpoints.read(
        os.path.join(directory, 'last.pth')))
    shape, n_users, n_items = checkpoints.shape_of(state, best)
    assert (shape.model, n_users, n_items) == (model, 300, 200)
    # the flags' model is neumf of 64 factors: the checkpoint's wins
    tested = ncf.main(['--data', tiny_data, '--mode', 'test', '--checkpoint_dir', directory,
                       '--valid_negative', '50', '--log_path', os.devnull, '--device', 'cpu',
                       '--precision', 'fp32'])
    assert tested['hr'] == result['best_hr']
    recommended = ncf.main(['--data', tiny_data, '--mode', 'recommend', '--checkpoint_dir',
                            directory, '--device', 'cpu', '--output',
                            str(tmp_path / 'recs.csv')])
    assert recommended['users'] == 300 and recommended['rows'] == 3000
    # the top item, by the model itself over every untrained item, for one user
    hub = torch.hub.load(ROOT, model, source='local', checkpoint=best).eval()
    any_model = torch.hub.load(ROOT, 'from_checkpoint', source='local', checkpoint=best)
    assert type(any_model) is type(hub)
    with open(tmp_path / 'recs.csv') as file:
        rows = list(csv.DictReader(file))
    dataset = dataloading.load_dataset(tiny_data, torch.device('cpu'))
    user_ids, item_ids = read_id_maps(tiny_data, dataset.metadata)
    with torch.no_grad():
        scores = hub.all_item_scores(torch.tensor([5]))[0]
    scores[dataset.train_items[dataset.train_users == 5]] = -float('inf')
    top = next(row for row in rows if row['user_id'] == user_ids[5] and row['rank'] == '1')
    assert top['item_id'] == item_ids[int(scores.argmax())]
    benchmarked = inference.main(['--load_checkpoint_path', best, '--batch_sizes', '8',
                                  '--num_batches', '2', '--warmup', '1', '--device', 'cpu',
                                  '--log_path', str(tmp_path / 'inference.json')])
    assert benchmarked[0]['batch_size'] == 8
    other = {'neumf': 'gmf', 'gmf': 'mlp', 'mlp': 'mf', 'mf': 'neumf'}[model]
    with pytest.raises(UsageError, match=f'entry point {other}, but .* holds --model {model}'):
        torch.hub.load(ROOT, other, source='local', checkpoint=best)


def test_the_references_model_pth_loads_as_neumf(trained, tiny_data, tmp_path):
    """A plain state dict without our metadata (the reference's model.pth) is a NeuMF, its
    sizes read from its tensors."""
    state = torch.load(os.path.join(trained, 'model.pth'), weights_only=True)
    plain = dict(state)  # no _metadata: no fingerprint, no recorded model
    torch.save(plain, tmp_path / 'reference.pth')
    shape, n_users, n_items = checkpoints.shape_of(checkpoints.read(tmp_path / 'reference.pth'),
                                                   'reference.pth')
    assert (shape.model, shape.factors, list(shape.layers), n_users, n_items) == \
        ('neumf', 8, [32, 16, 8], 300, 200)
    tested = ncf.main(flags(tiny_data, mode='test', load_checkpoint_path=tmp_path / 'reference.pth',
                            log_path=os.devnull, precision='fp32'))
    again = ncf.main(flags(tiny_data, mode='test', checkpoint_dir=trained, log_path=os.devnull,
                           precision='fp32'))
    assert tested['hr'] == again['hr']


def test_pretrained_branches_of_other_data_or_sizes_are_one_line(family, tiny_data, tmp_path,
                                                                 capsys):
    gmf, mlp = (os.path.join(family[name][0], 'model.pth') for name in ('gmf', 'mlp'))
    start = dict(epochs=1, pretrained_gmf=gmf, pretrained_mlp=mlp, log_path=os.devnull)
    fails(ncf.main, flags(tiny_data, **start, factors=16), capsys,
          f'--pretrained_gmf {gmf} has factors 8, this NeuMF --factors 16')
    fails(ncf.main, flags(tiny_data, **start, layers=[64, 32]), capsys,
          f'--pretrained_mlp {mlp} has layers [32, 16, 8], this NeuMF --layers [64, 32]')
    data = copy_of(tiny_data, tmp_path)
    train = torch.load(data / 'train_ratings.pt')
    replace_tensor(str(data), 'train_ratings.pt', train[:-1])
    fails(ncf.main, flags(data, **start), capsys, '--pretrained_gmf', 'was trained on other data')
    result = ncf.main(flags(tiny_data, **start, optimizer='sgd', learning_rate=0.01))
    assert 'Starting from' in capsys.readouterr().out and result['best_hr'] > 0.5


def resumable(tiny_data, tmp_path, **overrides):
    """A two-epoch run's checkpoint directory (Adam), and the flags that resume it."""
    run = dict(data=tiny_data, precision='fp32', checkpoint_dir=tmp_path / 'ck')
    ncf.main(flags(**run, epochs=2))
    return flags(**run, epochs=3, resume=True, **overrides)


def test_resume_with_another_optimizer_starts_it_afresh(tiny_data, tmp_path, capsys):
    """Adam's state cannot drive SGD (it lacks SGD's settings): --allow_changed_settings
    resumes with a fresh optimizer, said in a notice."""
    resumed = ncf.main(resumable(tiny_data, tmp_path, optimizer='sgd',
                                 allow_changed_settings=True))
    out = capsys.readouterr().out
    assert 'holds the state of another optimizer or of other parameter groups' in out
    assert len(resumed['hrs']) == 3
    state = torch.load(tmp_path / 'ck' / 'last.pth', weights_only=True)
    assert 'momentum' in state['optimizer']['param_groups'][0]


def test_resume_takes_this_runs_learning_rate(tiny_data, tmp_path):
    ncf.main(resumable(tiny_data, tmp_path, learning_rate=0.02, allow_changed_settings=True))
    state = torch.load(tmp_path / 'ck' / 'last.pth', weights_only=True)
    assert state['optimizer']['param_groups'][0]['lr'] == 0.02
    assert state['optimizer']['state']  # Adam's moments carried over


def test_resume_from_another_device_types_data_generator(tiny_data, tmp_path, capsys):
    """A CUDA run's generator state (16 bytes) cannot seed a CPU generator (5,056): the run
    goes on with the data drawn from --seed and the epoch, the same on every rerun."""
    argv = resumable(tiny_data, tmp_path)
    state = torch.load(tmp_path / 'ck' / 'last.pth', weights_only=True)
    state['rng']['data'] = torch.zeros(16, dtype=torch.uint8)  # as torch.cuda's generator's
    torch.save(state, tmp_path / 'cuda.pth')
    results = []
    for _ in range(2):
        shutil.copy(tmp_path / 'cuda.pth', tmp_path / 'ck' / 'last.pth')
        results.append(ncf.main(argv))
        assert 'drew its data on another device type' in capsys.readouterr().out
    assert results[0]['hrs'] == results[1]['hrs'] and len(results[0]['hrs']) == 3


@pytest.mark.parametrize('saved_scaling, scaling', [(False, True), (True, False)])
def test_resume_where_loss_scaling_starts_or_stops(saved_scaling, scaling):
    """fp16 scales the loss, bf16 and fp32 do not: a checkpoint's scaler state (empty where it
    was off) resumes in any precision, a missing one starting afresh."""
    import types

    from ncflib import runtime
    from ncflib.training import History

    plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl='eager'))
    generator = plan.generator(1)

    def trainer(scaled):
        model = torch.nn.Linear(2, 1)
        return types.SimpleNamespace(
            plan=plan, optimizer=torch.optim.Adam(model.parameters()), sparse=None,
            scaler=torch.amp.GradScaler('cpu', enabled=scaled, init_scale=1024.0))
    saved = trainer(saved_scaling)
    state = {'history': History().state_dict(), 'optimizer': saved.optimizer.state_dict(),
             'scaler': saved.scaler.state_dict(), 'settings': {'optimizer': 'adam'},
             'rng': {**plan.rng_state(), 'data': generator.get_state()}}
    notices = []
    resumed = trainer(scaling)
    checkpoints.restore_training_state(state, 'last.pth', resumed, generator, 1, notices.append)
    assert bool(notices) == (scaling and not saved_scaling)
    if scaling:
        assert resumed.scaler.get_scale() == 1024.0
