"""neumf.py and the evaluation metric, against hand-computed cases."""
import math

import pytest
import torch

from evaluation import duplicate_mask, hits_and_ndcg
from neumf import NeuMF

REFERENCE_PARAMETER_NAMES = [
    'mf_user_embed.weight', 'mf_item_embed.weight', 'mlp_user_embed.weight',
    'mlp_item_embed.weight', 'mlp.0.weight', 'mlp.0.bias', 'mlp.1.weight', 'mlp.1.bias',
    'mlp.2.weight', 'mlp.2.bias', 'final.weight', 'final.bias']


def test_shapes_and_reference_parameter_names():
    model = NeuMF(nb_users=30, nb_items=50, mf_dim=8, mlp_layer_sizes=[32, 16, 8, 4])
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    assert list(shapes) == REFERENCE_PARAMETER_NAMES
    assert shapes['mf_user_embed.weight'] == [30, 8]
    assert shapes['mf_item_embed.weight'] == [50, 8]
    assert shapes['mlp_user_embed.weight'] == [30, 16]  # half of layers[0] each
    assert shapes['mlp_item_embed.weight'] == [50, 16]
    assert shapes['mlp.0.weight'] == [16, 32] and shapes['mlp.2.weight'] == [4, 8]
    assert shapes['final.weight'] == [1, 4 + 8]  # last MLP layer + GMF factors
    users, items = torch.tensor([0, 29, 3]), torch.tensor([49, 0, 7])
    logits = model(users, items)
    assert logits.shape == (3, 1)
    assert torch.allclose(model(users, items, sigmoid=True), torch.sigmoid(logits))


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = NeuMF(nb_users=3000, nb_items=2000, mf_dim=64, mlp_layer_sizes=[256, 256, 128, 64])
    for embedding in (model.mf_user_embed, model.mf_item_embed, model.mlp_user_embed,
                      model.mlp_item_embed):
        assert abs(embedding.weight.mean().item()) < 1e-3
        assert embedding.weight.std().item() == pytest.approx(0.01, rel=0.02)
    for layer in model.mlp:  # glorot uniform: U(-l, l), l = sqrt(6 / (fan_in + fan_out))
        fan_out, fan_in = layer.weight.shape
        limit = math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max().item() <= limit
        assert layer.weight.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.03)
    limit = math.sqrt(3 / model.final.in_features)  # lecun uniform
    assert model.final.weight.abs().max().item() <= limit
    assert model.final.weight.abs().max().item() > 0.8 * limit


def test_odd_first_layer_is_an_error():
    with pytest.raises(ValueError, match='must be even'):
        NeuMF(10, 10, 8, [33, 16])


def test_dropout_only_in_training():
    model = NeuMF(10, 10, 4, [16, 8], dropout=0.5)
    users, items = torch.arange(10), torch.arange(10)
    model.eval()
    assert torch.equal(model(users, items), model(users, items))
    model.train()
    torch.manual_seed(0)
    first = model(users, items)
    torch.manual_seed(1)
    assert not torch.equal(first, model(users, items))


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
    hits, ndcg = hits_and_ndcg(scores, duplicate_mask(items), k)
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
        hits, ndcg = hits_and_ndcg(scores, duplicate_mask(items), k)
        expected_hits = expected_ndcg = 0.0
        for row in items.tolist():
            positive, others = row[0], set(row[1:]) - {row[0]}
            rank = sum(item_score[o] >= item_score[positive] for o in others)
            if rank < k:
                expected_hits += 1
                expected_ndcg += 1 / math.log2(rank + 2)
        assert hits.item() == expected_hits
        assert ndcg.item() == pytest.approx(expected_ndcg)


def test_the_scoring_copy_keeps_fp32_logits():
    """Layers in bf16, the output layer in fp32: logits keep fp32's resolution, where bf16's
    8-bit mantissa would tie a positive with the negatives it beats (a tie counts against it)."""
    torch.manual_seed(0)
    model = NeuMF(200, 300, 8, [32, 16, 8]).eval()
    copy = model.inference_copy(torch.bfloat16)
    assert copy.mlp[0].weight.dtype == copy.mf_user_embed.weight.dtype == torch.bfloat16
    assert copy.final.weight.dtype == torch.float32
    users = torch.arange(200).repeat_interleave(300)
    items = torch.arange(300).repeat(200)
    with torch.no_grad():
        pairs = copy(users, items).view(-1)
        every_item = copy.all_item_scores(torch.arange(200))
        reference = model(users, items).view(-1)
    assert pairs.dtype == every_item.dtype == torch.float32
    # bf16 layers, rounded in another order by the factorised scoring: close to each other and
    # to the fp32 model's
    assert torch.allclose(every_item.view(-1), pairs, atol=0.01)
    assert torch.allclose(pairs, reference, atol=0.02)
    # an untrained model's logits lie close together (here within 0.18..0.21): fp32 tells them
    # apart about as well as the fp32 model does, bf16 logits would tie most of them
    distinct = len(torch.unique(pairs))
    assert distinct > 0.95 * len(torch.unique(reference))
    assert len(torch.unique(pairs.bfloat16())) < 0.01 * distinct


def test_a_score_that_is_not_finite_ranks_the_positive_last():
    """NaN compares false: without care a NaN positive would rank first (HR 1.0)."""
    items = torch.tensor([[10, 11, 12], [20, 21, 22], [30, 31, 32], [40, 41, 42]])
    nan, inf = float('nan'), float('inf')
    scores = torch.tensor([[nan, 0.1, 0.2],     # the positive NaN
                           [0.9, nan, 0.2],     # a negative NaN
                           [inf, 0.1, 0.2],     # the positive infinite
                           [0.9, 0.1, 0.2]])    # a finite row: the positive first
    hits, ndcg = hits_and_ndcg(scores, duplicate_mask(items), k=2)
    assert hits.item() == 1 and ndcg.item() == pytest.approx(1.0)
