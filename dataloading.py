"""Cached dataset files, and drawing items a user has not interacted with."""
import torch

# The cache convert.py writes and ncf.py reads (one directory per dataset).
TRAIN_FILE = 'train_ratings.pt'        # int64 [n_train, 2]: user, item
TEST_FILE = 'test_ratings.pt'          # int64 [n_users, 2]: row u holds user u's test positive
TEST_NEGATIVES_FILE = 'test_negatives.pt'  # int64 [n_users, valid_negative]
METADATA_FILE = 'metadata.json'        # written last: a cache without it is not trusted
USER_IDS_FILE = 'user_ids.csv'         # line k (after the header) holds the original id of user k
ITEM_IDS_FILE = 'item_ids.csv'


class ItemExclusion:
    """Each user's set of training items, for drawing uniformly from the items outside it.

    Built from (user, item) pairs without a dense users x items mask (ML-20m would need 3.7 GB
    for one): the pairs are kept as sorted keys ``user * n_items + item``. To draw the r-th item
    a user has *not* interacted with, note that if the user's items are s_0 < s_1 < ..., the r-th
    free item is ``r + #{j : s_j - j <= r}``; the values ``s_j - j`` are non-decreasing within a
    user, so one binary search over all users' keys finds that count for every draw at once.
    Exact and uniform, with no rejection loop, on whatever device the pairs are on.
    """

    def __init__(self, users, items, n_users, n_items):
        self.n_users, self.n_items = n_users, n_items
        keys = users.long() * n_items
        keys += items.long()
        if keys.is_cpu:
            keys.numpy().sort()  # in place: no second copy, and numpy's CPU sort is the fastest
        else:
            keys = torch.sort(keys).values
        if len(keys) > 1 and bool((keys[1:] == keys[:-1]).any()):
            keys = torch.unique_consecutive(keys)
        self.keys = keys
        key_users = keys // n_items
        self.counts = torch.bincount(key_users, minlength=n_users)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        # user * n_items + (s_j - j), with j the rank of item s_j among the user's items:
        # sorted, since s_j - j never decreases within a user
        shifted = torch.arange(len(keys), device=keys.device).neg_()
        shifted += keys
        shifted += self.starts[key_users]
        self.shifted_keys = shifted
        self.free_counts = n_items - self.counts

    def sample(self, users, generator=None):
        """One item per entry of `users`, uniform over the items that user has no pair with.

        Every user asked for must have at least one free item (see `free_counts`).
        """
        users = users.long()
        free = self.free_counts[users]
        # float64 keeps the draw uniform for catalogues far beyond 2^24 items
        draw = torch.rand(users.shape, generator=generator, dtype=torch.float64, device=users.device)
        rank = torch.minimum((draw * free).long(), free - 1)
        position = torch.searchsorted(self.shifted_keys, users * self.n_items + rank, right=True)
        return rank + (position - self.starts[users])

    def contains(self, users, items):
        """Boolean mask: whether each (user, item) pair is one of the pairs given."""
        query = users.long() * self.n_items + items.long()
        if len(self.keys) == 0:
            return torch.zeros_like(query, dtype=torch.bool)
        position = torch.searchsorted(self.keys, query).clamp_(max=len(self.keys) - 1)
        return self.keys[position] == query
