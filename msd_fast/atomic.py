"""Nothing a user keeps is ever half-written: every file (keys, shards, checkpoints, models, reports) is written to a
temporary file in the destination's folder, flushed to disk, then renamed into place."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Optional


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, overwrite: bool = True,
                 file_mode: Optional[int] = None) -> Iterator:
    """Yield a handle (opened with ``mode``) to a temporary file next to ``path``; when the block ends normally the
    file is fsynced, given ``file_mode`` (temporary files start as 0600) and moved to ``path``. ``overwrite=False``
    links instead of renaming, so an existing ``path`` -- even one that appeared meanwhile -- is never replaced
    (``FileExistsError``). On any error the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".msd_fast-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
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
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
