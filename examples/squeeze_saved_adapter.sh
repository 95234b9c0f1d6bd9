#!/usr/bin/env bash
# The command line on a saved adapter: health metrics, the squeeze table, a compressed copy, the report.
#   bash examples/squeeze_saved_adapter.sh [ADAPTER_DIR] [OUT_DIR]
# Without arguments it squeezes the adapter written by examples/trainer_monitor.py.
set -euo pipefail
adapter="${1:-runs/trainer_monitor/adapter}"
out="${2:-runs/squeezed_adapter}"

lora-monitor analyze "$adapter"                                   # effective rank, κ, stable rank per module
lora-monitor squeeze "$adapter" --threshold 0.95 --json > "$out.analysis.json"
lora-monitor squeeze "$adapter" --threshold 0.95 --per-module --out "$out"   # one rank per module
python - "$out" <<'PY'
import sys
from peft import PeftConfig
config = PeftConfig.from_pretrained(sys.argv[1])
print(f"compressed adapter in {sys.argv[1]}: r={config.r}, {len(config.rank_pattern)} per-module ranks")
PY
