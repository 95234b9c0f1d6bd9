#!/usr/bin/env bash
# The command line on a saved adapter: health metrics, the squeeze table and a compressed copy.
#   bash examples/squeeze_saved_adapter.sh [--quick] [ADAPTER_DIR] [OUT_DIR]
# Without arguments it squeezes the adapter written by examples/trainer_monitor.py (run that first).
# OUT_DIR: default runs/squeezed_adapter; the analysis goes beside it, in OUT_DIR.analysis.json.
# Cost on 2 CPU cores: about 30 s of CPU time (132 s on a busy machine, load 9). It trains nothing, so
# --quick (accepted, like every example's) changes nothing.
# Reload the compressed copy with PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
# OUT_DIR), base being the model the source adapter was trained on, recorded in both adapters'
# adapter_config.json (base_model_name_or_path): for trainer_monitor.py's, the cache folder's SmolLM2.
set -euo pipefail
case "${1:-}" in
    -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    --quick) shift ;;
esac
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
