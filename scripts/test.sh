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
.venv/bin/ruff check distmerge tests benchmarks cluster
exec .venv/bin/python -m pytest -q "$@"
