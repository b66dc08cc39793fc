"""Evaluation (ncflib/evaluation.py): HR@K and NDCG@K against hand-computed cases and brute
force, in sampled and full-ranking modes; a model whose scores are not finite is never good."""
import math
import os

import pytest
import torch

import dataloading
import ncf
from conftest import flags, load_trained_model
from logger.logger import read_log
from ncflib import runtime
from ncflib.evaluation import (Evaluation, NonFiniteScores, duplicate_mask, ranking_sums,
                               sampled_rank)


def test_duplicate_mask_counts_each_item_once_and_never_masks_the_positive():
    candidates = torch.tensor([[5, 3, 5, 3, 7],
                               [4, 4, 2, 4, 2],
                               [1, 2, 3, 4, 5]])
    assert duplicate_mask(candidates).tolist() == [
        [False, False, True, True, False],
        [False, True, False, True, True],
        [False] * 5]


def hand_scored():
    # Column 0 is the test positive.
    items = torch.tensor([[10, 11, 12, 13],    # plain: two negatives ahead
                          [20, 21, 21, 21],    # one negative, three times: counts once
                          [30, 30, 31, 32],    # a negative that is the positive item: ignored
                          [40, 41, 42, 43],    # a tie with another item counts against
                          [50, 51, 52, 53]])   # positive first
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.7],
                           [0.5, 0.9, 0.9, 0.9],
                           [0.3, 0.3, 0.1, 0.2],
                           [0.4, 0.4, 0.1, 0.9],
                           [0.9, 0.1, 0.2, 0.3]])
    ranks = [2, 1, 0, 2, 0]
    return items, scores, ranks


@pytest.mark.parametrize('k', [1, 2, 3])
def test_hits_and_ndcg_hand_computed(k):
    items, scores, ranks = hand_scored()
    hits, ndcg = ranking_sums(sampled_rank(scores, duplicate_mask(items)), [k])[:2]
    assert hits.item() == sum(rank < k for rank in ranks)
    expected = sum(1 / math.log2(rank + 2) for rank in ranks if rank < k)
    assert ndcg.item() == pytest.approx(expected)


def test_metric_matches_brute_force_on_random_lists():
    generator = torch.Generator().manual_seed(0)
    items = torch.randint(0, 15, (200, 21), generator=generator)
    # Scores depend on the item only, as a model's would, with a few exact ties.
    item_score = torch.randint(0, 40, (15,), generator=generator).float()
    scores = item_score[items]
    for k in (1, 5, 10):
        hits, ndcg = ranking_sums(sampled_rank(scores, duplicate_mask(items)), [k])[:2]
        expected_hits = expected_ndcg = 0.0
        for row in items.tolist():
            positive, others = row[0], set(row[1:]) - {row[0]}
            rank = sum(item_score[o] >= item_score[positive] for o in others)
            if rank < k:
                expected_hits += 1
                expected_ndcg += 1 / math.log2(rank + 2)
        assert hits.item() == expected_hits
        assert ndcg.item() == pytest.approx(expected_ndcg)


def test_a_score_that_is_not_finite_ranks_the_positive_last():
    """NaN compares false: without care a NaN positive would rank first (HR 1.0)."""
    items = torch.tensor([[10, 11, 12], [20, 21, 22], [30, 31, 32], [40, 41, 42]])
    nan, inf = float('nan'), float('inf')
    scores = torch.tensor([[nan, 0.1, 0.2],     # the positive NaN
                           [0.9, nan, 0.2],     # a negative NaN
                           [inf, 0.1, 0.2],     # the positive infinite
                           [0.9, 0.1, 0.2]])    # a finite row: the positive first
    hits, ndcg = ranking_sums(sampled_rank(scores, duplicate_mask(items)), [2])[:2]
    assert hits.item() == 1 and ndcg.item() == pytest.approx(1.0)


def brute_force_full_ranking(tiny_data, trained, k):
    _, dataset, model = load_trained_model(tiny_data, trained)
    trained_pairs = set(zip(dataset.train_users.tolist(), dataset.train_items.tolist()))
    with torch.no_grad():
        scores = model.all_item_scores(torch.arange(300)).tolist()
    hits = ndcg = 0.0
    for user, positive in enumerate(dataset.test_items.tolist()):
        rank = sum(scores[user][item] >= scores[user][positive] for item in range(200)
                   if item != positive and (user, item) not in trained_pairs)
        if rank < k:
            hits += 1
            ndcg += 1 / math.log2(rank + 2)
    return hits / 300, ndcg / 300


@pytest.mark.parametrize('k', [1, 10])
def test_full_ranking_matches_brute_force(tiny_data, trained, k):
    test = dict(data=tiny_data, mode='test', checkpoint_dir=trained, topk=k,
                log_path=os.devnull, precision='fp32')
    tested = ncf.main(flags(**test, eval_mode='full'))
    hr, ndcg = brute_force_full_ranking(tiny_data, trained, k)
    assert tested['hr'] == pytest.approx(hr, abs=1e-9)
    assert tested['ndcg'] == pytest.approx(ndcg, abs=1e-6)
    sampled = ncf.main(flags(**test))
    assert sampled['hr'] >= tested['hr']  # 50 sampled negatives are easier than 199 items


def test_full_ranking_in_training(tiny_data, tmp_path):
    result = ncf.main(flags(tiny_data, epochs=1, eval_mode='full', log_path=tmp_path / 'log.json',
                            precision='fp32'))
    assert 0 < result['best_hr'] < 1


def test_full_ranking_compiled_ranks_as_eager(tiny_data, trained):
    """--impl compile's full ranking: all_item_scores under torch.compile (fullgraph, static
    shapes: five chunks of 60 users, compiled once, by warm_up) gives eager's ranks, hence its
    metrics. A compiler failure would be an error here (--impl compile)."""
    _, dataset, model = load_trained_model(tiny_data, trained)
    exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                          dataset.n_users, dataset.n_items)
    metrics = {}
    for impl in ('eager', 'compile'):
        plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl=impl),
                               valid_batch_size=60 * dataset.n_items)
        evaluation = Evaluation(plan, dataset, model, 10, 'full', exclusion, metrics_at=(1, 5))
        assert [chunk[1] - chunk[0] for chunk in evaluation.chunks] == [60] * 5
        evaluation.warm_up()
        metrics[impl] = evaluation()
        assert isinstance(evaluation.scorer.all_items, runtime.Compiled) == (impl == 'compile')
    compiled, eager = metrics['compile'], metrics['eager']
    assert (compiled.hr, compiled.ndcg, compiled.at, compiled.mrr) == \
        (eager.hr, eager.ndcg, eager.at, eager.mrr)
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-6)
    assert 0 < eager.hr < 1


def test_non_finite_scores_fail_the_evaluation_in_both_modes(tiny_data, trained):
    plan, dataset, model = load_trained_model(tiny_data, trained)
    exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                          dataset.n_users, dataset.n_items)
    with torch.no_grad():
        model.mf_user_embed.weight[7] = float('inf')  # user 7's scores: NaN or infinite
    for mode in ('sampled', 'full'):
        evaluation = Evaluation(plan, dataset, model, 10, mode, exclusion)
        with pytest.raises(NonFiniteScores, match=r'of \S+ scores are not finite'):
            evaluation()


def test_several_k_and_mrr_match_brute_force_in_both_modes(tiny_data, trained, tmp_path):
    """--metrics_at: HR@K and NDCG@K at each K and the MRR, sampled and over every item, equal
    to ranks computed one by one (ties against the positive, a repeated candidate once)."""
    _, dataset, model = load_trained_model(tiny_data, trained)
    trained_pairs = set(zip(dataset.train_users.tolist(), dataset.train_items.tolist()))
    with torch.no_grad():
        scores = model.all_item_scores(torch.arange(300)).tolist()
    ranks = {'sampled': [], 'full': []}
    for user, positive in enumerate(dataset.test_items.tolist()):
        score = scores[user]
        negatives = set(dataset.test_negatives[user].tolist()) - {positive}
        ranks['sampled'].append(sum(score[item] >= score[positive] for item in negatives))
        ranks['full'].append(sum(score[item] >= score[positive] for item in range(200)
                                 if item != positive and (user, item) not in trained_pairs))
    for mode in ('sampled', 'full'):
        log = tmp_path / f'{mode}.json'
        tested = ncf.main(flags(tiny_data, mode='test', checkpoint_dir=trained, topk=10,
                                metrics_at=[1, 5, 20], eval_mode=mode, log_path=log,
                                precision='fp32'))
        metrics = tested['metrics']
        for k in (10, 1, 5, 20):
            hits = [rank for rank in ranks[mode] if rank < k]
            assert metrics.at[k][0] == pytest.approx(len(hits) / 300, abs=1e-9), (mode, k)
            assert metrics.at[k][1] == pytest.approx(
                sum(1 / math.log2(rank + 2) for rank in hits) / 300, abs=1e-6), (mode, k)
        assert metrics.mrr == pytest.approx(
            sum(1 / (rank + 1) for rank in ranks[mode]) / 300, abs=1e-6)
        summary = read_log(log)[-1]['data']
        assert {'hr@1', 'ndcg@5', 'hr@20', 'mrr', 'hr@10'} <= set(summary)
        assert summary['mrr'] == metrics.mrr


def test_mrr_and_ranks_of_a_hand_scored_list():
    items, scores, ranks = hand_scored()
    sums = ranking_sums(sampled_rank(scores, duplicate_mask(items)), [1, 3])
    assert sums.tolist()[:2] == [2.0, 2.0]  # two positives first
    assert sums[-1].item() == pytest.approx(sum(1 / (rank + 1) for rank in ranks))
