#!/usr/bin/env bash
# Two processes on the CPU (gloo), one Trainer: the monitor splits its work across the processes and only
# the main process logs and writes.
#   bash examples/accelerate_ddp.sh [STEPS] [OUT_DIR]
set -euo pipefail
steps="${1:-20}"
out="${2:-runs/accelerate_ddp}"
here="$(cd "$(dirname "$0")" && pwd)"
accelerate launch --cpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    "$here/trainer_monitor.py" --steps "$steps" --check-every 5 --out "$out"
