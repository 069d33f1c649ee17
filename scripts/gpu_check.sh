#!/usr/bin/env bash
# One GPU, <= 8 minutes, no downloads: environment, attention kernels per backend, bf16 DMD2 at SD1.5 shape per
# memory variant, the digits demo for 2 minutes with its FD-digits, one-step images/s vs the teacher's 50 steps.
# Writes OUT/gpu_check.md (default runs/gpu_check). `--dry-run`: the same code on the CPU at tiny sizes (CI runs it).
#   scripts/gpu_check.sh [--dry-run] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec timeout 480 env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m onestep.bench.gpu_check "$@"
