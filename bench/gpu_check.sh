#!/usr/bin/env bash
# GPU check: every pipeline step once on CUDA, timed, into bench/results/gpu_check.md (see bench/gpu_check.py).
#   bash bench/gpu_check.sh                 # the bundled model on the first CUDA device, under 8 minutes
#   bash bench/gpu_check.sh --device cpu --quick --out /tmp/gc    # dry run on CPU with a tiny random model
# Without a CUDA device it says so and exits 0 (nothing is written). The whole run is capped at 470 s on top of
# the driver's own per-step timeouts and 420 s budget.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-../.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec timeout --kill-after=10 470 "$PY" gpu_check.py "$@"
