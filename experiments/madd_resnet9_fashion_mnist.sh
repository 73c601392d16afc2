#!/usr/bin/env bash
# Issue 5 studies on ResNet-9 (width 16) / Fashion-MNIST, starting from the dense baseline
# in results/baselines/resnet9_fashion_mnist/ (experiments/run_baseline.sh resnet9_fashion_mnist ...).
# Both commands resume after an interruption: run this script again.
# usage: experiments/madd_resnet9_fashion_mnist.sh [analyze|retrain|retrain_stem9|retrain_long|retrain_inner|retrain_wide|retrain_wide_long|retrain_wide_long_aug|retrain_wide_long_seed1|dense_control|steering|surrogate_path|encoder_output|rule_long|encoder_output_refine|surrogate_bf16|encoder_pq_l1|wide_output_refine|wide_tree|dense_holdout|per_layer_c|all]
# steering: BUDGETS (default "0.5 0.75") and SEEDS (default "0") choose the runs
# surrogate_path: retrain_wide_long with the hard-path surrogate, SEEDS (default "0")
# encoder_output: retrain_long (the rule's C, stem C = 9) with the output-aware split objective
#   (docs/encoders.md: the best equal-cost variant at the AMM level), SEEDS (default "0")
# rule_long: retrain_long rerun with the current code beside encoder_output, SEEDS (default "0")
# encoder_output_refine: encoder_output with --refine-sweeps 1 (today's LayerSpec default), SEEDS
#   (default "0")
# surrogate_bf16: rule_long with --surrogate soft-bf16, SEEDS (default "0")
# encoder_pq_l1: rule_long with the pq-l1 encoder (multiplier-free, reads every input), SEEDS (default "0")
# wide_output_refine: retrain_wide_long (2x the rule's C) with output objective + 1 refine sweep,
#   SEEDS (default "0")
# wide_tree: retrain_wide_long rerun with the current code (seeded data order) beside
#   wide_output_refine, SEEDS (default "0")
# dense_holdout: a baseline trained without the 5,000 validation images, and its single-layer
#   analysis on them (what per-layer C should be chosen from)
# per_layer_c: after dense_holdout, the uniform rule against the per-layer allocation of its LUT
#   bytes (budget) or of its energy per inference (energy) on that baseline, SEEDS (default "0 1")
#   and VARIANTS (default "rule budget"; "energy" added 2026-12-01; "energy_refine": energy with
#   the output objective + 1 refine sweep, the best equal-cost trees, added 2026-12-02; "dense":
#   the hold-out baseline's dense control, the same steps with nothing replaced, 2026-12-02)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
. experiments/test_once.sh
base=results/baselines/resnet9_fashion_mnist/checkpoint.pt
out=results/resnet9_fashion_mnist
what=${1:-all}
# MADDness's trees (input objective, no refinement): the LayerSpec default until 2026-12-01,
# which every run here was made with; pinned so that their saved runs resume and compare
maddness=(--hash-objective input --refine-sweeps 0)
setup=(--model resnet9 --model-kw width=16 --data fashion_mnist --checkpoint "$base" --threads 1 --no-progress --device cpu)
common=("${setup[@]}" "${maddness[@]}")

# rule_long's retraining (the rule's C, stem C = 9; 400 steps per layer, 2,000 final) once per
# seed of SEEDS (default "0") into $out/NAME/seedS with the EXTRA flags (the encoder's settings
# among them): rule_long_runs NAME EXTRA...
rule_long_runs() {
    local name=$1
    shift
    for seed in ${SEEDS:-0}; do
        "$PY" -m maddnet.cli retrain "${setup[@]}" --steps-per-layer 400 --final-steps 2000 \
            --batch-size 128 --eval-samples 2000 --distill 0.5 --ncodebooks prep.0=9 --seed "$seed" \
            "$@" --out "$out/$name/seed${seed}"
    done
}

if [ "$what" = analyze ] || [ "$what" = all ]; then
    # every conv/linear layer alone, D/C = 9 (one codebook per 3x3 input channel) and 18 (half),
    # evaluated on the first 2,000 test images
    "$PY" -m maddnet.cli analyze "${common[@]}" --widths 9 18 --eval-samples 2000 --out "$out/single_layer"
fi
if [ "$what" = retrain ] || [ "$what" = all ]; then
    # ALL 9 conv/linear layers replaced (stem and classifier too), 50 fine-tuning steps per layer,
    # 150 final steps; intermediate evaluations on 2,000 test images, dense/last/final on all 10,000
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 50 --final-steps 150 \
        --batch-size 128 --eval-samples 2000 --distill 0.5 --out "$out/retrain"
fi
if [ "$what" = retrain_stem9 ] || [ "$what" = all ]; then
    # the same, but the stem (3x3 conv on 1 channel, D = 9) gets C = 9 (D/C = 1) instead of
    # C = 1: the single-layer analysis shows the stem alone costs 16 points at C = 1
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 50 --final-steps 150 \
        --batch-size 128 --eval-samples 2000 --distill 0.5 --ncodebooks prep.0=9 --out "$out/retrain_stem9"
fi
if [ "$what" = retrain_long ] || [ "$what" = all ]; then
    # stem C = 9 as above, at an 8x longer budget: 400 steps per layer (0.85 epochs), 2,000 final
    # steps (4.3 epochs); about 50 minutes on one core of an idle machine
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 400 --final-steps 2000 \
        --batch-size 128 --eval-samples 2000 --distill 0.5 --ncodebooks prep.0=9 --out "$out/retrain_long"
fi
if [ "$what" = retrain_inner ] || [ "$what" = all ]; then
    # the published setting: the first conv and the classifier stay dense, the 7 inner convs
    # are replaced; retrain_long's budget per layer
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 400 --final-steps 2000 \
        --batch-size 128 --eval-samples 2000 --distill 0.5 --exclude prep.0 fc --out "$out/retrain_inner"
fi
# twice the codebooks of the rule: 3x3 convs C = 2 Cin (D/C = 4.5), the classifier D/C = 4, stem C = 9
wide=(--ncodebooks prep.0=9 layer1.0.0=32 layer1.1.res1.0=64 layer1.1.res2.0=64 layer2.0=64
      layer3.0.0=128 layer3.1.res1.0=256 layer3.1.res2.0=256 fc=32)
if [ "$what" = retrain_wide ] || [ "$what" = all ]; then
    # all 9 layers with the wide codebooks at a smaller budget: 250 steps per layer, 1,500 final
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 250 --final-steps 1500 \
        --batch-size 128 --eval-samples 2000 --distill 0.5 "${wide[@]}" --out "$out/retrain_wide"
fi
if [ "$what" = retrain_wide_long ] || [ "$what" = all ]; then
    # the wide codebooks at retrain_long's budget (400 steps per layer, 2,000 final)
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 400 --final-steps 2000 \
        --batch-size 128 --eval-samples 2000 --distill 0.5 "${wide[@]}" --out "$out/retrain_wide_long"
fi
if [ "$what" = retrain_wide_long_aug ] || [ "$what" = all ]; then
    # as retrain_wide_long, fine-tuning with the baseline's augmentation (pad-and-crop, mirror)
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 400 --final-steps 2000 \
        --batch-size 128 --eval-samples 2000 --distill 0.5 --augment "${wide[@]}" \
        --out "$out/retrain_wide_long_aug"
fi
if [ "$what" = retrain_wide_long_seed1 ] || [ "$what" = all ]; then
    # retrain_wide_long again with another seed (calibration batches, data order): run-to-run noise
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 400 --final-steps 2000 \
        --batch-size 128 --eval-samples 2000 --distill 0.5 "${wide[@]}" --seed 1 \
        --out "$out/retrain_wide_long_seed1"
fi
if [ "$what" = dense_control ] || [ "$what" = all ]; then
    # control for retrain_wide_long: the same loss, optimiser and total budget
    # (9 x 400 + 2,000 = 5,600 steps) spent fine-tuning the dense model, nothing replaced
    "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 400 --final-steps 2000 \
        --batch-size 128 --eval-samples 2000 --distill 0.5 --dense-control --out "$out/dense_control"
fi
if [ "$what" = steering ]; then
    # issue 12: retrain_wide_long with a channel budget on every converted layer's trees, then
    # prune_unread (passes.json has the savings). Compare with retrain_wide_long / _seed1
    # (budget 1.0) and dense_control, all at the same budget of steps.
    for seed in ${SEEDS:-0}; do
        for b in ${BUDGETS:-0.5 0.75}; do
            "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 400 --final-steps 2000 \
                --batch-size 128 --eval-samples 2000 --distill 0.5 "${wide[@]}" --seed "$seed" \
                --channel-budget "$b" --prune-unread --out "$out/steering/budget${b}_seed${seed}"
        done
    done
fi
if [ "$what" = surrogate_path ]; then
    # issue 16: retrain_wide_long with the faster hard-path surrogate (compare: retrain_wide_long,
    # retrain_wide_long_seed1, dense_control)
    for seed in ${SEEDS:-0}; do
        "$PY" -m maddnet.cli retrain "${common[@]}" --steps-per-layer 400 --final-steps 2000 \
            --batch-size 128 --eval-samples 2000 --distill 0.5 "${wide[@]}" --seed "$seed" \
            --surrogate path --out "$out/surrogate_path/seed${seed}"
    done
fi
if [ "$what" = encoder_output ]; then
    # issue 11: the rule's C (D/C = 9; stem C = 9) at retrain_long's budget with
    # --hash-objective output (compare: retrain_long 92.01 %, dense_control 94.83 %)
    rule_long_runs encoder_output --hash-objective output --refine-sweeps 0
fi
if [ "$what" = encoder_output_refine ]; then
    # issue 11: encoder_output plus one sweep of tree refinement (coordinate descent on the split
    # columns and thresholds against the solved LUT; same hardware cost), SEEDS (default "0")
    rule_long_runs encoder_output_refine --hash-objective output --refine-sweeps 1
fi
if [ "$what" = rule_long ]; then
    # issue 11's baseline beside encoder_output: retrain_long (the rule's C, stem C = 9) rerun
    # with the current code (seeded data order), SEEDS (default "0")
    rule_long_runs rule_long "${maddness[@]}"
fi
if [ "$what" = surrogate_bf16 ]; then
    # issue 16: rule_long with the soft surrogate's leaf-score product in bfloat16
    # (--surrogate soft-bf16: that product about 2x faster on AVX512-BF16 CPUs), beside rule_long
    # of the same seed, SEEDS (default "0")
    rule_long_runs surrogate_bf16 "${maddness[@]}" --surrogate soft-bf16
fi
if [ "$what" = encoder_pq_l1 ]; then
    # issue 11's best multiplier-free encoder at the network level: rule_long with --encoder
    # pq-l1 (nearest of 16 centroids per block under L1: reads every input, no multiply);
    # several hours on one core (its soft-argmin backward is a fused kernel), SEEDS (default "0")
    rule_long_runs encoder_pq_l1 --encoder pq-l1
fi
if [ "$what" = wide_output_refine ]; then
    # issue 11 at retrain_wide_long's budget and codebooks (2x the rule's C): the best equal-cost
    # trees (output objective + 1 refine sweep, LayerSpec's default since 2026-12-01) beside
    # retrain_wide_long / retrain_wide_long_seed1 (MADDness's trees), SEEDS (default "0")
    rule_long_runs wide_output_refine --hash-objective output --refine-sweeps 1 "${wide[@]}"
fi
if [ "$what" = wide_tree ]; then
    # MADDness's trees at 2x the rule's C with the current code: retrain_wide_long and its seed-1
    # repeat were made on 2026-11-28 with the data in sequential order, wide_output_refine with
    # the seeded sampler, so this is the comparison of the encoders alone
    rule_long_runs wide_tree "${maddness[@]}" "${wide[@]}"
fi
if [ "$what" = dense_holdout ]; then
    # issue 11's method: a ResNet-9 baseline that never saw the 5,000 held-out validation
    # images (the recipe's 8 epochs on the other 55,000), the test split read once at the end;
    # then the single-layer analysis on the validation split, for choosing per-layer C
    hb=results/baselines/resnet9_fashion_mnist_holdout
    experiments/run_baseline.sh resnet9_fashion_mnist_holdout -- --model resnet9 --model-kw width=16 \
        --data fashion_mnist --data-kw holdout=5000 --eval-split val --threads 1
    test_once "$hb/test.json" --model resnet9 --model-kw width=16 --data fashion_mnist \
        --data-kw holdout=5000 --checkpoint "$hb/checkpoint.pt"
    "$PY" -m maddnet.cli analyze --model resnet9 --model-kw width=16 --data fashion_mnist \
        --data-kw holdout=5000 --checkpoint "$hb/checkpoint.pt" --threads 1 --no-progress --device cpu \
        "${maddness[@]}" --widths 4.5 9 18 --eval-split val --eval-samples 2000 --out "$out/single_layer_val"
fi
if [ "$what" = per_layer_c ]; then
    # issue 11, item 3 at the network level (after dense_holdout): on the hold-out baseline,
    # the uniform rule (D/C = 9; classifier D/C = 8) against the per-layer allocation of the
    # same LUT bytes chosen from the validation-split analysis (docs/encoders.md, "Per-layer
    # C"), both at rule_long's budget of steps, validated on the 5,000 held-out images, the
    # test split read once per run; SEEDS (default "0 1"), VARIANTS (default "rule budget")
    hb=results/baselines/resnet9_fashion_mnist_holdout
    net=(--model resnet9 --model-kw width=16 --data fashion_mnist --data-kw holdout=5000)
    steps=(--steps-per-layer 400 --final-steps 2000 --batch-size 128 --eval-split val --eval-samples 2000
           --distill 0.5 --threads 1 --no-progress --device cpu --checkpoint "$hb/checkpoint.pt"
           "${maddness[@]}")
    for seed in ${SEEDS:-0 1}; do
        for v in ${VARIANTS:-rule budget}; do
            run="$out/per_layer_c/${v}_seed${seed}"
            extra=()
            if [ "$v" = budget ]; then
                extra=(--ncodebooks-from "$out/single_layer_val/single_layer.json" --budget lut-bytes)
            elif [ "$v" = energy ]; then  # the rule's energy per inference instead of its LUT bytes
                extra=(--ncodebooks-from "$out/single_layer_val/single_layer.json" --budget energy)
            elif [ "$v" = dense ]; then  # the dense control: the same steps, nothing replaced
                extra=(--dense-control)
            elif [ "$v" = energy_refine ]; then  # energy, trees as LayerSpec's default (2026-12-01)
                extra=(--ncodebooks-from "$out/single_layer_val/single_layer.json" --budget energy
                       --hash-objective output --refine-sweeps 1)
            fi
            "$PY" -m maddnet.cli retrain "${net[@]}" "${steps[@]}" --seed "$seed" "${extra[@]}" --out "$run"
            test_once "$run/test.json" "${net[@]}" --checkpoint "$run/checkpoint.pt"
        done
    done
fi
