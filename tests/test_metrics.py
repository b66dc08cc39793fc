"""The metrics of several positives per user (ncflib/evaluation.py: HR, precision, recall, NDCG
and MAP at K, and MRR), checked against an independent implementation, ranx, on random cases
with ties; in Evaluation itself, sampled and full ranking, with catalogue coverage and
popularity against brute force; and, with one positive per user, the reference's figures."""
import math
import random

import pytest
import torch

from ncflib import runtime
from ncflib.evaluation import FIGURES, Evaluation, ranking_sums
from ncflib.models import ModelShape

ranx = pytest.importorskip('ranx')  # requirements-dev.txt

KS = (1, 3, 10)


def ranx_figures(users, ks):
    """Per-user figures by ranx, from {user: (positive scores, negative scores)}: ties broken
    against the positives (a negative scoring as high ranks ahead), as ours are; MAP@k over
    min(|P|, k) (RecBole's, and ours) rather than ranx's |P|."""
    qrels, run, sizes = {}, {}, {}
    for user, (positive, negative) in users.items():
        candidates = [(score, 1, f'p{index}') for index, score in enumerate(positive)] + \
            [(score, 0, f'n{index}') for index, score in enumerate(negative)]
        candidates.sort(key=lambda entry: (-entry[0], entry[1]))  # negatives first among ties
        qrels[f'u{user}'] = {f'p{index}': 1 for index in range(len(positive))}
        run[f'u{user}'] = {doc: float(len(candidates) - place)
                           for place, (_, _, doc) in enumerate(candidates)}
        sizes[f'u{user}'] = len(positive)
    names = [f'{metric}@{k}' for k in ks
             for metric in ('hit_rate', 'ndcg', 'precision', 'recall', 'map')] + ['mrr']
    scores = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(run), names, return_mean=False)
    order = sorted(qrels, key=lambda name: int(name[1:]))
    per_user = {name: [float(value) for value in scores[name]] for name in names}
    # ranx returns queries in its own order: map its positions back to users
    ranx_order = list(ranx.Qrels(qrels).keys())
    figures = []
    for user in order:
        at = ranx_order.index(user)
        row = []
        for k in ks:
            size = sizes[user]
            row += [per_user[f'hit_rate@{k}'][at], per_user[f'ndcg@{k}'][at],
                    per_user[f'precision@{k}'][at], per_user[f'recall@{k}'][at],
                    per_user[f'map@{k}'][at] * size / min(size, k)]
        figures.append(row + [per_user['mrr'][at]])
    return figures


def random_users(seed, count=40):
    """{user: (positive scores, negative scores)}: small integer scores, so many ties."""
    draw = random.Random(seed)
    users = {}
    for user in range(count):
        positives = draw.randint(1, 6)
        negatives = draw.randint(0, 25)
        users[user] = ([draw.randint(0, 8) for _ in range(positives)],
                       [draw.randint(0, 8) for _ in range(negatives)])
    return users


def our_sums(users, ks):
    """ranking_sums over the users, from each positive's count of negatives scoring as high."""
    ahead, first, count = [], [], []
    for positive, negative in users.values():
        start = len(ahead)
        for score in positive:
            ahead.append(sum(other >= score for other in negative))
            first.append(start)
            count.append(len(positive))
    segment = torch.tensor(first), torch.tensor(count)
    return ranking_sums(torch.tensor(ahead), ks, segment, bound=100).tolist()


@pytest.mark.parametrize('seed', range(5))
def test_figures_of_several_positives_match_ranx_with_ties(seed):
    users = random_users(seed)
    expected = ranx_figures(users, KS)
    ours = our_sums(users, KS)
    for index, name in enumerate([f'{figure}@{k}' for k in KS for figure in FIGURES] + ['mrr']):
        assert ours[index] == pytest.approx(sum(row[index] for row in expected), abs=1e-9), name


def test_hand_computed_case():
    """One user, positives at positions 0 and 2 of 5 (ties against them): HR@1 1, precision@3
    2/3, recall@3 1, NDCG@3 (1 + 1/2) / (1 + 1/log2 3), MAP@3 (1 + 2/3) / 2, MRR 1."""
    users = {0: ([9, 5], [7, 5, 1])}  # the tie at 5 ranks the negative ahead: positions 0, 3
    sums = our_sums(users, (1, 3, 4))
    width = len(FIGURES)
    hr1, ndcg3, precision3, recall3, map3 = sums[0], *sums[width + 1:width + 5]
    assert (hr1, precision3, recall3) == (1.0, pytest.approx(1 / 3), 0.5)
    assert ndcg3 == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert map3 == pytest.approx(1 / 2)
    recall4, map4 = sums[2 * width + 3], sums[2 * width + 4]
    assert recall4 == 1.0 and map4 == pytest.approx((1 + 2 / 4) / 2)
    assert sums[-1] == 1.0


def test_one_positive_per_user_keeps_the_reference_figures():
    """With one positive each, the figures are the reference's (HR, NDCG = 1 / log2(rank + 2),
    MRR) whether or not the evaluation is told so, and precision is HR / k, recall HR."""
    rank = torch.tensor([0, 3, 9, 1, 0, 50])
    plain = ranking_sums(rank, KS)
    told = ranking_sums(rank, KS, (torch.arange(6), torch.ones(6, dtype=torch.int64)), 100)
    assert plain.tolist() == pytest.approx(told.tolist(), abs=1e-12)
    for index, k in enumerate(KS):
        hits = [value for value in rank.tolist() if value < k]
        hr, ndcg, precision, recall, _ = plain[index * 5:index * 5 + 5].tolist()
        assert hr == len(hits) and recall == len(hits) and precision == len(hits) / k
        assert ndcg == sum(1 / math.log2(value + 2) for value in hits)


def integer_model(n_users, n_items, seed):
    """An MF model whose scores are small integers (many ties), on the fp32 eager plan."""
    shape = ModelShape('mf', 2, (4, 2), 0.0)
    plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl='eager'),
                           valid_batch_size=7 * n_items)
    model = plan.build_model(shape, n_users, n_items)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randint(-2, 3, parameter.shape, generator=generator))
    return plan, model


def several_positives_dataset(seed, n_users=23, n_items=30, negatives=8):
    """A Dataset of a ratio split's layout: training pairs, and test positives in any number
    per user (none for some), with sampled negatives (-1 rows for users without a positive)."""
    import dataloading

    draw = random.Random(seed)
    train, test = [], []
    for user in range(n_users):
        items = draw.sample(range(n_items), draw.randint(2, 12))
        cut = draw.randint(1, len(items) - 1) if user % 5 else len(items)
        train += [(user, item) for item in items[:cut]]
        test += [(user, item) for item in items[cut:]]
    train, test = torch.tensor(train), torch.tensor(test)
    held = torch.zeros(n_users, dtype=torch.bool)
    held[test[:, 0]] = True
    sampled = torch.randint(0, n_items, (n_users, negatives),
                            generator=torch.Generator().manual_seed(seed))
    sampled[~held] = -1
    return dataloading.Dataset(train[:, 0], train[:, 1], test[:, 1], sampled, n_users, n_items,
                               {}, test_users=test[:, 0])


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('mode', ['sampled', 'full'])
def test_evaluation_of_several_positives_matches_ranx(seed, mode):
    """Evaluation, chunked as it runs (several chunks), against ranx over scores computed pair
    by pair: full ranking over the items without a training pair, sampled over the user's
    negatives (a repeat, or another positive, counted once); coverage and popularity of the
    top K against brute force, ties broken as the evaluation's top-k breaks them aside."""
    import dataloading

    dataset = several_positives_dataset(seed)
    plan, model = integer_model(dataset.n_users, dataset.n_items, seed)
    exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                          dataset.n_users, dataset.n_items)
    evaluation = Evaluation(plan, dataset, model, 3, mode, exclusion, metrics_at=(1, 10))
    assert len(evaluation.chunks) > 1
    metrics = evaluation()
    trained = set(zip(dataset.train_users.tolist(), dataset.train_items.tolist()))
    positives = {}
    for user, item in zip(dataset.test_users.tolist(), dataset.test_items.tolist()):
        positives.setdefault(user, []).append(item)
    with torch.no_grad():
        scores = model(torch.arange(dataset.n_users).repeat_interleave(dataset.n_items),
                       torch.arange(dataset.n_items).repeat(dataset.n_users)).view(
                           dataset.n_users, dataset.n_items).tolist()
    users = {}
    for user, items in positives.items():
        if mode == 'full':
            others = [item for item in range(dataset.n_items)
                      if item not in items and (user, item) not in trained]
        else:
            others = set(dataset.test_negatives[user].tolist()) - set(items)
        users[user] = ([scores[user][item] for item in items],
                       [scores[user][item] for item in others])
    expected = ranx_figures(users, (3, 1, 10))
    for index, k in enumerate((3, 1, 10)):
        for figure, name in enumerate(FIGURES):
            mean = sum(row[index * 5 + figure] for row in expected) / len(users)
            assert metrics.at[k][figure] == pytest.approx(mean, abs=1e-9), (name, k)
    assert metrics.mrr == pytest.approx(sum(row[-1] for row in expected) / len(users))
    assert metrics.several and metrics.hr == metrics.at[3][0]
    assert (metrics.catalogue is None) == (mode == 'sampled')


def test_coverage_and_popularity_of_the_top_k_match_brute_force():
    """Full ranking's catalogue coverage@K (the share of items in some counted user's top K)
    and mean popularity@K (training interactions of a user's top-K items, averaged over them,
    then over users), against a brute-force top K (float scores: no ties)."""
    import dataloading

    dataset = several_positives_dataset(7)
    plan, model = integer_model(dataset.n_users, dataset.n_items, 7)
    torch.manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                          dataset.n_users, dataset.n_items)
    metrics = Evaluation(plan, dataset, model, 3, 'full', exclusion, metrics_at=(1, 10))()
    trained = set(zip(dataset.train_users.tolist(), dataset.train_items.tolist()))
    counted = sorted(set(dataset.test_users.tolist()))
    popularity = torch.bincount(dataset.train_items, minlength=dataset.n_items).tolist()
    with torch.no_grad():
        scores = model.eval().all_item_scores(torch.arange(dataset.n_users)).tolist()
    for k in (3, 1, 10):
        shown, mean = set(), 0.0
        for user in counted:
            free = [item for item in range(dataset.n_items) if (user, item) not in trained]
            top = sorted(free, key=lambda item: -scores[user][item])[:k]
            shown.update(top)
            mean += sum(popularity[item] for item in top) / len(top)
        assert metrics.catalogue[k] == (len(shown) / dataset.n_items,
                                        pytest.approx(mean / len(counted)))


@pytest.mark.parametrize('mode', ['sampled', 'full'])
def test_compiled_evaluation_of_several_positives_equals_eager(mode):
    """--impl compile's evaluation (the sampled forward and metric in one compiled function,
    with its users' positives; the full ranking's scoring) gives eager's figures."""
    import dataloading

    dataset = several_positives_dataset(5)
    _, model = integer_model(dataset.n_users, dataset.n_items, 5)
    exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                          dataset.n_users, dataset.n_items)
    figures = {}
    for impl in ('eager', 'compile'):
        plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl=impl),
                               valid_batch_size=7 * dataset.n_items)
        evaluation = Evaluation(plan, dataset, model, 3, mode, exclusion, metrics_at=(1, 10))
        evaluation.warm_up()
        metrics = evaluation()
        figures[impl] = [value for k in metrics.at for value in metrics.at[k]] + [metrics.mrr] + (
            [value for k in metrics.catalogue for value in metrics.catalogue[k]]
            if metrics.catalogue else [])
    # the same ranks; sums of floats in another order differ in the last bit at most
    assert figures['compile'] == pytest.approx(figures['eager'], rel=1e-12, abs=1e-15)
