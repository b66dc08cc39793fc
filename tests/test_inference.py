"""inference.py: latency and throughput per batch size, with random or a checkpoint's weights,
compiled once for any batch size; every bad input in one line, nothing changed."""
import os

import pytest
import torch

import inference
from conftest import fails, make_world, snapshot
from logger.logger import read_log


def bench(log, **overrides):
    """inference.py's argv: a tiny model on the CPU in fp32, with `overrides` by flag name."""
    settings = {'n_users': 50, 'n_items': 40, 'factors': 4, 'layers': [8, 4], 'device': 'cpu',
                'precision': 'fp32', 'num_batches': 1, 'batch_sizes': '8', 'log_path': log,
                **overrides}
    argv = []
    for name, value in settings.items():
        if value is None:
            continue
        argv.append(f'--{name}')
        if value is not True:
            argv += [str(item) for item in value] if isinstance(value, list) else [str(value)]
    return argv


def test_inference_benchmark_random_and_checkpoint_weights(trained, tmp_path, capsys):
    log = tmp_path / 'inference.json'
    results = inference.main(bench(log, n_users=100, n_items=50, factors=8, layers=[16, 8],
                                   batch_sizes='1,64,1000', num_batches=5))
    out = capsys.readouterr().out
    assert 'throughput avg' in out and 'p99' in out
    assert [r['batch_size'] for r in results] == [1, 64, 1000]
    for result in results:
        assert len(result['inference_latencies']) == 5
        assert result['p90_inference_latency'] <= result['p99_inference_latency']
        assert result['mean_inference_throughput'] > 0
    records = read_log(log)
    assert [r['step'] for r in records if r['step'] != 'PARAMETER'] == [[1], [64], [1000], []]

    from_checkpoint = inference.main(bench(
        log, load_checkpoint_path=os.path.join(trained, 'model.pth'), n_users=None,
        n_items=None, factors=None, layers=None, batch_sizes='32', num_batches=2,
        precision='bf16'))
    assert from_checkpoint[0]['batch_size'] == 32
    assert ('neumf (factors 8, layers [32, 16, 8]), 300 users x 200 items, checkpoint weights; '
            'Precision: bf16') in capsys.readouterr().out


def test_inference_compiles_once_for_any_batch_size(tmp_path, capsys):
    """Nine batch sizes (one more than Dynamo recompiles a static function for before it runs
    it eager): the scoring forward is compiled for a dynamic batch, not once per size."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    sizes = [1, 2, 3, 5, 8, 13, 21, 34, 55]
    results = inference.main(bench(tmp_path / 'log.json', batch_sizes=','.join(map(str, sizes)),
                                   warmup=1, impl='compile'))
    assert [result['batch_size'] for result in results] == sizes
    # batch 1 is its own graph (Dynamo specialises sizes 0 and 1), every other size one more
    assert counters['stats']['unique_graphs'] <= 2
    assert not counters['graph_break']
    torch._dynamo.reset()


def replace(path, content):
    os.remove(path)
    with open(path, 'wb') as file:
        file.write(content)


# With a checkpoint, the sizes are its own: the flags that would contradict it left out.
SIZES_FROM_IT = {'n_users': None, 'n_items': None, 'factors': None, 'layers': None}

CASES = {  # name: (flags, setup(world) or None, exit status, fragment)
    'log_path is a directory': ({'log_path': '{world}/data'}, None, 1, 'is a directory'),
    'log_path is the checkpoint': ({'log_path': '{world}/ck/model.pth',
                                    'load_checkpoint_path': '{world}/ck/model.pth'}, None, 1,
                                   'is --load_checkpoint_path, which this run reads'),
    'zero-byte checkpoint': ({'load_checkpoint_path': '{world}/ck/model.pth'},
                             lambda w: replace(f'{w}/ck/model.pth', b''), 1,
                             'is empty (0 bytes)'),
    'a foreign file as the checkpoint': ({'load_checkpoint_path': '{world}/data/metadata.json'},
                                         None, 1,
                                         'is not a checkpoint: not a file torch.save writes'),
    'a state dict of something else': ({'load_checkpoint_path': '{world}/foreign.pth'},
                                       lambda w: torch.save({'a': torch.zeros(1)},
                                                            f'{w}/foreign.pth'), 1,
                                       'holds no model of the family'),
    'another model than the checkpoint': ({'load_checkpoint_path': '{world}/ck/model.pth',
                                           'model': 'gmf', **SIZES_FROM_IT}, None, 1,
                                          '--model gmf, but {world}/ck/model.pth holds --model '
                                          'neumf (factors 8, layers [32, 16, 8]) over 300 users'),
    'other tables than the checkpoint': ({'load_checkpoint_path': '{world}/ck/model.pth',
                                          **SIZES_FROM_IT, 'n_items': 7}, None, 1,
                                         '--n_items 7, but'),
    'a directory as the checkpoint': ({'load_checkpoint_path': '{world}/ck'}, None, 1,
                                      'is a directory, not a checkpoint file'),
    'bad batch sizes': ({'batch_sizes': '1,x'}, None, 1, 'comma-separated integers'),
    'no batches': ({'num_batches': 0}, None, 1, '--num_batches must be positive'),
    'fp16 on a CPU': ({'precision': 'fp16'}, None, 1, 'fp16 needs CUDA'),
    'odd first layer': ({'layers': [33, 16]}, None, 1, 'must be even'),
    'negative table size': ({'n_users': -3}, None, 1, 'must be positive'),
    'plain and compile': ({'plain': True, 'impl': 'compile'}, None, 2,
                          '--plain means --impl eager'),
}


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(name, tiny_data, trained, tmp_path, capsys):
    overrides, setup, code, fragment = CASES[name]
    world = make_world(tmp_path, tiny_data, trained)
    if setup:
        setup(world)
    before = snapshot(world)
    argv = bench(f'{world}/inference.json', **{
        key: value.format(world=world) if isinstance(value, str) else value
        for key, value in overrides.items()})
    fails(inference.main, argv, capsys, fragment.format(world=world), code=code)
    assert snapshot(world) == before


def test_a_batch_larger_than_memory_is_one_line(tmp_path, capsys):
    """Not bad input found before the work, a fault during it: one line naming the batch
    size; the log keeps the batch sizes measured before it."""
    fails(inference.main, bench(tmp_path / 'log.json', batch_sizes='8,100000000000'), capsys,
          'out of memory at batch size 100000000000 on cpu')
    assert [r['step'] for r in read_log(tmp_path / 'log.json')
            if r['step'] != 'PARAMETER'] == [[8]]
