"""One agent against two sharing the plant (``mqtt.shard``), same workload, same run: throughput and loss.

Each agent is its own process (``pdm-agent run``), as on a real box. A publisher sends ``--messages``
JSON readings of ``--machines`` machines (QoS 1) into the agents' persistent sessions while they are stopped;
they then drain the backlog, timed from the first reading in InfluxDB to the last (or until nothing more
arrives for ``--stall-s``). Loss = published minus stored. Rounds alternate 1 agent, 2 agents by hash
(``mqtt.shard``), 2 agents by static filters (one line each), so that the box's other load hits all alike::

    .venv/bin/python benchmarks/scale_out.py --messages 30000 --rounds 2

Numbers: docs/scale_out.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

from agent.storage.influx_v1 import InfluxV1Sink
from pdm_tools.dev import services

REPO = Path(__file__).resolve().parents[1]
BROKER_CONF = "max_queued_messages 1000000\nmax_inflight_messages 1000\n"


def agent_config(
    work: Path, name: str, index: int, count: int, mode: str, mqtt_port: int, influx: str, db: str
) -> Path:
    by_filter = mode == "filters" and count > 1
    data = {
        "agent": {"id": f"{name}-{index}", "heartbeat_s": 60, "log_level": "WARNING"},
        "health": {"port": 0},
        "mqtt": {
            "host": "127.0.0.1",
            "port": mqtt_port,
            "subscriptions": [f"factory/{name}/l{index}/+/+" if by_filter else f"factory/{name}/+/+/+"],
            "shard": {"count": 1, "index": 0} if by_filter else {"count": count, "index": index},
        },
        "storage": {"url": influx, "v1": {"database": db}, "flush_interval_s": 0.2},
        "spool": {"path": str(work / f"{name}-{index}" / "spool.db")},
        "inference": {"models": []},
    }
    path = work / f"{name}-{index}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_online(port: int, agent_ids: list[str], timeout_s: float = 60) -> None:
    online: set[str] = set()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{time.monotonic_ns()}")

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        if json.loads(msg.payload).get("state") == "online":
            online.add(msg.topic.split("/")[1])

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    for agent_id in agent_ids:
        client.subscribe(f"pdm/{agent_id}/status", qos=1)
    client.loop_start()
    deadline = time.monotonic() + timeout_s
    while set(agent_ids) - online and time.monotonic() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    if set(agent_ids) - online:
        raise SystemExit(f"agents not online: {sorted(set(agent_ids) - online)}")
    time.sleep(1.0)  # online is published right after the subscription request; let the SUBACK land


def run_round(
    work: Path, broker: services.Service, influx: services.Service, count: int, mode: str, args: argparse.Namespace
) -> dict:
    """Agents subscribe once (persistent sessions) and stop; the broker queues the whole workload; the agents
    start again and drain it: the time from the first stored reading to the last is the agents' alone (the
    publisher, a single Python process, is slower than two agents and would be measured otherwise)."""
    name = f"r{time.monotonic_ns() % 10**9}"
    db = f"scale_{name}"
    ids = [f"{name}-{i}" for i in range(count)]
    configs = [agent_config(work, name, i, count, mode, broker.port, influx.url, db) for i in range(count)]

    def start() -> list[subprocess.Popen[bytes]]:
        return [
            subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(c)], cwd=REPO, stderr=subprocess.DEVNULL)
            for c in configs
        ]

    def stop(procs: list[subprocess.Popen[bytes]]) -> None:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(120)

    procs = start()
    try:
        wait_online(broker.port, ids)
    finally:
        stop(procs)
    payloads = [
        (
            f"factory/{name}/l{k % args.machines % 2}/m{k % args.machines:03d}/process",
            json.dumps({"ts_ns": 1_790_000_000 * 10**9 + k * 1000, "fields": {"t": 20.0, "p": 1.5}}).encode(),
        )
        for k in range(args.messages)
    ]
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{name}", protocol=mqtt.MQTTv311)
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    info = None
    for topic, payload in payloads:
        info = pub.publish(topic, payload, qos=1)
    assert info is not None
    info.wait_for_publish(300)
    pub.loop_stop()
    pub.disconnect()

    sink = InfluxV1Sink(influx.url, db)
    procs = start()
    try:
        stored, first_at, last_change = 0, None, time.perf_counter()
        while stored < args.messages and time.perf_counter() - last_change < args.stall_s:
            time.sleep(0.1)
            try:
                rows = sink.query('SELECT count("t") FROM "reading"')
            except Exception:  # the database is created by the first agent that connects
                continue
            now = int(rows[0]["values"][0][1]) if rows else 0
            if now != stored:
                stored, last_change = now, time.perf_counter()
                if first_at is None:
                    first_at = last_change
        elapsed = last_change - (first_at or last_change)
    finally:
        stop(procs)
    return {
        "agents": count,
        "split": mode if count > 1 else "-",
        "messages": args.messages,
        "stored": stored,
        "lost": args.messages - stored,
        "drain_s": round(elapsed, 2),
        "msg_per_s": round(stored / elapsed) if elapsed else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--machines", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stall-s", type=float, default=15.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = services.start_mosquitto(work / "mosquitto", extra_conf=BROKER_CONF)
        influx = services.start_influxdb_v1(work / "influx")
        try:
            for _ in range(args.rounds):
                for count, mode in ((1, "hash"), (2, "hash"), (2, "filters")):
                    print(json.dumps(run_round(work, broker, influx, count, mode, args)), flush=True)
        finally:
            broker.stop()
            influx.stop()


if __name__ == "__main__":
    main()
