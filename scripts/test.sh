#!/usr/bin/env bash
# Set up, then run lint, type checks, the import contracts and the whole test suite. The tests
# start the real Redis, PostgreSQL, Dask and Prefect servers they need (tests/services.py), on
# loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --services
export PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports  # the layer contracts of pyproject.toml [tool.importlinter]
exec .venv/bin/python -m pytest "$@"
