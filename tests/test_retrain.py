"""Layer-by-layer retraining: the pipeline runs, freezes what it should, resumes exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from maddnet.nn import MaddConfig, MaddLayer, convert_layer, madd_layers, rebuild
from maddnet.retrain import RetrainConfig, Retrainer, parameter_groups, run_retrain, write_report
from maddnet.retrain import pipeline as pipeline_module
from maddnet.retrain.pipeline import RetrainLoss

pytest.importorskip("sklearn")


def tiny_config(out_dir, **overrides) -> RetrainConfig:
    values = dict(
        model="resnet9",
        model_kwargs={"width": 4},
        dataset="digits",
        out_dir=str(out_dir),
        baseline_steps=40,
        steps_per_layer=2,
        final_steps=3,
        batch_size=32,
        eval_batch_size=512,
        calib_batches=10,
        lr_dense=1e-2,
        lr_norm=1e-2,
        lr_lut=1e-3,
        lr_threshold=1e-3,
        progress=False,
        threads=1,
    )
    values.update(overrides)
    return RetrainConfig(**values)


EXPECTED_ORDER = [
    "prep.0",
    "layer1.0.0",
    "layer1.1.res1.0",
    "layer1.1.res2.0",
    "layer2.0",
    "layer3.0.0",
    "layer3.1.res1.0",
    "layer3.1.res2.0",
    "fc",
]


def test_every_layer_is_replaced_in_forward_order_and_reported(tmp_path):
    result = run_retrain(tiny_config(tmp_path))
    assert result["order"] == EXPECTED_ORDER
    assert set(madd_layers(result["model"])) == set(EXPECTED_ORDER)
    rows = result["rows"]
    assert [r["step"] for r in rows] == list(range(len(EXPECTED_ORDER) + 2))
    assert [r["phase"] for r in rows] == ["dense"] + ["replace"] * 9 + ["final"]
    assert rows[0]["top1"] > 0.5  # the dense baseline learned something (10 classes)
    for row in rows[1:-1]:
        assert 0.0 <= row["replaced_top1"] <= 1.0 and row["C"] >= 1
    assert rows[-1]["replaced"] == 9
    paths = write_report(tmp_path, rows, json.loads((tmp_path / "config.json").read_text()))
    report = paths["md"].read_text()
    assert "after replacing 9 layers and the final fine-tune" in report
    assert "fc" in report and paths["png"].exists()


def test_interrupted_run_resumes_at_the_step_it_was_in(tmp_path, monkeypatch):
    three = {"layers": ["prep.0", "layer2.0", "fc"], "eval_samples": 100}
    reference = run_retrain(tiny_config(tmp_path / "ref", **three))["rows"]

    original = Retrainer._replace_step
    calls = {"n": 0}

    def crash_on_third(self, model, order, index, loss, teacher):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, model, order, index, loss, teacher)

    monkeypatch.setattr(Retrainer, "_replace_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_retrain(tiny_config(tmp_path / "run", **three))
    before = [
        json.loads(line) for line in (tmp_path / "run" / pipeline_module.METRICS).read_text().splitlines()
    ]
    saved = torch.load(tmp_path / "run" / pipeline_module.CHECKPOINT, weights_only=False)
    assert saved["next_step"] == 3  # dense step and two replacements done
    assert [r["step"] for r in before] == [0, 1, 2]

    # The checkpoint restores the model of step 2 exactly: same evaluation, bit for bit.
    retrainer = Retrainer(tiny_config(tmp_path / "run", **three))
    model = rebuild(retrainer._fresh_model(), saved["plan"])
    model.load_state_dict(saved["state_dict"])
    assert retrainer._evaluate(model, full=False)["top1"] == before[2]["top1"]

    monkeypatch.setattr(Retrainer, "_replace_step", original)
    resumed = run_retrain(tiny_config(tmp_path / "run", **three))["rows"]
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [0, 1, 2, 3, 4]
    assert resumed[:3] == before  # finished steps are kept, not redone
    # Steps after the resume repeat the uninterrupted run up to floating-point noise: BLAS
    # and vectorised sums may round differently on differently aligned memory, and a few
    # training steps amplify that a little.
    for a, b in zip(resumed[3:], reference[3:], strict=True):
        assert a["top1"] == pytest.approx(b["top1"], abs=0.05)
    # intermediate steps on the first 100 eval samples; dense, last replacement and final on all
    assert [r["samples"] for r in resumed] == [359, 100, 100, 359, 359]
    assert all(r["replaced_samples"] == 100 for r in resumed if r["phase"] == "replace")


def test_resume_with_another_config_is_refused(tmp_path):
    config = tiny_config(tmp_path, baseline_steps=2, steps_per_layer=0, final_steps=0, layers=["fc"])
    run_retrain(config)
    with pytest.raises(ValueError, match="another config"):
        run_retrain(tiny_config(tmp_path, baseline_steps=2, steps_per_layer=1, final_steps=0, layers=["fc"]))


def test_parameter_groups_freeze_earlier_layers_unless_asked(tmp_path):
    three = {"layers": ["prep.0", "layer2.0", "fc"], "steps_per_layer": 0, "final_steps": 0}
    config = tiny_config(tmp_path, train_replaced=False, **three)
    result = Retrainer(config).run()
    model, order = result["model"], result["order"]
    groups = parameter_groups(model, order, 1, config)  # the step of layer2.0
    trainable = {id(p) for g in groups for p in g["params"]}
    first = model.get_submodule(order[0])
    current = model.get_submodule(order[1])
    following = model.get_submodule(order[2])
    dense_before = model.get_submodule("layer1.0.0")  # not selected: stays dense, trains as "norm"
    assert id(following.lut) not in trainable  # a MADD layer after the current one is not trained
    assert id(dense_before.weight) in trainable
    assert id(first.lut) not in trainable and not first.lut.requires_grad  # frozen after its step
    assert id(current.lut) in trainable and id(current.thresholds) in trainable
    assert {g["name"] for g in groups} >= {"lut", "threshold", "norm"}
    config_all = tiny_config(tmp_path, train_replaced=True, **three)
    trainable_all = {id(p) for g in parameter_groups(model, order, 1, config_all) for p in g["params"]}
    assert id(first.lut) in trainable_all


def test_bad_configs_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="checkpoint"):
        RetrainConfig(model="resnet9", dataset="digits")
    with pytest.raises(ValueError, match="distill"):
        tiny_config(tmp_path, distill=2.0)
    with pytest.raises(FileNotFoundError):
        run_retrain(tiny_config(tmp_path, checkpoint=str(tmp_path / "missing.pt"), baseline_steps=0))


def test_dense_control_replaces_nothing_and_trains_the_whole_budget(tmp_path):
    three = {"layers": ["prep.0", "layer2.0", "fc"], "steps_per_layer": 2, "final_steps": 3}
    config = tiny_config(tmp_path, dense_control=True, **three)
    result = run_retrain(config)
    rows = result["rows"]
    assert madd_layers(result["model"]) == {}
    assert [r["phase"] for r in rows] == ["dense", "final"]
    assert [r["step"] for r in rows] == [0, 4]  # the final step of a run over these 3 layers
    assert rows[-1]["train_steps"] == 3 * 2 + 3 and rows[-1]["replaced"] == 0
    dense = Retrainer(config)._fresh_model()
    saved = torch.load(tmp_path / pipeline_module.CHECKPOINT, weights_only=False)
    dense.load_state_dict(saved["dense_state"])
    trained = result["model"].state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in dense.state_dict().items() if v.is_floating_point())
    saved_config = json.loads((tmp_path / "config.json").read_text())
    report = write_report(tmp_path, rows, saved_config)["md"].read_text()
    assert "dense control (nothing replaced)" in report and "run not finished" not in report


def test_a_run_that_died_before_its_first_checkpoint_does_not_block_a_corrected_one(tmp_path):
    with pytest.raises(KeyError, match="unknown model"):
        run_retrain(tiny_config(tmp_path, model="no_such_model"))
    rows = run_retrain(tiny_config(tmp_path, layers=["fc"], steps_per_layer=0, final_steps=0))["rows"]
    assert [r["phase"] for r in rows] == ["dense", "replace", "final"]


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    from maddnet.cli import main

    argv = [
        "retrain",
        "--model",
        "no_such_model",
        "--data",
        "digits",
        "--baseline-steps",
        "1",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("maddnet retrain: error: unknown model 'no_such_model'; known models:")
    assert "Traceback" not in err
    monkeypatch.setenv("MADDNET_TRACEBACK", "1")
    with pytest.raises(KeyError, match="unknown model"):
        main(argv)


def test_distillation_loss_is_ce_mixed_with_t2_kl_against_the_teacher_on_the_same_inputs(tmp_path):
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 5), nn.Linear(6, 5).eval()
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    alpha, tau, eps = 0.3, 2.0, 0.1
    config = tiny_config(tmp_path, distill=alpha, distill_temperature=tau, label_smoothing=eps)
    loss, logits = RetrainLoss(config, teacher)(student, x, y)

    s, t = student(x).detach().double(), teacher(x).detach().double()
    assert torch.equal(logits, student(x))
    target = (1 - eps) * torch.nn.functional.one_hot(y, 5) + eps / 5  # label smoothing
    log_p = s - s.logsumexp(1, keepdim=True)
    ce = -(target * log_p).sum(1).mean()
    p_t = (t / tau).softmax(1)
    kl = (p_t * (p_t.log() - (s / tau).log_softmax(1))).sum(1).mean()
    expected = (1 - alpha) * ce + alpha * tau**2 * kl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert teacher.weight.grad is None and student.weight.grad is not None
    # without a teacher (the dense step) the loss is the cross-entropy alone
    assert RetrainLoss(config)(student, x, y)[0].item() == pytest.approx(ce.item(), rel=1e-6)


def test_recon_term_is_the_relative_error_of_the_madd_layer_on_its_inputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    dense = copy.deepcopy(model[0]).requires_grad_(False)
    layer = convert_layer(model, "0", torch.randn(512, 16), MaddConfig())
    assert isinstance(layer, MaddLayer) and model[0] is layer
    own_hooks = dict(layer._forward_hooks)  # the layer's own (higher-order gradient guard)
    x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
    config = tiny_config(tmp_path, distill=0.0, recon=0.25)
    loss_fn = RetrainLoss(config, layer=layer, dense_layer=dense)
    loss, logits = loss_fn(model, x, y)

    with torch.no_grad():
        madd, exact = layer(x).double(), dense(x).double()
        ce = torch.nn.functional.cross_entropy(model(x), y)
    recon = ((madd - exact) ** 2).sum() / (exact**2).sum()
    assert 0 < recon.item() < 1  # an approximation, not the dense layer itself
    assert loss.item() == pytest.approx((ce + 0.25 * recon).item(), rel=1e-6)
    assert torch.equal(logits, model(x))
    assert dict(layer._forward_hooks) == own_hooks  # nothing left behind between calls
    # repeated calls give the same loss (no state carried from one call to the next)
    assert torch.equal(loss_fn(model, x, y)[0], loss)
    loss.backward()
    assert dense.weight.grad is None and any(p.grad is not None for p in layer.parameters())
    # recon 0 (or no layer) leaves the cross-entropy alone
    plain = RetrainLoss(tiny_config(tmp_path, distill=0.0), layer=layer, dense_layer=dense)
    assert plain(model, x, y)[0].item() == pytest.approx(ce.item(), rel=1e-6)


def settings_line(markdown: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith("- settings:"))


def test_report_settings_name_the_budget_and_the_passes():
    from pathlib import Path

    from maddnet.retrain.report import markdown_report

    results = Path(__file__).resolve().parents[1] / "results/resnet9_fashion_mnist/retrain_wide_long"
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((results / "config.json").read_text())
    settings = settings_line(markdown_report(rows, config))
    assert "codebook_budget" not in settings and "fuse" not in settings
    config.update(
        codebook_budget={"analysis": "a.json", "unit": "lut_bytes", "value": None, "width": 9},
        fuse=True,
        prune_unread=True,
    )
    settings = settings_line(markdown_report(rows, config))
    assert settings.endswith(", codebook_budget=lut_bytes:width=9 from a.json, fuse, prune_unread")


def test_report_says_which_rows_use_the_eval_subset():
    from maddnet.retrain.report import markdown_report

    rows = [
        {"step": 0, "phase": "dense", "top1": 0.9, "top5": 1.0, "samples": 359},
        {"step": 1, "phase": "replace", "layer": "a", "top1": 0.8, "replaced_top1": 0.7, "samples": 200},
        {"step": 2, "phase": "replace", "layer": "b", "top1": 0.8, "replaced_top1": 0.7, "samples": 359},
        {"step": 3, "phase": "final", "top1": 0.85, "top5": 1.0, "samples": 359},
    ]
    config = {"model": "m", "dataset": "d", "eval_split": "test", "eval_samples": 200}
    text = markdown_report(rows, config)
    assert "the other replacements on its first 200 samples" in text
    assert "first 200 samples" not in markdown_report(rows, {**config, "eval_samples": None})


def test_final_fine_tune_resumes_from_its_progress_checkpoint(tmp_path, monkeypatch):
    """A run killed inside the final fine-tune continues from its last progress save, not
    from the start of the step, and ends where the uninterrupted run ends."""
    small = {"layers": ["fc"], "final_steps": 7, "checkpoint_every": 3}
    reference = run_retrain(tiny_config(tmp_path / "ref", **small))
    ref_state = {k: v.clone() for k, v in reference["model"].state_dict().items()}

    real_train_steps = pipeline_module.train_steps
    starts: list[int] = []

    def crash_at_step_5(*args, **kwargs):
        if kwargs.get("desc") == "final fine-tune":
            starts.append(kwargs.get("start_step", 0))
            save = kwargs["callback"]

            def callback(info):
                save(info)
                if info.step == 5:
                    raise KeyboardInterrupt("simulated kill")

            kwargs["callback"] = callback
        return real_train_steps(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "train_steps", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_retrain(tiny_config(tmp_path / "run", **small))
    progress = torch.load(tmp_path / "run" / pipeline_module.PROGRESS, weights_only=False)
    assert (progress["step"], progress["steps"]) == (3, 7)

    def record_start(*args, **kwargs):
        if kwargs.get("desc") == "final fine-tune":
            starts.append(kwargs.get("start_step", 0))
        return real_train_steps(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "train_steps", record_start)
    resumed = run_retrain(tiny_config(tmp_path / "run", **small))
    assert starts == [0, 3]  # the rerun's final fine-tune continued at step 3 of 7
    assert not (tmp_path / "run" / pipeline_module.PROGRESS).exists()
    for key, value in resumed["model"].state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-4, atol=1e-5, msg=key)


def test_the_pipeline_writes_the_budget_plan_before_learning(tmp_path, monkeypatch):
    """The plan is written where the run's config is (API and CLI alike), before any layer
    is learned, so that a resumed run reads it (tests/test_budget.py)."""
    plan = object()
    written = []
    monkeypatch.setattr(RetrainConfig, "codebook_allocation", lambda self: plan)
    monkeypatch.setattr(
        pipeline_module, "write_allocation", lambda allocation, out: written.append((allocation, out))
    )
    Retrainer(tiny_config(tmp_path))._check_config()
    assert written == [(plan, tmp_path)] and (tmp_path / "config.json").exists()
