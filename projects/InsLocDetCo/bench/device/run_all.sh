#!/usr/bin/env bash
# The GPU table of docs/SPEED.md in one command, for one H100-class GPU with ~16 cores: eager vs
# fast path, end to end and model only, at the batches the issue's targets name, most important
# first, within a global deadline. Run from the repository root:
#
#   bash projects/InsLocDetCo/bench/device/run_all.sh            # results in $OUT (or /tmp/out)
#
# Python packages that the machine lacks are installed from .whl/ (scripts/fetch_device_wheels.sh
# fills it). Every bench_e2e.py run appends JSON lines to $OUT/e2e.jsonl and its console to
# $OUT/run.log; a run that would pass the deadline is cut (timeout) and the next ones skipped.
set -u
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
OUT=${OUT:-/tmp/out}
DEADLINE_S=${DEADLINE_S:-500}  # total seconds for the benches (leave time to rerun in a lease)
DATA=${DATA:-jpeg:1024}
WORKERS=${WORKERS:-15}
mkdir -p "$OUT"
START=$SECONDS

if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$ROOT"/.whl/*.whl >"$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$ROOT/projects/InsLocDetCo:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
cd "$ROOT/projects/InsLocDetCo"
python3 -c "import torch, detectron2, insloc_detco; print('torch', torch.__version__, \
'detectron2', detectron2.__version__, torch.cuda.get_device_name(), 'cores', __import__('os').cpu_count())" \
  | tee "$OUT/env.txt" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$OUT/env.txt" 2>&1

# bench NAME CONFIG BATCHES [extra bench_e2e.py arguments]: eager and fast path in one run.
bench() {
  local name=$1 config=$2 batches=$3 left
  shift 3
  left=$((DEADLINE_S - (SECONDS - START)))
  if [ "$left" -lt 60 ]; then
    echo "=== $name: skipped, ${left}s left" | tee -a "$OUT/run.log"
    return
  fi
  echo "=== $name ($((SECONDS - START))s in, ${left}s left)" | tee -a "$OUT/run.log"
  timeout --signal=INT "$left" python3 bench/bench_e2e.py --config-file "$config" --device cuda \
    --batches "$batches" --paths eager,fast --workers "$WORKERS" --data "$DATA" \
    --augment-on device --channels-last --iters 30 --warmup 10 \
    --out "$OUT/e2e.jsonl" "$@" 2>&1 | grep -v -E "Warning|warn\(" | tee -a "$OUT/run.log" \
    | grep -E "^(===|[A-Za-z0-9]+ \[|  )" || true
}

# Most important first: MoCo v2 at the recipe's 32 and at 64 per GPU (targets 1,300 / 2,000),
# with launches and GPU busy share; the other methods at 64; then MoCo's larger batches.
# bf16 AMP in all of them; then, for the AMP and compile-mode defaults, MoCo v2's fast path at
# 64 in fp32 and without CUDA graphs.
bench moco_64 pretrain_moco_v2.yaml 64 --amp --kernels --profile
bench moco_32 pretrain_moco_v2.yaml 32 --amp
bench insloc_c4_64 pretrain_insloc_c4.yaml 64 --amp
bench insloc_fpn_64 pretrain_insloc_fpn.yaml 64 --amp
bench detco_64 pretrain_detco.yaml 64 --amp
bench moco_128_256 pretrain_moco_v2.yaml 128,256 --amp --model-only
bench moco_64_fp32 pretrain_moco_v2.yaml 64 --paths fast --model-only
# The compile mode without CUDA graphs, for the COMPILE_MODE default.
bench moco_64_no_cuda_graphs pretrain_moco_v2.yaml 64 --amp --paths fast --model-only \
  MODEL.FAST_PATH.COMPILE_MODE default
echo "done in $((SECONDS - START))s" | tee -a "$OUT/run.log"
