"""Files replaced whole or not at all: a reader never sees half a file, even if the writer dies."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once, at import (before any thread)
    os.umask(mask)
    return mask


UMASK = _umask()
"""The process's file-creation mask, read once: files written here get the mode open() would give."""


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, then rename it over ``path``.

    The temporary name is unique, so processes writing the same path at once (two runs filling
    one answer cache) never write into each other's file; the last rename wins, whole. On error
    the temporary file is removed and ``path`` is left as it was.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # as open() would create it (mkstemp makes 0600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
