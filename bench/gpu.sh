#!/usr/bin/env bash
# The GPU benchmark of issue 16 item 4 in one command (bench/gpu.py has the details):
# (a) score stage with CLIP ViT-L/14: images/s and its fraction of forward-only,
# (b) MUMU and VD training steps with SD 1.5- and SDXL-size UNets: samples/s, FLOPs, MFU,
# (c) peak GPU memory of each. bf16, SDPA attention. Eager about 3 minutes on one H200 (measured 2026-11-29).
# Without a GPU it runs the tiny CPU mode (--tiny, under a minute), which checks the code paths.
#   bash bench/gpu.sh                 # add --compile to torch.compile the UNets and CLIP's image tower
#   PYTHON=/path/to/python bash bench/gpu.sh --peak-tflops 989
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  exec "$PY" bench/gpu.py "$@"
fi
echo "[gpu] no GPU here: the tiny CPU mode (--tiny) instead; its speeds mean nothing"
exec "$PY" bench/gpu.py --tiny "$@"
