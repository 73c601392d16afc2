#!/usr/bin/env bash
# Issue 15 study on ResNet-50 / Fashion-MNIST: the dense baseline, the single-layer analysis
# of all 54 conv/linear layers, and layer-by-layer retraining with every one of them replaced
# against a dense control of the same budget. Every part resumes when rerun (checkpoints
# per step / per analysis cell), so run it in pieces across sessions.
#
# The model: torchvision's ResNet-50 with the small-input stem at stride 2
# (--model-kw small_input=true stem_stride=2: a 3x3 stride-2 first conv, no max pool), so
# the 28x28 images run at 14x14 in layer1 and 2x2 in layer4. The stride-1 CIFAR stem costs
# 4x the MACs (about 1.9 s of CPU per 64-image training step against 0.5 s here, hours per
# epoch on one core); ImageNet's 7x7/2 stem and max pool would leave layer4 at 1x1, where
# a 3x3 conv reads only its centre tap.
#
# Data: 5,000 training images are held out as the validation split (--data-kw holdout=5000,
# docs/training.md); the dense training evaluates on it after every epoch, and the test split
# is read once at the end (`dense_test`, which keeps its first test.json).
#
# usage: experiments/madd_resnet50_fashion_mnist.sh [dense|dense_test|analyze|retrain|dense_control|retrain_lowlr|dense_control_lowlr|all]
# retrain_lowlr, dense_control_lowlr: retrain and dense_control with the dense and norm
#   parameters at lr 1e-4 instead of 1e-3 (20 AdamW steps at 1e-3 alone cost the dense model
#   5.6 points of val top-1, at 1e-4 0.9; docs/results.md); not part of `all`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
. experiments/test_once.sh
run=resnet50_fashion_mnist
base=results/baselines/$run/checkpoint.pt
out=results/$run
what=${1:-all}
model=(--model resnet50 --model-kw small_input=true stem_stride=2)
data=(--data fashion_mnist --data-kw holdout=5000)
# MADDness's trees (input objective, no refinement): the LayerSpec default until 2026-12-01,
# which every run here was made with; pinned so that their saved runs resume and compare
maddness=(--hash-objective input --refine-sweeps 0)
common=("${model[@]}" "${data[@]}" --checkpoint "$base" --threads 1 --no-progress --device cpu
        "${maddness[@]}")

if [ "$what" = dense ] || [ "$what" = all ]; then
    # the recipe for resnet* on small data (SGD, lr 0.1, batch 128, 1 warm-up epoch, cosine,
    # label smoothing 0.1, pad-and-crop + mirror) for 5 epochs: about 25 min of one core's
    # CPU per epoch
    experiments/run_baseline.sh "$run" -- "${model[@]}" "${data[@]}" --eval-split val \
        --epochs 5 --threads 1
fi
if [ "$what" = dense_test ] || [ "$what" = all ]; then
    # the test split, read once for the finished dense model
    test_once "results/baselines/$run/test.json" "${model[@]}" "${data[@]}" --checkpoint "$base"
fi
if [ "$what" = analyze ] || [ "$what" = all ]; then
    # every conv/linear layer alone at D/C = 9 and 18, on the first
    # 2,000 validation images (so settings chosen from it, e.g. --ncodebooks-from, are not
    # chosen on the test split)
    "$PY" -m maddnet.cli analyze "${common[@]}" --widths 9 18 --eval-split val \
        --eval-samples 2000 --out "$out/single_layer"
fi
if [ "$what" = retrain ] || [ "$what" = all ]; then
    # all 54 conv/linear layers at the rule's C (D/C = 9 for 3x3 convs, 8 for 1x1 and the
    # classifier; the stem, 3x3 on the grey image with D = 9, gets C = 9 as ResNet-9's does),
    # 20 fine-tuning steps per layer and 400 final steps of 64 images: about 1,500 steps in
    # all; evaluated on the validation split (first 1,000 images per step, all 5,000 at the
    # end), the test split read once at the end (test.json)
    "$PY" -m maddnet.cli retrain "${common[@]}" --ncodebooks conv1=9 --steps-per-layer 20 \
        --final-steps 400 --batch-size 64 --distill 0.5 --eval-split val --eval-samples 1000 \
        --out "$out/retrain"
    test_once "$out/retrain/test.json" "${model[@]}" "${data[@]}" --checkpoint "$out/retrain/checkpoint.pt"
fi
if [ "$what" = dense_control ] || [ "$what" = all ]; then
    # control for retrain: the same loss, optimiser and total budget (54 x 20 + 400 = 1,480
    # steps of 64 images) spent fine-tuning the dense model, nothing replaced
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 20 --final-steps 400 \
        --batch-size 64 --distill 0.5 --eval-split val --eval-samples 1000 --dense-control \
        --out "$out/dense_control"
    test_once "$out/dense_control/test.json" "${model[@]}" "${data[@]}" \
        --checkpoint "$out/dense_control/checkpoint.pt"
fi
if [ "$what" = retrain_lowlr ]; then
    "$PY" -m maddnet.cli retrain "${common[@]}" --ncodebooks conv1=9 --steps-per-layer 20 \
        --final-steps 400 --batch-size 64 --distill 0.5 --eval-split val --eval-samples 1000 \
        --lr-dense 1e-4 --lr-norm 1e-4 --out "$out/retrain_lowlr"
    test_once "$out/retrain_lowlr/test.json" "${model[@]}" "${data[@]}" \
        --checkpoint "$out/retrain_lowlr/checkpoint.pt"
fi
if [ "$what" = dense_control_lowlr ]; then
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 20 --final-steps 400 \
        --batch-size 64 --distill 0.5 --eval-split val --eval-samples 1000 --dense-control \
        --lr-dense 1e-4 --lr-norm 1e-4 --out "$out/dense_control_lowlr"
    test_once "$out/dense_control_lowlr/test.json" "${model[@]}" "${data[@]}" \
        --checkpoint "$out/dense_control_lowlr/checkpoint.pt"
fi
