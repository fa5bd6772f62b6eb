"""The tools beside the edge runtime: training, quantization, evaluation, the gateway simulator, the demo
and the development services. Installed with ``pip install 'pdm-agent[tools]'``; the runtime (``agent``)
never imports this package (``tests/unit/test_architecture.py`` keeps it so)."""
