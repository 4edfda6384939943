#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (lint first: it is part of the suite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check distmerge tests benchmarks cluster
exec .venv/bin/python -m pytest -q "$@"
