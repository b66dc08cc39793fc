"""Train a Neural Collaborative Filtering model (NeuMF) and report HR@K / NDCG@K.

    python ncf.py --data data/cache/ml-20m
    torchrun --nproc_per_node=8 ncf.py --data /data/cache/ml-20m
    python ncf.py --data data/cache/ml-20m --mode test --load_checkpoint_path checkpoints/model.pth
    python ncf.py --data data/cache/ml-20m --mode recommend --load_checkpoint_path ... --users 12,57

The script: parse the flags, resolve the runtime plan (runtime.py), run. Nothing but the tests
imports it; the pieces it runs live in their modules (training, evaluation, checkpoints).
"""
import math
import os
import sys

import utils

if __name__ == '__main__':
    utils.handle_signals_early('ncf.py')  # Ctrl-C while torch loads is one line too

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import checkpoints  # noqa: E402
import dataloading  # noqa: E402
import recommend  # noqa: E402
import runtime  # noqa: E402
from cache_layout import CACHE_FILES  # noqa: E402
from evaluation import Evaluation, NonFiniteScores, all_reduce_sums  # noqa: E402
from logger import Logger  # noqa: E402
from logger.autologging import log_args, log_hardware  # noqa: E402
from training import Trainer  # noqa: E402
from utils import (ArgumentParser, UsageError, check_log_file, check_output_file,  # noqa: E402
                   check_writable_directory, first_line, out_of_memory, run_main, same_file)

LOG_FILE = 'log.json'


def parse_args(argv=None):
    parser = ArgumentParser(description='Train a Neural Collaborative Filtering model')
    parser.add_argument('--data', type=str, required=True,
                        help='Path to test and training data files')
    parser.add_argument('-e', '--epochs', type=int, default=30,
                        help='Number of epochs for training')
    parser.add_argument('-b', '--batch_size', type=int, default=2 ** 20,
                        help='Number of examples for each iteration (global: split across '
                             'processes and accumulated gradients)')
    parser.add_argument('--valid_batch_size', type=int, default=2 ** 20,
                        help='Number of examples in each validation chunk')
    parser.add_argument('-f', '--factors', type=int, default=64,
                        help='Number of predictive factors')
    parser.add_argument('--layers', nargs='+', type=int, default=[256, 256, 128, 64],
                        help='Sizes of hidden layers for MLP')
    parser.add_argument('-n', '--negative_samples', type=int, default=4,
                        help='Number of negative examples per interaction')
    parser.add_argument('-l', '--learning_rate', type=float, default=0.0045,
                        help='Learning rate for optimizer')
    parser.add_argument('-k', '--topk', type=int, default=10,
                        help='Rank for test examples to be considered a hit')
    parser.add_argument('--seed', '-s', type=int, default=1,
                        help='Manually set random seed for torch')
    parser.add_argument('--threshold', '-t', type=float, default=1.0,
                        help='Stop training early at threshold')
    parser.add_argument('--valid_negative', type=int, default=100,
                        help='Number of negative samples for each positive test example (drawn '
                             'anew at load time when the cache has another number)')
    parser.add_argument('--beta1', '-b1', type=float, default=0.25, help='Beta1 for Adam')
    parser.add_argument('--beta2', '-b2', type=float, default=0.5, help='Beta2 for Adam')
    parser.add_argument('--eps', type=float, default=1e-8, help='Epsilon for Adam')
    parser.add_argument('--dropout', type=float, default=0.5,
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
    return runtime.parsed(parser, parser.parse_args(argv))


def plan_of(args):
    """The runtime plan of this process; joins the process group under torchrun. The model's
    flags are checked first: the plan may time the model's layers."""
    check_model_args(args)
    return runtime.start(args.device, precision=args.precision, impl=args.impl,
                         opt_level=args.opt_level, amp=args.amp,
                         valid_batch_size=args.valid_batch_size, local_rank=args.local_rank,
                         compile_cache=args.compile_cache,
                         model_shape=(args.factors, args.layers))


def check_model_args(args):
    if args.factors < 1:
        raise UsageError(f'--factors must be positive, not {args.factors}')
    if not args.layers or min(args.layers) < 1:
        raise UsageError(f'--layers must be positive sizes, not {args.layers}')
    if args.layers[0] % 2:
        raise UsageError(f'--layers: the first size ({args.layers[0]}) must be even: it is the '
                         'user and item MLP embeddings side by side')
    if not (math.isfinite(args.dropout) and 0 <= args.dropout < 1):
        raise UsageError(f'--dropout must be in [0, 1), not {args.dropout}')


def check_args(args, plan):
    for name in ('learning_rate', 'beta1', 'beta2', 'eps', 'threshold'):
        if not math.isfinite(getattr(args, name)):
            raise UsageError(f'--{name} must be a finite number, not {getattr(args, name)}')
    if args.learning_rate <= 0:
        raise UsageError(f'--learning_rate must be positive, not {args.learning_rate}')
    for name in ('beta1', 'beta2'):
        if not 0 <= getattr(args, name) < 1:
            raise UsageError(f'--{name} must be in [0, 1), not {getattr(args, name)}')
    if args.eps <= 0:
        raise UsageError(f'--eps must be positive, not {args.eps}')
    for name in ('epochs', 'batch_size', 'valid_batch_size', 'negative_samples',
                 'topk', 'valid_negative', 'grads_accumulated'):
        if getattr(args, name) < (0 if name == 'epochs' else 1):
            raise UsageError(f'--{name} must be positive, not {getattr(args, name)}')
    if args.batch_size % (plan.world_size * args.grads_accumulated):
        raise UsageError(f'--batch_size {args.batch_size} is not divisible by world size '
                         f'{plan.world_size} x --grads_accumulated {args.grads_accumulated}')
    if args.mode != 'recommend' and args.eval_mode == 'sampled' and \
            args.topk > args.valid_negative + 1:
        raise UsageError(f'--topk {args.topk} is larger than the {args.valid_negative + 1} '
                         'candidates of each user (--valid_negative + 1)')
    if args.mode != 'recommend' and (args.users or args.users_file or args.output):
        raise UsageError('--users, --users_file and --output are for --mode recommend')
    if args.mode == 'recommend' and plan.distributed:
        raise UsageError('--mode recommend runs in one process, not under torchrun')
    if args.resume and not args.checkpoint_dir:
        raise UsageError('--resume needs --checkpoint_dir (it continues from last.pth there)')
    if args.resume and args.mode != 'train':
        raise UsageError('--resume is for training; --mode test takes --load_checkpoint_path')


def check_outputs(args, plan):
    """Every place the run will write, checked before any work (creating nothing)."""
    if plan.rank != 0:
        return
    if args.mode == 'train' and args.checkpoint_dir:
        check_writable_directory(args.checkpoint_dir, '--checkpoint_dir')
        holder = checkpoints.lock_holder(args.checkpoint_dir)
        if holder:
            raise UsageError(f'--checkpoint_dir {args.checkpoint_dir} is in use by {holder}: '
                             'one training run per directory')
        if not args.resume and not args.overwrite_checkpoints:
            held = [name for name in run_files(args) if os.path.exists(name)]
            if held:
                raise UsageError(
                    f'--checkpoint_dir {args.checkpoint_dir} holds another run\'s '
                    f'{", ".join(os.path.basename(name) for name in held)}: --resume continues '
                    'that run, --overwrite_checkpoints starts a new one in its place')
    if args.log_path:
        check_log_file(args.log_path, '--log_path')
    if args.tensorboard:
        check_writable_directory(args.tensorboard, '--tensorboard')
    if args.output:
        check_output_file(args.output, '--output')
    check_no_output_is_an_input(args)


def run_files(args):
    """The files a training run writes in --checkpoint_dir: its checkpoints, and its log when
    it goes there."""
    names = [checkpoints.BEST_MODEL_FILE, checkpoints.LAST_CHECKPOINT_FILE]
    if not args.log_path:
        names.append(LOG_FILE)
    return [os.path.join(args.checkpoint_dir, name) for name in names]


def check_no_output_is_an_input(args):
    """No file the run writes is one it reads: the cache's files, a checkpoint to load, the
    users file (--resume's last.pth is its own to replace)."""
    inputs = {os.path.join(args.data, name): f"the cache's {name}"
              for name in CACHE_FILES}
    for flag in ('load_checkpoint_path', 'users_file'):
        if getattr(args, flag):
            inputs[getattr(args, flag)] = f'--{flag}'
    outputs = {}
    if args.mode == 'train' and args.checkpoint_dir:
        outputs.update({path: f'--checkpoint_dir\'s {os.path.basename(path)}'
                        for path in run_files(args)})
    for flag in ('log_path', 'output'):
        if getattr(args, flag):
            outputs[getattr(args, flag)] = f'--{flag} {getattr(args, flag)}'
    for output, label in outputs.items():
        for path, what in inputs.items():
            if same_file(output, path):
                raise UsageError(f'{label} is {what}, which this run reads: it would be '
                                 'overwritten; write it elsewhere')


def log_path_of(args):
    """Where the JSON log goes: --log_path, or log.json in CHECKPOINT_DIR (or the current
    directory). A test of a trained model appends to the training's log where it may: never
    does it fail for want of a writable directory (None: not logged)."""
    if args.log_path:
        return args.log_path
    path = os.path.join(args.checkpoint_dir or '.', LOG_FILE)
    if args.mode == 'test':
        try:
            check_log_file(path)
        except UsageError:
            return None
    return path


def check_args_against_data(args, dataset):
    if (args.mode == 'recommend' or args.eval_mode == 'full') and args.topk > dataset.n_items:
        raise UsageError(f'--topk {args.topk} is larger than the catalogue '
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

    def __init__(self, plan, log_path=None, append=False, tensorboard=None,
                 summary_writer_class=None):
        self.rank0 = plan.rank == 0
        self.logger = Logger(log_path if self.rank0 else None, append=append)
        self.writer = summary_writer_class(tensorboard) if summary_writer_class and self.rank0 \
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


def together(plan, function, *args):
    """`function(*args)` on every process; a failure on any of them (bad input, or an error
    such as running out of memory) stops all of them, else the others would wait for it in the
    next collective until its timeout. The failing process raises its own error; the others
    raise a UsageError naming it, which rank 0 prints (when rank 0 failed, its own line)."""
    error = None
    try:
        result = function(*args)
    except Exception as raised:  # every failure is shared first, then raised
        error = raised
    if plan.distributed:
        shared = [None] * plan.world_size
        dist.all_gather_object(shared, None if error is None
                               else describe_failure(error, plan.rank))
        failed = next((rank for rank, message in enumerate(shared) if message is not None),
                      None)
        if failed is not None and error is None:
            error = UsageError(shared[failed])
    if error is not None:
        raise error
    return result


def describe_failure(error, rank):
    """One line for a failure that process `rank` reports to the others: a UsageError's own
    message (every process finds the same bad input), else the process, the exception's type
    and its first line."""
    if isinstance(error, UsageError):
        return str(error)
    lines = str(error).strip().splitlines()
    return (f'process {rank} failed: {type(error).__name__}'
            + (f': {lines[0][:300]}' if lines else ''))


def prepare(args, plan):
    """The checks that need no data: flags, output places, checkpoints to read."""
    check_args(args, plan)
    check_outputs(args, plan)
    summary_writer_class = tensorboard_writer_class() if args.tensorboard else None
    resume_state = loaded_state = load_path = None
    if args.resume:
        resume_state = checkpoints.read(os.path.join(args.checkpoint_dir,
                                                     checkpoints.LAST_CHECKPOINT_FILE))
    if args.mode != 'train' or args.load_checkpoint_path:
        load_path = args.load_checkpoint_path or os.path.join(args.checkpoint_dir,
                                                              checkpoints.BEST_MODEL_FILE)
        loaded_state = checkpoints.read(load_path)
    return summary_writer_class, resume_state, loaded_state, load_path


def load(args, plan, say, resume_state, loaded_state, load_path):
    """The data, checked against the flags and the checkpoints, and the model built on it."""
    # Recommendations use no test negatives: never draw new ones for them.
    valid_negative = None if args.mode == 'recommend' else args.valid_negative
    dataset = dataloading.load_dataset(args.data, plan.device, valid_negative, args.seed, say)
    check_args_against_data(args, dataset)
    exclusion = None
    if args.mode == 'recommend' or args.eval_mode == 'full' or args.negative_sampling == 'exact':
        exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                              dataset.n_users, dataset.n_items)
        check_free_items(args, exclusion)
    batches = dataloading.TrainBatches(
        dataset.train_users, dataset.train_items, dataset.n_items, args.negative_samples,
        args.batch_size, plan.rank, plan.world_size, args.grads_accumulated,
        max_micro_batch=plan.micro_batch,
        exclusion=exclusion if args.negative_sampling == 'exact' else None)
    if args.mode == 'train' and batches.steps == 0:
        raise UsageError(f'--batch_size {args.batch_size} is larger than an epoch '
                         f'({batches.samples} samples): no step would be trained')
    model = plan.build_model(dataset.n_users, dataset.n_items, args.factors, args.layers,
                             args.dropout)
    last_path = os.path.join(args.checkpoint_dir, checkpoints.LAST_CHECKPOINT_FILE)
    for state, path in ((loaded_state, load_path), (resume_state, last_path)):
        if state is not None:
            checkpoints.check_data(state, path, dataset, args.allow_other_data, say)
            checkpoints.load_model_state(model, state, path)
    if resume_state is not None:
        checkpoints.check_settings(resume_state, last_path, args, args.allow_changed_settings,
                                   say)
    return dataset, exclusion, batches, model.to(plan.device)


def run(args, plan, kept):
    """kept: a dict the training fills with what a stopped run leaves behind."""
    rank0 = plan.rank == 0

    def say(*parts):
        if rank0:
            print(*parts, flush=True)

    summary_writer_class, resume_state, loaded_state, load_path = together(
        plan, prepare, args, plan)
    for warning in plan.warnings:
        if rank0:
            print(f'ncf.py: warning: {warning}', file=sys.stderr)
    torch.manual_seed(args.seed)
    if plan.distributed:
        dist.barrier()  # start the clock together
    main_start = plan.time()
    dataset, exclusion, batches, model = together(
        plan, load, args, plan, say, resume_state, loaded_state, load_path)
    load_time = plan.time() - main_start

    if args.mode == 'recommend':
        def warn(message):
            print(f'ncf.py: warning: {message}', file=sys.stderr)
        start = plan.time()
        users, rows = recommend.recommend(plan, model, exclusion, args, warn, dataset.metadata)
        seconds = plan.time() - start
        print(f'Recommended up to {args.topk} items for each of {users} users ({rows} rows)'
              + (f' to {args.output}' if args.output else '')
              + f' in {seconds:.2f} s after loading the data', file=sys.stderr)
        return {'users': users, 'rows': rows, 'seconds': seconds}

    evaluation = Evaluation(plan, dataset, model, args.topk, args.eval_mode, exclusion)
    # Every input has been checked: only now is anything written, by one run per directory.
    lock = None
    if args.checkpoint_dir and args.mode == 'train':
        lock = together(plan, lambda: checkpoints.DirectoryLock(args.checkpoint_dir)
                        if rank0 else None)
        kept['directory'] = args.checkpoint_dir
        if args.overwrite_checkpoints and not args.resume and rank0:
            # the directory then only ever holds this run's files
            for path in run_files(args):
                if os.path.exists(path):
                    os.remove(path)
    log_path = log_path_of(args)
    if log_path is None and rank0:
        print(f'ncf.py: warning: {os.path.join(args.checkpoint_dir, LOG_FILE)} is not writable: '
              'this evaluation is not logged (--log_path sets another place)', file=sys.stderr)
    # A resumed run, or a test of a trained model, continues the training's log.
    report = Report(plan, log_path, append=args.resume or args.mode == 'test',
                    tensorboard=args.tensorboard, summary_writer_class=summary_writer_class)
    try:
        log_hardware(report.logger)
        log_args(report.logger, args)
        report.logger.log('PARAMETER', {'dataset': dataset.metadata, 'plan': plan.describe()})
        report.logger.metadata('train_throughput', {'unit': 'samples/s', 'format': ':.3e'})
        report.logger.metadata('eval_throughput', {'unit': 'samples/s', 'format': ':.3e'})
        report.logger.metadata(f'hr@{args.topk}', {'unit': None, 'format': ':.5f'})
        say(f'Load data done [{load_time:.1f} s]. #user={dataset.n_users}, '
            f'#item={dataset.n_items}, #train={len(dataset.train_users)}, '
            f'#test={dataset.n_users}')
        say(model)
        say(f'{sum(p.numel() for p in model.parameters())} parameters')
        say(f'{plan.describe()}, {args.eval_mode} evaluation')
        if args.mode == 'test':
            return test(args, plan, evaluation, report)
        return train(args, plan, model, batches, evaluation, report, resume_state, main_start,
                     dataset.fingerprint, kept)
    finally:
        report.close()
        if lock is not None:
            lock.release()


def test(args, plan, evaluation, report):
    """--mode test: one evaluation of the loaded model."""
    compile_time = evaluation.warm_up()
    if plan.compiled:
        report.say(f'Compiled the evaluation in {compile_time:.1f} s')
    start = plan.time()
    hr, ndcg, val_loss = evaluation()
    val_time = plan.time() - start
    eval_throughput = evaluation.samples / val_time
    report.say(f'HR@{args.topk} = {hr:.4f}, NDCG@{args.topk} = {ndcg:.4f}')
    report.say(f'validation_loss = {val_loss:.4f}, eval_throughput = {eval_throughput:.3e} '
               f'samples/s, val_time = {val_time:.2f}')
    report.logger.log((), {'best_eval_throughput': eval_throughput, f'hr@{args.topk}': hr,
                           f'ndcg@{args.topk}': ndcg, 'validation_loss': val_loss})
    return {'hr': hr, 'ndcg': ndcg}


def train(args, plan, model, batches, evaluation, report, resume_state, main_start, fingerprint,
          kept):
    say = report.say
    rank0 = plan.rank == 0
    last_path = os.path.join(args.checkpoint_dir, checkpoints.LAST_CHECKPOINT_FILE)
    trainer = Trainer(plan, model, batches, args.learning_rate, (args.beta1, args.beta2),
                      args.eps)
    generator = plan.generator(args.seed)
    history = {'epoch': -1, 'best_hr': 0.0, 'best_epoch': -1, 'train_throughputs': [],
               'eval_throughputs': [], 'hrs': [], 'train_losses': [], 'elapsed': 0.0,
               'best_model_elapsed': None}
    if resume_state is not None:
        history = checkpoints.restore_training_state(resume_state, last_path, trainer, plan,
                                                     generator)
        say(f'Resuming after epoch {history["epoch"]} from {last_path}')
        if history['epoch'] >= 0:
            kept['epoch'] = history['epoch']
    # Time already spent before a resume counts towards time_to_target.
    time_offset = history['elapsed']
    compile_time = trainer.warm_up() + evaluation.warm_up()
    if plan.compiled:
        say(f'Compiled the training step and the evaluation in {compile_time:.1f} s (counted '
            'in time_to_target, not in train_time or val_time)')

    def progress(steps):
        if rank0 and sys.stderr.isatty():
            from tqdm import tqdm
            return tqdm(steps, leave=False, unit='step')
        return steps

    for epoch in range(history['epoch'] + 1, args.epochs):
        begin = plan.time()
        loss_sum, samples = trainer.epoch(generator, progress)
        train_time = plan.time() - begin
        train_loss_sum, train_samples = all_reduce_sums([loss_sum, samples], plan)
        train_loss = train_loss_sum / train_samples
        # A model that turned NaN or infinite is never evaluated, saved or taken as the best.
        if not math.isfinite(train_loss) or not trainer.weights_are_finite():
            what = (f'the training loss is {train_loss}' if not math.isfinite(train_loss)
                    else 'weights are not finite (NaN or infinite)')
            raise UsageError(f'training diverged in epoch {epoch} ({what}; a lower '
                             f'--learning_rate may help); {kept_message(kept)}')
        begin = plan.time()
        try:
            hr, ndcg, val_loss = evaluation()
        except NonFiniteScores as error:
            raise UsageError(f'epoch {epoch}: {error}; {kept_message(kept)}') from None
        val_time = plan.time() - begin
        # Samples actually trained (the last partial batch is dropped), over all ranks.
        train_throughput = batches.steps * batches.batch_size / train_time
        eval_throughput = evaluation.samples / val_time
        history['train_throughputs'].append(train_throughput)
        history['eval_throughputs'].append(eval_throughput)
        history['hrs'].append(hr)
        history['train_losses'].append(train_loss)
        history['epoch'] = epoch

        say(f'Epoch {epoch}: HR@{args.topk} = {hr:.4f}, NDCG@{args.topk} = {ndcg:.4f}, '
            f'train_time = {train_time:.2f}, val_time = {val_time:.2f}')
        say(f'         train_loss = {train_loss:.4f}, validation_loss = {val_loss:.4f}, '
            f'train_throughput = {train_throughput:.3e} samples/s, '
            f'eval_throughput = {eval_throughput:.3e} samples/s')
        report.epoch(epoch, {'train_throughput': train_throughput, f'hr@{args.topk}': hr,
                             f'ndcg@{args.topk}': ndcg, 'train_epoch_time': train_time,
                             'validation_epoch_time': val_time,
                             'eval_throughput': eval_throughput, 'train_loss': train_loss,
                             'validation_loss': val_loss})

        history['elapsed'] = time_offset + plan.time() - main_start
        if hr > history['best_hr']:
            history['best_hr'], history['best_epoch'] = hr, epoch
            history['best_model_elapsed'] = history['elapsed']
            if args.checkpoint_dir and rank0:
                path = os.path.join(args.checkpoint_dir, checkpoints.BEST_MODEL_FILE)
                say('New best hr! Saving the model to: ', path)
                checkpoints.save_model(model, path, fingerprint)
        if args.checkpoint_dir and rank0:
            checkpoints.save_training_state(last_path, model, trainer, history, args, plan,
                                            generator, fingerprint)
            kept['epoch'] = epoch
        if hr >= args.threshold:
            say(f'Hit threshold of {args.threshold}')
            break

    total = time_offset + plan.time() - main_start
    summary = {
        'best_train_throughput': max(history['train_throughputs'], default=0.0),
        'best_eval_throughput': max(history['eval_throughputs'], default=0.0),
        'mean_train_throughput': (sum(history['train_throughputs'])
                                  / max(len(history['train_throughputs']), 1)),
        'mean_eval_throughput': (sum(history['eval_throughputs'])
                                 / max(len(history['eval_throughputs']), 1)),
        'best_accuracy': history['best_hr'],
        'best_epoch': history['best_epoch'],
        'time_to_target': total,
        'time_to_best_model': history['best_model_elapsed'],
        'compile_time': compile_time,
    }
    report.logger.log((), summary)
    say(', '.join(f'{key} = {value:.4g}' if isinstance(value, float) else f'{key} = {value}'
                  for key, value in summary.items()))
    return {'hrs': history['hrs'], 'train_losses': history['train_losses'],
            'best_hr': history['best_hr'], 'summary': summary}


def kept_message(kept):
    """What a run stopped by Ctrl-C, SIGTERM or a full disk leaves behind."""
    if 'directory' not in kept:
        return 'nothing was written'
    if 'epoch' not in kept:
        return f'no epoch finished: {kept["directory"]} holds no checkpoint of this run'
    return (f'{os.path.join(kept["directory"], checkpoints.LAST_CHECKPOINT_FILE)} from epoch '
            f'{kept["epoch"]} kept (--resume continues from it)')


def main(argv=None):
    """Command-line entry point; returns the run's figures (for tests and notebooks)."""
    args = parse_args(argv)
    kept = {}
    quiet = int(os.environ.get('RANK', 0)) != 0  # only rank 0 speaks
    try:
        return run_main('ncf.py', run_and_explain, args, kept, kept=lambda: kept_message(kept),
                        quiet=quiet)
    finally:
        runtime.stop()


def run_and_explain(args, kept):
    """`run`, with the failures that are not bugs said in one line: running out of memory,
    and another process of a distributed run that failed or was stopped."""
    plan = plan_of(args)
    try:
        return run(args, plan, kept)
    except Exception as error:  # sorted out below; anything else is a bug, with its traceback
        if out_of_memory(error):
            raise UsageError(f'out of memory with --batch_size {args.batch_size} and '
                             f'--valid_batch_size {args.valid_batch_size} on {plan.device} '
                             f'({first_line(error)}); {kept_message(kept)}') from None
        if plan.distributed and runtime.peer_failure(error):
            raise UsageError(f'another process of this run failed or was stopped '
                             f'({runtime.peer_failure(error)}); {kept_message(kept)}') from None
        raise


if __name__ == '__main__':
    main()
