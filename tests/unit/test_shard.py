"""Machines sharded across several agents: the ownership rule and the config's refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jsonschema
import pytest

from agent.config import parse_config
from agent.config.errors import ConfigError
from agent.ingest.shard import Shard, ShardFilter, owner
from agent.metrics import Metrics
from agent.records import Decoded, Message, Reading, Source
from agent.topics import Topics

MACHINES = [f"press-{i:04d}" for i in range(4000)]


def test_every_machine_has_exactly_one_owner_and_the_shares_are_even() -> None:
    shards = [Shard(i, 3) for i in range(3)]
    owners = [[s.index for s in shards if s.owns(m)] for m in MACHINES]
    assert all(len(o) == 1 for o in owners)
    share = Counter(o[0] for o in owners)
    assert all(abs(n - len(MACHINES) / 3) < len(MACHINES) * 0.05 for n in share.values()), share


def test_adding_an_agent_moves_only_the_machines_it_takes() -> None:
    before = {m: owner(m, 3) for m in MACHINES}
    after = {m: owner(m, 4) for m in MACHINES}
    moved = [m for m in MACHINES if before[m] != after[m]]
    assert all(after[m] == 3 for m in moved)  # only to the new agent, never between the old ones
    assert len(moved) < len(MACHINES) * 0.3  # about a quarter; hash % count would move about three quarters


def test_one_agent_owns_everything_and_a_wrong_index_is_refused() -> None:
    assert all(Shard(0, 1).owns(m) for m in MACHINES[:10])
    with pytest.raises(ValueError, match=r"not in 0\.\.1"):
        Shard(2, 2)


def test_the_config_refuses_shared_subscriptions_and_an_index_beyond_the_count() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": {"subscriptions": ["factory/#", "$share/pdm/factory/#"]}}, environ={})
    text = str(info.value)
    assert "mqtt.subscriptions: '$share/pdm/factory/#' is a shared subscription" in text
    assert "splits a machine's stream" in text
    with pytest.raises(ConfigError, match=r"mqtt\.shard\.index: must be below count \(2\)"):
        parse_config({"mqtt": {"shard": {"count": 2, "index": 2}}}, environ={})


def test_the_fleet_view_payload_matches_its_schema() -> None:
    path = Path(__file__).resolve().parents[2] / "agent" / "schemas" / "fleet.schema.json"
    validator = jsonschema.Draft202012Validator(json.loads(path.read_text(encoding="utf-8")))
    payload = json.loads(Topics("edge-01").fleet_payload(1, 3, ["m01", "m02"], 1_790_000_000 * 10**9))
    assert validator.is_valid(payload)
    assert not validator.is_valid({**payload, "shard": {"index": -1, "count": 3}})


class _Decoder:
    """A decoder whose message says which machines its readings belong to (comma-separated payload)."""

    def subscriptions(self) -> list[str]:
        return ["factory/#"]

    def decode(self, message: Message) -> list[Decoded]:
        return [
            Reading(Source.of(machine=m, sensor="process"), 1, {"t": 1.0}) for m in message.payload.decode().split(",")
        ]


def _message(machines: list[str]) -> Message:
    return Message(topic="factory/x", payload=",".join(machines).encode(), qos=1, mid=1, received_ns=1)


def test_the_shard_filter_keeps_this_agents_machines_counts_the_rest_and_publishes_the_fleet_view() -> None:
    machines = [f"m{i:02d}" for i in range(12)]
    mine = [m for m in machines if owner(m, 2) == 1]
    assert 0 < len(mine) < len(machines)
    metrics = Metrics()
    topics = Topics("a1", "pdm")
    shard_filter = ShardFilter(_Decoder(), Shard(1, 2), topics, metrics)
    assert shard_filter.subscriptions() == ["factory/#"]
    kept = shard_filter.decode(_message(machines[:6]))
    assert [r.source.machine for r in kept] == [m for m in machines[:6] if m in mine]
    assert metrics.get("ingest.not_owned") == 6 - len(kept)
    first, rejected = shard_filter.outbox(0)
    assert rejected == [] and [p.topic for p in first] == [topics.fleet] and first[0].retain
    shard_filter.decode(_message(machines[6:]))
    assert shard_filter.outbox(0) == ([], [])  # changed, but within FLEET_INTERVAL_S of the last view
    (last,), _ = shard_filter.outbox(0, final=True)  # at stop: what is pending goes out
    assert json.loads(last.payload)["machines"] == mine
    assert shard_filter.outbox(0, final=True) == ([], [])  # nothing changed since
