#!/usr/bin/env bash
# The device checks of a GPU session, in one command (each part under its own timeout, so one slow part cannot eat
# the rest; progress lines say where the time went):
#
#   bash experiments/gpu_check.sh OUT_DIR [--sweep]
#
# 1. installs the wheels in ./.whl, if any (packages the device image lacks), into /tmp/site;
# 2. experiments/bench_kernels.py: every kernel against its baseline (--sweep: also the launch alternatives);
# 3. experiments/device_model_check.py: a Nemotron-H-8B slice with each scan / attention implementation
#    (BENCH_TIMEOUT, MODEL_TIMEOUT: seconds for 2 and 3; MODEL_ARGS: extra flags for 3, e.g. --skip-train).
# Results land in OUT_DIR (bench_kernels.json, model.jsonl and the logs); commit the ones relied on under
# experiments/results/ with the device and the date in their names.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [--sweep]}
sweep=${2:-}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import jax; print(jax.__version__)"
} > "$out/device.txt" 2>&1
echo "[$(date +%T)] bench_kernels $sweep"
timeout "${BENCH_TIMEOUT:-240}" python3 experiments/bench_kernels.py --repeats 5 $sweep --out "$out/bench_kernels.json" \
  2>&1 | tee "$out/kernels.txt"
echo "[$(date +%T)] device_model_check"
timeout "${MODEL_TIMEOUT:-150}" python3 experiments/device_model_check.py ${MODEL_ARGS:-} --out "$out/model.jsonl" 2>&1 \
  | tee "$out/model.txt"
echo "[$(date +%T)] done"
