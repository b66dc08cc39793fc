"""How fast tune.py searches: a study of --trials trials run as a user runs it (one tune.py
process), timed from start to its last line, with how many trials were pruned and each trial's
overhead beyond its epochs (its seconds in the study less the training and validation times its
log.json records: building the model, the optimizer and the batches, checkpoints, Optuna).

    python benchmarks/tune_benchmark.py --ratings ../shared/data/ml-100k/u.data --out /tmp/tb
    python benchmarks/tune_benchmark.py --data CACHE_WITH_HOLDOUT --model neumf --trials 20

The last line printed is the JSON of the figures (benchmarks/RESULTS.md keeps them).
"""
import csv
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from logger.logger import read_log  # noqa: E402
from ncflib import cli  # noqa: E402
from ncflib.cli import UsageError  # noqa: E402

PROGRAM = 'tune_benchmark.py'


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--ratings', help='a ratings file, converted with a validation holdout '
                                          'into OUT/cache first')
    source.add_argument('--data', help='a cache with a validation holdout')
    parser.add_argument('--out', default='tune_benchmark', help='where everything goes')
    parser.add_argument('--model', default='mf')
    parser.add_argument('--trials', type=int, default=30)
    parser.add_argument('--epochs', type=int, default=20)
    parser.add_argument('--flags', default='', help='more flags for tune.py')
    return parser.parse_args(argv)


def run(args):
    data = args.data
    if args.ratings:
        data = os.path.join(args.out, 'cache')
        subprocess.run([sys.executable, os.path.join(ROOT, 'convert.py'), '--path', args.ratings,
                        '--output', data, '--validation_holdout'], check=True,
                       stdout=subprocess.DEVNULL)
    output = os.path.join(args.out, 'tuning')
    if os.path.exists(os.path.join(output, 'study.db')):
        raise UsageError(f'{output} holds a study already: give another --out')
    command = [sys.executable, os.path.join(ROOT, 'tune.py'), '--data', data, '--model',
               args.model, '-e', str(args.epochs), '--trials', str(args.trials), '--output',
               output, *args.flags.split()]
    start = time.perf_counter()
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode:
        raise UsageError(f'tune.py failed (exit status {completed.returncode})')
    print(completed.stdout, end='')
    with open(os.path.join(output, 'trials.csv')) as file:
        rows = list(csv.DictReader(file))
    overheads = []
    for row in rows:
        log = read_log(os.path.join(output, 'trials', f'{int(row["trial"]):04d}', 'log.json'))
        epochs = sum(entry['data'].get('train_epoch_time', 0) +
                     entry['data'].get('validation_epoch_time', 0) for entry in log)
        overheads.append(float(row['seconds']) - epochs)
    with open(os.path.join(output, 'best.json')) as file:
        best = json.load(file)
    figures = {'model': args.model, 'trials': len(rows), 'epochs': args.epochs,
               'pruned': sum(row['state'] == 'pruned' for row in rows),
               'seconds': round(seconds, 1),
               'trial_overhead_s': {'median': round(statistics.median(overheads), 3),
                                    'max': round(max(overheads), 3)},
               'best_validation': best['best_value'], 'test_hr@10': best['test']['hr@10'],
               'cpu': _cpu(), 'command': ' '.join(command[1:])}
    print(json.dumps(figures))
    return figures


def _cpu():
    from ncflib.runtime import cpu_name
    return cpu_name()


def main(argv=None):
    return cli.run_main(PROGRAM, run, parse_args(argv))


if __name__ == '__main__':
    main()
