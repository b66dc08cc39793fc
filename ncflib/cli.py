"""The command-line contract: one clear line on stderr naming the problem, a non-zero exit, no
traceback, and nothing half-written (files that existed before are unchanged).

`run_main` applies it to a whole entry point (bad input, a full disk, Ctrl-C, SIGTERM); `warn`
says what the user should know and does not stop the run; the output checks tell, before any
work, that every place a run will write can be written.
"""
import argparse
import contextlib
import errno
import importlib
import os
import re
import signal
import subprocess
import sys
import threading

# Errors that mean "the disk is full", whatever the file system: reported in one line.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Signals that end a run with one line and 128 + the signal's number, as a shell reports them.
ENDING_SIGNALS = ('SIGTERM', 'SIGHUP')


class UsageError(Exception):
    """Bad input (a file, a flag, a checkpoint): reported in one line, exit status 1."""


def first_line(error, limit=400):
    """The first line of an error's message, for a one-line report: without terminal colour
    codes (torch colours some of its messages), and whole up to `limit` characters."""
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines[0]) <= limit else lines[0][:limit - 3] + '...'


def printable(text):
    """`text` with every character a terminal would not show as it is (NUL, escape, a line
    break...) written as its escape sequence: a message quoting a file's bytes stays one
    readable line."""
    return ''.join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def excerpt(text, limit=60):
    """A piece of a file, for a one-line message: escaped as repr writes it (no control
    character or line break of the file reaches the terminal), quoted, cut to `limit`
    characters."""
    if isinstance(text, bytes):
        text = text.decode('utf-8', errors='replace')
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 3] + '...'


def arrow_reason(error):
    """An error of Arrow's CSV reader in one line, the piece of the file it quotes (a row, a
    value) shown as `excerpt` shows it."""
    message = str(error)
    for pattern in (r'(.*Expected \d+ columns, got \d+: )(.*)', r"(.*invalid value )'(.*)'"):
        match = re.fullmatch(pattern, message, re.DOTALL)
        if match:
            return match[1] + excerpt(match[2])
    shown = printable(message)
    return shown if len(shown) <= 200 else shown[:197] + '...'


def out_of_memory(error):
    """Whether `error` is an allocation that failed: torch's OutOfMemoryError (CUDA), a CPU
    allocator's failure (a RuntimeError of torch's), or Python's MemoryError."""
    return isinstance(error, MemoryError) or type(error).__name__ == 'OutOfMemoryError' or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with its defaults in the help, whose errors are one line (argparse's
    own print the whole usage first): `program: error: ... (see --help)`, exit status 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault('formatter_class', argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')

    def given_flags(self, argv=None):
        """The destinations of the flags `argv` (None: the command line) gives, rather than
        leaves at their defaults: argparse sets a default only where the namespace has no value
        yet, so every destination starts as a marker that only a given flag replaces."""
        unset = object()
        namespace = argparse.Namespace(**{action.dest: unset for action in self._actions
                                          if action.dest != argparse.SUPPRESS})
        return {name for name, value in vars(self.parse_args(argv, namespace)).items()
                if value is not unset}


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived while `run_main` ran: unwinds like KeyboardInterrupt, so that
    `finally` blocks and cleanup handlers run, and ends the process with 128 + the number."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Signal handling while run_main runs (main thread only): a signal raises at once, unless a
# `deferred_signals()` block is running; then it is held and raised when the block ends.
_deferral = threading.local()


def _raise_for(signum):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _on_signal(signum, frame):
    if getattr(_deferral, 'depth', 0):
        _deferral.pending = getattr(_deferral, 'pending', None) or signum
        return
    # One exception per run: a second Ctrl-C while the first unwinds must not cut the cleanup.
    for name in ('SIGINT',) + ENDING_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is _on_signal:
            signal.signal(number, signal.SIG_IGN)
    _raise_for(signum)


@contextlib.contextmanager
def deferred_signals():
    """Hold Ctrl-C and SIGTERM (as handled by `run_main`) until the block ends, then raise: for
    short steps that must not stop half-way, such as renaming a set of files into place."""
    _deferral.depth = getattr(_deferral, 'depth', 0) + 1
    try:
        yield
    finally:
        _deferral.depth -= 1
        pending = getattr(_deferral, 'pending', None)
        if _deferral.depth == 0 and pending is not None:
            _deferral.pending = None
            _on_signal(pending, None)


@contextlib.contextmanager
def child_process(command, **popen):
    """subprocess.Popen(command), as a child that never outlives this process's run_main: a
    Ctrl-C, SIGTERM or SIGHUP that stops this process while the block runs is passed on to the
    child, and the block's exception waits until the child has stopped (it says its own line
    and keeps what it keeps); any other exception kills it. A Ctrl-C at a terminal reaches both
    at once: the child takes the one passed on as part of the first (run_main ignores more
    while it unwinds)."""
    child = None
    try:
        with deferred_signals():  # started and in hand, or not started at all
            child = subprocess.Popen(command, **popen)
        yield child
    except (KeyboardInterrupt, Terminated) as stop:
        if child is not None:
            child.send_signal(getattr(stop, 'signum', signal.SIGINT))  # none if it has ended
            child.wait()
        raise
    except BaseException:
        if child is not None:
            child.kill()
            child.wait()
        raise


def import_held(*names):
    """Import the modules `names` with Ctrl-C and SIGTERM held until they have loaded (see
    `deferred_signals`): an extension module interrupted while it loads fails with an unrelated
    ImportError (numpy's: 'PyCapsule_Import could not import module "datetime"') and the
    interruption is lost. For programs that import their heavy modules after their cheap checks,
    under `run_main`."""
    with deferred_signals():
        for name in names:
            importlib.import_module(name)


def _on_early_signal(signum, frame):
    """Ctrl-C or SIGTERM outside run_main: before it (while torch imports, say), when nothing
    has been written yet, or after it, when what it kept is whole: the line is all there is to
    do, at once (an import interrupted half-way leaves nothing worth unwinding)."""
    if not (_speaker['quiet'] or _speaker['said']):  # one line a process, the first
        print(f'{_speaker["program"]}: interrupted: '
              f'{printable(_speaker["kept"] or "nothing was written")}', file=sys.stderr,
              flush=True)
    os._exit(128 + signum)


def handle_signals_late(program):
    """Ctrl-C, SIGTERM and SIGHUP end the script `program` with one line once run_main has
    returned, until the process ends, saying what the run kept: for a script that imports
    nothing heavy before run_main starts (else handle_signals_early)."""
    _speaker.update(program=program, script=True)


def handle_signals_early(program):
    """Ctrl-C, SIGTERM and SIGHUP end `program` with one line from here on, before its heavy
    imports (the first lines of a command-line script); run_main takes over when it starts,
    and after it, as handle_signals_late. Signals the caller ignores (nohup, a background
    job) stay ignored."""
    handle_signals_late(program)
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ('SIGINT',) + ENDING_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) in (signal.SIG_DFL,
                                                               signal.default_int_handler):
            signal.signal(number, _on_early_signal)


@contextlib.contextmanager
def _signal_handlers():
    """Route Ctrl-C, SIGTERM and SIGHUP through _on_signal where they have their default
    handling or handle_signals_early's (an ignored signal stays ignored: nohup, a background
    job)."""
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for name in ('SIGINT',) + ENDING_SIGNALS:
            number = getattr(signal, name, None)
            if number is None:
                continue
            current = signal.getsignal(number)
            if current in (signal.SIG_DFL, signal.default_int_handler, _on_early_signal):
                # once run_main is done: in a script, the early handler, which then says what
                # the run kept (_speaker's 'kept'); else the handling it found
                installed[number] = _on_early_signal if _speaker['script'] else current
                signal.signal(number, _on_signal)
    try:
        yield
    finally:
        for number, previous in installed.items():
            # a script interrupted ends now: one more signal (a terminal's Ctrl-C reaching a
            # parent and its child, which then passes it on) stays ignored, not a second line
            if not (_speaker['script'] and signal.getsignal(number) is signal.SIG_IGN):
                signal.signal(number, previous)


def error_chain(error):
    """`error` and the exceptions it was raised from or while handling, innermost last."""
    seen = []
    while error is not None and not any(error is other for other in seen):
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def disk_full_error(error):
    """The OSError meaning a full disk in `error`'s chain, or None. A library may raise its own
    error while cleaning up after one (torch.save does): the disk-full error is then its context."""
    return next((e for e in error_chain(error)
                 if isinstance(e, OSError) and e.errno in DISK_FULL), None)


def _describe(kept):
    try:
        if callable(kept):
            kept = kept()
        return str(kept) if kept else ''
    except Exception:  # the line must still come out
        return ''


# Who speaks while run_main runs: the program's name, whether this process is quiet (the ranks
# of a distributed run other than 0), whether it is a script that says a signal after run_main
# too, what the run kept once run_main has returned (for that line), and whether run_main has
# said its own line (an error, an interruption: then a signal adds none).
_speaker = {'program': os.path.basename(sys.argv[0]) or 'ncf', 'quiet': False, 'kept': None,
            'script': False, 'said': False}


def warn(message):
    """One line on stderr, `program: warning: message`: something the user should know that
    does not stop the run. Silent on the quiet ranks of a distributed run."""
    if not _speaker['quiet']:
        print(f'{_speaker["program"]}: warning: {printable(message)}', file=sys.stderr,
              flush=True)


def run_main(program, function, *args, kept=None, quiet=False, **kwargs):
    """Run `function(*args, **kwargs)` as the body of the command-line tool `program`.

    Returns what `function` returns. Otherwise the process ends with one line on stderr and no
    traceback:

    - UsageError: ``program: error: <message>``, exit status 1;
    - a full disk (OSError ENOSPC or EDQUOT, wherever raised, also as the context of another
      exception): ``program: error: cannot write <path>: No space left on device; <kept>``,
      exit status 1;
    - Ctrl-C (KeyboardInterrupt): ``program: interrupted: <kept>``, exit status 130;
    - SIGTERM / SIGHUP: the same line, exit status 143 / 129 (while `function` runs, a handler
      turns them into a `Terminated` exception, so that cleanup code runs as for Ctrl-C).

    kept: what an interrupted or failed run leaves behind, for those lines ("the previous cache
    in X is unchanged", "last.pth from epoch 3 kept"): a string, or a callable that returns one,
    called at the end (so it can describe how far the run got). Any other exception propagates
    (a bug shows its traceback). Handlers are installed only in the main thread, and only for
    signals that have their default handling (an ignored one stays ignored), and are restored
    on return: run_main can wrap an in-process call (tests) too. quiet: exit the same way without
    the line (the processes of a distributed run other than rank 0, which say nothing).
    """
    def say(line):
        _speaker['said'] = True  # the run's line: a signal after it adds none
        if not quiet:
            print(f'{program}: {printable(line)}', file=sys.stderr)

    def interrupted(error):
        said = _describe(kept)
        say(f'interrupted{": " + said if said else ""}')
        sys.exit(128 + (error.signum if isinstance(error, Terminated) else signal.SIGINT))

    _speaker.update(program=program, quiet=quiet, kept=None, said=False)
    try:
        with _signal_handlers():
            result = function(*args, **kwargs)
            # a signal from here until the process ends says what the finished run left
            _speaker['kept'] = _describe(kept)
            return result
    except UsageError as error:
        say(f'error: {error}')
        sys.exit(1)
    except (KeyboardInterrupt, Terminated) as error:
        interrupted(error)
    except Exception as error:
        # A library may turn the interruption into an error of its own (an extension module
        # interrupted while it imports raises ImportError): the interruption is in its chain.
        cause = next((e for e in error_chain(error)
                      if isinstance(e, (KeyboardInterrupt, Terminated))), None)
        if cause is not None:
            interrupted(cause)
        full = disk_full_error(error)
        if full is None:
            raise
        where = f' {full.filename}' if full.filename else ''
        said = _describe(kept)
        say(f'error: cannot write{where}: {os.strerror(full.errno)}{"; " + said if said else ""}')
        sys.exit(1)



# Output checks: before any work, creating nothing

def _label(flag, path):
    return f'{flag} {path}' if flag else f'output {path}'


def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def same_file(path, other):
    """Whether two paths name one file (through links and relative paths too)."""
    try:
        return os.path.samefile(path, other)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(path) == os.path.realpath(other)


def check_writable_directory(directory, flag=None):
    """Raise UsageError unless `directory` exists writable or can be created, creating nothing.

    flag: how the user gave it (`--output`, `--checkpoint_dir`), for the message.
    """
    label = _label(flag, directory)
    existing = _nearest_existing(directory)
    if not os.path.isdir(existing):
        raise UsageError(f'{label} is not a directory ({existing} is a file)')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f'{label} is not writable ({existing} is read-only)'
                         if existing == os.path.abspath(directory) else
                         f'{label} cannot be created ({existing} is read-only)')


def check_output_file(path, flag=None):
    """Raise UsageError unless the file `path` can be written, creating nothing: it is not a
    directory (nor a device or other special file), and its directory exists writable or can
    be created."""
    label = _label(flag, path)
    if os.path.isdir(path):
        raise UsageError(f'{label} is a directory, not a file')
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f'{label} is not a regular file')
    directory = os.path.dirname(os.path.abspath(path))
    existing = _nearest_existing(directory)
    if not os.path.isdir(existing):
        raise UsageError(f'{label} cannot be written: {existing} is a file, not a directory')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f'{label} cannot be written: {existing} is read-only')


def check_log_file(path, flag=None):
    """As `check_output_file`, for a file written in place (a log, appended to): an existing
    file, or a device such as /dev/null, must be writable as it is."""
    if os.path.exists(path) and not os.path.isdir(path):
        if not os.access(path, os.W_OK):
            raise UsageError(f'{_label(flag, path)} is read-only')
        return
    check_output_file(path, flag)


def _inside(path, directory):
    """Whether `path` lies under `directory` (both as they will be: links resolved)."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path != directory and os.path.commonpath((path, directory)) == directory


def check_paths_apart(reads, writes, directories=()):
    """Raise UsageError unless every file a run writes is apart from everything else it uses:
    not a file it reads, not another file it writes, not one of the directories it writes
    into, and not under a file it writes (nor is any of those directories).

    reads, writes, directories: (path, what it is for the message: "--log_path X",
    "--checkpoint_dir's model.pth") pairs, or {path: what}; directories: those the run writes
    into (made where missing). A file a run reads and replaces on purpose (--resume's
    last.pth) is among the writes only.
    """
    reads, writes, directories = (list(paths.items()) if isinstance(paths, dict) else
                                  list(paths) for paths in (reads, writes, directories))
    for index, (path, what) in enumerate(writes):
        for directory, directory_what in directories:
            if same_file(path, directory):
                raise UsageError(f'{what} is {directory_what}, a directory this run writes '
                                 'into; give a file there instead')
        for other, other_what in reads:
            if same_file(path, other):
                raise UsageError(f'{what} is {other_what}, which this run reads: it would be '
                                 'overwritten; write it elsewhere')
        for other, other_what in writes[index + 1:]:
            if same_file(path, other):
                raise UsageError(f'{what} is {other_what}, which this run writes too: one '
                                 'would replace the other; write it elsewhere')
        for other, other_what in writes[:index] + writes[index + 1:] + directories:
            if _inside(other, path):
                raise UsageError(f'{other_what} would be inside {what}, a file this run '
                                 'writes; write them apart')
