#!/usr/bin/env bash
# Set up, then run a demo refinement job on embedded defaults: SQLite in ~/.irefine, a local Dask
# cluster, and an ephemeral Prefect API (no services to start by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/irefine run --problem rosenbrock --problem-param dim=6 --strategy cmaes \
  --batch-size 32 --max-evaluations 20000 --target 1e-6 "$@"
