"""dataloading.py: the cache loaded and checked (a file changed behind metadata.json, a wrong
shape, dtype or id, a count that disagrees), exact and uniform sampling outside each user's
items, and the epoch's batches as every rank slices them."""
import json
import os
import shutil

import pytest
import torch

import dataloading
import ncf
from conftest import fails, flags, replace_tensor
from dataloading import Dataset, ItemExclusion, TrainBatches
from logger.logger import read_log
from ncflib import runtime
from ncflib.cli import UsageError


def positives(users, items, n_items):
    """A Dataset of these training pairs only (what TrainBatches reads)."""
    return Dataset(train_users=users, train_items=items, test_items=None, test_negatives=None,
                   n_users=int(users.max()) + 1, n_items=n_items, metadata={})


def plan_of(rank=0, world_size=1):
    plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl='eager'),
                           processes=runtime.Processes(rank=rank, world_size=world_size))
    return plan


def dense_pairs(n_users, n_items, density, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_users, n_items, generator=generator) < density
    mask[:, 0] = False  # every user keeps at least one free item
    users, items = torch.nonzero(mask, as_tuple=True)
    return mask, users, items


def test_samples_never_hit_a_pair_and_cover_every_free_item():
    mask, users, items = dense_pairs(50, 40, 0.85, seed=0)
    exclusion = ItemExclusion(users, items, 50, 40)
    assert exclusion.free_counts.tolist() == (~mask).sum(1).tolist()
    queries = torch.arange(50).repeat_interleave(2000)
    drawn = exclusion.sample(queries, torch.Generator().manual_seed(1))
    assert not mask[queries, drawn].any()
    seen = torch.zeros_like(mask)
    seen[queries, drawn] = True
    assert torch.equal(seen, ~mask)


def test_samples_are_uniform_over_free_items():
    # One user with items {1, 2, 5} taken out of 8: the other five should come up equally often.
    exclusion = ItemExclusion(torch.tensor([0, 0, 0]), torch.tensor([5, 1, 2]), 1, 8)
    drawn = exclusion.sample(torch.zeros(50000, dtype=torch.long), torch.Generator().manual_seed(3))
    counts = torch.bincount(drawn, minlength=8).float()
    assert counts[[1, 2, 5]].sum() == 0
    free = counts[[0, 3, 4, 6, 7]]
    expected = 50000 / 5
    chi_square = ((free - expected) ** 2 / expected).sum()
    assert chi_square < 18.5  # p = 0.001 with 4 degrees of freedom


def test_distinct_samples_are_distinct_free_and_every_set_equally_likely():
    """sample_distinct: `count` distinct free items per user, each set of them equally likely,
    for a roomy user (repeats drawn again) and a crowded one (random keys over all its free
    items)."""
    import itertools

    # user 0: items {1, 2, 5} taken out of 8, 5 free for 3 draws (crowded: under 2 x 3);
    # user 1: item 0 taken out of 8, 7 free (roomy); then a dense random case
    exclusion = ItemExclusion(torch.tensor([0, 0, 0, 1]), torch.tensor([5, 1, 2, 0]), 2, 8)
    generator = torch.Generator().manual_seed(5)
    sets = {0: {}, 1: {}}
    rounds = 6000
    for _ in range(rounds // 100):
        drawn = exclusion.sample_distinct(torch.tensor([0, 1] * 100), 3, generator)
        for user, row in zip([0, 1] * 100, drawn.tolist()):
            assert len(set(row)) == 3
            key = tuple(sorted(row))
            sets[user][key] = sets[user].get(key, 0) + 1
    for user, free in ((0, [0, 3, 4, 6, 7]), (1, [1, 2, 3, 4, 5, 6, 7])):
        possible = list(itertools.combinations(free, 3))
        assert set(sets[user]) == set(possible)  # never a taken item, every pair seen
        expected = rounds / len(possible)
        chi_square = sum((count - expected) ** 2 / expected for count in sets[user].values())
        # p = 0.001 with 9 and 34 degrees of freedom
        assert chi_square < {0: 27.9, 1: 65.2}[user], (user, chi_square)
    mask, users, items = dense_pairs(50, 40, 0.5, seed=2)
    exclusion = ItemExclusion(users, items, 50, 40)
    count = int(exclusion.free_counts.min())
    drawn = exclusion.sample_distinct(torch.arange(50), count, torch.Generator().manual_seed(0))
    assert not mask[torch.arange(50)[:, None], drawn].any()
    assert all(len(set(row)) == count for row in drawn.tolist())


def test_contains_and_repeated_pairs():
    exclusion = ItemExclusion(torch.tensor([1, 0, 1, 1]), torch.tensor([3, 2, 0, 3]), 3, 4)
    assert exclusion.counts.tolist() == [1, 2, 0]
    users = torch.tensor([0, 0, 1, 1, 1, 2])
    items = torch.tensor([2, 3, 0, 3, 1, 0])
    assert exclusion.contains(users, items).tolist() == [True, False, True, True, False, False]
    assert ItemExclusion(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
                         2, 3).contains(users[:2], items[:2]).tolist() == [False, False]


def test_sampler_draws_every_positive_once_and_ranks_split_the_global_batch():
    users = torch.arange(10).repeat_interleave(3)
    items = torch.arange(30) % 7
    single = TrainBatches(positives(users, items, 7), plan_of(), batch_size=40,
                          negative_samples=3)
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
        batches = TrainBatches(positives(users, items, 7), plan_of(rank, 2), 40, 3,
                               grads_accumulated=2)
        assert batches.micro_slices == [slice(0, 10), slice(10, 20)] and batches.steps == 3
        slices.append(batches.epoch(torch.Generator().manual_seed(0)))
    for single_part, part0, part1 in zip((u, i, labels), *slices):
        assert torch.equal(torch.cat((part0, part1), dim=1), single_part)


def test_even_split():
    assert dataloading.even_split(2 ** 20, 64) == [16384] * 64
    assert dataloading.even_split(1009, 4) == [253, 252, 252, 252]
    assert sum(dataloading.even_split(12345, 7)) == 12345


def test_exact_negatives_never_hit_a_positive_of_a_dense_dataset():
    generator = torch.Generator().manual_seed(0)
    dense = torch.rand(30, 12, generator=generator) < 0.7
    dense[:, 0] = False
    users, items = torch.nonzero(dense, as_tuple=True)
    exclusion = ItemExclusion(users, items, 30, 12)
    batches = TrainBatches(positives(users, items, 12), plan_of(), 64, 4, exclusion=exclusion)
    approximate = TrainBatches(positives(users, items, 12), plan_of(), 64, 4)
    hits_of_approximate = 0
    for _ in range(50):
        u, i, labels = batches.epoch(generator)
        negatives = labels == 0
        assert not dense[u[negatives], i[negatives]].any()
        u, i, labels = approximate.epoch(generator)
        hits_of_approximate += int(dense[u[labels == 0], i[labels == 0]].sum())
    assert hits_of_approximate > 0  # the approximate sampler does hit positives here


def test_exact_negatives_end_to_end_and_impossible_case(tiny_data, tmp_path, capsys):
    result = ncf.main(flags(tiny_data, epochs=2, negative_sampling='exact'))
    assert result['hrs'][-1] > 0.3
    # A user with every item among their training interactions has no negative to draw.
    data = tmp_path / 'data'
    os.makedirs(data)
    for name in os.listdir(tiny_data):
        os.symlink(os.path.join(tiny_data, name), data / name)
    train = torch.load(os.path.join(tiny_data, 'train_ratings.pt'), weights_only=True)
    everything = torch.stack([torch.zeros(200, dtype=torch.long), torch.arange(200)], 1)
    replace_tensor(data, 'train_ratings.pt', torch.cat([train, everything]))
    fails(ncf.main, flags(data, epochs=1, negative_sampling='exact'), capsys,
          'user 0 (mapped id) has a training interaction with every item')


def test_valid_negative_other_than_the_cache_draws_new_negatives(tiny_data, tmp_path, capsys):
    result = ncf.main(flags(tiny_data, epochs=1, log_path=tmp_path / 'log.json',
                            valid_negative=20))
    out = capsys.readouterr().out
    assert 'Drawing 20 test negatives per user (recipe) with seed 1 (the cache has 50)' in out
    logged = [r['data']['dataset'] for r in read_log(tmp_path / 'log.json')
              if 'dataset' in r['data']]
    assert 'drawn at load time with seed 1 (the cache has 50)' in logged[0]['test_negatives']
    assert 0 < result['best_hr'] <= 1
    dataset = dataloading.load_dataset(tiny_data, torch.device('cpu'), valid_negative=20)
    assert dataset.test_negatives.shape == (300, 20)
    exclusion = ItemExclusion(dataset.train_users, dataset.train_items, 300, 200)
    users = torch.arange(300)[:, None].expand(-1, 20)
    assert not exclusion.contains(users, dataset.test_negatives).any()


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
    fails(ncf.main, flags(data_dir, epochs=1, checkpoint_dir=tmp_path / 'ck'), capsys, fragment)
    assert not (tmp_path / 'ck').exists()  # nothing written


def test_a_tampered_cache_is_refused(tiny_data, trained, tmp_path, capsys):
    """Each tensor's sha256, the counts and the id maps' sha256 in metadata.json are checked:
    negatives set to the positive once gave HR 1.0; swapped id lines exchanged two users'
    recommendations."""
    def copy(name):
        shutil.copytree(tiny_data, tmp_path / name)
        return tmp_path / name

    def refused(data, fragment, mode='test'):
        fails(ncf.main, flags(data, mode=mode, checkpoint_dir=trained, precision='fp32'),
              capsys, fragment)

    data = copy('negatives')
    test = torch.load(data / 'test_ratings.pt', weights_only=True)
    os.remove(data / 'test_negatives.pt')
    # every negative is the positive
    torch.save(test[:, 1:].expand(-1, 50).contiguous(), data / 'test_negatives.pt')
    refused(data, 'test_negatives.pt has changed since convert.py wrote it')

    data = copy('counts')
    metadata = json.loads((data / 'metadata.json').read_text())
    metadata['n_train'] += 1
    (data / 'metadata.json').write_text(json.dumps(metadata))
    refused(data, f'says n_train {metadata["n_train"]}, but the tensors hold '
                  f'{metadata["n_train"] - 1}')

    data = copy('ids')
    lines = (data / 'user_ids.csv').read_text().splitlines(keepends=True)
    lines[1], lines[2] = lines[2], lines[1]
    (data / 'user_ids.csv').write_text(''.join(lines))
    refused(data, 'user_ids.csv or item_ids.csv in', mode='recommend')


def test_the_notice_of_a_cache_without_digests_is_said_only_where_they_are_missing(
        tiny_data, tmp_path):
    """A metadata.json whose version was edited to 2 still holds the tensors' digests, and
    they are checked: no notice claims otherwise."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    metadata = json.loads((data / 'metadata.json').read_text())
    (data / 'metadata.json').write_text(json.dumps({**metadata, 'version': 2}))
    said = []
    dataloading.load_dataset(str(data), torch.device('cpu'), log=said.append)
    assert not said
    os.remove(data / 'test_negatives.pt')
    torch.save(torch.zeros(300, 50, dtype=torch.long), data / 'test_negatives.pt')
    with pytest.raises(UsageError, match='test_negatives.pt has changed since convert.py'):
        dataloading.load_dataset(str(data), torch.device('cpu'), log=said.append)


def test_popularity_negatives_follow_training_interactions_outside_each_users_pairs():
    """--test_negative_sampling popularity (RecBole's popN): never one of the user's pairs, and
    among the others in proportion to each item's training interactions; a user who has every
    popular item has none to draw (one line)."""
    # item i has i + 1 training interactions (by users 1..), user 0 holds items 0..3
    items = torch.cat([torch.full((i + 1,), i) for i in range(8)])
    users = torch.cat([torch.tensor([0, 0, 0, 0]), torch.arange(1, len(items) + 1)])
    items = torch.cat([torch.arange(4), items])
    exclusion = ItemExclusion(users, items, len(items) + 1, 8)
    drawn = dataloading.draw_test_negatives(exclusion, 20_000, torch.Generator().manual_seed(3),
                                            'popularity', popular=items)
    assert not exclusion.contains(torch.zeros(20_000, dtype=torch.long), drawn[0]).any()
    counts = torch.bincount(drawn[0], minlength=8)[4:].double()
    weights = torch.arange(5, 9, dtype=torch.float64)  # items 4..7 (user 0's pairs count too)
    expected = 20_000 * weights / weights.sum()
    assert ((counts - expected).abs() < 4 * expected.sqrt()).all(), (counts, expected)
    everything = ItemExclusion(torch.zeros(8, dtype=torch.long), torch.arange(8), 1, 8)
    with pytest.raises(UsageError, match='every item that has a training interaction'):
        dataloading.draw_test_negatives(everything, 2, torch.Generator(), 'popularity',
                                        popular=items)


def test_popularity_training_negatives_follow_training_interactions():
    """--negative_sampling popularity: each negative is a random training pair's item."""
    items = torch.cat([torch.full((4 * (i + 1),), i) for i in range(5)])  # item i: 4(i + 1)
    users = torch.arange(len(items)) % 7
    batches = TrainBatches(positives(users, items, 9), plan_of(), 60, 3, popularity=True)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(9, dtype=torch.float64)
    for _ in range(200):
        _, drawn, labels = batches.epoch(generator)
        counts += torch.bincount(drawn[labels == 0], minlength=9).double()
    assert counts[5:].sum() == 0  # items without a training interaction are never drawn
    expected = counts.sum() * torch.arange(1, 6, dtype=torch.float64) / 15
    assert ((counts[:5] - expected).abs() < 4 * expected.sqrt()).all(), (counts, expected)
