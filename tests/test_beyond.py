"""Beyond the reference: recommendations, full ranking, exact negatives, inference benchmark,
curves, torch.hub and TensorBoard, each end to end on tiny data on a CPU."""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

import checkpoints
import dataloading
import inference
import ncf
import runtime
from conftest import FP32, ROOT, TINY, assert_one_line_error, replace_tensor
from logger import plot
from logger.logger import read_log


def id_map(tiny_data, name):
    with open(os.path.join(tiny_data, name), newline='') as file:
        return [row[0] for row in csv.reader(file)][1:]


def fails(arguments, fragment, capsys, main=ncf.main):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 1
    assert_one_line_error(capsys.readouterr().err, fragment)


def load_trained_model(tiny_data, trained):
    dataset = dataloading.load_dataset(tiny_data, torch.device('cpu'))
    model = runtime.resolve('cpu', impl='eager').build_model(dataset.n_users, dataset.n_items,
                                                             8, [32, 16, 8], 0.5)
    path = os.path.join(trained, 'model.pth')
    checkpoints.load_model_state(model, checkpoints.read(path), path)
    return dataset, model.eval()


# ----------------------------------------------------------------------------------------------
# Recommendations

def test_recommend_all_users_never_recommends_a_training_item(tiny_data, trained, tmp_path):
    output = tmp_path / 'recs.csv'
    result = ncf.main(['--data', tiny_data, '--mode', 'recommend', '--checkpoint_dir', trained,
                       '-k', '5', '--output', str(output)] + FP32)
    assert (result['users'], result['rows']) == (300, 1500) and result['seconds'] > 0
    with open(output, newline='') as file:
        rows = list(csv.reader(file))
    assert rows[0] == ['user_id', 'rank', 'item_id', 'score']
    user_ids, item_ids = id_map(tiny_data, 'user_ids.csv'), id_map(tiny_data, 'item_ids.csv')
    dataset, model = load_trained_model(tiny_data, trained)
    trained_pairs = set(zip(dataset.train_users.tolist(), dataset.train_items.tolist()))
    user_index = {u: k for k, u in enumerate(user_ids)}
    item_index = {i: k for k, i in enumerate(item_ids)}
    by_user = {}
    for user, rank, item, score in rows[1:]:
        assert (user_index[user], item_index[item]) not in trained_pairs
        by_user.setdefault(user, []).append((int(rank), float(score), item))
    assert list(by_user) == user_ids  # every user, in the dataset's own ids
    for user, recs in by_user.items():
        assert [rank for rank, _, _ in recs] == [1, 2, 3, 4, 5]
        scores = [score for _, score, _ in recs]
        assert scores == sorted(scores, reverse=True) and 0 < scores[-1] <= scores[0] < 1
    # The top item is the best-scoring unseen item, by brute force.
    with torch.no_grad():
        scores = torch.sigmoid(model.all_item_scores(torch.arange(300)))
    for user in (0, 17, 299):
        unseen = [i for i in range(200) if (user, i) not in trained_pairs]
        best = max(unseen, key=lambda i: scores[user, i].item())
        assert by_user[user_ids[user]][0][2] == item_ids[best]
        assert by_user[user_ids[user]][0][1] == pytest.approx(scores[user, best].item(), abs=1e-5)


def test_recommend_chosen_users_to_stdout_skips_unknown_ones(tiny_data, trained, tmp_path,
                                                              capsys):
    user_ids = id_map(tiny_data, 'user_ids.csv')
    ncf.main(['--data', tiny_data, '--mode', 'recommend', '--checkpoint_dir', trained, '-k', '3',
              '--users', f'{user_ids[4]},nobody,{user_ids[0]}'] + FP32)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0] == 'user_id,rank,item_id,score' and len(lines) == 7
    assert [line.split(',')[0] for line in lines[1:]] == [user_ids[4]] * 3 + [user_ids[0]] * 3
    assert 'unknown user id nobody: skipped' in captured.err

    users_file = tmp_path / 'users.txt'
    users_file.write_text(f'user_id\n{user_ids[7]}\n')
    ncf.main(['--data', tiny_data, '--mode', 'recommend', '--checkpoint_dir', trained, '-k', '2',
              '--users_file', str(users_file)] + FP32)
    assert [line.split(',')[0] for line in capsys.readouterr().out.split()[1:]] == [user_ids[7]] * 2


def test_recommend_bad_inputs(tiny_data, trained, tmp_path, capsys):
    base = ['--data', tiny_data, '--mode', 'recommend'] + FP32
    fails(base + ['--checkpoint_dir', str(tmp_path / 'none')], 'model.pth does not exist', capsys)
    fails(base + ['--checkpoint_dir', trained, '--users', 'ghost,phantom'],
          'none of the requested users is in the dataset', capsys)
    fails(base + ['--checkpoint_dir', trained, '-k', '201'], 'larger than the catalogue (200',
          capsys)
    no_maps = tmp_path / 'no_maps'
    no_maps.mkdir()
    for name in os.listdir(tiny_data):
        if not name.endswith('_ids.csv'):
            os.symlink(os.path.join(tiny_data, name), no_maps / name)
    fails(['--data', str(no_maps), '--mode', 'recommend', '--checkpoint_dir', trained] + FP32,
          'user_ids.csv is missing', capsys)
    other = tmp_path / 'other.pth'
    torch.save({key: torch.zeros(5, *value.shape[1:]) if 'embed' in key else value
                for key, value in torch.load(os.path.join(trained, 'model.pth'),
                                             weights_only=True).items()}, other)
    fails(base + ['--load_checkpoint_path', str(other)], 'does not fit this model and data',
          capsys)
    fails(['--data', tiny_data, '--users', '1'] + FP32, 'are for --mode recommend', capsys)


# ----------------------------------------------------------------------------------------------
# Full-ranking evaluation

def brute_force_full_ranking(tiny_data, trained, k):
    dataset, model = load_trained_model(tiny_data, trained)
    trained_pairs = set(zip(dataset.train_users.tolist(), dataset.train_items.tolist()))
    with torch.no_grad():
        scores = model.all_item_scores(torch.arange(300)).tolist()
    hits = ndcg = 0.0
    for user, positive in enumerate(dataset.test_items.tolist()):
        rank = sum(scores[user][item] >= scores[user][positive] for item in range(200)
                   if item != positive and (user, item) not in trained_pairs)
        if rank < k:
            hits += 1
            ndcg += 1 / math.log2(rank + 2)
    return hits / 300, ndcg / 300


@pytest.mark.parametrize('k', [1, 10])
def test_full_ranking_matches_brute_force(tiny_data, trained, k):
    tested = ncf.main(['--data', tiny_data, '--mode', 'test', '--eval_mode', 'full',
                       '--checkpoint_dir', trained, '-k', str(k), '--log_path', os.devnull]
                      + FP32)
    hr, ndcg = brute_force_full_ranking(tiny_data, trained, k)
    assert tested['hr'] == pytest.approx(hr, abs=1e-9)
    assert tested['ndcg'] == pytest.approx(ndcg, abs=1e-6)
    sampled = ncf.main(['--data', tiny_data, '--mode', 'test', '--checkpoint_dir', trained,
                        '-k', str(k), '--log_path', os.devnull] + FP32)
    assert sampled['hr'] >= tested['hr']  # 50 sampled negatives are easier than 199 items


def test_full_ranking_in_training_and_under_torchrun(tiny_data, trained, tmp_path):
    result = ncf.main(['--data', tiny_data, '-e', '1', '--eval_mode', 'full', '--log_path',
                       str(tmp_path / 'log.json')] + FP32)
    assert 0 < result['best_hr'] < 1
    hr, _ = brute_force_full_ranking(tiny_data, trained, 10)
    completed = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(ROOT, 'ncf.py'), '--data', tiny_data, '--mode', 'test', '--eval_mode',
         'full', '--checkpoint_dir', trained, '--log_path', str(tmp_path / 'log2.json')] + FP32,
        capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert f'HR@10 = {hr:.4f}' in completed.stdout


# ----------------------------------------------------------------------------------------------
# Exact negatives

def test_exact_negatives_never_hit_a_positive_of_a_dense_dataset():
    generator = torch.Generator().manual_seed(0)
    dense = torch.rand(30, 12, generator=generator) < 0.7
    dense[:, 0] = False
    users, items = torch.nonzero(dense, as_tuple=True)
    exclusion = dataloading.ItemExclusion(users, items, 30, 12)
    batches = dataloading.TrainBatches(users, items, 12, 4, batch_size=64, exclusion=exclusion)
    approximate = dataloading.TrainBatches(users, items, 12, 4, batch_size=64)
    hits_of_approximate = 0
    for _ in range(50):
        u, i, labels = batches.epoch(generator)
        negatives = labels == 0
        assert not dense[u[negatives], i[negatives]].any()
        u, i, labels = approximate.epoch(generator)
        hits_of_approximate += int(dense[u[labels == 0], i[labels == 0]].sum())
    assert hits_of_approximate > 0  # the approximate sampler does hit positives here


def test_exact_negatives_end_to_end_and_impossible_case(tiny_data, tmp_path, capsys):
    result = ncf.main(['--data', tiny_data, '-e', '2', '--negative_sampling', 'exact'] + TINY)
    assert result['hrs'][-1] > 0.3
    # A user with every item among their training interactions has no negative to draw.
    data = tmp_path / 'data'
    os.makedirs(data)
    for name in os.listdir(tiny_data):
        os.symlink(os.path.join(tiny_data, name), data / name)
    train = torch.load(os.path.join(tiny_data, 'train_ratings.pt'), weights_only=True)
    everything = torch.stack([torch.zeros(200, dtype=torch.long), torch.arange(200)], 1)
    replace_tensor(data, 'train_ratings.pt', torch.cat([train, everything]))
    fails(['--data', str(data), '-e', '1', '--negative_sampling', 'exact'] + TINY,
          'user 0 (mapped id) has a training interaction with every item', capsys)


# ----------------------------------------------------------------------------------------------
# Inference benchmark

def test_inference_benchmark_random_and_checkpoint_weights(trained, tmp_path, capsys):
    log = tmp_path / 'inference.json'
    results = inference.main(['--n_users', '100', '--n_items', '50', '-f', '8', '--layers', '16',
                              '8', '--batch_sizes', '1,64,1000', '--num_batches', '5',
                              '--device', 'cpu', '--precision', 'fp32', '--log_path', str(log)])
    out = capsys.readouterr().out
    assert 'throughput avg' in out and 'p99' in out
    assert [r['batch_size'] for r in results] == [1, 64, 1000]
    for result in results:
        assert len(result['inference_latencies']) == 5
        assert result['p90_inference_latency'] <= result['p99_inference_latency']
        assert result['mean_inference_throughput'] > 0
    records = read_log(log)
    assert [r['step'] for r in records if r['step'] != 'PARAMETER'] == [[1], [64], [1000], []]

    from_checkpoint = inference.main(['--load_checkpoint_path', os.path.join(trained, 'model.pth'),
                                      '--batch_sizes', '32', '--num_batches', '2', '--device',
                                      'cpu', '--precision', 'bf16', '--log_path', str(log)])
    assert from_checkpoint[0]['batch_size'] == 32
    assert ('NeuMF 300 users x 200 items, factors 8, layers [32, 16, 8], checkpoint weights; '
            'Precision: bf16') in capsys.readouterr().out


def test_inference_bad_inputs(tmp_path, capsys):
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'junk')
    fails(['--load_checkpoint_path', str(corrupt), '--log_path', str(tmp_path / 'l.json')],
          'is not a checkpoint: not a file torch.save writes', capsys, main=inference.main)
    fails(['--batch_sizes', '1,x', '--log_path', str(tmp_path / 'l.json')],
          '--batch_sizes must be comma-separated integers', capsys, main=inference.main)
    torch.save({'a': torch.zeros(1)}, tmp_path / 'foreign.pth')
    fails(['--load_checkpoint_path', str(tmp_path / 'foreign.pth')], 'not a NeuMF state dict',
          capsys, main=inference.main)


# ----------------------------------------------------------------------------------------------
# Curves, torch.hub, TensorBoard

def test_plot_writes_a_png_from_one_or_several_logs(trained, tmp_path, capsys):
    pytest.importorskip('matplotlib')
    log = os.path.join(trained, 'log.json')
    for logs in ([log], [log, log]):
        output = tmp_path / f'curves{len(logs)}.png'
        plot.main(logs + ['-o', str(output)] + (['--labels', 'a', 'b'] if len(logs) == 2 else []))
        data = output.read_bytes()
        assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 10000
        import matplotlib.image
        assert matplotlib.image.imread(output).shape[:2] == (825, 1210)
    not_a_log = tmp_path / 'notes.json'
    not_a_log.write_text('{"hello": 1}\n')
    fails([str(not_a_log), '-o', str(tmp_path / 'x.png')], 'is not a training log', capsys,
          main=plot.main)
    assert not (tmp_path / 'x.png').exists()
    fails([str(tmp_path / 'missing.json')], 'does not exist', capsys, main=plot.main)


def test_plot_without_matplotlib_says_so(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    fails([os.path.join(trained, 'log.json'), '-o', str(tmp_path / 'x.png')],
          'needs matplotlib: pip install matplotlib', capsys, main=plot.main)


def test_torch_hub_entry_point(trained):
    checkpoint = os.path.join(trained, 'model.pth')
    model = torch.hub.load(ROOT, 'neumf', source='local', checkpoint=checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    fresh = torch.hub.load(ROOT, 'neumf', source='local', nb_users=7, nb_items=5, mf_dim=4,
                           mlp_layer_sizes=(8, 4))
    assert fresh.mf_user_embed.weight.shape == (7, 4)


def test_tensorboard_scalars(tiny_data, tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = ncf.main(['--data', tiny_data, '-e', '2', '--tensorboard', str(tmp_path / 'tb')]
                      + TINY)
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    for tag in ('hr@10', 'ndcg@10', 'train_loss', 'validation_loss', 'train_throughput'):
        assert tag in events.Tags()['scalars']
    assert [e.value for e in events.Scalars('hr@10')] == pytest.approx(result['hrs'])


def test_tensorboard_missing_is_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    fails(['--data', tiny_data, '-e', '1', '--tensorboard', str(tmp_path / 'tb')] + TINY,
          'needs the tensorboard package', capsys)
    assert not (tmp_path / 'tb').exists()


def test_inference_compiles_once_for_any_batch_size(tmp_path, capsys):
    """Nine batch sizes (one more than Dynamo recompiles a static function for before it runs
    it eager): the scoring forward is compiled for a dynamic batch, not once per size."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    sizes = [1, 2, 3, 5, 8, 13, 21, 34, 55]
    results = inference.main(['--n_users', '40', '--n_items', '30', '-f', '4', '--layers', '8',
                              '4', '--batch_sizes', ','.join(map(str, sizes)), '--num_batches',
                              '1', '--warmup', '1', '--device', 'cpu', '--precision', 'fp32',
                              '--impl', 'compile', '--log_path', str(tmp_path / 'log.json')])
    assert [result['batch_size'] for result in results] == sizes
    # batch 1 is its own graph (Dynamo specialises sizes 0 and 1), every other size one more
    assert counters['stats']['unique_graphs'] <= 2
    assert not counters['graph_break']
    torch._dynamo.reset()
