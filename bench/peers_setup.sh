#!/usr/bin/env bash
# The peers of bench/peers.py, each in its own virtual environment under /tmp (never in the project's).
# torch is pinned to the version on this machine's disk so that pip does not fetch another one.
set -euo pipefail
TORCH="torch==2.13.0"

python -m venv /tmp/peer-retrain
/tmp/peer-retrain/bin/pip install "$TORCH" retrain==0.3.0

python -m venv /tmp/peer-gradience
/tmp/peer-gradience/bin/pip install "$TORCH" gradience==0.11.0

# Ours: the project's own environment, with PYTHONPATH pointing at the tree being measured.
