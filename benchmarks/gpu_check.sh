#!/usr/bin/env bash
# GPU check, one script for a fresh CUDA machine with PyPI (under 8 minutes):
#   1. a fresh virtual environment: torch (PyPI's CUDA build), this package, then in the background
#      mamba-ssm and causal-conv1d (built against that torch; a failure is recorded, not fatal);
#   2. benchmarks/gpu_check.py run: SmolLM2 IG and evaluation on the GPU in float32 and bfloat16,
#      each against float32 on this machine's CPU, with throughputs;
#   3. benchmarks/mamba_cuda_check.py: mamba-ssm's kernel paths against the plain path;
#   4. one JSON file: $OUT/gpu_check.json if OUT is set, else results/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # here: no installs, the current python, tiny models on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
DEST="${OUT:-$ROOT/results}/gpu_check.json"
WORK=$(mktemp -d)
STEPS="$WORK/steps.jsonl"
SYSPY=$(command -v python3)
: > "$STEPS"

# step NAME TIMEOUT_S CMD...: run CMD with a time limit, log to $WORK/NAME.log, append its outcome to $STEPS
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  "$SYSPY" - "$name" "$rc" "$((SECONDS - t0))" "$WORK/$name.log" >> "$STEPS" <<'PY'
import json, sys
name, rc, seconds, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tail = open(log, errors="replace").read()[-2000:]
print(json.dumps({"step": name, "ok": rc == 0, "rc": rc, "timed_out": rc == 124, "seconds": seconds, "log_tail": tail}))
PY
  echo "[gpu_check] $name: rc=$rc in $((SECONDS - t0)) s" >&2
  return $rc
}

if [[ $DRY == 1 ]]; then
  PY=${PYTHON:-python3}
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  step run 600 "$PY" benchmarks/gpu_check.py run --cpu-dry-run --out "$WORK/smollm2.json"
  step mamba_cuda_check 120 "$PY" benchmarks/mamba_cuda_check.py --device cpu --layers 2 --d-model 64 --pos 32 \
    --reps 1 --out "$WORK/mamba_cuda_check.json"
else
  VENV="$WORK/venv"
  PY="$VENV/bin/python"
  step venv 120 "$SYSPY" -m venv "$VENV" &&
    step pip_tools 120 "$PY" -m pip install -q --upgrade pip setuptools wheel packaging ninja &&
    step torch 300 "$PY" -m pip install -q "torch==2.13.0" &&
    step mechcopy 240 "$PY" -m pip install -q -e .
  # mamba-ssm and causal-conv1d compile against the installed torch (no prebuilt wheel on PyPI): in the
  # background while SmolLM2 runs, given at most 5 minutes
  # (4 compile jobs leave the other cores to the CPU references and to the GPU runs' launching thread)
  (export MAX_JOBS=4; step mamba_ssm_install 300 "$PY" -m pip install --no-build-isolation --no-deps causal-conv1d mamba-ssm) &
  MAMBA_INSTALL=$!
  export TOKENIZERS_PARALLELISM=false
  step run 300 "$PY" benchmarks/gpu_check.py run --out "$WORK/smollm2.json"
  wait "$MAMBA_INSTALL"
  step mamba_cuda_check 180 "$PY" benchmarks/mamba_cuda_check.py --out "$WORK/mamba_cuda_check.json"
fi

mkdir -p "$(dirname "$DEST")"
"$SYSPY" benchmarks/gpu_check.py merge --steps "$STEPS" --out "$DEST" "$WORK/smollm2.json" "$WORK/mamba_cuda_check.json" > /dev/null
echo "[gpu_check] wrote $DEST" >&2
