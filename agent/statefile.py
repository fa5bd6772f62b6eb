"""Small state files of the agent (alert state, commissioning baselines): replaced atomically.

A reader sees either the previous file or the new one, whole, even after a power cut: the data are written
to a temporary file beside the target, fsynced, renamed over it, and the folder is fsynced so that the
rename itself is durable. A crash before the rename leaves the old file and a stray ``.tmp`` (overwritten
by the next save).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol


class StateStore(Protocol):
    """A state file a ``StateSaver`` writes (``agent.runtime.alerting``): ``save`` is called from the saver's
    thread only and raises ``OSError`` when the file could not be replaced (the previous one is intact)."""

    @property
    def path(self) -> Path: ...

    def save(self, state: dict[str, Any]) -> None: ...


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (temp file, fsync, rename, fsync of the folder); raises ``OSError``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: a partial copy would only take more of the room left
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
