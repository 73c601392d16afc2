#!/usr/bin/env bash
# Issue 15 study on LeViT-128S (timm's definition, 7.0 M parameters) / Fashion-MNIST: the
# dense baseline and the single-layer analysis of its conv/linear layers at two values of
# C. Every part resumes when rerun. The 28x28 images go through the stride-4 stem
# (small_input, chosen by `train` for images under 64 pixels): 7x7 tokens, then 4x4, 2x2.
#
# Data: 5,000 training images are held out as the validation split (--data-kw holdout=5000,
# docs/training.md); the dense training evaluates on it after every epoch, and the test split
# is read once at the end (`dense_test`, which keeps its first test.json).
#
# usage: experiments/madd_levit128s_fashion_mnist.sh [dense|dense_test|analyze|all]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
. experiments/test_once.sh
run=levit_128s_fashion_mnist
base=results/baselines/$run/checkpoint.pt
out=results/$run
what=${1:-all}
model=(--model levit_128s --model-kw img_size=28 small_input=true)
data=(--data fashion_mnist --data-kw holdout=5000)
# MADDness's trees (input objective, no refinement): the LayerSpec default until 2026-12-01,
# which every run here was made with; pinned so that their saved runs resume and compare
maddness=(--hash-objective input --refine-sweeps 0)
common=("${model[@]}" "${data[@]}" --checkpoint "$base" --threads 1 --no-progress --device cpu
        "${maddness[@]}")

if [ "$what" = dense ] || [ "$what" = all ]; then
    # the recipe for levit* on small data (AdamW, lr 1e-3, weight decay 0.05, batch 128,
    # 1 warm-up epoch, cosine, label smoothing 0.1, gradient clip 5): 15 epochs, about
    # 6 min of one core's CPU each
    experiments/run_baseline.sh "$run" -- "${model[@]}" "${data[@]}" --eval-split val \
        --threads 1
fi
if [ "$what" = dense_test ] || [ "$what" = all ]; then
    test_once "results/baselines/$run/test.json" "${model[@]}" "${data[@]}" --checkpoint "$base"
fi
if [ "$what" = analyze ] || [ "$what" = all ]; then
    # every conv/linear layer alone at D/C = 8 (the rule) and 16, on the first
    # 2,000 validation images (so settings chosen from it, e.g. --ncodebooks-from, are not
    # chosen on the test split)
    "$PY" -m maddnet.cli analyze "${common[@]}" --widths 8 16 --eval-split val \
        --eval-samples 2000 --out "$out/single_layer"
fi
