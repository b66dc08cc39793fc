"""Training curves from one or several JSON logs, overlaid: HR@K, NDCG@K, losses, throughput.

    python -m logger.plot checkpoints/log.json -o curves.png
    python -m logger.plot run_a/log.json run_b/log.json --labels fp32 bf16 -o compare.png

Needs matplotlib (an optional dependency: pip install matplotlib).
"""
import argparse
import json
import os
import sys

from logger.logger import read_log
from utils import UsageError, atomic_write, exit_on_usage_error

PANELS = (  # (title, metrics drawn in it: a prefix matches hr@10, ndcg@5 ...)
    ('Hit rate', ('hr@',)),
    ('NDCG', ('ndcg@',)),
    ('Loss', ('train_loss', 'validation_loss')),
    ('Throughput (samples/s)', ('train_throughput', 'eval_throughput')),
)


def epoch_series(path):
    """{metric: ([epochs], [values])} from a training log; later records of an epoch win (a
    resumed run appends to its log)."""
    if not os.path.isfile(path):
        raise UsageError(f'{path} does not exist')
    try:
        records = read_log(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f'{path} is not a training log: {error}') from None
    by_epoch = {}
    for record in records:
        step = record.get('step')
        if isinstance(step, list) and len(step) == 1 and isinstance(record.get('data'), dict):
            by_epoch.setdefault(step[0], {}).update(record['data'])
    if not any(key.startswith('hr@') for data in by_epoch.values() for key in data):
        raise UsageError(f'{path} is not a training log: it has no per-epoch HR records')
    series = {}
    for epoch in sorted(by_epoch):
        for key, value in by_epoch[epoch].items():
            if isinstance(value, (int, float)):
                series.setdefault(key, ([], []))
                series[key][0].append(epoch)
                series[key][1].append(value)
    return series


def plot(logs, labels, output):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError('logger.plot needs matplotlib: pip install matplotlib') from None
    runs = [epoch_series(path) for path in logs]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for axis, (title, prefixes) in zip(axes.flat, PANELS):
        for run_index, (series, label) in enumerate(zip(runs, labels)):
            for key in sorted(series):
                if key.startswith(prefixes) or key in prefixes:
                    epochs, values = series[key]
                    style = '-' if not key.startswith('eval') and key != 'validation_loss' else '--'
                    axis.plot(epochs, values, style, marker='o', markersize=3,
                              color=f'C{run_index}',
                              label=f'{label}: {key}' if len(runs) > 1 else key)
        axis.set_title(title)
        axis.set_xlabel('epoch')
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(output, lambda temporary: figure.savefig(temporary, format='png', dpi=110))
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('logs', nargs='+', help='JSON logs written by ncf.py')
    parser.add_argument('-o', '--output', default='curves.png', help='PNG file to write')
    parser.add_argument('--labels', nargs='+', default=None,
                        help='one per log (default: the logs\' directory names)')
    args = parser.parse_args(argv)

    def run():
        labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(path)))
                                 or path for path in args.logs]
        if len(labels) != len(args.logs):
            raise UsageError(f'{len(args.labels)} labels for {len(args.logs)} logs')
        plot(args.logs, labels, args.output)
        print(f'Wrote {args.output}', file=sys.stderr)
    exit_on_usage_error('logger.plot', run)


if __name__ == '__main__':
    main()
