#!/usr/bin/env bash
# FSDP2 on GPUs through Accelerate, one Trainer: every LoRA factor is a shard; the monitor gathers the
# whole adapter in every process before each process measures its share, PostSqueezeCallback compresses the
# gathered adapter on the main process, and the final adapter is saved from a full state dict.
#   bash examples/accelerate_fsdp.sh [--quick] [STEPS] [OUT_DIR] [NUM_GPUS]
# STEPS: training steps (default 20; 4 with --quick). OUT_DIR: default runs/accelerate_fsdp. NUM_GPUS:
# default 2. --quick also passes --quick to trainer_monitor.py (shorter sequences, a check every 2 steps).
# Needs CUDA GPUs: Accelerate 1.15 enables FSDP only on accelerators (on the CPU it runs DDP instead).
# Cost: not measured (no GPU here).
# NOT RUN in this repository's tests (no GPU there); the FSDP2 core is tested on the CPU with gloo by
# tests/distributed/test_fsdp.py, in a plain training loop.
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
out="${2:-runs/accelerate_fsdp}"
gpus="${3:-2}"
here="$(cd "$(dirname "$0")" && pwd)"
accelerate launch --num_processes "$gpus" --num_machines 1 --mixed_precision no --dynamo_backend no \
    --use_fsdp --fsdp_version 2 \
    --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \
    --fsdp_reshard_after_forward true --fsdp_state_dict_type FULL_STATE_DICT \
    --fsdp_cpu_ram_efficient_loading false \
    "$here/trainer_monitor.py" "${quick[@]}" --accelerator --steps "$steps" --check-every "$check_every" \
    --out "$out"
