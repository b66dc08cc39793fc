"""Time convert.py on a MovieLens-sized ratings file: wall time and peak resident memory.

    python benchmarks/convert_benchmark.py                    # generates the file (ML-20m's shape)
    python benchmarks/convert_benchmark.py --shape ml-32m     # ML-32m's
    python benchmarks/convert_benchmark.py --path ratings.csv  # or times a file you have

The generated file has ML-20m's header and the shape asked for (synthetic.SHAPES: ml-20m, 20M
rows, 138,493 users, 26,744 items; ml-32m, 32M rows, 200,948 users, 87,585 items; no repeated
pair), from synthetic.py. Each run is a fresh `python convert.py` process, as a user runs it,
import time included; its peak RSS is the kernel's accounting of that process alone (wait4).
The last line is JSON.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import synthetic  # noqa: E402
from ncflib.cache import METADATA_FILE  # noqa: E402
from ncflib.runtime import cpu_name  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--path', help='ratings file to convert (default: generate one)')
    parser.add_argument('--shape', choices=sorted(synthetic.SHAPES), default='ml-20m',
                        help='of the generated file')
    parser.add_argument('--repeat', type=int, default=3, help='runs; the median is reported')
    parser.add_argument('--workdir', default=None, help='where to put the generated file and cache')
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix='convert-benchmark-')
    path = args.path
    if path is None:
        path = os.path.join(workdir, f'ratings-{args.shape}.csv')
        if not os.path.exists(path):
            users, items, rows = synthetic.SHAPES[args.shape]
            print(f'Generating an {args.shape}-shaped file at {path} ...', file=sys.stderr)
            subprocess.run([sys.executable, os.path.join(ROOT, 'synthetic.py'), '--output', path,
                            '--layout', 'ml-20m', '--users', str(users), '--items', str(items),
                            '--rows', str(rows)], check=True)

    walls, peaks = [], []
    for run in range(args.repeat):
        output = os.path.join(workdir, f'cache{run}')
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, os.path.join(ROOT, 'convert.py'), '--path',
                                  path, '--output', output])
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
        walls.append(time.perf_counter() - start)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            sys.exit(f'convert.py failed (exit status {child.returncode})')
        peaks.append(usage.ru_maxrss / 1e6)  # kB on Linux
        print(f'run {run + 1}: {walls[-1]:.2f} s wall, peak RSS {peaks[-1]:.2f} GB',
              file=sys.stderr)
        with open(os.path.join(output, METADATA_FILE)) as file:
            metadata = json.load(file)

    walls.sort()
    result = {
        'benchmark': 'convert',
        'file': os.path.basename(path),
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


if __name__ == '__main__':
    main()
