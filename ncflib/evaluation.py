"""HR@K, NDCG@K and MRR: the metric, the scoring model, and the evaluation of a rank's test
users."""
import dataclasses

import torch
import torch.nn.functional as F

from dataloading import ItemExclusion
from ncflib.cli import UsageError
from ncflib.runtime import all_reduce_sums


def duplicate_mask(candidates):
    """True where a candidate repeats an item that stands earlier in its row.

    Column 0 holds the test positive, so it is never masked, and a negative that happens to be
    the positive item is; each distinct item then counts once (the reference's duplicate mask).
    """
    sorted_items, order = torch.sort(candidates, dim=1, stable=True)
    repeated = torch.zeros_like(candidates, dtype=torch.bool)
    repeated[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
    return torch.zeros_like(repeated).scatter_(1, order, repeated)


def sampled_rank(scores, mask):
    """The 0-based rank of each row's positive among its candidates: `scores` [users,
    candidates], column 0 the positive, `mask` True where a candidate does not count.

    The rank is the number of unmasked negatives scoring at least as high (a tie counts against
    the positive, as the reference's stable top-k with the positive last). A row with a score
    that is not finite ranks its positive last: NaN compares false, and would otherwise put a
    broken model's positive first.
    """
    ahead = (scores[:, 1:] >= scores[:, :1]) & ~mask[:, 1:]
    return last_if_not_finite(ahead.sum(1), scores)


def last_if_not_finite(rank, scores):
    """`rank`, or the last rank (the row's width) where a row of `scores` is not all finite."""
    return torch.where(torch.isfinite(scores).all(1), rank, scores.shape[1])


class NonFiniteScores(UsageError):
    """The model scored NaN or infinity: it is broken (diverged, or its scores overflow)."""

    def __init__(self, count, total):
        super().__init__(f'{count:,} of {total:,} scores are not finite (NaN or infinite): the '
                         'model is broken (diverged in training, or its scores overflow)')


# The figures at each K, in the order evaluations sum them (then the MRR, once).
FIGURES = ('hr', 'ndcg', 'precision', 'recall', 'map')


def positions(ahead, segment, bound):
    """(0-based position of each positive in its user's ranking, its index among its user's
    positives in that ranking). ahead: [P] the competitors that are no positive of the user and
    score at least as high. segment: None where every user has one positive, else (first,
    count): per positive, the index (among these P) of its user's first positive, and how many
    it has (a user's positives side by side). bound: more than any `ahead`."""
    if segment is None:
        return ahead, None
    first = segment[0]
    # Ties among one user's positives are broken by order: the set of positions is the same.
    order = torch.argsort(first * bound + ahead, stable=True)
    index = torch.empty_like(ahead)
    index[order] = torch.arange(len(ahead), device=ahead.device) - first[order]
    return ahead + index, index


def ranking_sums(ahead, ks, segment=None, bound=None):
    """Sums over users of each of FIGURES at each k of `ks`, then of the reciprocal rank, from
    the positives' `ahead` counts (positions' arguments): float64 [len(FIGURES) * len(ks) + 1].

    For a user with positives P whose positions in the ranking are p_1 < p_2 < ...: HR@k, 1 if
    p_1 < k; precision@k, hits / k; recall@k, hits / |P|; NDCG@k, sum over hits of
    1 / log2(p_i + 2) over that of the best ranking (min(|P|, k) hits from the top); MAP@k,
    sum over hits of i / (p_i + 1) over min(|P|, k); MRR, 1 / (p_1 + 1). With one positive:
    HR and NDCG as the reference computes them.
    """
    position, index = positions(ahead, segment, bound)
    position = position.double()
    gain = 1.0 / torch.log2(position + 2.0)
    reciprocal = 1.0 / (position + 1.0)
    if segment is not None:
        count = segment[1].double()
        is_first = index == 0
        precision_gain = (index + 1).double() * reciprocal
        discounts = torch.cumsum(1.0 / torch.log2(torch.arange(
            2, max(ks) + 2, device=ahead.device, dtype=torch.float64)), 0)
    sums = []
    for k in ks:
        hit = position < k
        if segment is None:
            hits = hit.sum().double()
            sums += [hits, torch.where(hit, gain, 0.0).sum(), hits / k, hits,
                     torch.where(hit, reciprocal, 0.0).sum()]
            continue
        best = count.clamp(max=k)
        ideal = discounts[best.long() - 1]
        sums += [(hit & is_first).sum().double(), torch.where(hit, gain / ideal, 0.0).sum(),
                 hit.sum().double() / k, torch.where(hit, 1.0 / count, 0.0).sum(),
                 torch.where(hit, precision_gain / best, 0.0).sum()]
    mrr = reciprocal.sum() if segment is None else torch.where(is_first, reciprocal, 0.0).sum()
    return torch.stack(sums + [mrr])


def sampled_sums(model, users, candidates, mask, ks, segment=None):
    """ranking_sums at `ks`, then the sums of the loss, of its count and of the scores that are
    not finite, for the positives of `users` [R] against their `candidates` [R, W] (column 0
    the positive; `segment` as positions'): the forward and the metric in one function, so
    that under torch.compile they run as one pass with no [R, W] scores written out in
    between."""
    width = candidates.shape[1]
    scores = model(users.repeat_interleave(width), candidates.reshape(-1)).float().view(-1, width)
    metrics = ranking_sums(sampled_rank(scores, mask), ks, segment, width + 1)
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    counted = ~mask
    losses = F.binary_cross_entropy_with_logits(scores, labels, reduction='none') * counted
    return torch.cat([metrics, torch.stack([losses.sum().double(), counted.sum().double(),
                                            (~torch.isfinite(scores)).sum().double()])])


@dataclasses.dataclass
class Metrics:
    """An evaluation's figures, means over the users with a positive: HR and NDCG at --topk,
    the validation loss, every figure of FIGURES at every K asked for ({K: (hr, ndcg,
    precision, recall, map)}, --topk's included) with the mean reciprocal rank; in full
    ranking, catalogue coverage and the mean popularity of the top-K items ({K: (coverage,
    popularity)}); and whether some user had several positives."""
    hr: float
    ndcg: float
    loss: float
    at: dict
    mrr: float
    catalogue: dict = None
    several: bool = False

    def figures(self, extra_ks=()):
        """{name: value} as the log records them: hr@K and ndcg@K at --topk, and at `extra_ks`
        with mrr where any are asked for; with several positives per user, precision, recall
        and map too; in full ranking, coverage and popularity at each."""
        ks = list(self.at)
        shown = FIGURES if self.several else FIGURES[:2]
        names = {f'{name}@{ks[0]}': self.at[ks[0]][index]
                 for index, name in enumerate(FIGURES) if name in shown}
        for k in extra_ks:
            names.update({f'{name}@{k}': self.at[k][index]
                          for index, name in enumerate(FIGURES) if name in shown})
        if extra_ks:
            names['mrr'] = self.mrr
        if self.catalogue:
            for k in [ks[0], *extra_ks]:
                names.update({f'coverage@{k}': self.catalogue[k][0],
                              f'popularity@{k}': self.catalogue[k][1]})
        return names


class Scorer:
    """A model for scoring: a copy of the trained model with its weights cast once to the plan's
    precision (no autocast), in eval mode, compiled where the plan compiles. `refresh()` copies
    the trained weights in again, in place (a compiled function keeps working)."""

    def __init__(self, plan, model):
        self.source = model
        self.model = model.inference_copy(plan.dtype)
        # A request's batch size varies: compiled once for any size, not once per size (Dynamo
        # recompiles a static function for at most 8 sizes, then runs it eager).
        self.pairs = plan.compile(self.model.forward, dynamic=True)
        self.all_items = plan.compile(self.model.all_item_scores)
        self.sampled_sums = plan.compile(sampled_sums)
        # with several positives per user a chunk ends at a user's boundary, so its size
        # varies: compiled once for any size
        self.several_sums = plan.compile(sampled_sums, dynamic=True)
        # users per chunk of all-items scoring (full ranking, recommendations)
        self.rows_per_chunk = lambda n_items: plan.scoring_rows(
            n_items, self.model.scoring_bytes_per_pair(plan.dtype))

    def refresh(self):
        with torch.no_grad():
            for copy, trained in zip(self.model.parameters(), self.source.parameters()):
                copy.copy_(trained)

    def score_chunk_sizes(self, users, sizes):
        """All-items scores of the first rows of `users` once per chunk size in `sizes`: under
        a compiled plan, each size's compilation done before a clock starts."""
        with torch.no_grad():
            for rows in sorted(sizes):
                self.all_items(users[:rows])


class Evaluation:
    """This rank's share of the users (contiguous chunks) of the test set, or of the validation
    holdout (`split`), and how their positives are scored; a user without a positive there
    does not count.

    sampled (the reference's): each positive against its user's negatives, a repeated
    candidate, or one that is another positive of the user, counted once. full: against every
    item the user has no known interaction with (`exclusion`: the training pairs for
    validation, and the validation positives too for the test), also giving catalogue coverage
    and the popularity of each user's top K (unless `catalogue` is False: the ranks' figures
    alone). `scorer`: a Scorer of `model` to share (one scoring copy for both sets).
    """

    def __init__(self, plan, dataset, model, topk, eval_mode='sampled', exclusion=None,
                 metrics_at=(), split='test', scorer=None, catalogue=True):
        n_users, device = dataset.n_users, plan.device
        first = n_users * plan.rank // plan.world_size
        last = n_users * (plan.rank + 1) // plan.world_size
        self.plan, self.first_user, self.split = plan, first, split
        # --topk first, then every other K asked for (each once)
        self.ks = tuple(dict.fromkeys((topk, *metrics_at)))
        self.scorer = scorer or Scorer(plan, model)
        self.users = torch.arange(first, last, device=device)
        all_users, all_items = (part.contiguous() for part in dataset.positives(split))
        # this rank's positives: those of its users (sorted by user); one synchronisation each
        # for the counts that size what follows, at construction
        bounds = torch.searchsorted(all_users, torch.tensor([first, last], device=device))
        low, high = bounds.tolist()
        self.positive_users, self.positive_items = all_users[low:high], all_items[low:high]
        self.positive_offset, self.positive_total = low, len(all_users)
        per_user = torch.bincount(all_users, minlength=n_users)
        self.counted = int((per_user > 0).sum())  # users whose figures count, all ranks
        self.several = bool((per_user > 1).any())
        first_of_user = torch.cumsum(per_user, 0) - per_user  # global index of u's first
        # per positive: its user's first positive (an index among this rank's) and count
        self.segment = ((first_of_user - low)[self.positive_users],
                        per_user[self.positive_users]) if self.several else None
        self.n_items = dataset.n_items
        self.full = eval_mode == 'full'
        self.catalogue = self.full and catalogue
        if self.full:
            self.exclusion = exclusion
            self.samples = self.counted * dataset.n_items  # (user, item) pairs that count
            # each item's training interactions: the popularity of what is recommended
            self.popularity = torch.bincount(dataset.train_items,
                                             minlength=dataset.n_items).double()
            rows = self.scorer.rows_per_chunk(dataset.n_items)
            # Each chunk of users, where its training pairs lie among the exclusion's keys
            # (sorted by user) and where its positives lie among this rank's: read once here,
            # so that the chunk loop never waits on the host.
            keys = exclusion.key_bounds(first, last)
            starts = list(range(0, last - first, rows))
            ends = [min(start + rows, last - first) for start in starts]
            positive_bounds = torch.searchsorted(
                self.positive_users, torch.tensor(starts + ends[-1:], device=device) + first
            ).tolist() if starts else [0]
            # the most positives a user of each chunk has (several: the width of its search)
            counts = per_user[first:last].tolist()
            self.chunks = [(start, end, keys[start], keys[end], positive_bounds[index],
                            positive_bounds[index + 1], max(counts[start:end]))
                           for index, (start, end) in enumerate(zip(starts, ends))]
            self.has_positive = per_user[first:last] > 0
            # every user one positive: the chunk's rows are its positives, in order
            self.row_per_positive = not self.several and bool(self.has_positive.all())
        else:
            negatives = dataset.test_negatives if split == 'test' else dataset.valid_negatives
            # a row per positive: the positive (column 0), then its user's negatives
            self.items = torch.cat((self.positive_items[:, None],
                                    negatives[self.positive_users]), 1)
            self.mask = duplicate_mask(self.items)
            if self.several:  # a negative that is another positive of the user does not count
                positives = ItemExclusion(all_users, all_items, n_users, dataset.n_items)
                width = self.items.shape[1]
                self.mask[:, 1:] |= positives.contains(
                    self.positive_users.repeat_interleave(width - 1),
                    self.items[:, 1:].reshape(-1)).view(-1, width - 1)
            self.samples = len(all_users) * self.items.shape[1]
            # chunks of about eval_chunk candidates, a user's positives in one
            rows = max(1, self.plan.eval_chunk // self.items.shape[1])
            self.chunks = self._user_aligned(rows, first_of_user - low, high - low)

    def _user_aligned(self, rows, first_of_user, total):
        """[(start, end)] chunks of about `rows` of this rank's positives, a user's in one."""
        if total == 0:
            return []
        if not self.several:
            return [(start, min(start + rows, total)) for start in range(0, total, rows)]
        # where each positive's user starts, and how many positives it has: once, at
        # construction
        firsts, counts = first_of_user[self.positive_users].tolist(), self.segment[1].tolist()
        chunks, start = [], 0
        while start < total:
            end = min(start + rows, total)
            if end < total and firsts[end] != end:  # inside a user: end before them, or after
                end = firsts[end] if firsts[end] > start else firsts[end] + counts[end]
            chunks.append((start, end))
            start = end
        return chunks

    def __call__(self):
        """The trained model's Metrics over all ranks' users, reduced as sums; NonFiniteScores
        (one line) if any score was NaN or infinite."""
        self.scorer.refresh()
        with torch.no_grad():
            sums, catalogue = self._full() if self.full else (self._sampled(), None)
        *totals, loss_sum, loss_count, nonfinite = all_reduce_sums(sums.unbind(), self.plan)
        users = max(self.counted, 1)
        if nonfinite:
            raise NonFiniteScores(int(nonfinite), self.samples)
        means = [total / users for total in totals]
        width = len(FIGURES)
        at = {k: tuple(means[width * index:width * (index + 1)])
              for index, k in enumerate(self.ks)}
        if catalogue is not None:
            recommended, popularity = catalogue
            if self.plan.distributed:  # which items any process recommended
                torch.distributed.all_reduce(recommended)
            covered = (recommended > 0).sum(1).tolist()  # once an evaluation
            figures = all_reduce_sums([*popularity.unbind()], self.plan)
            catalogue = {k: (covered[index] / self.n_items, figures[index] / users)
                         for index, k in enumerate(self.ks)}
        return Metrics(hr=at[self.ks[0]][0], ndcg=at[self.ks[0]][1],
                       loss=loss_sum / max(loss_count, 1), at=at, mrr=means[-1],
                       catalogue=catalogue, several=self.several)

    @property
    def width(self):
        """How many figures an evaluation sums: the metrics, the loss, its count and the scores
        that are not finite."""
        return len(FIGURES) * len(self.ks) + 4

    def warm_up(self):
        """Compile the scoring of each chunk shape before the clock starts (compiled plans
        only); returns the seconds it took."""
        if not self.plan.compiled or not len(self.users):
            return 0.0
        start = self.plan.time()
        self.scorer.refresh()
        if self.full:
            self.scorer.score_chunk_sizes(self.users,
                                          {chunk[1] - chunk[0] for chunk in self.chunks})
        else:  # the two sizes of chunk (with several positives: any size, once)
            with torch.no_grad():
                for chunk in {self.chunks[0], self.chunks[-1]} if self.chunks else ():
                    self._sampled_chunk(*chunk)
        return self.plan.time() - start

    def _segment(self, start, end):
        if self.segment is None:
            return None
        return self.segment[0][start:end] - start, self.segment[1][start:end]

    def _sampled_chunk(self, start, end):
        sums = self.scorer.several_sums if self.several else self.scorer.sampled_sums
        return sums(self.scorer.model, self.positive_users[start:end], self.items[start:end],
                    self.mask[start:end], self.ks, self._segment(start, end))

    def _sampled(self):
        sums = torch.zeros(self.width, dtype=torch.float64, device=self.plan.device)
        for chunk in self.chunks:
            sums += self._sampled_chunk(*chunk)
        return sums

    def ranks(self):
        """(offset, users, ranks) of this process's positives: each one's 0-based position in
        its user's ranking, as the metrics count it (for per-user figures: a paired test of two
        models); `offset`, where they start among all processes' positives (sorted by user)."""
        with torch.no_grad():
            self.scorer.refresh()
            if self.full:
                ahead = [self._full_chunk(*chunk)[2] for chunk in self.chunks]
                segments = [self._segment(chunk[4], chunk[5]) for chunk in self.chunks]
            else:
                width = self.items.shape[1]
                ahead = [sampled_rank(self.scorer.model(
                    self.positive_users[start:end].repeat_interleave(width),
                    self.items[start:end].reshape(-1)).float().view(-1, width),
                    self.mask[start:end]) for start, end in self.chunks]
                segments = [self._segment(start, end) for start, end in self.chunks]
            # n_items + 2: more than any count ahead (a sampled row is at most the catalogue
            # and its positive wide)
            ranks = [positions(part, segment, self.n_items + 2)[0]
                     for part, segment in zip(ahead, segments)]
        ranks = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64,
                                                          device=self.plan.device)
        return self.positive_offset, self.positive_users, ranks

    def _full_chunk(self, first, last, first_key, last_key, first_positive, last_positive,
                    width):
        """(scores, the training pairs' mask, the positives' ahead counts (positions')) of the
        users of one chunk against every item."""
        n_items = self.exclusion.n_items
        users = self.users[first:last]
        scores = self.scorer.all_items(users)
        # the chunk's training pairs, a slice of the sorted keys (no host synchronisation)
        keys = self.exclusion.keys[first_key:last_key]
        trained = torch.zeros_like(scores, dtype=torch.bool)
        trained.view(-1)[keys - (self.first_user + first) * n_items] = True
        row = self.positive_users[first_positive:last_positive] - (self.first_user + first)
        items = self.positive_items[first_positive:last_positive]
        competitors = ~trained
        competitors[row, items] = False
        positive_scores = scores[row, items]
        # As in sampled mode, an item scoring as high as the positive ranks ahead of it, and a
        # row with a score that is not finite ranks its positives last.
        if self.row_per_positive:  # a comparison per item
            ahead = ((scores >= positive_scores[:, None]) & competitors).sum(1)
        elif self.segment is None:  # at most one positive per row
            ahead = ((scores[row] >= positive_scores[:, None]) & competitors[row]).sum(1)
        else:  # several: each row's competitors sorted once, each positive found among them
            ordered = scores.masked_fill(~competitors, -torch.inf).sort(dim=1).values
            slot = torch.arange(first_positive, last_positive, device=scores.device) \
                - self.segment[0][first_positive:last_positive]
            wanted = torch.full((len(users), width), torch.inf, device=scores.device)
            wanted[row, slot] = positive_scores
            ahead = n_items - torch.searchsorted(ordered, wanted)[row, slot]
        finite = torch.isfinite(scores).all(1)
        ahead = torch.where(finite[row], ahead, n_items)
        return scores, trained, ahead, row, items

    def _full(self):
        device = self.plan.device
        sums = torch.zeros(self.width, dtype=torch.float64, device=device)
        top = max(self.ks)
        recommended = torch.zeros(len(self.ks), self.n_items, dtype=torch.float64, device=device)
        popularity = torch.zeros(len(self.ks), dtype=torch.float64, device=device)
        for chunk in self.chunks:
            first, last, _, _, first_positive, last_positive, _ = chunk
            scores, trained, ahead, row, items = self._full_chunk(*chunk)
            metrics = ranking_sums(ahead, self.ks, self._segment(first_positive, last_positive),
                                   self.n_items + 1)
            labels = torch.zeros_like(scores)
            labels[row, items] = 1.0
            losses = F.binary_cross_entropy_with_logits(scores, labels, reduction='none')
            counted = self.has_positive[first:last]
            # the rows of users who do not count count as trained
            trained |= ~counted[:, None]
            sums += torch.cat([metrics, torch.stack([
                losses.masked_fill(trained, 0.0).sum().double(), (~trained).sum().double(),
                (~torch.isfinite(scores)).sum().double()])])
            if not self.catalogue:
                continue
            # each counted user's top K among the items without a training interaction (a
            # user with fewer such items: those); weights, not a mask, so as not to wait on the
            # host
            values, best = scores.masked_fill(trained, -torch.inf).topk(
                min(top, self.n_items), dim=1)
            shown = (torch.isfinite(values) & counted[:, None]).double()
            for index, k in enumerate(self.ks):
                recommended[index].index_add_(0, best[:, :k].reshape(-1), shown[:, :k].reshape(-1))
                popularity[index] += ((self.popularity[best[:, :k]] * shown[:, :k]).sum(1)
                                      / shown[:, :k].sum(1).clamp(min=1)).sum()
        return sums, (recommended, popularity) if self.catalogue else None
