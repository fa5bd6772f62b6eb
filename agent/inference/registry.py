"""The model registry: models found through their manifests in a directory, and hot-swapped when it changes.

Layout: every subdirectory of ``inference.models_dir`` that holds a ``manifest.json`` is one version of
one model (``model_id`` and ``version`` come from the manifest, not from the directory name), e.g.
``models/vibration_anomaly/`` (1.0.0) beside ``models/vibration_anomaly-1.1.0/``. Names starting with
``.`` are ignored, so a version can be staged in ``models/.incoming/`` and renamed into place.

Which version runs (per model id the config names):

- the highest version by semantic-version precedence (semver.org: ``MAJOR.MINOR.PATCH``, a
  pre-release such as ``1.1.0-rc.1`` ranks below ``1.1.0``, build metadata ``+...`` is ignored) among
  the directories that verify: manifest of the right task, sha256 of the ONNX file, feature spec and its
  hash against today's feature code, session and graph shapes, warm-up;
- once a version runs, the registry never moves below it while its directory is still there; to roll
  back, delete (or move away) the directory of the newer version: the highest remaining version that
  verifies takes over. If every directory of a running model disappears, the loaded model keeps running;
- a version whose window geometry (kind, channels, window and hop length of its feature spec) differs
  from the running one is refused (reason ``geometry``): windows already cut and queued would not fit
  it. Such a version needs an agent restart, which picks it like any other;
- two directories with the same model id and version: the one already running (else the first by
  directory name) is used, the other is refused (reason ``duplicate``).

A refused directory is logged once (``ModelError`` with its path and reason), counted in
``models.refused{reason=...}`` (reasons: ``agent.inference.errors.REASONS``), and not tried again until
one of its files changes (size, mtime, or the manifest's sha256); the running version keeps running.
A new version is loaded, verified and warmed up on the watcher thread, never on the scoring thread, and
then put into the ``ModelSlot`` of its model id in one reference assignment (``agent.inference.router``):
each window is scored by either the old or the new version, exactly once. ``models.loaded{model,version}``
is 1 for the running version of each model id (0 for the versions it replaced); every swap is logged.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.inference.errors import ModelError
from agent.inference.kinds import MODEL_KINDS, ModelClass
from agent.inference.manifest import MANIFEST_FILE, Manifest
from agent.inference.router import ModelSlot
from agent.metrics import Metrics

logger = logging.getLogger(__name__)

Builder = Callable[[Manifest, Path], Any]
"""Builds a loaded, verified, warmed-up model from its (already verified) manifest and directory."""

_SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)
_GEOMETRY = ("kind", "channels", "window_samples", "hop_samples")

VersionKey = tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]


def version_key(version: str) -> VersionKey:
    """Sort key of a semantic version (semver.org precedence); ``ValueError`` if it is not one.

    >>> sorted(["1.10.0", "1.2.0", "1.2.0-rc.1", "1.2.0-alpha", "0.9.9"], key=version_key)
    ['0.9.9', '1.2.0-alpha', '1.2.0-rc.1', '1.2.0', '1.10.0']
    >>> version_key("1.0.0+build.7") == version_key("1.0.0")
    True
    """
    match = _SEMVER.fullmatch(version)
    if match is None:
        raise ValueError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH[-pre-release][+build])")
    major, minor, patch, pre = match.groups()
    if pre is None:
        return int(major), int(minor), int(patch), 1, ()
    # Numeric identifiers rank below alphanumeric ones and compare as numbers.
    ids = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return int(major), int(minor), int(patch), 0, ids


def default_builders(threads: int) -> dict[str, Builder]:
    """A builder per model kind of ``agent.inference.kinds`` (the manifest's ``task``)."""

    def builder(cls: ModelClass) -> Builder:
        return lambda manifest, path: cls(manifest, path, threads)

    return {kind: builder(cls) for kind, cls in MODEL_KINDS.items()}


Fingerprint = tuple[tuple[tuple[str, int, int], ...], str]


def fingerprint(model_dir: Path) -> Fingerprint | None:
    """(name, size, mtime_ns) of the directory's files plus the manifest's sha256; ``None`` without a manifest."""
    try:
        manifest_bytes = (model_dir / MANIFEST_FILE).read_bytes()
        files = tuple(
            (p.name, st.st_size, st.st_mtime_ns)
            for p in sorted(model_dir.iterdir())
            if p.is_file()
            for st in [p.stat()]
        )
    except OSError:  # no manifest (not a model directory, or not yet complete) or removed while scanning
        return None
    return files, hashlib.sha256(manifest_bytes).hexdigest()


@dataclass(frozen=True)
class Found:
    """One model directory as last scanned: its manifest, or why it cannot be used."""

    path: Path
    fingerprint: Fingerprint
    manifest: Manifest | None
    key: VersionKey | None
    error: ModelError | None = None


@dataclass
class _Tracked:
    model_id: str
    task: str
    slot: ModelSlot[Any] | None = None
    path: Path | None = None
    fingerprint: Fingerprint | None = None
    version: str = ""
    key: VersionKey | None = None
    orphan_logged: bool = False


class ModelRegistry:
    """Versions of models in one directory; loads the best of each tracked model id and swaps it in.

    ``track`` is called by the composition root before the agent starts (it loads the model, or raises
    ``ModelError``). ``refresh`` rescans the directory; the watcher thread (``start``/``stop``) calls it
    every ``interval_s``. Both are safe to call from any thread (one refresh at a time).
    """

    def __init__(self, models_dir: Path, metrics: Metrics, builders: Mapping[str, Builder] | None = None) -> None:
        self._dir = Path(models_dir)
        self._metrics = metrics
        self._builders = dict(builders) if builders is not None else default_builders(1)
        self._tracked: dict[str, _Tracked] = {}
        self._found: dict[Path, Found] = {}
        self._refused: dict[Path, tuple[Fingerprint, ModelError]] = {}
        self._unlistable = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def models_dir(self) -> Path:
        return self._dir

    def track(self, model_id: str, task: str) -> ModelSlot[Any]:
        """Load the best version of ``model_id`` now and return the slot the registry will keep current.

        Raises ``ModelError`` when no directory holds a usable version of it (the message lists what was
        found and why each candidate was refused).
        """
        if task not in self._builders:
            raise ValueError(f"no model class for task {task!r} (known: {sorted(self._builders)})")
        with self._lock:
            tracked = self._tracked.get(model_id)
            if tracked is None:
                tracked = self._tracked[model_id] = _Tracked(model_id, task)
                self._scan()
                self._update(tracked)
            if tracked.task != task:
                raise ModelError(f"model {model_id!r} is used both as {tracked.task!r} and as {task!r}", "task")
            if tracked.slot is None:
                del self._tracked[model_id]
                raise ModelError(self._none_usable(model_id), reason=self._none_usable_reason(model_id))
            return tracked.slot

    def refresh(self) -> None:
        """Rescan the directory and swap in the best version of every tracked model id (watcher thread)."""
        with self._lock:
            if not self._tracked:
                return
            self._scan()
            for tracked in self._tracked.values():
                self._update(tracked)

    def active(self) -> dict[str, tuple[str, Path]]:
        """Running version and directory per tracked model id."""
        with self._lock:
            return {t.model_id: (t.version, t.path) for t in self._tracked.values() if t.path is not None}

    def refused(self) -> dict[Path, ModelError]:
        """Directories refused since their files last changed, with the error."""
        with self._lock:
            return {path: err for path, (_, err) in self._refused.items()}

    def start(self, interval_s: float) -> None:
        """Start the watcher thread: ``refresh`` every ``interval_s`` seconds until ``stop``."""
        if interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, args=(interval_s,), name="model-registry", daemon=True)
        self._thread.start()
        logger.info("watching %s for new model versions every %.3g s", self._dir, interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the watcher thread (a load in progress finishes first, within ``timeout_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.refresh()
            except Exception:
                # A bug here must not stop the agent; the running models keep running.
                self._metrics.inc("models.reload_errors")
                logger.exception("model registry: rescanning %s failed", self._dir)

    # ------------------------------------------------------------------------------------------ scanning

    def _scan(self) -> None:
        try:
            dirs = sorted(p for p in self._dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError as exc:
            if not self._unlistable:  # once, not at every rescan; the running models keep running
                self._unlistable = True
                logger.warning("model registry: cannot list %s: %s", self._dir, exc.strerror or exc)
            return
        self._unlistable = False
        found: dict[Path, Found] = {}
        for path in dirs:
            fp = fingerprint(path)
            if fp is None:
                continue
            previous = self._found.get(path)
            found[path] = previous if previous is not None and previous.fingerprint == fp else self._read(path, fp)
        self._found = found
        self._refused = {p: r for p, r in self._refused.items() if p in found and found[p].fingerprint == r[0]}

    def _read(self, path: Path, fp: Fingerprint) -> Found:
        """Parse a new or changed directory's manifest (no hashing of the model file yet)."""
        try:
            manifest = Manifest.read(path)
            try:
                key = version_key(manifest.version)
            except ValueError as exc:
                raise ModelError(f"{path / MANIFEST_FILE}: version {exc}", reason="version") from None
        except ModelError as exc:
            self._refuse(path, fp, exc)
            return Found(path, fp, None, None, exc)
        return Found(path, fp, manifest, key)

    def _refuse(self, path: Path, fp: Fingerprint, exc: ModelError) -> None:
        self._refused[path] = (fp, exc)
        self._metrics.inc("models.refused", reason=exc.reason)
        logger.error("model directory %s refused (%s): %s", path, exc.reason, exc)

    # ------------------------------------------------------------------------------------------ choosing

    def _update(self, tracked: _Tracked) -> None:
        candidates = [
            f
            for f in self._found.values()
            if f.manifest is not None and f.manifest.model_id == tracked.model_id and f.path not in self._refused
        ]
        running_dir_present = tracked.path is not None and tracked.path in self._found
        if tracked.key is not None and running_dir_present:
            candidates = [f for f in candidates if f.key is not None and f.key >= tracked.key]
        if tracked.slot is not None and not running_dir_present and not candidates:
            if not tracked.orphan_logged:
                tracked.orphan_logged = True
                logger.warning(
                    "model %s: no directory in %s holds it any more; version %s keeps running",
                    tracked.model_id,
                    self._dir,
                    tracked.version,
                )
            return
        # Highest version first; among equal versions the running directory, then by directory name.
        candidates.sort(key=lambda f: (f.path != tracked.path, f.path.name))
        candidates.sort(key=lambda f: f.key or (), reverse=True)
        for found in candidates:
            if found.path == tracked.path and found.fingerprint == tracked.fingerprint:
                break  # the best usable version is the one running
            try:
                model = self._load(tracked, found)
            except ModelError as exc:
                self._refuse(found.path, found.fingerprint, exc)
                continue
            self._swap(tracked, found, model)
            break
        else:
            return
        for other in candidates:
            if other.key == found.key and other.path != found.path and other.path not in self._refused:
                assert other.manifest is not None
                self._refuse(
                    other.path,
                    other.fingerprint,
                    ModelError(
                        f"{other.path}: model {tracked.model_id!r} version {other.manifest.version} is also in "
                        f"{found.path}, which is used; remove one of them",
                        reason="duplicate",
                    ),
                )

    def _load(self, tracked: _Tracked, found: Found) -> Any:
        """Verify and build one candidate, fully, on the calling thread (never the scoring thread)."""
        manifest = found.manifest
        assert manifest is not None
        if manifest.task != tracked.task:
            raise ModelError(
                f"{found.path / MANIFEST_FILE}: model {tracked.model_id!r} is a {manifest.task!r} model here, "
                f"the agent uses it as {tracked.task!r}",
                reason="task",
            )
        manifest.verify(found.path)
        model = self._builders[tracked.task](manifest, found.path)
        if tracked.slot is not None:
            old, new = _geometry(tracked.slot.model.spec), _geometry(model.spec)
            if old != new:
                raise ModelError(
                    f"{found.path}: version {manifest.version} of {tracked.model_id!r} windows differently "
                    f"({_describe(new)}) than the running version {tracked.version} ({_describe(old)}); "
                    "a new window geometry is taken at the next agent start",
                    reason="geometry",
                )
        return model

    def _swap(self, tracked: _Tracked, found: Found, model: Any) -> None:
        assert found.manifest is not None
        old_version, old_path = tracked.version, tracked.path
        if tracked.slot is None:
            tracked.slot = ModelSlot(model)
        else:
            tracked.slot.model = model  # the swap: one reference assignment, readers see old or new
        tracked.path, tracked.fingerprint = found.path, found.fingerprint
        tracked.version, tracked.key = found.manifest.version, found.key
        tracked.orphan_logged = False
        if old_path is None:
            logger.info("model %s: version %s from %s", tracked.model_id, tracked.version, found.path)
        else:
            if old_version != tracked.version:
                self._metrics.set("models.loaded", 0, model=tracked.model_id, version=old_version)
            self._metrics.inc("models.swaps", model=tracked.model_id)
            logger.info(
                "model %s: version %s from %s replaces version %s from %s",
                tracked.model_id,
                tracked.version,
                found.path,
                old_version,
                old_path,
            )
        self._metrics.set("models.loaded", 1, model=tracked.model_id, version=tracked.version)

    def _none_usable(self, model_id: str) -> str:
        refused = [
            f"{path}: {err}"
            for path, (_, err) in sorted(self._refused.items())
            if (f := self._found.get(path)) is None or f.manifest is None or f.manifest.model_id == model_id
        ]
        if refused:
            return f"no usable version of model {model_id!r} in {self._dir}: " + "; ".join(refused)
        ids = sorted({f.manifest.model_id for f in self._found.values() if f.manifest is not None})
        return f"no model {model_id!r} in {self._dir} (found: {', '.join(ids) or 'no model directories'})"

    def _none_usable_reason(self, model_id: str) -> str:
        reasons = [
            err.reason
            for path, (_, err) in self._refused.items()
            if (f := self._found.get(path)) is not None and f.manifest is not None and f.manifest.model_id == model_id
        ]
        return reasons[0] if reasons else "file"


def _geometry(spec: object) -> tuple[object, ...]:
    return tuple(getattr(spec, name, None) for name in _GEOMETRY)


def _describe(geometry: Sequence[object]) -> str:
    return ", ".join(f"{name} {value}" for name, value in zip(_GEOMETRY, geometry, strict=True) if value is not None)
