"""Nothing a user keeps is ever half-written: every file (keys, shards, checkpoints, models, reports) is written to a
temporary file in the destination's folder, flushed to disk, then renamed into place.

Temporary files are named ``.msd_fast-<host>-<pid>-<random>.tmp``. An error or a signal the process can handle
(Ctrl-C; SIGTERM from the CLI, see :func:`terminate_as_exit`) removes them at once; a writer killed outright
(SIGKILL, a power cut) leaves one behind, which the next write into that folder from the same host removes once its
process is gone."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from typing import Iterator, Optional

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
_STALE = re.compile(r"^\.msd_fast-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[^/]*\.tmp$")


def refuse_existing(path: str | os.PathLike) -> None:
    """Raise ``FileExistsError`` when ``path`` exists (the one wording for every file a user keeps)."""
    if os.path.exists(path):
        raise FileExistsError(f"{os.fspath(path)} exists; refusing to replace it (--force on the command line, "
                              f"overwrite=True in Python)")


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by someone else
        return False
    return False


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporary files in ``folder`` left by writers on this host whose process no longer exists;
    returns their paths. Other hosts' files are never touched (their PIDs mean nothing here)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _STALE.match(name)
        if match and match["host"] == _HOST and int(match["pid"]) != os.getpid() and \
                _process_is_gone(int(match["pid"])):
            stale = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                if os.path.isdir(stale) and not os.path.islink(stale):
                    shutil.rmtree(stale)
                else:
                    os.unlink(stale)
                removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, overwrite: bool = True,
                 file_mode: Optional[int] = None) -> Iterator:
    """Yield a handle (opened with ``mode``) to a temporary file next to ``path``; when the block ends normally the
    file is fsynced, given ``file_mode`` (temporary files start as 0600) and moved to ``path``. ``overwrite=False``
    links instead of renaming, so an existing ``path`` -- even one that appeared meanwhile -- is never replaced
    (``FileExistsError``). On any error the temporary file is removed and ``path`` is untouched; an ``OSError``
    names ``path``, not the temporary file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".msd_fast-{_HOST}-{os.getpid()}-", suffix=".tmp", dir=folder)
    except OSError as error:
        raise _naming(error, path) from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if file_mode is not None:
            os.chmod(tmp, file_mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                refuse_existing(path)
                raise
            os.unlink(tmp)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and not isinstance(error, FileExistsError) and tmp in str(error):
            raise _naming(error, path) from None
        raise


def _naming(error: OSError, path: str) -> OSError:
    """The same kind of error, about the user's ``path`` (not a temporary file they never named)."""
    return type(error)(error.errno, f"cannot write {path}: {error.strerror or error}")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yield the path of a temporary folder next to ``path``; when the block ends normally its files are fsynced and
    the folder is renamed to ``path`` (with ``overwrite``, an existing ``path`` is moved aside first and removed
    after). So a reader sees the whole folder or none of it. On any error the temporary folder is removed and
    ``path`` is untouched; without ``overwrite`` an existing ``path`` raises ``FileExistsError`` (before and after
    the block)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if not overwrite:
        refuse_existing(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(parent)
    try:
        tmp = tempfile.mkdtemp(prefix=f".msd_fast-{_HOST}-{os.getpid()}-", suffix=".tmp", dir=parent)
    except OSError as error:
        raise _naming(error, path) from None
    aside = None
    try:
        yield tmp
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)
        if os.path.exists(path):
            if not overwrite:
                refuse_existing(path)
            aside = tempfile.mkdtemp(prefix=f".msd_fast-{_HOST}-{os.getpid()}-", suffix=".tmp", dir=parent)
            os.replace(path, os.path.join(aside, "previous"))
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and os.path.exists(os.path.join(aside, "previous")) and not os.path.exists(path):
            os.replace(os.path.join(aside, "previous"), path)  # put the previous folder back
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


class Terminated(SystemExit):
    """SIGTERM arrived (exit status 143)."""


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM (a scheduler's timeout, ``kill``) raises :class:`Terminated` in the main thread, so
    temporary files are removed and nothing half-written is left, as on Ctrl-C; the previous handler is restored
    after. A no-op outside the main thread, where Python cannot install signal handlers."""
    def handler(signum, frame):
        raise Terminated(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (replacing it)."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def save_figure(figure, path: str | os.PathLike) -> None:
    """Save a matplotlib ``figure`` as PNG at ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path) as handle:
            figure.savefig(handle, format="png")
    finally:
        plt.close(figure)
