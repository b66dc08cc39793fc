"""ncf.py, the command: every bad flag, path and input ends in one line on stderr, a non-zero
exit and every file as it was; faults (signals, a full log device, an output over an input)
likewise; what only a process shows (exit status on signals, Ctrl-C while torch loads, a
traceback-free failure) in subprocesses, the rest in this process through ncf.main."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ncf
from conftest import (ENV, PYTHON, ROOT, TINY, assert_one_line_error, fails, flags,
                      make_world, snapshot, wait_for_handlers)
from logger.logger import read_log
from ncflib import checkpoints

def replace(path, content):
    os.remove(path)  # the copies are symlinks or hard copies: never write through one
    with open(path, 'wb') as file:
        file.write(content)


def truncated(path):
    with open(path, 'rb') as file:
        return file.read()[:os.path.getsize(path) // 2]


def more_items(world):
    path = os.path.join(world, 'data', 'metadata.json')
    metadata = json.load(open(path))
    metadata['n_items'] += 5
    replace(path, json.dumps(metadata).encode())


def other_data_checkpoint(world):
    """model.pth of a run on other data with the same shapes: another fingerprint."""
    state = torch.load(os.path.join(world, 'ck', 'model.pth'), weights_only=True)
    state._metadata[''][checkpoints.FINGERPRINT_KEY] = '0123456789abcdef'
    os.remove(os.path.join(world, 'ck', 'model.pth'))
    torch.save(state, os.path.join(world, 'ck', 'model.pth'))


def edited_fingerprint(world):
    path = os.path.join(world, 'data', 'metadata.json')
    metadata = json.load(open(path))
    metadata['fingerprint'] = '0123456789abcdef'
    replace(path, json.dumps(metadata).encode())


def hold_lock(world):
    """Another run holds the checkpoint directory: a process keeping its lock."""
    holder = subprocess.Popen(
        [PYTHON, '-c', 'import sys, time; sys.path.insert(0, sys.argv[1]); '
         'from ncflib.files import DirectoryLock; lock = DirectoryLock(sys.argv[2], "held"); '
         'print("held", flush=True); time.sleep(120)', ROOT, os.path.join(world, 'ck')],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'held'
    return holder


CASES = {  # name: (flags after the world's, setup(world) or None, exit status, fragment)
    'data missing': ({'data': '{world}/nowhere'}, None, 1, 'is not a directory'),
    'data is a file': ({'data': '{world}/data/metadata.json'}, None, 1, 'is not a directory'),
    'zero-byte tensor file': ({}, lambda w: replace(f'{w}/data/train_ratings.pt', b''), 1,
                              'train_ratings.pt is empty (0 bytes)'),
    'truncated tensor file': ({}, lambda w: replace(f'{w}/data/test_ratings.pt',
                                                    truncated(f'{w}/data/test_ratings.pt')), 1,
                              'cannot read'),
    'metadata claims more items': ({}, more_items, 1, 'says 205 items, but the tensors hold 200'),
    'negative learning rate': ({'learning_rate': -1}, None, 1,
                               '--learning_rate must be positive'),
    'nan learning rate': ({'learning_rate': 'nan'}, None, 1,
                          '--learning_rate must be a finite number'),
    'beta1 above 1': ({'beta1': 1.5}, None, 1, '--beta1 must be in [0, 1)'),
    'zero eps': ({'eps': 0}, None, 1, '--eps must be positive'),
    'valid_negative beyond the catalogue': ({'valid_negative': 20000}, None, 1,
                                            'more than the catalogue (200 items)'),
    'odd first layer': ({'layers': [33, 16]}, None, 1, 'must be even'),
    'dropout above 1': ({'dropout': 1.5}, None, 1, '--dropout must be in [0, 1)'),
    'batch not divisible': ({'batch_size': 1001, 'grads_accumulated': 2}, None, 1,
                            'not divisible by world size 1 x'),
    'topk beyond the candidates': ({'topk': 52}, None, 1, 'larger than the 51 candidates'),
    'batch larger than an epoch': ({'batch_size': 10000000}, None, 1, 'larger than an epoch'),
    'fp16 on a CPU': ({'precision': 'fp16'}, None, 1, 'fp16 needs CUDA'),
    'tf32 on a CPU': ({'precision': 'tf32'}, None, 1, 'tf32 needs an Ampere or newer GPU'),
    'O2 against fp32': ({'opt_level': 'O2'}, None, 1, 'contradicts'),
    'checkpoint_dir is a file': ({'checkpoint_dir': '{world}/data/metadata.json'}, None, 1,
                                 'is not a directory'),
    'checkpoint_dir under a file': ({'checkpoint_dir': '{world}/data/metadata.json/ck'}, None,
                                    1, 'is not a directory'),
    'log_path is a directory': ({'log_path': '{world}/data'}, None, 1, 'is a directory'),
    'log_path under a file': ({'log_path': '{world}/data/metadata.json/log.json'}, None, 1,
                              'is a file, not a directory'),
    'tensorboard is a file': ({'tensorboard': '{world}/data/metadata.json'}, None, 1,
                              'is not a directory'),
    'recommend output is a directory': ({'mode': 'recommend', 'output': '{world}/data'}, None,
                                        1, 'is a directory'),
    'users outside recommend mode': ({'users': '1'}, None, 1, 'are for --mode recommend'),
    'zero-byte model.pth': ({'mode': 'test'}, lambda w: replace(f'{w}/ck/model.pth', b''), 1,
                            'model.pth is empty (0 bytes)'),
    'truncated model.pth': ({'mode': 'test'},
                            lambda w: replace(f'{w}/ck/model.pth', truncated(f'{w}/ck/model.pth')),
                            1, 'cannot read checkpoint'),
    'a zip that is not a checkpoint': (
        {'mode': 'test'}, lambda w: replace(f'{w}/ck/model.pth', b'PK\x03\x04 not a zip'), 1,
        'cannot read checkpoint'),
    'a text file as the checkpoint': (
        {'mode': 'test'}, lambda w: replace(f'{w}/ck/model.pth', b'hello, not a model\n'), 1,
        'model.pth is not a checkpoint: not a file torch.save writes'),
    'test mode without model.pth': ({'mode': 'test', 'checkpoint_dir': '{world}/none'}, None,
                                    1, 'model.pth does not exist'),
    'a checkpoint of other factors': ({'checkpoint_dir': None,
                                       'load_checkpoint_path': '{world}/ck/model.pth',
                                       'factors': 16}, None, 1,
                                      'mf_user_embed.weight is [300, 8] there, [300, 16] here'),
    'a checkpoint of another model': ({'checkpoint_dir': None,
                                       'load_checkpoint_path': '{world}/ck/model.pth',
                                       'model': 'gmf'}, None, 1,
                                      'holds --model neumf (factors 8, layers [32, 16, 8]), not '
                                      '--model gmf'),
    'test with other layers than the checkpoint': ({'mode': 'test', 'layers': [64, 8]}, None,
                                                   1, "--layers 64 8, but"),
    'test with another model than the checkpoint': ({'mode': 'recommend', 'model': 'mlp'}, None,
                                                    1, "--mode recommend uses the checkpoint's"),
    'pretrained gmf alone': ({'pretrained_gmf': '{world}/ck/model.pth'}, None, 1,
                             '--pretrained_gmf needs --pretrained_mlp too'),
    'pretrained branches of the wrong model': ({'checkpoint_dir': None,
                                                'pretrained_gmf': '{world}/ck/model.pth',
                                                'pretrained_mlp': '{world}/ck/model.pth'}, None,
                                               1, 'holds --model neumf (factors 8, layers [32, '
                                               '16, 8]), not gmf'),
    'pretrained branches for a GMF': ({'pretrained_gmf': '{world}/ck/model.pth',
                                       'pretrained_mlp': '{world}/ck/model.pth', 'model': 'gmf'},
                                      None, 1, 'build a NeuMF, not --model gmf'),
    'pretrained branches with resume': ({'pretrained_gmf': '{world}/ck/model.pth',
                                         'pretrained_mlp': '{world}/ck/model.pth',
                                         'resume': True}, None, 1, 'start a new training run'),
    'pretrained branch that is not a checkpoint': ({
        'checkpoint_dir': None, 'pretrained_gmf': '{world}/data/metadata.json',
        'pretrained_mlp': '{world}/ck/model.pth'}, None, 1, 'is not a checkpoint'),
    'alpha without pretrained branches': ({'alpha': 0.3}, None, 1,
                                          '--alpha mixes pretrained branches'),
    'alpha above 1': ({'pretrained_gmf': '{world}/ck/model.pth',
                       'pretrained_mlp': '{world}/ck/model.pth', 'alpha': 1.5}, None, 1,
                      '--alpha must be in [0, 1]'),
    'negative embedding_l2': ({'embedding_l2': -0.1}, None, 1,
                              '--embedding_l2 must not be negative'),
    'nan weight_decay': ({'weight_decay': 'nan'}, None, 1,
                         '--weight_decay must be a finite number'),
    'metrics_at beyond the candidates': ({'metrics_at': [5, 60]}, None, 1,
                                         '--metrics_at 60 is larger than the 51 candidates'),
    'metrics_at beyond the catalogue': ({'metrics_at': [201], 'eval_mode': 'full'}, None, 1,
                                        '--metrics_at 201 is larger than the catalogue'),
    'metrics_at zero': ({'metrics_at': [0, 5]}, None, 1, '--metrics_at must be positive'),
    'unknown model': ({'model': 'ncf'}, None, 2, "argument --model: invalid choice: 'ncf'"),
    'zero-byte last.pth': ({'resume': True}, lambda w: replace(f'{w}/ck/last.pth', b''), 1,
                           'last.pth is empty (0 bytes)'),
    'resume without last.pth': ({'resume': True}, lambda w: os.remove(f'{w}/ck/last.pth'), 1,
                                'last.pth does not exist'),
    'resume without checkpoint_dir': ({'resume': True, 'checkpoint_dir': None}, None, 1,
                                      '--resume needs --checkpoint_dir'),
    'resume with another learning rate': ({'resume': True, 'learning_rate': 0.02}, None, 1,
                                          '--learning_rate 0.01 -> 0.02'),
    'resume with another batch and seed': ({'resume': True, 'batch_size': 1024, 'seed': 2},
                                           None, 1, '--batch_size 2048 -> 1024, --seed 1 -> 2'),
    'checkpoint of other data (test)': ({'mode': 'test'}, other_data_checkpoint, 1,
                                        'was trained on other data'),
    'checkpoint of other data (recommend)': ({'mode': 'recommend'}, other_data_checkpoint, 1,
                                             'was trained on other data'),
    'checkpoint directory in use': ({}, hold_lock, 1, 'is in use by pid'),
    'contradicting precision flags': ({'amp': True, 'opt_level': 'O0'}, None, 1, 'contradict'),
    'plain and compile': ({'plain': True, 'impl': 'compile'}, None, 2,
                          '--plain means --impl eager'),
    'log_path is the checkpoint_dir to make': (
        {'checkpoint_dir': '{world}/new', 'log_path': '{world}/new'}, None, 1,
        'is --checkpoint_dir {world}/new, a directory this run writes into'),
    'log_path is last.pth (resume)': ({'resume': True, 'log_path': '{world}/ck/last.pth'},
                                      None, 1, "is --checkpoint_dir's last.pth, which this run "
                                      'writes too'),
    "log_path is model.pth": ({'log_path': '{world}/ck/model.pth'}, None, 1,
                              "is --checkpoint_dir's model.pth, which this run writes too"),
    "log_path is the directory's lock": ({'log_path': '{world}/ck/.lock'}, None, 1,
                                         "is --checkpoint_dir's .lock"),
    'log_path inside model.pth to be': (
        {'checkpoint_dir': '{world}/new', 'log_path': '{world}/new/model.pth/log.json'}, None,
        1, "would be inside --checkpoint_dir's model.pth, a file this run writes"),
    'log_path is the tensorboard directory': (
        {'log_path': '{world}/tb', 'tensorboard': '{world}/tb'}, None, 1,
        'is --tensorboard {world}/tb, a directory this run writes into'),
    'test log over the model it evaluates': (
        {'mode': 'test', 'log_path': '{world}/ck/model.pth'}, None, 1,
        'is the checkpoint it evaluates ({world}/ck/model.pth), which this run reads'),
    'recommendations over the model': (
        {'mode': 'recommend', 'output': '{world}/ck/model.pth'}, None, 1,
        'is the checkpoint it evaluates ({world}/ck/model.pth), which this run reads'),
    'a log in recommend mode': ({'mode': 'recommend', 'log_path': '{world}/log.json'}, None,
                                1, '--mode recommend writes no log'),
    'resume and overwrite_checkpoints': ({'resume': True, 'overwrite_checkpoints': True},
                                         None, 1, '--resume continues the run in '
                                         '--checkpoint_dir, --overwrite_checkpoints replaces it'),
    'a directory as a pretrained branch': (
        {'checkpoint_dir': None, 'pretrained_gmf': '{world}/ck',
         'pretrained_mlp': '{world}/ck/model.pth'}, None, 1,
        'checkpoint {world}/ck is a directory, not a checkpoint file'),
    "an edited fingerprint in the cache": ({'mode': 'test'}, edited_fingerprint, 1,
                                           'metadata.json was edited'),
    'ranks_output in train mode': ({'ranks_output': '{world}/ranks.csv'}, None, 1,
                                   '--ranks_output is for --mode test'),
    'ranks_output over the model it evaluates': (
        {'mode': 'test', 'ranks_output': '{world}/ck/model.pth'}, None, 1,
        '--ranks_output {world}/ck/model.pth is the checkpoint it evaluates'),
    'ranks_output over the cache': (
        {'mode': 'test', 'ranks_output': '{world}/data/test_ratings.pt'}, None, 1,
        "--ranks_output {world}/data/test_ratings.pt is the cache's test_ratings.pt"),
    'ranks_output is the log': ({'mode': 'test', 'ranks_output': '{world}/ck/log.json'}, None,
                                1, 'is --ranks_output {world}/ck/log.json, which this run '
                                'writes too'),
    'ranks_output is a directory': ({'mode': 'test', 'ranks_output': '{world}/data'}, None, 1,
                                    '--ranks_output {world}/data is a directory'),
    'unknown flag': ({'batchsize': 5}, None, 2, 'unrecognized arguments'),
    'no data': ({'data': None}, None, 2, 'the following arguments are required: --data'),
}


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(name, tiny_data, trained, tmp_path, capsys):
    overrides, setup, code, fragment = CASES[name]
    world = make_world(tmp_path, tiny_data, trained)
    holder = setup(world) if setup else None
    try:
        before = snapshot(world)
        # the world's ck holds a trained run: a new one may replace it (once every check has
        # passed, which none of these cases does)
        settings = {'data': f'{world}/data', 'checkpoint_dir': f'{world}/ck', 'epochs': 3,
                    'precision': 'fp32', 'overwrite_checkpoints': not overrides.get('resume')}
        settings.update({key: value.format(world=world) if isinstance(value, str) else value
                         for key, value in overrides.items()})
        fails(ncf.main, flags(**settings), capsys, fragment.format(world=world), code=code)
        assert snapshot(world) == before  # nothing written, nothing changed
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


def test_cuda_asked_for_without_it(tiny_data, capsys):
    if torch.cuda.is_available():
        pytest.skip('CUDA is here')
    fails(ncf.main, flags(tiny_data, device='cuda'), capsys, 'CUDA is not available')


def test_a_process_shows_one_line_and_its_exit_status(tmp_path):
    """What an in-process call cannot show: the process's own exit and stderr."""
    completed = subprocess.run([PYTHON, os.path.join(ROOT, 'ncf.py'), '--data', str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert_one_line_error(completed, 'has no metadata.json')
    assert completed.stderr.count('\n') == 1


@pytest.mark.parametrize('flag, target, what', [
    ('log_path', 'data/train_ratings.pt', "the cache's train_ratings.pt"),
    ('log_path', 'ck/model.pth', '--load_checkpoint_path'),
    ('output', 'data/user_ids.csv', "the cache's user_ids.csv"),
])
def test_no_output_over_an_input(flag, target, what, tiny_data, trained, tmp_path, capsys):
    world = make_world(tmp_path, tiny_data, trained)
    before = snapshot(world)
    mode = {'mode': 'recommend'} if flag == 'output' else {'epochs': 1}
    fails(ncf.main, flags(f'{world}/data', load_checkpoint_path=f'{world}/ck/model.pth',
                          precision='fp32', **{flag: f'{world}/{target}'}, **mode), capsys,
          f'--{flag} {world}/{target} is {what}, which this run reads: it would be overwritten')
    assert snapshot(world) == before


def test_test_mode_evaluates_where_it_cannot_log(tiny_data, trained, tmp_path, capsys):
    world = make_world(tmp_path, tiny_data, trained)
    os.remove(os.path.join(world, 'ck', 'log.json'))
    os.mkdir(os.path.join(world, 'ck', 'log.json'))  # log.json cannot be appended to
    result = ncf.main(flags(f'{world}/data', mode='test', checkpoint_dir=f'{world}/ck',
                            precision='fp32'))
    captured = capsys.readouterr()
    assert 0 < result['hr'] < 1 and 'HR@10 = ' in captured.out
    assert captured.err == (f'ncf.py: warning: {world}/ck/log.json is not writable: this '
                            'evaluation is not logged (--log_path sets another place)\n')


def test_messages_say_what_is_wrong(tiny_data, capsys):
    if os.path.exists('/dev/full'):
        fails(ncf.main, flags(tiny_data, epochs=1, log_path='/dev/full', precision='fp32'),
              capsys, 'cannot write /dev/full: No space left on device')


@pytest.mark.parametrize('signal_number, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_training_says_what_it_kept(signal_number, code, tiny_data, tmp_path):
    process = subprocess.Popen(
        [PYTHON, os.path.join(ROOT, 'ncf.py')] + flags(
            tiny_data, epochs=1000, threshold=2, checkpoint_dir=tmp_path / 'ck',
            precision='fp32'),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
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


@pytest.mark.parametrize('program', ['ncf.py', 'inference.py'])
def test_ctrl_c_while_torch_loads_is_one_line(program, tmp_path):
    """The handlers are in place from the script's first lines (before torch loads): a Ctrl-C
    as soon as they are, whenever it lands, is one line."""
    arguments = ['--data', str(tmp_path)] if program == 'ncf.py' else []
    process = subprocess.Popen([PYTHON, os.path.join(ROOT, program)] + arguments
                               + ['--log_path', str(tmp_path / 'log.json')],
                               stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for_handlers(process)
    process.send_signal(signal.SIGINT)
    stderr = process.stderr.read()
    assert process.wait(60) == 130, stderr
    assert stderr.startswith(f'{program}: interrupted: ') and stderr.count('\n') == 1, stderr
    assert os.listdir(tmp_path) == []


def test_tensorboard_scalars(tiny_data, tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = ncf.main(flags(tiny_data, epochs=2, tensorboard=tmp_path / 'tb'))
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    for tag in ('hr@10', 'ndcg@10', 'train_loss', 'validation_loss', 'train_throughput'):
        assert tag in events.Tags()['scalars']
    assert [e.value for e in events.Scalars('hr@10')] == pytest.approx(result['hrs'])


def test_tensorboard_missing_is_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    fails(ncf.main, flags(tiny_data, epochs=1, tensorboard=tmp_path / 'tb'), capsys,
          'needs the tensorboard package')
    assert not (tmp_path / 'tb').exists()


def test_the_log_and_the_startup_line(tiny_data, tmp_path, capsys):
    """log.json in dllogger's layout: the hardware, the flags, the plan and the data, a record
    per epoch, the summary; the startup line says what the plan resolved and why."""
    result = ncf.main(flags(tiny_data, epochs=2, checkpoint_dir=tmp_path))
    out = capsys.readouterr().out
    assert 'Precision: ' in out and 'implementation auto: cpu_fused on CPU' in out
    records = read_log(tmp_path / 'log.json')
    parameters = [r['data'] for r in records if r['step'] == 'PARAMETER']
    assert any('torch_version' in data and 'cpu' in data for data in parameters)
    assert any(data.get('batch_size') == TINY['batch_size'] for data in parameters)
    assert any(data.get('plan', '').startswith('Precision: ') for data in parameters)
    epochs = [r for r in records if isinstance(r['step'], list) and r['step']]
    assert [r['step'] for r in epochs] == [[0], [1]]
    summary = [r for r in records if r['step'] == []][-1]['data']
    assert summary['best_accuracy'] == result['best_hr']


def test_a_k_given_twice_is_reported_once(tiny_data, capsys):
    ncf.main(flags(tiny_data, epochs=1, metrics_at=[5, 5, 10], precision='fp32'))
    line = next(line for line in capsys.readouterr().out.splitlines() if 'MRR = ' in line)
    assert line.count('HR@5 = ') == 1 and line.count('HR@10 = ') == 1


def figures_of_ranks(path):
    """HR@10 and NDCG@10 from a --ranks_output CSV, as the metric counts them; and its users."""
    with open(path) as file:
        header, *rows = file.read().splitlines()
    assert header == 'user,rank'
    users, ranks = zip(*[map(int, row.split(',')) for row in rows])
    hr = sum(rank < 10 for rank in ranks) / len(ranks)
    ndcg = sum(1 / math.log2(rank + 2) for rank in ranks if rank < 10) / len(ranks)
    return list(users), hr, ndcg


@pytest.mark.parametrize('eval_mode', ['sampled', 'full'])
def test_ranks_output_agrees_with_the_printed_figures(eval_mode, tiny_data, trained, tmp_path,
                                                      capsys):
    """--ranks_output: every test user's rank, from which HR@10 and NDCG@10 are those printed
    and returned (its directory made where missing)."""
    path = tmp_path / 'made' / 'ranks.csv'
    result = ncf.main(flags(tiny_data, mode='test', checkpoint_dir=trained, precision='fp32',
                            eval_mode=eval_mode, log_path=tmp_path / 'log.json',
                            ranks_output=path))
    out = capsys.readouterr().out
    users, hr, ndcg = figures_of_ranks(path)
    assert users == list(range(300))
    assert hr == pytest.approx(result['hr'], abs=1e-12)
    assert ndcg == pytest.approx(result['ndcg'], abs=1e-12)
    assert f'HR@10 = {hr:.4f}, NDCG@10 = {ndcg:.4f}' in out
    assert f'Ranks of the 300 test users written to {path}' in out
    assert os.listdir(tmp_path / 'made') == ['ranks.csv']  # nothing half-written left


def test_ranks_output_under_torchrun_gathers_every_process(tiny_data, trained, tmp_path):
    """Two processes rank their halves of the users; rank 0 writes them all, as one process
    does."""
    single = tmp_path / 'one.csv'
    ncf.main(flags(tiny_data, mode='test', checkpoint_dir=trained, precision='fp32',
                   eval_mode='full', log_path=tmp_path / 'log.json', ranks_output=single))
    loopback = {'GLOO_SOCKET_IFNAME': 'lo'} if os.path.exists('/sys/class/net/lo') else {}
    completed = subprocess.run(
        [PYTHON, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(ROOT, 'ncf.py')] + flags(
             tiny_data, mode='test', checkpoint_dir=trained, precision='fp32', eval_mode='full',
             log_path=tmp_path / 'log.json', ranks_output=tmp_path / 'two.csv'),
        capture_output=True, text=True, env={**ENV, 'PYTHONPATH': ROOT, **loopback},
        timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / 'two.csv').read_text() == single.read_text()
