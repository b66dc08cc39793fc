"""Small helpers shared by the command-line tools."""
import os
import secrets
import sys


class UsageError(Exception):
    """Bad input (a file, a flag, a checkpoint): reported in one line, exit status 1."""


def exit_on_usage_error(program, function, *args, **kwargs):
    """Run `function`; a UsageError ends the process with one line on stderr, no traceback."""
    try:
        return function(*args, **kwargs)
    except UsageError as error:
        print(f'{program}: error: {error}', file=sys.stderr)
        sys.exit(1)


def atomic_write(path, write):
    """Call write(temporary_path), then rename it onto `path`: readers see all or nothing.

    The temporary file sits beside `path` (same file system, so the rename is atomic) and is
    removed if `write` fails or the process is interrupted.
    """
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.'
                                        f'{secrets.token_hex(4)}.tmp')
    # O_EXCL: never another writer's file; mode 0o666 so the umask applies, as for open()
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def check_writable_directory(directory):
    """Raise UsageError unless `directory` exists writable or can be created, creating nothing."""
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UsageError(f'output {directory} is not a directory ({path} is a file)')
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f'output {directory} is not writable')


def atomic_torch_save(obj, path):
    """torch.save, atomically. Through a file object, so that the archive inside is always named
    'archive' (a path would name it after the temporary file): same object, same bytes."""
    import torch

    def write(temporary):
        with open(temporary, 'wb') as file:
            torch.save(obj, file)
    atomic_write(path, write)
