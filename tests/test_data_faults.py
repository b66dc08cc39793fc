"""Bad input and faults on the data side: one line, a non-zero exit, nothing half-written.

One table per entry point (convert.py, prepare_dataset.sh, download_dataset.sh, synthetic.py,
logger.plot). Every case runs the program as a user would, in a subprocess, and checks that it
ends in one line on stderr without a traceback, and that every file that was there before is
byte-identical afterwards, with nothing added. Then the faults: a full disk, Ctrl-C and SIGTERM,
kill -9 at random points, and the temporary files of dead writers.
"""
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import socket

import pytest
import torch

import convert
import dataloading
import synthetic
import utils
from conftest import ROOT, assert_one_line_error, snapshot
from logger import Logger, plot

PYTHON = sys.executable


def command(script, *args):
    if script.endswith('.py'):
        return [PYTHON, os.path.join(ROOT, script), *args]
    if script == 'logger.plot':
        return [PYTHON, '-m', 'logger.plot', *args]
    return [os.path.join(ROOT, script), *args]


def run(argv, prefix=(), cwd=None, timeout=120):
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or ROOT, env={**os.environ, 'PYTHON': PYTHON})


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    """Two small ratings files (A and B: other users, items and rows) and a cache of A."""
    directory = tmp_path_factory.mktemp('small')
    paths = {}
    for name, (users, items, rows, seed) in {'a': (300, 200, 9000, 1),
                                             'b': (320, 210, 9600, 2)}.items():
        paths[name] = str(directory / f'{name}.csv')
        synthetic.write_csv(paths[name], synthetic.generate(users=users, items=items, rows=rows,
                                                            groups=4, seed=seed))
    paths['cache'] = str(directory / 'cache')
    convert.main(['--path', paths['a'], '--output', paths['cache'], '--valid_negative', '50'])
    return paths


@pytest.fixture
def old_cache(small, tmp_path):
    """A copy of the cache of A at tmp_path/cache: the previous cache a run must not harm."""
    shutil.copytree(small['cache'], tmp_path / 'cache')
    return str(tmp_path / 'cache')


@contextlib.contextmanager
def read_only(directory):
    """Make `directory` read-only for the programs run with the prefix this yields. As root
    (whom permissions do not stop) through a read-only bind mount in a private mount namespace;
    skipped where neither works."""
    if os.geteuid() != 0:
        mode = os.stat(directory).st_mode
        os.chmod(directory, 0o555)
        try:
            yield ()
        finally:
            os.chmod(directory, mode)
        return
    if not private_mounts():
        pytest.skip('root, and no private mount namespace (unshare -m) for a read-only mount')
    yield ('unshare', '-m', 'sh', '-c', 'mount --bind "$0" "$0" && mount -o remount,bind,ro '
           '"$0" && exec "$@"', str(directory))


_PRIVATE_MOUNTS = []


def private_mounts():
    """Whether `unshare -m` can mount here (root in a container that allows it)."""
    if not _PRIVATE_MOUNTS:
        import tempfile
        directory = tempfile.mkdtemp()
        try:
            works = subprocess.run(['unshare', '-m', 'sh', '-c', 'mount -t tmpfs -o size=64k '
                                    'tmpfs "$0"', directory], capture_output=True,
                                   timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            works = False
        finally:
            os.rmdir(directory)
        _PRIVATE_MOUNTS.append(works)
    return _PRIVATE_MOUNTS[0]


def catches_sigterm(pid):
    """Whether process `pid` has a SIGTERM handler installed (Linux: /proc/PID/status)."""
    try:
        with open(f'/proc/{pid}/status') as file:
            for line in file:
                if line.startswith('SigCgt:'):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


def wait_for_handlers(process, deadline=60):
    """Wait until `process` (a run_main program) has its signal handlers in place."""
    if not os.path.isdir(f'/proc/{process.pid}'):
        pytest.skip('needs /proc to tell when the handlers are in place')
    start = time.monotonic()
    while not catches_sigterm(process.pid):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() - start < deadline
        time.sleep(0.005)


def check_case(completed, before, after, fragment):
    assert_one_line_error(completed, fragment)
    assert completed.returncode == 1 or completed.returncode == 2, completed.stderr
    assert after == before, sorted(set(after) ^ set(before)) or 'a file changed'


# ------------------------------------------------------------------------------------------------
# convert.py

HEADER = 'user_id,item_id,timestamp\n'
CONVERT_CASES = {
    # name: (ratings file contents or None for none, extra arguments, fragment of the line)
    'missing file': (None, [], 'does not exist'),
    'zero-byte file': ('', [], 'is empty'),
    'empty first line': ('\n\n1,2,3\n', [], 'empty first line'),
    'binary garbage': (bytes(range(256)) * 8, [], 'cannot tell the format'),
    'header only': (HEADER, [], 'holds no interactions'),
    'malformed row': (HEADER + '1,2,3\n1,2\n', [], 'cannot read'),
    'truncated last line': ('userId,movieId,rating,timestamp\n1,2,4.0,5\n1,3,4.0,6\n1,4', [],
                            'cannot read'),
    'missing column behind a BOM': ('\ufeffuserId,rating,timestamp\n1,2,3\n',
                                    ['--format', 'ml-20m'], 'lacks the column(s) movieId'),
    'non-numeric timestamp': (HEADER + '1,2,3\n1,3,soon\n', [], 'non-numeric timestamp'),
    '--valid_negative beyond the catalogue': ('A', ['--valid_negative', '201'],
                                              '--valid_negative 201 is more than the 200 items'),
    '--valid_negative 0': ('A', ['--valid_negative', '0'], 'at least 1'),
    '--min_ratings 1': ('A', ['--min_ratings', '1'], 'at least 2'),
    '--seed out of range': ('A', ['--seed', str(2 ** 64)], 'out of range'),
    'a directory as --path': ('DIR', [], 'is a directory'),
    'output is a file': ('A', ['--output', 'FILE'], 'is not a directory'),
    'output under a file': ('A', ['--output', 'FILE/cache'], 'is not a directory'),
}


@pytest.mark.parametrize('case', list(CONVERT_CASES))
def test_convert_bad_input(case, small, old_cache, tmp_path):
    contents, extra, fragment = CONVERT_CASES[case]
    path = str(tmp_path / 'ratings.csv')
    if contents == 'A':
        shutil.copy(small['a'], path)
    elif contents == 'DIR':
        os.mkdir(path)
    elif isinstance(contents, bytes):
        (tmp_path / 'ratings.csv').write_bytes(contents)
    elif contents is not None:
        (tmp_path / 'ratings.csv').write_text(contents, encoding='utf-8')
    (tmp_path / 'FILE').write_text('not a directory')
    extra = [str(tmp_path / a) if a.startswith('FILE') else a for a in extra]
    output = [] if '--output' in extra else ['--output', old_cache]
    before = snapshot(tmp_path)
    completed = run(command('convert.py', '--path', path, *output, *extra))
    check_case(completed, before, snapshot(tmp_path), fragment)


def test_convert_read_only_output(small, old_cache, tmp_path):
    before = snapshot(tmp_path)
    with read_only(old_cache) as prefix:
        completed = run(command('convert.py', '--path', small['b'], '--output', old_cache),
                        prefix)
    check_case(completed, before, snapshot(tmp_path), 'is read-only')
    with read_only(tmp_path) as prefix:
        completed = run(command('convert.py', '--path', small['b'], '--output',
                                str(tmp_path / 'new' / 'cache')), prefix)
    check_case(completed, before, snapshot(tmp_path), 'cannot be created')


# A full disk: a real one where a private mount namespace allows a tiny tmpfs (as root in a
# container), else the same failure injected into every write convert.py makes (open() hands out
# files whose write() raises ENOSPC once the space left is used up).
FULL_DISK_DRIVER = '''
import json, os, shutil, subprocess, sys
mount, old, source, python, script = sys.argv[1:]
cache = os.path.join(mount, 'cache')
shutil.copytree(old, cache)
def snapshot():
    return {n: open(os.path.join(cache, n), 'rb').read() for n in sorted(os.listdir(cache))}
before = snapshot()
space = os.statvfs(mount)
with open(os.path.join(mount, 'filler'), 'wb') as filler:  # leave 64 KiB free
    filler.write(b'x' * (space.f_bavail * space.f_frsize - 65536))
completed = subprocess.run([python, script, '--path', source, '--output', cache,
                            '--valid_negative', '50'], capture_output=True, text=True)
print(json.dumps({'returncode': completed.returncode, 'stderr': completed.stderr,
                  'unchanged': snapshot() == before, 'files': sorted(os.listdir(cache))}))
'''
INJECTED_FULL_DISK = '''
import builtins, errno, os, runpy, sys
space = [65536]
real_open = builtins.open
class Filling:
    def __init__(self, file):
        self._file = file
    def write(self, data):
        size = memoryview(data).nbytes
        if size > space[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        space[0] -= size
        return self._file.write(data)
    def __getattr__(self, name):
        return getattr(self._file, name)
    def __enter__(self):
        return self
    def __exit__(self, *exception):
        return self._file.__exit__(*exception)
def filling_open(file, mode='r', *args, **kwargs):
    opened = real_open(file, mode, *args, **kwargs)
    return Filling(opened) if any(m in mode for m in 'wax+') else opened
builtins.open = filling_open
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def test_convert_full_disk_keeps_the_previous_cache(small, old_cache, tmp_path):
    if private_mounts():
        mount = tmp_path / 'tmpfs'
        mount.mkdir()
        driver = tmp_path / 'driver.py'
        driver.write_text(FULL_DISK_DRIVER)
        completed = run(['unshare', '-m', 'sh', '-c', 'mount -t tmpfs -o size=2m tmpfs "$0" && '
                         'exec "$@"', str(mount), PYTHON, str(driver), str(mount), old_cache,
                         small['b'], PYTHON, os.path.join(ROOT, 'convert.py')])
        assert completed.returncode == 0, completed.stderr
        result = json.loads(completed.stdout)
        assert result['unchanged'] and result['files'] == sorted(os.listdir(old_cache))
        completed = subprocess.CompletedProcess([], result['returncode'], '', result['stderr'])
        cache = os.path.join(str(mount), 'cache')
    else:
        before = snapshot(tmp_path)
        completed = run([PYTHON, '-c', INJECTED_FULL_DISK, os.path.join(ROOT, 'convert.py'),
                         '--path', small['b'], '--output', old_cache, '--valid_negative', '50'])
        assert snapshot(tmp_path) == before
        cache = old_cache
    assert_one_line_error(completed, 'No space left on device',
                          f'the previous cache in {cache} is unchanged')
    assert completed.returncode == 1
    assert completed.stderr.splitlines()[-1].startswith(
        f'convert.py: error: cannot write {cache}/')


# Holds convert.py once its first file is staged, so that a signal lands mid-write.
HOLD_WHILE_STAGING = '''
import runpy, sys, time
sys.path.insert(0, sys.argv[1])
import utils
write = utils.FileSet.write
def held_write(self, path, function):
    write(self, path, function)
    print('[test] staged ' + path, file=sys.stderr, flush=True)
    time.sleep(60)
utils.FileSet.write = held_write
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


@pytest.mark.parametrize('signum, when', [(signal.SIGINT, 'reading'),
                                          (signal.SIGTERM, 'staging')])
def test_convert_interrupted_keeps_the_previous_cache(signum, when, small, old_cache, tmp_path):
    before = snapshot(tmp_path)
    arguments = [os.path.join(ROOT, 'convert.py'), '--path', small['b'], '--output', old_cache,
                 '--valid_negative', '50']
    if when == 'staging':
        arguments = ['-c', HOLD_WHILE_STAGING, ROOT] + arguments
    process = subprocess.Popen([PYTHON, *arguments], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if when == 'staging':
        for line in process.stderr:
            if line.startswith('[test] staged'):
                break
    else:
        wait_for_handlers(process)
    process.send_signal(signum)
    stderr = process.stderr.read()
    assert process.wait(60) == 128 + signum
    assert 'Traceback' not in stderr
    assert stderr.splitlines()[-1] == \
        f'convert.py: interrupted: the previous cache in {old_cache} is unchanged'
    assert snapshot(tmp_path) == before  # no temporary file left either


# kill -9 at random points of conversions writing over a cache, alternately from A and B. The
# driver imports torch once and forks each conversion (nothing in it has used torch's threads),
# so that each run costs its work only; it keeps a copy of the cache after every kill.
KILL_DRIVER = '''
import os, random, shutil, signal, sys, time
sys.path.insert(0, sys.argv[1])
import convert, torch  # noqa: F401 (loaded before forking)
sources, output, copies = sys.argv[2:4], sys.argv[4], sys.argv[5]
runs, seed = int(sys.argv[6]), int(sys.argv[7])
rng = random.Random(seed)
def start(source):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.dup2(write, 2)
        try:
            convert.main(['--path', source, '--output', output, '--valid_negative', '50'])
        finally:
            os._exit(0)
    os.close(write)
    stream = os.fdopen(read)
    for line in stream:  # from the split on, the work is the cache's
        if line.startswith('[convert] split'):
            break
    return pid, stream, time.perf_counter()
pid, stream, began = start(sources[1])  # a whole run, to time the work after the split
os.waitpid(pid, 0)
span = time.perf_counter() - began
stream.read()
for run in range(runs):
    pid, stream, began = start(sources[run % 2])
    delay = rng.uniform(0, 1.2 * span)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    stream.read()
    shutil.copytree(output, os.path.join(copies, str(run)))
    print(f'run {run}: killed after {delay * 1000:.1f} ms of {span * 1000:.1f}')
'''


def test_kill_9_at_random_points_never_leaves_a_mixed_cache(small, old_cache, tmp_path):
    driver = tmp_path / 'driver.py'
    driver.write_text(KILL_DRIVER)
    copies = tmp_path / 'copies'
    copies.mkdir()
    runs = 6
    completed = run([PYTHON, str(driver), ROOT, small['a'], small['b'], old_cache, str(copies),
                     str(runs), str(random.randrange(1 << 30))])
    assert completed.returncode == 0, completed.stderr
    fresh = {}  # source sha256: the cache a whole conversion of it writes
    for name in ('a', 'b'):
        output = tmp_path / f'fresh_{name}'
        convert.main(['--path', small[name], '--output', str(output), '--valid_negative', '50'])
        metadata = json.loads((output / 'metadata.json').read_text())
        fresh[metadata['source_sha256']] = fresh[name] = snapshot(output)
    outcomes = []  # per run: which cache it left
    for run_index in range(runs):
        cache = copies / str(run_index)
        files = {name: data for name, data in snapshot(cache).items() if not name.endswith('.tmp')}
        if 'metadata.json' not in files:
            outcomes.append('untrusted')  # killed during the renames: nothing trusts it
            continue
        metadata = json.loads(files['metadata.json'])
        outcomes.append('new' if files == fresh['ab'[run_index % 2]] else 'old')
        dataset = dataloading.load_dataset(str(cache), torch.device('cpu'))
        assert (dataset.n_users, dataset.n_items) == (metadata['n_users'], metadata['n_items'])
        assert len(dataset.train_users) == metadata['n_train']
        assert files == fresh[metadata['source_sha256']], (run_index, completed.stdout)
    print(completed.stdout, outcomes)
    # The temporary files the killed runs left are removed by the next write of their paths.
    convert.main(['--path', small['a'], '--output', old_cache, '--valid_negative', '50'])
    assert snapshot(old_cache) == fresh['a']


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([PYTHON, '-c', 'import os; print(os.getpid())'], capture_output=True,
                          text=True).stdout.strip()
    target = tmp_path / 'model.pth'
    tag = utils._HOST_TAG
    stale = tmp_path / f'.model.pth.{dead}.{tag}abcd.tmp'
    live = tmp_path / f'.model.pth.{os.getppid()}.{tag}abcd.tmp'  # a live writer's
    other_host = tmp_path / f'.model.pth.{dead}.{"0000" if tag != "0000" else "1111"}abcd.tmp'
    other_file = tmp_path / f'.other.pth.{dead}.{tag}abcd.tmp'
    for path in (stale, live, other_host, other_file):
        path.write_bytes(b'partial')
    utils.atomic_write(str(target), lambda temporary: open(temporary, 'w').write('whole'))
    assert target.read_text() == 'whole'
    assert not stale.exists()
    assert live.exists() and other_host.exists() and other_file.exists()


# ------------------------------------------------------------------------------------------------
# prepare_dataset.sh

def zip_of(path, member, contents):
    import zipfile
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr(member, contents)


PREPARE_CASES = {
    # name: (arguments, setup of tmp_path, fragment)
    'unknown dataset': (['ml-5m', 'raw'], None, 'unsupported dataset ml-5m'),
    'options for a MovieLens dataset': (['ml-1m', 'raw', 'cache', '--users', '3'], None,
                                        'options after CACHE_DIR'),
    'RAW_DIR is a file': (['ml-100k', 'FILE'], None, 'RAW_DIR'),
    'CACHE_DIR is a file': (['synthetic', 'raw', 'FILE'], None, 'CACHE_DIR'),
    'CACHE_DIR under a file': (['synthetic', 'raw', 'FILE/cache'], None, 'CACHE_DIR'),
    'corrupt zip': (['ml-1m', 'raw'], lambda raw: (raw / 'ml-1m.zip').write_bytes(b'not a zip'),
                    'cannot extract ml-1m/ratings.dat'),
    'zip without the ratings': (['ml-100k', 'raw'],
                                lambda raw: zip_of(raw / 'ml-100k.zip', 'ml-100k/README', 'hi'),
                                'cannot extract ml-100k/u.data'),
    'garbage ratings': (['ml-100k', 'raw'],
                        lambda raw: zip_of(raw / 'ml-100k.zip', 'ml-100k/u.data', 'a;b\n'),
                        'cannot tell the format'),
    'bad synthetic options': (['synthetic', 'raw', 'cache', '--users', '0'], None,
                              'must be positive'),
}


@pytest.mark.parametrize('case', list(PREPARE_CASES))
def test_prepare_bad_input(case, tmp_path):
    arguments, setup, fragment = PREPARE_CASES[case]
    (tmp_path / 'raw').mkdir()
    (tmp_path / 'FILE').write_text('not a directory')
    if setup:
        setup(tmp_path / 'raw')
    if case == 'garbage ratings':  # extracted already: only the conversion fails
        assert run(command('prepare_dataset.sh', *arguments), cwd=tmp_path).returncode == 1
    before = snapshot(tmp_path)
    completed = run(command('prepare_dataset.sh', *arguments), cwd=tmp_path)
    check_case(completed, before, snapshot(tmp_path), fragment)


def test_prepare_read_only_raw_dir(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    zip_of(raw / 'ml-100k.zip', 'ml-100k/u.data', '1\t2\t3\t4\n')
    before = snapshot(tmp_path)
    with read_only(raw) as prefix:
        completed = run(command('prepare_dataset.sh', 'ml-100k', str(raw),
                                str(tmp_path / 'cache')), prefix)
    check_case(completed, before, snapshot(tmp_path), 'read-only')


def test_prepare_help():
    for flag in ('-h', '--help'):
        completed = run(command('prepare_dataset.sh', flag))
        assert completed.returncode == 0 and completed.stderr == ''
        assert completed.stdout.startswith('Prepare a dataset for ncf.py')
        assert './prepare_dataset.sh [DATASET] [RAW_DIR] [CACHE_DIR]' in completed.stdout
    completed = run(command('download_dataset.sh', '--help'))
    assert completed.returncode == 0 and 'DATASET: ml-20m | ml-1m | ml-100k' in completed.stdout


# A Python for prepare_dataset.sh (its PYTHON) that runs scripts and `-c` code as python does,
# but holds convert.py once its first file is staged: a signal then lands mid-conversion,
# however fast the machine converts.
HOLDING_PYTHON = '''
import os, runpy, sys, time
if sys.argv[1].endswith('convert.py'):
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
    import utils
    write = utils.FileSet.write
    def held_write(self, path, function):
        write(self, path, function)
        print('[test] staged ' + path, file=sys.stderr, flush=True)
        time.sleep(60)
    utils.FileSet.write = held_write
if sys.argv[1] == '-c':
    code, sys.argv = sys.argv[2], ['-c'] + sys.argv[3:]
    exec(compile(code, '<string>', 'exec'), {'__name__': '__main__'})
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
'''


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_prepare_interrupted_keeps_the_previous_cache(signum, small, tmp_path):
    """SIGTERM to the script while convert.py writes; Ctrl-C (SIGINT to the whole process
    group, as a terminal sends it) likewise."""
    raw = tmp_path / 'raw'
    (raw / 'synthetic').mkdir(parents=True)
    shutil.copy(small['a'], raw / 'synthetic' / 'ratings.csv')
    (raw / 'synthetic' / 'options').write_text('\n')
    shutil.copytree(small['cache'], raw / 'cache' / 'synthetic')  # a cache of other data
    before = snapshot(raw / 'cache')
    (tmp_path / 'holding.py').write_text(HOLDING_PYTHON)
    python = tmp_path / 'python'
    python.write_text(f'#!/bin/sh\nexec {PYTHON} {tmp_path / "holding.py"} "$@"\n')
    python.chmod(0o755)
    process = subprocess.Popen(command('prepare_dataset.sh', 'synthetic', str(raw)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, 'PYTHON': str(python)})
    for line in process.stderr:
        if line.startswith('[test] staged'):
            break
    if signum == signal.SIGTERM:
        process.send_signal(signum)
    else:
        os.killpg(process.pid, signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    lines = stderr.strip().splitlines()
    assert 'Traceback' not in stderr
    assert lines[-1].endswith(f'interrupted: the previous cache in {raw}/cache/synthetic is '
                              'unchanged'), stderr
    assert sum('interrupted' in line for line in lines) == 1
    assert snapshot(raw / 'cache') == before


# ------------------------------------------------------------------------------------------------
# download_dataset.sh

DOWNLOAD_CASES = {
    'no arguments': ([], 'expected DATASET and RAW_DIR'),
    'unsupported dataset': (['ml-5m', 'dl'], 'unsupported dataset ml-5m'),
    'RAW_DIR is a file': (['ml-100k', 'FILE'], 'not a directory'),
    'RAW_DIR under a file': (['ml-100k', 'FILE/dl'], 'not a directory'),
    'wrong MD5': (['ml-100k', 'dl'], 'MD5'),
    'unreachable': (['ml-1m', 'dl'], 'could not download'),
}


@pytest.mark.parametrize('case', list(DOWNLOAD_CASES))
def test_download_bad_input(case, tmp_path):
    arguments, fragment = DOWNLOAD_CASES[case]
    (tmp_path / 'FILE').write_text('not a directory')
    (tmp_path / 'mirror').mkdir()
    (tmp_path / 'mirror' / 'ml-100k.zip').write_bytes(b'tampered')
    before = snapshot(tmp_path)
    env = {**os.environ, 'NCF_DOWNLOAD_URL': f'file://{tmp_path}/mirror'}
    completed = subprocess.run(command('download_dataset.sh', *arguments), capture_output=True,
                               text=True, cwd=tmp_path, env=env, timeout=60)
    after = snapshot(tmp_path)
    after.pop('dl/', None)  # RAW_DIR is created, and stays empty
    check_case(completed, before, after, fragment)


def test_download_read_only_raw_dir(tmp_path):
    before = snapshot(tmp_path)
    with read_only(tmp_path) as prefix:
        completed = run(command('download_dataset.sh', 'ml-100k', str(tmp_path)), prefix)
    check_case(completed, before, snapshot(tmp_path), 'not writable')


@contextlib.contextmanager
def stalling_server():
    """An HTTP server that accepts and then sends nothing: a download that hangs."""
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(4)
    connections = []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                connections.append(server.accept()[0])
    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f'http://127.0.0.1:{server.getsockname()[1]}'
    finally:
        server.close()
        for connection in connections:
            connection.close()


def test_download_interrupted_and_stale_partials(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    dead = subprocess.run([PYTHON, '-c', 'import os; print(os.getpid())'], capture_output=True,
                          text=True).stdout.strip()
    stale = raw / f'.ml-100k.zip.{dead}.AbC123.part'  # left by a download killed outright
    live = raw / f'.ml-100k.zip.{os.getpid()}.AbC123.part'  # a running download's
    stale.write_bytes(b'partial')
    live.write_bytes(b'partial')
    with stalling_server() as url:
        process = subprocess.Popen(command('download_dataset.sh', 'ml-100k', str(raw)),
                                   stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, 'NCF_DOWNLOAD_URL': url})
        assert process.stderr.readline().startswith('Downloading')
        time.sleep(0.2)
        process.terminate()
        stderr = process.stderr.read()
        assert process.wait(30) == 143
    assert stderr.strip() == f'download_dataset.sh: interrupted: no {raw}/ml-100k.zip was written'
    assert sorted(os.listdir(raw)) == [live.name]


# ------------------------------------------------------------------------------------------------
# synthetic.py

SYNTHETIC_CASES = {
    'impossible shape': (['--users', '10', '--items', '30', '--rows', '5000'],
                         'distinct interactions'),
    'no users': (['--users', '0'], 'must be positive'),
    'output is a directory': (['--output', 'DIR'], 'is a directory'),
    'output under a file': (['--output', 'FILE/r.csv'], 'cannot be written'),
}


@pytest.mark.parametrize('case', list(SYNTHETIC_CASES))
def test_synthetic_bad_input(case, tmp_path):
    arguments, fragment = SYNTHETIC_CASES[case]
    (tmp_path / 'FILE').write_text('not a directory')
    (tmp_path / 'DIR').mkdir()
    (tmp_path / 'r.csv').write_text('previous')
    arguments = [str(tmp_path / a) if a.startswith(('FILE', 'DIR')) else a for a in arguments]
    if '--output' not in arguments:
        arguments += ['--output', str(tmp_path / 'r.csv')]
    before = snapshot(tmp_path)
    completed = run(command('synthetic.py', *arguments))
    check_case(completed, before, snapshot(tmp_path), fragment)


def test_synthetic_read_only_and_interrupted(tmp_path):
    output = tmp_path / 'r.csv'
    output.write_text('previous')
    before = snapshot(tmp_path)
    with read_only(tmp_path) as prefix:
        completed = run(command('synthetic.py', '--output', str(output)), prefix)
    check_case(completed, before, snapshot(tmp_path), 'read-only')

    process = subprocess.Popen(command('synthetic.py', '--output', str(output), '--rows',
                                       '2000000', '--users', '20000', '--items', '4000'),
                               stderr=subprocess.PIPE, text=True)
    wait_for_handlers(process)
    process.terminate()
    stderr = process.stderr.read()
    assert process.wait(30) == 143, stderr
    assert stderr == f'synthetic.py: interrupted: {output} is unchanged\n'
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# logger.plot

def write_log(path, epochs=3):
    logger = Logger(str(path))
    logger.log('PARAMETER', {'lr': 0.01})
    for epoch in range(1, epochs + 1):
        logger.log((epoch,), {'hr@10': 0.5 + epoch / 100, 'ndcg@10': 0.3, 'train_loss': 0.4,
                              'validation_loss': 0.2, 'train_throughput': 1e5,
                              'eval_throughput': 1e6})
    logger.log((), {'best_accuracy': 0.53})
    logger.close()


PLOT_CASES = {
    'missing log': (['NOWHERE.json'], 'does not exist'),
    'log is a directory': (['DIR'], 'is a directory'),
    'zero-byte log': (['EMPTY'], 'is not a training log'),
    'binary garbage': (['GARBAGE'], 'is not a training log'),
    'output is a directory': (['LOG', '-o', 'DIR'], 'is a directory'),
    'output under a file': (['LOG', '-o', 'FILE/c.png'], 'cannot be written'),
    'output is the log': (['LOG', '-o', 'LOG'], 'is one of the logs'),
    'labels for other logs': (['LOG', '--labels', 'a', 'b'], '2 labels for 1 logs'),
}


@pytest.mark.parametrize('case', list(PLOT_CASES))
def test_plot_bad_input(case, tmp_path):
    arguments, fragment = PLOT_CASES[case]
    write_log(tmp_path / 'log.json')
    (tmp_path / 'DIR').mkdir()
    (tmp_path / 'FILE').write_text('x')
    (tmp_path / 'EMPTY').write_bytes(b'')
    (tmp_path / 'GARBAGE').write_bytes(bytes(range(256)) * 4)
    placeholders = {'LOG': 'log.json', 'DIR': 'DIR', 'FILE': 'FILE', 'EMPTY': 'EMPTY',
                    'GARBAGE': 'GARBAGE', 'NOWHERE.json': 'NOWHERE.json'}
    arguments = [str(tmp_path / placeholders[a.split('/')[0]]) + a[len(a.split('/')[0]):]
                 if a.split('/')[0] in placeholders else a for a in arguments]
    if '-o' not in arguments:
        arguments += ['-o', str(tmp_path / 'curves.png')]
    before = snapshot(tmp_path)
    completed = run(command('logger.plot', *arguments))
    check_case(completed, before, snapshot(tmp_path), fragment)


def test_plot_read_only_output(tmp_path):
    write_log(tmp_path / 'log.json')
    before = snapshot(tmp_path)
    with read_only(tmp_path) as prefix:
        completed = run(command('logger.plot', str(tmp_path / 'log.json'), '-o',
                                str(tmp_path / 'curves.png')), prefix)
    check_case(completed, before, snapshot(tmp_path), 'read-only')


def test_plot_a_torn_log_from_anywhere(tmp_path):
    """A log whose writer was killed mid-line, and another one appended to it, plots what is
    readable, says what it skipped, and runs as a script or a module from another directory."""
    pytest.importorskip('matplotlib')
    log = tmp_path / 'log.json'
    write_log(log, epochs=2)
    text = log.read_text()
    log.write_text(text[:-40])  # killed mid-line
    logger = Logger(str(log), append=True)  # a resumed run appends
    logger.log((3,), {'hr@10': 0.6})
    logger.close()
    with open(log, 'a') as file:
        file.write('DLLL {"type": "LOG", "step": [4], "da\x00ta": \n')  # garbled
        file.write('DLLL 7\nDLLL {"type": "LOG", "step": ["x"], "data": {"hr@10": 1}}\n')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    as_script = run([PYTHON, os.path.join(ROOT, 'logger', 'plot.py'), str(log), '-o',
                     'new/dir/curves.png'], cwd=elsewhere)
    assert as_script.returncode == 0, as_script.stderr
    assert (elsewhere / 'new' / 'dir' / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    warning = [line for line in as_script.stderr.splitlines() if 'warning' in line]
    # line 4: torn, line 5: the resumed run's first record, 6 and 7: garbled
    assert warning == [f'logger.plot: warning: skipped 3 unreadable line(s) of {log} '
                       '(line 4, 6, 7)'], as_script.stderr
    assert plot.epoch_series(str(log))['hr@10'] == ([1, 2, 3], [0.51, 0.52, 0.6])
    as_module = subprocess.run([PYTHON, '-m', 'logger.plot', str(log), '-o', 'c.png'],
                               capture_output=True, text=True, cwd=elsewhere,
                               env={**os.environ, 'PYTHONPATH': ROOT})
    assert as_module.returncode == 0, as_module.stderr
    assert (elsewhere / 'c.png').exists()


def test_plot_says_which_values_it_skipped(tmp_path):
    """A record whose value is not a number (a hand-edited log, say) is left out of the curve,
    with a warning that names it."""
    log = tmp_path / 'log.json'
    write_log(log, epochs=3)
    logger = Logger(str(log), append=True)
    logger.log((2,), {'hr@10': 'high'})
    logger.close()
    warnings = []
    series = plot.epoch_series(str(log), warnings)
    assert series['hr@10'] == ([1, 3], [0.51, 0.53])
    assert warnings == [f'skipped values that are not numbers in {log}: hr@10 of epoch 2']
