"""The cached dataset on the device: loading, negative sampling, batching and test candidates."""
import hashlib
import json
import os

import torch

from utils import UsageError, torch_load

from cache_layout import (CACHE_VERSION, ITEM_IDS_FILE, METADATA_FILE, TENSOR_FILES, TEST_FILE,
                          TEST_NEGATIVES_FILE, TRAIN_FILE, USER_IDS_FILE, fingerprint,
                          tensor_sha256)


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


class Dataset:
    """The cached split, on one device: training pairs, test positives and test negatives."""

    def __init__(self, train_users, train_items, test_items, test_negatives, n_users, n_items,
                 metadata):
        self.train_users, self.train_items = train_users, train_items
        self.test_items, self.test_negatives = test_items, test_negatives
        self.n_users, self.n_items, self.metadata = n_users, n_items, metadata
        # the data's identity, recorded in checkpoints (convert.py's, from cache version 2)
        self.fingerprint = metadata.get('fingerprint')
        # what a cache of version 2 of the same ratings and ids had as its fingerprint
        self.fingerprint_without_split = (
            fingerprint(metadata['source_sha256'], metadata['id_maps_sha256'])
            if isinstance(metadata.get('source_sha256'), str)
            and isinstance(metadata.get('id_maps_sha256'), str) else None)


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


def read_metadata(data_dir, log=print):
    """metadata.json of the cache in `data_dir`, checked for what loading needs. A cache older
    than version 3 (no tensor digests) is read with a one-line notice."""
    if not data_dir or not os.path.isdir(data_dir):
        raise UsageError(f'--data {data_dir!r} is not a directory: run prepare_dataset.sh first')
    path = os.path.join(data_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise UsageError(f'{data_dir} has no {METADATA_FILE}: the cache is missing or incomplete; '
                         'run prepare_dataset.sh or convert.py again')
    try:
        with open(path) as file:
            metadata = json.load(file)
        int(metadata['n_users']), int(metadata['n_items'])
        version = metadata.get('version', 1)
        tensors = metadata.get('tensors')
        if version >= CACHE_VERSION and not (isinstance(tensors, dict) and all(
                isinstance(tensors.get(name), dict) for name in TENSOR_FILES)):
            raise ValueError(f'no tensor digests in a cache of version {version}')
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f'{path} is not convert.py metadata: {error}') from None
    if version > CACHE_VERSION:
        raise UsageError(f'{path} is of cache version {version}, newer than this ncf reads '
                         f'({CACHE_VERSION}): update ncf')
    if version < CACHE_VERSION:
        log(f'Notice: the cache in {data_dir} records no tensor digests (cache version '
            f'{version}): its tensors are not checked against {METADATA_FILE}; '
            'prepare_dataset.sh or convert.py converts it again')
    return metadata


def check_counts(metadata, path, counts):
    """metadata.json's counts (n_train, n_test, valid_negative, where it has them) are the
    tensors' `counts`."""
    for name, count in counts.items():
        if name in metadata and metadata[name] != count:
            raise UsageError(f'{path} says {name} {metadata[name]}, but the tensors hold '
                             f'{count}: the cache is inconsistent; run convert.py again')


def read_id_maps(data_dir, metadata):
    """(user ids, item ids): the original ids in mapped order (line k after the header: mapped
    id k), as strings, checked against metadata.json's id_maps_sha256 where it has one."""
    import csv
    import io

    data, digest = [], hashlib.sha256()
    for name in (USER_IDS_FILE, ITEM_IDS_FILE):
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise UsageError(f'{path} is missing: recommend mode needs the id maps convert.py '
                             'writes (run it again to get them)')
        with open(path, 'rb') as file:
            data.append(file.read())
        digest.update(data[-1])
    recorded = metadata.get('id_maps_sha256')
    if recorded is not None and digest.hexdigest() != recorded:
        raise UsageError(f'{USER_IDS_FILE} or {ITEM_IDS_FILE} in {data_dir} has changed since '
                         f'convert.py wrote it (their sha256 is not what {METADATA_FILE} '
                         'records): run prepare_dataset.sh or convert.py again')
    maps = []
    for name, raw in zip((USER_IDS_FILE, ITEM_IDS_FILE), data):
        rows = list(csv.reader(io.StringIO(raw.decode('utf-8', errors='replace'), newline='')))
        if not rows or len(rows[0]) != 1:
            raise UsageError(f'{os.path.join(data_dir, name)} is not an id map: expected a '
                             'one-column CSV with a header')
        maps.append([row[0] if row else '' for row in rows[1:]])
    return maps


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

    Each epoch pairs every training positive with `negative_samples` items drawn uniformly from
    the whole catalogue (approximate, as the reference: one may be a positive) or, given an
    ItemExclusion of the training pairs, from the items the user has no training pair with
    (exact), and shuffles the whole epoch once. Every rank draws the same epoch from the same
    generator and takes its own slice of each global batch, so that N processes train on exactly
    the batches one process would (the reference shards before shuffling, so its ranks see
    different label mixes). Each rank's slice is cut into `micro_slices`: `grads_accumulated`
    equal parts (the reference's accumulation), each further split into parts of at most
    `max_micro_batch` samples (sizes differing by at most one) when that is set.
    """

    def __init__(self, users, items, n_items, negative_samples, batch_size, rank=0,
                 world_size=1, grads_accumulated=1, max_micro_batch=None, exclusion=None):
        self.users, self.items, self.n_items = users, items, n_items
        self.exclusion = exclusion  # given: exact negatives, never one of the user's positives
        self.negative_samples = negative_samples
        self.samples = len(users) * (1 + negative_samples)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.rank_batch = batch_size // world_size
        accumulated = self.rank_batch // grads_accumulated
        splits = -(-accumulated // max_micro_batch) if max_micro_batch else 1
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
