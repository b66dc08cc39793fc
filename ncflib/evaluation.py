"""HR@K, NDCG@K and MRR: the metric, the scoring model, and the evaluation of a rank's test
users."""
import dataclasses

import torch
import torch.nn.functional as F

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


def rank_sums(rank, ks, weight=None):
    """Sums over users of HR@k and NDCG@k for each k of `ks`, then of the reciprocal rank, for
    0-based ranks of the test positives: float64 [2 * len(ks) + 1]. weight: 1 for a user who
    counts, 0 for one who has no positive (None: all count)."""
    rank = rank.double()
    gain = 1.0 / torch.log2(rank + 2.0)
    reciprocal = 1.0 / (rank + 1.0)
    if weight is not None:
        gain, reciprocal = gain * weight, reciprocal * weight
    sums = []
    for k in ks:
        hit = rank < k
        sums += [hit.sum().double() if weight is None else (hit * weight).sum(),
                 torch.where(hit, gain, 0.0).sum()]
    return torch.stack(sums + [reciprocal.sum()])


def sampled_sums(model, users, candidates, mask, ks, weight=None):
    """rank_sums at `ks`, then the sums of the loss, of its count and of the scores that are not
    finite, for `users` [R] and their `candidates` [R, W] (column 0 the positive; `weight` as
    rank_sums'): the forward and the metric in one function, so that under torch.compile they
    run as one pass with no [R, W] scores written out in between."""
    width = candidates.shape[1]
    scores = model(users.repeat_interleave(width), candidates.reshape(-1)).float().view(-1, width)
    metrics = rank_sums(sampled_rank(scores, mask), ks, weight)
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    counted = ~mask if weight is None else ~mask & (weight[:, None] > 0)
    losses = F.binary_cross_entropy_with_logits(scores, labels, reduction='none') * counted
    return torch.cat([metrics, torch.stack([losses.sum().double(), counted.sum().double(),
                                            (~torch.isfinite(scores)).sum().double()])])


@dataclasses.dataclass
class Metrics:
    """An evaluation's figures, means over the test users: HR and NDCG at --topk, the
    validation loss, and HR and NDCG at every K asked for ({K: (hr, ndcg)}, --topk's
    included) with the mean reciprocal rank."""
    hr: float
    ndcg: float
    loss: float
    at: dict
    mrr: float

    def figures(self, extra_ks=()):
        """{name: value} as the log records them: hr@K and ndcg@K at --topk, and at `extra_ks`
        with mrr where any are asked for."""
        ks = list(self.at)
        names = {f'hr@{ks[0]}': self.hr, f'ndcg@{ks[0]}': self.ndcg}
        for k in extra_ks:
            names.update({f'hr@{k}': self.at[k][0], f'ndcg@{k}': self.at[k][1]})
        if extra_ks:
            names['mrr'] = self.mrr
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
        # users per chunk of all-items scoring (full ranking, recommendations)
        self.rows_per_chunk = lambda n_items: plan.scoring_rows(
            n_items, self.model.scoring_bytes_per_pair(plan.dtype))

    def refresh(self):
        with torch.no_grad():
            for copy, trained in zip(self.model.parameters(), self.source.parameters()):
                copy.copy_(trained)


class Evaluation:
    """This rank's share of the users (contiguous chunks) of the test set, or of the validation
    holdout (`split`), and how they are scored.

    sampled (the reference's): the positive against its negatives, a repeated candidate counted
    once. full: against every item the user has no known interaction with (`exclusion`: the
    training pairs for validation, and the validation positives too for the test). A user
    without a validation positive does not count. `scorer`: a Scorer of `model` to share (one
    scoring copy for both sets).
    """

    def __init__(self, plan, dataset, model, topk, eval_mode='sampled', exclusion=None,
                 metrics_at=(), split='test', scorer=None):
        n_users = dataset.n_users
        first = n_users * plan.rank // plan.world_size
        last = n_users * (plan.rank + 1) // plan.world_size
        self.plan, self.first_user, self.split = plan, first, split
        # --topk first, then every other K asked for (each once)
        self.ks = tuple(dict.fromkeys((topk, *metrics_at)))
        self.scorer = scorer or Scorer(plan, model)
        self.users = torch.arange(first, last, device=plan.device)
        positives, negatives = ((dataset.test_items, dataset.test_negatives) if split == 'test'
                                else (dataset.valid_items, dataset.valid_negatives))
        held = positives[first:last] >= 0
        # one synchronisation at construction: whether every user counts
        self.weight = None if bool(held.all()) else held.double()
        # a user without a positive is scored against item 0 and weighs nothing
        self.positives = positives[first:last].clamp(min=0)
        self.counted = int((positives >= 0).sum())  # users whose figures count, all ranks
        self.full = eval_mode == 'full'
        if self.full:
            self.exclusion = exclusion
            self.samples = self.counted * dataset.n_items  # (user, item) pairs that count
            rows = self.scorer.rows_per_chunk(dataset.n_items)
            # Each chunk of users, and where its training pairs lie among the exclusion's keys
            # (sorted by user): read once here, so that the chunk loop never waits on the host.
            bounds = exclusion.key_bounds(first, last)
            self.chunks = [(start, min(start + rows, last - first),
                            bounds[start], bounds[min(start + rows, last - first)])
                           for start in range(0, last - first, rows)]
        else:
            # column 0: the positive
            self.items = torch.cat((self.positives[:, None],
                                    negatives[first:last].clamp(min=0)), 1)
            self.mask = duplicate_mask(self.items)
            self.samples = self.counted * self.items.shape[1]

    def __call__(self):
        """The trained model's Metrics over all ranks' users, reduced as sums; NonFiniteScores
        (one line) if any score was NaN or infinite."""
        self.scorer.refresh()
        with torch.no_grad():
            sums = self._full() if self.full else self._sampled()
        *totals, loss_sum, loss_count, nonfinite = all_reduce_sums(sums, self.plan)
        users = max(self.counted, 1)
        if nonfinite:
            raise NonFiniteScores(int(nonfinite), self.samples)
        means = [total / users for total in totals]
        at = {k: (means[2 * index], means[2 * index + 1]) for index, k in enumerate(self.ks)}
        return Metrics(hr=means[0], ndcg=means[1], loss=loss_sum / max(loss_count, 1), at=at,
                       mrr=means[-1])

    @property
    def width(self):
        """How many figures an evaluation sums: the metrics, the loss, its count and the scores
        that are not finite."""
        return 2 * len(self.ks) + 4

    def warm_up(self):
        """Compile the scoring of each chunk shape before the clock starts (compiled plans
        only); returns the seconds it took."""
        if not self.plan.compiled or not len(self.users):
            return 0.0
        start = self.plan.time()
        self.scorer.refresh()
        with torch.no_grad():
            if self.full:
                for rows in sorted({last - first for first, last, _, _ in self.chunks}):
                    self.scorer.all_items(self.users[:rows])
            else:
                rows = max(1, self.plan.eval_chunk // self.items.shape[1])
                for first in sorted({0, (len(self.users) - 1) // rows * rows}):
                    chunk = slice(first, first + rows)
                    self.scorer.sampled_sums(self.scorer.model, self.users[chunk],
                                             self.items[chunk], self.mask[chunk], self.ks,
                                             self._weight(chunk))
        return self.plan.time() - start

    def _sampled(self):
        rows = max(1, self.plan.eval_chunk // self.items.shape[1])
        sums = torch.zeros(self.width, dtype=torch.float64, device=self.plan.device)
        for start in range(0, len(self.users), rows):
            chunk = slice(start, start + rows)
            sums += self.scorer.sampled_sums(self.scorer.model, self.users[chunk],
                                             self.items[chunk], self.mask[chunk], self.ks,
                                             self._weight(chunk))
        return sums.unbind()

    def _weight(self, chunk):
        return None if self.weight is None else self.weight[chunk]

    def ranks(self):
        """(users, ranks) of this process's users who count: each positive's 0-based rank, as
        the metrics count it (for per-user figures: a paired test of two models)."""
        with torch.no_grad():
            self.scorer.refresh()
            if self.full:
                ranks = torch.cat([self._full_chunk(*chunk)[2] for chunk in self.chunks])
            else:
                width = self.items.shape[1]
                rows = max(1, self.plan.eval_chunk // width)
                ranks = torch.cat([
                    sampled_rank(self.scorer.model(
                        self.users[start:start + rows].repeat_interleave(width),
                        self.items[start:start + rows].reshape(-1)).float().view(-1, width),
                        self.mask[start:start + rows]) for start in range(0, len(self.users),
                                                                            rows)])
        counted = slice(None) if self.weight is None else self.weight > 0
        return self.users[counted], ranks[counted]

    def _full_chunk(self, first, last, first_key, last_key):
        """(scores, the training pairs' mask, ranks) of the users of one chunk against every
        item."""
        n_items = self.exclusion.n_items
        users, positives = self.users[first:last], self.positives[first:last]
        scores = self.scorer.all_items(users)
        # the chunk's training pairs, a slice of the sorted keys (no host synchronisation)
        keys = self.exclusion.keys[first_key:last_key]
        trained = torch.zeros_like(scores, dtype=torch.bool)
        trained.view(-1)[keys - (self.first_user + first) * n_items] = True
        row = torch.arange(len(users), device=scores.device)
        competitors = ~trained
        competitors[row, positives] = False
        # As in sampled mode, an item scoring as high as the positive ranks ahead of it, and a
        # row with a score that is not finite ranks its positive last.
        rank = ((scores >= scores[row, positives][:, None]) & competitors).sum(1)
        return scores, trained, last_if_not_finite(rank, scores)

    def _full(self):
        device = self.plan.device
        sums = torch.zeros(self.width, dtype=torch.float64, device=device)
        for first, last, first_key, last_key in self.chunks:
            scores, trained, rank = self._full_chunk(first, last, first_key, last_key)
            positives = self.positives[first:last]
            row = torch.arange(len(positives), device=device)
            weight = self._weight(slice(first, last))
            metrics = rank_sums(rank, self.ks, weight)
            labels = torch.zeros_like(scores)
            labels[row, positives] = 1.0
            losses = F.binary_cross_entropy_with_logits(scores, labels, reduction='none')
            if weight is not None:  # the rows of users who do not count count as trained
                trained |= (weight == 0)[:, None]
            sums += torch.cat([metrics, torch.stack([
                losses.masked_fill(trained, 0.0).sum().double(), (~trained).sum().double(),
                (~torch.isfinite(scores)).sum().double()])])
        return sums.unbind()
