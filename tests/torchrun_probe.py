"""ncf.main in one process of a torchrun launch, for the tests (not a test module itself).

    python -m torch.distributed.run ... tests/torchrun_probe.py OUT [ncf.py's flags]

Writes what Dynamo counted in this process (graphs compiled, graph breaks) to OUT.RANK as JSON.
With NCF_PROBE_FAIL_RANK=R, process R fails loading the data with an error that is not bad input
(as running out of memory would), and raises it only after a second, so that the test sees what
the other processes make of it rather than how fast the launcher stops them.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch._dynamo.utils  # noqa: E402

import dataloading  # noqa: E402
import ncf  # noqa: E402
from ncflib import runtime  # noqa: E402

RANK = int(os.environ.get('RANK', 0))
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

try:
    ncf.main(sys.argv[2:])
finally:
    counters = torch._dynamo.utils.counters
    with open(f'{sys.argv[1]}.{RANK}', 'w') as file:
        json.dump({'unique_graphs': counters['stats']['unique_graphs'],
                   'graph_breaks': sum(counters['graph_break'].values())}, file)
