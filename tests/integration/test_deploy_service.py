"""The systemd unit in ``deploy/systemd``: ``systemd-analyze`` accepts it and rates it hardened, and the
config lines of ``docs/deploy.md`` find the secrets where the unit's ``LoadCredential=`` puts them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.cli.init import init_folder
from agent.config import ConfigError, load_config
from tests.chaos_support import _merge as merge_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "pdm-agent.service"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
INSTALLED_VENV = "/opt/pdm-agent"
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 = fully locked down, 10 = no hardening at all

SECRETS = {
    "mqtt_password": "broker pass",
    "influx_password": "influx pass",
    "influx_token": "influx-token",
    "operator_ana": "k" * 32,
}


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:  # scripts/setup.sh installs Debian's systemd package, which carries it
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return found


def _unit_for_this_checkout(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv: verify refuses a program that does not exist."""
    venv = Path(sys.prefix)
    assert (venv / "bin" / "pdm-agent").is_file(), f"no pdm-agent in {venv}/bin: run scripts/setup.sh"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text(encoding="utf-8").replace(INSTALLED_VENV, str(venv)), encoding="utf-8")
    return unit


def _settings(unit: Path, key: str) -> list[str]:
    """Every value of ``key=`` in the unit file, in order."""
    return [
        line.split("=", 1)[1].strip()
        for line in unit.read_text(encoding="utf-8").splitlines()
        if line.startswith(f"{key}=")
    ]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    unit = _unit_for_this_checkout(tmp_path)
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on mere warnings (an unknown key, a key in the wrong section): those count too
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stdout + done.stderr


def test_systemd_analyze_verify_refuses_a_unit_whose_program_is_missing(tmp_path: Path) -> None:
    """The control of the test above: verify does check the unit, it is not a no-op here."""
    analyze = _systemd_analyze()
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)  # ExecStart=/opt/pdm-agent/bin/pdm-agent, absent on this machine
    assert not Path(INSTALLED_VENV).exists()
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not executable" in done.stderr


def test_the_unit_is_rated_hardened_by_systemd_analyze_security(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    unit = _unit_for_this_checkout(tmp_path)
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert level is not None, done.stdout[-2000:]
    assert float(level.group(1)) <= MAX_EXPOSURE, done.stdout
    for key in ("User", "StateDirectory", "LoadCredential"):
        assert _settings(UNIT, key), f"{key}= is missing"
    assert _settings(UNIT, "ProtectSystem") == ["strict"]
    assert _settings(UNIT, "User") != ["root"]


def _credentials_config() -> dict:
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- credentials-config:[^>]*-->\s*```yaml\n(.*?)```", text, re.S)
    assert block is not None, "docs/deploy.md lost its credentials-config block"
    loaded = yaml.safe_load(block.group(1))
    assert isinstance(loaded, dict)
    return loaded


def _service_layout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An ``init`` folder with the documented credential lines, and the environment the unit gives the agent:
    ``%S`` is the state root, ``LoadCredential=ID:DIR`` names each file ``ID_<file name>``."""
    site = tmp_path / "etc" / "pdm-agent"
    init_folder(site)
    config_file = site / "agent.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    merge_config(config, _credentials_config())
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    (load,) = _settings(UNIT, "LoadCredential")
    prefix, source = load.split(":", 1)
    assert source == "/etc/pdm-agent/credentials"
    credentials = tmp_path / "run" / "credentials" / "pdm-agent.service"
    credentials.mkdir(parents=True)
    for name, secret in SECRETS.items():
        (credentials / f"{prefix}_{name}").write_text(secret + "\n", encoding="utf-8")

    state_root = tmp_path / "var" / "lib"
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    for assignment in _settings(UNIT, "Environment"):
        name, value = assignment.split("=", 1)
        environ[name] = value.replace("%S", str(state_root))
    return config_file, environ


def test_documented_config_reads_the_secrets_where_the_unit_puts_them(tmp_path: Path) -> None:
    config_file, environ = _service_layout(tmp_path)
    config = load_config(config_file, environ=environ)
    assert config.mqtt.password == SECRETS["mqtt_password"]
    assert config.storage.v1.password == SECRETS["influx_password"]
    assert config.storage.v2.token == SECRETS["influx_token"]
    assert config.alerts.commands.operators["ana"].key == SECRETS["operator_ana"]
    state_dir = tmp_path / "var" / "lib" / _settings(UNIT, "StateDirectory")[0]
    assert config.spool.path == state_dir / "spool.db"  # and so every state file beside it


def test_a_missing_credential_is_an_error_naming_the_key_and_the_file(tmp_path: Path) -> None:
    config_file, environ = _service_layout(tmp_path)
    missing = Path(environ["CREDENTIALS_DIRECTORY"]) / "pdm_mqtt_password"
    missing.unlink()
    with pytest.raises(ConfigError) as raised:
        load_config(config_file, environ=environ)
    assert re.search(rf"mqtt\.password_file: cannot read {re.escape(str(missing))}: No such file", str(raised.value))
    assert SECRETS["influx_password"] not in str(raised.value)
