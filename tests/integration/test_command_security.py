"""Who may command the agent, through a real Mosquitto with passwords and the ACL of docs/security.md.

Issue 22: anyone who could publish on ``pdm/{id}/commands`` silenced any machine for any time under any name;
3,000 silences were accepted, and a silence for a machine never seen created its retained state. Here:
a client the ACL does not allow to write the command topic is refused by the broker; unsigned, wrongly
signed, replayed, unbounded and unknown-machine commands are refused by the agent, each answered on the
result topic with its reason; no retained state appears for the unknown machine.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.alerts.commands import sign_command
from agent.bootstrap import build_agent
from agent.config import parse_config
from agent.decode.encode import encode_block
from pdm_tools.dev import services as devservices
from pdm_tools.simulator.machine import SimulatedMachine, fleet_profile

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
AGENT_ID = "edge-acl"
KEY = b"operator-key-0123456789abcdef"
PASSWORDS = {"pdm-agent": "agent-pw", "operator": "operator-pw", "gateway": "gateway-pw", "auditor": "auditor-pw"}
# The example of docs/security.md, with the agent id filled in (a test checks that the doc carries it).
ACL = """\
# The agent reads the plant's readings and its own command topic, and writes below its base topic.
user pdm-agent
topic read factory/#
topic readwrite pdm/edge-acl/#

# Operators (or the tool that signs their commands) may write commands and read the replies.
user operator
topic write pdm/edge-acl/commands
topic read pdm/edge-acl/commands/result

# Gateways publish readings only.
user gateway
topic write factory/#

# Dashboards and tests read everything the agent publishes.
user auditor
topic read pdm/#
topic readwrite audit/#
"""


class Client:
    """An MQTT 5 client with a user name that records what it receives and the broker's PUBACK codes."""

    def __init__(self, broker: devservices.Service, user: str, topics: tuple[str, ...] = ()) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.pubacks: dict[int, int] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.monotonic_ns()}", protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(user, PASSWORDS[user])
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        for topic in topics:
            self.client.subscribe(topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload, msg.retain))
            self.cond.notify_all()

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode, props: Properties
    ) -> None:
        with self.cond:
            self.pubacks[mid] = reason.value
            self.cond.notify_all()

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish with QoS 1; the broker's PUBACK reason code (0 = accepted, 135 = not authorized)."""
        info = self.client.publish(topic, payload, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.pubacks, 20)
            return self.pubacks[info.mid]

    def wait_for(self, predicate, timeout_s: float = 30.0) -> list[tuple[str, bytes, bool]]:  # type: ignore[no-untyped-def]
        with self.cond:
            self.cond.wait_for(lambda: predicate(self.messages), timeout_s)
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def acl_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    passwords = tmp_path / "passwords"
    passwords.touch()
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True, capture_output=True)
    passwords.chmod(0o600)
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    acl.chmod(0o600)
    service = devservices.start_mosquitto(tmp_path, password_file=passwords, extra_conf=f"acl_file {acl}")
    try:
        yield service
    finally:
        service.stop()


def test_the_acl_example_in_the_docs_is_the_one_tested() -> None:
    doc = (REPO / "docs/security.md").read_text()
    assert ACL.replace("edge-acl", "edge-01") in doc


def test_only_signed_bounded_commands_for_known_machines_from_allowed_clients_are_applied(
    acl_broker: devservices.Service, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "agent": {"id": AGENT_ID, "heartbeat_s": 60},
            "health": {"port": 0},
            "mqtt": {"host": acl_broker.host, "port": acl_broker.port, "username": "pdm-agent",
                     "password": PASSWORDS["pdm-agent"]},
            "storage": {"url": "http://127.0.0.1:9", "v1": {"database": "unused"}},
            "spool": {"path": str(tmp_path / "spool.db")},
            "inference": {"models": [{"path": str(REPO / "models/vibration_anomaly"), "sensors": ["vibration"]}]},
            "alerts": {"commands": {"operators": {"operator": {"key": KEY.decode()}}, "max_silence_s": 3600,
                                    "max_silences_per_machine": 1}},
        }
    )  # fmt: skip
    commands, result = f"pdm/{AGENT_ID}/commands", f"pdm/{AGENT_ID}/commands/result"
    operator = Client(acl_broker, "operator", (result,))
    gateway = Client(acl_broker, "gateway")
    agent = build_agent(config)
    agent.start()
    try:
        assert agent.mqtt.wait_subscribed(20)
        # m01 sends vibration and is scored: a machine the agent knows.
        profile = fleet_profile(0, seed=7)
        machine = SimulatedMachine(profile, [], seed=1)
        t0_ns = time.time_ns() - 60 * 10**9
        step_ns = round(2048 * 1e9 / profile.rate_hz)
        for k in range(8):
            samples = machine.vibration(k * 2048 / profile.rate_hz, 2048).astype(np.float32)
            block = encode_block(samples, profile.rate_hz, ts_ns=t0_ns + k * step_ns)
            assert gateway.publish("factory/s1/l1/m01/vibration", block) == 0
        deadline = time.monotonic() + 30
        while "m01" not in agent.scoring.alerts.engine.machines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "m01" in agent.scoring.alerts.engine.machines

        def signed(body: dict, key: bytes = KEY) -> bytes:  # type: ignore[type-arg]
            return sign_command(body, "operator", key, AGENT_ID)

        silence = {"command": "silence", "machine": "m01", "duration_s": 600}
        # The broker refuses a client the ACL does not allow on the command topic, signature or not.
        assert gateway.publish(commands, signed(silence)) == 135  # not authorized
        valid = signed(silence)
        sent = [
            json.dumps({**silence, "by": "operator"}).encode(),  # unsigned
            signed(silence, key=b"wrong-key-0123456789abcdef"),  # not the operator's key
            signed({**silence, "machine": "ghost"}),  # never seen
            signed({**silence, "duration_s": 7 * 86400}),  # beyond max_silence_s
            valid,
            valid,  # the same message again
            signed({**silence, "sensor": "other"}),  # a second silence of m01, beyond the limit
        ]
        for payload in sent:
            assert operator.publish(commands, payload) == 0
        seen = operator.wait_for(lambda msgs: sum(t == result for t, _, _ in msgs) >= len(sent))
        replies = [json.loads(p) for t, p, _ in seen if t == result]
    finally:
        agent.stop()
        operator.close()
        gateway.close()

    assert [(r["accepted"], r["detail"].split(":")[0]) for r in replies] == [
        (False, "unauthorized"),
        (False, "unauthorized"),
        (False, "unknown_machine"),
        (False, "bad_value"),
        (True, "machine m01 silenced for 600 s (0 open events)"),
        (False, "replay"),
        (False, "too_many_silences"),
    ]
    assert replies[4]["by"] == "operator"
    assert agent.metrics.get("commands.rejected", reason="unauthorized") == 2
    assert agent.metrics.get("commands.accepted", command="silence") == 1

    # Retained state exists for m01 only: the refused silence of "ghost" created none.
    auditor = Client(acl_broker, "auditor", (f"pdm/{AGENT_ID}/state/+", "audit/marker"))
    try:
        auditor.wait_for(lambda msgs: False, 0)  # subscribed in order: retained states come before the marker
        assert auditor.publish("audit/marker", b"{}") == 0
        seen = auditor.wait_for(lambda msgs: any(t == "audit/marker" for t, _, _ in msgs))
    finally:
        auditor.close()
    states = {t.rsplit("/", 1)[1]: json.loads(p) for t, p, retained in seen if "/state/" in t}
    assert set(states) == {"m01"}
    assert [s["by"] for s in states["m01"]["silences"]] == ["operator"]
