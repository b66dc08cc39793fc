"""The models (ncflib/models.py): the reference's parameters, initialisation and forward, the
checks of its sizes, the copy that scores; GMF, MLP and MF beside NeuMF, and NeuMF from
pretrained branches."""
import math
import re

import pytest
import torch

from ncflib.cli import UsageError
from ncflib.models import (GMF, MF, MF_INIT_STD, MLP, MODELS, ModelShape, NeuMF,
                           check_shape)


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


@pytest.mark.parametrize('sizes, fragment', [
    ((-5, 10, 8, [16, 8], 0.5), 'the number of users must be positive, not -5'),
    ((10, 0, 8, [16, 8], 0.5), 'the number of items must be positive, not 0'),
    ((10, 10, 8.5, [16, 8], 0.5), '--factors must be an integer, not 8.5'),
    ((10, 10, 8, 256, 0.5), '--layers must be positive sizes, not 256'),
    ((10, 10, 8, [16, -8], 0.5), '--layers must be positive, not -8'),
    ((10, 10, 8, [16, 8], None), '--dropout must be in [0, 1), not None'),
])
def test_every_model_checks_its_sizes_where_it_is_built(sizes, fragment):
    """Whoever builds it (ncf.py, inference.py, torch.hub): one line, not torch's error."""
    with pytest.raises(UsageError, match=re.escape(fragment)):
        NeuMF(*sizes)
    with pytest.raises(UsageError, match='the number of users must be positive'):
        ModelShape('mf', 8).build(-5, 10)


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


@pytest.mark.parametrize('name', MODELS)
def test_the_scoring_copy_keeps_the_output_layer_exactly(name):
    """The output layer (MF's: its biases) as trained, not cast to bf16 and back, which would
    keep its dtype and round its values."""
    torch.manual_seed(0)
    model = ModelShape(name, 8, [32, 16, 8]).build(30, 50)
    with torch.no_grad():
        for parameter in model.output_parameters():
            parameter.normal_()  # MF's biases start at zero, which bf16 holds exactly
    copy = model.inference_copy(torch.bfloat16)
    for kept, trained in zip(copy.output_parameters(), model.output_parameters()):
        assert kept.dtype == torch.float32 and torch.equal(kept, trained)
        assert not torch.equal(trained.bfloat16().float(), trained)
    assert next(iter(copy.embeddings().values())).weight.dtype == torch.bfloat16
    assert [name for name, _ in copy.named_parameters()] == \
        [name for name, _ in model.named_parameters()]


@pytest.mark.parametrize('impl', ['eager', 'cpu_fused'])
def test_inference_scores_with_the_output_layer_as_trained(impl, tmp_path, monkeypatch):
    """inference.py's path (the scoring copy is never refreshed from the trained weights
    there, as evaluation's is): the output layer stays the model's fp32 values in bf16."""
    import inference
    from ncflib.evaluation import Scorer

    scorers = []

    class Recorded(Scorer):
        def __init__(self, *args):
            super().__init__(*args)
            scorers.append(self)
    monkeypatch.setattr(inference, 'Scorer', Recorded)
    inference.main(['--n_users', '30', '--n_items', '20', '-f', '4', '--layers', '8', '4',
                    '--device', 'cpu', '--precision', 'bf16', '--impl', impl, '--batch_sizes',
                    '8', '--num_batches', '1', '--warmup', '0', '--log_path',
                    str(tmp_path / 'log.json')])
    scorer, = scorers
    assert scorer.model.mlp[0].weight.dtype == torch.bfloat16
    for kept, trained in zip(scorer.model.output_parameters(),
                             scorer.source.output_parameters()):
        assert kept.dtype == torch.float32 and torch.equal(kept, trained)


# The family: GMF, MLP and MF beside NeuMF ----------------------------------------------------

def test_each_model_has_the_reference_names_of_its_parts():
    shapes = {name: {key: list(p.shape) for key, p in
                     ModelShape(name, 8, [32, 16, 8]).build(30, 50).named_parameters()}
              for name in MODELS}
    assert list(shapes['neumf']) == REFERENCE_PARAMETER_NAMES[:8] + REFERENCE_PARAMETER_NAMES[-2:]
    assert shapes['gmf'] == {'mf_user_embed.weight': [30, 8], 'mf_item_embed.weight': [50, 8],
                             'final.weight': [1, 8], 'final.bias': [1]}
    assert shapes['mlp'] == {'mlp_user_embed.weight': [30, 16], 'mlp_item_embed.weight': [50, 16],
                             'mlp.0.weight': [16, 32], 'mlp.0.bias': [16],
                             'mlp.1.weight': [8, 16], 'mlp.1.bias': [8],
                             'final.weight': [1, 8], 'final.bias': [1]}
    assert shapes['mf'] == {'global_bias': [1], 'mf_user_embed.weight': [30, 8],
                            'mf_item_embed.weight': [50, 8], 'user_bias.weight': [30, 1],
                            'item_bias.weight': [50, 1]}


def test_the_models_compute_what_they_are():
    torch.manual_seed(0)
    users, items = torch.tensor([0, 29, 3]), torch.tensor([49, 0, 7])
    gmf = GMF(30, 50, 8, [32, 16, 8])
    expected = (gmf.mf_user_embed.weight[users] * gmf.mf_item_embed.weight[items]) \
        @ gmf.final.weight.t() + gmf.final.bias
    assert torch.allclose(gmf(users, items), expected)
    mf = MF(30, 50, 8, [32, 16, 8])
    with torch.no_grad():  # biases start at zero: give them values to check
        mf.user_bias.weight.normal_()
        mf.item_bias.weight.normal_()
        mf.global_bias.fill_(0.3)
    expected = (mf.mf_user_embed.weight[users] * mf.mf_item_embed.weight[items]).sum(1) \
        + mf.user_bias.weight[users, 0] + mf.item_bias.weight[items, 0] + 0.3
    assert torch.allclose(mf(users, items).view(-1), expected)
    assert mf.mf_user_embed.weight.std().item() == pytest.approx(MF_INIT_STD, rel=0.15)
    mlp = MLP(30, 50, 8, [32, 16, 8], dropout=0.0)
    x = torch.cat((mlp.mlp_user_embed.weight[users], mlp.mlp_item_embed.weight[items]), 1)
    for layer in mlp.mlp:
        x = torch.relu(layer(x))
    assert torch.allclose(mlp(users, items), mlp.final(x))


@pytest.mark.parametrize('name', MODELS)
def test_every_item_scored_at_once_equals_the_pairs(name):
    torch.manual_seed(0)
    model = ModelShape(name, 8, [32, 16, 8], 0.5).build(40, 30).eval()
    users = torch.arange(40)
    with torch.no_grad():
        every_item = model.all_item_scores(users)
        pairs = model(users.repeat_interleave(30), torch.arange(30).repeat(40)).view(40, 30)
        copy = model.inference_copy(torch.bfloat16)
        assert copy(users, users % 30).dtype == torch.float32  # fp32 logits in bf16 scoring
    assert torch.allclose(every_item, pairs, atol=1e-6)


def test_a_neumf_from_pretrained_branches_mixes_their_logits_exactly():
    """The NCF paper's start: before any step, in eval mode, NeuMF's logit is alpha times
    GMF's plus (1 - alpha) times MLP's."""
    torch.manual_seed(0)
    gmf = GMF(30, 50, 8, [32, 16, 8]).eval()
    mlp = MLP(30, 50, 8, [32, 16, 8], dropout=0.5).eval()
    users, items = torch.arange(30).repeat_interleave(50), torch.arange(50).repeat(30)
    for alpha in (0.5, 0.2, 1.0):
        neumf = NeuMF(30, 50, 8, [32, 16, 8], dropout=0.5)
        neumf.load_branches(gmf, mlp, alpha)
        neumf.eval()
        with torch.no_grad():
            expected = alpha * gmf(users, items) + (1 - alpha) * mlp(users, items)
            assert torch.allclose(neumf(users, items), expected, atol=1e-6)
        assert torch.equal(neumf.mf_user_embed.weight, gmf.mf_user_embed.weight)
        assert torch.equal(neumf.mlp[1].bias, mlp.mlp[1].bias)


@pytest.mark.parametrize('name', MODELS)
def test_the_embedding_penalty_covers_the_rows_a_batch_uses(name):
    torch.manual_seed(0)
    model = ModelShape(name, 8, [32, 16, 8]).build(30, 50)
    with torch.no_grad():  # MF's biases start at zero, where a penalty has no gradient
        for parameter in model.parameters():
            parameter.normal_()
    users, items = torch.tensor([0, 0, 7]), torch.tensor([3, 4, 4])
    expected = sum(table.weight[users if 'user' in key else items].pow(2).sum()
                   for key, table in model.named_children()
                   if isinstance(table, torch.nn.Embedding)) / 3
    penalty = model.embedding_penalty(users, items)
    assert torch.allclose(penalty, expected)
    penalty.backward()
    rows_used = {key: table.weight.grad.abs().sum(1).nonzero().flatten().tolist()
                 for key, table in model.named_children()
                 if isinstance(table, torch.nn.Embedding)}
    assert all(rows == ([0, 7] if 'user' in key else [3, 4]) for key, rows in rows_used.items())


def test_model_shapes_check_their_flags():
    with pytest.raises(UsageError, match='--model must be one of'):
        ModelShape('ncf')
    assert ModelShape('gmf', 16, [64, 32]).record() == {'model': 'gmf', 'factors': 16}
    assert ModelShape('mlp', 16, [64, 32], 0.1).record() == {'model': 'mlp', 'layers': [64, 32],
                                                            'dropout': 0.1}
    assert ModelShape('mf', 16).describe() == 'mf (factors 16)'
