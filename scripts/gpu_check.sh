#!/usr/bin/env bash
# The GPU check: on a machine with CUDA, in under 10 minutes, `pytest -m cuda`, then bench_train and bench_sample on
# unet_ddpm_cifar (bf16, compile, channels-last, against diffusers), every figure into one file, $OUT/gpu_check.md.
#
#   bash scripts/gpu_check.sh [OUT]      # OUT defaults to $OUT, else outputs/gpu_check
#
# diffcli runs from this tree (PYTHONPATH), so a machine with torch needs only the other packages installed
# (docs/development.md, "The GPU check"). Each part has its own time limit; a part that fails or runs out of
# time is recorded as such and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-outputs/gpu_check}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
REPORT="$OUT/gpu_check.md"

part() {  # part TITLE SECONDS COMMAND...: run it, its output into the report
  local title=$1 limit=$2; shift 2
  echo "## $title" >> "$REPORT"; echo '```' >> "$REPORT"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt" | grep -v -i "warn" >> "$REPORT"
  local rc=${PIPESTATUS[0]}
  echo '```' >> "$REPORT"
  echo "exit $rc after $((SECONDS - t0)) s (limit $limit s)" >> "$REPORT"; echo >> "$REPORT"
}

{ echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"; echo; } > "$REPORT"
part "machine" 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'"
part "pytest -m cuda" 200 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
part "bench_train (unet_ddpm_cifar, bf16, compile, channels-last)" 150 "$PY" scripts/bench_train.py \
  --net unet_ddpm_cifar --device cuda --batch 128 --steps 20 --precision bf16 --compile --channels-last \
  --json "$OUT/bench_train.json"
part "bench_sample (unet_ddpm_cifar, 3x32x32)" 180 "$PY" scripts/bench_sample.py --net unet_ddpm_cifar \
  --device cuda --shapes 3x32x32 --n 256 --samplers heun:18 ddim:50 \
  --ours fp32 bf16 bf16+cl bf16+compile+cl --theirs fp32 bf16 bf16+compile+cl --json "$OUT/bench_sample.json"
echo "wrote $REPORT"
