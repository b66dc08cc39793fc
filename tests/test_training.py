"""Training (ncflib/training.py) through ncf.py on tiny data: learning, micro-batches that give
the batch's update, every implementation training as the eager model does, resume equal to an
uninterrupted run, a run that diverges stopping, and one pinned golden-number run."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import dataloading
import ncf
from conftest import ENV, ROOT, SMALL, assert_one_line_error, fails, flags
from logger.logger import read_log
from ncflib import checkpoints, evaluation, runtime, training
from ncflib.models import MODELS, ModelShape, NeuMF
from ncflib.training import History, Trainer


def popularity_hr(data_dir, k=10):
    """HR@k of ranking each user's candidates by training popularity (no model)."""
    dataset = dataloading.load_dataset(data_dir, torch.device('cpu'))
    popularity = torch.bincount(dataset.train_items, minlength=dataset.n_items).double()
    candidates = torch.cat((dataset.test_items[:, None], dataset.test_negatives), dim=1)
    # Break ties against the positive, as the model's metric does.
    rank = evaluation.sampled_rank(popularity[candidates], evaluation.duplicate_mask(candidates))
    return evaluation.ranking_sums(rank, [k])[0].item() / dataset.n_users


def test_training_beats_popularity_and_logs(tiny_data, tmp_path, capsys):
    result = ncf.main(flags(tiny_data, epochs=6, checkpoint_dir=tmp_path))
    baseline = popularity_hr(tiny_data)
    assert result['best_hr'] > baseline + 0.05, (result['hrs'], baseline)
    assert result['hrs'][-1] > result['hrs'][0]
    out = capsys.readouterr().out
    assert 'Epoch 5: HR@10 = ' in out and ', train_time = ' in out
    assert (tmp_path / 'model.pth').exists() and (tmp_path / 'last.pth').exists()

    records = read_log(tmp_path / 'log.json')
    epochs = [r for r in records if isinstance(r['step'], list) and r['step']]
    assert [r['step'] for r in epochs] == [[e] for e in range(6)]
    for key in ('train_throughput', 'eval_throughput', 'hr@10', 'ndcg@10', 'train_loss',
                'validation_loss'):
        assert all(r['data'][key] > 0 for r in epochs)
    summary = [r for r in records if r['step'] == []][-1]['data']
    assert summary['best_accuracy'] == result['best_hr']
    assert summary['best_epoch'] == result['hrs'].index(result['best_hr'])
    for key in ('best_train_throughput', 'best_eval_throughput', 'time_to_target',
                'time_to_best_model'):
        assert summary[key] > 0


def test_the_history_of_a_run():
    history = History()
    assert history.record(0, 0.4, 0.6, (1e5, 1e6), 2.0)      # a first best
    assert not history.record(1, 0.3, 0.5, (2e5, 3e6), 3.0)  # no better
    assert history.record(2, 0.5, 0.4, (3e5, 2e6), 5.0)
    assert (history.epoch, history.best_hr, history.best_epoch) == (2, 0.5, 2)
    summary = history.summary(time_to_target=6.0, compile_time=0.0)
    assert summary['best_train_throughput'] == 3e5 and summary['best_eval_throughput'] == 3e6
    assert summary['mean_train_throughput'] == pytest.approx(2e5)
    assert (summary['time_to_target'], summary['time_to_best_model']) == (6.0, 5.0)
    assert History(**history.state_dict()) == history  # as last.pth keeps it


def test_micro_batches_of_any_size_give_the_same_update():
    positives = dataloading.Dataset(train_users=torch.arange(40).repeat_interleave(5),
                                    train_items=torch.arange(200) % 31, test_items=None,
                                    test_negatives=None, n_users=40, n_items=31, metadata={})
    plan = dataclasses.replace(
        runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl='eager')),
        fused_optimizer=False)

    def one_epoch(grads_accumulated, micro_batch):
        torch.manual_seed(0)
        model = NeuMF(40, 31, 8, [16, 8], dropout=0.0)
        batches = dataloading.TrainBatches(positives, dataclasses.replace(
            plan, micro_batch=micro_batch), 400, 1, grads_accumulated)
        trainer = Trainer(plan, model, batches, 0.01, (0.9, 0.999), 1e-8)
        loss_sum, count = trainer.epoch(torch.Generator().manual_seed(1))
        return batches, model.state_dict(), loss_sum.item() / count

    _, whole, whole_loss = one_epoch(1, None)
    for grads_accumulated, micro_batch, sizes in ((2, None, [200, 200]),
                                                  (4, None, [100] * 4),
                                                  (1, 100, [100] * 4),
                                                  (1, 150, [134, 133, 133]),  # uneven
                                                  (2, 90, [67, 67, 66] * 2)):
        batches, split, split_loss = one_epoch(grads_accumulated, micro_batch)
        assert [part.stop - part.start for part in batches.micro_slices] == sizes
        assert split_loss == pytest.approx(whole_loss, rel=1e-6)
        for key in whole:
            assert torch.allclose(whole[key], split[key], atol=1e-6), key


@pytest.mark.parametrize('n_rows', [(50, 31), (10_000, 10_000)])  # all zeroed, or by index
@pytest.mark.parametrize('model', MODELS)  # MF's biases take autograd's gradient
def test_kept_table_gradients_train_as_gradients_made_for_each_micro_batch(model, n_rows,
                                                                          monkeypatch):
    """cpu_fused keeps the tables' dense gradients from step to step, sums each micro-batch into
    them and zeroes the step's rows after it: training as with a table-sized gradient made for
    each micro-batch (bit for bit in whole batches; within rounding in micro-batches, whose
    rows add up in another order), and every step leaves the same tensor, all zeros (users
    from 40 are never drawn: rows that no step touches)."""
    n_users, n_items = n_rows
    positives = dataloading.Dataset(train_users=torch.arange(40).repeat_interleave(5),
                                    train_items=torch.arange(200) % 31, test_items=None,
                                    test_negatives=None, n_users=n_users, n_items=n_items,
                                    metadata={})
    plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl='cpu_fused'))

    def trained(micro_batch, kept):
        monkeypatch.setattr(runtime.Plan, 'kept_table_gradients', property(lambda _: kept))
        torch.manual_seed(0)
        net = plan.build_model(ModelShape(model, 8, (16, 8), 0.0), n_users, n_items)
        batches = dataloading.TrainBatches(positives, dataclasses.replace(
            plan, micro_batch=micro_batch), 1200, 5)  # one step an epoch, of 1,200 samples
        trainer = Trainer(plan, net, batches, 0.01, (0.9, 0.999), 1e-8, embedding_l2=1e-3)
        tables = [module.weight for module in net.embeddings().values()]
        gradients = [table.grad for table in tables]
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            trainer.epoch(generator)
            for table, gradient in zip(tables, gradients):
                assert table.grad is gradient and (gradient is None or not gradient.any())
        assert all(gradient is not None for gradient in gradients) == kept
        return net.state_dict()

    for micro_batch in (None, 600):  # the first MLP layer per distinct row from 512 samples
        kept, made = trained(micro_batch, True), trained(micro_batch, False)
        for key in made:
            if micro_batch is None:
                assert torch.equal(kept[key], made[key]), key
            else:
                assert torch.allclose(kept[key], made[key], atol=1e-6), key


@pytest.mark.parametrize('impl', ['auto', 'compile'])
def test_resume_after_a_crash_matches_an_uninterrupted_run(impl, tiny_data, tmp_path,
                                                           monkeypatch, capsys):
    run = dict(data=tiny_data, epochs=4, dropout=0.3, impl=impl)
    uninterrupted = ncf.main(flags(**run, checkpoint_dir=tmp_path / 'a'))

    real_epoch = training.Trainer.epoch
    calls = []

    def crash_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while training epoch 2
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(training.Trainer, 'epoch', crash_in_epoch_2)
    with pytest.raises(SystemExit) as exit_info:
        ncf.main(flags(**run, checkpoint_dir=tmp_path / 'b'))
    assert exit_info.value.code == 130  # Ctrl-C: one line saying what was kept
    assert capsys.readouterr().err.strip() == (
        f'ncf.py: interrupted: {tmp_path / "b" / "last.pth"} from epoch 1 kept '
        '(--resume continues from it)')
    monkeypatch.setattr(training.Trainer, 'epoch', real_epoch)
    state = torch.load(tmp_path / 'b' / 'last.pth', weights_only=True)
    assert state['history']['epoch'] == 1

    resumed = ncf.main(flags(**run, checkpoint_dir=tmp_path / 'b', resume=True))
    if impl == 'compile':
        # inductor's embedding backward adds with atomics: equal up to rounding, not bitwise
        assert resumed['hrs'] == pytest.approx(uninterrupted['hrs'], abs=2.5 / 300)
        assert resumed['train_losses'][2:] == pytest.approx(uninterrupted['train_losses'][2:],
                                                            rel=1e-3)
    else:
        assert resumed['hrs'] == uninterrupted['hrs']
        assert resumed['best_hr'] == uninterrupted['best_hr']
    epochs = [r['step'] for r in read_log(tmp_path / 'b' / 'log.json')
              if isinstance(r['step'], list) and r['step']]
    assert epochs == [[0], [1], [2], [3]]  # the resumed run appends to the log


def run_small(small_data, **overrides):
    return ncf.main(flags(small_data, base=SMALL, **overrides))


@pytest.mark.parametrize('device, impl', [
    ('cpu', 'cpu_fused'), ('cpu', 'fused'),  # compile on a CPU: test_distributed.py
    pytest.param('cuda', 'compile', marks=pytest.mark.cuda),
    pytest.param('cuda', 'fused', marks=pytest.mark.cuda)])
def test_every_implementation_trains_as_eager_does(device, impl, small_data, capsys):
    from ncflib import fused
    if impl == 'fused' and not fused.available()[0]:
        pytest.skip(fused.available()[1])
    if impl == 'fused' and device == 'cpu' and os.environ.get('TRITON_INTERPRET') != '1':
        pytest.skip("fused runs on a CPU only in Triton's interpreter")
    eager = run_small(small_data, impl='eager', device=device)
    other = run_small(small_data, impl=impl, device=device)
    assert f'implementation: {impl}, device: {device}' in capsys.readouterr().out
    assert other['train_losses'] == pytest.approx(eager['train_losses'],
                                                  rel=1e-4 if device == 'cpu' else 1e-3)
    assert other['hrs'] == pytest.approx(eager['hrs'], abs=1.5 / 60)  # a tie may flip a user
    assert eager['hrs'][-1] > eager['hrs'][0]


@pytest.mark.cuda
def test_gpu_mixed_precision_and_fused_adam(tiny_data):
    result = ncf.main(flags(tiny_data, epochs=3, amp=True, device='cuda'))
    assert result['best_hr'] > popularity_hr(tiny_data)


@pytest.mark.cuda
def test_cuda_compiled_run_prints_no_tf32_advice(tiny_data, tmp_path):
    """torch.compile's advice to turn TF32 on is not printed: the plan chose the precision. In
    a process of its own: torch gives the advice once per process."""
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'ncf.py')]
        + flags(tiny_data, epochs=1, device='cuda', impl='compile',
                checkpoint_dir=tmp_path / 'ck', log_path=tmp_path / 'log.json'),
        capture_output=True, text=True, env=ENV, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    output = completed.stdout + completed.stderr
    assert 'Compiled' in output and runtime.TF32_ADVICE not in output


@pytest.mark.cuda
@pytest.mark.parametrize('precision', ['bf16', 'fp16', 'tf32'])
def test_cuda_default_in_reduced_precision_tracks_fp32(precision, small_data):
    reference = run_small(small_data, impl='eager', device='cuda')
    mixed = run_small(small_data, device='cuda', precision=precision)
    assert mixed['train_losses'] == pytest.approx(reference['train_losses'], rel=0.02)
    assert mixed['hrs'] == pytest.approx(reference['hrs'], abs=0.05)


def test_golden_numbers(tiny_data):
    """A tiny seeded run whose per-epoch loss and HR are pinned: a change to the data pipeline,
    the model, its initialisation, the sampler or the optimizer shows here. The eager model in
    fp32, whose figures differ between CPUs only at rounding level (measured on 2 vCPU AMD EPYC,
    torch 2.13.0)."""
    result = ncf.main(flags(tiny_data, epochs=4, impl='eager', precision='fp32'))
    assert result['train_losses'] == pytest.approx([0.54904, 0.50370, 0.47865, 0.44789],
                                                   rel=1e-3)
    assert result['hrs'] == pytest.approx([0.38333, 0.47, 0.63, 0.71], abs=0.01)


def test_training_that_diverges_stops_in_one_line_and_keeps_the_best(tiny_data, tmp_path,
                                                                     capsys, monkeypatch):
    """Weights turned NaN in epoch 2: the run stops before evaluating or saving them;
    model.pth keeps the best of epochs 0 and 1, last.pth epoch 1."""
    real_epoch = training.Trainer.epoch
    calls = []

    def epoch_that_breaks(self, *args, **kwargs):
        result = real_epoch(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.model.final.weight.fill_(float('nan'))
        return result
    monkeypatch.setattr(training.Trainer, 'epoch', epoch_that_breaks)
    directory = tmp_path / 'ck'
    with pytest.raises(SystemExit) as exit_info:
        ncf.main(flags(tiny_data, epochs=5, checkpoint_dir=directory, precision='fp32'))
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, 'training diverged in epoch 2 (weights are not finite',
                          f'{directory / "last.pth"} from epoch 1 kept')
    hrs = [float(line.split('HR@10 = ')[1].split(',')[0])
           for line in captured.out.splitlines() if line.startswith('Epoch ')]
    assert len(hrs) == 2
    assert checkpoints.read(str(directory / 'last.pth'))['history']['epoch'] == 1
    monkeypatch.setattr(training.Trainer, 'epoch', real_epoch)
    tested = ncf.main(flags(tiny_data, mode='test', checkpoint_dir=directory,
                            log_path=os.devnull, precision='fp32'))
    assert tested['hr'] == pytest.approx(max(hrs), abs=1e-4)
    # a learning rate that blows the weights up in the first steps: the loss is not finite
    fails(ncf.main, flags(tiny_data, epochs=2, checkpoint_dir=tmp_path / 'huge',
                          precision='fp32', learning_rate=1e30), capsys,
          'training diverged in epoch 0 (the training loss is nan')
    assert not (tmp_path / 'huge' / 'model.pth').exists()


def popularity_full_hr(data_dir, k=10):
    """HR@k of ranking all items by training popularity (no model), the training items of each
    user left out, ties against the positive."""
    dataset = dataloading.load_dataset(data_dir, torch.device('cpu'))
    popularity = torch.bincount(dataset.train_items, minlength=dataset.n_items).double()
    trained = torch.zeros(dataset.n_users, dataset.n_items, dtype=torch.bool)
    trained[dataset.train_users, dataset.train_items] = True
    rows = torch.arange(dataset.n_users)
    competitors = ~trained
    competitors[rows, dataset.test_items] = False
    rank = ((popularity >= popularity[dataset.test_items][:, None]) & competitors).sum(1)
    return evaluation.ranking_sums(rank, [k])[0].item() / dataset.n_users


@pytest.mark.parametrize('model', ['neumf', 'gmf', 'mlp', 'mf'])
def test_each_model_beats_popularity_under_both_protocols(model, family, tiny_data):
    directory, result = family[model]
    sampled, full = popularity_hr(tiny_data), popularity_full_hr(tiny_data)
    assert result['best_hr'] > sampled + 0.1, (result['hrs'], sampled)
    tested = ncf.main(flags(tiny_data, mode='test', eval_mode='full', checkpoint_dir=directory,
                            log_path=os.devnull, precision='fp32'))
    assert tested['hr'] > full + 0.1, (tested['hr'], full)


def test_sgd_and_the_penalties_change_the_run_as_they_should(tiny_data, tmp_path):
    """--optimizer sgd is plain SGD; --embedding_l2 pulls the tables in, --weight_decay the
    dense layers' weights, and decays nothing else."""
    from ncflib.models import ModelShape

    dataset = dataloading.load_dataset(tiny_data, torch.device('cpu'))
    plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl='eager'))
    batches = dataloading.TrainBatches(dataset, plan, 2048, 4)
    norms = {}
    for name, settings in (('adam', {}), ('sgd', {'optimizer': 'sgd'}),
                           ('l2', {'embedding_l2': 1.0}), ('decay', {'weight_decay': 1.0})):
        torch.manual_seed(0)
        model = plan.build_model(ModelShape('neumf', 8, [32, 16, 8], 0.0), dataset.n_users,
                                 dataset.n_items)
        trainer = Trainer(plan, model, batches, learning_rate=0.01, **settings)
        assert type(trainer.optimizer).__name__ == ('SGD' if name == 'sgd' else 'Adam')
        if name == 'decay':
            decaying, others = trainer.optimizer.param_groups
            assert decaying['weight_decay'] == 1.0 and others['weight_decay'] == 0
            assert decaying['params'] == [layer.weight for layer in model.mlp] \
                + [model.final.weight]
        trainer.epoch(plan.generator(1))
        norms[name] = (model.mf_user_embed.weight.norm().item(),
                       model.mlp[0].weight.norm().item())
    # Adam's normalised steps move the tables far more than SGD's at this learning rate
    assert norms['sgd'][0] < norms['adam'][0]
    # the L2 penalty shrinks the tables, weight decay the dense layers (and not the tables)
    assert norms['l2'][0] < 0.5 * norms['adam'][0]
    assert norms['decay'][1] < 0.7 * norms['adam'][1]
