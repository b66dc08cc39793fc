"""--mode recommend (ncflib/recommend.py): each user's top-K items outside their training
items, in the dataset's own ids, checked against brute force; the users asked for; bad input."""
import csv
import os

import pytest
import torch

import dataloading
import ncf
from conftest import fails, flags, load_trained_model
from ncflib import recommend as recommendations
from ncflib import runtime


def id_map(tiny_data, name):
    with open(os.path.join(tiny_data, name), newline='') as file:
        return [row[0] for row in csv.reader(file)][1:]


def recommend(data, trained, **overrides):
    return flags(data, mode='recommend', checkpoint_dir=trained, precision='fp32', **overrides)


def test_recommend_all_users_never_recommends_a_training_item(tiny_data, trained, tmp_path):
    output = tmp_path / 'recs.csv'
    result = ncf.main(recommend(tiny_data, trained, topk=5, output=output))
    assert (result['users'], result['rows']) == (300, 1500) and result['seconds'] > 0
    assert result['compile_seconds'] == 0  # cpu_fused compiles nothing
    with open(output, newline='') as file:
        rows = list(csv.reader(file))
    assert rows[0] == ['user_id', 'rank', 'item_id', 'score']
    user_ids, item_ids = id_map(tiny_data, 'user_ids.csv'), id_map(tiny_data, 'item_ids.csv')
    _, dataset, model = load_trained_model(tiny_data, trained)
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
    ncf.main(recommend(tiny_data, trained, topk=3,
                       users=f'{user_ids[4]},nobody,{user_ids[0]},{user_ids[4]}'))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0] == 'user_id,rank,item_id,score' and len(lines) == 7
    assert [line.split(',')[0] for line in lines[1:]] == [user_ids[4]] * 3 + [user_ids[0]] * 3
    assert captured.err.splitlines()[:2] == [
        'ncf.py: warning: unknown user id nobody: skipped',
        f'ncf.py: warning: user id {user_ids[4]} is listed more than once: recommended once']

    users_file = tmp_path / 'users.txt'
    users_file.write_text(f'user_id\n{user_ids[7]}\n')
    ncf.main(recommend(tiny_data, trained, topk=2, users_file=users_file))
    assert [line.split(',')[0] for line in capsys.readouterr().out.split()[1:]] == [user_ids[7]] * 2


def test_recommend_into_a_new_directory(tiny_data, trained, tmp_path):
    output = tmp_path / 'new' / 'dir' / 'recs.csv'
    ncf.main(recommend(tiny_data, trained, topk=2, output=output))
    assert output.read_text().splitlines()[0] == 'user_id,rank,item_id,score'


def test_recommend_bad_inputs(tiny_data, trained, tmp_path, capsys):
    fails(ncf.main, recommend(tiny_data, tmp_path / 'none'), capsys, 'model.pth does not exist')
    fails(ncf.main, recommend(tiny_data, trained, users='ghost,phantom'), capsys,
          'none of the requested users is in the dataset')
    fails(ncf.main, recommend(tiny_data, trained, users='1', users_file='users.txt'), capsys,
          'give --users or --users_file, not both')
    fails(ncf.main, recommend(tiny_data, trained, users_file=tmp_path / 'none.txt'), capsys,
          'none.txt does not exist')
    fails(ncf.main, recommend(tiny_data, trained, topk=201), capsys,
          'larger than the catalogue (200')
    no_maps = tmp_path / 'no_maps'
    no_maps.mkdir()
    for name in os.listdir(tiny_data):
        if not name.endswith('_ids.csv'):
            os.symlink(os.path.join(tiny_data, name), no_maps / name)
    fails(ncf.main, recommend(no_maps, trained), capsys, 'user_ids.csv is missing')
    other = tmp_path / 'other.pth'
    torch.save({key: torch.zeros(5, *value.shape[1:]) if 'embed' in key else value
                for key, value in torch.load(os.path.join(trained, 'model.pth'),
                                             weights_only=True).items()}, other)
    fails(ncf.main, recommend(tiny_data, trained, load_checkpoint_path=other), capsys,
          'does not fit this model and data')


def test_recommendations_compiled_equal_eager(tiny_data, trained):
    """--impl compile's recommendations: all_item_scores under torch.compile (fullgraph,
    static shapes: two chunks of 60 users, the shape full ranking's test compiles) picks
    eager's top items."""
    _, dataset, model = load_trained_model(tiny_data, trained)
    exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                          dataset.n_users, dataset.n_items)
    users = list(range(dataset.n_users - 1, 0, -2))[:120]  # descending, as a user may ask
    found = {}
    for impl in ('eager', 'compile'):
        plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl=impl),
                               valid_batch_size=60 * dataset.n_items)
        found[impl] = recommendations.recommend(plan, model, exclusion, users, 10)
    (items, logits, compiling), (eager_items, eager_logits, eager_compiling) = (
        found['compile'], found['eager'])
    assert compiling > 0 and eager_compiling == 0  # timed apart from the scoring
    assert torch.equal(items, eager_items)
    assert torch.allclose(logits, eager_logits, rtol=1e-5, atol=1e-6)
