"""The cached dataset on the device: loading, negative sampling, batching and test candidates."""
import dataclasses
import os

import torch

from ncflib.cache import (METADATA_FILE, SEVERAL_POSITIVES_SPLITS, TEST_FILE,
                          TEST_NEGATIVE_SAMPLINGS, TEST_NEGATIVES_FILE, TRAIN_FILE, VALID_FILE,
                          VALID_NEGATIVES_FILE, check_counts, fingerprint, read_metadata,
                          tensor_sha256, validation_seed)
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
        keys = users.long() * n_items
        keys += items.long()
        if keys.is_cpu:
            keys.numpy().sort()  # in place: no second copy, and numpy's CPU sort is the fastest
        else:
            keys = torch.sort(keys).values
        self._index(keys, n_users, n_items)

    @classmethod
    def from_sorted_keys(cls, keys, n_users, n_items):
        """The exclusion of the pairs whose keys (user * n_items + item, int64) are given
        sorted: convert.py has them from its own sort of the pairs."""
        exclusion = cls.__new__(cls)
        exclusion._index(keys, n_users, n_items)
        return exclusion

    def _index(self, keys, n_users, n_items):
        self.n_users, self.n_items = n_users, n_items
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
        return self.free_item(users, self._ranks(self.free_counts[users], generator))

    def sample_distinct(self, users, count, generator=None):
        """[len(users), count] items: for each user, `count` distinct items drawn uniformly
        from those the user has no pair with (each set of `count` of them equally likely).
        Every user asked for must have at least `count` free items.

        Ranks among the user's free items are drawn with replacement and every repeat drawn
        again until none is left: the result's law is the same under any relabelling of the
        free items, so each set of `count` is equally likely. Users with fewer than 2 x `count`
        free items (where repeats would take many rounds) take the `count` smallest of random
        keys over all their free items instead.
        """
        users = users.long()
        free = self.free_counts[users][:, None].expand(len(users), count)
        ranks = self._ranks(free, generator)
        crowded = self.free_counts[users] < 2 * count
        if bool(crowded.any()):  # one synchronisation per call, not per draw
            rows = torch.nonzero(crowded).flatten()
            width = int(self.free_counts[users[rows]].max())
            keys = torch.rand((len(rows), width), generator=generator, device=users.device)
            keys[torch.arange(width, device=users.device) >= free[rows, :1]] = 2.0
            ranks[rows] = keys.topk(count, dim=1, largest=False).indices
        while True:
            ordered, order = ranks.sort(dim=1)
            repeated = torch.zeros_like(ranks, dtype=torch.bool)
            repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
            if not bool(repeated.any()):  # one synchronisation per round; a few rounds
                break
            repeated = torch.zeros_like(repeated).scatter_(1, order, repeated)
            ranks[repeated] = self._ranks(free[repeated], generator)
        return self.free_item(users[:, None].expand_as(ranks), ranks)

    def _ranks(self, free, generator):
        """A uniform rank in [0, free) for each entry of `free`."""
        # float64 keeps the draw uniform for catalogues far beyond 2^24 items
        draw = torch.rand(free.shape, generator=generator, dtype=torch.float64,
                          device=free.device)
        return torch.minimum((draw * free).long(), free - 1)

    def free_item(self, users, rank):
        """The item that is the `rank`-th (0-based) of those each user has no pair with."""
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
    """The cached split, on one device: training pairs, test positives and test negatives, and
    with a validation holdout its positives and negatives. Positives are one per user (the
    items' row u: user u's, -1 for none; `*_users` None) or, in a ratio or time split, any
    number per user ((user, item) pairs sorted by user, in `*_users` and `*_items`)."""
    train_users: torch.Tensor     # [n_train]
    train_items: torch.Tensor     # [n_train]
    test_items: torch.Tensor      # [n_users]: user u's test positive (or [n_test], with:)
    test_negatives: torch.Tensor  # [n_users, valid_negative]: -1 rows for users without one
    n_users: int
    n_items: int
    metadata: dict                # metadata.json's
    valid_items: torch.Tensor = None      # [n_users]: u's validation positive, -1 for none
    valid_negatives: torch.Tensor = None  # [n_users, valid_negative]: -1 rows for those users
    test_users: torch.Tensor = None       # [n_test]: the test positives' users, sorted
    valid_users: torch.Tensor = None      # [n_valid]

    @property
    def has_validation(self):
        return self.valid_items is not None

    def positives(self, split='test'):
        """(users, items) of the positives of `split` ('test' or 'validation'), sorted by
        user: the users without one have none."""
        users, items = ((self.test_users, self.test_items) if split == 'test'
                        else (self.valid_users, self.valid_items))
        if users is not None:
            return users, items
        users = torch.nonzero(items >= 0).flatten()
        return users, items[users]

    def known_pairs(self):
        """(users, items) of the interactions known before the test: the training pairs and the
        validation positives (what the test set is ranked outside of)."""
        if not self.has_validation:
            return self.train_users, self.train_items
        users, items = self.positives('validation')
        return torch.cat((self.train_users, users)), torch.cat((self.train_items, items))

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


def test_negative_exclusion(known_users, known_items, positives, n_users, n_items,
                            sampling='recipe'):
    """The ItemExclusion that test (or validation) negatives are drawn outside of: the pairs
    known before them (recipe), with their `positives` ((users, items)) too (paper)."""
    users, items = known_users, known_items
    if sampling == 'paper':  # the positives are interactions too
        users, items = torch.cat((users, positives[0])), torch.cat((items, positives[1]))
    return ItemExclusion(users, items, n_users, n_items)


def draw_test_negatives(exclusion, count, generator, sampling='recipe', chunk_users=None,
                        user_name=None, popular=None):
    """[n_users, count] test negatives on the exclusion's device, drawn as `sampling` says
    (cache.TEST_NEGATIVE_SAMPLINGS), outside `exclusion` (test_negative_exclusion's): recipe,
    uniform with replacement over the items without a training pair; paper, distinct items
    without a training pair and other than the test positive; popularity, with replacement, in
    proportion to each item's training interactions (`popular`: the training pairs' items),
    over the items without a training pair. chunk_users: users drawn at once (None: all),
    which bounds the memory. A user without enough items to draw from is a UsageError naming
    them by user_name(mapped id)."""
    n_users, device = exclusion.n_users, exclusion.keys.device
    user_name = user_name or (lambda user: f'{user} (mapped id)')
    # The recipe draws from the free items, the test positive among them: a user with nothing
    # else free has interacted with every item.
    short = torch.nonzero(exclusion.free_counts < (count if sampling == 'paper' else 2)).flatten()
    if sampling == 'popularity':  # the training interactions of the user's free items
        mass = torch.bincount(popular, minlength=exclusion.n_items).double()
        taken = torch.zeros(n_users, dtype=torch.float64, device=device).index_add_(
            0, exclusion.keys // exclusion.n_items, mass[exclusion.keys % exclusion.n_items])
        short = torch.nonzero(taken >= mass.sum()).flatten()
    if len(short):
        user = int(short[0])
        if sampling == 'paper':
            raise UsageError(f'user {user_name(user)} has only {int(exclusion.free_counts[user])} '
                             f'items they never interacted with, fewer than the {count} '
                             'distinct test negatives to draw: drop the user from the input or '
                             'draw fewer')
        if sampling == 'popularity':
            raise UsageError(f'user {user_name(user)} has interacted with every item that has '
                             'a training interaction, so no negative can be drawn by '
                             'popularity: drop the user from the input or draw uniformly')
        raise UsageError(f'user {user_name(user)} has interacted with every item, so no test '
                         'negative exists for them: drop the user from the input')
    negatives = torch.empty(n_users, count, dtype=torch.int64, device=device)
    chunk = chunk_users or n_users
    for first in range(0, n_users, chunk):
        part = torch.arange(first, min(first + chunk, n_users), device=device)
        if sampling == 'paper':
            negatives[part] = exclusion.sample_distinct(part, count, generator)
        elif sampling == 'popularity':
            negatives[part] = draw_popular(exclusion, part.repeat_interleave(count), popular,
                                           generator).view(len(part), count)
        else:
            negatives[part] = exclusion.sample(part.repeat_interleave(count),
                                               generator).view(len(part), count)
    return negatives


def draw_popular(exclusion, users, popular, generator):
    """An item per entry of `users`, in proportion to its training interactions (a random
    training pair's item), drawn again where it is one of the user's pairs in `exclusion`, until
    none is: exact, with a few rounds (one synchronisation each) at load or conversion time."""
    def draw(size):
        return popular[torch.randint(0, len(popular), (size,), generator=generator,
                                     device=popular.device)]
    items = draw(len(users))
    again = torch.nonzero(exclusion.contains(users, items)).flatten()
    while len(again):
        items[again] = draw(len(again))
        again = again[exclusion.contains(users[again], items[again])]
    return items


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


def _check(tensor, path, shape, high, low=0):
    """int64 of `shape` (None: any length) with values in [low, high) per column."""
    if tensor.dtype != torch.int64 or tensor.dim() != len(shape) or any(
            want is not None and have != want for have, want in zip(tensor.shape, shape)):
        raise UsageError(f'{path} should be int64 of shape '
                         f'[{", ".join("n" if s is None else str(s) for s in shape)}], '
                         f'not {str(tensor.dtype).replace("torch.", "")} {list(tensor.shape)}')
    if tensor.numel():
        # one synchronisation per file at load time, not in any loop
        low_value, high_value = int(tensor.min()), int(tensor.max())
        if low_value < low or high_value >= high:
            raise UsageError(f'{path} has ids outside [{low}, {high}): '
                             f'{low_value}..{high_value}')


def load_dataset(data_dir, device, valid_negative=None, seed=1, log=print, with_test=True):
    """Load and check a cache written by convert.py; everything ends up on `device`.

    valid_negative: test (and validation) negatives per user; when it differs from the cache,
    new ones are drawn (as the cache's were: recipe or paper, see cache.TEST_NEGATIVE_SAMPLINGS,
    with `seed`, and validation_seed(seed) for the validation's) and `log` says so.
    with_test: False reads nothing of the test set (its tensors are None): a search that selects
    on the validation holdout cannot look at it.
    """
    metadata = read_metadata(data_dir, log)
    metadata_path = os.path.join(data_dir, METADATA_FILE)
    if not with_test and 'validation' not in metadata:
        raise UsageError(f'{data_dir} has no validation holdout (convert.py '
                         '--validation_holdout), and its test set is not to be read here')
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
    several = metadata.get('split') in SEVERAL_POSITIVES_SPLITS
    test = negatives = test_users = None
    counts = {'n_train': len(train)}
    if with_test:
        test_users, test, negatives = _load_positives(
            data_dir, TEST_FILE, TEST_NEGATIVES_FILE, device, recorded, n_users, n_items,
            several=several)
        counts.update(n_test=len(test), valid_negative=negatives.shape[1])
    valid_users = valid_items = valid_negatives = None
    if 'validation' in metadata:
        valid_users, valid_items, valid_negatives = _load_positives(
            data_dir, VALID_FILE, VALID_NEGATIVES_FILE, device, recorded, n_users, n_items,
            held_out=True, negatives=None if negatives is None else negatives.shape[1],
            several=several)
        counts.update(n_valid=len(valid_items) if several else int((valid_items >= 0).sum()),
                      valid_negative=valid_negatives.shape[1])
    check_counts(metadata, metadata_path, counts)
    # convert.py numbers the items that occur, so every item is in the training or test pairs:
    # a catalogue larger than that (a hand-edited metadata.json) would train rows nothing uses
    # (without the test set, an item of the test alone may be beyond the others)
    items = torch.cat([part for part in (train[:, 1], test, valid_items) if part is not None])
    seen_items = int(items.max()) + 1 if len(items) else 0
    if seen_items > n_items or (with_test and seen_items != n_items):
        raise UsageError(f'{metadata_path} says {n_items} items, but the tensors hold '
                         f'{seen_items}: the cache is inconsistent; run convert.py again')

    dataset = Dataset(train[:, 0].contiguous(), train[:, 1].contiguous(), test, negatives,
                      n_users, n_items, metadata, valid_items, valid_negatives, test_users,
                      valid_users)
    sampling = metadata.get('test_negative_sampling', 'recipe')
    drawn = (negatives if with_test else valid_negatives).shape[1]
    metadata['test_negatives'] = f'{drawn} per user ({sampling}), from the cache'
    if valid_negative is not None and valid_negative != drawn:
        if sampling not in TEST_NEGATIVE_SAMPLINGS:
            raise UsageError(f'--valid_negative {valid_negative}, but the cache\'s {drawn} test '
                             f'negatives per user are its source\'s own '
                             f'({metadata.get("source_format")} files), and others cannot be '
                             f'drawn as they were: --valid_negative {drawn} evaluates with them')
        metadata['test_negatives'] = (f'{valid_negative} per user ({sampling}), drawn at load '
                                      f'time with seed {seed} (the cache has {drawn})')
        log(f'Drawing {valid_negative} test negatives per user ({sampling}) with seed {seed} '
            f'(the cache has {drawn})')
        redraw_negatives(dataset, valid_negative, seed, sampling)
    return dataset


def redraw_negatives(dataset, count, seed, sampling):
    """`count` test negatives per user, as convert.py draws them (outside the interactions known
    before the test), and with a validation holdout its negatives as if the test set did not
    exist (outside the training pairs, with validation_seed(seed))."""
    device = dataset.train_items.device

    def draw(split, known, seed):
        positives = dataset.positives(split)
        exclusion = test_negative_exclusion(*known, positives, dataset.n_users, dataset.n_items,
                                            sampling)
        negatives = draw_test_negatives(
            exclusion, count, torch.Generator(device=device).manual_seed(seed), sampling,
            popular=dataset.train_items)
        held = torch.zeros(dataset.n_users, dtype=torch.bool, device=device)
        held[positives[0]] = True
        negatives[~held] = -1
        return negatives

    if dataset.test_items is not None:
        dataset.test_negatives = draw('test', dataset.known_pairs(), seed)
    if dataset.has_validation:
        dataset.valid_negatives = draw('validation', (dataset.train_users, dataset.train_items),
                                       validation_seed(seed))


def _load_positives(data_dir, positives_file, negatives_file, device, recorded, n_users,
                    n_items, held_out=False, negatives=None, several=False):
    """A cache's positives and their negatives ([n_users, `negatives` or any count]; -1 rows
    for a user without a positive), checked: (users, items, negatives). One per user (row u:
    user u and their item; -1 for none where `held_out`; users None), or with `several` any
    number per user ((user, item) rows sorted by user)."""
    path = os.path.join(data_dir, positives_file)
    rows = _load_tensor(path, device, recorded.get(positives_file))
    users = None
    if several:
        _check(rows, path, (None, 2), max(n_users, n_items))
        users = rows[:, 0].contiguous()
        _check(users, path, (None,), n_users)
        if len(users) > 1 and not bool((users[1:] >= users[:-1]).all()):
            raise UsageError(f'{path}: its rows must be sorted by user')
        items = rows[:, 1].contiguous()
        _check(items, path, (None,), n_items)
        held = torch.zeros(n_users, dtype=torch.bool, device=device)
        held[users] = True
    else:
        _check(rows, path, (n_users, 2), max(n_users, n_items), low=-1)
        if not torch.equal(rows[:, 0], torch.arange(n_users, device=device)):
            raise UsageError(f'{path}: row u must hold user u')
        items = rows[:, 1].contiguous()
        _check(items, path, (n_users,), n_items, low=-1 if held_out else 0)
        held = items >= 0
    path = os.path.join(data_dir, negatives_file)
    drawn = _load_tensor(path, device, recorded.get(negatives_file))
    _check(drawn, path, (n_users, negatives), n_items, low=-1 if held_out or several else 0)
    if (held_out or several) and not bool(((drawn >= 0) == held[:, None]).all()):
        raise UsageError(f'{path}: a row has negatives of -1 where its user has a positive, or '
                         'the reverse')
    return users, items, drawn


class TrainBatches:
    """One epoch of training samples at a time, generated on the device.

    Each epoch pairs every training positive of `dataset` with `negative_samples` items drawn
    uniformly from the whole catalogue (approximate, as the reference: one may be a positive),
    or, given an ItemExclusion of the training pairs, from the items the user has no training
    pair with (exact), or with `popularity` in proportion to each item's training interactions
    (a random training pair's item: one may be a positive), and shuffles the whole epoch once.
    Every rank draws the same epoch from the same generator and takes its own slice of each
    global batch, so that N processes train on exactly the batches one process would (the
    reference shards before shuffling, so its ranks see different label mixes). Each rank's
    slice is cut into `micro_slices`: `grads_accumulated` equal parts (the reference's
    accumulation), each further split into parts of at most the plan's micro-batch (sizes
    differing by at most one) where it has one.
    """

    def __init__(self, dataset, plan, batch_size, negative_samples, grads_accumulated=1,
                 exclusion=None, popularity=False):
        self.users, self.items = dataset.train_users, dataset.train_items
        self.n_items = dataset.n_items
        self.exclusion = exclusion  # given: exact negatives, never one of the user's positives
        self.popularity = popularity
        self.negative_samples = negative_samples
        self.samples = len(self.users) * (1 + negative_samples)
        self.batch_size, self.rank, self.world_size = batch_size, plan.rank, plan.world_size
        self.rank_batch = batch_size // plan.world_size
        accumulated = self.rank_batch // grads_accumulated
        splits = -(-accumulated // plan.micro_batch) if plan.micro_batch else 1
        sizes = [size for _ in range(grads_accumulated) for size in even_split(accumulated, splits)]
        starts = [sum(sizes[:index]) for index in range(len(sizes))]
        self.micro_slices = [slice(start, start + size) for start, size in zip(starts, sizes)]
        # Each micro-batch's mean loss counts by its share of the slice: the gradients then add
        # up to the slice's, whatever the micro-batch sizes.
        self.micro_shares = [size / self.rank_batch for size in sizes]
        # The last partial batch is dropped, as in the reference.
        self.steps = self.samples // batch_size

    @property
    def rank_part(self):
        """This rank's slice of a whole batch."""
        return slice(self.rank * self.rank_batch, (self.rank + 1) * self.rank_batch)

    def epoch(self, generator, whole=False):
        """(users, items, labels) of this rank: [steps, rank_batch] each; `whole`: every rank's,
        [steps, batch_size] (rank r's slice at rank_part)."""
        n_positives, device = len(self.users), self.users.device
        if self.popularity:
            negative_items = self.items[torch.randint(
                0, n_positives, (n_positives * self.negative_samples,), generator=generator,
                device=device)]
        elif self.exclusion is None:
            negative_items = torch.randint(0, self.n_items, (n_positives * self.negative_samples,),
                                           generator=generator, device=device)
        else:
            negative_items = self.exclusion.sample(self.users.repeat(self.negative_samples),
                                                   generator)
        order = torch.randperm(self.samples, generator=generator, device=device)
        # Index s < n_positives is positive s; s >= n_positives is negative s - n_positives,
        # paired with positive (s - n_positives) mod n_positives (the reference's repeat).
        index = order[:self.steps * self.batch_size].view(
            self.steps, self.world_size, self.rank_batch)
        index = index.flatten(1) if whole else index[:, self.rank]
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
