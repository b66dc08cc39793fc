"""The device memory a training run needs at a dataset's shape: computed, and measured on CUDA.

    python benchmarks/gpu_memory.py --shape ml-32m            # computed (any machine)
    python benchmarks/gpu_memory.py --shape ml-32m --measure  # and measured (CUDA)
    python benchmarks/gpu_memory.py --users 100000000 --items 2000000 --rows 10000000000
                                                              # any size, on paper

Computed, part by part, at the shape's users, items and training positives, the reference's
batch of 2^20 and model (NeuMF, 64 factors, layers 256 256 128 64), 4 negatives, 100 test
negatives, bf16 (the CUDA default):

- data: the cached tensors on the device (training pairs, test positives and negatives);
- epoch: what TrainBatches.epoch holds at its peak while it draws an epoch, and keeps after
  (the epoch's users, items and labels: 20 bytes a sample);
- model: weights (fp32), their gradients (dense; with --embedding_updates sparse the tables'
  gradients are only the touched rows', with their copies), Adam's two moments;
- activations: what autograd saves for the backward of one step, from the saved-tensor hooks
  of an eager step of a small batch under autocast, scaled to the batch (torch.compile saves as
  much or less);
- scoring: the scoring copy (layers in bf16, output layer fp32) and one evaluation chunk's
  activations.

Past one GPU (--gpu_gib), on paper: how many GPUs TorchRec's row-wise sharding of the
embedding tables would need, each GPU holding its share of the tables' rows with their dense
gradients and Adam moments and the rest (data, epoch, dense layers, activations, scoring) as
every process of ncf's data-parallel recipe holds it today; and how many if everything that
grows with the data were sharded too (each process drawing only its share of the epoch).

--measure (CUDA) builds random data of the shape on the GPU, draws an epoch, trains steps and
evaluates with ncf's own code, and reports torch.cuda.max_memory_allocated after each part.
The last line is JSON.
"""
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ncflib import cli  # noqa: E402

PROGRAM = 'gpu_memory.py'
if __name__ == '__main__':
    cli.handle_signals_early(PROGRAM)  # Ctrl-C while torch loads is one line too

import torch  # noqa: E402

import dataloading  # noqa: E402
import synthetic  # noqa: E402
from ncflib import models, runtime  # noqa: E402
from ncflib.cache import VALID_NEGATIVE  # noqa: E402
from ncflib.recipe import DEFAULT_BATCH_SIZE, DEFAULT_NEGATIVE_SAMPLES  # noqa: E402

GIB = 2 ** 30


def epoch_bytes(positives, negatives, batch_size):
    """(peak, kept): bytes TrainBatches.epoch holds at its peak, and the epoch it returns. It
    draws the negatives (int64, `negatives` per positive) and a permutation of the epoch (int64),
    then gathers users and items (int64) and the labels (float32) of the samples that fill whole
    batches; at the peak, with the permutation, the negatives, the positive mask (bool), the
    source index, the users, and the items' two gathered operands and result are alive."""
    samples = positives * (1 + negatives)
    used = samples // batch_size * batch_size
    permutation, drawn = 8 * samples, 8 * positives * negatives
    kept = used * (8 + 8 + 4)
    peak = permutation + drawn + used * (1 + 8 + 8 + 3 * 8)
    return peak, kept


def saved_bytes(shape, precision, samples):
    """Bytes autograd saves for one eager training step of `samples` under autocast (each
    storage once)."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)
    model = shape.build(1000, 1000)
    users = torch.randint(0, 1000, (samples,))
    items = torch.randint(0, 1000, (samples,))
    dtype = runtime.DTYPES[precision]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
        logits = model(users, items)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.float().view(-1), torch.zeros(samples))
    del loss
    return sum(saved.values())


def activation_bytes_per_sample(shape, precision):
    """Bytes autograd saves per sample for a training step: the slope between two batch sizes
    (what does not grow with the batch, such as the weights' casts, falls out)."""
    return (saved_bytes(shape, precision, 8192) - saved_bytes(shape, precision, 4096)) / 4096


def computed(users, items, positives, shape, batch_size, negatives, valid_negative, precision,
             valid_batch_size, updates='dense'):
    """{part: GiB} of a training run at this shape, and their total at the peak (the epoch's
    peak, then the step's activations, are never alive at once). updates: 'dense' or 'sparse'
    embedding updates (sparse_updates.py: the tables' gradients are the rows a batch touches,
    at most min(batch, rows) a side, beside their copies)."""
    model = shape.build(1, 1)  # the tables' rows scale with the data, the layers do not
    widths = {side: sum(table.embedding_dim for name, table in model.embeddings().items()
                        if side in name) for side in ('user', 'item')}
    dense = sum(p.numel() for name, p in model.named_parameters() if 'embed' not in name)
    parameters = users * widths['user'] + items * widths['item'] + dense
    data = positives * 2 * 8 + users * 2 * 8 + users * valid_negative * 8
    peak_epoch, kept_epoch = epoch_bytes(positives, negatives, batch_size)
    weights = parameters * 4
    gradients = weights if updates == 'dense' else 4 * (dense + 2 * (
        min(batch_size, users) * widths['user'] + min(batch_size, items) * widths['item']))
    activations = activation_bytes_per_sample(shape, precision) * batch_size
    scoring = parameters * torch.finfo(runtime.DTYPES[precision]).bits // 8 \
        + valid_batch_size * model.scoring_bytes_per_pair(runtime.DTYPES[precision])
    parts = {
        'data': data,
        'epoch (peak while drawn)': peak_epoch,
        'epoch (kept)': kept_epoch,
        'weights (fp32)': weights,
        f'gradients ({updates}, fp32)': gradients,
        'Adam state (two moments)': 2 * weights,
        f'activations (batch {batch_size:,}, {precision})': activations,
        'scoring copy and one evaluation chunk': scoring,
    }
    steady = data + kept_epoch + 3 * weights + gradients
    total = max(steady - kept_epoch + peak_epoch, steady + activations, steady + scoring)
    # what does not grow with the data: the dense layers (with gradients and moments), one
    # step's activations and one evaluation chunk
    fixed = dense * 4 * 4 + (gradients - dense * 4 if updates == 'sparse' else 0) \
        + activations + valid_batch_size * model.scoring_bytes_per_pair(runtime.DTYPES[precision])
    tables = (parameters - dense) * 4 * (4 if updates == 'dense' else 3)
    return {name: value / GIB for name, value in parts.items()}, total / GIB, parameters, \
        {'tables': tables / GIB, 'fixed': fixed / GIB}


def gpus_needed(sharded_gib, kept_gib, gpu_gib):
    """GPUs of `gpu_gib` each that hold `sharded_gib` split evenly between them and
    `kept_gib` on every one; None where `kept_gib` alone does not fit one."""
    if kept_gib >= gpu_gib:
        return None
    return max(1, math.ceil(sharded_gib / (gpu_gib - kept_gib)))


def measured(device, users, items, positives, shape, batch_size, negatives, valid_negative,
             precision, steps=3):
    """{part: GiB}: the device's peak memory allocated after each part of a run at this shape
    (runtime.peak_memory_gib: None on a CPU, where the parts still run)."""
    from ncflib.evaluation import Evaluation
    from ncflib.training import Trainer

    plan = runtime.resolve(runtime.PlanOptions(device=device, precision=precision), shape)
    device = plan.device
    generator = torch.Generator(device=device).manual_seed(0)
    peaks = {}

    def peak(name):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)  # the parts' kernels have run
        peaks[name] = runtime.peak_memory_gib(device)
    runtime.reset_peak_memory(device)
    dataset = dataloading.Dataset(
        train_users=torch.randint(0, users, (positives,), device=device, generator=generator),
        train_items=torch.randint(0, items, (positives,), device=device, generator=generator),
        test_items=torch.randint(0, items, (users,), device=device, generator=generator),
        test_negatives=torch.randint(0, items, (users, valid_negative), device=device,
                                     generator=generator),
        n_users=users, n_items=items, metadata={})
    peak('data')
    model = plan.build_model(shape, users, items).to(device)
    batches = dataloading.TrainBatches(dataset, plan, batch_size, negatives)
    trainer = Trainer(plan, model, batches)
    peak('model')
    epoch_users, epoch_items, labels = batches.epoch(generator)
    peak('epoch drawn')
    trainer.warm_up()
    for step in range(min(steps, len(labels))):
        trainer.step(epoch_users[step], epoch_items[step], labels[step])
    peak(f'{steps} training steps')
    Evaluation(plan, dataset, model, 10)()
    peak('evaluation')
    return peaks


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROGRAM, description=__doc__.split('\n')[0])
    parser.add_argument('--shape', choices=sorted(synthetic.SHAPES), default='ml-32m')
    parser.add_argument('--users', type=int, help="users (instead of the shape's)")
    parser.add_argument('--items', type=int, help="items (instead of the shape's)")
    parser.add_argument('--rows', type=int, help="interactions (instead of the shape's)")
    parser.add_argument('--gpu_gib', type=float, default=80.0,
                        help='memory of one GPU, for the row-wise sharding count (an 80 GB H100)')
    parser.add_argument('-b', '--batch_size', type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument('--precision', choices=['fp32', 'fp16', 'bf16'], default='bf16')
    parser.add_argument('--embedding_updates', choices=['dense', 'sparse'], default='dense',
                        help="ncf.py's: the tables' gradients whole (dense) or the touched rows")
    parser.add_argument('--measure', action='store_true', help='also measure it (CUDA)')
    return parser.parse_args(argv)


def report(args):
    """The computed parts (and, with --measure, the measured ones) on stderr, the JSON last."""
    if args.measure and not torch.cuda.is_available():
        raise cli.UsageError('--measure needs CUDA')
    users, items, rows = (given if given is not None else default for given, default in zip(
        (args.users, args.items, args.rows), synthetic.SHAPES[args.shape]))
    if min(users, items) < 1 or rows <= users or args.gpu_gib <= 0:
        raise cli.UsageError('--users and --items must be positive, --rows more than --users '
                             '(a test positive each) and --gpu_gib positive')
    positives = rows - users  # a test positive per user
    shape = models.ModelShape()
    parts, total, parameters, scaling = computed(users, items, positives, shape,
                                                 args.batch_size, DEFAULT_NEGATIVE_SAMPLES,
                                                 VALID_NEGATIVE, args.precision, args.batch_size,
                                                 args.embedding_updates)
    name = args.shape if args.users is args.items is args.rows is None else 'given'
    print(f'{name}: {users:,} users, {items:,} items, {positives:,} training positives; '
          f'NeuMF of {parameters:,} parameters; batch {args.batch_size:,}, {args.precision}, '
          f'{args.embedding_updates} embedding updates',
          file=sys.stderr)
    for part, gib in parts.items():
        print(f'  {part:<45} {gib:7.2f} GiB', file=sys.stderr)
    print(f'  {"peak (computed)":<45} {total:7.2f} GiB', file=sys.stderr)
    tables, fixed = scaling['tables'], scaling['fixed']
    # Row-wise sharding of the tables alone (the rest as every process holds it today), and
    # of everything that grows with the data (each process drawing and holding its own share
    # of the epoch, the data and the scoring copy's rows, as the recipe does not today).
    gpus = {'tables': gpus_needed(tables, total - tables, args.gpu_gib),
            'everything': gpus_needed(total - fixed, fixed, args.gpu_gib)}
    for what, count in (('the tables sharded', gpus['tables']),
                        ('all that grows with the data sharded', gpus['everything'])):
        print(f'  GPUs of {args.gpu_gib:g} GiB, {what + ":":<38} '
              + (str(count) if count else 'none (what each one keeps whole does not fit)'),
              file=sys.stderr)
    result = {'benchmark': 'gpu_memory', 'shape': name, 'users': users, 'items': items,
              'positives': positives, 'parameters': parameters, 'batch_size': args.batch_size,
              'precision': args.precision, 'embedding_updates': args.embedding_updates,
              'computed_gib': parts, 'computed_peak_gib': total,
              'tables_gib': tables, 'fixed_gib': fixed, 'gpu_gib': args.gpu_gib,
              'row_wise_gpus': gpus}
    if args.measure:
        try:
            result['measured_peak_gib'] = measured('cuda', users, items, positives, shape,
                                                   args.batch_size, DEFAULT_NEGATIVE_SAMPLES,
                                                   VALID_NEGATIVE, args.precision)
        except Exception as error:  # running out of memory is an answer too, in one line
            if not cli.out_of_memory(error):
                raise
            raise cli.UsageError(f'out of memory measuring {args.shape} at batch '
                                 f'{args.batch_size:,} ({cli.first_line(error)})') from None
        for name, gib in result['measured_peak_gib'].items():
            print(f'  measured peak after {name:<30} {gib:7.2f} GiB', file=sys.stderr)
    print(json.dumps(result))
    return result


def main(argv=None):
    return cli.run_main(PROGRAM, report, parse_args(argv), kept='nothing was written')


if __name__ == '__main__':
    main()
