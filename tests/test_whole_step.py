"""--impl compile on a CPU in one process (ncflib/whole_step.py): the whole step, optimizer
included, as one compiled graph: the eager step's arithmetic for every model with dense and
sparse updates, Adam and SGD, the penalties and micro-batches; one graph, compiled once, by a
warm-up that changes nothing; exact resume; and where the plan takes it."""
import dataclasses

import pytest
import torch

import dataloading
import ncf
from conftest import flags
from ncflib import runtime
from ncflib.models import ModelShape
from ncflib.training import Trainer

POSITIVES = dataloading.Dataset(train_users=torch.arange(40).repeat_interleave(5),
                                train_items=torch.arange(200) % 31, test_items=None,
                                test_negatives=None, n_users=50, n_items=40, metadata={})


def trainer_of(impl, model='neumf', updates='dense', optimizer='adam', micro_batch=None,
               weight_decay=0.0, embedding_l2=0.0, dropout=0.0):
    plan = dataclasses.replace(
        runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl=impl)),
        micro_batch=micro_batch)
    torch.manual_seed(0)
    net = plan.build_model(ModelShape(model, 8, (16, 8), dropout), 50, 40)
    batches = dataloading.TrainBatches(POSITIVES, plan, 200, 1)  # two steps an epoch
    return Trainer(plan, net, batches, 0.01, (0.9, 0.999), 1e-8, optimizer, embedding_l2,
                   weight_decay, updates)


def train(trainer, epochs=2):
    """The loss sum of each step."""
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(epochs):
        users, items, labels = trainer.draw(generator)
        losses += [float(trainer.step(users[step], items[step], labels[step]))
                   for step in range(trainer.batches.steps)]
    return losses


def optimizer_states(trainer):
    optimizers = [trainer.optimizer] + ([trainer.sparse.optimizer] if trainer.sparse else [])
    return [optimizer.state_dict()['state'] for optimizer in optimizers]


@pytest.mark.parametrize('model, updates, optimizer, micro_batch, weight_decay, embedding_l2', [
    ('neumf', 'dense', 'adam', 128, 1e-3, 1e-3),  # two micro-batches
    ('neumf', 'sparse', 'adam', None, 0.0, 1e-3),
    ('mlp', 'sparse', 'adam', 128, 1e-3, 0.0),
    ('gmf', 'dense', 'sgd', None, 1e-3, 0.0),
    ('mf', 'sparse', 'sgd', None, 0.0, 1e-3),
])
def test_the_whole_step_trains_as_the_eager_step(model, updates, optimizer, micro_batch,
                                                 weight_decay, embedding_l2):
    """The same losses, weights and optimizer state (Adam's in torch's layout, which
    checkpoints keep) as the eager implementation's autograd and torch's optimizers."""
    settings = dict(model=model, updates=updates, optimizer=optimizer, micro_batch=micro_batch,
                    weight_decay=weight_decay, embedding_l2=embedding_l2)
    whole, eager = trainer_of('compile', **settings), trainer_of('eager', **settings)
    assert whole.whole_step is not None and eager.whole_step is None
    assert len(whole.batches.micro_slices) == (2 if micro_batch else 1)
    assert train(whole) == pytest.approx(train(eager), rel=1e-5)
    expected = eager.model.state_dict()
    for name, value in whole.model.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    for states, expected_states in zip(optimizer_states(whole), optimizer_states(eager)):
        assert states.keys() == expected_states.keys()
        for index, state in states.items():
            assert state.keys() == expected_states[index].keys()
            for key, value in state.items():
                assert torch.allclose(value, expected_states[index][key], atol=1e-6), key


def test_the_warm_up_compiles_the_one_graph_and_changes_nothing():
    """After the warm-up no step compiles again, and the run (dropout's draws included) is
    the run without a warm-up, bit for bit."""
    from torch._dynamo.utils import counters
    settings = dict(updates='sparse', dropout=0.3)
    warmed, cold = trainer_of('compile', **settings), trainer_of('compile', **settings)
    start = {name: value.clone() for name, value in warmed.model.state_dict().items()}
    rng = torch.get_rng_state()
    assert warmed.warm_up() > 0
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in warmed.model.state_dict().items():
        assert torch.equal(value, start[name]), name
    graphs = counters['stats']['unique_graphs']
    torch.manual_seed(2)  # dropout's
    losses = train(warmed)
    assert counters['stats']['unique_graphs'] == graphs
    torch.manual_seed(2)
    assert losses == train(cold)
    for name, value in warmed.model.state_dict().items():
        assert torch.equal(value, cold.model.state_dict()[name]), name


@pytest.mark.parametrize('updates', ['dense', 'sparse'])
def test_a_whole_step_run_resumes_exactly_and_learns(tiny_data, tmp_path, capsys, updates):
    run = dict(data=tiny_data, dropout=0.3, impl='compile', embedding_updates=updates)
    uninterrupted = ncf.main(flags(**run, epochs=3, checkpoint_dir=tmp_path / 'a'))
    assert 'the optimizer inside the compiled step' in capsys.readouterr().out
    ncf.main(flags(**run, epochs=1, checkpoint_dir=tmp_path / 'b'))
    resumed = ncf.main(flags(**run, epochs=3, checkpoint_dir=tmp_path / 'b', resume=True))
    assert resumed['hrs'] == uninterrupted['hrs']
    assert resumed['train_losses'] == uninterrupted['train_losses']
    assert uninterrupted['hrs'][-1] > uninterrupted['hrs'][0]


def test_the_plan_takes_the_whole_step_for_compile_on_a_cpu_in_one_process():
    plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl='compile'))
    assert plan.whole_step
    assert 'the optimizer inside the compiled step' in plan.describe()
    for other in (dataclasses.replace(plan, impl='cpu_fused'),
                  dataclasses.replace(plan, impl='eager'),
                  dataclasses.replace(plan, world_size=2),  # DDP's hooks are autograd's
                  dataclasses.replace(plan, compile_fallback=True)):  # auto's compile
        assert not other.whole_step
        assert 'the optimizer inside' not in other.describe()
