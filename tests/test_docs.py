"""The README's Quick start is two commands, and CI runs its test command verbatim."""
import os
import re

from conftest import ROOT


def quick_start_commands():
    with open(os.path.join(ROOT, 'README.md')) as file:
        readme = file.read()
    section = readme.split('## Quick start', 1)[1].split('\n## ', 1)[0]
    blocks = re.findall(r'```bash\n(.*?)```', section, flags=re.S)
    return [line for block in blocks for line in block.strip().splitlines()]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    commands = quick_start_commands()
    assert len(commands) == 2
    install_and_train, test = commands
    assert './prepare_dataset.sh synthetic' in install_and_train
    assert 'pytest' in test
    assert 'python ncf.py --data data/cache/synthetic' in install_and_train
    with open(os.path.join(ROOT, '.ci', 'run')) as file:
        ci_lines = file.read().splitlines()
    assert test in ci_lines and install_and_train in ci_lines
