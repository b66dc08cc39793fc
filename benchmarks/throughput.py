"""Training and evaluation samples/s, one row per knob of the runtime plan, all in one run.

    python benchmarks/throughput.py                       # GPU: ML-20m's shape; CPU: ML-1m's
    python benchmarks/throughput.py --shape ml-32m        # today's largest MovieLens
    python benchmarks/throughput.py --device cpu --batch_size 65536
    python benchmarks/throughput.py --data data/cache/ml-20m

The first row is the reference's configuration on this device (runtime.baseline: the eager model
in fp16 AMP with fused Adam on CUDA, in fp32 with plain Adam on a CPU); each following row adds one
knob of the default plan (its precision, fused Adam, micro-batches), then every implementation
that runs here, each with the default's other settings, and last the default implementation in
the other precision (the one auto did not choose: on a CPU, fp32 or bf16). Every row runs
ncf.py's own code (runtime.Plan, training.Trainer, evaluation.Evaluation) and times, with device
synchronisation:
a training step (median of --steps after warm-up), a whole epoch (negative sampling and
shuffling included), one full evaluation, the time from building the model to the end of the
first step (compilation included), and, on CUDA, the peak memory. Without --data,
MovieLens-shaped synthetic data is generated and converted first (cached in --workdir).

Each row's figures are printed as one JSON line as soon as it is timed (`default_plan`: whether
it is the default's configuration), so a run stopped or timed out keeps the rows it finished;
the last line is JSON: every row, and train_speedup / eval_speedup of the default against the
first row. Stopped (Ctrl-C, SIGTERM), it ends in one line saying how many rows it printed.
"""
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ncflib import cli  # noqa: E402

PROGRAM = 'throughput.py'
if __name__ == '__main__':
    cli.handle_signals_early(PROGRAM)  # Ctrl-C while torch loads is one line too

import torch  # noqa: E402

import convert  # noqa: E402
import dataloading  # noqa: E402
import synthetic  # noqa: E402
from ncflib import models, runtime  # noqa: E402
from ncflib.cache import METADATA_FILE  # noqa: E402
from ncflib.evaluation import Evaluation  # noqa: E402
from ncflib.recipe import (DEFAULT_BETAS, DEFAULT_LEARNING_RATE,  # noqa: E402
                           DEFAULT_NEGATIVE_SAMPLES)
from ncflib.training import Trainer  # noqa: E402

# Per device type: the precision the last row times the default implementation in, beside the
# default's own.
OTHER_PRECISION = {'cpu': {'fp32': 'bf16', 'bf16': 'fp32'},
                   'cuda': {'bf16': 'fp16', 'fp16': 'bf16', 'fp32': 'bf16', 'tf32': 'bf16'}}


def prepare_data(args, shape):
    if args.data:
        return args.data
    users, items, rows = synthetic.SHAPES[shape]
    directory = os.path.join(args.workdir, f'synthetic-{shape}')
    cache = os.path.join(directory, 'cache')
    if not os.path.exists(os.path.join(cache, METADATA_FILE)):
        print(f'Generating {shape}-shaped synthetic data in {directory} ...', file=sys.stderr)
        ratings = os.path.join(directory, 'ratings.csv')
        synthetic.write_csv(ratings, synthetic.generate(users, items, rows, seed=args.seed),
                            layout='ml-20m')
        convert.main(['--path', ratings, '--output', cache])
    return cache


def rows_of(default):
    """(name, plan, embedding updates) per row: the baseline, one knob at a time towards the
    default, then each implementation with the default's other settings, the default in the
    other precision, and the default with sparse embedding updates."""
    plan = runtime.baseline(default)
    rows = [(f'baseline: eager {plan.precision}', plan)]
    for knob, value, name in (('precision', default.precision, default.precision),
                              ('fused_optimizer', default.fused_optimizer, 'fused Adam'),
                              ('micro_batch', default.micro_batch,
                               f'micro-batches of {default.micro_batch}')):
        if getattr(plan, knob) != value:
            plan = dataclasses.replace(plan, **{knob: value})
            rows.append((f'+ {name}', plan))
    for impl in runtime.implementations(default.device):
        if impl != 'eager':
            rows.append((impl, dataclasses.replace(default, impl=impl)))
    # The default implementation in the other reduced or full precision, to check auto's choice
    # in the same run.
    other = OTHER_PRECISION[default.device.type][default.precision]
    rows.append((f'{default.impl}, {other}',
                 dataclasses.replace(default, precision=other, notes=(), warnings=())))
    return [(name, plan, 'dense') for name, plan in rows] + [updates_rows(default)[1]]


def updates_rows(plan):
    """`plan` with dense, then with sparse embedding updates."""
    whole = ' (whole step)' if plan.whole_step else ''
    return [(f'{plan.impl}{whole}, {updates} updates', plan, updates)
            for updates in ('dense', 'sparse')]


def time_row(name, plan, updates, dataset, args):
    """Time one configuration; returns its figures."""
    runtime.reset_peak_memory(plan.device)
    torch.manual_seed(args.seed)
    start = plan.time()
    model = plan.build_model(args.model_shape, dataset.n_users,
                             dataset.n_items).to(plan.device)
    batches = dataloading.TrainBatches(dataset, plan, args.batch_size, args.negative_samples)
    trainer = Trainer(plan, model, batches, args.learning_rate, (args.beta1, args.beta2),
                      embedding_updates=updates)
    generator = plan.generator(args.seed)
    users, items, labels = trainer.draw(generator)

    def step(index):
        index %= batches.steps
        trainer.step(users[index], items[index], labels[index])

    step(0)
    first_step = plan.time() - start
    for index in range(1, 3):  # warm-up
        step(index)
    step_times = []
    for index in range(3, 3 + args.steps):
        begin = plan.time()
        step(index)
        step_times.append(plan.time() - begin)
    step_time = statistics.median(step_times)
    profile = profile_steps(name, step, plan, args) if args.profile else None
    figures = {
        'row': name,
        'impl': plan.impl,
        'precision': plan.precision,
        'fused_optimizer': plan.fused_optimizer,
        'micro_batch': plan.micro_batch,
        'embedding_updates': updates,
        'step_ms': step_time * 1000,
        'step_ms_range': [min(step_times) * 1000, max(step_times) * 1000],
        'train_step_samples_per_s': args.batch_size / step_time,
        'first_step_s': first_step,
    }
    if profile is not None:
        figures['profile'] = profile
    line = (f'{name:>28}: step {figures["step_ms"]:.2f} ms = '
            f'{figures["train_step_samples_per_s"]:.3e} samples/s')
    if not args.steps_only:
        begin = plan.time()
        trainer.epoch(generator)
        epoch_time = plan.time() - begin
        evaluation = Evaluation(plan, dataset, model, topk=10)
        evaluation.warm_up()
        evaluation()  # warm-up
        begin = plan.time()
        hr = evaluation().hr
        eval_time = plan.time() - begin
        figures.update({
            'train_epoch_samples_per_s': batches.steps * args.batch_size / epoch_time,
            'epoch_s': epoch_time,
            'eval_samples_per_s': evaluation.samples / eval_time,
            'eval_s': eval_time,
            'hr_after_one_epoch': round(hr, 4),
        })
        line += (f', epoch {epoch_time:.2f} s = {figures["train_epoch_samples_per_s"]:.3e} '
                 f'samples/s, eval {eval_time:.2f} s = {figures["eval_samples_per_s"]:.3e} '
                 'samples/s')
    figures['peak_memory_gib'] = runtime.peak_memory_gib(plan.device)
    print(f'{line}, first step after {first_step:.2f} s', file=sys.stderr, flush=True)
    return figures


def profile_steps(name, step, plan, args):
    """The --profile operators with the most self time per step over --steps more steps, as
    [name, ms per step, calls per step]: on CUDA the kernels, by device time (the operators
    that launched them would count it twice), on a CPU the operators, by host time. Printed as
    a table too."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_cuda = plan.device.type == 'cuda'
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for index in range(3, 3 + args.steps):
            step(index)
        plan.time()  # the queued kernels finish inside the profile
    key = 'self_device_time_total' if on_cuda else 'self_cpu_time_total'
    kind = torch.autograd.DeviceType.CUDA if on_cuda else torch.autograd.DeviceType.CPU
    # not the user annotations (an optimizer's step): their device time is their kernels'
    events = sorted((event for event in profiler.key_averages()
                     if event.device_type == kind
                     and not getattr(event, "is_user_annotation", False)),
                    key=lambda event: getattr(event, key), reverse=True)[:args.profile]
    rows = [[event.key, round(getattr(event, key) / 1000 / args.steps, 4),
             round(event.count / args.steps, 2)] for event in events]
    print(f'{name}: the {len(rows)} {"kernels" if on_cuda else "operators"} with the most self '
          'time per step', file=sys.stderr)
    for operator, ms, calls in rows:
        print(f'    {ms:9.4f} ms {calls:6g}x  {operator[:100]}', file=sys.stderr)
    return rows


def time_full_ranking(plan, dataset, args):
    """Full-ranking evaluation of the default plan's model on the first --full_ranking_users
    users (the whole catalogue): the ranks' figures alone (HR, NDCG, precision, recall, MAP,
    MRR: one comparison pass per user), then every figure (with catalogue coverage and mean
    popularity, a top K per user); the median of --eval_repeats each."""
    users = min(args.full_ranking_users or dataset.n_users, dataset.n_users)
    kept = dataset.train_users < users
    subset = dataloading.Dataset(dataset.train_users[kept], dataset.train_items[kept],
                                 dataset.test_items[:users], dataset.test_negatives[:users],
                                 users, dataset.n_items, dataset.metadata)
    torch.manual_seed(args.seed)
    model = plan.build_model(args.model_shape, dataset.n_users, dataset.n_items).to(plan.device)
    exclusion = dataloading.ItemExclusion(subset.train_users, subset.train_items, users,
                                          dataset.n_items)
    seconds = {}
    for name, catalogue in (('ranks', False), ('all', True)):
        evaluation = Evaluation(plan, subset, model, 10, 'full', exclusion, (1, 5, 20),
                                catalogue=catalogue)
        evaluation.warm_up()
        evaluation()  # warm-up
        times = []
        for _ in range(args.eval_repeats):
            begin = plan.time()
            evaluation()
            times.append(plan.time() - begin)
        seconds[name] = statistics.median(times)
    figures = {'row': 'full ranking, K 1 5 10 20', 'impl': plan.impl,
               'precision': plan.precision, 'users': users, 'n_items': dataset.n_items,
               'ranks_only_s': seconds['ranks'], 'all_metrics_s': seconds['all'],
               'all_over_ranks_only': round(seconds['all'] / seconds['ranks'], 3),
               'pairs_per_s': users * dataset.n_items / seconds['all']}
    print(f'{figures["row"]:>28}: {users:,} users x {dataset.n_items:,} items, ranks alone '
          f'{seconds["ranks"]:.2f} s, every metric {seconds["all"]:.2f} s '
          f'({figures["all_over_ranks_only"]}x)', file=sys.stderr, flush=True)
    return figures


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROGRAM, description=__doc__.split('\n')[0])
    parser.add_argument('--data', help='a cache to use (None: generate synthetic data)')
    parser.add_argument('--shape', choices=sorted(synthetic.SHAPES),
                        help='generated data shape (None: ml-20m on CUDA, ml-1m on a CPU)')
    parser.add_argument('--device', choices=['auto', 'cuda', 'cpu'], default='auto')
    parser.add_argument('--batch_size', type=int, default=None,
                        help='global batch (None: 1048576 on CUDA, 65536 on a CPU)')
    parser.add_argument('--steps', type=int, default=10, help='timed training steps')
    parser.add_argument('--impl', action='append', choices=runtime.IMPLEMENTATIONS[1:],
                        help='time only these implementations after the knob rows (with '
                             '--only_updates: these after the default) (repeatable)')
    parser.add_argument('--precision', choices=runtime.PRECISIONS,
                        default='auto', help="the default plan's precision")
    parser.add_argument('--model', choices=models.MODELS, default=models.DEFAULT_MODEL)
    parser.add_argument('-f', '--factors', type=int, default=models.DEFAULT_FACTORS)
    parser.add_argument('--layers', nargs='+', type=int, default=list(models.DEFAULT_LAYERS))
    parser.add_argument('--dropout', type=float, default=models.DEFAULT_DROPOUT)
    parser.add_argument('-n', '--negative_samples', type=int, default=DEFAULT_NEGATIVE_SAMPLES)
    parser.add_argument('-l', '--learning_rate', type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument('-b1', '--beta1', type=float, default=DEFAULT_BETAS[0])
    parser.add_argument('-b2', '--beta2', type=float, default=DEFAULT_BETAS[1])
    parser.add_argument('--full_ranking_users', type=int, default=None,
                        help='users of the full-ranking row (None: every user on CUDA, 2000 on '
                             'a CPU)')
    parser.add_argument('--eval_repeats', type=int, default=3,
                        help='timed evaluations of the full-ranking row (median)')
    parser.add_argument('--only_full_ranking', action='store_true',
                        help='time the full-ranking row alone')
    parser.add_argument('--only_updates', action='store_true',
                        help='time the default plan with dense and with sparse embedding '
                             'updates alone')
    parser.add_argument('--steps_only', action='store_true',
                        help='with --only_updates: time the steps alone, not an epoch and an '
                             'evaluation (for shapes whose epoch takes minutes)')
    parser.add_argument('--profile', type=int, default=0, metavar='K',
                        help="each row's K operators with the most self time per step (on "
                             "CUDA the kernels' device time), after its timed steps, in its "
                             "JSON as 'profile' (0: none)")
    parser.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'ncf-bench'))
    parser.add_argument('-s', '--seed', type=int, default=1)
    args = parser.parse_args(argv)
    if args.profile < 0:
        parser.error(f'--profile must be at least 0, not {args.profile}')
    for name in ('batch_size', 'steps'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1, not {getattr(args, name)}')
    if args.steps_only and not args.only_updates:
        parser.error('--steps_only goes with --only_updates')
    return args


def time_rows(rows, default, dataset, args, results):
    """Time each row, appending its figures to `results` and printing them as a JSON line as
    soon as it is done. The default's row is the first with its implementation and precision."""
    for name, plan, updates in rows:
        figures = time_row(name, plan, updates, dataset, args)
        figures['default_plan'] = (plan.impl == default.impl
                                   and plan.precision == default.precision
                                   and updates == 'dense'
                                   and not any(row['default_plan'] for row in results))
        results.append(figures)
        # one write: a stop (run_main's exception) never parts a row from its line's end
        sys.stdout.write(json.dumps(figures) + '\n')
        sys.stdout.flush()


def benchmark(args, results, planned):
    """Every row, then the JSON of them all; `results` and `planned` (lists) say how far it got."""
    args.model_shape = models.ModelShape(args.model, args.factors, args.layers, args.dropout)
    default = runtime.resolve(runtime.PlanOptions(device=args.device, precision=args.precision),
                              args.model_shape)
    on_cuda = default.device.type == 'cuda'
    runnable = runtime.implementations(default.device)
    for impl in args.impl or ():
        if impl not in runnable:
            raise cli.UsageError(f'--impl {impl} does not run on {default.device.type} here '
                                 f'(these do: {", ".join(runnable)})')
    args.batch_size = args.batch_size or (2 ** 20 if on_cuda else 2 ** 16)
    data = prepare_data(args, args.shape or ('ml-20m' if on_cuda else 'ml-1m'))
    dataset = dataloading.load_dataset(data, default.device)
    name = runtime.device_name(default.device)
    print(f'{name}: {dataset.n_users:,} users, {dataset.n_items:,} items, '
          f'{len(dataset.train_users):,} training positives, batch {args.batch_size:,}; '
          f'default: {default.describe()}', file=sys.stderr)

    args.full_ranking_users = args.full_ranking_users or (None if on_cuda else 2000)
    if args.only_full_ranking:
        figures = time_full_ranking(default, dataset, args)
        print(json.dumps(figures))
        return figures
    if args.only_updates:
        planned += updates_rows(default) + [
            row for impl in args.impl or () if impl != default.impl
            for row in updates_rows(dataclasses.replace(default, impl=impl))]
        time_rows(planned, default, dataset, args, results)
        dense, sparse = results[:2]
        result = {'benchmark': 'embedding updates', 'device': name,
                  'shape': {'n_users': dataset.n_users, 'n_items': dataset.n_items},
                  'batch_size': args.batch_size, 'rows': results,
                  'sparse_over_dense_step': round(dense['step_ms'] / sparse['step_ms'], 2)}
        if not args.steps_only:
            result['sparse_over_dense_epoch'] = round(sparse['train_epoch_samples_per_s']
                                                      / dense['train_epoch_samples_per_s'], 2)
        print(json.dumps(result))
        return result
    planned += [(row, plan, updates) for row, plan, updates in rows_of(default)
                if not args.impl or row.startswith(('baseline', '+')) or plan.impl in args.impl]
    time_rows(planned, default, dataset, args, results)
    full_ranking = time_full_ranking(default, dataset, args)
    sys.stdout.write(json.dumps(full_ranking) + '\n')
    default_row = next(row for row in results if row['default_plan'])
    baseline_row = results[0]
    result = {
        'benchmark': 'throughput',
        'device': name,
        'torch': torch.__version__,
        'python': platform.python_version(),
        'shape': {'n_users': dataset.n_users, 'n_items': dataset.n_items,
                  'n_train': len(dataset.train_users), 'n_test': dataset.n_users,
                  'negative_samples': args.negative_samples,
                  'valid_negative': dataset.test_negatives.shape[1]},
        'batch_size': args.batch_size,
        'default': default_row['row'],
        'default_precision': default.precision,
        'baseline': baseline_row['row'],
        'train_speedup': round(default_row['train_epoch_samples_per_s']
                               / baseline_row['train_epoch_samples_per_s'], 2),
        'train_step_speedup': round(default_row['train_step_samples_per_s']
                                    / baseline_row['train_step_samples_per_s'], 2),
        'eval_speedup': round(default_row['eval_samples_per_s']
                              / baseline_row['eval_samples_per_s'], 2),
        'rows': results,
        'full_ranking': full_ranking,
    }
    other_row = next(row for row in reversed(results) if row['embedding_updates'] == 'dense')
    sparse_row = next((row for row in results if row['embedding_updates'] == 'sparse'), None)
    if sparse_row is not None:
        result['sparse_over_dense_epoch'] = round(sparse_row['train_epoch_samples_per_s']
                                                  / default_row['train_epoch_samples_per_s'], 2)
    if other_row['impl'] == default.impl and other_row['precision'] != default.precision:
        # above 1: auto chose the faster precision
        result['default_over_other_precision'] = round(
            default_row['train_epoch_samples_per_s'] / other_row['train_epoch_samples_per_s'], 2)
    print(f'default ({result["default"]}) against {result["baseline"]}: train '
          f'{result["train_speedup"]}x (epoch), {result["train_step_speedup"]}x (step); eval '
          f'{result["eval_speedup"]}x; against {other_row["row"]}: train '
          f'{result.get("default_over_other_precision")}x', file=sys.stderr)
    print(json.dumps(result))
    return result


def main(argv=None):
    args = parse_args(argv)
    results, planned = [], []

    def kept():
        if not planned:
            return 'no row timed yet'
        return (f'{len(results)} of {len(planned)} rows timed, each printed on stdout as a JSON '
                'line')
    return cli.run_main(PROGRAM, benchmark, args, results, planned, kept=kept)


if __name__ == '__main__':
    main()
