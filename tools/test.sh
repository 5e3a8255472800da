#!/usr/bin/env bash
# The test job (CI runs exactly this after tools/setup.sh): static checks (ruff; mypy --strict,
# the TensorRT backend against TensorRT's type stubs), unit and property tests, the built-in cases
# on the CPU backends (golden, metric, fidelity and benchmark items), their QAT profiles, and the
# library benchmarks.
# Reports land in reports/ (the CI artefacts).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1
.venv/bin/ruff check harness tests tools
.venv/bin/mypy
.venv/bin/pytest tests/ cases/ --report-dir reports/ --benchmark-json reports/benchmarks-cases.json "$@"
# The QAT profiles: float -> PTQ -> QAT -> ort-int8 on the committed QAT checkpoints (docs/qat.md).
.venv/bin/pytest cases/pidnet_s.yaml cases/fastbev_r18.yaml --profile qat -m "golden or metric or fidelity" \
    --report-dir reports/qat/ -q
.venv/bin/pytest tests/bench_*.py -q --benchmark-json reports/benchmarks-library.json
