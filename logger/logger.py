"""A JSON-lines log in the layout NVIDIA's dllogger writes, so the reference's parsers read it.

Each line is ``DLLL {json}`` with timestamp, datetime, elapsedtime, type and then either
step and data (type "LOG": step "PARAMETER" for settings, [epoch] per epoch, [] for the summary)
or metric and metadata (type "METADATA": units and formats of a metric).
"""
import json
import os
import time
from datetime import datetime

PREFIX = 'DLLL '


class Logger:
    """Writes the JSON log; a disabled logger (ranks other than 0) writes nothing."""

    def __init__(self, path=None, append=False):
        self.start = time.time()
        self.file = None
        if path:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            self.file = open(path, 'a' if append else 'w', buffering=1)

    def _write(self, record):
        if self.file is None:
            return
        now = time.time()
        line = {'timestamp': str(now), 'datetime': str(datetime.fromtimestamp(now)),
                'elapsedtime': str(now - self.start), **record}
        self.file.write(PREFIX + json.dumps(line, default=str) + '\n')

    def metadata(self, metric, metadata):
        self._write({'type': 'METADATA', 'metric': metric, 'metadata': metadata})

    def log(self, step, data):
        """step: 'PARAMETER', an int tuple such as (epoch,), or () for the summary."""
        self._write({'type': 'LOG', 'step': step if isinstance(step, str) else list(step),
                     'data': data})

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def read_log(path):
    """The LOG records of a log file, as dicts; lines that are not DLLL lines are skipped."""
    records = []
    with open(path) as file:
        for line in file:
            if line.startswith(PREFIX):
                record = json.loads(line[len(PREFIX):])
                if record.get('type') == 'LOG':
                    records.append(record)
    return records
