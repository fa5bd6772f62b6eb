"""The agent's own health: HTTP ``/healthz``, ``/readyz`` and Prometheus ``/metrics``, and self-metrics fields.

- ``prometheus.py``: a ``Metrics`` snapshot in the Prometheus text exposition format 0.0.4 (pure);
- ``selfmetrics.py``: the same figures as fields of the ``agent`` point in InfluxDB (pure);
- ``server.py``: the HTTP server (stdlib, its own daemon threads) and its construction from the config.
"""
