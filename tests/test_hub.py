"""torch.hub: hubconf.py's neumf() builds the reference's model or loads a checkpoint, and does so
beside a caller's own modules named like ours (torch.hub puts the repository on sys.path, where
a top-level `utils` or `runtime` of the caller's would stand in for ours)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from ncflib.cli import UsageError

# The caller's own modules, named like ours and like the reference's: each a module of theirs,
# loaded before ours, that knows nothing of ncf.
FOREIGN = ('utils', 'runtime', 'checkpoints', 'training', 'evaluation', 'neumf', 'models',
           'dataloading', 'logger', 'cli', 'files', 'cache', 'fused', 'cpu_fused', 'recommend')
CALLER = '''
import json, sys, types
for name in sys.argv[3].split(','):
    sys.modules[name] = types.ModuleType(name)  # the caller's, imported before ours
import torch
model = torch.hub.load(sys.argv[1], 'neumf', source='local', checkpoint=sys.argv[2])
print(json.dumps({'class': type(model).__name__,
                  'shape': list(model.mf_user_embed.weight.shape)}))
'''


def test_torch_hub_entry_point(trained):
    checkpoint = os.path.join(trained, 'model.pth')
    model = torch.hub.load(ROOT, 'neumf', source='local', checkpoint=checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    fresh = torch.hub.load(ROOT, 'neumf', source='local', nb_users=7, nb_items=5, mf_dim=4,
                           mlp_layer_sizes=(8, 4))
    assert fresh.mf_user_embed.weight.shape == (7, 4)


def test_torch_hub_beside_the_callers_modules_of_our_names(trained, tmp_path):
    done = subprocess.run([sys.executable, '-c', CALLER, ROOT, os.path.join(trained, 'model.pth'),
                           ','.join(FOREIGN)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        'class': 'CpuFusedNeuMF', 'shape': [300, 8]}


def hub_model(**asked):
    """A small NeuMF from torch.hub, with `asked` (a device, sizes) over its defaults."""
    return torch.hub.load(ROOT, 'neumf', source='local', **{
        'nb_users': 7, 'nb_items': 5, 'mf_dim': 4, 'mlp_layer_sizes': (8, 4), **asked})


@pytest.mark.parametrize('asked, fragment', [
    ({'device': 'cuda:0'}, 'device cuda:0 asked for, but CUDA is not available'),
    ({'device': torch.device('cuda', 1)}, 'device cuda:1 asked for, but CUDA is not available'),
    ({'device': 'cuda'}, 'device cuda asked for, but CUDA is not available'),
    ({'device': 'mps'}, "device 'mps': ncf runs on cpu, cuda or cuda:N"),
    ({'device': 'meta'}, "device 'meta': ncf runs on cpu, cuda or cuda:N"),
    ({'device': 'cpux'}, "device 'cpux': ncf runs on cpu, cuda or cuda:N"),
    ({'nb_users': -5}, 'the number of users must be positive, not -5'),
    ({'nb_items': 0}, 'the number of items must be positive, not 0'),
    ({'mf_dim': 0}, '--factors must be positive, not 0'),
    ({'mlp_layer_sizes': (9, 4)}, 'the first size (9) must be even'),
    ({'dropout': 1.0}, '--dropout must be in [0, 1), not 1.0'),
])
def test_torch_hub_refuses_a_device_or_sizes_in_one_line(asked, fragment, monkeypatch):
    """Never a model on another device than asked for, nor torch's error deep inside."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(UsageError) as error:
        hub_model(**asked)
    assert fragment in str(error.value) and '\n' not in str(error.value)


def test_torch_hub_on_the_cpu_asked_for_in_any_spelling():
    for device in ('cpu', 'cpu:0', torch.device('cpu')):
        model = hub_model(device=device)
        assert {parameter.device for parameter in model.parameters()} == {torch.device('cpu')}


@pytest.mark.cuda
def test_torch_hub_on_the_gpu_asked_for():
    last = torch.cuda.device_count() - 1
    for device in (f'cuda:{last}', torch.device('cuda', last), 'cuda'):
        expected = torch.device('cuda', 0 if device == 'cuda' else last)
        model = hub_model(device=device)
        assert {parameter.device for parameter in model.parameters()} == {expected}
    with pytest.raises(UsageError, match=f'this machine has {last + 1} GPU'):
        hub_model(device=f'cuda:{last + 1}')


def test_a_size_given_beside_a_checkpoint_must_be_its_own(trained):
    """The checkpoint decides the model: a size given too is checked, never silently
    ignored."""
    checkpoint = os.path.join(trained, 'model.pth')
    same = torch.hub.load(ROOT, 'neumf', source='local', checkpoint=checkpoint, nb_users=300,
                          mf_dim=8)
    assert same.mf_user_embed.weight.shape == (300, 8)
    for asked, fragment in [({'nb_users': 7}, 'nb_users 7, but'),
                            ({'mf_dim': 16}, 'mf_dim 16, but'),
                            ({'mlp_layer_sizes': (64, 32)}, 'mlp_layer_sizes 64 32, but')]:
        with pytest.raises(UsageError, match=fragment):
            torch.hub.load(ROOT, 'neumf', source='local', checkpoint=checkpoint, **asked)
