"""Time convert.py on a MovieLens-sized ratings file: wall time and peak resident memory.

    python benchmarks/convert_benchmark.py                    # generates the file (ML-20m's shape)
    python benchmarks/convert_benchmark.py --shape ml-32m     # ML-32m's
    python benchmarks/convert_benchmark.py --path ratings.csv  # or times a file you have
    python benchmarks/convert_benchmark.py --shape ml-32m --own_data   # with one's own filters

The generated file has ML-20m's header and the shape asked for (synthetic.SHAPES: ml-20m, 20M
rows, 138,493 users, 26,744 items; ml-32m, 32M rows, 200,948 users, 87,585 items; no repeated
pair), from synthetic.py. --own_data converts as for one's own data (README, "Your own data"):
ratings of 3.5 and more, 10-core filtering and a per-user 80/10/10 split in time order. Each run
is a fresh `python convert.py` process, as a user runs it, import time included; its peak RSS
is the kernel's accounting of that process alone (wait4).
Each child's output goes to a log in the work directory. Stopped (Ctrl-C, SIGTERM), it stops the
running child with it and ends in one line saying what the work directory holds. The last line
is JSON.
"""
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ncflib import cli  # noqa: E402

PROGRAM = 'convert_benchmark.py'
if __name__ == '__main__':
    cli.handle_signals_early(PROGRAM)

import synthetic  # noqa: E402
# the benchmarks' one way to run a child that stops with them (and to measure it)
from compare_models import run_script  # noqa: E402
from ncflib.cache import METADATA_FILE  # noqa: E402
from ncflib.runtime import cpu_name  # noqa: E402


# One's own data's conversion, as the issue that added it sizes it: a rating threshold, 10-core
# filtering, a per-user 80/10/10 split in time order.
OWN_DATA_FLAGS = ('--rating_threshold', '3.5', '--k_core', '10', '--split', 'ratio', '--ratios',
                  '0.8', '0.1', '0.1', '--ratio_order', 'time')


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROGRAM, description=__doc__.split('\n')[0])
    parser.add_argument('--path', help='ratings file to convert (default: generate one)')
    parser.add_argument('--shape', choices=sorted(synthetic.SHAPES), default='ml-20m',
                        help='of the generated file')
    parser.add_argument('--repeat', type=int, default=3, help='runs; the median is reported')
    parser.add_argument('--own_data', action='store_true',
                        help='convert with ' + ' '.join(OWN_DATA_FLAGS))
    parser.add_argument('--workdir', default=None,
                        help='where to put the generated file, the caches and the logs '
                             '(default: a new temporary directory)')
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f'--repeat must be at least 1, not {args.repeat}')
    return args


def generate(path, shape, workdir):
    users, items, rows = synthetic.SHAPES[shape]
    print(f'Generating an {shape}-shaped file at {path} ...', file=sys.stderr, flush=True)
    run_script('synthetic.py', ['--output', path, '--layout', 'ml-20m', '--users', str(users),
                                '--items', str(items), '--rows', str(rows)],
               os.path.join(workdir, 'generate.txt'), f'generating {path}')


def benchmark(args, timed):
    """Time --repeat conversions; `timed` (a list) collects each one's wall time as it ends."""
    cli.check_writable_directory(args.workdir, '--workdir')
    os.makedirs(args.workdir, exist_ok=True)
    path = args.path
    if path is None:
        path = os.path.join(args.workdir, f'ratings-{args.shape}.csv')
        if not os.path.exists(path):  # synthetic.py writes it whole or not at all
            generate(path, args.shape, args.workdir)
    peaks = []
    for run in range(args.repeat):
        output = os.path.join(args.workdir, f'cache{run}')
        start = time.perf_counter()
        flags = list(OWN_DATA_FLAGS) if args.own_data else []
        usage = run_script('convert.py', ['--path', path, '--output', output, *flags],
                           os.path.join(args.workdir, f'convert{run}.txt'),
                           f'converting {path} (run {run + 1})')
        timed.append(time.perf_counter() - start)
        peaks.append(usage.ru_maxrss / 1e6)  # kB on Linux
        print(f'run {run + 1}: {timed[-1]:.2f} s wall, peak RSS {peaks[-1]:.2f} GB',
              file=sys.stderr)
    with open(os.path.join(output, METADATA_FILE)) as file:
        metadata = json.load(file)

    walls = sorted(timed)
    result = {
        'benchmark': 'convert',
        'file': os.path.basename(path),
        'flags': ' '.join(OWN_DATA_FLAGS) if args.own_data else '',
        'file_bytes': os.path.getsize(path),
        'rows': metadata['source_rows'],
        'n_users': metadata['n_users'],
        'n_items': metadata['n_items'],
        'n_train': metadata['n_train'],
        'wall_s_median': round(walls[len(walls) // 2], 2),
        'wall_s_min': round(walls[0], 2),
        'peak_rss_gb': round(max(peaks), 2),
        'cpu_count': os.cpu_count(),
        'cpu': cpu_name(),
        'python': platform.python_version(),
    }
    print(json.dumps(result))
    return result


def main(argv=None):
    args = parse_args(argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix='convert-benchmark-')
    timed = []

    def kept():
        return (f'{len(timed)} of {args.repeat} conversions timed; what each step wrote, and '
                f'its log, is in {args.workdir}')
    return cli.run_main(PROGRAM, benchmark, args, timed, kept=kept)


if __name__ == '__main__':
    main()
