#!/usr/bin/env bash
# Submit the demo pipeline and a training run to a running Ray cluster with `ray job submit`.
#   ray_jobs/submit.sh http://HEAD:8265 /shared/mmloom-demo
# The working directory (this repository) is shipped to the cluster; the runtime env
# installs it with pip on every node, so the nodes need only Python and Ray.
set -euo pipefail
ADDRESS=${1:?usage: submit.sh RAY_DASHBOARD_ADDRESS SHARED_OUTPUT_DIR}
OUT=${2:?usage: submit.sh RAY_DASHBOARD_ADDRESS SHARED_OUTPUT_DIR}
cd "$(dirname "$0")/.."
RUNTIME_ENV='{"pip": ["-e ."], "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}}'
ray job submit --address "$ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV" -- \
  mmloom demo --out "$OUT" --ray-address auto
ray job submit --address "$ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV" -- \
  python -m mmloom.ray_jobs.train configs/train/mumu-tiny.yaml --shards "$OUT" --out "$OUT/runs/ray-train" \
  --num-workers 2 --ray-address auto
