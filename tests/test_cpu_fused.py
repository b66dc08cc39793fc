"""--impl cpu_fused computes what the eager model computes, for every model of the family:
same loss, gradients and updates."""
import pytest
import torch
import torch.nn.functional as F

from ncflib import cpu_fused
from ncflib.cpu_fused import CpuFusedNeuMF, _ReluDropout
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


@pytest.mark.parametrize('model', MODELS)
def test_loss_gradients_and_adam_update_match_the_plain_path(model):
    plain, fast = twin_models(model=model)
    users, items, labels = batch()
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
        for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), (step, name)


def test_bf16_fast_path_tracks_the_plain_path():
    plain, fast = twin_models()
    users, items, labels = batch()
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
