"""The cached dataset on the device: loading, negative sampling, batching and test candidates."""
import dataclasses
import os

import torch

from ncflib.cache import (METADATA_FILE, TEST_FILE, TEST_NEGATIVES_FILE, TRAIN_FILE, check_counts,
                          fingerprint, read_metadata, tensor_sha256)
from ncflib.cli import UsageError
from ncflib.files import torch_load


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
        draw = torch.rand(users.shape, generator=generator, dtype=torch.float64,
                          device=users.device)
        rank = torch.minimum((draw * free).long(), free - 1)
        position = torch.searchsorted(self.shifted_keys, users * self.n_items + rank, right=True)
        return rank + (position - self.starts[users])

    def key_bounds(self, first, last):
        """Where the keys of each user from `first` to `last` start, as host integers: element j
        for user first + j, the last one where user last - 1's keys end. One synchronisation,
        for a caller that then slices the keys of contiguous users without any."""
        if first >= self.n_users:
            return [len(self.keys)]
        ends = torch.cumsum(self.counts[first:last], 0) + self.starts[first]
        return [int(self.starts[first])] + ends.tolist()

    def pairs_of(self, users):
        """(row, item) of every pair of the given users; row is the user's position in `users`.

        Sizing the result reads one count on the host: call it per chunk, not per sample.
        """
        users = users.long()
        counts = self.counts[users]
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)
        first_of_row = torch.cumsum(counts, 0) - counts
        rank_in_user = torch.arange(len(rows), device=users.device) - first_of_row[rows]
        return rows, self.keys[self.starts[users][rows] + rank_in_user] % self.n_items

    def contains(self, users, items):
        """Boolean mask: whether each (user, item) pair is one of the pairs given."""
        query = users.long() * self.n_items + items.long()
        if len(self.keys) == 0:
            return torch.zeros_like(query, dtype=torch.bool)
        position = torch.searchsorted(self.keys, query).clamp_(max=len(self.keys) - 1)
        return self.keys[position] == query


@dataclasses.dataclass
class Dataset:
    """The cached split, on one device: training pairs, test positives and test negatives."""
    train_users: torch.Tensor     # [n_train]
    train_items: torch.Tensor     # [n_train]
    test_items: torch.Tensor      # [n_users]: user u's test positive
    test_negatives: torch.Tensor  # [n_users, valid_negative]
    n_users: int
    n_items: int
    metadata: dict                # metadata.json's

    @property
    def fingerprint(self):
        """The data's identity, recorded in checkpoints (convert.py's, from cache version 2)."""
        return self.metadata.get('fingerprint')

    @property
    def fingerprint_without_split(self):
        """What a cache of version 2 of the same ratings and ids had as its fingerprint."""
        source, id_maps = (self.metadata.get(key) for key in ('source_sha256', 'id_maps_sha256'))
        if isinstance(source, str) and isinstance(id_maps, str):
            return fingerprint(source, id_maps)
        return None


def _load_tensor(path, device, recorded):
    """The tensor in `path`, on `device`, checked against what metadata.json `recorded` of it
    ({'shape': ..., 'sha256': ...}; None for a cache older than version 3)."""
    if not os.path.isfile(path):
        raise UsageError(f'{path} is missing: run prepare_dataset.sh or convert.py first')
    if os.path.getsize(path) == 0:
        raise UsageError(f'{path} is empty (0 bytes): run prepare_dataset.sh or convert.py again')
    tensor = torch_load(path, 'tensor file', map_location='cpu')
    if not isinstance(tensor, torch.Tensor):
        raise UsageError(f'{path} holds a {type(tensor).__name__}, not a tensor')
    if recorded is not None and (list(tensor.shape) != recorded.get('shape')
                                 or tensor_sha256(tensor) != recorded.get('sha256')):
        raise UsageError(f'{path} has changed since convert.py wrote it (its shape or sha256 is '
                         f'not what {METADATA_FILE} records): run prepare_dataset.sh or '
                         'convert.py again')
    return tensor.to(device)


def _check(tensor, path, shape, high):
    """int64 of `shape` (None: any length) with values in [0, high) per column."""
    if tensor.dtype != torch.int64 or tensor.dim() != len(shape) or any(
            want is not None and have != want for have, want in zip(tensor.shape, shape)):
        raise UsageError(f'{path} should be int64 of shape '
                         f'[{", ".join("n" if s is None else str(s) for s in shape)}], '
                         f'not {str(tensor.dtype).replace("torch.", "")} {list(tensor.shape)}')
    if tensor.numel():
        # one synchronisation per file at load time, not in any loop
        low_value, high_value = int(tensor.min()), int(tensor.max())
        if low_value < 0 or high_value >= high:
            raise UsageError(f'{path} has ids outside [0, {high}): {low_value}..{high_value}')


def load_dataset(data_dir, device, valid_negative=None, seed=1, log=print):
    """Load and check a cache written by convert.py; everything ends up on `device`.

    valid_negative: test negatives per user; when it differs from the cache, new ones are drawn
    (uniformly from each user's non-training items, with `seed`) and `log` says so.
    """
    metadata = read_metadata(data_dir, log)
    metadata_path = os.path.join(data_dir, METADATA_FILE)
    n_users, n_items = int(metadata['n_users']), int(metadata['n_items'])
    recorded = metadata.get('tensors') or {}
    if valid_negative is not None and valid_negative > n_items:
        raise UsageError(f'--valid_negative {valid_negative} is more than the catalogue '
                         f'({n_items} items)')
    path = os.path.join(data_dir, TRAIN_FILE)
    train = _load_tensor(path, device, recorded.get(TRAIN_FILE))
    _check(train, path, (None, 2), max(n_users, n_items))
    _check(train[:, 0], path, (None,), n_users)
    _check(train[:, 1], path, (None,), n_items)
    path = os.path.join(data_dir, TEST_FILE)
    test = _load_tensor(path, device, recorded.get(TEST_FILE))
    _check(test, path, (n_users, 2), max(n_users, n_items))
    _check(test[:, 1], path, (n_users,), n_items)
    if not torch.equal(test[:, 0], torch.arange(n_users, device=device)):
        raise UsageError(f'{path}: row u must hold user u')
    path = os.path.join(data_dir, TEST_NEGATIVES_FILE)
    negatives = _load_tensor(path, device, recorded.get(TEST_NEGATIVES_FILE))
    _check(negatives, path, (n_users, None), n_items)
    check_counts(metadata, metadata_path, {'n_train': len(train), 'n_test': len(test),
                                           'valid_negative': negatives.shape[1]})
    # convert.py numbers the items that occur, so every item is in the training or test pairs:
    # a catalogue larger than that (a hand-edited metadata.json) would train rows nothing uses
    items = torch.cat((train[:, 1], test[:, 1]))
    seen_items = int(items.max()) + 1 if len(items) else 0
    if seen_items != n_items:
        raise UsageError(f'{metadata_path} says {n_items} items, but the tensors hold '
                         f'{seen_items}: the cache is inconsistent; run convert.py again')

    train_users, train_items = train[:, 0].contiguous(), train[:, 1].contiguous()
    metadata['test_negatives'] = f'{negatives.shape[1]} per user, from the cache'
    if valid_negative is not None and valid_negative != negatives.shape[1]:
        metadata['test_negatives'] = (f'{valid_negative} per user, drawn at load time with seed '
                                      f'{seed} (the cache has {negatives.shape[1]})')
        log(f'Drawing {valid_negative} test negatives per user with seed {seed} '
            f'(the cache has {negatives.shape[1]})')
        exclusion = ItemExclusion(train_users, train_items, n_users, n_items)
        generator = torch.Generator(device=device).manual_seed(seed)
        users = torch.arange(n_users, device=device).repeat_interleave(valid_negative)
        negatives = exclusion.sample(users, generator).view(n_users, valid_negative)
    return Dataset(train_users, train_items, test[:, 1].contiguous(), negatives, n_users, n_items,
                   metadata)


class TrainBatches:
    """One epoch of training samples at a time, generated on the device.

    Each epoch pairs every training positive of `dataset` with `negative_samples` items drawn
    uniformly from the whole catalogue (approximate, as the reference: one may be a positive)
    or, given an ItemExclusion of the training pairs, from the items the user has no training
    pair with (exact), and shuffles the whole epoch once. Every rank draws the same epoch from
    the same generator and takes its own slice of each global batch, so that N processes train
    on exactly the batches one process would (the reference shards before shuffling, so its
    ranks see different label mixes). Each rank's slice is cut into `micro_slices`:
    `grads_accumulated` equal parts (the reference's accumulation), each further split into
    parts of at most the plan's micro-batch (sizes differing by at most one) where it has one.
    """

    def __init__(self, dataset, plan, batch_size, negative_samples, grads_accumulated=1,
                 exclusion=None):
        self.users, self.items = dataset.train_users, dataset.train_items
        self.n_items = dataset.n_items
        self.exclusion = exclusion  # given: exact negatives, never one of the user's positives
        self.negative_samples = negative_samples
        self.samples = len(self.users) * (1 + negative_samples)
        self.batch_size, self.rank, self.world_size = batch_size, plan.rank, plan.world_size
        self.rank_batch = batch_size // plan.world_size
        accumulated = self.rank_batch // grads_accumulated
        splits = -(-accumulated // plan.micro_batch) if plan.micro_batch else 1
        sizes = [size for _ in range(grads_accumulated) for size in even_split(accumulated, splits)]
        starts = [sum(sizes[:index]) for index in range(len(sizes))]
        self.micro_slices = [slice(start, start + size) for start, size in zip(starts, sizes)]
        # The last partial batch is dropped, as in the reference.
        self.steps = self.samples // batch_size

    def epoch(self, generator):
        """(users, items, labels) of this rank: [steps, rank_batch] each."""
        n_positives, device = len(self.users), self.users.device
        if self.exclusion is None:
            negative_items = torch.randint(0, self.n_items, (n_positives * self.negative_samples,),
                                           generator=generator, device=device)
        else:
            negative_items = self.exclusion.sample(self.users.repeat(self.negative_samples),
                                                   generator)
        order = torch.randperm(self.samples, generator=generator, device=device)
        # Index s < n_positives is positive s; s >= n_positives is negative s - n_positives,
        # paired with positive (s - n_positives) mod n_positives (the reference's repeat).
        index = order[:self.steps * self.batch_size].view(
            self.steps, self.world_size, self.rank_batch)[:, self.rank]
        positive = index < n_positives
        source = index % n_positives
        users = self.users[source]
        items = torch.where(positive, self.items[source],
                            negative_items[(index - n_positives).clamp_(min=0)])
        return users, items, positive.float()


def even_split(samples, parts):
    """Sizes of `parts` contiguous pieces of `samples`, differing by at most one."""
    size, larger = divmod(samples, parts)
    return [size + 1] * larger + [size] * (parts - larger)
