import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors). It is read when a
# kernel is defined, so it is set before any test module imports one.
if 'TRITON_INTERPRET' not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ['TRITON_INTERPRET'] = '1'


@pytest.fixture(scope='session', autouse=True)
def machine_caches(tmp_path_factory):
    """What the runs learn about the machine, for the whole session and the processes the tests
    start, under pytest's temporary directory: torch.compile's and Triton's caches (compiled
    once, reused; ones exported by the caller, as benchmarks/gpu_check.sh does, are used
    instead) and the CPU precision measured fastest (runtime.cache_home)."""
    for variable, name in (('TORCHINDUCTOR_CACHE_DIR', 'inductor'), ('TRITON_CACHE_DIR', 'triton')):
        if variable not in os.environ:
            os.environ[variable] = str(tmp_path_factory.mktemp(name))
    os.environ['XDG_CACHE_HOME'] = str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own temporary directory: nothing is written into the current
    directory (a default log.json, say)."""
    monkeypatch.chdir(tmp_path)

# The real MovieLens 100K, kept outside the repository (GroupLens forbids redistribution).
ML100K = os.path.join(ROOT, '..', 'shared', 'data', 'ml-100k', 'u.data')


@pytest.fixture
def ml100k():
    if not os.path.isfile(ML100K):
        pytest.skip('../shared/data/ml-100k/u.data is not here')
    return ML100K


def run_script(*args, env=None, cwd=None):
    """Run a script of the recipe (a .py with this Python, or a .sh) as a user would."""
    command = [sys.executable, *args] if args[0].endswith('.py') else list(args)
    command[1 if args[0].endswith('.py') else 0] = os.path.join(ROOT, args[0])
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


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


# A small model that trains in well under a second an epoch on a CPU.
TINY = ['-f', '8', '--layers', '32', '16', '8', '-b', '2048', '-l', '0.01', '-b1', '0.9',
        '-b2', '0.999', '--valid_negative', '50', '--device', 'cpu']


def snapshot(directory):
    """{relative path: bytes} of every file under `directory`, and None for each directory: to
    show that nothing was written or changed."""
    files = {}
    for root, directories, names in os.walk(directory):
        for name in directories:
            files[os.path.relpath(os.path.join(root, name), directory) + '/'] = None
        for name in names:
            path = os.path.join(root, name)
            with open(path, 'rb') as file:
                files[os.path.relpath(path, directory)] = file.read()
    return files


def make_cache(directory, users, items, rows, groups, seed, valid_negative):
    """Synthetic ratings in `directory`/ratings.csv, converted to `directory`/cache."""
    import convert
    import synthetic

    ratings = directory / 'ratings.csv'
    synthetic.write_csv(str(ratings), synthetic.generate(users=users, items=items, rows=rows,
                                                         groups=groups, seed=seed))
    convert.main(['--path', str(ratings), '--output', str(directory / 'cache'),
                  '--valid_negative', str(valid_negative)])
    return str(directory / 'cache')


def replace_tensor(cache, name, tensor):
    """Replace one tensor of a cache as convert.py would have written it (other data, not a
    tampered cache): the file (never written through a link), its shape and sha256, the counts
    and the fingerprint in metadata.json. A value that is not a tensor replaces the file only."""
    import json

    import torch

    from cache_layout import TEST_NEGATIVES_FILE, TRAIN_FILE, fingerprint, split_sha256
    from dataloading import tensor_sha256

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


FP32 = TINY + ['--precision', 'fp32']


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A synthetic cache: 300 users, 200 items, 12,000 interactions, 50 test negatives."""
    return make_cache(tmp_path_factory.mktemp('tiny'), 300, 200, 12000, 4, 3, 50)


@pytest.fixture(scope='session')
def trained(tiny_data, tmp_path_factory):
    """A checkpoint directory after two epochs on the tiny data (fp32)."""
    import ncf

    directory = tmp_path_factory.mktemp('trained')
    ncf.main(['--data', tiny_data, '-e', '2', '--checkpoint_dir', str(directory)] + FP32)
    return str(directory)


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
