#!/usr/bin/env bash
# Set up qharness on a fresh machine: a virtual environment in .venv with the CPU build of
# PyTorch, qharness (editable) and its dev tools, and the TensorRT type stubs for mypy.
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# The CPU wheel first: a bare "torch" requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
# TensorRT's type stubs for mypy only (extracted into typings/, never installed: see the tool).
.venv/bin/python tools/trt_typings.py
echo "qharness set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
