"""ItemExclusion: draws items outside each user's training set, exactly and uniformly."""
import torch

from dataloading import ItemExclusion


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


def test_contains_and_repeated_pairs():
    exclusion = ItemExclusion(torch.tensor([1, 0, 1, 1]), torch.tensor([3, 2, 0, 3]), 3, 4)
    assert exclusion.counts.tolist() == [1, 2, 0]
    users = torch.tensor([0, 0, 1, 1, 1, 2])
    items = torch.tensor([2, 3, 0, 3, 1, 0])
    assert exclusion.contains(users, items).tolist() == [True, False, True, True, False, False]
    assert ItemExclusion(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
                         2, 3).contains(users[:2], items[:2]).tolist() == [False, False]
