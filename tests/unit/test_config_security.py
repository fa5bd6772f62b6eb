"""Security options of the config: TLS for MQTT, ``require_tls``, secrets from files, secrets kept out of
messages, ``repr`` and logs."""

from __future__ import annotations

import http.server
import logging
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config
from agent.storage.base import PermanentWriteError
from agent.storage.influx_v1 import InfluxV1Sink
from agent.storage.influx_v2 import InfluxV2Sink

SECRET = "s3cr3t-Vx9!q"


def secret_file(tmp_path: Path, content: str, name: str = "secret") -> Path:
    path = tmp_path / name
    path.write_text(content)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=pdm unit test CA"],
        cwd=directory, check=True, capture_output=True,
    )  # fmt: skip
    return directory / "ca.crt"


# --- require_tls and the TLS section --------------------------------------------------------------------


def test_require_tls_without_tls_is_refused_at_load() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": {"require_tls": True}}, environ={})
    assert info.value.path == "mqtt.require_tls"
    assert "refusing a plaintext connection" in info.value.reason


def test_require_tls_with_tls_enabled_loads(ca_pem: Path) -> None:
    config = parse_config({"mqtt": {"require_tls": True, "tls": {"enabled": True, "ca_file": str(ca_pem)}}})
    assert config.mqtt.tls.enabled and config.mqtt.tls.ca_file == ca_pem
    assert not config.mqtt.tls.insecure_skip_verify


def test_tls_paths_are_relative_to_the_config_file(tmp_path: Path, ca_pem: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_bytes(ca_pem.read_bytes())
    (tmp_path / "agent.yaml").write_text("mqtt:\n  tls:\n    enabled: true\n    ca_file: certs/ca.pem\n")
    config = load_config(tmp_path / "agent.yaml", environ={})
    assert config.mqtt.tls.ca_file == tmp_path / "certs" / "ca.pem"


@pytest.mark.parametrize(
    ("tls", "path", "reason"),
    [
        ({"ca_file": "/nonexistent/ca.pem"}, "mqtt.tls.ca_file", "is set but mqtt.tls.enabled is false"),
        ({"insecure_skip_verify": True}, "mqtt.tls.insecure_skip_verify", "mqtt.tls.enabled is false"),
        ({"enabled": True, "ca_file": "/nonexistent/ca.pem"}, "mqtt.tls.ca_file", "cannot read /nonexistent/ca.pem"),
        ({"enabled": True, "cert_file": "/etc/hostname"}, "mqtt.tls.key_file", "go together"),
        ({"enabled": "yes"}, "mqtt.tls.enabled", "expected true or false"),
        ({"enabled": True, "verify": False}, "mqtt.tls.verify", "unknown key"),
    ],
)
def test_bad_tls_settings_are_refused_with_the_key_path(tls: dict, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": {"tls": tls}}, environ={})
    assert info.value.path == path
    assert reason in info.value.reason


def test_a_ca_file_that_is_not_a_certificate_is_refused_at_load(tmp_path: Path) -> None:
    bad = secret_file(tmp_path, "hello\n", "ca.pem")
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": {"tls": {"enabled": True, "ca_file": str(bad)}}}, environ={})
    assert info.value.path == "mqtt.tls.ca_file"
    assert "no usable PEM certificate" in info.value.reason


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path: Path, ca_pem: Path) -> None:
    other_key = tmp_path / "other.key"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", str(other_key)],
        check=True,
        capture_output=True,
    )
    tls = {"enabled": True, "cert_file": str(ca_pem), "key_file": str(other_key)}
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": {"tls": tls}}, environ={})
    assert info.value.path == "mqtt.tls.cert_file"
    assert "KEY_VALUES_MISMATCH" in info.value.reason or "mismatch" in info.value.reason.lower()


def test_an_encrypted_key_is_refused_instead_of_prompting(tmp_path: Path, ca_pem: Path) -> None:
    key = tmp_path / "enc.key"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-aes256",
         "-pass", "pass:topsecret", "-out", str(key)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = {"enabled": True, "cert_file": str(ca_pem), "key_file": str(key)}
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": {"tls": tls}}, environ={})
    assert info.value.path == "mqtt.tls.key_file"
    assert "is encrypted" in info.value.reason


# --- secrets from files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [SECRET, SECRET + "\n", SECRET + "\r\n"])
def test_secret_files_are_read_at_load_without_the_line_break(tmp_path: Path, content: str) -> None:
    path = secret_file(tmp_path, content)
    data = {
        "mqtt": {"username": "agent", "password_file": str(path)},
        "storage": {"v1": {"username": "w", "password_file": str(path)}, "v2": {"token_file": str(path)}},
    }
    config = parse_config(data, environ={})
    assert config.mqtt.password == SECRET
    assert config.storage.v1.password == SECRET
    assert config.storage.v2.token == SECRET


def test_secret_file_path_may_come_from_the_environment(tmp_path: Path) -> None:
    path = secret_file(tmp_path, SECRET)
    config = parse_config({"storage": {"v2": {"token_file": "${TOKEN_FILE}"}}}, environ={"TOKEN_FILE": str(path)})
    assert config.storage.v2.token == SECRET


@pytest.mark.parametrize(
    ("section", "key"),
    [("mqtt", "password"), ("storage.v1", "password"), ("storage.v2", "token")],
)
@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read"),
        ("", "is empty"),
        ("\n", "is empty"),
        (f"{SECRET}\nsecond line\n", "has more than one line"),
        (b"\xff\xfe" + SECRET.encode(), "is not UTF-8 text"),
    ],
)
def test_bad_secret_files_are_refused_naming_the_key_never_the_content(
    tmp_path: Path, section: str, key: str, content: str | bytes | None, reason: str
) -> None:
    path = tmp_path / "secret"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    data: dict = {}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[f"{key}_file"] = str(path)
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={})
    assert info.value.path == f"{section}.{key}_file"
    assert reason in info.value.reason
    assert str(path) in info.value.reason
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("section", "key"),
    [("mqtt", "password"), ("storage.v1", "password"), ("storage.v2", "token")],
)
def test_a_secret_and_its_file_together_are_refused(tmp_path: Path, section: str, key: str) -> None:
    data: dict = {}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node.update({key: "other", f"{key}_file": str(secret_file(tmp_path, SECRET)), "username": "u"})
    if section == "storage.v2":
        del node["username"]
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={})
    assert info.value.path == f"{section}.{key}_file"
    assert "not both" in info.value.reason
    assert SECRET not in str(info.value) and "other" not in str(info.value)


SECRET_PATHS = [("mqtt", "password"), ("storage.v1", "password"), ("storage.v2", "token")]


@pytest.mark.parametrize(("section", "key"), SECRET_PATHS)
@pytest.mark.parametrize(
    ("yaml_value", "shown"),
    [
        ("123456", ["123456"]),
        ("0x1F2E", ["0x1F2E", "7982"]),
        ("1234.5678", ["1234.5678"]),
        ("yes", ["yes", "true"]),
        ("off", ["off", "false"]),
        ("[987654]", ["987654"]),
        ("{pin: 4711}", ["4711"]),
        ("2024-11-25", ["2024", "11-25"]),
    ],
)
def test_a_secret_of_any_type_is_never_echoed_in_the_error(
    tmp_path: Path, section: str, key: str, yaml_value: str, shown: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 22: `password: 123456` (a bare number in YAML) must be refused without showing the number.
    lines, indent = [], ""
    for part in section.split("."):
        lines.append(f"{indent}{part}:")
        indent += "  "
    lines.append(f"{indent}{key}: {yaml_value}")
    path = tmp_path / "agent.yaml"
    path.write_text("\n".join(lines) + "\n")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.path.startswith(f"{section}.{key}")
    text = str(info.value) + caplog.text
    for fragment in shown:
        assert fragment not in text, text


def test_secrets_are_not_in_the_repr_of_the_config(tmp_path: Path) -> None:
    path = secret_file(tmp_path, SECRET)
    data = {
        "mqtt": {"username": "agent", "password": SECRET},
        "storage": {"v1": {"username": "w", "password_file": str(path)}, "v2": {"token": "${T}"}},
    }
    config = parse_config(data, environ={"T": SECRET})
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert "username='agent'" in repr(config)


# --- secrets stay out of sink errors and logs -----------------------------------------------------------


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"error":"authorization failed"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    """An HTTP server that answers every write with 401, like InfluxDB with wrong credentials."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_failed_influx_auth_never_shows_the_password(refusing_server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for sink in (
        InfluxV1Sink(refusing_server, "pdm", username="writer", password=SECRET),
        # Credentials in the URL are moved to the header and removed from what is shown.
        InfluxV1Sink(refusing_server.replace("http://", f"http://writer:{SECRET}@"), "pdm"),
        InfluxV2Sink(refusing_server, org="o", bucket="b", token=SECRET),
    ):
        with pytest.raises(PermanentWriteError) as info:
            sink.write(["m f=1 1"])
        assert info.value.status == 401
        assert not getattr(info.value, "rejects_data", True)
        assert SECRET not in str(info.value)
        assert SECRET not in repr(sink)
        sink.close()
    assert SECRET not in "\n".join(r.getMessage() for r in caplog.records)
