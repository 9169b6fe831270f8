#!/usr/bin/env bash
# The demo chain on one GPU in bf16 at demo size: tokenizer, BEiT, MAE, MILAN, classification and
# segmentation fine-tunes (detection left out), then the checks: every logged loss finite, every export
# loads and gives finite outputs, the fine-tuning table exists; the demo's results table is printed.
#
#   scripts/gpu_smoke.sh              on the GPU (bf16), into runs/gpu_smoke
#   scripts/gpu_smoke.sh --cpu        the same chain on CPU in fp32 (a dry run of the chain itself)
#   scripts/gpu_smoke.sh --dry-run    print the commands only
#
# Environment: OUT (run root), PY (python; default .venv/bin/python). Exit 0 only if every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda precision=bf16 dry=""
for arg in "$@"; do
  case "$arg" in
    --cpu) device=cpu precision=fp32 ;;
    --dry-run) dry=1 ;;
    *) echo "gpu_smoke.sh: unknown argument '$arg' (expected --cpu, --dry-run)" >&2; exit 2 ;;
  esac
done
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_smoke}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

# demo sizes, a shorter budget: the point is every path on the device, not the table's numbers
demo=("$PY" -m mimkit.demo --device "$device" --precision "$precision" --nproc 1 --fresh --out "$OUT"
      --tokenizer-steps 100 --pretrain-steps 200 --mae-steps 200 --milan-steps 100
      --finetune-epochs 10 --finetune-seeds 0 --detect-steps 0)
check=("$PY" -m mimkit.demo.smoke "$OUT")

if [ -n "$dry" ]; then
  printf '%q ' "${demo[@]}"; echo
  printf '%q ' "${check[@]}"; echo
  exit 0
fi
if [ "$device" = cuda ]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_smoke.sh: no CUDA device (use --cpu)")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
start=$SECONDS
"${demo[@]}"
"${check[@]}"
echo "gpu_smoke.sh: $device $precision chain and checks passed in $((SECONDS - start)) s"
