#!/usr/bin/env bash
# Set up, then run the library tests and the reproduction suites at the smoke profile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest tests suites -q -p no:cacheprovider "$@"
