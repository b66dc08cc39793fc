"""ncf.py's flags: their definitions (the reference's names, short forms and defaults, and
ours), and every check of them, alone, against each other, against the checkpoints and the data,
and of the places the run reads and writes (before any work). The library takes values: only
ncf.py passes these `args` around.
"""
import math
import os

import torch

from ncflib import checkpoints, models, runtime
from ncflib.cache import CACHE_FILES, VALID_NEGATIVE
from ncflib.cli import (ArgumentParser, UsageError, check_log_file, check_output_file,
                        check_paths_apart, check_writable_directory, warn)
from ncflib.recipe import (DEFAULT_BATCH_SIZE, DEFAULT_BETAS, DEFAULT_EPOCHS, DEFAULT_EPS,
                           DEFAULT_LEARNING_RATE, DEFAULT_NEGATIVE_SAMPLES)
from ncflib.training import EMBEDDING_UPDATES, OPTIMIZERS


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
    parser.add_argument('--embedding_updates', choices=EMBEDDING_UPDATES, default='dense',
                        help="dense: the reference's, every row of every table stepped each "
                             'step; sparse: only the rows a batch touches (lazy Adam, or SGD), '
                             'a cost that follows the batch and not the tables')
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
    parser.add_argument('--negative_sampling', choices=['approximate', 'exact', 'popularity'],
                        default='approximate',
                        help="approximate: training negatives uniform over all items (the "
                             "reference's, one may be a positive); exact: never a training "
                             'positive of the user; popularity: in proportion to each item\'s '
                             'training interactions (one may be a positive)')
    parser.add_argument('--users', default=None,
                        help="recommend mode: comma-separated user ids (the dataset's own; "
                             'None: all users)')
    parser.add_argument('--users_file', default=None,
                        help='recommend mode: a file of user ids, one per line')
    parser.add_argument('--output', default=None,
                        help='recommend mode: CSV file to write (None: stdout)')
    parser.add_argument('--ranks_output', default=None, metavar='CSV',
                        help='test mode: write each counted test user\'s 0-based rank of their '
                             'test positive, as HR@K and NDCG@K count it, to this CSV (user,rank; '
                             'the mapped user index): per-user figures for a paired test of two '
                             'models')
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
    if args.ranks_output and args.mode != 'test':
        raise UsageError('--ranks_output is for --mode test (the ranks of the model it '
                         f'evaluates), not --mode {args.mode}')
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
    if args.ranks_output:
        check_output_file(args.ranks_output, '--ranks_output')
    check_no_output_is_an_input(args, directory)


def run_files(args, directory):
    """The files a training run writes in its checkpoint directory: its checkpoints, and its
    log when it goes there."""
    return [directory.best, directory.last] + ([] if args.log_path else [directory.log])


def check_no_output_is_an_input(args, directory):
    """Every file the run writes is apart from every file it reads (the cache's, a checkpoint
    to load or evaluate, the pretrained branches, the users file), from every other file it
    writes (checkpoints, their lock, the log, the recommendations, the ranks) and from the
    directories it writes into. --resume's last.pth is its own to replace."""
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
    if args.ranks_output:
        writes.append((args.ranks_output, f'--ranks_output {args.ranks_output}'))
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
