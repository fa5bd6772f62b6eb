"""The topic filters the agent's persistent MQTT session holds, remembered across restarts.

A persistent session keeps its subscriptions. After a restart with a changed ``mqtt.subscriptions``, a
filter that is no longer configured would stay in the session, and the broker delivers a message once per
matching filter (Mosquitto does): with an old ``factory/#`` and a new ``factory/+/+/+/+``, every reading
would be processed twice. The client cannot ask the broker which filters its session has, so it
remembers what it subscribed in a small JSON file (atomic writes, ``agent.statefile``) and, on a connect
that resumes the session, unsubscribes the remembered filters that are no longer configured
(``agent.ingest.mqtt.MqttConnection``).

The file names the broker and the client id: remembered filters of another session are not this one's.
An unreadable file is logged and treated as empty (nothing is unsubscribed; the next subscription
rewrites it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from agent.statefile import write_atomically

logger = logging.getLogger(__name__)

VERSION = 1


class RememberedFilters:
    """The filters subscribed in one session (``session``: broker and client id), kept in ``path``.

    Used from paho's network thread only (``MqttConnection`` callbacks); ``save`` raises ``OSError``.
    """

    def __init__(self, path: Path, session: str) -> None:
        self.path = path
        self.session = session

    def load(self) -> frozenset[str]:
        """The filters remembered for this session; empty when none (or the file is unreadable: logged)."""
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return frozenset()
        except (OSError, ValueError) as exc:
            logger.warning("cannot read the remembered MQTT subscriptions %s (%s); taking them as none", self.path, exc)
            return frozenset()
        filters = doc.get("filters") if isinstance(doc, dict) else None
        if not isinstance(filters, list) or not all(isinstance(f, str) and f for f in filters):
            logger.warning("remembered MQTT subscriptions %s are malformed; treating them as none", self.path)
            return frozenset()
        if doc.get("v") != VERSION or doc.get("session") != self.session:
            return frozenset()  # another broker or client id: that session's filters are not in ours
        return frozenset(filters)

    def save(self, filters: frozenset[str]) -> None:
        """Replace the remembered filters (atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"v": VERSION, "session": self.session, "filters": sorted(filters)}
        write_atomically(self.path, json.dumps(doc, indent=1).encode())
