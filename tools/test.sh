#!/usr/bin/env bash
# The test job (CI runs exactly this after tools/setup.sh): static checks, unit and property
# tests, the built-in cases on the CPU backends, and the CPU benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1
.venv/bin/ruff check harness tests tools
.venv/bin/mypy
.venv/bin/pytest tests/ cases/ "$@"
