"""The agent's own health: HTTP ``/healthz``, ``/readyz`` and Prometheus ``/metrics``, and self-metrics fields.

- ``selfmetrics.py``: the catalog's metrics (``agent/metrics.py``) as fields of the ``agent`` point in
  InfluxDB (pure);
- ``server.py``: the HTTP server (stdlib, its own daemon threads), ``/metrics`` from the ``Metrics``'
  prometheus_client registry, and its construction from the config.
"""
