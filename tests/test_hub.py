"""torch.hub: hubconf.py's neumf() builds the reference's model or loads a checkpoint, and does so
beside a caller's own modules named like ours (torch.hub puts the repository on sys.path, where
a top-level `utils` or `runtime` of the caller's would stand in for ours)."""
import json
import os
import subprocess
import sys

import torch

from conftest import ROOT

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
