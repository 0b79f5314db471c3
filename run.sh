#!/usr/bin/env bash
# Set up (or update) .venv and run the app. Arguments go to app.py, e.g. ./run.sh --share --auth me:secret
set -euo pipefail
cd "$(dirname "$0")"
LIGHTX2V_COMMIT=f8aee98b5462cca8d7288888146ebd95592bf266
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
gpu=no
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=yes; fi
stamp=".venv/.installed-$(cat requirements.txt requirements-gpu.txt | sha1sum | cut -c1-12)-$gpu"
if [ ! -e "$stamp" ]; then
  echo "Setting up .venv (the first time takes a few minutes)..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  if [ "$gpu" = yes ]; then
    .venv/bin/python -m pip install -q -r requirements-gpu.txt
    # LightX2V's own dependency list pulls a server stack and pins torch; its import-time needs are
    # in requirements-gpu.txt, so the package itself goes in without dependencies.
    .venv/bin/python -m pip install -q --no-deps "lightx2v @ git+https://github.com/ModelTC/LightX2V@${LIGHTX2V_COMMIT}"
  else
    echo "No NVIDIA GPU found (nvidia-smi): installing the UI only; Generate will explain what is missing." >&2
  fi
  touch "$stamp"
fi
exec .venv/bin/python app.py "$@"
