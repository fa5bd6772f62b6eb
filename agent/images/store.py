"""The local content-addressed image store: each accepted camera image once, by its sha256, within caps.

Why a store beside the spool, and not the bytes in the spool: an image is 10–500 kB, a reading 100 bytes.
The spool keeps, with the message's acknowledgement, an ``image`` point that references the file (sha256,
format, size, whether it was stored); the bytes go here once. InfluxDB never holds image bytes (a field
of that size would slow every query of the measurement), and an alert only needs the sha256 and the URL
of ``GET /images/{sha256}`` (``agent.health.server``) to show the operator the frame that raised it.

Layout: ``{root}/{sha256[:2]}/{sha256}.{format}``; the same image twice is one file (its time is renewed).
Caps: ``max_bytes`` on disk and ``max_age_s``; the oldest files go first, each eviction counted
(``images.evicted{reason=size|age}``). The store is a bounded cache of evidence, not the record: a file
is written (temporary name, then renamed) without fsync — after a power cut the newest files may be
missing, and a fetch answers 404 while the ``image`` point says it was stored. The index is rebuilt from
the folder at start.

Threads: ``put`` and ``sweep`` from the ingest worker; ``read`` from the HTTP server's threads. One lock
guards the index; file reads happen outside it (an evicted file simply reads as absent).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.metrics import Metrics

logger = logging.getLogger(__name__)

SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
CONTENT_TYPES: Final[dict[str, str]] = {"jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp"}
_TMP_SUFFIX: Final = ".tmp"


@dataclass(frozen=True, slots=True)
class StoredImage:
    """An image read back: its bytes and format (``jpeg``, ``png``, ``bmp``)."""

    data: bytes
    format: str

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


@dataclass(slots=True)
class _Entry:
    format: str
    size: int
    mtime: float


class ImageStore:
    """See the module docstring. ``clock``: seconds since the epoch (tests pass their own)."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        max_age_s: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes <= 0 or max_age_s <= 0:
            raise ValueError("ImageStore: max_bytes and max_age_s must be > 0")
        self.root = root
        self._max_bytes = max_bytes
        self._max_age_s = max_age_s
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._bytes = 0
        root.mkdir(parents=True, exist_ok=True)
        self._load()
        metrics.set_function("images.store_bytes", lambda: self._bytes)
        metrics.set_function("images.store_files", lambda: len(self._index))
        self.sweep()

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._index

    def put(self, sha256: str, fmt: str, data: bytes) -> bool:
        """Keep ``data`` (whose hex sha256 is ``sha256``) unless it is there already; False if it could not be
        written (counted ``images.store_errors``, logged): the caller records that in the image's point."""
        if not SHA256_HEX.fullmatch(sha256) or fmt not in CONTENT_TYPES:
            raise ValueError(f"not a sha256 hex digest and image format: {sha256!r} {fmt!r}")
        now = self._clock()
        with self._lock:
            known = self._index.get(sha256)
        if known is not None:
            self._touch(sha256, known, now)
            return True
        if len(data) > self._max_bytes:
            self._metrics.inc("images.evicted", reason="size")
            return False
        path = self._path(sha256, fmt)
        tmp = path.with_name(path.name + _TMP_SUFFIX)
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            os.utime(path, (now, now))
        except OSError as exc:
            self._metrics.inc("images.store_errors")
            logger.warning("image %s not stored in %s: %s", sha256[:12], self.root, exc)
            with contextlib.suppress(OSError):  # never created (its folder could not be)
                tmp.unlink(missing_ok=True)
            return False
        with self._lock:
            self._index[sha256] = _Entry(fmt, len(data), now)
            self._bytes += len(data)
        self._metrics.inc("images.stored")
        self.sweep(now)
        return True

    def read(self, sha256: str) -> StoredImage | None:
        """The image stored under ``sha256`` (hex), or None (unknown, evicted, not a digest)."""
        if not SHA256_HEX.fullmatch(sha256):
            return None
        with self._lock:
            entry = self._index.get(sha256)
        if entry is None:
            return None
        try:
            return StoredImage(self._path(sha256, entry.format).read_bytes(), entry.format)
        except OSError:
            return None

    def sweep(self, now: float | None = None) -> int:
        """Delete what is beyond the age cap, then the oldest until under the size cap; the number deleted."""
        now = self._clock() if now is None else now
        evicted = 0
        while True:
            with self._lock:
                if not self._index:
                    break
                sha256, entry = next(iter(self._index.items()))
                if now - entry.mtime > self._max_age_s:
                    reason = "age"
                elif self._bytes > self._max_bytes:
                    reason = "size"
                else:
                    break
                del self._index[sha256]
                self._bytes -= entry.size
            self._path(sha256, entry.format).unlink(missing_ok=True)
            self._metrics.inc("images.evicted", reason=reason)
            evicted += 1
        return evicted

    def _touch(self, sha256: str, entry: _Entry, now: float) -> None:
        """The same image again: it is as new as its latest arrival (an alert may point to it now)."""
        with contextlib.suppress(OSError):  # evicted meanwhile; the index below still says when it was last seen
            os.utime(self._path(sha256, entry.format), (now, now))
        with self._lock:
            if sha256 in self._index:
                entry.mtime = now
                self._index.move_to_end(sha256)

    def _path(self, sha256: str, fmt: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.{fmt}"

    def _load(self) -> None:
        """The index from the folder (oldest first); leftovers of an interrupted write are removed."""
        found: list[tuple[float, str, _Entry]] = []
        for path in self.root.glob("??/*"):
            if path.name.endswith(_TMP_SUFFIX):
                path.unlink(missing_ok=True)
                continue
            sha256, _, fmt = path.name.partition(".")
            if not SHA256_HEX.fullmatch(sha256) or fmt not in CONTENT_TYPES:
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            found.append((st.st_mtime, sha256, _Entry(fmt, st.st_size, st.st_mtime)))
        for _, sha256, entry in sorted(found):
            self._index[sha256] = entry
            self._bytes += entry.size
        if found:
            logger.info("image store %s: %d images, %d bytes", self.root, len(found), self._bytes)
