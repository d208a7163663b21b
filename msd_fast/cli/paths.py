"""Output paths are checked before any work starts: a run never fails at its end because its ``--out`` was a file,
a folder, or in a place it cannot write."""
from __future__ import annotations

import os
from typing import Optional

from ..atomic import refuse_existing


def _writable_parent(out: str, flag: str) -> str:
    """The nearest existing folder above ``out`` (where the missing folders would be created), checked writable."""
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: {parent} is not writable")
    return parent


def check_out_folder(out: Optional[str], flag: str = "--out") -> None:
    """``out`` can be (or already is) a writable folder; None passes (no output asked for)."""
    if out is None:
        return
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ValueError(f"{flag} {out} is a file, not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {out} is not writable")
        return
    _writable_parent(out, flag)


def check_out_file(out: str, *, force: bool, flag: str = "--out") -> None:
    """``out`` can be written as a new file (or replaced, with ``force``)."""
    if os.path.isdir(out):
        raise ValueError(f"{flag} {out} is a folder, not a file")
    _writable_parent(out, flag)
    if not force:
        refuse_existing(out)


def check_out_shards(out: str, *, force: bool, flag: str = "--out") -> None:
    """``out`` can be written as a shard file or shard-set folder: new, replaced with ``force``, or an unfinished
    shard set (which the encoding resumes)."""
    from ..protocol.shard_sets import check_shard_output, is_shard_set

    if not is_shard_set(out):
        check_out_file(out, force=force, flag=flag)
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out} is not writable")
    check_shard_output(out, overwrite=force)


def check_outputs(config, out_kind: Optional[str]) -> None:
    """The checks of a command's ``config.out`` for its ``out_kind`` (``"folder"``, ``"file"``, ``"shards"`` or
    None)."""
    if out_kind == "folder":
        check_out_folder(config.out)
    elif out_kind == "file":
        check_out_file(config.out, force=getattr(config, "force", False))
    elif out_kind == "shards":
        check_out_shards(config.out, force=getattr(config, "force", False))
