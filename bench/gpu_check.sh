#!/usr/bin/env bash
# GPU check (run on a machine with a CUDA GPU; CI never runs it):
# trains 3 epochs on a Baby-sized synthetic set with 1 GPU worker (NCCL backend) and prints the
# seconds per training epoch and per evaluation, and the peak GPU memory.
#   bash bench/gpu_check.sh            # uses .venv if present, else the current python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-$(mktemp -d)}
export RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
$PY -m gtc_ray.cli data synth "$OUT/baby" --preset baby
$PY -m gtc_ray.cli train "$OUT/baby" --gpu --workers 1 --epochs 3 --set train.patience=1000 \
    --set ray.num_cpus=4 --storage "$OUT/runs" --metrics-out "$OUT/metrics.json"
$PY - "$OUT/metrics.json" <<'PY'
import json, sys
from gtc_ray.train.checkpoint import read_meta
m = json.load(open(sys.argv[1]))
h = read_meta(m["checkpoint"])["history"]
for r in h:
    print(f"epoch {r['epoch']}: train {r['train_seconds']:.2f}s  eval {r['eval_seconds']:.2f}s  "
          f"peak GPU memory {r.get('gpu_peak_mb', float('nan')):.0f} MiB")
PY
