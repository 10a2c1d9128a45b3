#!/usr/bin/env bash
# Set up (idempotent) and run the demo: a local fleet, a sample batch, a summary, down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/actionfleet demo "$@"
