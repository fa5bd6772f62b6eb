"""Single-thread micro-benchmarks of the spool's two sides (no services): ``python benchmarks/spool_micro.py``.

- ingest side, per 2048-sample block: what the ingest thread pays now (encode the block as one binary
  entry, append it in one transaction) against what it paid before the spool became a log of entries
  (format 2048 line-protocol lines, append 2048 rows), the latter rebuilt here with plain SQLite;
- writer side: entry -> line protocol for blocks and for readings (points/s), what the writer process
  spends per point before the HTTP request.

Best of several repetitions (the machine is shared); ratios are the point, not the absolute times.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from agent.records import Reading, SampleBlock, Source  # noqa: E402
from agent.spool.codec import encode_block, encode_readings  # noqa: E402
from agent.spool.sqlite import Spool  # noqa: E402
from agent.storage.entries import entry_lines  # noqa: E402
from agent.storage.points import block_lines  # noqa: E402

T0 = 1_732_575_600_000_000_000


def best_ms(fn: Callable[[], object], repeat: int = 7, number: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best * 1e3


def main() -> None:
    source = Source.of(site="s1", line="l1", machine="m0001", sensor="vibration")
    samples = np.random.default_rng(0).normal(0.0, 0.3, 2048).astype(np.float32)
    block = SampleBlock(source, T0, 10240.0, samples)
    readings = [
        Reading(Source.of(site="s1", line="l1", machine=f"m{i:04d}", sensor="process"), T0, {"t": 61.5, "i": 12.0}, i)
        for i in range(100)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp) / "s.db", max_bytes=1 << 40, max_points=1 << 40)
        entry_ms = best_ms(lambda: spool.append([encode_block(block, store_raw=True)]))
        old = sqlite3.connect(Path(tmp) / "old.db", isolation_level=None)
        old.execute("PRAGMA journal_mode=WAL")
        old.execute("PRAGMA synchronous=NORMAL")
        old.execute(
            "CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, line TEXT NOT NULL, enqueued_ns INTEGER)"
        )

        def old_append() -> None:
            lines = block_lines(block)
            old.execute("BEGIN IMMEDIATE")
            old.executemany("INSERT INTO spool (line, enqueued_ns) VALUES (?, ?)", ((line, T0) for line in lines))
            old.execute("COMMIT")

        old_ms = best_ms(old_append)
        old.close()
        spool.close()
    block_entry = encode_block(block, store_raw=True)
    readings_entry = encode_readings(readings)
    block_write_ms = best_ms(lambda: entry_lines(block_entry.kind, block_entry.body))
    readings_write_ms = best_ms(lambda: entry_lines(readings_entry.kind, readings_entry.body))
    print("ingest thread, one 2048-sample block:")
    print(f"  before: 2048 lines formatted + 2048 rows appended   {old_ms:7.2f} ms")
    print(f"  now:    one binary entry appended                   {entry_ms:7.2f} ms  ({old_ms / entry_ms:.0f}x less)")
    print("writer side, entry -> line protocol:")
    print(f"  block of 2048 samples   {block_write_ms:6.2f} ms = {2048 / block_write_ms * 1e3:10,.0f} points/s")
    print(f"  100 readings (2 fields) {readings_write_ms:6.2f} ms = {100 / readings_write_ms * 1e3:10,.0f} points/s")


if __name__ == "__main__":
    main()
