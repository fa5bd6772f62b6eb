"""Who may command the agent: operator commands signed with a per-operator key (HMAC-SHA256).

Anyone who may publish on ``{base}/commands`` could otherwise silence any machine with any ``by`` name
(issue 22). With ``alerts.commands.auth: hmac`` (the default) a command is an envelope::

    {"v": 1, "key_id": "maria", "cmd": "<the command as JSON text>", "sig": "<hex HMAC-SHA256 of cmd>"}

``sig`` is computed over the exact UTF-8 bytes of ``cmd`` (no canonical JSON needed: ``openssl dgst -sha256
-hmac`` in a shell does it, see ``docs/security.md``) with the operator's key. The command inside names the
agent it is for (``agent_id``), when it was signed (``ts``, epoch seconds) and a ``nonce`` (8 to 64 letters,
digits, ``-`` or ``_``). It is refused when the key id is unknown or the signature does not match
(``unauthorized``), when its ``by`` is not the key id (``by`` is bound to the key: leave it out), when the
operator may not give this command (``forbidden``), and when it could be a replay (``replay``): signed more
than ``max_clock_skew_s`` away from the agent's clock, signed before this agent started (the nonces of the
previous run are not kept), or its nonce already used within the window. The nonces remembered are bounded
(``rate_limited`` beyond).

``auth: none`` accepts unsigned commands as before and trusts the broker's ACL alone (``docs/security.md``).

Pure apart from the clock passed in; called from the scoring thread only. Keys never appear in a message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from agent.alerts.engine import CommandError
from agent.records import NS_PER_S

logger = logging.getLogger(__name__)

AuthMode = Literal["hmac", "none"]
ENVELOPE_VERSION: Final = 1
MIN_KEY_BYTES: Final = 16

_ENVELOPE_KEYS: Final = frozenset({"v", "key_id", "cmd", "sig"})
_NONCE: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")
_HEX_SIG: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Operator:
    """One operator's key and the commands they may give (empty: every command)."""

    key: bytes = field(repr=False)
    commands: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if len(self.key) < MIN_KEY_BYTES:
            raise ValueError(f"an operator key must have at least {MIN_KEY_BYTES} bytes")


class CommandAuth:
    """Checks each command message and returns the command to apply (see the module docstring)."""

    def __init__(
        self,
        agent_id: str,
        operators: Mapping[str, Operator],
        mode: AuthMode = "hmac",
        max_clock_skew_s: float = 300.0,
        started_ns: int | None = None,
        max_nonces: int = 10_000,
    ) -> None:
        self.agent_id = agent_id
        self.mode: AuthMode = mode
        self._operators = dict(operators)
        self._skew_ns = int(max_clock_skew_s * NS_PER_S)
        self._started_ns = time.time_ns() if started_ns is None else started_ns
        self._max_nonces = max_nonces
        self._nonces: dict[tuple[str, str], int] = {}  # (key id, nonce) -> when it may be forgotten
        if mode == "hmac" and not self._operators:
            logger.warning("operator commands will be refused: commands must be signed and no operator keys are set")
        elif mode == "none":
            logger.warning("operator commands are not signed (alerts.commands.auth none): the broker's ACL decides")

    def __repr__(self) -> str:
        return f"CommandAuth(mode={self.mode!r}, operators={sorted(self._operators)})"

    def open(self, payload: bytes, now_ns: int) -> dict[str, Any]:
        """The command in ``payload``, its ``by`` the operator who signed it; ``CommandError`` when refused."""
        doc = _json(payload, "the command")
        if self.mode == "none":
            if not isinstance(doc, dict):
                raise CommandError("bad_command", "a command must be a JSON object")
            return doc
        if not isinstance(doc, dict) or "sig" not in doc:
            raise CommandError(
                "unauthorized", "commands must be signed: {v, key_id, cmd, sig} with HMAC-SHA256 (docs/security.md)"
            )
        unknown = sorted(set(doc) - _ENVELOPE_KEYS)
        if unknown or doc.get("v", ENVELOPE_VERSION) != ENVELOPE_VERSION:
            raise CommandError("bad_command", f"a signed command has the keys v (1), key_id, cmd, sig; got {unknown}")
        key_id, text, sig = doc.get("key_id"), doc.get("cmd"), doc.get("sig")
        if not isinstance(key_id, str) or not isinstance(text, str) or not isinstance(sig, str):
            raise CommandError("bad_command", "key_id, cmd and sig must be strings")
        operator = self._operators.get(key_id)
        if operator is None:
            if not self._operators:
                raise CommandError("unauthorized", "no operator keys are configured (alerts.commands.operators)")
            raise CommandError("unauthorized", f"unknown key id {key_id[:64]!r}")
        if not _HEX_SIG.fullmatch(sig) or not hmac.compare_digest(sig, signature(operator.key, text)):
            raise CommandError("unauthorized", f"the signature of key {key_id!r} does not match the command")
        body = _json(text.encode("utf-8"), "cmd")
        if not isinstance(body, dict):
            raise CommandError("bad_command", "cmd must hold a JSON object")
        self._check_fresh(key_id, body, now_ns)
        by = body.get("by", key_id)
        if by != key_id:
            raise CommandError("unauthorized", f"by {str(by)[:64]!r} is not the signing key id {key_id!r}")
        command = body.get("command")
        if operator.commands and command not in operator.commands:
            raise CommandError("forbidden", f"operator {key_id!r} may not give the command {str(command)[:32]!r}")
        body["by"] = key_id
        return body

    def _check_fresh(self, key_id: str, body: Mapping[str, Any], now_ns: int) -> None:
        if body.get("agent_id") != self.agent_id:
            raise CommandError("unauthorized", f"the command is for agent {body.get('agent_id')!r}, not this one")
        ts, nonce = body.get("ts"), body.get("nonce")
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise CommandError("bad_value", "ts must be the signing time in epoch seconds")
        if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            raise CommandError("bad_value", "nonce must be 8 to 64 letters, digits, '-' or '_'")
        ts_ns = int(ts * NS_PER_S)
        if abs(now_ns - ts_ns) > self._skew_ns:
            raise CommandError(
                "replay",
                f"signed {(now_ns - ts_ns) / NS_PER_S:+.0f} s from the agent's clock "
                f"(limit ±{self._skew_ns / NS_PER_S:g} s)",
            )
        if ts_ns < self._started_ns:
            raise CommandError("replay", "signed before this agent started; sign it again")
        self._nonces = {k: until for k, until in self._nonces.items() if until > now_ns}
        if (key_id, nonce) in self._nonces:
            raise CommandError("replay", f"nonce {nonce!r} of key {key_id!r} was already used")
        if len(self._nonces) >= self._max_nonces:
            raise CommandError("rate_limited", f"more than {self._max_nonces} commands within the replay window")
        self._nonces[(key_id, nonce)] = ts_ns + self._skew_ns


def signature(key: bytes, cmd: str) -> str:
    """The ``sig`` of a command text: hex HMAC-SHA256 over its UTF-8 bytes.

    >>> signature(b"0123456789abcdef", '{"command":"ack"}')[:16]
    'ff318be35dfcec48'
    """
    return hmac.new(key, cmd.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_command(
    command: Mapping[str, Any],
    key_id: str,
    key: bytes,
    agent_id: str,
    ts: float | None = None,
    nonce: str | None = None,
) -> bytes:
    """A signed command envelope (for tools and tests): adds ``agent_id``, ``ts`` and a random ``nonce``."""
    body = {**command, "agent_id": agent_id, "ts": time.time() if ts is None else ts}
    body["nonce"] = nonce or secrets.token_hex(12)
    text = json.dumps(body, separators=(",", ":"))
    envelope = {"v": ENVELOPE_VERSION, "key_id": key_id, "cmd": text, "sig": signature(key, text)}
    return json.dumps(envelope, separators=(",", ":")).encode()


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CommandError("bad_json", f"{what} is not JSON: {str(exc)[:80]}") from None
