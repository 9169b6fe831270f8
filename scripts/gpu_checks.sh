#!/usr/bin/env bash
# Every GPU check in one command, for a GPU machine lent for minutes (a PyTorch image, no network):
# install what the image lacks (wheels from scripts/offline_wheels.sh in .whl, and mimkit itself), then
#   smoke   scripts/gpu_smoke.sh: the demo chain in bf16 on one GPU and its checks;
#   bench   bench/gpu.py --data --profile 5: BEiT / MAE / MILAN ViT-B/16 vs timm, the data paths, a profile.
# What a person reads lands in OUT (default runs/gpu_checks): versions.txt, smoke.log, gpu.json, bench.log.
#
#   scripts/gpu_checks.sh [smoke|bench|all] [--cpu]     (--cpu: the same on CPU at tiny sizes, to try it)
set -uo pipefail
cd "$(dirname "$0")/.."
what=all cpu=""
for arg in "$@"; do
  case "$arg" in
    smoke|bench|all) what=$arg ;;
    --cpu) cpu=1 ;;
    *) echo "gpu_checks.sh: unknown argument '$arg' (expected smoke, bench, all, --cpu)" >&2; exit 2 ;;
  esac
done
PY=${PY:-python3}
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps .whl/*.whl || exit 1
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch, torchvision, timm, deepspeed, open_clip, accelerate, mimkit
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("torchvision", torchvision.__version__, "timm", timm.__version__, "deepspeed", deepspeed.__version__,
      "open_clip", open_clip.__version__, "accelerate", accelerate.__version__)'
} 2>&1 | tee "$OUT/versions.txt"

status=0
if [ "$what" != bench ]; then
  start=$SECONDS
  OUT=${SMOKE_OUT:-runs/gpu_smoke} PY="$PY" bash scripts/gpu_smoke.sh ${cpu:+--cpu} > "$OUT/smoke.log" 2>&1
  rc=$?; [ $rc -eq 0 ] || status=1
  echo "smoke: exit $rc after $((SECONDS - start)) s; last lines:"; tail -n 40 "$OUT/smoke.log"
fi
if [ "$what" != smoke ]; then
  start=$SECONDS
  bench=(--data --profile 5 --out "$OUT/gpu.json")
  [ -n "$cpu" ] && bench=(--tiny --device cpu --steps 3 --warmup 1 --profile 2 --out "$OUT/gpu.json")
  "$PY" bench/gpu.py "${bench[@]}" > "$OUT/bench.log" 2>&1
  rc=$?; [ $rc -eq 0 ] || status=1
  echo "bench: exit $rc after $((SECONDS - start)) s; goals:"
  "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(json.dumps(r["goals"], indent=1))' "$OUT/gpu.json" \
    || tail -n 40 "$OUT/bench.log"
fi
exit $status
