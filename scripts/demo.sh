#!/usr/bin/env bash
# The main job end to end: tiny base + two experts, AIM calibration and the merge on one
# machine (in this process: no Ray to start), load the result in transformers and generate.
# Output under ./demo-output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m distmerge.demo --out "${1:-demo-output}"
