"""Train a Neural Collaborative Filtering model (NeuMF) and report HR@K / NDCG@K.

    python ncf.py --data data/cache/ml-20m
    torchrun --nproc_per_node=8 ncf.py --data /data/cache/ml-20m
    python ncf.py --data data/cache/ml-20m --mode test --load_checkpoint_path checkpoints/model.pth
    python ncf.py --data data/cache/ml-20m --mode recommend --load_checkpoint_path ... --users 12,57
"""
import argparse
import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import dataloading
import recommend
from logger import Logger
from logger.autologging import log_args, log_hardware
from neumf import NeuMF, all_item_scores
from utils import UsageError, atomic_torch_save

# On a CPU the fast path trains and evaluates in pieces of at most this many samples: their
# activations stay in cache (the update is the same: gradients add up over the pieces).
CPU_CHUNK = 16384
BEST_MODEL_FILE = 'model.pth'      # state dict of the best model so far, as the reference
LAST_CHECKPOINT_FILE = 'last.pth'  # everything --resume needs, after every epoch
LOG_FILE = 'log.json'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a Neural Collaborative Filtering model',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--data', type=str, help='Path to test and training data files')
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
                             'last.pth); an empty path disables checkpoint saving')
    parser.add_argument('--load_checkpoint_path', default=None, type=str,
                        help='Path to the checkpoint file to be loaded before training/evaluation '
                             '(test mode default: CHECKPOINT_DIR/model.pth)')
    parser.add_argument('--mode', choices=['train', 'test', 'recommend'], default='train',
                        type=str,
                        help='Passing "test" will only run a single evaluation, otherwise full '
                             'training will be performed; "recommend" writes each user\'s top-K '
                             'unseen items')
    parser.add_argument('--grads_accumulated', default=1, type=int,
                        help='Number of gradients to accumulate before performing an optimization '
                             'step (each is batch_size / (world_size * grads_accumulated))')
    parser.add_argument('--opt_level', default=None, type=str, choices=['O0', 'O2'],
                        help='Optimization level for Automatic Mixed Precision: O2 = mixed '
                             'precision (the default; on a CPU without native bf16, fp32), '
                             'O0 = fp32')
    parser.add_argument('--amp', action='store_true', help='Enable mixed precision (= O2)')
    parser.add_argument('--precision', choices=['fp32', 'fp16', 'bf16'], default=None,
                        help='Finer than --opt_level: O2 means fp16 on GPU and bf16 on CPU')
    parser.add_argument('--plain', action='store_true',
                        help="Use the plain eager implementation (the reference's forward, "
                             'autograd, plain Adam on CPU) instead of the fast path')
    parser.add_argument('--device', choices=['auto', 'cuda', 'cpu'], default='auto',
                        help='auto: CUDA when available')
    parser.add_argument('--log_path', default=None, type=str,
                        help='Path for the JSON training log (default: log.json in '
                             'CHECKPOINT_DIR, or in the current directory)')
    parser.add_argument('--resume', action='store_true',
                        help='Continue from CHECKPOINT_DIR/last.pth')
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
                        help='recommend mode: comma-separated user ids (the dataset\'s own; '
                             'default: all users)')
    parser.add_argument('--users_file', default=None,
                        help='recommend mode: a file of user ids, one per line')
    parser.add_argument('--output', default=None,
                        help='recommend mode: CSV file to write (default: stdout)')
    parser.add_argument('--tensorboard', default=None, metavar='DIR',
                        help='also write the per-epoch figures as TensorBoard scalars to DIR')
    parser.add_argument('--local_rank', '--local-rank', default=0, type=int,
                        help='Set by torch.distributed.launch (torchrun sets LOCAL_RANK instead)')
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Setup

def init_distributed(args):
    """Pick the device and join the process group when launched by torchrun / launch."""
    args.world_size = int(os.environ.get('WORLD_SIZE', 1))
    args.rank = int(os.environ.get('RANK', 0))
    args.local_rank = int(os.environ.get('LOCAL_RANK', args.local_rank))
    args.distributed = args.world_size > 1
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda, but CUDA is not available')
    use_cuda = args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available())
    if use_cuda:
        device = torch.device('cuda', args.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)  # before NCCL starts, so each rank owns its GPU
    else:
        device = torch.device('cpu')
    if args.distributed:
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    return device


def resolve_precision(args, device):
    """fp32 / fp16 / bf16 from --precision, --opt_level and --amp; contradictions are errors."""
    if args.amp and args.opt_level == 'O0':
        raise UsageError('--amp and --opt_level O0 contradict each other')
    level = 'O2' if args.amp else args.opt_level
    if args.precision is not None:
        if (level == 'O0') != (args.precision == 'fp32') and level is not None:
            raise UsageError(f'--precision {args.precision} contradicts --opt_level {level}'
                             f'{" (--amp)" if args.amp else ""}')
        precision = args.precision
    elif level == 'O0':
        precision = 'fp32'
    elif device.type == 'cuda':
        precision = 'fp16'  # O2, the reference's default
    elif level == 'O2' or cpu_has_native_bf16():
        precision = 'bf16'  # asked for, or the default where the CPU computes in bf16 natively
    else:
        precision = 'fp32'
    if precision == 'fp16' and device.type != 'cuda':
        raise UsageError('fp16 needs CUDA; on CPU use --precision bf16 (or --amp)')
    return precision


def cpu_has_native_bf16():
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX): elsewhere bf16
    is emulated, and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_args(args):
    for name in ('epochs', 'batch_size', 'valid_batch_size', 'factors', 'negative_samples',
                 'topk', 'valid_negative', 'grads_accumulated'):
        if getattr(args, name) < (0 if name == 'epochs' else 1):
            raise UsageError(f'--{name} must be positive, not {getattr(args, name)}')
    if not args.layers or min(args.layers) < 1:
        raise UsageError(f'--layers must be positive sizes, not {args.layers}')
    if args.layers[0] % 2:
        raise UsageError(f'--layers: the first size ({args.layers[0]}) must be even: it is the '
                         'user and item MLP embeddings side by side')
    if not 0 <= args.dropout < 1:
        raise UsageError(f'--dropout must be in [0, 1), not {args.dropout}')
    if args.batch_size % (args.world_size * args.grads_accumulated):
        raise UsageError(f'--batch_size {args.batch_size} is not divisible by world size '
                         f'{args.world_size} x --grads_accumulated {args.grads_accumulated}')
    if args.mode != 'recommend' and args.eval_mode == 'sampled' and \
            args.topk > args.valid_negative + 1:
        raise UsageError(f'--topk {args.topk} is larger than the {args.valid_negative + 1} '
                         'candidates of each user (--valid_negative + 1)')
    if args.mode != 'recommend' and (args.users or args.users_file or args.output):
        raise UsageError('--users, --users_file and --output are for --mode recommend')
    if args.mode == 'recommend' and args.distributed:
        raise UsageError('--mode recommend runs in one process, not under torchrun')
    if args.resume and not args.checkpoint_dir:
        raise UsageError('--resume needs --checkpoint_dir (it continues from last.pth there)')
    if args.resume and args.mode == 'test':
        raise UsageError('--resume is for training; --mode test takes --load_checkpoint_path')


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


def synchronized_time(device):
    """Wall time after the device's queued work has finished: timings include the GPU's work."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter()


def build_model(args, dataset):
    return NeuMF(dataset.n_users, dataset.n_items, mf_dim=args.factors,
                 mlp_layer_sizes=args.layers, dropout=args.dropout, fast=not args.plain)


def build_batches(args, dataset, device, exclusion=None):
    """exclusion: the training pairs, needed for --negative_sampling exact."""
    on_cpu_fast = device.type == 'cpu' and not args.plain
    return dataloading.TrainBatches(
        dataset.train_users, dataset.train_items, dataset.n_items, args.negative_samples,
        args.batch_size, args.rank, args.world_size, args.grads_accumulated,
        max_micro_batch=CPU_CHUNK if on_cpu_fast else None,
        exclusion=exclusion if args.negative_sampling == 'exact' else None)


def build_optimizer(args, model, device):
    """Adam; fused (one kernel over all parameters) on CUDA as apex FusedAdam was, and on a CPU
    in the fast path. The plain path keeps torch's plain Adam on a CPU."""
    return torch.optim.Adam(model.parameters(), lr=args.learning_rate,
                            betas=(args.beta1, args.beta2), eps=args.eps,
                            fused=device.type == 'cuda' or not args.plain)


def eval_chunk(args, device):
    """(user, item) pairs per evaluation forward."""
    if device.type == 'cpu' and not args.plain:
        return min(args.valid_batch_size, CPU_CHUNK)
    return args.valid_batch_size


# ----------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(state, path):
    """Atomically (temporary file, then rename): a crash never leaves a torn checkpoint."""
    atomic_torch_save(state, path)


def read_checkpoint(path):
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path} does not exist')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle...: not a checkpoint of ours
        raise UsageError(f'cannot read checkpoint {path}: '
                         f'{str(error).splitlines()[0][:200]}') from None


def load_model_state(model, state, path):
    """Load a state dict from model.pth, last.pth or a DDP run's file into `model`."""
    if isinstance(state, dict) and 'model' in state and isinstance(state['model'], dict):
        state = state['model']  # a last.pth
    if not isinstance(state, dict):
        raise UsageError(f'checkpoint {path} holds no state dict')
    state = {key.removeprefix('module.'): value for key, value in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UsageError(f'checkpoint {path} is not a NeuMF of these --layers: '
                         f'missing {missing[:3]}, unexpected {unexpected[:3]}')
    for key, value in expected.items():
        if not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape:
            have = list(state[key].shape) if isinstance(state[key], torch.Tensor) else state[key]
            raise UsageError(f'checkpoint {path} does not fit this model and data: {key} is '
                             f'{have} there, {list(value.shape)} here')
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Training and evaluation

class Evaluation:
    """This rank's share of the test users (contiguous chunks) and how they are scored.

    sampled (the reference's): the test positive against its test negatives, a repeated
    candidate counted once. full: against every item the user has no training interaction with.
    """

    def __init__(self, dataset, args, device, exclusion=None):
        n_users = dataset.n_users
        first = n_users * args.rank // args.world_size
        last = n_users * (args.rank + 1) // args.world_size
        self.users = torch.arange(first, last, device=device)
        self.positives = dataset.test_items[first:last]
        self.topk, self.distributed = args.topk, args.distributed
        self.chunk = eval_chunk(args, device)
        self.full = args.eval_mode == 'full'
        if self.full:
            self.exclusion = exclusion
            self.samples = n_users * dataset.n_items  # (user, item) pairs scored, all ranks
        else:
            # column 0: the positive
            self.items = torch.cat((self.positives[:, None], dataset.test_negatives[first:last]), 1)
            self.mask = dataloading.duplicate_mask(self.items)
            self.samples = n_users * self.items.shape[1]

    def __call__(self, model, autocast):
        """HR@K, NDCG@K and the validation loss over all ranks' users."""
        model.eval()
        with torch.no_grad(), autocast():
            sums = self._full(model) if self.full else self._sampled(model)
        hits, ndcg, loss_sum, loss_count, users = all_reduce_sums(
            [*sums, len(self.users)], self.users.device, self.distributed)
        model.train()
        return hits / users, ndcg / users, loss_sum / max(loss_count, 1)

    def _sampled(self, model):
        width = self.items.shape[1]
        rows = max(1, self.chunk // width)
        scores = [model(self.users[start:start + rows].repeat_interleave(width),
                        self.items[start:start + rows].reshape(-1)).float().view(-1, width)
                  for start in range(0, len(self.users), rows)]
        scores = torch.cat(scores or [torch.empty(0, width, device=self.users.device)])
        hits, ndcg = dataloading.hits_and_ndcg(scores, self.mask, self.topk)
        labels = torch.zeros_like(scores)
        labels[:, 0] = 1.0
        counted = ~self.mask
        losses = F.binary_cross_entropy_with_logits(scores, labels, reduction='none')[counted]
        return hits, ndcg, losses.sum(), counted.sum()

    def _full(self, model):
        n_items = self.exclusion.n_items
        rows = max(1, self.chunk // n_items)
        device = self.users.device
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for start in range(0, len(self.users), rows):
            users, positives = self.users[start:start + rows], self.positives[start:start + rows]
            scores = all_item_scores(model, users, n_items)
            trained = torch.zeros_like(scores, dtype=torch.bool)
            trained[self.exclusion.pairs_of(users)] = True
            row = torch.arange(len(users), device=device)
            competitors = ~trained
            competitors[row, positives] = False
            # As in sampled mode, an item scoring as high as the positive ranks ahead of it.
            rank = ((scores >= scores[row, positives][:, None]) & competitors).sum(1)
            hits, ndcg = dataloading.rank_metrics(rank, self.topk)
            labels = torch.zeros_like(scores)
            labels[row, positives] = 1.0
            losses = F.binary_cross_entropy_with_logits(scores, labels, reduction='none')[~trained]
            sums += torch.stack([hits.double(), ndcg, losses.sum().double(),
                                 torch.tensor(losses.numel(), dtype=torch.float64, device=device)])
        return sums.unbind()


def all_reduce_sums(values, device, distributed):
    """Sum float64 figures over all ranks in one collective, then read them once on the host."""
    totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if distributed:
        dist.all_reduce(totals)
    return totals.tolist()


def train_epoch(model, optimizer, scaler, batches, generator, autocast, distributed, progress):
    """One pass over a freshly drawn epoch; returns this rank's (loss sum, sample count)."""
    users, items, labels = batches.epoch(generator)
    accumulated = batches.micro_batches
    loss_sum = torch.zeros((), dtype=torch.float64, device=users.device)
    for step in progress(range(batches.steps)):
        for micro in range(accumulated):
            # DDP all-reduces gradients on the last micro-batch of a step only.
            sync = not distributed or micro == accumulated - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast():
                    logits = model(users[step, micro], items[step, micro])
                loss = F.binary_cross_entropy_with_logits(logits.float().view(-1),
                                                          labels[step, micro])
                scaler.scale(loss / accumulated).backward()
            # Kept on the device: reading it here would synchronise every step.
            loss_sum += loss.detach() * batches.micro_batch
        # With fused Adam, GradScaler hands the inf check to the optimizer's kernel: no sync.
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return loss_sum, batches.steps * accumulated * batches.micro_batch


# ----------------------------------------------------------------------------------------------

def run(args, device):
    rank0 = args.rank == 0

    def say(*parts):
        if rank0:
            print(*parts, flush=True)

    check_args(args)
    precision = resolve_precision(args, device)
    dtype = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}[precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    torch.manual_seed(args.seed)
    summary_writer_class = tensorboard_writer_class() if args.tensorboard and rank0 else None
    last_path = os.path.join(args.checkpoint_dir, LAST_CHECKPOINT_FILE)
    resume_state = read_checkpoint(last_path) if args.resume else None
    load_path = None
    if args.mode != 'train' or args.load_checkpoint_path:
        load_path = args.load_checkpoint_path or os.path.join(args.checkpoint_dir, BEST_MODEL_FILE)
        loaded_state = read_checkpoint(load_path)

    if args.distributed:
        dist.barrier()  # start the clock together
    main_start = synchronized_time(device)
    # Recommendations use no test negatives: never draw new ones for them.
    valid_negative = None if args.mode == 'recommend' else args.valid_negative
    dataset = dataloading.load_dataset(args.data, device, valid_negative, args.seed, say)
    check_args_against_data(args, dataset)
    exclusion = None
    if args.mode == 'recommend' or args.eval_mode == 'full' or args.negative_sampling == 'exact':
        exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                              dataset.n_users, dataset.n_items)
        check_free_items(args, exclusion)
    batches = build_batches(args, dataset, device, exclusion)
    if args.mode == 'train' and batches.steps == 0:
        raise UsageError(f'--batch_size {args.batch_size} is larger than an epoch '
                         f'({batches.samples} samples): no step would be trained')
    model = build_model(args, dataset)
    if load_path is not None:
        load_model_state(model, loaded_state, load_path)
    if resume_state is not None:
        load_model_state(model, resume_state, last_path)
    model = model.to(device)

    if args.mode == 'recommend':
        def warn(message):
            print(f'ncf.py: warning: {message}', file=sys.stderr)
        users, rows = recommend.recommend(model, exclusion, args, device, autocast,
                                          eval_chunk(args, device), warn)
        print(f'Recommended up to {args.topk} items for each of {users} users ({rows} rows)'
              + (f' to {args.output}' if args.output else ''), file=sys.stderr)
        return {'users': users, 'rows': rows}

    evaluation = Evaluation(dataset, args, device, exclusion)
    # Every input has been checked: only now is anything written.
    if args.checkpoint_dir and rank0 and args.mode == 'train':
        os.makedirs(args.checkpoint_dir, exist_ok=True)
    log_path = args.log_path or os.path.join(args.checkpoint_dir or '.', LOG_FILE)
    # A resumed run, or a test of a trained model, continues the training's log.
    logger = Logger(log_path if rank0 else None, append=args.resume or args.mode == 'test')
    log_hardware(logger)
    log_args(logger, args)
    logger.log('PARAMETER', {'dataset': dataset.metadata})
    logger.metadata('train_throughput', {'unit': 'samples/s', 'format': ':.3e'})
    logger.metadata('eval_throughput', {'unit': 'samples/s', 'format': ':.3e'})
    logger.metadata(f'hr@{args.topk}', {'unit': None, 'format': ':.5f'})

    say(f'Load data done [{time.perf_counter() - main_start:.1f} s]. #user={dataset.n_users}, '
        f'#item={dataset.n_items}, #train={len(dataset.train_users)}, #test={dataset.n_users}')
    say(model)
    say(f'{sum(p.numel() for p in model.parameters())} parameters')
    say(f'Precision: {precision}, device: {device}, processes: {args.world_size}, '
        f'{"plain" if args.plain else "fast"} path, {args.eval_mode} evaluation')

    if args.mode == 'test':
        start = synchronized_time(device)
        hr, ndcg, val_loss = evaluation(model, autocast)
        val_time = synchronized_time(device) - start
        eval_throughput = evaluation.samples / val_time
        say(f'HR@{args.topk} = {hr:.4f}, NDCG@{args.topk} = {ndcg:.4f}')
        say(f'validation_loss = {val_loss:.4f}, eval_throughput = {eval_throughput:.3e} samples/s, '
            f'val_time = {val_time:.2f}')
        logger.log((), {'best_eval_throughput': eval_throughput, f'hr@{args.topk}': hr,
                        f'ndcg@{args.topk}': ndcg, 'validation_loss': val_loss})
        logger.close()
        return {'hr': hr, 'ndcg': ndcg}

    summary_writer = summary_writer_class(args.tensorboard) if summary_writer_class else None
    try:
        return train(args, device, model, batches, evaluation, precision, autocast, logger,
                     summary_writer, resume_state, main_start, say)
    finally:
        logger.close()
        if summary_writer is not None:
            summary_writer.close()


def train(args, device, model, batches, evaluation, precision, autocast, logger, summary_writer,
          resume_state, main_start, say):
    rank0 = args.rank == 0
    last_path = os.path.join(args.checkpoint_dir, LAST_CHECKPOINT_FILE)
    optimizer = build_optimizer(args, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
    ddp_model = model
    if args.distributed:
        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    history = {'epoch': -1, 'best_hr': 0.0, 'best_epoch': -1, 'train_throughputs': [],
               'eval_throughputs': [], 'hrs': [], 'elapsed': 0.0, 'best_model_elapsed': None}
    if resume_state is not None:
        try:
            optimizer.load_state_dict(resume_state['optimizer'])
            scaler.load_state_dict(resume_state['scaler'])
            history = resume_state['history']
            torch.set_rng_state(resume_state['rng']['torch'])
            generator.set_state(resume_state['rng']['data'].to(generator.get_state().device))
            if device.type == 'cuda' and resume_state['rng'].get('cuda') is not None:
                torch.cuda.set_rng_state(resume_state['rng']['cuda'], device)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise UsageError(f'{last_path} is not a resumable checkpoint of this run: '
                             f'{str(error).splitlines()[0][:200]}') from None
        say(f'Resuming after epoch {history["epoch"]} from {last_path}')
    # Time already spent before a resume counts towards time_to_target.
    time_offset = history['elapsed']

    def progress(steps):
        if rank0 and sys.stderr.isatty():
            from tqdm import tqdm
            return tqdm(steps, leave=False, unit='step')
        return steps

    for epoch in range(history['epoch'] + 1, args.epochs):
        begin = synchronized_time(device)
        loss_sum, samples = train_epoch(ddp_model, optimizer, scaler, batches, generator,
                                        autocast, args.distributed, progress)
        train_time = synchronized_time(device) - begin
        train_loss_sum, train_samples = all_reduce_sums([loss_sum, samples], device,
                                                        args.distributed)
        begin = synchronized_time(device)
        hr, ndcg, val_loss = evaluation(model, autocast)
        val_time = synchronized_time(device) - begin
        # Samples actually trained (the last partial batch is dropped), over all ranks.
        train_throughput = batches.steps * batches.batch_size / train_time
        eval_throughput = evaluation.samples / val_time
        history['train_throughputs'].append(train_throughput)
        history['eval_throughputs'].append(eval_throughput)
        history['hrs'].append(hr)
        history['epoch'] = epoch
        train_loss = train_loss_sum / train_samples

        say(f'Epoch {epoch}: HR@{args.topk} = {hr:.4f}, NDCG@{args.topk} = {ndcg:.4f}, '
            f'train_time = {train_time:.2f}, val_time = {val_time:.2f}')
        say(f'         train_loss = {train_loss:.4f}, validation_loss = {val_loss:.4f}, '
            f'train_throughput = {train_throughput:.3e} samples/s, '
            f'eval_throughput = {eval_throughput:.3e} samples/s')
        figures = {'train_throughput': train_throughput, f'hr@{args.topk}': hr,
                   f'ndcg@{args.topk}': ndcg, 'train_epoch_time': train_time,
                   'validation_epoch_time': val_time, 'eval_throughput': eval_throughput,
                   'train_loss': train_loss, 'validation_loss': val_loss}
        logger.log((epoch,), figures)
        if summary_writer is not None:
            for name, value in figures.items():
                summary_writer.add_scalar(name, value, epoch)
            summary_writer.flush()

        history['elapsed'] = time_offset + synchronized_time(device) - main_start
        if hr > history['best_hr']:
            history['best_hr'], history['best_epoch'] = hr, epoch
            history['best_model_elapsed'] = history['elapsed']
            if args.checkpoint_dir and rank0:
                path = os.path.join(args.checkpoint_dir, BEST_MODEL_FILE)
                say('New best hr! Saving the model to: ', path)
                save_checkpoint(model.state_dict(), path)
        if args.checkpoint_dir and rank0:
            save_checkpoint({
                'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scaler': scaler.state_dict(), 'history': history, 'args': vars(args),
                'rng': {'torch': torch.get_rng_state(), 'data': generator.get_state().cpu(),
                        'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda'
                        else None},
            }, last_path)
        if hr >= args.threshold:
            say(f'Hit threshold of {args.threshold}')
            break

    total = time_offset + synchronized_time(device) - main_start
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
    }
    logger.log((), summary)
    say(', '.join(f'{key} = {value:.4g}' if isinstance(value, float) else f'{key} = {value}'
                  for key, value in summary.items()))
    return {'hrs': history['hrs'], 'best_hr': history['best_hr'], 'summary': summary}


def main(argv=None):
    """Command-line entry point; returns the run's figures (for tests and notebooks)."""
    args = parse_args(argv)
    try:
        device = init_distributed(args)
        return run(args, device)
    except UsageError as error:
        if int(os.environ.get('RANK', 0)) == 0:
            print(f'ncf.py: error: {error}', file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
