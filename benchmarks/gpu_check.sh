#!/usr/bin/env bash
# One-command GPU check (run it first whenever a GPU is available; < 8 minutes on one recent GPU):
#   bash benchmarks/gpu_check.sh            # demos on CUDA (auto, fp16) + paper-setting steps, measured vs predicted
#   bash benchmarks/gpu_check.sh --dry-run  # the same on the CPU at tiny sizes, demos in auto only (the tests run it)
# Writes benchmarks/results/gpu_check.{json,md}; the .md table goes into the README with GPU, date and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
