"""Training curves from one or several JSON logs, overlaid: HR@K, NDCG@K, losses, throughput.

    python -m logger.plot checkpoints/log.json -o curves.png
    python -m logger.plot run_a/log.json run_b/log.json --labels fp32 bf16 -o compare.png

Also runs as a script from anywhere: python path/to/logger/plot.py LOG -o curves.png
Needs matplotlib (an optional dependency: pip install matplotlib).
"""
import os
import sys

if __package__ in (None, ''):  # run as a script: the repository root, not logger/, comes first
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from logger.logger import read_log  # noqa: E402
from ncflib.cli import (ArgumentParser, UsageError, check_output_file,  # noqa: E402
                        handle_signals_late, run_main)
from ncflib.files import atomic_write  # noqa: E402

PANELS = (  # (title, metrics drawn in it: a prefix matches hr@10, ndcg@5 ...)
    ('Hit rate', ('hr@',)),
    ('NDCG', ('ndcg@',)),
    ('Loss', ('train_loss', 'validation_loss')),
    ('Throughput (samples/s)', ('train_throughput', 'eval_throughput')),
)


def epoch_series(path, warnings=None):
    """{metric: ([epochs], [values])} from a training log; later records of an epoch win (a
    resumed run appends to its log). Unreadable lines (a torn line of a killed writer, say) are
    skipped, and a line saying so is appended to `warnings` when given, a list."""
    if os.path.isdir(path):
        raise UsageError(f'{path} is a directory, not a training log')
    if not os.path.isfile(path):
        raise UsageError(f'{path} does not exist')
    skipped = []
    try:
        records = read_log(path, skipped)
    except OSError as error:
        raise UsageError(f'cannot read {path}: {error.strerror or error}') from None
    if skipped and warnings is not None:
        warnings.append(f'skipped {len(skipped)} unreadable line(s) of {path} (line '
                        f'{", ".join(map(str, skipped[:5]))}{", ..." if len(skipped) > 5 else ""})')
    by_epoch = {}
    for record in records:
        step = record.get('step')
        if (isinstance(step, list) and len(step) == 1 and type(step[0]) is int
                and isinstance(record.get('data'), dict)):
            by_epoch.setdefault(step[0], {}).update(record['data'])
    if not any(key.startswith('hr@') for data in by_epoch.values() for key in data):
        raise UsageError(f'{path} is not a training log: it has no per-epoch HR records')
    series, dropped = {}, {}
    for epoch in sorted(by_epoch):
        for key, value in by_epoch[epoch].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, ([], []))
                series[key][0].append(epoch)
                series[key][1].append(value)
            else:
                dropped.setdefault(key, []).append(epoch)
    if dropped and warnings is not None:
        warnings.append(f'skipped values that are not numbers in {path}: ' + ', '.join(
            f'{key} of epoch {", ".join(map(str, epochs[:5]))}{", ..." if len(epochs) > 5 else ""}'
            for key, epochs in sorted(dropped.items())))
    return series


def plot(logs, labels, output, warnings=None):
    runs = [epoch_series(path, warnings) for path in logs]
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError('logger.plot needs matplotlib: pip install matplotlib') from None
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
    try:
        atomic_write(output, lambda temporary: figure.savefig(temporary, format='png', dpi=110),
                     make_parents=True)
    finally:
        plt.close(figure)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('logs', nargs='+', help='JSON logs written by ncf.py')
    parser.add_argument('-o', '--output', default='curves.png', help='PNG file to write')
    parser.add_argument('--labels', nargs='+', default=None,
                        help='one per log (default: the logs\' directory names)')
    args = parser.parse_args(argv)

    def run():
        # The output first: a bad -o is reported before any work.
        check_output_file(args.output, '-o')
        for path in args.logs:
            if os.path.exists(path) and os.path.exists(args.output) \
                    and os.path.samefile(path, args.output):
                raise UsageError(f'-o {args.output} is one of the logs: it would be overwritten')
        labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(path)))
                                 or path for path in args.logs]
        if len(labels) != len(args.logs):
            raise UsageError(f'{len(args.labels)} labels for {len(args.logs)} logs')
        warnings = []
        plot(args.logs, labels, args.output, warnings)
        for warning in warnings:  # what was plotted is readable: say what was not
            print(f'logger.plot: warning: {warning}', file=sys.stderr)
        print(f'Wrote {args.output}', file=sys.stderr)
    kept = (f'{args.output} is unchanged' if os.path.exists(args.output)
            else f'nothing was written to {args.output}')
    run_main('logger.plot', run, kept=kept)


if __name__ == '__main__':
    handle_signals_late('logger.plot')  # a signal after the work, too, is one line
    main()
