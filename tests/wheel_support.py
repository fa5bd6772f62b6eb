"""Build the pdm-agent wheel from this checkout and install it into fresh virtualenvs.

The wheel is built the way a release is: ``python -m pip wheel --no-deps`` with build isolation (setuptools
from the index, not from the development venv). The sources are first copied to a temporary folder, so
``build/`` and ``*.egg-info`` never land in the shared working tree and two builds never race there; the
copy keeps the ``agent/assets`` symlinks, which setuptools resolves into files in the wheel.

pip keeps its usual cache (``~/.cache/pip``, or ``PIP_CACHE_DIR``), so only the first install downloads.
``InstallUnavailable`` means pip could not reach a package index (no network) or venv has no ensurepip:
callers skip then; any other failure raises ``RuntimeError`` with pip's output.

Used by ``tests/integration/test_wheel_install.py`` and ``scripts/install_size.py``; helpers only (no asserts).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Top-level entries of the checkout that are not sources (venvs, VCS, build output, caches, run data).
_NOT_SOURCES = {".venv", ".git", "build", "dist", "run", "tmp", ".pytest_cache", ".mypy_cache", ".ruff_cache"}

# What pip prints when it cannot reach an index (DNS, refused, unreachable, proxy), as opposed to a real
# resolution or build error. Without retries pip may only say "(from versions: none)": then a probe decides.
_OFFLINE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|No route to host|ProxyError|ConnectTimeoutError"
)

PIP_TIMEOUT_S = 900


class InstallUnavailable(RuntimeError):
    """No network for pip, or no ``venv``/``ensurepip``: the environment cannot build or install."""


def copy_sources(dest: Path, repo: Path = REPO) -> Path:
    """A copy of the checkout's sources (symlinks kept) in ``dest``; returns ``dest``."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if Path(folder) == repo:
            skip |= _NOT_SOURCES & set(names)
        return skip

    shutil.copytree(repo, dest, symlinks=True, ignore=ignore)
    return dest


def build_wheel(out_dir: Path, work_dir: Path, repo: Path = REPO) -> Path:
    """Build the wheel of ``repo`` (copied to ``work_dir/src``) into ``out_dir``; returns its path."""
    src = copy_sources(work_dir / "src", repo)
    out_dir.mkdir(parents=True, exist_ok=True)
    _pip([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out_dir), str(src)], "build the wheel")
    wheels = sorted(out_dir.glob("pdm_agent-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one pdm_agent wheel in {out_dir}, found {[w.name for w in wheels]}")
    return wheels[0]


def create_venv(path: Path, with_pip: bool = True) -> Path:
    """A fresh virtualenv (no system site-packages) at ``path``; returns its ``bin/python``."""
    argv = [sys.executable, "-m", "venv", str(path)]
    if not with_pip:
        argv.insert(3, "--without-pip")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise InstallUnavailable(f"python -m venv failed (is ensurepip installed?):\n{result.stdout}{result.stderr}")
    return path / "bin" / "python"


def pip_install(python: Path, requirements: Sequence[str], use_target_pip: bool = True) -> str:
    """``pip install REQUIREMENTS`` into the venv of ``python``; returns pip's output.

    ``use_target_pip=False`` runs this interpreter's pip with ``--python`` instead, for a venv made
    ``--without-pip`` (whose site-packages then holds only what was installed).
    """
    pip = [str(python), "-m", "pip"] if use_target_pip else [sys.executable, "-m", "pip", "--python", str(python)]
    return _pip([*pip, "install", "--no-input", *requirements], f"install {' '.join(requirements)}")


def venv_env(venv: Path) -> dict[str, str]:
    """The environment of a shell with ``venv`` activated, without anything pointing at this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONNOUSERSITE"] = "1"
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return env


def _pip(argv: list[str], what: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise InstallUnavailable(f"pip did not finish within {PIP_TIMEOUT_S} s ({what}): slow or no network") from exc
    output = result.stdout + result.stderr
    if result.returncode != 0:
        tail = "\n".join(output.splitlines()[-30:])
        if _OFFLINE.search(output) or ("(from versions: none)" in output and not _index_reachable(env)):
            raise InstallUnavailable(f"pip cannot reach a package index ({what}); no network?\n{tail}")
        raise RuntimeError(f"pip failed ({what}), exit {result.returncode}:\n{tail}")
    return output


def _index_reachable(env: dict[str, str]) -> bool:
    """Whether pip can download pip itself: "no versions" of a package then means a real resolution error."""
    with tempfile.TemporaryDirectory(prefix="pdm-pip-probe-") as tmp:
        argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-d", tmp, "pip"]
        try:
            probe = subprocess.run(argv, capture_output=True, timeout=300, env=env, check=False)
        except subprocess.TimeoutExpired:
            return False
    return probe.returncode == 0
