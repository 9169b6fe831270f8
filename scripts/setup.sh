#!/usr/bin/env bash
# Installs everything mimkit needs on a fresh Debian machine: the Debian packages the tests use
# (a single-node Slurm with munge), a Python 3.11 virtual environment with the default torch build
# from the package index, and mimkit itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

debian_packages=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${debian_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
# Plain `torch`: the default build runs on CPU, and torchvision / timm / open_clip import only with it.
.venv/bin/pip install -q -e '.[test]'
touch .venv/.installed
echo "[setup] done: $(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)')"
