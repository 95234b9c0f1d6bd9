#!/usr/bin/env bash
# FSDP2 on GPUs through Accelerate, one Trainer: every LoRA factor is a shard; the monitor gathers the
# whole adapter in every process before each process measures its share, PostSqueezeCallback compresses the
# gathered adapter on the main process, and the final adapter is saved from a full state dict.
#   bash examples/accelerate_fsdp.sh [STEPS] [OUT_DIR] [NUM_GPUS]
# Needs CUDA GPUs: Accelerate 1.15 enables FSDP only on accelerators (on the CPU it runs DDP instead).
# NOT RUN in this repository's tests (no GPU there); the FSDP2 core is tested on the CPU with gloo by
# tests/distributed/test_fsdp.py, in a plain training loop.
set -euo pipefail
steps="${1:-20}"
out="${2:-runs/accelerate_fsdp}"
gpus="${3:-2}"
here="$(cd "$(dirname "$0")" && pwd)"
accelerate launch --num_processes "$gpus" --num_machines 1 --mixed_precision no --dynamo_backend no \
    --use_fsdp --fsdp_version 2 \
    --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \
    --fsdp_reshard_after_forward true --fsdp_state_dict_type FULL_STATE_DICT \
    --fsdp_cpu_ram_efficient_loading false \
    "$here/trainer_monitor.py" --accelerator --steps "$steps" --check-every 5 --out "$out"
