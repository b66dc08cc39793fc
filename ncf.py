"""Train a Neural Collaborative Filtering model (NeuMF, or GMF, MLP, MF) and report HR@K /
NDCG@K.

    python ncf.py --data data/cache/ml-20m
    python ncf.py --data data/cache/ml-20m --model mf -l 0.005
    torchrun --nproc_per_node=8 ncf.py --data /data/cache/ml-20m
    python ncf.py --data data/cache/ml-20m --mode test --load_checkpoint_path checkpoints/model.pth
    python ncf.py --data data/cache/ml-20m --mode recommend --load_checkpoint_path ... --users 12,57

The script: parse the flags, join the run's processes, check everything it will read and write
(reading the checkpoints, which may give the model), resolve the runtime plan
(ncflib/runtime.py), load the data and the model, then train, test or recommend. Nothing but the
tests imports it; what it runs lives in ncflib (training, evaluation, checkpoints, ...).
"""
import dataclasses
import math
import os
import sys

from ncflib import cli

if __name__ == '__main__':
    cli.handle_signals_early('ncf.py')  # Ctrl-C while torch loads is one line too

import torch  # noqa: E402

import dataloading  # noqa: E402
from logger import Logger  # noqa: E402
from logger.autologging import log_args, log_hardware  # noqa: E402
from ncflib import checkpoints, models, recommend, runtime  # noqa: E402
from ncflib.cache import CACHE_FILES, VALID_NEGATIVE, read_id_maps  # noqa: E402
from ncflib.cli import (ArgumentParser, UsageError, check_log_file,  # noqa: E402
                        check_output_file, check_paths_apart, check_writable_directory,
                        first_line, out_of_memory, run_main, warn)
from ncflib.evaluation import Evaluation, NonFiniteScores  # noqa: E402
from ncflib.recipe import (DEFAULT_BATCH_SIZE, DEFAULT_BETAS, DEFAULT_EPOCHS,  # noqa: E402
                           DEFAULT_EPS, DEFAULT_LEARNING_RATE, DEFAULT_NEGATIVE_SAMPLES)
from ncflib.training import OPTIMIZERS, History, RunSettings, Trainer  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description='Train a Neural Collaborative Filtering model')
    parser.add_argument('--data', type=str, required=True,
                        help='Path to test and training data files')
    parser.add_argument('-e', '--epochs', type=int, default=DEFAULT_EPOCHS,
                        help='Number of epochs for training')
    parser.add_argument('-b', '--batch_size', type=int, default=DEFAULT_BATCH_SIZE,
                        help='Number of examples for each iteration (global: split across '
                             'processes and accumulated gradients)')
    parser.add_argument('--valid_batch_size', type=int, default=2 ** 20,
                        help='Number of examples in each validation chunk')
    parser.add_argument('--model', choices=models.MODELS, default=models.DEFAULT_MODEL,
                        help="neumf: the reference's; gmf and mlp: NeuMF's two branches alone "
                             '(the NCF paper\'s); mf: dot-product matrix factorisation with '
                             'biases (Rendle et al. 2020). Test and recommend modes take the '
                             "checkpoint's model")
    parser.add_argument('-f', '--factors', type=int, default=models.DEFAULT_FACTORS,
                        help='Number of predictive factors (neumf, gmf, mf)')
    parser.add_argument('--layers', nargs='+', type=int, default=list(models.DEFAULT_LAYERS),
                        help='Sizes of hidden layers for MLP (neumf, mlp)')
    parser.add_argument('-n', '--negative_samples', type=int, default=DEFAULT_NEGATIVE_SAMPLES,
                        help='Number of negative examples per interaction')
    parser.add_argument('-l', '--learning_rate', type=float, default=DEFAULT_LEARNING_RATE,
                        help='Learning rate for optimizer')
    parser.add_argument('-k', '--topk', type=int, default=10,
                        help='Rank for test examples to be considered a hit')
    parser.add_argument('--seed', '-s', type=int, default=1,
                        help='Manually set random seed for torch')
    parser.add_argument('--threshold', '-t', type=float, default=1.0,
                        help='Stop training early at threshold')
    parser.add_argument('--valid_negative', type=int, default=VALID_NEGATIVE,
                        help='Number of negative samples for each positive test example (drawn '
                             'anew at load time when the cache has another number)')
    parser.add_argument('--beta1', '-b1', type=float, default=DEFAULT_BETAS[0],
                        help='Beta1 for Adam')
    parser.add_argument('--beta2', '-b2', type=float, default=DEFAULT_BETAS[1],
                        help='Beta2 for Adam')
    parser.add_argument('--eps', type=float, default=DEFAULT_EPS, help='Epsilon for Adam')
    parser.add_argument('--optimizer', choices=OPTIMIZERS, default='adam',
                        help="adam: the reference's; sgd: plain SGD, as the NCF paper trains a "
                             'NeuMF from pretrained branches')
    parser.add_argument('--embedding_l2', type=float, default=0.0,
                        help='L2 penalty on the embedding rows each sample uses (sum of their '
                             'squares, averaged over the batch), as SGD-trained MF regularises')
    parser.add_argument('--weight_decay', type=float, default=0.0,
                        help="Weight decay of the dense layers' weights (the optimizer's)")
    parser.add_argument('--pretrained_gmf', default=None, metavar='CHECKPOINT',
                        help='--model neumf: start from this trained GMF (with '
                             '--pretrained_mlp), as the NCF paper')
    parser.add_argument('--pretrained_mlp', default=None, metavar='CHECKPOINT',
                        help='--model neumf: start from this trained MLP (with --pretrained_gmf)')
    parser.add_argument('--alpha', type=float, default=0.5,
                        help='With pretrained branches: the output layer is [alpha * GMF\'s, '
                             "(1 - alpha) * MLP's], its bias likewise")
    parser.add_argument('--metrics_at', nargs='+', type=int, default=[], metavar='K',
                        help='Also report HR@K and NDCG@K at each of these K (each once), and '
                             'the mean reciprocal rank (MRR), per epoch and in the log')
    parser.add_argument('--dropout', type=float, default=models.DEFAULT_DROPOUT,
                        help='Dropout probability, if equal to 0 will not use dropout at all')
    parser.add_argument('--checkpoint_dir', default='', type=str,
                        help='Path to the directory storing the checkpoint files (model.pth, '
                             'last.pth); empty: no checkpoints')
    parser.add_argument('--load_checkpoint_path', default=None, type=str,
                        help='Path to the checkpoint file to be loaded before training/evaluation '
                             '(test and recommend modes: CHECKPOINT_DIR/model.pth if not given)')
    parser.add_argument('--mode', choices=['train', 'test', 'recommend'], default='train',
                        type=str,
                        help='Passing "test" will only run a single evaluation, otherwise full '
                             'training will be performed; "recommend" writes each user\'s top-K '
                             'unseen items')
    parser.add_argument('--grads_accumulated', default=1, type=int,
                        help='Number of gradients to accumulate before performing an optimization '
                             'step (each is batch_size / (world_size * grads_accumulated))')
    runtime.add_arguments(parser)
    parser.add_argument('--log_path', default=None, type=str,
                        help='Path for the JSON training log (None: log.json in '
                             'CHECKPOINT_DIR, or in the current directory)')
    parser.add_argument('--resume', action='store_true',
                        help='Continue from CHECKPOINT_DIR/last.pth')
    parser.add_argument('--allow_changed_settings', action='store_true',
                        help='--resume even where a setting that alters the run (batch, '
                             'learning rate, seed, layers, dropout, negatives...) differs from '
                             "the checkpoint's")
    parser.add_argument('--overwrite_checkpoints', action='store_true',
                        help='Start a new training run in a --checkpoint_dir that holds '
                             "another run's model.pth, last.pth or log.json, replacing them "
                             '(without it, that is an error: --resume continues that run)')
    parser.add_argument('--allow_other_data', action='store_true',
                        help='Use a checkpoint trained on other data than --data (its data '
                             'fingerprint differs)')
    parser.add_argument('--eval_mode', choices=['sampled', 'full'], default='sampled',
                        help="sampled: the test positive against its test negatives (the "
                             "reference's); full: against every item without a training "
                             'interaction')
    parser.add_argument('--negative_sampling', choices=['approximate', 'exact'],
                        default='approximate',
                        help="approximate: training negatives uniform over all items (the "
                             "reference's, one may be a positive); exact: never a training "
                             'positive of the user')
    parser.add_argument('--users', default=None,
                        help="recommend mode: comma-separated user ids (the dataset's own; "
                             'None: all users)')
    parser.add_argument('--users_file', default=None,
                        help='recommend mode: a file of user ids, one per line')
    parser.add_argument('--output', default=None,
                        help='recommend mode: CSV file to write (None: stdout)')
    parser.add_argument('--tensorboard', default=None, metavar='DIR',
                        help='also write the per-epoch figures as TensorBoard scalars to DIR')
    parser.add_argument('--local_rank', '--local-rank', default=0, type=int,
                        help='Set by torch.distributed.launch (torchrun sets LOCAL_RANK instead)')
    args = parser.parse_args(argv)
    args.given = parser.given_flags(argv)
    args.metrics_at = list(dict.fromkeys(args.metrics_at))  # a K given twice is reported once
    try:
        args.plan_options = runtime.PlanOptions.from_flags(vars(args))
    except UsageError as error:  # contradicting flags: argparse's kind of error
        parser.error(str(error))
    return args


def model_shape(args, read):
    """The model to build: the flags' in training, the checkpoint's in test and recommend modes
    (where a model flag given on the command line must agree with it)."""
    if read.load is None or args.mode == 'train':
        return models.ModelShape(args.model, args.factors, args.layers, args.dropout)
    shape, n_users, n_items = checkpoints.shape_of(read.load, read.load_path)
    checkpoints.check_given_flags(read.load_path, shape, n_users, n_items, vars(args),
                                  args.given, f"--mode {args.mode} uses the checkpoint's model "
                                  '(leave the flag out)')
    return shape


def check_args(args, processes):
    for name in ('learning_rate', 'beta1', 'beta2', 'eps', 'threshold', 'embedding_l2',
                 'weight_decay', 'alpha'):
        if not math.isfinite(getattr(args, name)):
            raise UsageError(f'--{name} must be a finite number, not {getattr(args, name)}')
    if args.learning_rate <= 0:
        raise UsageError(f'--learning_rate must be positive, not {args.learning_rate}')
    for name in ('embedding_l2', 'weight_decay'):
        if getattr(args, name) < 0:
            raise UsageError(f'--{name} must not be negative, not {getattr(args, name)}')
    check_pretrained_args(args)
    if args.metrics_at and min(args.metrics_at) < 1:
        raise UsageError(f'--metrics_at must be positive, not {min(args.metrics_at)}')
    for name in ('beta1', 'beta2'):
        if not 0 <= getattr(args, name) < 1:
            raise UsageError(f'--{name} must be in [0, 1), not {getattr(args, name)}')
    if args.eps <= 0:
        raise UsageError(f'--eps must be positive, not {args.eps}')
    for name in ('epochs', 'batch_size', 'valid_batch_size', 'negative_samples',
                 'topk', 'valid_negative', 'grads_accumulated'):
        if getattr(args, name) < (0 if name == 'epochs' else 1):
            raise UsageError(f'--{name} must be positive, not {getattr(args, name)}')
    if args.batch_size % (processes.world_size * args.grads_accumulated):
        raise UsageError(f'--batch_size {args.batch_size} is not divisible by world size '
                         f'{processes.world_size} x --grads_accumulated {args.grads_accumulated}')
    if args.mode != 'recommend' and args.eval_mode == 'sampled':
        for name, k in [('topk', args.topk)] + [('metrics_at', k) for k in args.metrics_at]:
            if k > args.valid_negative + 1:
                raise UsageError(f'--{name} {k} is larger than the {args.valid_negative + 1} '
                                 'candidates of each user (--valid_negative + 1)')
    if args.mode != 'recommend' and (args.users or args.users_file or args.output):
        raise UsageError('--users, --users_file and --output are for --mode recommend')
    if args.mode == 'recommend' and (args.log_path or args.tensorboard):
        raise UsageError('--mode recommend writes no log: --log_path and --tensorboard are for '
                         'train and test modes')
    if args.mode == 'recommend' and processes.distributed:
        raise UsageError('--mode recommend runs in one process, not under torchrun')
    if args.resume and not args.checkpoint_dir:
        raise UsageError('--resume needs --checkpoint_dir (it continues from last.pth there)')
    if args.resume and args.overwrite_checkpoints:
        raise UsageError('--resume continues the run in --checkpoint_dir, '
                         '--overwrite_checkpoints replaces it: give one of them')
    if args.resume and args.mode != 'train':
        raise UsageError('--resume is for training; --mode test takes --load_checkpoint_path')


def check_pretrained_args(args):
    """--pretrained_gmf and --pretrained_mlp start a new NeuMF training run, both together."""
    given = [f'--pretrained_{kind}' for kind in ('gmf', 'mlp')
             if getattr(args, f'pretrained_{kind}')]
    if not given:
        if 'alpha' in args.given:
            raise UsageError('--alpha mixes pretrained branches: it needs --pretrained_gmf and '
                             '--pretrained_mlp')
        return
    if len(given) == 1:
        other = '--pretrained_mlp' if given[0] == '--pretrained_gmf' else '--pretrained_gmf'
        raise UsageError(f'{given[0]} needs {other} too: a NeuMF starts from both branches')
    if args.model != 'neumf':
        raise UsageError(f'--pretrained_gmf and --pretrained_mlp build a NeuMF, not --model '
                         f'{args.model}')
    if args.mode != 'train' or args.resume or args.load_checkpoint_path:
        raise UsageError('--pretrained_gmf and --pretrained_mlp start a new training run: not '
                         'with --resume, --load_checkpoint_path or --mode test / recommend')
    if not 0 <= args.alpha <= 1:
        raise UsageError(f'--alpha must be in [0, 1], not {args.alpha}')


def check_outputs(args, processes, directory):
    """Every place the run will write, checked before any work (creating nothing)."""
    if processes.rank != 0:
        return
    if directory:
        check_writable_directory(directory.path, '--checkpoint_dir')
        holder = directory.holder()
        if holder:
            raise UsageError(f'--checkpoint_dir {directory.path} is in use by {holder}: '
                             'one training run per directory')
        if not args.resume and not args.overwrite_checkpoints:
            held = [path for path in run_files(args, directory) if os.path.exists(path)]
            if held:
                raise UsageError(
                    f'--checkpoint_dir {directory.path} holds another run\'s '
                    f'{", ".join(os.path.basename(path) for path in held)}: --resume continues '
                    'that run, --overwrite_checkpoints starts a new one in its place')
    if args.log_path:
        check_log_file(args.log_path, '--log_path')
    if args.tensorboard:
        check_writable_directory(args.tensorboard, '--tensorboard')
    if args.output:
        check_output_file(args.output, '--output')
    check_no_output_is_an_input(args, directory)


def run_files(args, directory):
    """The files a training run writes in its checkpoint directory: its checkpoints, and its
    log when it goes there."""
    return [directory.best, directory.last] + ([] if args.log_path else [directory.log])


def check_no_output_is_an_input(args, directory):
    """Every file the run writes is apart from every file it reads (the cache's, a checkpoint
    to load or evaluate, the pretrained branches, the users file), from every other file it
    writes (checkpoints, their lock, the log, the recommendations) and from the directories it
    writes into. --resume's last.pth is its own to replace."""
    reads = {os.path.join(args.data, name): f"the cache's {name}" for name in CACHE_FILES}
    for flag in ('load_checkpoint_path', 'users_file', 'pretrained_gmf', 'pretrained_mlp'):
        if getattr(args, flag):
            reads[getattr(args, flag)] = f'--{flag}'
    if args.mode != 'train' and not args.load_checkpoint_path:
        evaluated = checkpoints.CheckpointDirectory(args.checkpoint_dir).best
        reads[evaluated] = f'the checkpoint it evaluates ({evaluated})'
    # the flags' files first: the message then names the flag to change
    writes, directories = [], []
    log = log_path_of(args, directory, quiet=True) if args.mode != 'recommend' else None
    if log and args.log_path:
        writes.append((log, f'--log_path {log}'))
    elif log and not directory:  # else among run_files
        writes.append((log, f'the log {log}'))
    if args.output:
        writes.append((args.output, f'--output {args.output}'))
    if args.tensorboard:
        directories.append((args.tensorboard, f'--tensorboard {args.tensorboard}'))
    if directory:
        directories.append((directory.path, f'--checkpoint_dir {directory.path}'))
        writes += [(path, f"--checkpoint_dir's {os.path.basename(path)}")
                   for path in run_files(args, directory) + [directory.lock_file]]
    check_paths_apart(reads, writes, directories)


def log_path_of(args, directory, quiet=False):
    """Where the JSON log goes: --log_path, or log.json in CHECKPOINT_DIR (or the current
    directory). A test of a trained model appends to the training's log where it may: never
    does it fail for want of a writable directory (None: not logged; said unless `quiet`)."""
    if args.log_path:
        return args.log_path
    path = checkpoints.CheckpointDirectory(args.checkpoint_dir or '.').log
    if args.mode == 'test':
        try:
            check_log_file(path)
        except UsageError:
            if not quiet:
                warn(f'{path} is not writable: this evaluation is not logged (--log_path sets '
                     'another place)')
            return None
    return path


def check_args_against_data(args, dataset):
    if args.mode == 'recommend' or args.eval_mode == 'full':
        for name, k in [('topk', args.topk)] + [('metrics_at', k) for k in args.metrics_at]:
            if k > dataset.n_items:
                raise UsageError(f'--{name} {k} is larger than the catalogue '
                                 f'({dataset.n_items} items)')


def check_free_items(args, exclusion):
    """Exact negatives need an item outside each user's training items."""
    if args.negative_sampling == 'exact' and args.mode == 'train':
        full = torch.nonzero(exclusion.free_counts == 0).flatten()
        if len(full):
            raise UsageError(f'user {int(full[0])} (mapped id) has a training interaction with '
                             'every item: --negative_sampling exact has nothing to draw')


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


@dataclasses.dataclass
class Checkpoints:
    """The checkpoints a run reads, read and checked before any work: last.pth for --resume,
    the one to start from or to evaluate (--load_checkpoint_path, or CHECKPOINT_DIR's
    model.pth in test and recommend modes), and the pretrained branches ({'gmf': (state,
    path), 'mlp': ...})."""
    resume: dict = None
    resume_path: str = None
    load: dict = None
    load_path: str = None
    pretrained: dict = None


def prepare(args, processes, directory):
    """The checks that need no data: flags, output places, checkpoints to read. `processes`:
    this run's (the plan comes after them: it needs the model, which a checkpoint may give)."""
    check_args(args, processes)
    check_outputs(args, processes, directory)
    if args.tensorboard:
        tensorboard_writer_class()  # the package is there
    read = Checkpoints()
    if args.resume:
        read.resume_path = directory.last
        read.resume = checkpoints.read(read.resume_path)
    if args.mode != 'train' or args.load_checkpoint_path:
        read.load_path = (args.load_checkpoint_path
                          or checkpoints.CheckpointDirectory(args.checkpoint_dir).best)
        read.load = checkpoints.read(read.load_path)
    if args.pretrained_gmf:
        read.pretrained = {kind: (checkpoints.read(path), path) for kind, path in
                           (('gmf', args.pretrained_gmf), ('mlp', args.pretrained_mlp))}
    return read


@dataclasses.dataclass
class Run:
    """What a run is made of, once the data is loaded and checked against the flags and the
    checkpoints read."""
    settings: RunSettings
    shape: models.ModelShape
    read: Checkpoints
    dataset: dataloading.Dataset
    exclusion: dataloading.ItemExclusion  # where needed, else None
    batches: dataloading.TrainBatches
    model: torch.nn.Module
    started: float  # plan.time() when the run started, after the checks that need no data


def speaker(plan):
    """print, on rank 0; nothing on the others."""
    def say(*parts):
        if plan.rank == 0:
            print(*parts, flush=True)
    return say


def load(args, plan, shape, read, started):
    """The data, checked against the flags and the checkpoints, and the model of `shape` built
    on it."""
    say = speaker(plan)
    settings = RunSettings.of(vars(args))
    # Recommendations and full ranking use no test negatives: never draw new ones for them.
    valid_negative = args.valid_negative if args.mode != 'recommend' and \
        args.eval_mode == 'sampled' else None
    dataset = dataloading.load_dataset(args.data, plan.device, valid_negative, args.seed, say)
    check_args_against_data(args, dataset)
    exclusion = None
    if args.mode == 'recommend' or args.eval_mode == 'full' or args.negative_sampling == 'exact':
        exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                              dataset.n_users, dataset.n_items)
        check_free_items(args, exclusion)
    batches = dataloading.TrainBatches(
        dataset, plan, args.batch_size, args.negative_samples, args.grads_accumulated,
        exclusion=exclusion if args.negative_sampling == 'exact' else None)
    if args.mode == 'train' and batches.steps == 0:
        raise UsageError(f'--batch_size {args.batch_size} is larger than an epoch '
                         f'({batches.samples} samples): no step would be trained')
    model = plan.build_model(shape, dataset.n_users, dataset.n_items)
    for state, path in ((read.load, read.load_path), (read.resume, read.resume_path)):
        if state is not None:
            checkpoints.check_data(state, path, dataset, args.allow_other_data, say)
            checkpoints.load_model_state(model, state, path)
    if read.pretrained is not None:
        checkpoints.load_pretrained(model, shape, read.pretrained, args.alpha, dataset,
                                    args.allow_other_data, say)
        say(f'Starting from {read.pretrained["gmf"][1]} and {read.pretrained["mlp"][1]} '
            f'(alpha {args.alpha})')
    if read.resume is not None:
        checkpoints.check_settings(read.resume, read.resume_path, settings,
                                   args.allow_changed_settings, say)
    return Run(settings, shape, read, dataset, exclusion, batches, model.to(plan.device),
               started)


def run(args, plan, directory, shape, read):
    if plan.rank == 0:
        for warning in plan.warnings:
            warn(warning)
    torch.manual_seed(args.seed)
    runtime.barrier(plan)  # start the clock together
    setup = runtime.together(plan, load, args, plan, shape, read, plan.time())
    load_time = plan.time() - setup.started
    if args.mode == 'recommend':
        return recommend_users(args, plan, setup)

    evaluation = Evaluation(plan, setup.dataset, setup.model, args.topk, args.eval_mode,
                            setup.exclusion, args.metrics_at)
    # Every input has been checked: only now is anything written, by one run per directory.
    lock = None
    if directory:
        lock = runtime.together(plan, lambda: directory.lock() if plan.rank == 0 else None)
        if args.overwrite_checkpoints and not args.resume and plan.rank == 0:
            # the directory then only ever holds this run's files
            for path in run_files(args, directory):
                if os.path.exists(path):
                    os.remove(path)
    # A resumed run, or a test of a trained model, continues the training's log.
    report = Report(plan, log_path_of(args, directory), append=args.resume or args.mode == 'test',
                    tensorboard=args.tensorboard)
    try:
        log_hardware(report.logger)
        log_args(report.logger, {name: value for name, value in vars(args).items()
                                 if name not in ('plan_options', 'given')})
        report.logger.log('PARAMETER', {'dataset': setup.dataset.metadata,
                                        'plan': plan.describe()})
        report.logger.metadata('train_throughput', {'unit': 'samples/s', 'format': ':.3e'})
        report.logger.metadata('eval_throughput', {'unit': 'samples/s', 'format': ':.3e'})
        report.logger.metadata(f'hr@{args.topk}', {'unit': None, 'format': ':.5f'})
        dataset = setup.dataset
        report.say(f'Load data done [{load_time:.1f} s]. #user={dataset.n_users}, '
                   f'#item={dataset.n_items}, #train={len(dataset.train_users)}, '
                   f'#test={dataset.n_users}')
        report.say(setup.model)
        report.say(f'{sum(p.numel() for p in setup.model.parameters())} parameters')
        report.say(f'{plan.describe()}, {args.eval_mode} evaluation')
        if args.mode == 'test':
            return test(plan, evaluation, report, args.metrics_at)
        trainer = Trainer(plan, setup.model, setup.batches, args.learning_rate,
                          (args.beta1, args.beta2), args.eps, args.optimizer, args.embedding_l2,
                          args.weight_decay)
        return train(args, setup, trainer, evaluation, report, directory)
    finally:
        report.close()
        if lock is not None:
            lock.release()


def recommend_users(args, plan, setup):
    """--mode recommend: each asked-for user's top-K unseen items, as CSV."""
    start = plan.time()
    id_maps = read_id_maps(args.data, setup.dataset.metadata)
    users = recommend.requested_users(id_maps[0], recommend.read_users(args.users,
                                                                       args.users_file))
    items, logits = recommend.recommend(plan, setup.model, setup.exclusion, users, args.topk)
    rows = recommend.write(args.output, id_maps, users, items, logits)
    seconds = plan.time() - start
    print(f'Recommended up to {args.topk} items for each of {len(users)} users ({rows} rows)'
          + (f' to {args.output}' if args.output else '')
          + f' in {seconds:.2f} s after loading the data', file=sys.stderr)
    return {'users': len(users), 'rows': rows, 'seconds': seconds}


def more_metrics(metrics, metrics_at):
    """The line of --metrics_at's figures."""
    return ', '.join([f'HR@{k} = {metrics.at[k][0]:.4f}, NDCG@{k} = {metrics.at[k][1]:.4f}'
                      for k in metrics_at] + [f'MRR = {metrics.mrr:.4f}'])


def test(plan, evaluation, report, metrics_at):
    """--mode test: one evaluation of the loaded model."""
    compile_time = evaluation.warm_up()
    if plan.compiled:
        report.say(f'Compiled the evaluation in {compile_time:.1f} s')
    start = plan.time()
    metrics = evaluation()
    val_time = plan.time() - start
    eval_throughput = evaluation.samples / val_time
    topk = evaluation.ks[0]
    report.say(f'HR@{topk} = {metrics.hr:.4f}, NDCG@{topk} = {metrics.ndcg:.4f}')
    if metrics_at:
        report.say(more_metrics(metrics, metrics_at))
    report.say(f'validation_loss = {metrics.loss:.4f}, eval_throughput = '
               f'{eval_throughput:.3e} samples/s, val_time = {val_time:.2f}')
    report.logger.log((), {'best_eval_throughput': eval_throughput,
                           **metrics.figures(metrics_at), 'validation_loss': metrics.loss})
    return {'hr': metrics.hr, 'ndcg': metrics.ndcg, 'metrics': metrics}


def train(args, setup, trainer, evaluation, report, directory):
    """Epochs until --epochs or --threshold: train, evaluate, report, save."""
    read, main_start, fingerprint = setup.read, setup.started, setup.dataset.fingerprint
    plan, batches, say = trainer.plan, trainer.batches, report.say
    generator = plan.generator(args.seed)
    history = History()
    if read.resume is not None:
        history = checkpoints.restore_training_state(read.resume, read.resume_path, trainer,
                                                     generator, args.seed, say)
        say(f'Resuming after epoch {history.epoch} from {read.resume_path}')
        if history.epoch >= 0:
            directory.saved_epoch = history.epoch
    # Time already spent before a resume counts towards time_to_target.
    time_offset = history.elapsed
    compile_time = trainer.warm_up() + evaluation.warm_up()
    if plan.compiled:
        say(f'Compiled the training step and the evaluation in {compile_time:.1f} s (counted '
            'in time_to_target, not in train_time or val_time)')

    def progress(steps):
        if plan.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm
            return tqdm(steps, leave=False, unit='step')
        return steps

    for epoch in range(history.epoch + 1, args.epochs):
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
            metrics = evaluation()
        except NonFiniteScores as error:
            raise UsageError(f'epoch {epoch}: {error}; {directory.kept()}') from None
        val_time = plan.time() - begin
        # Samples actually trained (the last partial batch is dropped), over all ranks.
        train_throughput = batches.steps * batches.batch_size / train_time
        eval_throughput = evaluation.samples / val_time

        hr = metrics.hr
        say(f'Epoch {epoch}: HR@{args.topk} = {hr:.4f}, NDCG@{args.topk} = {metrics.ndcg:.4f}, '
            f'train_time = {train_time:.2f}, val_time = {val_time:.2f}')
        say(f'         train_loss = {train_loss:.4f}, validation_loss = {metrics.loss:.4f}, '
            f'train_throughput = {train_throughput:.3e} samples/s, '
            f'eval_throughput = {eval_throughput:.3e} samples/s')
        if args.metrics_at:
            say(f'         {more_metrics(metrics, args.metrics_at)}')
        report.epoch(epoch, {'train_throughput': train_throughput,
                             **metrics.figures(args.metrics_at), 'train_epoch_time': train_time,
                             'validation_epoch_time': val_time,
                             'eval_throughput': eval_throughput, 'train_loss': train_loss,
                             'validation_loss': metrics.loss})

        best = history.record(epoch, hr, train_loss, (train_throughput, eval_throughput),
                              time_offset + plan.time() - main_start)
        if directory and plan.rank == 0:
            if best:
                say('New best hr! Saving the model to: ', directory.best)
                checkpoints.save_model(trainer.model, directory.best, fingerprint, setup.shape)
            checkpoints.save_training_state(directory.last, trainer, generator, history,
                                            setup.settings, fingerprint, setup.shape)
            directory.saved_epoch = epoch
        if hr >= args.threshold:
            say(f'Hit threshold of {args.threshold}')
            break

    summary = history.summary(time_offset + plan.time() - main_start, compile_time)
    report.logger.log((), summary)
    say(', '.join(f'{key} = {value:.4g}' if isinstance(value, float) else f'{key} = {value}'
                  for key, value in summary.items()))
    return {'hrs': history.hrs, 'train_losses': history.train_losses,
            'best_hr': history.best_hr, 'summary': summary}


def run_and_explain(args, directory):
    """Join the run's processes, check what needs no data, resolve the plan and `run`, with the
    failures that are not bugs said in one line: running out of memory, and another process of
    a distributed run that failed or was stopped."""
    processes = runtime.join(args.plan_options, args.local_rank)
    try:
        read = runtime.together(processes, prepare, args, processes, directory)
        # the model's sizes first: the plan may time its layers
        shape = runtime.together(processes, model_shape, args, read)
        plan = runtime.start(args.plan_options, shape, args.valid_batch_size, processes)
        return run(args, plan, directory, shape, read)
    except Exception as error:  # sorted out below; anything else is a bug, with its traceback
        if out_of_memory(error):
            raise UsageError(f'out of memory with --batch_size {args.batch_size} and '
                             f'--valid_batch_size {args.valid_batch_size} '
                             f'({first_line(error)}); {directory.kept()}') from None
        if processes.distributed and runtime.peer_failure(error):
            raise UsageError(f'another process of this run failed or was stopped '
                             f'({runtime.peer_failure(error)}); {directory.kept()}') from None
        raise


def main(argv=None):
    """Command-line entry point; returns the run's figures (for tests and notebooks)."""
    args = parse_args(argv)
    directory = checkpoints.CheckpointDirectory(args.checkpoint_dir if args.mode == 'train'
                                                else '')
    quiet = int(os.environ.get('RANK', 0)) != 0  # only rank 0 speaks
    try:
        return run_main('ncf.py', run_and_explain, args, directory, kept=directory.kept,
                        quiet=quiet)
    finally:
        runtime.stop()


if __name__ == '__main__':
    main()
