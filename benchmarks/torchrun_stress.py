"""How often the two-process torchrun launch of ncf.py fails, alone or beside CPU hogs.

    python benchmarks/torchrun_stress.py --runs 100 --hogs 2

Makes the tests' tiny data (synthetic.py, then convert.py) in a temporary directory (or
--workdir), then launches ncf.py as tests/test_distributed.py does (torchrun --standalone, two
processes, gloo on the loopback device, one thread each, a checkpoint directory) --runs times,
one after another, while --hogs busy-looping processes compete for the CPUs. Each failed launch
is said on stderr with its exit status and the telling lines of its stderr (`terminate called
without an active exception`) and each failed rank's exit code; its directory is kept under
--workdir, with that stderr and a core dump where `ulimit -c` allows one. Writes only under the
working directory (torchrun's own logs too). The last line is JSON: runs, failures, and the
failures by kind.
"""
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ncflib import cli  # noqa: E402

PROGRAM = 'torchrun_stress.py'
# A worker's own lines that tell how it ended (not torchrun's log lines and traceback).
WORKER_LINE = re.compile(r'terminate called|Fatal Python error|Segmentation fault|ncf\.py: ')
# torchrun's summary of each failed worker: its rank, its exit code and the signal's name.
RANK_EXIT = re.compile(r'rank\s+: (\d+) \(local_rank: \d+\)\n\s*exitcode\s+: (-?\d+) '
                       r'\(pid: \d+\)\s*(\(SIG\w+\))?')
# The flags of tests/test_distributed.py's two-process run (conftest's TINY sizes).
NCF_FLAGS = ['--dropout', '0', '--precision', 'fp32', '--eval_mode', 'full', '--factors', '8',
             '--layers', '32', '16', '8', '--batch_size', '2048', '--learning_rate', '0.01',
             '--valid_negative', '50', '--device', 'cpu']


def make_data(directory):
    """The tests' tiny cache: 300 users, 200 items, 12,000 interactions, 50 test negatives."""
    ratings = os.path.join(directory, 'ratings.csv')
    cache = os.path.join(directory, 'cache')
    for command in (['synthetic.py', '--output', ratings, '--users', '300', '--items', '200',
                     '--rows', '12000', '--groups', '4', '--seed', '3'],
                    ['convert.py', '--path', ratings, '--output', cache, '--valid_negative',
                     '50']):
        with cli.child_process([sys.executable, os.path.join(ROOT, command[0]), *command[1:]],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True) as child:
            stderr = child.communicate()[1]
        if child.returncode:
            raise cli.UsageError(f'{command[0]} failed: {cli.first_line(stderr or "?")}')
    return cache


def launch_env(directory):
    """The tests' launch environment (one thread a process, gloo on the loopback device), with
    everything a run writes outside its checkpoint directory under `directory`."""
    loopback = {'GLOO_SOCKET_IFNAME': 'lo'} if os.path.exists('/sys/class/net/lo') else {}
    temporary = os.path.join(directory, 'tmp')  # torchrun's log directories go there
    os.makedirs(temporary, exist_ok=True)
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT, **loopback,
            'TMPDIR': temporary, 'XDG_CACHE_HOME': os.path.join(directory, 'cache-home'),
            'TORCHINDUCTOR_CACHE_DIR': os.path.join(directory, 'inductor')}


def launch(data, directory, epochs, env, timeout):
    """One torchrun launch of ncf.py in `directory` (its checkpoints, a core dump): (exit
    status, stderr); None for a launch that ran past `timeout` seconds (then stopped)."""
    with cli.child_process(
            [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
             os.path.join(ROOT, 'ncf.py'), '--data', data, '--epochs', str(epochs),
             '--checkpoint_dir', os.path.join(directory, 'ck'), *NCF_FLAGS],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            cwd=directory, start_new_session=True) as process:  # a group: workers stop with it
        try:
            stderr = process.communicate(timeout=timeout)[1]
            return process.returncode, stderr
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            return None, process.communicate()[1]


def signature(status, stderr, directory):
    """How a failed launch ended, the same for failures of one kind: its workers' telling lines
    (`directory` spelt RUN) and each failed rank's exit code."""
    said = [line.strip().replace(directory, 'RUN') for line in stderr.splitlines()
            if WORKER_LINE.search(line)]
    said += [f'rank {rank}: exit code {code} {name}'.strip()
             for rank, code, name in sorted(RANK_EXIT.findall(stderr))]
    return ' | '.join(dict.fromkeys(said)) or (
        'timed out' if status is None else f'exit status {status}')


def main(argv=None):
    parser = cli.ArgumentParser(prog=PROGRAM, description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=50, help='launches, one after another')
    parser.add_argument('--hogs', type=int, default=2,
                        help='busy-looping processes beside the launches')
    parser.add_argument('--epochs', type=int, default=2, help="ncf.py's --epochs")
    parser.add_argument('--timeout', type=float, default=300, help='seconds a launch may take')
    parser.add_argument('--workdir', default=None,
                        help='where the data and the runs go, failed ones kept; None: a '
                             'temporary directory, removed at the end')
    args = parser.parse_args(argv)
    cli.run_main(PROGRAM, stress, args)


def stress(args):
    if args.runs < 1 or args.hogs < 0 or args.timeout <= 0:
        raise cli.UsageError('--runs and --timeout must be positive, --hogs not negative')
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='torchrun_stress.'))
    os.makedirs(workdir, exist_ok=True)
    failures, hogs, start = collections.Counter(), [], time.monotonic()
    try:
        data = make_data(workdir)
        env = launch_env(workdir)
        # busy loops that end with this script, however it ends
        busy_loop = f'import os\nwhile os.getppid() == {os.getpid()}: pass'
        hogs = [subprocess.Popen([sys.executable, '-c', busy_loop]) for _ in range(args.hogs)]
        for run in range(args.runs):
            directory = tempfile.mkdtemp(prefix=f'run{run}.', dir=workdir)
            status, stderr = launch(data, directory, args.epochs, env, args.timeout)
            if status == 0:
                shutil.rmtree(directory)
            else:
                with open(os.path.join(directory, 'stderr.txt'), 'w') as file:
                    file.write(stderr)
                said = signature(status, stderr, directory)
                failures[said] += 1
                print(f'run {run}: exit status {status}: {said} ({directory})', file=sys.stderr,
                      flush=True)
            if (run + 1) % 10 == 0:
                print(f'{run + 1} runs, {sum(failures.values())} failed', file=sys.stderr,
                      flush=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({'benchmark': 'torchrun_stress', 'runs': args.runs, 'hogs': args.hogs,
                      'failures': sum(failures.values()),
                      'seconds': round(time.monotonic() - start, 1),
                      'by_kind': dict(failures)}))


if __name__ == '__main__':
    cli.handle_signals_late(PROGRAM)
    main()
