#!/usr/bin/env bash
# Set up the project on a fresh Debian machine with Python >= 3.11: system packages, a virtualenv
# in .venv, and the project with its dev extras. Idempotent; safe to run again.
#   scripts/setup.sh             what a demo job needs (no services)
#   scripts/setup.sh --services  also Redis, PostgreSQL server binaries, HAProxy and Chromium, for the test suite
set -euo pipefail
cd "$(dirname "$0")/.."

services=0
[ "${1:-}" = "--services" ] && services=1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: Python >= 3.11 is needed as python3" >&2; exit 2; }
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ "$services" = 1 ]; then
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # tests/test_ui.py renders the Prefect UI
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)  # irefine cluster's balancer
  command -v npm >/dev/null 2>&1 || missing+=(npm)  # Azurite, below
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.irefine-installed
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  # The runtime comes pinned from requirements.lock (the versions the suite and the image use), so a
  # release upstream cannot change what a fresh clone runs; dev tools resolve freely.
  .venv/bin/python -m pip install -q -c requirements.lock -e '.[dev]'
  echo "$want" > "$stamp"
fi

# Azurite, the Azure Storage emulator, for tests/test_azure_results.py: kept in .venv, out of git.
if [ "$services" = 1 ] && [ ! -x .venv/azurite/node_modules/.bin/azurite-blob ]; then
  echo "setup: installing Azurite into .venv/azurite"
  npm install --prefix .venv/azurite --no-audit --no-fund --loglevel=error azurite@3 >/dev/null
fi
