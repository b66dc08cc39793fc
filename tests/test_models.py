"""The model (ncflib/models.py): the reference's parameters, initialisation and forward, the
checks of its sizes, and the copy that scores."""
import math
import re

import pytest
import torch

from ncflib.cli import UsageError
from ncflib.models import NeuMF, check_shape


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


def test_sizes_are_checked_in_the_flags_names():
    with pytest.raises(UsageError, match='must be even'):
        NeuMF(10, 10, 8, [33, 16])
    for factors, layers, dropout, fragment in ((0, [16, 8], 0.5, '--factors must be positive'),
                                               (8, [], 0.5, '--layers must be positive'),
                                               (8, [16, 0], 0.5, '--layers must be positive'),
                                               (8, [16, 8], 1.0, '--dropout must be in [0, 1)'),
                                               (8, [16, 8], float('nan'), '--dropout')):
        with pytest.raises(UsageError, match=re.escape(fragment)):
            check_shape(factors, layers, dropout)
    check_shape(8, [16, 8], 0.0)


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
