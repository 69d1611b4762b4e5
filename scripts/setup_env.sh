#!/usr/bin/env bash
# Idempotent set-up: creates .venv (or uses $VENV), installs torch/torchvision, an already
# importable detectron2 or else the PyPI republish of upstream detectron2's Python code, and
# this project in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP_LOG="$VENV/setup-pip.log"
: >"$PIP_LOG"  # this run only

# pip_install: pip with progress lines instead of minutes of silence (full output in $PIP_LOG).
source scripts/pip_install.sh

pip_install "upgrading pip" --upgrade "pip>=23"

if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
  pip_install "installing $TORCH_SPEC (about 1 GB to download on a fresh machine)" $TORCH_SPEC
fi

# Runtime deps of detectron2 (and ours). setuptools<81 keeps pkg_resources for fvcore/detectron2.
# cityscapesscripts + shapely: detectron2's Cityscapes loader and evaluator (Cityscapes benchmarks).
# submitit: --slurm submissions (docs/CLUSTERS.md). ruff pinned: `make lint` checks its formatting.
pip_install "installing detectron2's dependencies, scikit-image, scikit-learn, cityscapesscripts, submitit, pytest, ruff" \
  "fvcore>=0.1.5" "iopath>=0.1.7" pycocotools "omegaconf>=2.1,<2.4" \
  "hydra-core>=1.1" yacs termcolor tabulate cloudpickle tqdm tensorboard matplotlib Pillow \
  "setuptools<81" scikit-image scikit-learn cityscapesscripts shapely "submitit>=1.5" pytest "ruff==0.17.6"

if "$VPY" -c "import detectron2" 2>/dev/null; then
  echo "[setup] using installed detectron2 $("$VPY" -c 'import detectron2; print(detectron2.__version__)')"
else
  echo "[setup] detectron2 not importable: installing the PyPI republish sal-detectron2==0.7.2"
  tmp=$(mktemp -d)
  "$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 --platform any \
    -d "$tmp" sal-detectron2==0.7.2
  whl=$(ls "$tmp"/sal_detectron2-0.7.2-*.whl | head -n 1)
  # The wheel is pure Python but tagged cp310; retag it so pip accepts it on any Python 3.
  mv "$whl" "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  pip_install "installing detectron2" --no-deps "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  rm -rf "$tmp"
fi

pip_install "installing this project (editable)" --no-deps --no-build-isolation -e .
echo "[setup] ready: $VENV ($("$VPY" -c 'import torch, detectron2; print("torch", torch.__version__, "detectron2", detectron2.__version__)'))"
