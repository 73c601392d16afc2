#!/usr/bin/env bash
# Issue 5 study on LeViT-tiny / Fashion-MNIST (32x32 input), from the dense baseline in
# results/baselines/levit_tiny_fashion_mnist/: the single-layer analysis of its
# conv/linear layers (stem convs, attention qkv/proj, MLPs, heads) at D/C = 8, on the first 2,000 test images.
# (The layer-by-layer retraining of its 34 conv/linear layers has not been run yet.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
base=results/baselines/levit_tiny_fashion_mnist/checkpoint.pt
"$PY" -m maddnet.cli analyze --model levit_tiny --data fashion_mnist --checkpoint "$base" \
    --widths 8 --eval-samples 2000 --threads 2 --no-progress --out results/levit_tiny_fashion_mnist/single_layer
