"""--embedding_updates sparse (ncflib/sparse_updates.py): the touched rows of a batch by hand,
lazy Adam against dense Adam on the rows a batch touches at every step in every implementation
and model, SGD equal to dense SGD, exact resume, two processes as one, and the bad input."""
import dataclasses

import pytest
import torch

import dataloading
import ncf
from conftest import fails, flags
from ncflib import cpu_fused, fused, runtime
from ncflib.cli import UsageError
from ncflib.models import ModelShape
from ncflib.sparse_updates import LazyAdam, SparseUpdates, touched_rows
from ncflib.training import Trainer
from test_distributed import hrs_of, torchrun


def test_the_touched_rows_of_a_batch():
    rows, slots, source = touched_rows(torch.tensor([5, 2, 5, 9, 2]), 4)
    assert rows.tolist() == [2, 5, 9, 2]          # ascending, then the first again
    assert slots.tolist() == [1, 0, 1, 2, 0]
    assert source.tolist() == [0, 1, 2, 0]        # the padding takes the first row's gradient
    rows, slots, source = touched_rows(torch.tensor([3, 3]), 2)
    assert (rows.tolist(), slots.tolist(), source.tolist()) == ([3, 3], [0, 0], [0, 0])
    # without a capacity (no static shapes: eager on a CPU), the distinct rows alone
    rows, slots, source = touched_rows(torch.tensor([5, 2, 5, 9, 2]))
    assert (rows.tolist(), slots.tolist(), source) == ([2, 5, 9], [1, 0, 1, 2, 0], None)


@pytest.mark.parametrize('impl, static', [('eager', False), ('cpu_fused', False),
                                          ('compile', True)])
def test_the_rows_a_step_gathers_are_the_touched_ones_or_a_fixed_capacity(impl, static):
    plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl=impl))
    assert plan.static_shapes == static
    net = plan.build_model(ModelShape('neumf', 8, (16, 8), 0.0), 50, 40)
    sparse = SparseUpdates(plan, net, 400, 'adam', 0.01, (0.9, 0.999), 1e-8)
    _, _, rows = sparse.gather(torch.tensor([7, 3, 7]), torch.tensor([1, 1, 2]))
    assert len(rows['mlp_user_embed']) == (50 if static else 2)
    assert len(rows['mf_item_embed']) == (40 if static else 2)


@pytest.mark.parametrize('fused', [False, True])
def test_lazy_adam_is_adam_on_rows_touched_at_every_step_and_leaves_the_others(fused):
    torch.manual_seed(0)
    start = torch.randn(10, 3)
    dense, lazy = start.clone().requires_grad_(), start.clone()
    adam = torch.optim.Adam([dense], lr=0.1, betas=(0.8, 0.9), eps=1e-6, fused=fused)
    lazy_adam = LazyAdam([lazy], lr=0.1, betas=(0.8, 0.9), eps=1e-6, fused=fused)
    for step in range(6):
        index = torch.tensor([1, 4, 4] + ([7] if step == 0 else []))  # 7 once, 0 never
        rows, slots, source = touched_rows(index, 5)
        grad = torch.randn(len(index), 3)
        dense.grad = torch.zeros(10, 3).index_add_(0, index, grad)
        adam.step()
        lazy_adam.step({lazy: (rows, source, lazy[rows],
                               torch.zeros(5, 3).index_add_(0, slots, grad))})
    assert torch.equal(lazy[[1, 4]], dense.detach()[[1, 4]])  # the same kernel, bit for bit
    untouched = [0, 2, 3, 5, 6, 8, 9]
    assert torch.equal(lazy[untouched], start[untouched])
    # dense Adam keeps moving row 7 on its moment; lazy Adam stepped it once
    assert not torch.allclose(lazy[7], dense.detach()[7], atol=1e-3)


POSITIVES = dataloading.Dataset(train_users=torch.arange(40).repeat_interleave(5),
                                train_items=torch.arange(200) % 31, test_items=None,
                                test_negatives=None, n_users=50, n_items=40, metadata={})


def trained_tables(impl, model, optimizer, updates, embedding_l2=0.0):
    """The model's state after five epochs of one step (every training pair and a negative
    each: users 40-49 never drawn), and the rows each side touched at every step."""
    plan = dataclasses.replace(
        runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl=impl)),
        fused_optimizer=False)
    torch.manual_seed(0)
    net = plan.build_model(ModelShape(model, 8, (16, 8), 0.0), 50, 40)
    batches = dataloading.TrainBatches(POSITIVES, plan, 400, 1)
    trainer = Trainer(plan, net, batches, 0.01, (0.9, 0.999), 1e-8, optimizer, embedding_l2,
                      embedding_updates=updates)
    generator = torch.Generator().manual_seed(1)
    every = {'user': set(range(50)), 'item': set(range(40))}
    for _ in range(5):
        users, items, labels = trainer.draw(generator)
        trainer.step(users[0], items[0], labels[0])
        every['user'] &= set(users[0].tolist())
        every['item'] &= set(items[0].tolist())
    return net.state_dict(), every


# cpu_fused's first layer per distinct row, which the 400 samples of these steps are too few for
PER_DISTINCT_ROW = 'cpu_fused, first layer per distinct row'


def implementation(impl, monkeypatch):
    if impl == PER_DISTINCT_ROW:
        monkeypatch.setattr(cpu_fused, 'DISTINCT_FROM', 1)
        return 'cpu_fused'
    return impl


@pytest.mark.parametrize('impl, model', [('eager', 'neumf'), ('eager', 'mf'),
                                         ('cpu_fused', 'neumf'), ('cpu_fused', 'gmf'),
                                         ('cpu_fused', 'mlp'), (PER_DISTINCT_ROW, 'neumf'),
                                         (PER_DISTINCT_ROW, 'mlp'), ('compile', 'neumf'),
                                         ('fused', 'neumf')])
def test_sparse_is_dense_on_the_rows_touched_at_every_step(impl, model, monkeypatch):
    """Where every row a step touches is touched at every step, the forward and every gradient
    are dense Adam's: the same model, and the rows never touched where they started (the Triton
    kernels in Triton's interpreter, which conftest sets up without CUDA)."""
    impl = implementation(impl, monkeypatch)
    if impl == 'fused' and not fused.available()[0]:
        pytest.skip(fused.available()[1])
    dense, every = trained_tables(impl, model, 'adam', 'dense', embedding_l2=1e-3)
    sparse, _ = trained_tables(impl, model, 'adam', 'sparse', embedding_l2=1e-3)
    torch.manual_seed(0)
    start = ModelShape(model, 8, (16, 8), 0.0).build(50, 40).state_dict()
    assert every['user'] == set(range(40)) and len(every['item']) > 31
    for name in dense:
        assert torch.allclose(sparse[name], dense[name], atol=1e-6), name
        if 'user' in name:  # users 40-49
            assert torch.equal(sparse[name][40:], start[name][40:]), name


@pytest.mark.parametrize('impl', ['cpu_fused', PER_DISTINCT_ROW])
def test_sparse_sgd_is_dense_sgd(impl, monkeypatch):
    impl = implementation(impl, monkeypatch)
    dense, _ = trained_tables(impl, 'neumf', 'sgd', 'dense')
    sparse, _ = trained_tables(impl, 'neumf', 'sgd', 'sparse')
    for name in dense:
        assert torch.allclose(sparse[name], dense[name], atol=1e-6), name


def test_a_sparse_run_resumes_exactly_and_learns(tiny_data, tmp_path):
    run = dict(data=tiny_data, dropout=0.3, embedding_updates='sparse')
    uninterrupted = ncf.main(flags(**run, epochs=4, checkpoint_dir=tmp_path / 'a'))
    ncf.main(flags(**run, epochs=2, checkpoint_dir=tmp_path / 'b'))
    resumed = ncf.main(flags(**run, epochs=4, checkpoint_dir=tmp_path / 'b', resume=True))
    assert resumed['hrs'] == uninterrupted['hrs']
    assert resumed['train_losses'] == uninterrupted['train_losses']
    assert uninterrupted['hrs'][-1] > uninterrupted['hrs'][0]
    state = torch.load(tmp_path / 'b' / 'last.pth', weights_only=True)
    assert state['settings']['embedding_updates'] == 'sparse'
    assert len(state['table_optimizer']['state']) == 4  # NeuMF's four tables


def test_two_processes_update_the_rows_as_one(tiny_data, tmp_path):
    run = dict(data=tiny_data, epochs=2, dropout=0, precision='fp32', eval_mode='full',
               embedding_updates='sparse')
    single = ncf.main(flags(**run))
    completed = torchrun(flags(**run))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert 'sparse embedding updates' in completed.stdout
    assert hrs_of(completed.stdout) == pytest.approx(single['hrs'], abs=2 / 300)


def test_sparse_updates_refuse_fp16_and_a_changed_resume(tiny_data, tmp_path, capsys):
    plan = dataclasses.replace(runtime.resolve(runtime.PlanOptions(device='cpu',
                                                                   precision='fp32')),
                               precision='fp16')
    with pytest.raises(UsageError, match='needs --precision fp32, tf32 or bf16'):
        SparseUpdates(plan, ModelShape().build(5, 5), 8, 'adam', 0.001, (0.9, 0.999), 1e-8)
    ncf.main(flags(tiny_data, epochs=1, checkpoint_dir=tmp_path))
    capsys.readouterr()
    fails(ncf.main, flags(tiny_data, epochs=2, checkpoint_dir=tmp_path, resume=True,
                          embedding_updates='sparse'),
          capsys, '--embedding_updates dense -> sparse')
    resumed = ncf.main(flags(tiny_data, epochs=2, checkpoint_dir=tmp_path, resume=True,
                             embedding_updates='sparse', allow_changed_settings=True))
    assert 'the optimizer starts afresh' in capsys.readouterr().out
    assert len(resumed['hrs']) == 2
    fails(ncf.main, flags(tiny_data, embedding_updates='lazy'), capsys,
          "--embedding_updates: invalid choice: 'lazy'", code=2)
