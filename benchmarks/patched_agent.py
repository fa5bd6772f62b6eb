"""The agent with the spool fix proposed in docs/benchmarks.md applied in memory (experiments only).

``python benchmarks/patched_agent.py run --config FILE`` behaves like ``python -m agent run``, except
that ``Spool.ack`` deletes a contiguous run of ids with one range ``DELETE`` instead of one ``DELETE``
per id. The benchmark uses it to measure the gain of the fix side by side with the shipped code; the
agent's own file is not changed here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.spool.sqlite import Spool  # noqa: E402

_original_ack = Spool.ack


def _range_ack(self: Spool, ids: Sequence[int]) -> None:
    """Like ``Spool.ack``; a contiguous, ascending run of ids (what the writer peeks) is one range delete."""
    if not ids or ids[-1] - ids[0] + 1 != len(ids):
        _original_ack(self, ids)
        return
    with self._lock:
        with self._transaction() as conn:
            deleted = conn.execute("DELETE FROM spool WHERE id BETWEEN ? AND ?", (ids[0], ids[-1])).rowcount
        self._depth -= deleted
        depth = self._depth
    self._metrics.inc("spool.acked", deleted)
    self._metrics.set("spool.depth", depth)


Spool.ack = _range_ack  # type: ignore[method-assign]

if __name__ == "__main__":
    from agent.cli import main

    sys.exit(main())
