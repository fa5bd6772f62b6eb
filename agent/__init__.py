"""pdm-agent: the edge runtime (ingest, decode, spool, sinks, features, inference, alerts, health)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pdm-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
