"""fused.py's Triton kernels, compiled ahead of time for sm_80 and sm_90 by
benchmarks/kernel_resources.py, at most 128 registers a thread and no spills. A check on the CPU:
it needs Triton (its compiler, ptxas and cuobjdump), not a GPU."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'kernel_resources.py')
MAX_REGISTERS = 128  # a thread at 128 leaves an SM's 64K registers 16 warps of its 64
TARGETS = {'sm_80', 'sm_90'}


@pytest.fixture(scope='module')
def kernels():
    pytest.importorskip('triton')
    # The script compiles Triton's JIT kernels: the interpreter must be off in its process.
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    done = subprocess.run([sys.executable, SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])['kernels']


def test_no_kernel_spills_or_exceeds_128_registers(kernels):
    assert kernels
    for kernel in kernels:
        assert kernel['target'] in TARGETS, kernel
        assert kernel['spill_bytes'] == 0 and kernel['stack_bytes'] == 0, kernel
        assert 0 < kernel['registers'] <= MAX_REGISTERS, kernel


def test_every_kernel_on_both_targets(kernels):
    from ncflib import fused

    names = {kernel.__name__ for kernel in fused._kernels()}
    assert names == {kernel['name'] for kernel in kernels}
    for name in names:
        for specialization in ('aligned', 'unaligned'):
            assert {k['target'] for k in kernels if k['name'] == name
                    and k['specialization'] == specialization} == TARGETS, (name, specialization)
    # Every block size the backward can pick, in every compute dtype.
    block_ps = {k['block']['BLOCK_P'] for k in kernels if k['name'] == 'backward_kernel'}
    assert min(block_ps) == fused.BACKWARD_BLOCK_P_MIN
    assert max(block_ps) == fused.BACKWARD_BLOCK_P_MAX
    assert {k['dtype'] for k in kernels} == {'fp32', 'bf16', 'fp16'}


def test_without_triton_says_so_in_one_line():
    code = ('import runpy, sys; sys.modules["triton"] = None; '
            f'sys.argv = [{SCRIPT!r}]; runpy.run_path({SCRIPT!r}, run_name="__main__")')
    done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert done.stdout == ''
    assert done.stderr.strip().splitlines() == [
        'kernel_resources: triton is not installed (pip install triton): nothing to compile']
