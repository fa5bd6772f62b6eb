#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine: the services the demo and the tests start (Mosquitto,
# InfluxDB 1.x, VictoriaMetrics for the v2 write path), systemd-analyze for the unit's test, and a
# virtualenv with the package.
# Idempotent: what is already there is not installed again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto mosquitto-clients)
command -v influxd >/dev/null 2>&1 || missing+=(influxdb)
command -v victoria-metrics >/dev/null 2>&1 || missing+=(victoria-metrics)
# systemd-analyze checks the service unit in deploy/systemd (tests/integration/test_deploy_service.py).
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The packages enable system services; the agent's demo and tests start their own processes.
  else
    echo "setup: missing services: ${missing[*]}" >&2
    echo "setup: install them as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing the package and its dependencies into $VENV"
  # pysparkplug (tests only: a real Sparkplug B encoder) pins paho-mqtt<2 for its client, which the tests do
  # not use; its payload classes need only protobuf, so it is installed without its dependencies.
  log="$VENV/pip-install.log"
  if ! { "$VENV/bin/pip" install --upgrade pip && "$VENV/bin/pip" install -e '.[dev]' \
    && "$VENV/bin/pip" install --no-deps 'pysparkplug==0.6.1'; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "setup: pip install failed; full log in $log" >&2
    exit 1
  fi
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
echo "setup: ok"
