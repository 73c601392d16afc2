"""``torch.save`` to a path atomically: every file maddnet writes with torch goes through here."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: str | os.PathLike, what: str = "file") -> Path:
    """Write ``obj`` with ``torch.save`` to ``path`` atomically; returns ``path``.

    The data goes to a temporary file in the same folder, is flushed to disk, and then
    replaces ``path`` with ``os.replace``: a kill at any moment leaves either the old or
    the new file, never a truncated one. A write that fails for the file system (a full
    disk: torch's zip writer then raises a ``RuntimeError`` on top of the ``OSError``)
    raises :class:`OSError` naming the ``what`` (e.g. "checkpoint"), ``path`` and the
    reason; the temporary file is removed and an earlier file at ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; this is a normal file
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        cause = _os_error(error)
        if cause is None:
            raise
        kept = f"the previous {what} there is unchanged" if path.exists() else "nothing was written"
        reason = cause.strerror or cause
        raise OSError(cause.errno, f"could not write the {what} {path}: {reason} ({kept})") from error
    return path


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind ``error`` (itself, or along its chain of causes and contexts)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
