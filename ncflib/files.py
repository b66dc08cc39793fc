"""Files that are whole or absent: atomic writes (a temporary file beside the target, flushed
to the disk, then renamed), sets of files replaced together, torch.save and torch.load the
project's way, the one directory lock, and file digests remembered beside the files.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import secrets
import socket
import time

from ncflib.cli import DISK_FULL, UsageError, deferred_signals, error_chain, first_line

# Atomic writes

TEMPORARY_SUFFIX = '.tmp'
# Temporary files are named .NAME.PID.TAG.tmp; TAG is 8 hex digits, the first 4 naming this host
# (so that a host only ever removes the temporary files of its own dead processes).
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:4]


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OverflowError:
        return False
    return True


def remove_stale_temporaries(path):
    """Remove the temporary files that writers of `path` on this host left when they died
    (killed before they could clean up); never a live writer's. Returns the names removed."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f'.{os.path.basename(path)}.'
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(TEMPORARY_SUFFIX)):
            continue
        middle = name[len(prefix):-len(TEMPORARY_SUFFIX)].split('.')
        if (len(middle) != 2 or not middle[0].isdigit() or len(middle[1]) != 8
                or not middle[1].startswith(_HOST_TAG)):
            continue
        pid = int(middle[0])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            os.remove(os.path.join(directory, name))
            removed.append(name)
        except FileNotFoundError:  # another writer cleaned it first
            pass
    return removed


def temporary_path(path):
    """Create an empty temporary file beside `path` (same file system: renaming it onto `path`
    is atomic), named .NAME.PID.TAG.tmp, after removing the stale ones of dead writers."""
    remove_stale_temporaries(path)
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        temporary = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.'
                                            f'{_HOST_TAG}{secrets.token_hex(2)}{TEMPORARY_SUFFIX}')
        try:
            # O_EXCL: never another writer's file; mode 0o666 so the umask applies, as for open()
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue


def _name_the_target(error, temporary, path):
    """OSErrors raised while writing `temporary` name `path`, the file the user asked for."""
    for link in error_chain(error):
        if isinstance(link, OSError) and link.filename in (None, temporary):
            link.filename = path


def _make_parents(path):
    """Create the missing parent directories of `path`; return those created, deepest last."""
    created = []
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(directory):
        created.append(directory)
        directory = os.path.dirname(directory)
    for directory in reversed(created):
        os.mkdir(directory)
    return created[::-1]


def _remove_empty(directories):
    for directory in reversed(directories):
        try:
            os.rmdir(directory)
        except OSError:
            pass


def fsync_path(path):
    """Flush a file's or a directory's data to the disk (a directory: the names in it), so
    that what a rename publishes survives a power loss."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _publish(temporary, path):
    """Rename the written `temporary` onto `path` durably: the file's data on the disk before
    the rename, the directory's new entry after it (else a power loss may leave `path` renamed
    but empty)."""
    fsync_path(temporary)
    os.replace(temporary, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def atomic_write(path, write, make_parents=False):
    """Call write(temporary_path), then rename it onto `path`: readers see all or nothing, and
    the rename publishes it durably (fsync of the file and of its directory).

    The temporary file sits beside `path` (see `temporary_path`) and is removed if `write` fails
    or the process is interrupted; one left by a writer killed outright (kill -9) is removed by
    the next write of the same path. An OSError names `path`. make_parents: create the missing
    parent directories (removed again if the write fails).
    """
    created = _make_parents(path) if make_parents else []
    temporary = None
    try:
        temporary = temporary_path(path)
        write(temporary)
        _publish(temporary, path)
    except BaseException as error:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
        _remove_empty(created)
        _name_the_target(error, temporary, path)
        raise


def atomic_torch_save(obj, path):
    """torch.save, atomically. Through a file object, so that the archive inside is always named
    'archive' (a path would name it after the temporary file): same object, same bytes."""
    import torch

    def write(temporary):
        with open(temporary, 'wb') as file:
            torch.save(obj, file)
    atomic_write(path, write)


def torch_load(path, what, map_location):
    """torch.load(path, weights_only=True), any failure one line naming `what` it should be."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle...: not a file of ours
        if not written_by_torch_save(path):
            raise UsageError(f'{path} is not a {what}: not a file torch.save writes') from None
        raise UsageError(f'cannot read {what} {path}: {first_line(error)}') from None


def written_by_torch_save(path):
    """Whether `path` starts as torch.save's files do: a zip archive, or (before torch 1.6) a
    pickle."""
    with open(path, 'rb') as file:
        head = file.read(4)
    return head.startswith(b'PK\x03\x04') or head[:1] == b'\x80'


class FileSet:
    """Several files that replace their old versions together, as far as a reader can tell.

    `write` writes each file to a temporary beside it; nothing visible changes until `commit`,
    which removes `last` (say metadata.json, which readers require), renames the others into
    place and renames `last` into place at the end, with Ctrl-C and SIGTERM held meanwhile. So a
    reader that trusts the set only when `last` exists sees the old set (until commit), the new
    set, or (only if the process is killed outright during the renames) no `last`: never new
    files under an old `last`. Used as a context manager, an exception discards the temporaries.
    """

    def __init__(self):
        self._staged = {}  # path: temporary

    def write(self, path, write):
        temporary = None
        try:
            temporary = temporary_path(path)
            write(temporary)
        except BaseException as error:
            if temporary is not None and os.path.exists(temporary):
                os.remove(temporary)
            _name_the_target(error, temporary, path)
            raise
        previous = self._staged.pop(path, None)
        if previous is not None:
            os.remove(previous)
        self._staged[path] = temporary

    def write_bytes(self, path, data):
        def write(temporary):
            with open(temporary, 'wb') as file:
                file.write(data)
        self.write(path, write)

    def commit(self, last=None):
        """Rename every file into place, `last` at the end, durably: each file's data on the
        disk before the first rename, the directories' entries before `last`'s rename and
        after it."""
        for temporary in self._staged.values():
            fsync_path(temporary)
        directories = {os.path.dirname(os.path.abspath(path)) for path in self._staged}
        with deferred_signals():
            if last is not None:
                if last not in self._staged:
                    raise ValueError(f'{last} was not written')
                with contextlib.suppress(FileNotFoundError):
                    os.remove(last)
            for path, temporary in list(self._staged.items()):
                if path != last:
                    os.replace(temporary, path)
                    del self._staged[path]
            for directory in directories:  # the others in place before `last` says so
                fsync_path(directory)
            if last is not None:
                os.replace(self._staged.pop(last), last)
                fsync_path(os.path.dirname(os.path.abspath(last)))

    def discard(self):
        for temporary in self._staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
        self._staged.clear()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.discard()



# File digests, remembered

HASH_SIDECAR = '.sha256'
# File systems stamp times in ticks (a few milliseconds): a file hashed within a tick of its last
# change could change again under the same times, so such a digest is not remembered.
_RACY_NS = 20_000_000


def _stat_key(stat):
    return {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns, 'ctime_ns': stat.st_ctime_ns,
            'inode': stat.st_ino}


def file_sha256(path):
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def remember_sha256(path, digest):
    """Record `digest` as the sha256 of `path` as it is now, in the sidecar PATH.sha256 (for a
    file just written from bytes whose digest is known). Best effort: a sidecar that cannot be
    written (a read-only directory) only means hashing again next time."""
    record = json.dumps({**_stat_key(os.stat(path)), 'sha256': digest}) + '\n'

    def write(temporary):
        with open(temporary, 'w') as file:
            file.write(record)
    try:
        atomic_write(path + HASH_SIDECAR, write)
    except OSError as error:
        if error.errno in DISK_FULL:
            raise


def remembered_sha256(path, log=None):
    """sha256 of `path`, remembered in the sidecar PATH.sha256 (JSON: size, mtime_ns, ctime_ns,
    inode and sha256) and read again only when the file's size, times or inode differ from the
    sidecar's: a file replaced by another, even one with an older modification time, is hashed
    again. Returns (digest, whether it was remembered). `log` (a callable) is told when the
    file is read.
    """
    key = _stat_key(os.stat(path))
    try:
        with open(path + HASH_SIDECAR) as file:
            recorded = json.load(file)
        if isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in key.items()) \
                and isinstance(recorded.get('sha256'), str) and len(recorded['sha256']) == 64:
            return recorded['sha256'], True
    except (OSError, ValueError):
        pass
    if log:
        log(f'Hashing {path}')
    started = time.time_ns()
    digest = file_sha256(path)
    stat = os.stat(path)
    if _stat_key(stat) == key and started - max(stat.st_mtime_ns, stat.st_ctime_ns) > _RACY_NS:
        remember_sha256(path, digest)
    return digest, False


# The directory lock

LOCK_FILE = '.lock'  # in the directory a run writes; it names the run that holds it


def lock_holder(directory):
    """Who holds the lock on `directory` (from its lock file), or None when nobody does.
    Creates nothing."""
    path = os.path.join(directory, LOCK_FILE)
    try:
        file = open(path, 'r')
    except OSError:
        return None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return file.read().strip() or 'another process'
        fcntl.flock(file, fcntl.LOCK_UN)
    return None


class DirectoryLock:
    """An exclusive lock on a directory while a run writes there (a checkpoint directory, a
    cache): an OS lock (flock) on its lock file, which the kernel releases when the process ends,
    however it ends (kill -9 never leaves it stuck). The file names the holder (pid, host, start
    time) for whoever finds it locked; `rule` says why there is one writer, for that message."""

    def __init__(self, directory, rule):
        self.file = open(os.path.join(directory, LOCK_FILE), 'a+')
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or 'another process'
            self.file.close()
            raise UsageError(f'{directory} is in use by {holder}: {rule}') from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f'pid {os.getpid()} on {platform.node()} since '
                        f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
        self.file.flush()

    def release(self):
        if self.file is not None:
            self.file.close()  # closing releases the lock
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.release()
