"""What the scripts share besides the model: the project's error classes, files written atomically through hidden
temporaries, text files read whole (bounded, one-line errors), protobuf varints, signals that unwind, one-line usage
errors, and train.py's config.

A module of its own so that convert.py holds checkpoint formats only and data.py and hccl.py get these without the
checkpoint readers. Nothing here imports MindSpore (400 MB, 2 s): the command lines that need none (convert.py,
data.py, hccl.py) start without it.
"""
import argparse
import contextlib
import fnmatch
import glob
import os
import re
import shutil
import signal
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))  # the repository: configs/ and the bundled assets
TEMPORARY = re.compile(r'\.(?P<target>.+)\.tmp(?P<pid>\d+)')
RUNTIME_BYTES = 1536 << 20  # what a run holds besides what the memory plan counts: MindSpore, compiled graphs
MAX_TEXT_BYTES = 1 << 30  # read_text's bound, far above a long run's log: a larger file is not the text asked for


# ----------------------------------------------------------------------------------------------------------------------
# The errors: each message names what is wrong and says what to do; every script's main prints it as one line

class ConvertError(Exception):
    """A file that cannot be read or written as asked; the message names it and says what is wrong."""


class DataError(Exception):
    """Bad input data or paths; the message says what to do."""


class RunError(Exception):
    """A run that cannot start or continue; the message says what to do."""


class TableError(Exception):
    """A rank table that cannot be made or is not valid; the message says why."""


# ----------------------------------------------------------------------------------------------------------------------
# Files: every write goes to a hidden temporary name, renamed when complete; reads fail in one line naming the file

def temporary_name(path):
    """Where a write of path goes until it is complete: '.<name>.tmp<pid>' beside it. The leading dot hides it from
    ls, globs and checkpoint listings; the pid says which process owns it."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f'.{name}.tmp{os.getpid()}')


def remove_path(path):
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def process_alive(pid):
    if pid == os.getpid():  # nothing of ours exists before we write it: a pid reused after a crash (containers)
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(directory, targets='*'):
    """Remove the temporaries (temporary_name) in directory of targets matching the glob `targets` whose process is
    gone: a SIGKILL or a power cut left them, one per crash (a 7B checkpoint's is ~80 GB). Those of
    running processes are kept. Best effort; returns the paths removed. atomic() calls it for its target; a
    training run's start-up and resume need it for all of out_dir's checkpoints: (out_dir, 'ckpt_*.ckpt')."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        m = TEMPORARY.fullmatch(name)
        if m and fnmatch.fnmatchcase(m['target'], targets) and not process_alive(int(m['pid'])):
            with contextlib.suppress(OSError):
                remove_path(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
    return removed


def os_error(e, path):
    """An OSError met while writing path, as one line: our write failed, or the read of an input behind it."""
    tmp, where = temporary_name(path), os.path.abspath(e.filename) if isinstance(e.filename, str) else None
    if where in (None, os.path.abspath(path), tmp) or where.startswith(tmp + os.sep):
        return ConvertError(f'cannot write {path}: {e.strerror or e} (choose another output)')
    return ConvertError(f'cannot read {e.filename}: {e.strerror or e}')


@contextlib.contextmanager
def atomic(path):
    """Yields the temporary name of path (a file or a directory) after removing stale ones of it; renames it to path
    on success and removes it on any failure or interruption, so nothing half-written is ever left."""
    path = path.rstrip('/') or path
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConvertError(f'{path}: directory {directory} does not exist')
    remove_stale_temporaries(directory, glob.escape(os.path.basename(path)))
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise os_error(e, path) from e
    finally:
        with contextlib.suppress(OSError):  # nothing to remove, or not removable: the next start-up tries again
            remove_path(tmp)


@contextlib.contextmanager
def opened(path, error, name=None):
    """path open for reading bytes; an OSError opening or reading it raises `error` (one of the classes above),
    one line naming it as `name` (default: the path)."""
    try:
        with open(path, 'rb') as f:
            yield f
    except OSError as e:
        raise error(f'cannot read {name or path}: {e.strerror or e}') from e


def read_text(path, error, replace=False, name=None):
    """A whole UTF-8 text file (a rank table, hccn.conf, a run's log, prompts), or `error` with one line naming it as
    `name` and saying why not: unreadable, larger than MAX_TEXT_BYTES (of a checkpoint given for a log no more is
    read), or not UTF-8, unless replace (then U+FFFD: a log a crash cut short)."""
    with opened(path, error, name) as f:
        raw = f.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise error(f'{name or path} is larger than {MAX_TEXT_BYTES >> 20:,} MB: is it the right file?')
    try:
        return raw.decode('utf-8', 'replace' if replace else 'strict')
    except UnicodeDecodeError as e:
        raise error(f'{name or path} is not UTF-8 text (byte {e.start}): is it the right file, saved as UTF-8?') \
            from e


def varint(n):
    """n >= 0 as a protobuf varint: of the .ckpt records convert.py writes and the TensorBoard events monitor.py
    writes."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def memory_budget(max_gb=0):
    """Bytes a run may hold by the plan's count: max_gb (train.max_memory_gb) when set, else what this machine has
    available less RUNTIME_BYTES. The one budget of train.py's, eval's and sample.py's up-front checks."""
    import psutil
    return max_gb * (1 << 30) or psutil.virtual_memory().available - RUNTIME_BYTES


def lock_file(path):
    """(file, None): an exclusive OS lock (flock) on path, held while the file stays open, so it ends with its process
    however that ends (nothing stale is left to clear), with this process's pid and host written in it; or (None, the
    holder's line) when another process holds it."""
    import fcntl
    import socket
    f = open(path, 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read(200).strip() or 'another process'
        f.close()
        return None, holder
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    return f, None


# ----------------------------------------------------------------------------------------------------------------------
# Command lines: every failure is one line `error: ...`, and a signal unwinds like an exception

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors end, like every other error of these scripts, in one line 'error: ...' (rc 2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f'error: {message} (--help lists the options)\n')


def number(kind, low, strict=True):
    """An argparse type: a `kind` above low (at least low when not strict)."""
    def parse(text):
        value = kind(text)
        if value < low or strict and value == low:
            raise argparse.ArgumentTypeError(f'must be {"above" if strict else "at least"} {low}, got {text}')
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the program is, so that every `finally` removes what it was writing."""


def take_sigint():
    """Ctrl-C in a script that runs MindSpore graphs. Once a process has run a jit graph, MindSpore's own SIGINT
    handler turns SIGINT into SIGTERM (measured: it is installed again at every graph run), so `except
    KeyboardInterrupt` never runs and the exit status is 143. Called before numpy and MindSpore are imported (their
    threads inherit the mask), this blocks SIGINT in every thread and takes it in one of its own with sigwait, whatever handler is
    installed, then has the main thread run the script's SIGINT handler (KeyboardInterrupt by default; train.py's
    StopRequest) through SIGUSR1, which also wakes it from a blocking read."""
    def relay(signum, frame):
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)

    def wait(main):
        while True:
            signal.sigwait({signal.SIGINT})
            signal.pthread_kill(main, signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, relay)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=wait, args=(threading.main_thread().ident,), daemon=True, name='sigint').start()


@contextlib.contextmanager
def interruptible():
    """While inside, SIGTERM and SIGINT raise Interrupted (by default SIGTERM ends the process where it is and leaves
    its temporaries); later ones are ignored, so the clean-up the first causes is not cut short. A SIGINT the parent
    ignores (a background job) stays ignored. The previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread can set handlers
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) != signal.SIG_IGN}

    def handle(signum, frame):
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)
    for s in previous:
        signal.signal(s, handle)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


# ----------------------------------------------------------------------------------------------------------------------
# train.py's config (sample.py --config reads the same)

def parse_config(argv):
    """The config file and its --config.x=y overrides, locked (a typo is an error, not a new field)."""
    from absl import flags
    from ml_collections import config_flags
    flag_values = flags.FlagValues()
    try:
        config = config_flags.DEFINE_config_file('config', os.path.join(HERE, 'configs', 'tiny.py'),
                                                 flag_values=flag_values, lock_config=True, sys_argv=argv)
        flags.DEFINE_bool('plan', False, 'print the memory and compute plan of the config and exit',
                          flag_values=flag_values)
        rest = flag_values(argv)
        cfg = config.value
        cfg.train  # a config file that failed to load raises only when first used
    except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        lines = str(e).splitlines()
        if 'Failed loading config file' in str(e):  # keep the attempted path and its error, drop the preamble
            lines = lines[-2:]
        message = ' '.join(' '.join(lines).replace('\\n', ' ').split()).replace("'", '').replace('\\', '')
        raise RunError(f'bad configuration: {message} (configs/base.py lists every field)') from e
    if len(rest) > 1:
        raise RunError(f'unexpected arguments {rest[1:]}: options look like --config.train.lr=1e-3')
    return cfg, flag_values.plan


def resolve(path):
    """Paths in configs are relative to the working directory, or else to this repository (bundled assets)."""
    if not path or os.path.isabs(path) or os.path.exists(path) or '*' in path:
        return path
    bundled = os.path.join(HERE, path)
    return bundled if os.path.exists(bundled) else path
