#!/usr/bin/env bash
# The main job end to end: tiny base + two experts, AIM calibration, merge on an embedded
# local Ray, load the result in transformers and generate. Output under ./demo-output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m distmerge.demo --out "${1:-demo-output}"
