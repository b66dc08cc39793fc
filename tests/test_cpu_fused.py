"""--impl cpu_fused computes what the eager model computes, for every model of the family:
same loss, gradients and updates, with the first MLP layer per distinct row (batches from
DISTINCT_FROM samples) and per sample (smaller ones)."""
import pytest
import torch
import torch.nn.functional as F

from ncflib import cpu_fused
from ncflib.cpu_fused import CpuFusedNeuMF, _ReluDropout, distinct
from ncflib.models import MODELS, ModelShape, NeuMF


def twin_models(dropout=0.0, model='neumf'):
    torch.manual_seed(0)
    shape = ModelShape(model, 8, [32, 16, 8], dropout)
    plain = shape.build(50, 40)
    fast = shape.build(50, 40, cpu_fused.MODEL_CLASSES)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def batch(size=600, seed=1):
    generator = torch.Generator().manual_seed(seed)
    users = torch.randint(0, 50, (size,), generator=generator)
    items = torch.randint(0, 40, (size,), generator=generator)  # many repeated rows
    labels = (torch.rand(size, generator=generator) < 0.3).float()
    return users, items, labels


def loss_of(model, users, items, labels, dtype=None):
    with torch.autocast('cpu', dtype=dtype, enabled=dtype is not None):
        logits = model(users, items)
    return F.binary_cross_entropy_with_logits(logits.float().view(-1), labels)


def autograd_nodes(tensor):
    """The names of the autograd graph's nodes behind `tensor`."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize('size', [cpu_fused.DISTINCT_FROM + 88, cpu_fused.DISTINCT_FROM - 1])
@pytest.mark.parametrize('model', MODELS)
def test_loss_gradients_and_adam_update_match_the_plain_path(model, size):
    plain, fast = twin_models(model=model)
    users, items, labels = batch(size)
    per_distinct_row = '_FirstLayerBackward' in autograd_nodes(loss_of(fast, users, items,
                                                                       labels))
    assert per_distinct_row == (fast.HAS_MLP and size >= cpu_fused.DISTINCT_FROM)
    optimizers = [torch.optim.Adam(plain.parameters(), lr=0.01, betas=(0.25, 0.5)),
                  torch.optim.Adam(fast.parameters(), lr=0.01, betas=(0.25, 0.5), fused=True)]
    for step in range(3):
        losses = [loss_of(model, users, items, labels) for model in (plain, fast)]
        assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6)
        for loss in losses:
            loss.backward()
        for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8), name
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        # Adam divides by |gradient|: a component summed to near eps (1e-8) from terms that
        # cancel, in another order (the first layer per distinct row), moves by up to ~1e-3
        # of lr more or less; any wrong gradient moves by up to lr (0.01)
        for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-5), (step, name)


@pytest.mark.parametrize('size', [cpu_fused.DISTINCT_FROM + 88, cpu_fused.DISTINCT_FROM - 1])
def test_bf16_fast_path_tracks_the_plain_path(size):
    plain, fast = twin_models()
    users, items, labels = batch(size)
    reference = loss_of(plain, users, items, labels)
    reference.backward()
    approximate = loss_of(fast, users, items, labels, torch.bfloat16)
    approximate.backward()
    assert approximate.item() == pytest.approx(reference.item(), rel=2e-2)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        cosine = F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cosine > 0.99, name


def test_evaluation_is_the_same_and_needs_no_grad():
    plain, fast = twin_models(dropout=0.5)
    plain.eval(), fast.eval()
    users, items, _ = batch()
    with torch.no_grad():
        assert torch.allclose(plain(users, items, sigmoid=True), fast(users, items, sigmoid=True),
                              atol=1e-6)


@pytest.mark.parametrize('n_rows', [7, 100_000])  # marks, then torch.unique
def test_distinct_rows_and_each_entry_s_position(n_rows):
    rounding = cpu_fused.DISTINCT_ROWS_ROUNDING
    index = torch.tensor([5, 2, 5, 6, 2, 0])
    values, slots = distinct(index, n_rows)
    assert values.tolist() == [0, 2, 5, 6] + [0] * (rounding - 4)  # padded with the first
    assert slots.tolist() == [2, 1, 2, 3, 1, 0]
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, min(n_rows, 5000), (3000,), generator=generator)
    values, slots = distinct(index, n_rows)
    unique = torch.unique(index)
    assert len(values) == -(-len(unique) // rounding) * rounding
    assert torch.equal(values[:len(unique)], unique) and torch.equal(values[slots], index)


def test_relu_dropout_mask_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(2000, 300, requires_grad=True)
    for p in (0.5, 0.2):
        y = _ReluDropout.apply(x, p)
        positive = x > 0
        kept = y != 0
        assert not (kept & ~positive).any()  # only positive inputs survive
        rate = (kept.sum() / positive.sum()).item()
        assert rate == pytest.approx(1 - p, abs=0.01)
        assert torch.allclose(y[kept], x[kept] / (1 - p))
        grad = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, grad)
        assert torch.allclose(gx, torch.where(kept, grad / (1 - p), torch.zeros(()))), p
    assert torch.equal(_ReluDropout.apply(x, 0.0), torch.relu(x))


def test_factorised_all_item_scores_equal_the_forward_over_all_pairs():
    for model_class in (NeuMF, CpuFusedNeuMF):
        torch.manual_seed(0)
        model = model_class(50, 40, 8, [32, 16, 8], dropout=0.5).eval()
        users = torch.tensor([3, 0, 49, 3])
        with torch.no_grad():
            pairs = model(users.repeat_interleave(40), torch.arange(40).repeat(4)).view(4, 40)
            assert torch.allclose(model.all_item_scores(users), pairs, atol=1e-6)
            # the inference copy, weights cast once to bf16, scores alike
            copy = model.inference_copy(torch.bfloat16)
            assert copy.mf_user_embed.weight.dtype == torch.bfloat16 and not copy.training
            assert torch.allclose(copy.all_item_scores(users), pairs, atol=0.05)
    with pytest.raises(AssertionError):
        model.train().all_item_scores(users)
