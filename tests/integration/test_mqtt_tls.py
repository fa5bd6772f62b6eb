"""MQTT over TLS with a password, against a real Mosquitto whose certificates the test makes with openssl.

What is checked: the agent's connection verifies the broker's certificate (chain to the configured CA
and the host name in subjectAltName) and authenticates with user name and password; every failure is
counted by reason, logged with a clear cause and without the password, and never marked connected.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.ingest.mqtt import MqttConnection
from agent.ingest.settings import MqttSettings, MqttTls
from agent.metrics import Metrics
from agent.records import Message
from pdm_tools.dev import services as devservices
from pdm_tools.dev.services import Service

pytestmark = pytest.mark.integration

TIMEOUT_S = 20.0
USER = "agent"
PASSWORD = "pw-Zq8!tls-" + uuid.uuid4().hex[:8]  # random, so that finding it in a log is no coincidence


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path
    """A second CA that signed nothing the broker uses: a client trusting only it must refuse the broker."""


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{result.stderr}", pytrace=False)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=pdm test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_server_cert(directory: Path, ca_cert: Path, ca_key: Path) -> tuple[Path, Path]:
    """A broker certificate for 127.0.0.1 (IP subjectAltName; the CN is not used by verifiers)."""
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1",
        cwd=directory,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("openssl was not found: install the Debian package 'openssl'", pytrace=False)
    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = make_ca(directory, "ca")
    server_cert, server_key = make_server_cert(directory, ca_cert, ca_key)
    other_ca, _ = make_ca(directory, "other-ca")
    return Pki(ca_cert, server_cert, server_key, other_ca)


@pytest.fixture(scope="module")
def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Mosquitto with a TLS-only listener and a password file holding ``USER``/``PASSWORD``."""
    directory = tmp_path_factory.mktemp("mosquitto-tls")
    passwd = devservices.require_binary("mosquitto_passwd", "mosquitto")
    password_file = directory / "passwords"
    password_file.touch(mode=0o600)
    subprocess.run([passwd, "-b", str(password_file), USER, PASSWORD], check=True, capture_output=True)
    try:
        broker = devservices.start_mosquitto(
            directory,
            certfile=pki.server_cert,
            keyfile=pki.server_key,
            cafile=pki.ca,
            password_file=password_file,
        )
    except devservices.ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield broker
    broker.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def connections() -> Iterator[Callable[..., MqttConnection]]:
    made: list[MqttConnection] = []

    def make(broker: Service, metrics: Metrics, inbox: queue.Queue[Message] | None = None, **kw: object):
        settings = MqttSettings(
            host=broker.host,
            port=broker.port,
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
            **kw,  # type: ignore[arg-type]
        )
        conn = MqttConnection(settings, (inbox or queue.Queue()).put, metrics)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.stop()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {TIMEOUT_S:.0f} s waiting for {what}")
        time.sleep(0.02)


def tls_publisher(broker: Service, ca: Path) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"gateway-{uuid.uuid4().hex[:8]}")
    client.tls_set(ca_certs=str(ca))
    client.username_pw_set(USER, PASSWORD)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)


def test_tls_with_the_right_password_connects_and_receives(
    tls_broker: Service, pki: Pki, connections, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    inbox: queue.Queue[Message] = queue.Queue()
    metrics = Metrics()
    conn = connections(
        tls_broker,
        metrics,
        inbox,
        client_id=f"{prefix}-agent",
        username=USER,
        password=PASSWORD,
        tls=MqttTls(ca_file=pki.ca),
        require_tls=True,
        subscriptions=(f"{prefix}/in/#",),
    )
    conn.start()
    assert conn.wait_connected(TIMEOUT_S), f"not connected: {metrics.snapshot()}"
    assert conn.wait_subscribed(TIMEOUT_S)
    gateway = tls_publisher(tls_broker, pki.ca)
    try:
        gateway.publish(f"{prefix}/in/m1/vib", b'{"v":1,"value":1.5}', qos=1).wait_for_publish(TIMEOUT_S)
        message = inbox.get(timeout=TIMEOUT_S)
    finally:
        gateway.disconnect()
        gateway.loop_stop()
    assert message.payload == b'{"v":1,"value":1.5}'
    assert metrics.get("mqtt.connects") == 1
    assert PASSWORD not in all_log_text(caplog)
    assert any("TLS, CA" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_wrong_password_is_refused_counted_and_never_logged(
    tls_broker: Service, pki: Pki, connections, prefix: str, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # paho's own debug lines too
    wrong = "wrong-" + PASSWORD
    metrics = Metrics()
    conn = connections(
        tls_broker,
        metrics,
        client_id=f"{prefix}-agent",
        protocol=protocol,
        username=USER,
        password=wrong,
        tls=MqttTls(ca_file=pki.ca),
    )
    conn.start()

    def refusals() -> float:
        # Mosquitto 2.0 answers a wrong password with "Not authorized" (MQTT 5: 0x87; 3.1.1: return code 5);
        # other brokers use "Bad user name or password" (0x86; 3.1.1: 4).
        return metrics.get("mqtt.connect_failures", reason="not_authorized") + metrics.get(
            "mqtt.connect_failures", reason="bad_user_name_or_password"
        )

    wait_for(lambda: refusals() >= 2, f"two refused attempts ({metrics.snapshot()})")
    assert not conn.is_connected
    assert metrics.get("mqtt.connects") == 0
    assert metrics.get("mqtt.connected") == 0
    conn.stop()
    text = all_log_text(caplog)
    assert wrong not in text and PASSWORD not in text
    assert wrong not in repr(conn._settings)
    refused = [r for r in caplog.records if r.levelno == logging.ERROR and "refused the connection" in r.getMessage()]
    assert len(refused) == 1, "a repeated refusal is logged once at ERROR, then at DEBUG"
    assert "check the user name and password" in refused[0].getMessage()


@pytest.mark.parametrize(
    "host, trusted, expected",
    [
        # OpenSSL 3.0 reports this (Mosquitto sends its chain with the CA, which the client does not trust).
        ("127.0.0.1", "other_ca", "self-signed certificate in certificate chain"),
        # Right CA, but the certificate names IP 127.0.0.1, not the name "localhost".
        ("localhost", "ca", "Hostname mismatch"),
    ],
)
def test_untrusted_server_certificate_is_refused_with_a_clear_error(
    tls_broker: Service,
    pki: Pki,
    connections,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    host: str,
    trusted: str,
    expected: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    metrics = Metrics()
    settings_broker = type("B", (), {"host": host, "port": tls_broker.port})()
    conn = connections(
        settings_broker,
        metrics,
        client_id=f"{prefix}-agent",
        username=USER,
        password=PASSWORD,
        tls=MqttTls(ca_file=getattr(pki, trusted)),
    )
    conn.start()
    wait_for(lambda: metrics.get("mqtt.connect_failures", reason="tls_verify_failed") >= 2, "two failed handshakes")
    assert not conn.is_connected
    assert metrics.get("mqtt.connects") == 0
    conn.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "TLS certificate verification failed" in errors[0]
    assert expected in errors[0]
    assert PASSWORD not in all_log_text(caplog)


def test_insecure_skip_verify_connects_to_an_untrusted_broker_and_warns(
    tls_broker: Service, pki: Pki, connections, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    conn = connections(
        tls_broker,
        metrics,
        client_id=f"{prefix}-agent",
        username=USER,
        password=PASSWORD,
        tls=MqttTls(ca_file=pki.other_ca, insecure_skip_verify=True),
    )
    conn.start()
    assert conn.wait_connected(TIMEOUT_S)
    assert any("verification is OFF" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_plaintext_client_cannot_talk_to_the_tls_listener(tls_broker: Service, connections, prefix: str) -> None:
    metrics = Metrics()
    conn = connections(tls_broker, metrics, client_id=f"{prefix}-agent", username=USER, password=PASSWORD)
    conn.start()
    wait_for(
        lambda: metrics.get("mqtt.connect_failures", reason="closed_before_connack") >= 2,
        f"two attempts closed by the broker ({metrics.snapshot()})",
    )
    assert not conn.is_connected
    assert metrics.get("mqtt.connects") == 0
    assert metrics.get("mqtt.disconnects") == 0


def test_tls_client_against_a_plaintext_port_fails_with_a_tls_error(
    mosquitto: Service, pki: Pki, connections, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    conn = connections(mosquitto, metrics, client_id=f"{prefix}-agent", tls=MqttTls(ca_file=pki.ca))
    conn.start()
    wait_for(lambda: metrics.get("mqtt.connect_failures", reason="tls_error") >= 1, "a failed TLS handshake")
    assert not conn.is_connected
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)


def test_require_tls_refuses_plaintext_settings() -> None:
    with pytest.raises(ValueError, match="require_tls is true but tls is not configured"):
        MqttSettings(client_id="a", require_tls=True)
    MqttSettings(client_id="a", require_tls=True, tls=MqttTls())


def test_unloadable_ca_file_fails_at_construction_with_the_file_name(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    settings = MqttSettings(client_id="a", tls=MqttTls(ca_file=bad))
    with pytest.raises(ValueError, match=r"MqttTls.ca_file: cannot load .*ca.pem"):
        MqttConnection(settings, lambda _m: None, Metrics())
    assert os.path.exists(bad)


def test_watchdog_reconnect_works_over_tls(tls_broker: Service, pki: Pki, connections, prefix: str) -> None:
    inbox: queue.Queue[Message] = queue.Queue()
    metrics = Metrics()
    conn = connections(
        tls_broker,
        metrics,
        inbox,
        client_id=f"{prefix}-agent",
        username=USER,
        password=PASSWORD,
        tls=MqttTls(ca_file=pki.ca),
        subscriptions=(f"{prefix}/in/#",),
        silence_timeout_s=0.5,
    )
    conn.start()
    wait_for(lambda: metrics.get("mqtt.watchdog_reconnects") >= 1 and metrics.get("mqtt.connects") >= 2, "a reconnect")
    assert conn.wait_connected(TIMEOUT_S) and conn.wait_subscribed(TIMEOUT_S)
    gateway = tls_publisher(tls_broker, pki.ca)
    try:
        gateway.publish(f"{prefix}/in/m", b"after", qos=1).wait_for_publish(TIMEOUT_S)
        assert inbox.get(timeout=TIMEOUT_S).payload == b"after"
    finally:
        gateway.disconnect()
        gateway.loop_stop()
    assert metrics.get("mqtt.connect_failures") == 0
