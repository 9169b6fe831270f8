#!/usr/bin/env bash
# The wheels that install mimkit on a GPU machine whose image already has PyTorch (torch, torchvision,
# timm, accelerate, numpy, scikit-image, ...) but no network: what mimkit needs beyond such an image, at
# the versions of this checkout's .venv, for the target's Python. Run it where pip reaches the index:
#
#   scripts/offline_wheels.sh [DIR] [PYTHON_VERSION]      # default: .whl 3.12
#
# then, on the machine (scripts/gpu_checks.sh does this when DIR is .whl):
#
#   python3 -m pip install --no-index --no-deps DIR/*.whl
#   python3 -m pip install --no-index --no-deps --no-build-isolation -e .
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
py=${2:-3.12}
PIP=(.venv/bin/python -m pip)
version() { .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# binary wheels (compiled ones for the target's Python): mimkit's dependencies a PyTorch image lacks, and theirs
binary=(open_clip_torch ftfy wcwidth webdataset braceexpand omegaconf submitit pycocotools
        hjson pydantic pydantic-core annotated-types typing-inspection)
mkdir -p "$dir"
pins=()
for name in "${binary[@]}"; do pins+=("$name==$(version "$name")"); done
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" "${pins[@]}"
# DeepSpeed ships as a source archive: built here into a pure-Python wheel (its C++ ops compile on first use)
DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$dir" "deepspeed==$(version deepspeed)"
ls -1 "$dir"
echo "offline_wheels.sh: $(ls "$dir" | wc -l) wheels, $(du -sh "$dir" | cut -f1), for Python $py in $dir"
