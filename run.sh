#!/usr/bin/env bash
# Set up (or update) .venv and run the app. Arguments go to app.py, e.g. ./run.sh --share --auth me:secret
# WAN_STUDIO_SETUP_DRY_RUN=1 prints the PyTorch install command chosen for this driver and stops.
set -euo pipefail
cd "$(dirname "$0")"
LIGHTX2V_COMMIT=f8aee98b5462cca8d7288888146ebd95592bf266
PY=${PYTHON:-python3}
# The PyTorch build that matches the NVIDIA driver (install/torch_build.py says why): pip arguments, or
# "none" without an NVIDIA GPU; it stops here with a message when the driver is too old for every build.
torch_args=$("$PY" install/torch_build.py) || exit $?
if [ "${WAN_STUDIO_SETUP_DRY_RUN:-}" = 1 ]; then
  if [ "$torch_args" = none ]; then echo "no NVIDIA GPU: the UI only"; else echo "pip install $torch_args"; fi
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
gpu=yes
[ "$torch_args" = none ] && gpu=no
stamp=".venv/.installed-$( (cat requirements.txt requirements-gpu.txt; echo "$torch_args") | sha1sum | cut -c1-12)-$gpu"
if [ ! -e "$stamp" ]; then
  echo "Setting up .venv (the first time takes a few minutes)..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  if [ "$gpu" = yes ]; then
    # torch first, from the index that matches the driver; requirements-gpu.txt's pins then match it.
    # shellcheck disable=SC2086  # word splitting wanted: several pip arguments
    .venv/bin/python -m pip install -q $torch_args
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
