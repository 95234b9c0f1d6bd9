#!/usr/bin/env bash
# Two processes on the CPU (gloo), one Trainer: the monitor splits its work across the processes and only
# the main process logs and writes.
#   bash examples/accelerate_ddp.sh [--quick] [STEPS] [OUT_DIR]
# STEPS: training steps (default 20; 4 with --quick). OUT_DIR: default runs/accelerate_ddp. --quick also
# passes --quick to trainer_monitor.py (shorter sequences, a check every 2 steps).
# Cost on 2 CPU cores: about 100 s on quiet cores (an earlier measurement); with --quick 2.4 min on a busy
# machine (load 8, 28 s of CPU time; Accelerate runs each process on one thread).
# Writes what trainer_monitor.py writes, into OUT_DIR: reload OUT_DIR/adapter and OUT_DIR/squeezed with
# PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder), base being the cache
# folder's SmolLM2 recorded in their adapter_config.json (base_model_name_or_path).
set -euo pipefail
quick=() default_steps=20 check_every=5
case "${1:-}" in
    -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    --quick) quick=(--quick) default_steps=4 check_every=2; shift ;;
esac
steps="${1:-$default_steps}"
out="${2:-runs/accelerate_ddp}"
here="$(cd "$(dirname "$0")" && pwd)"
accelerate launch --cpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    "$here/trainer_monitor.py" "${quick[@]}" --steps "$steps" --check-every "$check_every" --out "$out"
