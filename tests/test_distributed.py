"""Two processes on a CPU (gloo), launched as users do: torchrun trains as one process does
(cpu_fused, and compiled as one graph), evaluates as one process does (sampled and full
ranking), takes the reference's launcher, and stops every process in one line when one fails or
is killed."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import ncf
from conftest import ENV, ROOT, flags


def launch_env():
    """The environment of a launch: one thread a process, and gloo on the loopback device
    (rather than whatever interface the host name resolves to)."""
    loopback = {'GLOO_SOCKET_IFNAME': 'lo'} if os.path.exists('/sys/class/net/lo') else {}
    return {**ENV, 'PYTHONPATH': ROOT, **loopback}


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def torchrun(arguments, script='ncf.py', launcher_flags=()):
    """`script` with `arguments` under a 2-process torchrun, to the end."""
    return subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         *launcher_flags, os.path.join(ROOT, script)] + [str(a) for a in arguments],
        capture_output=True, text=True, env=launch_env(), timeout=300)


def hrs_of(stdout):
    return [float(line.split('HR@10 = ')[1].split(',')[0])
            for line in stdout.splitlines() if line.startswith('Epoch ')]


def test_two_process_torchrun_matches_one_process(tiny_data, tmp_path):
    """Training (the CPU default, cpu_fused) and full-ranking evaluation, users split across
    the processes and sums all-reduced."""
    run = dict(data=tiny_data, epochs=2, dropout=0, precision='fp32', eval_mode='full')
    single = ncf.main(flags(**run))
    completed = torchrun(flags(**run, checkpoint_dir=tmp_path / 'ck'))
    assert completed.returncode == 0, completed.stderr[-3000:]
    hrs = hrs_of(completed.stdout)
    assert len(hrs) == 2  # only rank 0 prints
    assert 'processes: 2' in completed.stdout and 'full evaluation' in completed.stdout
    # Same batches, gradients averaged in another order: the same up to rounding.
    assert hrs == pytest.approx(single['hrs'], abs=2 / 300)
    # The DDP run's checkpoint loads in one process.
    tested = ncf.main(flags(tiny_data, mode='test', eval_mode='full',
                            checkpoint_dir=tmp_path / 'ck', precision='fp32'))
    assert tested['hr'] == pytest.approx(max(hrs), abs=1e-4)


def probe_launch(tmp_path, arguments, env=()):
    """tests/torchrun_probe.py under a 2-process torchrun: the completed launch, and what each
    process's Dynamo counted and how many of gloo's threads outlived ncf.main."""
    completed = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(ROOT, 'tests', 'torchrun_probe.py'), str(tmp_path / 'counts')]
        + [str(a) for a in arguments], capture_output=True, text=True,
        env={**launch_env(), **dict(env)}, timeout=300)
    counts = [json.loads((tmp_path / f'counts.{rank}').read_text()) for rank in range(2)
              if (tmp_path / f'counts.{rank}').exists()]
    return completed, counts


def test_the_compiled_step_is_one_graph_under_torchrun_and_trains_as_eager_does(tiny_data,
                                                                               tmp_path):
    """--impl compile: one process trains as the eager model does; under torchrun DDP wraps the
    compiled step (model and loss), so that Dynamo never traces DDP's own forward: one graph per
    shape and no graph break in each process, which trains as one process does."""
    run = dict(data=tiny_data, epochs=2, dropout=0, precision='fp32', valid_batch_size=150 * 51)
    # One process in two micro-batches computes in the shapes of each of two processes (half a
    # batch, evaluation chunks of 150 users), so that they find its graphs in the cache.
    eager = ncf.main(flags(**run, impl='eager', grads_accumulated=2))
    single = ncf.main(flags(**run, impl='compile', grads_accumulated=2))
    assert single['train_losses'] == pytest.approx(eager['train_losses'], rel=1e-4)
    assert single['hrs'] == pytest.approx(eager['hrs'], abs=1.5 / 300)  # a tie may flip a user
    completed, counts = probe_launch(tmp_path, flags(**run, impl='compile'))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert 'implementation: compile, device: cpu, processes: 2' in completed.stdout
    # per process: the training step (one micro-batch shape) and the evaluation (one chunk shape)
    assert counts == [{'unique_graphs': 2, 'graph_breaks': 0, 'gloo_threads': 0}] * 2
    assert hrs_of(completed.stdout) == pytest.approx(single['hrs'], abs=2 / 300)


def test_a_process_failing_stops_every_process_with_one_line(tiny_data, tmp_path):
    """Not bad input but an error on one process (as running out of memory would be): the
    others do not wait for it in their next collective; rank 0 names it in one line."""
    completed, _ = probe_launch(tmp_path, flags(tiny_data, epochs=1),
                                env={'NCF_PROBE_FAIL_RANK': '1'})
    assert completed.returncode != 0
    assert ('ncf.py: error: process 1 failed: RuntimeError: injected failure while loading\n'
            in completed.stderr), completed.stderr[-3000:]


def test_gloo_threads_end_before_the_interpreter_does(tiny_data, tmp_path):
    """gloo's thread releases an all_reduce's work, which holds tensors of Python's, taking the
    GIL, just after the all_reduce returned, and on a loaded machine later: where that thread
    still runs once the interpreter exits, the GIL kills it mid-destructor and the process aborts
    (SIGABRT, then torchrun stops the other). Here process 1's gloo thread keeps the last work
    until then, deterministically: stopping the process group ends the thread first."""
    completed, counts = probe_launch(tmp_path, flags(tiny_data, epochs=1, precision='fp32'),
                                     env={'NCF_PROBE_LATE_RELEASE': '1'})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert 'terminate called' not in completed.stderr, completed.stderr[-3000:]
    assert [count['gloo_threads'] for count in counts] == [0, 0]


def test_reference_launcher_and_a_one_process_checkpoint_under_two_processes(tiny_data,
                                                                           tmp_path):
    ncf.main(flags(tiny_data, epochs=1, checkpoint_dir=tmp_path))
    test = flags(tiny_data, mode='test', checkpoint_dir=tmp_path, precision='fp32')
    single = ncf.main(test)
    completed = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2',
         f'--master_port={free_port()}', os.path.join(ROOT, 'ncf.py')] + test,
        capture_output=True, text=True, env=launch_env(), timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count('HR@10 = ') == 1
    assert f"HR@10 = {single['hr']:.4f}" in completed.stdout


def worker_pid(agent, rank):
    """The pid of torchrun's worker of `rank` (a child of the agent, with RANK in its
    environment)."""
    for child in open(f'/proc/{agent}/task/{agent}/children').read().split():
        with open(f'/proc/{child}/environ', 'rb') as file:
            if f'RANK={rank}'.encode() in file.read().split(b'\0'):
                return int(child)
    raise AssertionError(f'no worker of rank {rank} under {agent}')


def test_a_worker_killed_outright_leaves_one_line_on_the_other(tiny_data, tmp_path):
    """kill -9 of one torchrun process: the other's collective fails, or torchrun stops it
    first; either way its stderr is one line (each worker's own, from --log-dir)."""
    logs = tmp_path / 'logs'
    launch = subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         '--log-dir', str(logs), '--redirects', '3', os.path.join(ROOT, 'ncf.py')]
        + flags(tiny_data, epochs=1000, threshold=2, checkpoint_dir=tmp_path / 'ck',
                precision='fp32'),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=launch_env())
    try:
        deadline = time.monotonic() + 180
        while True:
            rank0 = list(logs.glob('*/attempt_0/0/stdout.log'))
            if rank0 and 'Epoch 0:' in rank0[0].read_text():
                break
            assert time.monotonic() < deadline and launch.poll() is None
            time.sleep(0.1)
        os.kill(worker_pid(launch.pid, 1), signal.SIGKILL)
        launch.wait(120)
    finally:
        if launch.poll() is None:
            launch.kill()
    stderr = (rank0[0].parent / 'stderr.log').read_text()
    assert 'Traceback' not in stderr and stderr.count('\n') == 1, stderr
    assert stderr.startswith('ncf.py: '), stderr
    assert ('another process of this run failed or was stopped' in stderr
            or 'interrupted' in stderr), stderr
    assert 'kept (--resume continues from it)' in stderr, stderr
