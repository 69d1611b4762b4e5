#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU machine lacks for projects/InsLocDetCo/bench/device/
# run_all.sh: its image has Python 3.12, torch, torchvision, numpy, Pillow, matplotlib,
# scikit-image, tensorboard, but not detectron2 and the small packages it imports. Pure-Python
# packages published only as source are built into wheels here (pip wheel); pycocotools is the
# CPython 3.12 manylinux wheel. Run from anywhere; needs pip and the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# detectron2 0.7.2, pure Python, republished on PyPI with a cp310 tag: retagged for any Python 3.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 --platform any \
  -d "$tmp" sal-detectron2==0.7.2
mv "$tmp"/sal_detectron2-0.7.2-*.whl "$DEST/sal_detectron2-0.7.2-py3-none-any.whl"

# Pure-Python dependencies (some only as source distributions): wheels built or fetched here.
"$PY" -m pip wheel -q --no-deps -w "$DEST" \
  "fvcore>=0.1.5" "iopath>=0.1.7" "antlr4-python3-runtime==4.9.3" "omegaconf>=2.1,<2.4" \
  "hydra-core>=1.1" yacs termcolor portalocker "setuptools<81"

# The one compiled dependency, for the GPU machine's CPython 3.12 on x86-64.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" pycocotools

ls -la "$DEST"
du -sh "$DEST"
