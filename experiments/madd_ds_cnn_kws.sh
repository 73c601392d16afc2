#!/usr/bin/env bash
# Issue 5 studies on DS-CNN-S / the espeak-ng keyword set (data/kws_espeak, built by
# scripts/make_kws_espeak.py), from the dense baseline in results/baselines/ds_cnn_s_kws_espeak/.
# Depthwise convs (groups > 1) stay dense: MADD layers need groups = 1 (the analysis lists them).
# Both commands resume after an interruption: run this script again.
# usage: experiments/madd_ds_cnn_kws.sh [analyze|retrain|retrain_long|retrain_wide|retrain_wider|dense_control|steering|surrogate_path|encoders|budget|all]
# steering: BUDGETS (default "1.0 0.75 0.5") and SEEDS (default "0 1") choose the runs
# surrogate_path: retrain_wider with the hard-path surrogate, SEEDS (default "0 1"); compare with
#   steering/budget1.0_seed* (the soft surrogate, same code and seeds)
# encoders: issue 11 at the rule's C (retrain_long: stem C = 10, D/C = 8), one run per encoder
#   variant in VARIANTS (default "tree output output-refine refine pq-l1 tree-global pq";
#   output-refine: the output objective with 1 refine sweep, today's LayerSpec default; refine:
#   the input objective with 1 refine sweep) and seed in SEEDS (default
#   "0 1"), evaluated on the speaker-disjoint validation split; the test split is read once per
#   run at the end (test.json)
# budget: per-layer C from a validation-split analysis at the uniform rule's LUT bytes (with and
#   without extrapolated C), beside the rule (stem C = 5) itself; SEEDS (default "0 1")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
. experiments/test_once.sh
base=results/baselines/ds_cnn_s_kws_espeak/checkpoint.pt
out=results/ds_cnn_s_kws_espeak
what=${1:-all}
net=(--model ds_cnn_s --data speech_commands --data-root data/kws_espeak)
# MADDness's trees (input objective, no refinement): the LayerSpec default until 2026-12-01,
# which every run here was made with; pinned so that their saved runs resume and compare
maddness=(--hash-objective input --refine-sweeps 0)
setup=("${net[@]}" --checkpoint "$base" --threads 1 --no-progress --device cpu)
common=("${setup[@]}" "${maddness[@]}")

if [ "$what" = analyze ] || [ "$what" = all ]; then
    "$PY" -m maddnet.cli analyze "${common[@]}" --widths 8 16 --batch-size 100 --out "$out/single_layer"
fi
if [ "$what" = retrain ] || [ "$what" = all ]; then
    # every conv/linear layer with groups = 1 (first conv, pointwise convs, classifier). The stem
    # (10x4 kernel on 1 MFCC channel, D = 40) gets C = 10 (D/C = 4) instead of the rule's
    # max(Cin, ceil(D / 9)) = 5: the single-layer analysis shows it is the most
    # sensitive layer (MFCC inputs span a wide range).
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 100 --final-steps 300 \
        --ncodebooks stem.0=10 \
        --batch-size 100 --distill 0.5 --out "$out/retrain"
fi
if [ "$what" = retrain_long ] || [ "$what" = all ]; then
    # the first retrain's codebooks (stem C = 10, D/C = 8 elsewhere) at retrain_wide's budget:
    # separates the effect of the budget from that of C
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 300 --final-steps 1000 \
        --ncodebooks stem.0=10 \
        --batch-size 100 --distill 0.5 --out "$out/retrain_long"
fi
if [ "$what" = retrain_wide ] || [ "$what" = all ]; then
    # the same layers with twice the codebooks (D/C = 4 for the pointwise convs and the
    # classifier, stem C = 20, D/C = 2) and a 3x longer budget: 300 steps per layer, 1,000 final
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 300 --final-steps 1000 \
        --ncodebooks stem.0=20 --codebook-width 4 \
        --batch-size 100 --distill 0.5 --out "$out/retrain_wide"
fi
if [ "$what" = retrain_wider ] || [ "$what" = all ]; then
    # twice retrain_wide's codebooks again: D/C = 2 for the pointwise convs and the classifier
    # (C = 32), stem C = 40 (D/C = 1), at the same budget
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 300 --final-steps 1000 \
        --ncodebooks stem.0=40 --codebook-width 2 \
        --batch-size 100 --distill 0.5 --out "$out/retrain_wider"
fi
if [ "$what" = dense_control ] || [ "$what" = all ]; then
    # control for the 300 + 1,000 runs: the same loss, optimiser and total budget
    # (6 x 300 + 1,000 = 2,800 steps) spent fine-tuning the dense model, nothing replaced
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 300 --final-steps 1000 \
        --batch-size 100 --distill 0.5 --dense-control --out "$out/dense_control"
fi
if [ "$what" = steering ]; then
    # issue 12: retrain_wider with a channel budget on every converted layer's trees, then
    # prune_unread (passes.json has the savings); budget 1.0 is retrain_wider rerun with the
    # same code and seed, so each budget is compared within one seed
    for seed in ${SEEDS:-0 1}; do
        for b in ${BUDGETS:-1.0 0.75 0.5}; do
            "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 300 --final-steps 1000 \
                --ncodebooks stem.0=40 --codebook-width 2 --batch-size 100 --distill 0.5 \
                --seed "$seed" --channel-budget "$b" --prune-unread \
                --out "$out/steering/budget${b}_seed${seed}"
        done
        "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 300 --final-steps 1000 \
            --batch-size 100 --distill 0.5 --dense-control --seed "$seed" \
            --out "$out/steering/dense_control_seed${seed}"
    done
fi
if [ "$what" = surrogate_path ]; then
    # issue 16: does the faster path surrogate train as well as the soft one?
    for seed in ${SEEDS:-0 1}; do
        "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 300 --final-steps 1000 \
            --ncodebooks stem.0=40 --codebook-width 2 --batch-size 100 --distill 0.5 \
            --seed "$seed" --surrogate path --out "$out/surrogate_path/seed${seed}"
    done
fi
if [ "$what" = encoders ]; then
    for seed in ${SEEDS:-0 1}; do
        for v in ${VARIANTS:-tree output output-refine refine pq-l1 tree-global pq}; do
            case $v in
                tree) enc=("${maddness[@]}") ;;
                output) enc=(--hash-objective output --refine-sweeps 0) ;;
                output-refine) enc=(--hash-objective output --refine-sweeps 1) ;;
                refine) enc=(--hash-objective input --refine-sweeps 1) ;;
                tree-global) enc=(--encoder tree-global --encoder-option refine_sweeps=1) ;;
                *) enc=(--encoder "$v") ;;
            esac
            run="$out/encoders/${v}_seed${seed}"
            "$PY" -m maddnet.cli retrain "${setup[@]}" --steps-per-layer 300 --final-steps 1000 \
                --ncodebooks stem.0=10 --batch-size 100 --distill 0.5 --seed "$seed" \
                --eval-split val "${enc[@]}" --out "$run"
            test_once "$run/test.json" "${net[@]}" --checkpoint "$run/checkpoint.pt"
        done
    done
fi
if [ "$what" = budget ]; then
    # issue 11, per-layer C: the single-layer analysis on the validation split at D/C = 2, 4, 8
    # and 16, then retraining (retrain_long's steps) with the C per layer that minimises the
    # summed single-layer drop at the LUT bytes of the uniform rule (D/C = 8, stem C = 5),
    # beside the uniform rule itself at that cost, with (budget_lut: --budget-octaves 1) and
    # without (budget_lut_octaves0: --budget-octaves 0, now the default) C extrapolated
    # beyond the analysed ones;
    # SEEDS (default "0 1"); chosen and compared on the validation split, the test split read
    # once per run (test.json)
    "$PY" -m maddnet.cli analyze "${common[@]}" --widths 2 4 8 16 --batch-size 100 --eval-split val \
        --out "$out/single_layer_val"
    for seed in ${SEEDS:-0 1}; do
        for v in rule budget_lut budget_lut_octaves0; do
            allocation=(--ncodebooks-from "$out/single_layer_val/single_layer.json" --budget lut-bytes)
            case $v in
                rule) alloc=() ;;
                budget_lut) alloc=("${allocation[@]}" --budget-octaves 1) ;;  # the default until 2026-11-30
                budget_lut_octaves0) alloc=("${allocation[@]}" --budget-octaves 0) ;;
            esac
            run="$out/encoders/${v}_seed${seed}"
            "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 300 --final-steps 1000 \
                --batch-size 100 --distill 0.5 --seed "$seed" --eval-split val "${alloc[@]}" --out "$run"
            test_once "$run/test.json" "${net[@]}" --checkpoint "$run/checkpoint.pt"
        done
    done
fi
