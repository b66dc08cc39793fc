"""ncf.main in one process of a torchrun launch, for the tests (not a test module itself).

    python -m torch.distributed.run ... tests/torchrun_probe.py OUT [ncf.py's flags]

Writes to OUT.RANK, as JSON, what Dynamo counted in this process (graphs compiled, graph breaks)
and how many of gloo's threads still ran once ncf.main had returned.
With NCF_PROBE_FAIL_RANK=R, process R fails loading the data with an error that is not bad input
(as running out of memory would), and raises it only after a second, so that the test sees what
the other processes make of it rather than how fast the launcher stops them.
With NCF_PROBE_LATE_RELEASE=1, gloo's thread on process 1 keeps each of ncf's all_reduces (its
work, which holds tensors of Python's) after the all_reduce has returned, until another starts or
the interpreter exits (at most LATE_RELEASE_S): as a thread descheduled on a loaded machine does,
for as long as it takes to race the interpreter's exit.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

import dataloading  # noqa: E402
import ncf  # noqa: E402
from ncflib import runtime  # noqa: E402

RANK = int(os.environ.get('RANK', 0))
LATE_RELEASE_S = 5.0

if os.environ.get('NCF_PROBE_FAIL_RANK') == str(RANK):
    def failing_load(*args, **kwargs):
        raise RuntimeError('injected failure while loading')
    dataloading.load_dataset = failing_load
    together = runtime.together

    def together_then_wait(*args):
        try:
            return together(*args)
        except RuntimeError:
            time.sleep(1.0)
            raise
    runtime.together = together_then_wait

if os.environ.get('NCF_PROBE_LATE_RELEASE'):
    all_reduce, issued = dist.all_reduce, []

    def hold(number):
        """Keep gloo's thread (this callback runs on it) while all_reduce `number` is the last,
        until the interpreter exits, LATE_RELEASE_S at most."""
        deadline = time.monotonic() + LATE_RELEASE_S
        while len(issued) == number and not sys.is_finalizing() and time.monotonic() < deadline:
            time.sleep(0.01)

    def all_reduce_released_late(tensor, *args, **kwargs):
        issued.append(None)
        number, key = len(issued), f'ncf_probe_late_release_{len(issued)}'
        store = dist.distributed_c10d._get_default_store()
        if RANK != 1:
            store.wait([key])  # process 1's callback is in place before the all_reduce can end
            return all_reduce(tensor, *args, **kwargs)
        future = all_reduce(tensor, *args, async_op=True, **kwargs).get_future()
        future.then(lambda _: hold(number))
        store.set(key, 'held')
        future.wait()  # returns before the callbacks run
    dist.all_reduce = all_reduce_released_late


def gloo_threads():
    """How many of gloo's threads run in this process (Linux names each in /proc), not counting
    one that has begun to exit: a joined thread stays listed until the kernel reaps it, which on
    a loaded machine comes a while after the join returned."""
    count = 0
    for task in os.listdir('/proc/self/task'):
        try:
            with open(f'/proc/self/task/{task}/comm') as file:
                name = file.read()
            with open(f'/proc/self/task/{task}/stat') as file:
                stat = file.read()
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            continue
        # the fields after the name in parentheses: state, ppid, pgrp, session, tty_nr, tpgid,
        # flags (the kernel's PF_EXITING, 0x4, from the first step of a thread's exit)
        flags = int(stat[stat.rindex(')') + 2:].split()[6])
        count += name.startswith(('pt_gloo', 'gloo')) and not flags & 0x4
    return count


try:
    ncf.main(sys.argv[2:])
finally:
    # Dynamo imported only now: imported first, it would import torch.distributed.nn before
    # the process group exists, which runtime.join must see to itself
    import torch._dynamo.utils
    counters = torch._dynamo.utils.counters
    with open(f'{sys.argv[1]}.{RANK}', 'w') as file:
        json.dump({'unique_graphs': counters['stats']['unique_graphs'],
                   'graph_breaks': sum(counters['graph_break'].values()),
                   'gloo_threads': gloo_threads()}, file)
