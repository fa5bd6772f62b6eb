"""Who may command the agent (``agent.alerts.commands``): signed commands, bound ``by``, allow-lists, replays.

Issue 22: anyone who could publish on the command topic silenced any machine, under any name.
"""

from __future__ import annotations

import json

import pytest

from agent.alerts.commands import CommandAuth, Operator, sign_command, signature
from agent.alerts.engine import CommandError
from agent.config import ConfigError, parse_config
from agent.records import NS_PER_S

KEY = b"k" * 32
T0_S = 1_790_000_000
NOW = T0_S * NS_PER_S
SILENCE = {"command": "silence", "machine": "m01", "duration_s": 60}


def auth(**kwargs: object) -> CommandAuth:
    operators = {"maria": Operator(KEY), "viewer": Operator(b"v" * 32, frozenset({"ack"}))}
    return CommandAuth("edge-01", operators, started_ns=NOW - 10 * NS_PER_S, **kwargs)  # type: ignore[arg-type]


def signed(command: dict[str, object] = SILENCE, key_id: str = "maria", key: bytes = KEY, **kwargs: object) -> bytes:
    return sign_command(command, key_id, key, kwargs.pop("agent_id", "edge-01"), ts=T0_S, **kwargs)  # type: ignore[arg-type]


def refused(a: CommandAuth, payload: bytes, now_ns: int = NOW) -> CommandError:
    with pytest.raises(CommandError) as info:
        a.open(payload, now_ns)
    return info.value


def test_a_signed_command_is_opened_with_by_bound_to_the_key_id() -> None:
    body = auth().open(signed(), NOW)
    assert body["command"] == "silence" and body["by"] == "maria"


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        (json.dumps({**SILENCE, "by": "maria"}).encode(), "unauthorized", "commands must be signed"),
        (signed(key=b"x" * 32), "unauthorized", "does not match"),
        (signed(key_id="mallory"), "unauthorized", "unknown key id 'mallory'"),
        (signed({**SILENCE, "by": "boss"}), "unauthorized", "is not the signing key id"),
        (signed(agent_id="edge-02"), "unauthorized", "for agent 'edge-02'"),
        (signed(SILENCE, "viewer", b"v" * 32), "forbidden", "may not give the command 'silence'"),
        (signed(nonce="short"), "bad_value", "nonce"),
        (b"{not json", "bad_json", "not JSON"),
        (b'{"v":1,"key_id":"maria","cmd":"{}","sig":"00","extra":1}', "bad_command", "extra"),
    ],
)
def test_commands_that_are_not_properly_signed_are_refused_with_a_reason(
    payload: bytes, code: str, fragment: str
) -> None:
    error = refused(auth(), payload)
    assert (error.code, fragment in error.detail) == (code, True), error.detail


def test_a_tampered_command_does_not_match_its_signature() -> None:
    envelope = json.loads(signed())
    envelope["cmd"] = envelope["cmd"].replace('"duration_s":60', '"duration_s":604800')
    assert refused(auth(), json.dumps(envelope).encode()).code == "unauthorized"


def test_replays_are_refused_reused_nonce_old_signature_or_signed_before_the_start() -> None:
    a = auth(max_clock_skew_s=300)
    payload = signed(nonce="nonce-0001")
    a.open(payload, NOW)
    assert "already used" in refused(a, payload).detail
    assert refused(a, signed(nonce="nonce-0002"), NOW + 301 * NS_PER_S).code == "replay"
    late = CommandAuth("edge-01", {"maria": Operator(KEY)}, started_ns=NOW + NS_PER_S)
    assert "before this agent started" in refused(late, signed(nonce="nonce-0003")).detail


def test_the_nonces_remembered_are_bounded() -> None:
    a = auth(max_nonces=2)
    a.open(signed(nonce="nonce-0001"), NOW)
    a.open(signed(nonce="nonce-0002"), NOW)
    assert refused(a, signed(nonce="nonce-0003")).code == "rate_limited"


def test_without_operator_keys_every_command_is_refused_and_auth_none_trusts_the_broker() -> None:
    assert "no operator keys" in refused(CommandAuth("edge-01", {}), signed()).detail
    body = CommandAuth("edge-01", {}, mode="none").open(json.dumps({**SILENCE, "by": "x"}).encode(), NOW)
    assert body["by"] == "x"


def test_the_signature_is_hmac_sha256_over_the_cmd_text_as_openssl_computes_it() -> None:
    # printf '%s' '{"command":"ack"}' | openssl dgst -sha256 -hmac 0123456789abcdef
    assert signature(b"0123456789abcdef", '{"command":"ack"}').startswith("ff318be35dfcec488e73bb4")


def test_operator_keys_come_from_files_are_checked_and_never_shown(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key_file = tmp_path / "maria.key"
    key_file.write_text("0123456789abcdef0123\n")
    config = parse_config({"alerts": {"commands": {"operators": {"maria": {"key_file": str(key_file)}}}}})
    assert config.alerts.commands.operators["maria"].key == "0123456789abcdef0123"
    assert "0123456789abcdef0123" not in repr(config)
    a = config.alerts.commands.command_auth("edge-01", NOW)
    assert "0123456789abcdef" not in repr(a)
    for bad in ("short-key", 1234567, True):
        with pytest.raises(ConfigError) as info:
            parse_config({"alerts": {"commands": {"operators": {"maria": {"key": bad}}}}}, environ={})
        assert info.value.path == "alerts.commands.operators.maria.key"
        assert str(bad) not in str(info.value) and "1234567" not in str(info.value)
