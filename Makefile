# The two commands of the README: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-adaptation demo-camera test test-unit check lint typecheck models bench bench-quant clean

setup:
	@scripts/setup.sh

demo: setup ## run the agent against a local broker and database with the gateway simulator (~1 min)
	$(PY) scripts/demo.py

demo-adaptation: setup ## a two-pole motor in a four-pole fleet gets its own LoRA adapter on the device (~2 min)
	$(PY) scripts/demo_adaptation.py

demo-camera: setup ## a camera's surface defect alerted end to end, its image fetched from the agent (~1 min, no dataset)
	$(PY) scripts/demo_camera.py

test: setup ## unit and integration tests (integration tests start their own Mosquitto and InfluxDB)
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check agent pdm_tools tests scripts benchmarks
	$(VENV)/bin/ruff format --check agent pdm_tools tests scripts benchmarks

typecheck: setup
	$(VENV)/bin/mypy

check: lint typecheck test ## what CI runs, and more

models: setup ## rebuild the shipped models in models/ (deterministic)
	$(VENV)/bin/pdm-agent train --out models

bench: setup ## throughput, latency and memory against the machine's limits (~11 min; see docs/benchmarks.md)
	$(PY) benchmarks/run.py --out benchmarks/results

bench-quant: setup ## quantization targets: size, accuracy and latency ratios of every candidate (~8 min; docs/quantization.md)
	$(PY) benchmarks/quantization.py --json benchmarks/results/quantization.json

clean:
	rm -rf run .pytest_cache .mypy_cache .ruff_cache
