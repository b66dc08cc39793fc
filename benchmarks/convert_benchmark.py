"""Time convert.py on an ML-20m-sized ratings file: wall time and peak resident memory.

    python benchmarks/convert_benchmark.py                   # generates the file (ML-20m's shape)
    python benchmarks/convert_benchmark.py --path ratings.csv  # or times a file you have

The file has ML-20m's header and shape (20M rows, 138,493 users, 26,744 items, no repeated
pair), from synthetic.py. Each run is a fresh `python convert.py` process, as a user runs it,
import time included; its peak RSS comes from the kernel's accounting of the child. The last
line is JSON.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ncflib.cache import METADATA_FILE, ML_20M_ITEMS, ML_20M_USERS  # noqa: E402
from ncflib.runtime import cpu_name  # noqa: E402

ML20M_SHAPE = dict(users=ML_20M_USERS, items=ML_20M_ITEMS, rows=20_000_000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--path', help='ratings file to convert (default: generate one)')
    parser.add_argument('--repeat', type=int, default=3, help='runs; the median is reported')
    parser.add_argument('--workdir', default=None, help='where to put the generated file and cache')
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix='convert-benchmark-')
    path = args.path
    if path is None:
        path = os.path.join(workdir, 'ratings.csv')
        if not os.path.exists(path):
            print(f'Generating an ML-20m-shaped file at {path} ...', file=sys.stderr)
            subprocess.run([sys.executable, os.path.join(ROOT, 'synthetic.py'), '--output', path,
                            '--layout', 'ml-20m', '--users', str(ML20M_SHAPE['users']),
                            '--items', str(ML20M_SHAPE['items']),
                            '--rows', str(ML20M_SHAPE['rows'])], check=True)

    walls, peaks = [], []
    for run in range(args.repeat):
        output = os.path.join(workdir, f'cache{run}')
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, 'convert.py'), '--path', path,
                        '--output', output], check=True)
        walls.append(time.perf_counter() - start)
        # ru_maxrss of children is the largest of any child so far (kB on Linux): the runs are
        # alike, so the largest is this run's unless an earlier one was larger.
        peaks.append(max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1e6)
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
