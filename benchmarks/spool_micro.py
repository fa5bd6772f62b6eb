"""Micro-benchmarks behind the spool fixes proposed in docs/benchmarks.md (single thread, no services).

``python benchmarks/spool_micro.py`` prints, for one stored vibration block (2048 samples) and one
writer batch (5000 lines), the time the spool lock is held by each variant, side by side:

- ``Spool.ack`` as shipped (one ``DELETE ... WHERE id = ?`` per line) vs one range ``DELETE``;
- ``Spool.append`` of a block as 2048 rows (as shipped) vs as one row holding the 2048 lines joined
  with newlines (what the writer would send as is);
- ``block_lines`` (formatting the 2048 line-protocol lines) for comparison.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from agent.records import SampleBlock, Source  # noqa: E402
from agent.spool.sqlite import Spool  # noqa: E402
from agent.storage.points import block_lines  # noqa: E402


def best_ms(fn: Callable[[], object], repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    source = Source(tags=(("site", "bench"), ("line", "l0"), ("machine", "m0001"), ("sensor", "vibration")))
    samples = np.random.default_rng(0).standard_normal(2048).astype(np.float32)
    block = SampleBlock(source=source, start_ns=1_700_000_000 * 10**9, rate_hz=10240.0, samples=samples)
    lines = block_lines(block)
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp) / "s.db", max_rows=50_000_000)
        rows_ms = best_ms(lambda: spool.append(lines))
        joined = "\n".join(lines)
        one_row_ms = best_ms(lambda: spool.append([joined]))
        for _ in range(20):
            spool.append(lines)

        def ack_shipped() -> None:
            spool.ack([i for i, _ in spool.peek(5000)])

        def ack_range() -> None:
            ids = [i for i, _ in spool.peek(5000)]
            with spool._lock, spool._transaction() as conn:  # what the proposed Spool.ack does
                conn.execute("DELETE FROM spool WHERE id BETWEEN ? AND ?", (ids[0], ids[-1]))
            spool._depth -= len(ids)

        peek_ms = best_ms(lambda: spool.peek(5000))
        shipped_ms = best_ms(ack_shipped, 5) - peek_ms
        range_ms = best_ms(ack_range, 5) - peek_ms
        spool.close()
    format_ms = best_ms(lambda: block_lines(block))
    print(f"block_lines (2048 lines):                 {format_ms:7.2f} ms")
    print(f"Spool.append, 2048 rows (shipped):        {rows_ms:7.2f} ms")
    print(f"Spool.append, 1 row of 2048 lines:        {one_row_ms:7.2f} ms  ({rows_ms / one_row_ms:.0f}x less)")
    print(f"Spool.peek(5000):                         {peek_ms:7.2f} ms")
    print(f"Spool.ack(5000), DELETE per id (shipped): {shipped_ms:7.2f} ms")
    print(f"Spool.ack(5000), one range DELETE:        {range_ms:7.2f} ms  ({shipped_ms / range_ms:.0f}x less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
