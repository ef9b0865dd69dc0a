#!/usr/bin/env bash
# Set up, start a local Prefect server (kept running: its UI shows every job; `irefine server stop`
# stops it), then run a demo refinement job on embedded defaults: SQLite in ~/.irefine and a local
# Dask cluster. The job prints its address in the Prefect UI.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/irefine server start
exec .venv/bin/irefine run --problem rosenbrock --problem-param dim=6 --strategy cmaes \
  --batch-size 32 --max-evaluations 20000 --target 1e-6 "$@"
