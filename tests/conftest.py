"""What the tests share: the data they make, the argv builder, and the checks of the one-line
contract (one line on stderr, a non-zero exit, no traceback, nothing changed)."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors). It is read when a
# kernel is defined, so it is set before any test module imports one.
if 'TRITON_INTERPRET' not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ['TRITON_INTERPRET'] = '1'

# Under pytest -n, the workers share the cores: one thread each (and each process a test
# starts), else their threads outnumber the cores and spin waiting for each other.
if os.environ.get('PYTEST_XDIST_WORKER'):
    import torch
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)

# The real MovieLens 100K, kept outside the repository (GroupLens forbids redistribution).
ML100K = os.path.join(ROOT, '..', 'shared', 'data', 'ml-100k', 'u.data')
PYTHON = sys.executable


@pytest.fixture(scope='session', autouse=True)
def machine_caches(tmp_path_factory):
    """What the runs learn about the machine, for the whole session and the processes the tests
    start, under pytest's temporary directory: torch.compile's and Triton's caches (compiled
    once, reused; ones exported by the caller, as benchmarks/gpu_check.sh does, are used
    instead) and the CPU precision measured fastest (runtime.cache_home). Shared by the workers
    of a parallel run (pytest -n): they write them safely at once."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        shared = shared.parent  # the workers' common temporary directory
    for variable, name in (('TORCHINDUCTOR_CACHE_DIR', 'inductor'), ('TRITON_CACHE_DIR', 'triton'),
                           ('XDG_CACHE_HOME', 'cache')):
        if variable not in os.environ or variable == 'XDG_CACHE_HOME':
            os.environ[variable] = str(shared / name)
            os.makedirs(os.environ[variable], exist_ok=True)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own temporary directory: nothing is written into the current
    directory (a default log.json, say)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ml100k():
    if not os.path.isfile(ML100K):
        pytest.skip('../shared/data/ml-100k/u.data is not here')
    return ML100K


# ncf.py's flags -----------------------------------------------------------------------------

# A small model that trains in well under a second an epoch on a CPU.
TINY = dict(factors=8, layers=[32, 16, 8], batch_size=2048, learning_rate=0.01, beta1=0.9,
            beta2=0.999, valid_negative=50, device='cpu')
# 60 users, 50 items (small_data): few table rows, for Triton's interpreter. fp32 and no dropout:
# the implementations draw dropout masks differently.
SMALL = dict(factors=8, layers=[16, 8], batch_size=1024, learning_rate=0.01, beta1=0.9,
             beta2=0.999, valid_negative=20, dropout=0, precision='fp32', epochs=3)


# A run a test stops itself (a signal, kill -9) must not end first: --threshold 2 is never
# reached (HR is at most 1), and a run whose stdout nobody reads blocks once the pipe is full.


def flags(data=None, base=TINY, **overrides):
    """ncf.py's argv: `base` (TINY's sizes) with `overrides`, by flag name (--flag value; True:
    the flag alone; False or None: left out; a list: its values)."""
    settings = {'data': data, **base, **overrides}
    argv = []
    for name, value in settings.items():
        if value is None or value is False:
            continue
        argv.append(f'--{name}')
        if isinstance(value, (list, tuple)):
            argv += [str(item) for item in value]
        elif value is not True:
            argv.append(str(value))
    return argv


# The one-line contract ----------------------------------------------------------------------


def run_script(*args, env=None, cwd=None, timeout=300):
    """Run a script of the recipe (a .py with this Python, or a .sh) as a user would."""
    command = [PYTHON, *args] if args[0].endswith('.py') else list(args)
    command[1 if args[0].endswith('.py') else 0] = os.path.join(ROOT, args[0])
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def assert_one_line_error(completed_or_stderr, *fragments):
    """A bad input ends in one line on stderr naming the problem, and no traceback."""
    stderr = getattr(completed_or_stderr, 'stderr', completed_or_stderr)
    if hasattr(completed_or_stderr, 'returncode'):
        assert completed_or_stderr.returncode != 0
    lines = [line for line in stderr.splitlines() if 'error' in line.lower()]
    assert 'Traceback' not in stderr, stderr
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


def fails(main, argv, capsys, *fragments, code=1):
    """`main(argv)` (an entry point's, in this process) ends in exit status `code` and one line
    on stderr holding `fragments`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    assert_one_line_error(capsys.readouterr().err, *fragments)


def snapshot(directory):
    """{relative path: bytes} of every file under `directory`, and None for each directory: to
    show that nothing was written or changed. Lock files (ncflib.files.LOCK_FILE: which run holds
    a directory) are the runs' own, not the user's."""
    from ncflib.files import LOCK_FILE

    files = {}
    for root, directories, names in os.walk(directory):
        for name in directories:
            files[os.path.relpath(os.path.join(root, name), directory) + '/'] = None
        for name in names:
            if name == LOCK_FILE:
                continue
            path = os.path.join(root, name)
            with open(path, 'rb') as file:
                files[os.path.relpath(path, directory)] = file.read()
    return files


# Processes -----------------------------------------------------------------------------------


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


# Data ----------------------------------------------------------------------------------------

# Subprocesses of the tests run one thread each: two at once on two cores stay fast.
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def make_world(base, tiny_data, trained):
    """A copy of the tiny cache (data/) and of a trained run's checkpoint directory (ck/)."""
    import shutil

    world = str(base)
    shutil.copytree(tiny_data, os.path.join(world, 'data'))
    shutil.copytree(trained, os.path.join(world, 'ck'))
    return world



def make_cache(directory, users, items, rows, groups, seed, valid_negative, *convert_flags):
    """Synthetic ratings in `directory`/ratings.csv, converted to `directory`/cache (with
    convert.py's `convert_flags` after the others)."""
    import convert
    import synthetic

    ratings = directory / 'ratings.csv'
    synthetic.write_csv(str(ratings), synthetic.generate(users=users, items=items, rows=rows,
                                                         groups=groups, seed=seed))
    convert.main(['--path', str(ratings), '--output', str(directory / 'cache'),
                  '--valid_negative', str(valid_negative), *convert_flags])
    return str(directory / 'cache')


def replace_tensor(cache, name, tensor):
    """Replace one tensor of a cache as convert.py would have written it (other data, not a
    tampered cache): the file (never written through a link), its shape and sha256, the counts
    and the fingerprint in metadata.json. A value that is not a tensor replaces the file only."""
    import torch

    from ncflib.cache import (TEST_NEGATIVES_FILE, TRAIN_FILE, fingerprint, split_sha256,
                              tensor_sha256)

    path = os.path.join(cache, name)
    if os.path.lexists(path):
        os.remove(path)
    torch.save(tensor, path)
    if not isinstance(tensor, torch.Tensor):
        return
    metadata_path = os.path.join(cache, 'metadata.json')
    with open(metadata_path) as file:
        metadata = json.load(file)
    metadata['tensors'][name] = {'shape': list(tensor.shape), 'sha256': tensor_sha256(tensor)}
    count = {TRAIN_FILE: 'n_train', TEST_NEGATIVES_FILE: 'valid_negative'}.get(name)
    if count:
        metadata[count] = tensor.shape[0] if count == 'n_train' else tensor.shape[-1]
    metadata['fingerprint'] = fingerprint(metadata['source_sha256'], metadata['id_maps_sha256'],
                                          split_sha256(metadata['tensors']))
    os.remove(metadata_path)
    with open(metadata_path, 'w') as file:
        json.dump(metadata, file)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A synthetic cache: 300 users, 200 items, 12,000 interactions, 50 test negatives."""
    return make_cache(tmp_path_factory.mktemp('tiny'), 300, 200, 12000, 4, 3, 50)


@pytest.fixture(scope='session')
def small_data(tmp_path_factory):
    """60 users, 50 items, 1,400 interactions, 20 test negatives: for SMALL's runs."""
    return make_cache(tmp_path_factory.mktemp('small'), 60, 50, 1400, 3, 4, 20)


@pytest.fixture(scope='session')
def trained(tiny_data, tmp_path_factory):
    """A checkpoint directory after two epochs on the tiny data (fp32)."""
    import ncf

    directory = tmp_path_factory.mktemp('trained')
    ncf.main(flags(tiny_data, epochs=2, checkpoint_dir=directory, precision='fp32'))
    return str(directory)


# Each model of the family on the tiny data: its own learning rate (GMF's and MLP's tables
# and layers learn slower than NeuMF's from the reference's initialisation), no dropout (MLP
# alone learns slowly with it at this size), fp32 (the same figures on every CPU).
FAMILY = {'neumf': {'learning_rate': 0.01}, 'gmf': {'learning_rate': 0.03},
          'mlp': {'learning_rate': 0.02, 'dropout': 0}, 'mf': {'learning_rate': 0.01}}


@pytest.fixture(scope='session')
def family(tiny_data, tmp_path_factory):
    """{model: (checkpoint directory, ncf.main's result)} after 8 epochs of each model of the
    family on the tiny data."""
    import ncf

    trained = {}
    for model, settings in FAMILY.items():
        directory = tmp_path_factory.mktemp(model)
        trained[model] = str(directory), ncf.main(flags(
            tiny_data, **{**settings, 'model': model, 'epochs': 8, 'precision': 'fp32',
                          'checkpoint_dir': directory}))
    return trained


def load_trained_model(tiny_data, trained):
    """(plan, dataset, model): the trained fixture's model.pth in the eager model, fp32, in
    eval mode, and the tiny data on the CPU."""
    import torch

    import dataloading
    from ncflib import checkpoints, runtime
    from ncflib.models import ModelShape

    dataset = dataloading.load_dataset(tiny_data, torch.device('cpu'))
    plan = runtime.resolve(runtime.PlanOptions(device='cpu', precision='fp32', impl='eager'))
    model = plan.build_model(ModelShape('neumf', 8, [32, 16, 8], 0.5), dataset.n_users,
                             dataset.n_items)
    path = os.path.join(trained, 'model.pth')
    checkpoints.load_model_state(model, checkpoints.read(path), path)
    return plan, dataset, model.eval()


def pytest_configure(config):
    # torch's own, raised from inside it when Triton's interpreter loads (not ours to fix)
    config.addinivalue_line('filterwarnings',
                            'ignore:`torch.jit.script_method` is deprecated:DeprecationWarning')
    config.addinivalue_line('markers', 'cuda: needs CUDA (skipped without)')
    config.addinivalue_line('markers', "gpu: runs on the GPU where there is one (the Triton "
                                       "kernels run in Triton's interpreter on a CPU)")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs CUDA')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


# A python that runs a script as python does, but holds convert.py for a minute once it has staged
# its first file (printing "[test] staged PATH"): a signal sent then arrives mid-write, on any
# machine's speed.
HOLDING_PYTHON = '''
import os, runpy, sys, time
if sys.argv[1].endswith('convert.py'):
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
    from ncflib import files
    write = files.FileSet.write
    def held_write(self, path, function):
        write(self, path, function)
        print('[test] staged ' + path, file=sys.stderr, flush=True)
        time.sleep(60)
    files.FileSet.write = held_write
if sys.argv[1] == '-c':
    code, sys.argv = sys.argv[2], ['-c'] + sys.argv[3:]
    exec(compile(code, '<string>', 'exec'), {'__name__': '__main__'})
else:
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as python does
    runpy.run_path(sys.argv[0], run_name='__main__')
'''
