#!/usr/bin/env bash
# Set up, then reproduce the paper's tables on the embedded model (writes results/). Default profile: small.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
choreo repro --profile "${PROFILE:-small}" "$@"
