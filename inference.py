"""Benchmark inference performance of an NCF model: latency and throughput per batch size.

    python inference.py                                       # random weights, ML-20m's tables
    python inference.py --load_checkpoint_path checkpoints/model.pth --batch_sizes 1,64,1024
    python inference.py --device cpu --precision bf16

For each batch size: --num_batches timed forwards (after warm-up) of random (user, item) pairs,
each synchronised; mean, p90, p95 and p99 latency and the mean throughput, printed as a table
and written to the JSON log (dllogger's layout: one [batch_size] record each, [] for the
summary). With a checkpoint, the model, its table sizes and layers come from it.
"""
import sys

from ncflib import cli

if __name__ == '__main__':
    cli.handle_signals_early('inference.py')  # Ctrl-C while torch loads is one line too

import numpy as np  # noqa: E402
import torch  # noqa: E402

from logger import Logger  # noqa: E402
from logger.autologging import log_args, log_hardware  # noqa: E402
from ncflib import checkpoints, models, runtime  # noqa: E402
from ncflib.cache import ML_20M_ITEMS, ML_20M_USERS  # noqa: E402
from ncflib.cli import (ArgumentParser, UsageError, check_log_file,  # noqa: E402
                        check_paths_apart, first_line, out_of_memory, run_main, warn)
from ncflib.evaluation import NonFiniteScores, Scorer  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description='Benchmark inference performance of the NCF model')
    parser.add_argument('--load_checkpoint_path', default=None, type=str,
                        help='Checkpoint to load (model.pth or last.pth); None: random weights')
    parser.add_argument('--n_users', default=ML_20M_USERS, type=int,
                        help='Number of users (ML-20m after preprocessing); from the checkpoint '
                             'when one is given')
    parser.add_argument('--n_items', default=ML_20M_ITEMS, type=int,
                        help='Number of items (ML-20m after preprocessing); likewise')
    parser.add_argument('--model', choices=models.MODELS, default=models.DEFAULT_MODEL,
                        help='The model of the family (from the checkpoint when one is given)')
    parser.add_argument('-f', '--factors', type=int, default=models.DEFAULT_FACTORS,
                        help='Number of predictive factors')
    parser.add_argument('--dropout', type=float, default=models.DEFAULT_DROPOUT,
                        help='Dropout probability (inactive in inference)')
    parser.add_argument('--layers', nargs='+', type=int, default=list(models.DEFAULT_LAYERS),
                        help='Sizes of hidden layers for MLP')
    parser.add_argument('--batch_sizes', default='1,64,1024,4096,16384,65536,262144,1048576',
                        help='Comma-separated batch sizes')
    parser.add_argument('--num_batches', default=20, type=int,
                        help='Number of batches for which to measure latency and throughput')
    parser.add_argument('--warmup', default=5, type=int, help='Untimed batches first')
    runtime.add_arguments(parser)
    parser.add_argument('--log_path', default='log.json', type=str,
                        help='Path for the JSON log')
    parser.add_argument('-s', '--seed', type=int, default=1)
    args = parser.parse_args(argv)
    args.given = parser.given_flags(argv)
    try:
        args.plan_options = runtime.PlanOptions.from_flags(vars(args))
    except UsageError as error:  # contradicting flags: argparse's kind of error
        parser.error(str(error))
    return args


def percentile_ms(latencies, q):
    return float(np.percentile(latencies, q) * 1000)


def benchmark(args):
    try:
        batch_sizes = [int(size) for size in args.batch_sizes.split(',')]
    except ValueError:
        raise UsageError(f'--batch_sizes must be comma-separated integers, not '
                         f'{args.batch_sizes!r}') from None
    if not batch_sizes or min(batch_sizes) < 1 or args.num_batches < 1 or args.warmup < 0:
        raise UsageError('batch sizes and --num_batches must be positive, --warmup not negative')
    if min(args.n_users, args.n_items) < 1:
        raise UsageError('--n_users and --n_items must be positive')
    check_log_file(args.log_path, '--log_path')
    check_paths_apart({args.load_checkpoint_path: '--load_checkpoint_path'}
                      if args.load_checkpoint_path else {},
                      {args.log_path: f'--log_path {args.log_path}'})
    state = None
    if args.load_checkpoint_path:
        state = checkpoints.read(args.load_checkpoint_path)
        shape, n_users, n_items = checkpoints.shape_of(state, args.load_checkpoint_path)
        checkpoints.check_given_flags(args.load_checkpoint_path, shape, n_users, n_items,
                                      vars(args), args.given,
                                      'the benchmark times its model (leave the flag out)')
        args.n_users, args.n_items = n_users, n_items
    else:
        shape = models.ModelShape(args.model, args.factors, args.layers, args.dropout)
    plan = runtime.resolve(args.plan_options, shape)
    for warning in plan.warnings:
        warn(warning)

    torch.manual_seed(args.seed)
    model = plan.build_model(shape, args.n_users, args.n_items)
    if state is not None:
        checkpoints.load_model_state(model, state, args.load_checkpoint_path)
    # the weights cast once to the plan's precision, compiled where the plan compiles
    scorer = Scorer(plan, model.to(plan.device))
    device, precision = plan.device, plan.precision

    logger = Logger(args.log_path)
    log_hardware(logger)
    log_args(logger, {name: value for name, value in vars(args).items()
                      if name not in ('plan_options', 'given')})
    print(f'{shape.describe()}, {args.n_users} users x {args.n_items} items, '
          f'{"random" if state is None else "checkpoint"} weights; {plan.describe()}')
    header = (f'{"batch size":>11} {"throughput avg":>15} {"latency avg":>12} {"p90":>9} '
              f'{"p95":>9} {"p99":>9}   (samples/s, ms)')
    print(header)
    results = []
    generator = plan.generator(args.seed)
    with torch.no_grad():
        for batch_size in batch_sizes:
            try:
                result = time_batches(scorer, plan, generator, batch_size, args)
            except Exception as error:  # running out of memory is one line; the rest, bugs
                if not out_of_memory(error):
                    raise
                raise UsageError(f'out of memory at batch size {batch_size} on {device} '
                                 f'({first_line(error)}): use smaller --batch_sizes') from None
            results.append(result)
            logger.log((batch_size,), result)
            latencies = result['inference_latencies']
            print(f'{batch_size:>11} {batch_size / result["mean_inference_latency"]:>15.4g} '
                  f'{result["mean_inference_latency"] * 1000:>12.3f} '
                  f'{percentile_ms(latencies, 90):>9.3f} {percentile_ms(latencies, 95):>9.3f} '
                  f'{percentile_ms(latencies, 99):>9.3f}')
            sys.stdout.flush()
    best = max(results, key=lambda r: r['mean_inference_throughput'])
    logger.log((), {'best_inference_throughput': best['mean_inference_throughput'],
                    'best_batch_size': best['batch_size'], 'precision': precision,
                    'device': str(device)})
    logger.close()
    return results


def time_batches(scorer, plan, generator, batch_size, args):
    """--warmup then --num_batches synchronised forwards of random pairs at `batch_size`."""
    users = torch.randint(0, args.n_users, (batch_size,), device=plan.device,
                          generator=generator)
    items = torch.randint(0, args.n_items, (batch_size,), device=plan.device,
                          generator=generator)
    latencies = []
    for index in range(args.warmup + args.num_batches):
        start = plan.time()
        scores = scorer.pairs(users, items, sigmoid=True)
        latency = plan.time() - start
        if index >= args.warmup:
            latencies.append(latency)
    nonfinite = int((~torch.isfinite(scores)).sum())  # after the timed batches
    if nonfinite:
        raise NonFiniteScores(nonfinite, batch_size)
    mean = float(np.mean(latencies))
    return {'batch_size': batch_size,
            'mean_inference_throughput': batch_size / mean,
            'best_inference_throughput': batch_size / min(latencies),
            'mean_inference_latency': mean,
            'p90_inference_latency': percentile_ms(latencies, 90) / 1000,
            'p95_inference_latency': percentile_ms(latencies, 95) / 1000,
            'p99_inference_latency': percentile_ms(latencies, 99) / 1000,
            'inference_latencies': latencies}


def main(argv=None):
    args = parse_args(argv)
    return run_main('inference.py', benchmark, args,
                    kept=f'{args.log_path} holds the batch sizes measured so far')


if __name__ == '__main__':
    main()
