"""MQTT adapter: the only module that talks to paho-mqtt (2.x).

Threads:

- ``start()`` and ``stop()`` are called by the owner (the composition root), once each.
- paho's network thread (``loop_start``) runs every callback of this class, including the
  ``on_message`` callback handed to ``MqttConnection``. That callback must only enqueue: while it runs,
  the socket is not read and keepalive pings are not answered. If it blocks on a full queue, the broker
  stops sending once its in-flight window of unacknowledged QoS 1 messages is full (backpressure).
- ``ack()`` and ``publish()`` may be called from any thread: paho 2 queues outgoing packets under its own
  locks and wakes the network thread through a socket pair.

Delivery: subscriptions use QoS 1 with manual acknowledgement (``manual_ack=True``), so the broker keeps
a message until ``ack()`` is called, which the pipeline does once the readings are durable. The session
is persistent (``clean_start`` false, MQTT 5 session expiry, or ``clean_session`` false for 3.1.1), so
messages that were not acknowledged before a disconnect are redelivered after the reconnect.

``Message.mid`` is ``connection number << 16 | MQTT packet id``. A packet id only means something on the
connection that delivered it: after a reconnect the broker numbers again (from 1 when it lost the
session), so acknowledging an old packet id would acknowledge a different, not yet durable message.
``ack()`` therefore ignores (and counts) acknowledgements of messages from an earlier connection; the
broker redelivers those messages if it still has them.

Security: with ``tls`` set, the connection uses TLS 1.2+ and verifies the broker's certificate against
``tls.ca_file`` (or the system trust store) and the host name; a failed verification is counted
(``mqtt.connect_failures{reason=tls_verify_failed}``) and logged with OpenSSL's reason, and the client
keeps retrying with backoff. ``require_tls`` refuses settings without TLS. The password is never logged
and masked in ``repr``.

Liveness: with ``silence_timeout_s`` > 0, a watchdog thread forces a reconnect (``mqtt.watchdog_reconnects``)
when the connection is up but no message arrived for that long: a broker that hangs (SIGSTOP, a dead
bridge, a half-open TCP connection that keepalive has not caught yet) then looks like a lost connection,
which paho repairs with its usual reconnect and backoff.

Subscriptions: with ``subscriptions_file`` set, the filters subscribed are remembered across restarts
(``agent.ingest.remembered``); on a connect that resumes the session, remembered filters that are no
longer configured are unsubscribed first (one log line, ``mqtt.stale_unsubscribed``): the session would
otherwise keep them, and the broker deliver every message once per matching filter.

Availability: the last will sets the retained status topic to ``offline`` when the connection drops
without a DISCONNECT; every successful connect publishes ``online`` (retained); ``stop()`` publishes
``offline`` and waits for it before disconnecting (a clean disconnect does not fire the will).

Size: this module stays one file (~550 lines) on purpose: ``MqttConnection`` is one state machine whose
paho callbacks share the connection state under the threading rules above; split over files, those
rules would no longer be read in one place. Its settings are in ``agent.ingest.settings``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.ingest.paho_buffered import BufferedClient, client_class
from agent.ingest.remembered import RememberedFilters
from agent.ingest.settings import MqttSettings, MqttTls
from agent.metrics import Metrics
from agent.records import Message

logger = logging.getLogger(__name__)


class _DropReconnectNoise(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR after every failed reconnect attempt; the outage
    is already reported once by ``_on_connect_fail`` and counted, so this line is only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_paho_logger = logging.getLogger(f"{__name__}.paho")
_paho_logger.addFilter(_DropReconnectNoise())

MessageInfo = paho.MQTTMessageInfo

StatusPayload = Callable[[Literal["online", "offline"]], bytes]


class MqttConnection:
    """One MQTT client: subscribes, hands messages to ``on_message``, acknowledges and publishes.

    ``status_payload``, when given, builds the status payloads at the moment they are sent (so their
    time is current; the last will is rebuilt before every connection attempt); otherwise the fixed
    ``online_payload``/``offline_payload`` of the settings are used.
    """

    def __init__(
        self,
        settings: MqttSettings,
        on_message: Callable[[Message], None],
        metrics: Metrics,
        status_payload: StatusPayload | None = None,
    ) -> None:
        self._settings = settings
        self._deliver = on_message
        self._metrics = metrics
        self._status_payload = status_payload
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        # Connection number (see Message.mid) and the unacknowledged QoS 1 messages (mids) of this connection.
        self._generation = 0
        self._pending: set[int] = set()
        self._subscribe_mid: int | None = None
        # Filters of the persistent session (subscribed now or by an earlier configuration), and the stale
        # ones an UNSUBSCRIBE is out for.
        self._remembered: RememberedFilters | None = None
        self._session_filters: frozenset[str] = frozenset()
        if settings.subscriptions_file is not None:
            session = f"{settings.host}:{settings.port}/{settings.client_id}"
            self._remembered = RememberedFilters(settings.subscriptions_file, session)
            self._session_filters = self._remembered.load()
        self._unsubscribe: tuple[int, tuple[str, ...]] | None = None
        self._started = False
        self._stopping = False
        # The last connection failure logged (reason label): repeats of the same failure go to DEBUG.
        self._failure_logged: str | None = None
        self._attempt_answered = False  # a CONNACK (or a refusal) arrived for the current attempt
        # Liveness watchdog: time (monotonic) of the last message or (re)connect.
        self._last_activity = time.monotonic()
        self._watchdog_stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._client = self._build_client()

    # --- lifecycle ------------------------------------------------------------------------------------

    def _build_client(self) -> paho.Client:
        s = self._settings
        v5 = s.protocol == "5"
        client = client_class()(  # paho with buffered socket reads (agent/ingest/paho_buffered.py)
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            # 3.1.1 sets the session flag here; MQTT 5 refuses it here and takes clean_start at connect.
            clean_session=None if v5 else s.clean_start,
            manual_ack=True,
        )
        client.enable_logger(_paho_logger)
        if s.tls is not None:
            # check_hostname (on unless insecure_skip_verify) makes the handshake verify the host name too.
            client.tls_set_context(s.tls.context())
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        client.reconnect_delay_set(s.reconnect_min_s, s.reconnect_max_s)  # type: ignore[arg-type]
        client.max_queued_messages_set(s.max_queued_messages)
        if s.status_topic:
            client.will_set(s.status_topic, self._status("offline"), qos=1, retain=True)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        """Start the network thread and connect in the background; a broker that is down is retried."""
        if self._started:
            raise RuntimeError("MqttConnection.start() called twice")
        self._started = True
        s = self._settings
        properties = None
        clean_start: bool | Literal[3] = s.clean_start
        if s.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = s.session_expiry_s
        else:
            clean_start = paho.MQTT_CLEAN_START_FIRST_ONLY  # ignored by 3.1.1 (see clean_session)
        self._client.connect_async(
            s.host, s.port, keepalive=s.keepalive_s, clean_start=clean_start, properties=properties
        )
        self._client.loop_start()
        logger.info(
            "connecting to MQTT broker %s:%s as %r (MQTT %s, %s), subscriptions %s",
            s.host,
            s.port,
            s.client_id,
            s.protocol,
            _transport_text(s.tls),
            ", ".join(s.subscriptions) or "none",
        )
        if s.tls is not None and s.tls.insecure_skip_verify:
            logger.warning(
                "MQTT TLS certificate verification is OFF (insecure_skip_verify): the broker is not authenticated"
            )
        if s.silence_timeout_s:
            self._watchdog = threading.Thread(target=self._watchdog_loop, name="mqtt-watchdog", daemon=True)
            self._watchdog.start()

    def stop(self) -> None:
        """Publish ``offline`` and wait for it (``stop_timeout_s``), disconnect, join the network thread."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
        s = self._settings
        if s.status_topic and self._connected.is_set():
            info = self._client.publish(s.status_topic, self._status("offline"), qos=1, retain=True)
            try:
                info.wait_for_publish(s.stop_timeout_s)
                published = info.is_published()
            except (RuntimeError, ValueError) as exc:
                logger.debug("offline status not sent: %s", exc)
                published = False
            if not published:
                logger.warning("broker did not confirm the offline status within %.1f s", s.stop_timeout_s)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        self._subscribed.clear()
        self._metrics.set("mqtt.connected", 0)
        logger.info("MQTT connection to %s:%s closed", s.host, s.port)

    @property
    def is_connected(self) -> bool:
        """True between a successful CONNACK and the next disconnect."""
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float | None = None) -> bool:
        return self._connected.wait(timeout_s)

    def wait_subscribed(self, timeout_s: float | None = None) -> bool:
        """Wait until the broker has granted every subscription of the current connection."""
        return self._subscribed.wait(timeout_s)

    # --- any thread -----------------------------------------------------------------------------------

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a message (its ``Message.mid``) once its readings are durable; QoS 0 needs nothing.

        A message received on an earlier connection is not acknowledged (counted as ``mqtt.acks_stale``).
        """
        if qos == 0:
            return
        with self._lock:
            current = mid in self._pending
            self._pending.discard(mid)
        if not current:
            self._metrics.inc("mqtt.acks_stale")
            logger.debug("message %s was received on an earlier connection; not acknowledged", _mid_text(mid))
            return
        rc = self._client.ack(mid & _PACKET_ID_MASK, qos)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._metrics.inc("mqtt.acks")
        else:
            self._metrics.inc("mqtt.ack_errors", reason=paho.error_string(rc))

    def ack_batch(self, acks: Sequence[tuple[int, int]]) -> None:
        """``ack`` each ``(mid, qos)``, waking paho's network thread once for all of them (``BufferedClient``)."""
        client = self._client
        if not isinstance(client, BufferedClient):
            for mid, qos in acks:
                self.ack(mid, qos)
            return
        with client.batch():
            for mid, qos in acks:
                self.ack(mid, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> MessageInfo:
        """Queue a message; QoS 1 messages published while disconnected are sent after the reconnect.

        ``info.wait_for_publish(timeout)`` waits for the broker's PUBACK. A full outgoing queue is
        counted (``mqtt.publish_errors``) and raises ``ValueError`` from ``wait_for_publish``.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
            # paho keeps a QoS > 0 message and sends it after reconnecting, but reports NO_CONN, which would
            # make wait_for_publish raise at once instead of waiting for the PUBACK it will get.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
            self._metrics.inc("mqtt.publish_queued_offline")
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._metrics.inc("mqtt.published")
        else:
            reason = paho.error_string(info.rc)
            self._metrics.inc("mqtt.publish_errors", reason=reason)
            logger.warning("publish to %s failed: %s", topic, reason)
        return info

    # --- paho's network thread ------------------------------------------------------------------------
    # paho re-raises callback exceptions, which would end its network thread: every callback catches.

    def _status(self, state: Literal["online", "offline"]) -> bytes:
        if self._status_payload is not None:
            return self._status_payload(state)
        return self._settings.online_payload if state == "online" else self._settings.offline_payload

    def _on_pre_connect(self, client: paho.Client, _userdata: Any) -> None:
        self._attempt_answered = False
        try:
            if self._settings.status_topic and self._status_payload is not None:
                client.will_set(self._settings.status_topic, self._status("offline"), qos=1, retain=True)
        except Exception:
            logger.exception("could not refresh the last will")

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        s = self._settings
        try:
            if reason_code.is_failure:
                # Do not mark connected: the broker closes the connection and paho retries with backoff.
                label = _label(reason_code)
                self._attempt_answered = True
                self._metrics.inc("mqtt.connect_failures", reason=label)
                hint = "; check the user name and password" if label in _CREDENTIAL_REFUSALS else ""
                self._log_failure(
                    label,
                    logging.ERROR,
                    "MQTT broker %s:%s refused the connection: %s%s",
                    s.host,
                    s.port,
                    reason_code,
                    hint,
                )
                return
            self._failure_logged = None
            self._attempt_answered = True
            with self._lock:
                self._generation += 1
                self._pending.clear()
                self._last_activity = time.monotonic()
            self._drop_stale_filters(client, flags.session_present)
            if s.subscriptions:
                result, mid = client.subscribe([(topic, int(s.qos)) for topic in s.subscriptions])
                self._subscribe_mid = mid
                if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    logger.error("could not send SUBSCRIBE: %s", paho.error_string(result))
            else:
                self._subscribed.set()
            if s.status_topic:
                client.publish(s.status_topic, self._status("online"), qos=1, retain=True)
            self._connected.set()
            self._metrics.inc("mqtt.connects")
            self._metrics.set("mqtt.connected", 1)
            logger.info("connected to MQTT broker %s:%s (session present: %s)", s.host, s.port, flags.session_present)
        except Exception:
            logger.exception("error in MQTT on_connect")

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        try:
            if mid != self._subscribe_mid:
                return
            ok = True
            for topic, rc in zip(self._settings.subscriptions, reason_codes, strict=False):
                if rc.is_failure:
                    ok = False
                    self._metrics.inc("mqtt.subscribe_failures", reason=_label(rc))
                    logger.error("MQTT broker refused the subscription %s: %s", topic, rc)
                elif rc.value < self._settings.qos:
                    logger.warning(
                        "subscription %s granted QoS %s only (asked %s)", topic, rc.value, self._settings.qos
                    )
            if ok:
                self._subscribed.set()
                logger.info("subscribed to %s", ", ".join(self._settings.subscriptions))
                self._remember(self._session_filters | frozenset(self._settings.subscriptions))
        except Exception:
            logger.exception("error in MQTT on_subscribe")

    def _drop_stale_filters(self, client: paho.Client, session_present: bool) -> None:
        """Unsubscribe remembered filters that are no longer configured (sent before the SUBSCRIBE)."""
        if self._remembered is None:
            return
        stale = tuple(sorted(self._session_filters - frozenset(self._settings.subscriptions)))
        if not stale:
            return
        if not session_present:  # a new session holds no subscription at all
            self._remember(self._session_filters - frozenset(stale))
            return
        result, mid = client.unsubscribe(list(stale))
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._unsubscribe = (mid, stale)
        else:
            logger.error("could not send UNSUBSCRIBE for %s: %s", ", ".join(stale), paho.error_string(result))

    def _on_unsubscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        try:
            if self._unsubscribe is None or mid != self._unsubscribe[0]:
                return
            stale = self._unsubscribe[1]
            self._unsubscribe = None
            # MQTT 3.1.1 has no reason codes (an UNSUBACK is a success); 5 may say "No subscription existed".
            refused = {topic for topic, rc in zip(stale, reason_codes, strict=False) if rc.is_failure}
            for topic in sorted(refused):
                logger.error("MQTT broker refused to unsubscribe %s", topic)
            gone = frozenset(stale) - refused
            if gone:
                self._metrics.inc("mqtt.stale_unsubscribed", len(gone))
                logger.warning(
                    "unsubscribed %s: no longer in the configured subscriptions, but still in the persistent "
                    "session (each message it matched was delivered once more)",
                    ", ".join(sorted(gone)),
                )
                self._remember(self._session_filters - gone)
        except Exception:
            logger.exception("error in MQTT on_unsubscribe")

    def _remember(self, filters: frozenset[str]) -> None:
        """Keep the session's filters in memory and in the file; a failed write is logged (the stale filters
        are then unsubscribed again at the next connect, which does no harm)."""
        if self._remembered is None or filters == self._session_filters:
            return
        self._session_filters = filters
        try:
            self._remembered.save(filters)
        except OSError as exc:
            logger.warning("cannot save the MQTT subscriptions to %s: %s", self._remembered.path, exc)

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        try:
            s = self._settings
            # paho calls this from inside its ``except OSError`` around the connection attempt.
            exc = sys.exc_info()[1]
            retry = f"; retrying every {s.reconnect_min_s:g}..{s.reconnect_max_s:g} s"
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = "tls_verify_failed"
                self._log_failure(
                    reason,
                    logging.ERROR,
                    "MQTT broker %s:%s: TLS certificate verification failed: %s (is the broker's certificate "
                    "signed by the configured CA, and does it name the host %r?)%s",
                    s.host,
                    s.port,
                    exc.verify_message or exc.reason or exc,
                    s.host,
                    retry,
                )
            elif isinstance(exc, ssl.SSLError) or _in_tls_handshake(exc):
                reason = "tls_error"
                detail = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else exc
                self._log_failure(
                    reason,
                    logging.ERROR,
                    "MQTT broker %s:%s: TLS handshake failed: %s (does the port speak TLS?)%s",
                    s.host,
                    s.port,
                    detail,
                    retry,
                )
            else:
                reason = "unreachable"
                detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
                self._log_failure(
                    reason, logging.WARNING, "MQTT broker %s:%s unreachable%s%s", s.host, s.port, detail, retry
                )
            self._metrics.inc("mqtt.connect_failures", reason=reason)
        except Exception:
            logger.exception("error in MQTT on_connect_fail")

    def _log_failure(self, reason: str, level: int, msg: str, *args: object) -> None:
        """Log a connection failure once; while it repeats with the same reason, only at DEBUG."""
        if self._failure_logged == reason:
            logger.debug(msg, *args)
        else:
            self._failure_logged = reason
            logger.log(level, msg, *args)

    # --- the watchdog thread --------------------------------------------------------------------------

    def _watchdog_loop(self) -> None:
        period = min(1.0, self._settings.silence_timeout_s / 4)
        while not self._watchdog_stop.wait(period):
            try:
                self._check_silence(time.monotonic())
            except Exception:
                logger.exception("error in the MQTT watchdog")

    def _check_silence(self, now: float) -> None:
        timeout = self._settings.silence_timeout_s
        if not self._connected.is_set():
            return  # paho is reconnecting already
        with self._lock:
            silent_s = now - self._last_activity
            if silent_s < timeout:
                return
            self._last_activity = now  # one forced reconnect per silence period
        self._metrics.inc("mqtt.watchdog_reconnects")
        logger.warning(
            "no MQTT message for %.1f s on %s (silence_timeout_s %g): forcing a reconnect",
            silent_s,
            ", ".join(self._settings.subscriptions),
            timeout,
        )
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            # Shutting the socket down (not closing it: paho's thread owns it) wakes paho's select() with
            # an end of stream; paho then reports a lost connection and reconnects with its backoff. The
            # base-class call bypasses SSLSocket.shutdown, which would drop the TLS state under paho's feet.
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError as exc:
                logger.debug("watchdog: socket shutdown failed: %s", exc)

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        try:
            was_connected = self._connected.is_set()
            self._connected.clear()
            self._subscribed.clear()
            self._metrics.set("mqtt.connected", 0)
            with self._lock:
                unacked = len(self._pending)
                self._pending.clear()
            # Without a DISCONNECT packet from the broker (always so in 3.1.1), paho reports a lost socket
            # as "Unspecified error".
            from_broker = flags.is_disconnect_packet_from_server
            reason = str(reason_code) if from_broker or reason_code.value != 128 else "Connection lost"
            if not was_connected and not self._attempt_answered and not self._stopping:
                # The broker closed the connection before any CONNACK: it did not accept the client at all
                # (a plaintext client on a TLS port, a client certificate it rejects, a connection limit).
                self._attempt_answered = True
                self._metrics.inc("mqtt.connect_failures", reason="closed_before_connack")
                self._log_failure(
                    "closed_before_connack",
                    logging.ERROR,
                    "MQTT connection to %s:%s ended before the broker accepted it (%s); the client speaks %s: "
                    "is that what the port expects, does the broker want a client certificate? See the broker's log",
                    self._settings.host,
                    self._settings.port,
                    reason,
                    "TLS" if self._settings.tls else "plaintext",
                )
                return
            if self._stopping or not was_connected:
                logger.debug("MQTT disconnected: %s", reason)
                return
            self._metrics.inc("mqtt.disconnects", reason=reason.lower().replace(" ", "_"))
            logger.warning(
                "MQTT connection to %s:%s ended: %s; %d unacknowledged message(s) will be redelivered if the "
                "broker kept the session; reconnecting",
                self._settings.host,
                self._settings.port,
                reason,
                unacked,
            )
        except Exception:
            logger.exception("error in MQTT on_disconnect")

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            received_ns = time.time_ns()
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                # Brokers should refuse such topics; keep the message so that it is dead-lettered, not lost.
                topic = msg._topic.decode("utf-8", errors="replace")
            with self._lock:
                mid = self._generation << 16 | msg.mid
                if msg.qos > 0:
                    self._pending.add(mid)
                self._last_activity = time.monotonic()
            message = Message(
                topic=topic,
                payload=bytes(msg.payload),
                qos=msg.qos,
                mid=mid,
                received_ns=received_ns,
                retained=bool(msg.retain),
                dup=bool(msg.dup),
            )
            self._metrics.inc("mqtt.messages")
            self._deliver(message)
        except Exception:
            # Not acknowledged: the broker redelivers it after the next reconnect.
            self._metrics.inc("mqtt.callback_errors")
            logger.exception("could not hand over the MQTT message %s", getattr(msg, "mid", "?"))


_PACKET_ID_MASK = 0xFFFF

# MQTT 5 "Bad user name or password" / "Not authorized"; 3.1.1 return codes 4 and 5 map to the same texts.
_CREDENTIAL_REFUSALS = frozenset({"bad_user_name_or_password", "not_authorized"})


def _in_tls_handshake(exc: BaseException | None) -> bool:
    """Whether ``exc`` (a reset, a timeout) came out of the TLS handshake, not out of the TCP connect."""
    if exc is None:
        return False
    return any(frame.name == "do_handshake" for frame in traceback.extract_tb(exc.__traceback__))


def _transport_text(tls: MqttTls | None) -> str:
    if tls is None:
        return "plaintext"
    if tls.insecure_skip_verify:
        return "TLS without verification"
    ca = tls.ca_file or "the system trust store"
    return f"TLS, CA {ca}" + (", client certificate" if tls.cert_file else "")


def _mid_text(mid: int) -> str:
    return f"{mid & _PACKET_ID_MASK} of connection {mid >> 16}"


def _label(reason_code: ReasonCode) -> str:
    """A counter label from a reason code: ``Not authorized`` -> ``not_authorized``."""
    return str(reason_code).lower().replace(" ", "_")
