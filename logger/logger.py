"""A JSON-lines log in the layout NVIDIA's dllogger writes, so the reference's parsers read it.

Each line is ``DLLL {json}`` with timestamp, datetime, elapsedtime, type and then either
step and data (type "LOG": step "PARAMETER" for settings, [epoch] per epoch, [] for the summary)
or metric and metadata (type "METADATA": units and formats of a metric).
"""
import contextlib
import json
import os
import time
from datetime import datetime

PREFIX = 'DLLL '


class Logger:
    """Writes the JSON log; a disabled logger (ranks other than 0) writes nothing.

    Each record is one line written by one write() to a file opened for appending, so that
    records of two writers of one log (a run and its resumed run, say) never interleave within
    a line; a writer killed mid-line leaves at most one torn line, which `read_log` skips.
    """

    def __init__(self, path=None, append=False):
        self.start = time.time()
        self.file = None
        self.path = path
        if path:
            with self._naming_the_log():
                directory = os.path.dirname(os.path.abspath(path))
                os.makedirs(directory, exist_ok=True)
                if not append:
                    open(path, 'w').close()
                self.file = open(path, 'ab', buffering=0)
                if self.file.tell() and not _ends_with_newline(path):
                    self.file.write(b'\n')  # a torn last line stays a line of its own

    @contextlib.contextmanager
    def _naming_the_log(self):
        """An OSError while writing names the log (a device such as /dev/full names no file)."""
        try:
            yield
        except OSError as error:
            if error.filename is None:
                error.filename = self.path
            raise

    def _write(self, record):
        if self.file is None:
            return
        now = time.time()
        line = {'timestamp': str(now), 'datetime': str(datetime.fromtimestamp(now)),
                'elapsedtime': str(now - self.start), **record}
        data = (PREFIX + json.dumps(line, default=str) + '\n').encode()
        with self._naming_the_log():
            while data:  # a regular file takes it in one write; anything else may need several
                data = data[self.file.write(data):]

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


def _ends_with_newline(path):
    with open(path, 'rb') as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b'\n'


def _parse(line):
    """(record, whole) of a DLLL line: record is None when it does not parse; a torn record
    followed by a whole one on the same line (a writer killed mid-line, then another one
    appending) gives the whole one, with whole False."""
    for start in (len(PREFIX), line.rfind(PREFIX) + len(PREFIX)):
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(record, dict):
            return record, start == len(PREFIX)
    return None, False


def read_log(path, skipped=None):
    """The LOG records of a log file, as dicts. Lines that are not DLLL lines are skipped, and
    so are DLLL lines that do not parse (a torn last line of a killed writer, a garbled byte):
    their 1-based numbers are appended to `skipped` when it is given, a list."""
    records = []
    with open(path, encoding='utf-8', errors='replace') as file:
        for number, line in enumerate(file, 1):
            if not line.startswith(PREFIX):
                continue
            record, whole = _parse(line)
            if not whole and skipped is not None:
                skipped.append(number)
            if record is not None and record.get('type') == 'LOG':
                records.append(record)
    return records
