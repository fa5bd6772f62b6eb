"""How much disk an installation takes: site-packages of a fresh venv, per distribution, largest first.

    .venv/bin/python scripts/install_size.py [--wheel pdm_agent-X-py3-none-any.whl] [--json FILE]

Three installations, each into its own fresh venv (``--without-pip``, so site-packages holds only what
was installed; pip runs from this interpreter with ``--python``):

- ``runtime``: ``pip install WHEEL``, the edge runtime (pyproject ``dependencies``);
- ``tools``: ``pip install 'WHEEL[tools]'``, plus training, evaluation, simulator and dev services;
- ``0.1.0``: the runtime dependencies of the previous release (``OLD_RELEASE_DEPENDENCIES``).

Each installation's time is pip's wall time (resolving, downloading unless pip's cache has the files,
unpacking, compiling ``.pyc``), measured once: a figure of this machine and its network, not a benchmark.

Without ``--wheel`` the wheel is built from this checkout (``tests/wheel_support.py``). Sizes are the
apparent sizes of the files, in MB of 10^6 bytes, including the ``.pyc`` files pip compiles at install.
Each file is attributed to the distribution whose RECORD lists it. "via" names the direct dependencies a
distribution is installed for; the second table charges each direct dependency with its own size plus
every distribution that only it needs (what leaving it out would save).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import wheel_support

# pyproject.toml of pdm-agent 0.1.0 (git show HEAD~1:pyproject.toml before the runtime/tools split).
OLD_RELEASE_DEPENDENCIES = [
    "paho-mqtt>=2.0,<3",
    "onnxruntime>=1.20",
    "onnx>=1.16",
    "numpy>=1.26",
    "pandas>=2.1",
    "scikit-learn>=1.4",
    "influxdb-client>=1.40",
    "pyyaml>=6.0",
]

MB = 1_000_000

# Runs inside the measured venv (stdlib only, imports nothing that would write .pyc files there).
_MEASURE = r"""
import json, sys, sysconfig
from importlib import metadata
from pathlib import Path

site = Path(sysconfig.get_paths()["purelib"])
sizes = {}
for f in site.rglob("*"):
    if f.is_file() and not f.is_symlink():
        sizes[f.resolve()] = f.stat().st_size
owner = {}
dists = {}
for dist in metadata.distributions(path=[str(site)]):
    name = dist.metadata["Name"]
    dists[name] = {"version": dist.version, "requires": dist.requires or [], "bytes": 0, "files": 0}
    for rel in dist.files or []:
        path = Path(dist.locate_file(rel)).resolve()
        if path in sizes and path not in owner:
            owner[path] = name
for path, size in sizes.items():
    name = owner.get(path)
    if name is None:
        dists.setdefault("(in no RECORD)", {"version": "", "requires": [], "bytes": 0, "files": 0})
        name = "(in no RECORD)"
    dists[name]["bytes"] += size
    dists[name]["files"] += 1
print(json.dumps({"site_packages": str(site), "total_bytes": sum(sizes.values()), "dists": dists}))
"""


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requires: list[str]) -> list[str]:
    """Names of the unconditional-or-marker requirements (extras excluded: ``extra == ...`` markers)."""
    names = []
    for req in requires:
        if re.search(r"extra\s*==", req):
            continue
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if match:
            names.append(_key(match.group(1)))
    return names


def measure(python: Path, direct: list[str]) -> dict:
    """Sizes per distribution of the venv of ``python``, with the direct dependencies each one is there for."""
    raw = json.loads(
        subprocess.run([str(python), "-I", "-c", _MEASURE], capture_output=True, text=True, check=True).stdout
    )
    dists = {_key(n): {"name": n, **d} for n, d in raw["dists"].items()}
    graph = {k: [r for r in _requirement_names(d["requires"]) if r in dists] for k, d in dists.items()}

    def closure(root: str) -> set[str]:
        seen, todo = set(), [root]
        while todo:
            node = todo.pop()
            if node in seen or node not in dists:
                continue
            seen.add(node)
            todo.extend(graph.get(node, []))
        return seen

    direct_keys = [k for k in _requirement_names(direct) if k in dists]
    reach = {d: closure(d) for d in direct_keys}
    for key, d in dists.items():
        d["via"] = sorted(dists[r]["name"] for r in direct_keys if key in reach[r])
    charged = []
    for root in direct_keys:
        only = {k for k in reach[root] if all(k not in reach[o] for o in direct_keys if o != root)}
        charged.append(
            {
                "dependency": dists[root]["name"],
                "bytes": sum(dists[k]["bytes"] for k in only),
                "distributions": sorted((dists[k]["name"] for k in only), key=lambda n: -dists[_key(n)]["bytes"]),
            }
        )
    charged.sort(key=lambda c: -c["bytes"])
    counted = {_key(n) for c in charged for n in c["distributions"]}
    rest = {
        "(shared by several)": [k for k in dists if k not in counted and sum(k in r for r in reach.values()) > 1],
        "(no direct dependency)": [k for k in dists if not any(k in r for r in reach.values())],
    }
    for label, keys in rest.items():
        if keys:
            keys.sort(key=lambda k: -dists[k]["bytes"])
            charged.append(
                {
                    "dependency": label,
                    "bytes": sum(dists[k]["bytes"] for k in keys),
                    "distributions": [dists[k]["name"] for k in keys],
                }
            )
    return {"total_bytes": raw["total_bytes"], "dists": dists, "charged": charged}


def install(label: str, requirements: list[str], direct: list[str], work: Path) -> dict:
    python = wheel_support.create_venv(work / label, with_pip=False)
    started = time.perf_counter()
    wheel_support.pip_install(python, requirements, use_target_pip=False)
    seconds = time.perf_counter() - started
    result = measure(python, direct)
    result.update(label=label, requirements=requirements, install_s=round(seconds, 1))
    return result


def render(result: dict) -> str:
    lines = [
        f"{result['label']}: pip install {' '.join(result['requirements'])}",
        f"  site-packages: {result['total_bytes'] / MB:.1f} MB, {len(result['dists'])} distributions, "
        f"pip install {result['install_s']:.1f} s",
        f"  {'distribution':<28} {'version':<12} {'MB':>7}  via",
    ]
    for d in sorted(result["dists"].values(), key=lambda d: -d["bytes"]):
        via = ", ".join(d["via"]) if d.get("via") else "-"
        lines.append(f"  {d['name']:<28} {d['version']:<12} {d['bytes'] / MB:>7.1f}  {via}")
    lines.append("  per direct dependency (itself + what only it needs):")
    for c in result["charged"]:
        if not c["distributions"]:
            continue
        lines.append(f"  {c['dependency']:<28} {c['bytes'] / MB:>7.1f} MB  {', '.join(c['distributions'])}")
    return "\n".join(lines)


def _wheel_dependencies(wheel: Path, extra: str | None = None) -> list[str]:
    """Requirement names of the wheel's METADATA (``Requires-Dist``): the runtime ones, plus ``extra``'s."""
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode("utf-8")
    names = []
    for req in re.findall(r"^Requires-Dist: (.+)$", text, flags=re.MULTILINE):
        marker_extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if (marker_extra.group(1) if marker_extra else None) in (None, extra):
            names.append(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="the pdm-agent wheel (default: build it from this checkout)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pdm-install-size-") as tmp:
        work = Path(tmp)
        wheel = args.wheel.resolve() if args.wheel else wheel_support.build_wheel(work / "wheels", work)
        results = [
            install("runtime", [str(wheel)], _wheel_dependencies(wheel), work),
            install("tools", [f"pdm-agent[tools] @ {wheel.as_uri()}"], _wheel_dependencies(wheel, "tools"), work),
            install("0.1.0", OLD_RELEASE_DEPENDENCIES, OLD_RELEASE_DEPENDENCIES, work),
        ]
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
        f"{platform.machine()}, wheel {wheel.name}"
    )
    for result in results:
        print()
        print(render(result))
    print()
    print("summary (site-packages, MB): " + ", ".join(f"{r['label']} {r['total_bytes'] / MB:.1f}" for r in results))
    if args.json:
        args.json.write_text(json.dumps({"wheel": wheel.name, "results": results}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
