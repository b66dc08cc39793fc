"""ncflib/files.py: files that are whole or absent (atomic writes, durable renames, the
temporary files of dead writers), and the one directory lock."""
import os
import subprocess

import pytest

import convert
from conftest import PYTHON, ROOT
from ncflib import files
from ncflib.cache import (ITEM_IDS_FILE, METADATA_FILE, TEST_FILE, TEST_NEGATIVES_FILE,
                          TRAIN_FILE, USER_IDS_FILE)
from ncflib.cli import UsageError

# Four users' ratings (three with 3 or more): enough for convert.py with --min_ratings 3.
RATINGS = """user_id,item_id,rating,timestamp
u2,b,4,10
u1,a,3,5
u1,b,5,5
u1,c,1,3
u3,a,2,1
u2,a,5,20
u2,c,4,15
u4,d,1,1
u4,f,1,3
u4,e,1,2
"""


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([PYTHON, '-c', 'import os; print(os.getpid())'], capture_output=True,
                          text=True).stdout.strip()
    target = tmp_path / 'model.pth'
    tag = files._HOST_TAG
    stale = tmp_path / f'.model.pth.{dead}.{tag}abcd.tmp'
    live = tmp_path / f'.model.pth.{os.getppid()}.{tag}abcd.tmp'  # a live writer's
    other_host = tmp_path / f'.model.pth.{dead}.{"0000" if tag != "0000" else "1111"}abcd.tmp'
    other_file = tmp_path / f'.other.pth.{dead}.{tag}abcd.tmp'
    for path in (stale, live, other_host, other_file):
        path.write_bytes(b'partial')
    files.atomic_write(str(target), lambda temporary: open(temporary, 'w').write('whole'))
    assert target.read_text() == 'whole'
    assert not stale.exists()
    assert live.exists() and other_host.exists() and other_file.exists()


def test_publishing_renames_are_durable(tmp_path, monkeypatch):
    """Each file's data reaches the disk before the rename that publishes it, and the
    directory's entry after it (a power loss leaves the old file or the whole new one)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(('fsync', os.readlink(f'/proc/self/fd/{descriptor}')))
        return real_fsync(descriptor)

    def replace(source, target):
        events.append(('rename', str(target)))
        return real_replace(source, target)
    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    target = tmp_path / 'model.pth'
    files.atomic_write(str(target), lambda temporary: open(temporary, 'w').write('x'))
    assert [kind for kind, _ in events] == ['fsync', 'rename', 'fsync']
    assert events[0][1].startswith(str(tmp_path / '.model.pth.'))
    assert events[2] == ('fsync', str(tmp_path))

    events.clear()
    (tmp_path / 'r.csv').write_text(RATINGS)
    convert.main(['--path', str(tmp_path / 'r.csv'), '--output',
                  str(tmp_path / 'cache'), '--min_ratings', '3', '--valid_negative', '2'])
    renames = [target for kind, target in events if kind == 'rename']
    assert renames[-1] == str(tmp_path / 'cache' / METADATA_FILE)  # metadata.json last
    synced = [path for kind, path in events if kind == 'fsync']
    for name in (TRAIN_FILE, TEST_FILE, TEST_NEGATIVES_FILE, USER_IDS_FILE, ITEM_IDS_FILE):
        staged = [path for path in synced if os.path.basename(path).startswith(f'.{name}.')]
        assert staged, name  # its data synced before the renames
        assert events.index(('fsync', staged[0])) < events.index(('rename', renames[0]))
    last = events.index(('rename', renames[-1]))
    assert ('fsync', str(tmp_path / 'cache')) in events[:last]  # the others' entries first
    assert events[last + 1] == ('fsync', str(tmp_path / 'cache'))


def test_one_writer_per_directory(tmp_path):
    """The lock names its holder to whoever finds it held, and is free again once released
    (or once its process ends, however it ends)."""
    assert files.lock_holder(tmp_path) is None
    with files.DirectoryLock(tmp_path, 'one writer at a time'):
        holder = files.lock_holder(tmp_path)
        assert holder.startswith(f'pid {os.getpid()} on ')
        with pytest.raises(UsageError, match=f'{tmp_path} is in use by pid {os.getpid()} on .*: '
                                             'one writer at a time'):
            files.DirectoryLock(tmp_path, 'one writer at a time')
    assert files.lock_holder(tmp_path) is None
    killed = subprocess.Popen([PYTHON, '-c', 'import sys, os, signal; sys.path.insert(0, '
                               'sys.argv[1]); from ncflib.files import DirectoryLock; '
                               'lock = DirectoryLock(sys.argv[2], "x"); '
                               'os.kill(os.getpid(), signal.SIGKILL)', ROOT, str(tmp_path)])
    killed.wait(60)
    assert files.lock_holder(tmp_path) is None  # kill -9 never leaves it held
