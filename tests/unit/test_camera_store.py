"""``agent.images.store``: content-addressed, capped in bytes and age, evictions counted, rebuilt at start."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.images.store import ImageStore
from agent.metrics import Metrics


class Clock:
    def __init__(self, t: float = 1_790_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _image(i: int, size: int = 1000) -> tuple[str, bytes]:
    data = bytes([i % 256]) * size
    return hashlib.sha256(data).hexdigest(), data


def _store(
    root: Path, max_bytes: int = 10_000, max_age_s: float = 3600.0, clock: Clock | None = None
) -> tuple[ImageStore, Metrics]:
    metrics = Metrics()
    return ImageStore(root, max_bytes, max_age_s, metrics, clock or Clock()), metrics


def test_an_image_is_stored_once_by_its_sha256_and_read_back(tmp_path: Path) -> None:
    store, metrics = _store(tmp_path)
    sha, data = _image(1)
    assert store.put(sha, "png", data)
    assert store.put(sha, "png", data)  # the same bytes again: one file
    assert len(store) == 1 and store.size_bytes == len(data)
    assert metrics.get("images.stored") == 1
    got = store.read(sha)
    assert got is not None and got.data == data and got.content_type == "image/png"
    assert (tmp_path / sha[:2] / f"{sha}.png").read_bytes() == data


def test_read_refuses_what_is_not_a_digest(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    assert store.read("../../etc/passwd") is None
    assert store.read("A" * 64) is None
    assert store.read("0" * 64) is None


def test_the_oldest_images_are_evicted_beyond_the_byte_cap_and_counted(tmp_path: Path) -> None:
    clock = Clock()
    store, metrics = _store(tmp_path, max_bytes=3500, clock=clock)
    shas = []
    for i in range(5):
        clock.t += 1
        sha, data = _image(i)
        store.put(sha, "jpeg", data)
        shas.append(sha)
    assert store.size_bytes <= 3500 and len(store) == 3
    assert [sha in store for sha in shas] == [False, False, True, True, True]
    assert metrics.get("images.evicted", reason="size") == 2
    assert not (tmp_path / shas[0][:2] / f"{shas[0]}.jpeg").exists()


def test_images_older_than_the_age_cap_are_evicted(tmp_path: Path) -> None:
    clock = Clock()
    store, metrics = _store(tmp_path, max_age_s=100, clock=clock)
    old_sha, old = _image(1)
    store.put(old_sha, "png", old)
    clock.t += 60
    new_sha, new = _image(2)
    store.put(new_sha, "png", new)
    clock.t += 50
    assert store.sweep() == 1
    assert old_sha not in store and new_sha in store
    assert metrics.get("images.evicted", reason="age") == 1


def test_a_repeated_image_becomes_the_newest(tmp_path: Path) -> None:
    clock = Clock()
    store, _ = _store(tmp_path, max_bytes=2500, clock=clock)
    a, b, c = _image(1), _image(2), _image(3)
    for sha, data in (a, b, a, c):
        clock.t += 1
        store.put(sha, "png", data)
    assert a[0] in store and b[0] not in store and c[0] in store


def test_an_image_larger_than_the_whole_store_is_refused(tmp_path: Path) -> None:
    store, _ = _store(tmp_path, max_bytes=500)
    sha, data = _image(1)
    assert not store.put(sha, "png", data)
    assert len(store) == 0 and store.read(sha) is None


def test_a_write_failure_is_counted_not_raised(tmp_path: Path) -> None:
    store, metrics = _store(tmp_path)
    sha, data = _image(1)
    blocker = tmp_path / sha[:2]
    blocker.write_bytes(b"a file where the folder should be")
    assert not store.put(sha, "png", data)
    assert metrics.get("images.store_errors") == 1 and len(store) == 0


def test_the_index_is_rebuilt_from_the_folder_at_start(tmp_path: Path) -> None:
    clock = Clock()
    store, _ = _store(tmp_path, clock=clock)
    kept = []
    for i in range(3):
        clock.t += 1
        sha, data = _image(i)
        store.put(sha, "bmp", data)
        kept.append(sha)
    (tmp_path / kept[0][:2] / "leftover.png.tmp").write_bytes(b"x")
    again, metrics = _store(tmp_path, max_bytes=2000, clock=clock)
    assert len(again) == 2 and kept[0] not in again  # the oldest evicted by the smaller cap
    assert metrics.get("images.store_files") == 2
    assert not (tmp_path / kept[0][:2] / "leftover.png.tmp").exists()


def test_put_refuses_a_name_that_is_no_digest(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    with pytest.raises(ValueError):
        store.put("../x", "png", b"1")
