#!/usr/bin/env bash
# Set up (or update) .venv-test and run the test suite. Arguments go to pytest, e.g. ./test.sh -k presets
# GPU tests (tests/gpu, marker `gpu`) run only where CUDA and LightX2V are importable: see tests/gpu/README.md.
# The browser test needs Chromium: apt-get install chromium (it is skipped, and says so, without it).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv-test/bin/python ] || "$PY" -m venv .venv-test
stamp=".venv-test/.installed-$(cat requirements.txt requirements-test.txt | sha1sum | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  echo "Setting up .venv-test (the first time takes a few minutes)..." >&2
  .venv-test/bin/python -m pip install -q --upgrade pip
  .venv-test/bin/python -m pip install -q -r requirements-test.txt
  touch "$stamp"
fi
exec .venv-test/bin/python -m pytest "$@"
