"""Cost of exact training negatives: one epoch's generation, approximate against exact.

    python benchmarks/negative_sampling.py --data data/cache/ml-20m [--device cuda]

Times dataloading.TrainBatches.epoch (negatives, shuffle and the batch gather) with
--negative_sampling approximate and exact, and the one-off ItemExclusion build, with device
synchronisation; the median of --repeat epochs each. The last line is JSON.
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ncflib import cli  # noqa: E402

PROGRAM = 'negative_sampling.py'
if __name__ == '__main__':
    cli.handle_signals_early(PROGRAM)  # Ctrl-C while torch loads is one line too

import dataloading  # noqa: E402
from ncflib import runtime  # noqa: E402
from ncflib.recipe import DEFAULT_BATCH_SIZE, DEFAULT_NEGATIVE_SAMPLES  # noqa: E402


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROGRAM, description=__doc__.split('\n')[0])
    parser.add_argument('--data', required=True, help='a cache written by convert.py')
    parser.add_argument('--device', choices=['auto', 'cuda', 'cpu'], default='auto')
    parser.add_argument('-b', '--batch_size', type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument('-n', '--negative_samples', type=int, default=DEFAULT_NEGATIVE_SAMPLES)
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args(argv)
    for name in ('batch_size', 'negative_samples', 'repeat'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1, not {getattr(args, name)}')
    return args


def benchmark(args):
    plan = runtime.resolve(runtime.PlanOptions(device=args.device, precision='fp32'))
    device = plan.device
    dataset = dataloading.load_dataset(args.data, device)

    start = plan.time()
    exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                          dataset.n_users, dataset.n_items)
    build = plan.time() - start
    result = {'benchmark': 'negative_sampling', 'device': str(device),
              'n_train': len(dataset.train_users), 'n_items': dataset.n_items,
              'negative_samples': args.negative_samples, 'exclusion_build_s': round(build, 3)}
    for name, excluded in (('approximate', None), ('exact', exclusion)):
        batches = dataloading.TrainBatches(dataset, plan, args.batch_size,
                                           args.negative_samples, exclusion=excluded)
        generator = plan.generator(1)
        times = []
        for _ in range(args.repeat):
            start = plan.time()
            epoch = batches.epoch(generator)
            times.append(plan.time() - start)
            del epoch
        result[f'{name}_epoch_s'] = round(statistics.median(times), 3)
        print(f'{name}: {result[f"{name}_epoch_s"]:.3f} s per epoch', file=sys.stderr)
    result['exact_extra_s'] = round(result['exact_epoch_s'] - result['approximate_epoch_s'], 3)
    print(json.dumps(result))
    return result


def main(argv=None):
    return cli.run_main(PROGRAM, benchmark, parse_args(argv), kept='nothing was written')


if __name__ == '__main__':
    main()
