"""The fast path computes what the plain path computes: same loss, gradients and updates."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dataloading
import ncf
from conftest import ROOT, TINY
from neumf import NeuMF, _ReluDropout


def twin_models(dropout=0.0):
    torch.manual_seed(0)
    plain = NeuMF(50, 40, 8, [32, 16, 8], dropout=dropout, fast=False)
    fast = NeuMF(50, 40, 8, [32, 16, 8], dropout=dropout, fast=True)
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


def test_loss_gradients_and_adam_update_match_the_plain_path():
    plain, fast = twin_models()
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


def test_cpu_micro_batches_split_the_same_epoch():
    users = torch.arange(100).repeat_interleave(4)
    items = torch.arange(400) % 37
    whole = dataloading.TrainBatches(users, items, 37, 3, batch_size=800)
    split = dataloading.TrainBatches(users, items, 37, 3, batch_size=800, max_micro_batch=200)
    assert (whole.micro_batches, split.micro_batches, split.micro_batch) == (1, 4, 200)
    for a, b in zip(whole.epoch(torch.Generator().manual_seed(0)),
                    split.epoch(torch.Generator().manual_seed(0))):
        assert torch.equal(a.flatten(1), b.flatten(1))
    assert dataloading._split_factor(1000, 300) == 4      # 250 each
    assert dataloading._split_factor(1009, 300) == 1      # a prime: left whole
    assert dataloading._split_factor(2 ** 20, 16384) == 64
    assert dataloading._split_factor(100, 300) == 1


def test_fast_path_is_the_default_and_plain_is_a_flag(tiny_data, capsys):
    assert not ncf.parse_args([]).plain and ncf.parse_args(['--plain']).plain
    assert NeuMF(3, 3, 2, [4, 2]).fast
    device = torch.device('cpu')
    expected = 'bf16' if ncf.cpu_has_native_bf16() else 'fp32'
    assert ncf.resolve_precision(ncf.parse_args([]), device) == expected
    assert ncf.resolve_precision(ncf.parse_args(['--opt_level', 'O0']), device) == 'fp32'
    assert ncf.resolve_precision(ncf.parse_args(['--amp']), device) == 'bf16'
    ncf.main(['--data', tiny_data, '-e', '1', '--plain'] + TINY)
    assert 'plain path' in capsys.readouterr().out
    ncf.main(['--data', tiny_data, '-e', '1'] + TINY)
    assert 'fast path' in capsys.readouterr().out


def test_throughput_benchmark_runs_both_paths(tiny_data):
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks', 'throughput.py'), '--data', tiny_data,
         '--device', 'cpu', '--batch_size', '4096', '--steps', '2',
         '--extra', '-f 8 --layers 32 16 8'], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result['shape']['n_users'] == 300 and result['batch_size'] == 4096
    assert result['plain']['precision'] == 'fp32'
    for path in ('plain', 'fast'):
        for key in ('train_step_samples_per_s', 'train_epoch_samples_per_s',
                    'eval_samples_per_s', 'first_step_s'):
            assert result[path][key] > 0
    for key in ('train_speedup', 'train_step_speedup', 'eval_speedup'):
        assert result[key] > 0


def test_factorised_all_item_scores_equal_the_forward_over_all_pairs():
    from neumf import all_item_scores
    for fast in (True, False):
        torch.manual_seed(0)
        model = NeuMF(50, 40, 8, [32, 16, 8], dropout=0.5, fast=fast).eval()
        users = torch.tensor([3, 0, 49, 3])
        with torch.no_grad():
            pairs = model(users.repeat_interleave(40), torch.arange(40).repeat(4)).view(4, 40)
            assert torch.allclose(all_item_scores(model, users, 40), pairs, atol=1e-6)
    with pytest.raises(AssertionError):
        all_item_scores(model.train(), users, 40)
