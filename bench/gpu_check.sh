#!/usr/bin/env bash
# GPU check (run on a machine with a CUDA GPU; CI never runs it):
#   1. the CUDA tests (tests/test_cuda.py: the GPU code paths against the CPU ones);
#   2. 3 epochs on a Baby-sized synthetic set with 1 GPU worker (Ray TorchTrainer, NCCL backend):
#      seconds per training epoch and per evaluation, and the peak GPU memory, per epoch;
#   3. bench/train.py --gpu: in-process vs 1 GPU worker side by side (the Ray overhead on a GPU),
#      in float32 and with model.matmul_precision=bfloat16.
# Each step runs even when an earlier one failed; the exit status says whether any failed.
#   bash bench/gpu_check.sh            # uses .venv if present, else the current python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORK=${GPU_CHECK_DIR:-$(mktemp -d)}
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
failed=()
step() {  # step NAME COMMAND...: run, time, and remember a failure
    echo; echo "=== $1"; local t0=$SECONDS
    "${@:2}" || failed+=("$1")
    echo "--- $1: $((SECONDS - t0)) s"
}

$PY - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
# the check measures speed; it logs to MLflow only where MLflow is installed
NO_MLFLOW=$($PY -c "import mlflow" 2>/dev/null || echo --no-mlflow)

if $PY -c "import pytest, pytest_timeout" 2>/dev/null; then
    step "CUDA tests" $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
else
    echo "pytest or pytest-timeout is not installed: the CUDA tests are skipped"
fi
step "synthetic Baby-sized set" $PY -m gtc_ray.cli data synth "$WORK/baby" --preset baby
step "1 GPU worker, 3 epochs" $PY -m gtc_ray.cli train "$WORK/baby" --gpu --workers 1 --epochs 3 \
    --set train.patience=1000 --storage "$WORK/runs" --metrics-out "$WORK/metrics.json" $NO_MLFLOW
step "per-epoch figures" $PY - "$WORK/metrics.json" <<'PY'
import json, sys
from gtc_ray.train.checkpoint import read_meta
m = json.load(open(sys.argv[1]))
for r in read_meta(m["checkpoint"])["history"]:
    print(f"epoch {r['epoch']}: train {r['train_seconds']:.2f}s  eval {r['eval_seconds']:.2f}s  "
          f"peak GPU memory {r.get('gpu_peak_mb', float('nan')):.0f} MiB")
PY
step "bench float32" $PY bench/train.py "$WORK/baby" --gpu --epochs 3
step "bench bfloat16" $PY bench/train.py "$WORK/baby" --gpu --epochs 3 --set model.matmul_precision=bfloat16

echo
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all GPU checks passed"
