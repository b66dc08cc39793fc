"""A training run's epochs and evaluations: train, evaluate the selection set (the validation
holdout where the cache has one, else the test set, as the reference does), keep the best model,
stop at the threshold and, with a holdout, test the selected model once, at the end; --mode
test's one evaluation; and what rank 0 prints and logs. ncf.py and tune.py run it in-process.
"""
import dataclasses
import math
import sys

import torch

from logger import Logger
from ncflib import checkpoints, runtime
from ncflib.cli import UsageError
from ncflib.evaluation import NonFiniteScores
from ncflib.files import atomic_write
from ncflib.training import History

# What selects the best epoch (and what --threshold compares): a figure of the metrics.
SELECTION_METRICS = ('hr', 'ndcg', 'mrr')


def tensorboard_writer_class():
    """torch's SummaryWriter, which needs the tensorboard package: checked before any work."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError('--tensorboard needs the tensorboard package: pip install tensorboard') \
            from None
    return SummaryWriter


class Report:
    """What rank 0 prints and logs (other ranks say nothing): the console, the JSON log in
    dllogger's layout, and TensorBoard scalars when asked for."""

    def __init__(self, plan, log_path=None, append=False, tensorboard=None):
        self.rank0 = plan.rank == 0
        self.logger = Logger(log_path if self.rank0 else None, append=append)
        self.writer = tensorboard_writer_class()(tensorboard) if tensorboard and self.rank0 \
            else None

    def say(self, *parts):
        if self.rank0:
            print(*parts, flush=True)

    def epoch(self, epoch, figures):
        self.logger.log((epoch,), figures)
        if self.writer is not None:
            for name, value in figures.items():
                self.writer.add_scalar(name, value, epoch)
            self.writer.flush()

    def close(self):
        self.logger.close()
        if self.writer is not None:
            self.writer.close()


def more_metrics(metrics, metrics_at):
    """The lines of figures beyond HR and NDCG at --topk: --metrics_at's; with several
    positives per user, precision, recall and MAP at each K; in full ranking, coverage and the
    mean popularity of the top K."""
    lines = []
    if metrics_at:
        lines.append(', '.join([f'HR@{k} = {metrics.at[k][0]:.4f}, NDCG@{k} = '
                                f'{metrics.at[k][1]:.4f}' for k in metrics_at]
                               + [f'MRR = {metrics.mrr:.4f}']))
    ks = list(metrics.at)
    if metrics.several:
        lines.append(', '.join(f'Precision@{k} = {metrics.at[k][2]:.4f}, Recall@{k} = '
                               f'{metrics.at[k][3]:.4f}, MAP@{k} = {metrics.at[k][4]:.4f}'
                               for k in ks))
    if metrics.catalogue:
        lines.append(', '.join(f'Coverage@{k} = {metrics.catalogue[k][0]:.4f}, mean '
                               f'popularity@{k} = {metrics.catalogue[k][1]:.1f}' for k in ks))
    return lines


def prefixed(figures, prefix):
    return {prefix + name: value for name, value in figures.items()}


def evaluate_once(plan, evaluations, report, metrics_at, ranks_output=None):
    """--mode test: one evaluation of the loaded model on each of `evaluations` ({'validation':
    Evaluation, 'test': ...}; the test set alone prints the reference's lines), and with
    `ranks_output` the test users' ranks written there (write_ranks). Returns {split:
    Metrics}."""
    compile_time = sum(evaluation.warm_up() for evaluation in evaluations.values())
    if plan.compiled:
        report.say(f'Compiled the evaluation in {compile_time:.1f} s')
    named = len(evaluations) > 1
    results, logged, throughputs = {}, {}, []
    for split, evaluation in evaluations.items():
        start = plan.time()
        metrics = results[split] = evaluation()
        val_time = plan.time() - start
        throughputs.append(evaluation.samples / val_time)
        topk = evaluation.ks[0]
        title = f'{split.capitalize()}: ' if named else ''
        report.say(f'{title}HR@{topk} = {metrics.hr:.4f}, NDCG@{topk} = {metrics.ndcg:.4f}')
        for line in more_metrics(metrics, metrics_at):
            report.say(line)
        loss_name = 'test_loss' if named and split == 'test' else 'validation_loss'
        report.say(f'{loss_name} = {metrics.loss:.4f}, eval_throughput = '
                   f'{throughputs[-1]:.3e} samples/s, val_time = {val_time:.2f}')
        if named:  # valid_hr@10, valid_loss, test_hr@10, test_loss...
            logged.update(prefixed({**metrics.figures(metrics_at), 'loss': metrics.loss},
                                   'valid_' if split == 'validation' else 'test_'))
        else:
            logged.update({**metrics.figures(metrics_at), 'validation_loss': metrics.loss})
    report.logger.log((), {'best_eval_throughput': max(throughputs), **logged})
    if ranks_output:
        write_ranks(plan, evaluations['test'], ranks_output, report)
    return results


def write_ranks(plan, evaluation, path, report):
    """CSV `user,rank` at `path`: a row per test positive of every process (in user order) with
    its 0-based position in its user's ranking, as the metrics count it (one per user in
    leave-one-out); written by rank 0, atomically (its directory made if missing, as
    check_output_file allows)."""
    offset, users, ranks = evaluation.ranks()
    # A slot per positive of all processes holding user + 1 and rank: each process fills its own
    # contiguous share, so a sum over the processes gathers them all, in one all-reduce of known
    # size (the processes' shares differ in size: no all_gather padding).
    slots = torch.zeros(evaluation.positive_total, 2, dtype=torch.int64, device=plan.device)
    slots[offset:offset + len(users), 0] = users + 1
    slots[offset:offset + len(users), 1] = ranks.long()
    if plan.distributed:
        torch.distributed.all_reduce(slots)
    if plan.rank != 0:
        return
    slots = slots.cpu()
    rows = ''.join(f'{user - 1},{rank}\n' for user, rank in slots.tolist())

    def write(temporary):
        with open(temporary, 'w') as file:
            file.write('user,rank\n' + rows)
    atomic_write(path, write, make_parents=True)
    counted = len(torch.unique(slots[:, 0]))
    report.say(f'Ranks of the {counted} test users written to {path}' + (
        f' ({len(slots)} positives)' if len(slots) != counted else ''))


@dataclasses.dataclass
class Saving:
    """Where and how a training run keeps its checkpoints: its directory
    (checkpoints.CheckpointDirectory; empty: none) and what they record (the run's settings,
    its model's shape and its data's fingerprint)."""
    directory: checkpoints.CheckpointDirectory
    settings: object
    shape: object
    fingerprint: str


def train(trainer, selection, report, epochs, threshold, seed, saving, started, metrics_at=(),
          resume=None, test=None, select_by='hr', on_epoch=None):
    """Epochs until `epochs` or until the selection figure reaches `threshold`: train, evaluate
    `selection` (an Evaluation: the validation set, or the test set without a holdout), report,
    keep the best model (by `select_by`, one of SELECTION_METRICS) and save. With `test` (the
    test set's Evaluation, where `selection` is the validation set), the selected model is
    tested once, after the last epoch. resume: (last.pth's state, its path) to continue from.
    on_epoch(epoch, metrics): called on every process after each epoch's evaluation (tune.py
    prunes there, by raising). started: plan.time() when the run started. Returns the run's
    figures."""
    plan, batches, say = trainer.plan, trainer.batches, report.say
    directory = saving.directory
    generator = plan.generator(seed)
    history, best_state = History(), None
    if resume is not None:
        history = checkpoints.restore_training_state(resume[0], resume[1], trainer, generator,
                                                     seed, say)
        say(f'Resuming after epoch {history.epoch} from {resume[1]}')
        if history.epoch >= 0:
            directory.saved_epoch = history.epoch
        if test is not None and history.best_epoch >= 0:
            best_state = checkpoints.model_state(checkpoints.read(directory.best),
                                                 directory.best)
    # Time already spent before a resume counts towards time_to_target.
    time_offset = history.elapsed
    compile_time = trainer.warm_up() + selection.warm_up() + (test.warm_up() if test else 0.0)
    if plan.compiled:
        say(f'Compiled the training step and the evaluation in {compile_time:.1f} s (counted '
            'in time_to_target, not in train_time or val_time)')

    def progress(steps):
        if plan.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm
            return tqdm(steps, leave=False, unit='step')
        return steps

    held_out = test is not None
    # validation figures say so, in print and in the log (a tune.py trial has no test set)
    validating = selection.split == 'validation'
    topk = selection.ks[0]
    for epoch in range(history.epoch + 1, epochs):
        begin = plan.time()
        loss_sum, samples = trainer.epoch(generator, progress)
        train_time = plan.time() - begin
        train_loss_sum, train_samples = runtime.all_reduce_sums([loss_sum, samples], plan)
        train_loss = train_loss_sum / train_samples
        # A model that turned NaN or infinite is never evaluated, saved or taken as the best.
        if not math.isfinite(train_loss) or not trainer.weights_are_finite():
            what = (f'the training loss is {train_loss}' if not math.isfinite(train_loss)
                    else 'weights are not finite (NaN or infinite)')
            raise UsageError(f'training diverged in epoch {epoch} ({what}; a lower '
                             f'--learning_rate may help); {directory.kept()}')
        begin = plan.time()
        try:
            metrics = selection()
        except NonFiniteScores as error:
            raise UsageError(f'epoch {epoch}: {error}; {directory.kept()}') from None
        val_time = plan.time() - begin
        # Samples actually trained (the last partial batch is dropped), over all ranks.
        train_throughput = batches.steps * batches.batch_size / train_time
        eval_throughput = selection.samples / val_time

        which = 'validation ' if validating else ''
        say(f'Epoch {epoch}: {which}HR@{topk} = {metrics.hr:.4f}, NDCG@{topk} = '
            f'{metrics.ndcg:.4f}, train_time = {train_time:.2f}, val_time = {val_time:.2f}')
        say(f'         train_loss = {train_loss:.4f}, validation_loss = {metrics.loss:.4f}, '
            f'train_throughput = {train_throughput:.3e} samples/s, '
            f'eval_throughput = {eval_throughput:.3e} samples/s')
        for line in more_metrics(metrics, metrics_at):
            say(f'         {line}')
        figures = metrics.figures(metrics_at)
        report.epoch(epoch, {'train_throughput': train_throughput,
                             **(prefixed(figures, 'valid_') if validating else figures),
                             'train_epoch_time': train_time, 'validation_epoch_time': val_time,
                             'eval_throughput': eval_throughput, 'train_loss': train_loss,
                             'validation_loss': metrics.loss})
        if on_epoch is not None:
            on_epoch(epoch, metrics)

        chosen = getattr(metrics, select_by)
        best = history.record(epoch, chosen, train_loss, (train_throughput, eval_throughput),
                              time_offset + plan.time() - started)
        if best and held_out:  # the selected model, for the test at the end
            best_state = {name: value.detach().clone()
                          for name, value in trainer.model.state_dict().items()}
        if directory and plan.rank == 0:
            if best:
                say(f'New best {which}{select_by}! Saving the model to: ', directory.best)
                checkpoints.save_model(trainer.model, directory.best, saving.fingerprint,
                                       saving.shape)
            checkpoints.save_training_state(directory.last, trainer, generator, history,
                                            saving.settings, saving.fingerprint, saving.shape)
            directory.saved_epoch = epoch
        if chosen >= threshold:
            say(f'Hit threshold of {threshold}')
            break

    summary = history.summary(time_offset + plan.time() - started, compile_time)
    tested = None
    if held_out:
        tested = test_selected(trainer, test, best_state, history, report, metrics_at,
                               select_by, directory)
        summary.update({'selected_epoch': history.best_epoch,
                        **prefixed(tested.figures(metrics_at), 'test_'),
                        'test_loss': tested.loss})
    report.logger.log((), summary)
    say(', '.join(f'{key} = {value:.4g}' if isinstance(value, float) else f'{key} = {value}'
                  for key, value in summary.items()))
    return {'hrs': history.hrs, 'train_losses': history.train_losses,
            'best_hr': history.best_hr, 'best_epoch': history.best_epoch, 'test': tested,
            'summary': summary}


def test_selected(trainer, test, best_state, history, report, metrics_at, select_by, directory):
    """The test set's figures of the model selected on validation (the last one where no epoch
    improved on 0), read once; printed, returned as Metrics."""
    if best_state is not None:
        trainer.model.load_state_dict(best_state)
        which = f'the model of epoch {history.best_epoch} (selected on validation {select_by})'
    else:
        which = 'the last model (no epoch scored above 0 on validation)'
    try:
        tested = test()
    except NonFiniteScores as error:
        raise UsageError(f'the test: {error}; {directory.kept()}') from None
    topk = test.ks[0]
    report.say(f'Test of {which}: HR@{topk} = {tested.hr:.4f}, NDCG@{topk} = '
               f'{tested.ndcg:.4f}, test_loss = {tested.loss:.4f}')
    for line in more_metrics(tested, metrics_at):
        report.say(f'         {line}')
    return tested
