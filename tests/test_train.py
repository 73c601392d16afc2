"""Train/eval loops, checkpoints, schedules, resume after a crash, the CLI, and an
integration run on a Fashion-MNIST subset."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maddnet.data import fashion_mnist
from maddnet.train import (
    JsonlWriter,
    ResumableSampler,
    build_optimizer,
    evaluate,
    load_checkpoint,
    make_config,
    parameter_groups,
    run_training,
    save_checkpoint,
    topk_correct,
    train_steps,
    warmup_cosine_factor,
)
from maddnet.train import runner as runner_module
from maddnet.train.cli import config_from_args, parse_key_values

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------- metrics and schedule


def test_topk_correct_known_values():
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.2, 0.3, 0.4],  # top1 = 1
            [0.9, 0.1, 0.8, 0.7, 0.6, 0.5],  # label 5 is 6th → miss top5
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
        ]
    )  # label 1 is 5th → top5 hit
    labels = torch.tensor([1, 1, 1])
    assert topk_correct(logits, labels, (1, 5)) == [1, 2]
    # fewer classes than k: top-5 of 3 classes is always right
    assert topk_correct(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), (5,)) == [4]


def test_evaluate_exact_numbers():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.log(x)  # inputs are probabilities

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 2, 1, 2])
    loader = DataLoader(TensorDataset(probs, labels), batch_size=3)
    result = evaluate(Fixed(), loader)
    assert result["top1"] == 0.5 and result["top5"] == 1.0 and result["samples"] == 4
    expected = -(math.log(0.7) + math.log(0.3) + math.log(0.3) + math.log(0.8)) / 4
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_warmup_cosine_factor():
    assert warmup_cosine_factor(0, 100, 10) == pytest.approx(1 / 11)
    assert warmup_cosine_factor(9, 100, 10) == pytest.approx(10 / 11)
    assert warmup_cosine_factor(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine_factor(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)


def test_parameter_groups_exclude_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {p.shape for p in decay["params"]} == {(4, 1, 3, 3), (2, 4)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer(model, "lion", 0.1, 0.0)


# ---------------------------------------------------------------- sampler and checkpoints


def test_resumable_sampler_shards_and_skips():
    shards = [ResumableSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    parts = [list(s) for s in shards]
    assert all(len(p) == 4 == len(s) for p, s in zip(parts, shards, strict=True))
    assert set(sum(parts, [])) == set(range(10))  # padded with 2 repeats
    again = ResumableSampler(10, seed=1, rank=1, world_size=3)
    again.set_epoch(2)
    again.set_start(3)
    assert list(again) == parts[1][3:]
    assert list(again) == parts[1]  # start applies once
    again.set_epoch(3)
    assert list(again) != parts[1]
    unpadded = [list(ResumableSampler(10, shuffle=False, rank=r, world_size=3, pad=False)) for r in range(3)]
    assert sorted(sum(unpadded, [])) == list(range(10))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(3)})

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """A full disk makes torch's zip writer raise a RuntimeError ("unexpected pos ...") on top
    of the OSError; save_checkpoint reports the OSError with the path instead."""
    import errno

    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    def full_disk(obj, handle):
        handle.write(b"part")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"ckpt\.pt: No space left on device \(the previous checkpoint") as info:
        save_checkpoint(path, {"step": 2})
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="nothing was written"):
        save_checkpoint(tmp_path / "new.pt", {"step": 2})

    def other_failure(obj, handle):
        raise RuntimeError("not a disk error")

    monkeypatch.setattr(torch, "save", other_failure)
    with pytest.raises(RuntimeError, match="not a disk error"):  # other failures pass unchanged
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


@pytest.mark.parametrize("writer", ["converted model", "MaddnessMatmul state"])
def test_every_torch_file_maddnet_writes_is_atomic(tmp_path, monkeypatch, writer):
    """save_converted and MaddnessMatmul.save write like save_checkpoint: a failed write
    leaves the earlier file and no temporary one, and names the file."""
    import errno

    from torch import nn

    from maddnet import MaddnessMatmul
    from maddnet.nn import convert, load_converted, save_converted

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(512, 16, generator=gen)
    if writer == "converted model":
        model = convert(nn.Sequential(nn.Linear(16, 4)), [rows[:256], rows[256:]])

        def save(path):
            save_converted(model, path)

        def load(path):
            load_converted(nn.Sequential(nn.Linear(16, 4)), path)

    else:
        amm = MaddnessMatmul(ncodebooks=2).fit(rows, torch.randn(16, 4, generator=gen))
        save, load = amm.save, MaddnessMatmul.load
    path = tmp_path / "saved.pt"
    save(path)
    before = path.read_bytes()

    def full_disk(obj, handle):
        handle.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"{writer} .*saved\.pt: No space left on device"):
        save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["saved.pt"]
    load(path)


def test_jsonl_truncate_after(tmp_path):
    writer = JsonlWriter(tmp_path / "m.jsonl")
    for step in (10, 20, 30):
        writer.write({"step": step})
    with open(writer.path, "a") as handle:
        handle.write('{"step": 40, "cut sh')  # a line cut short by a kill
    writer.truncate_after(20)
    assert [r["step"] for r in writer.read()] == [10, 20]


def test_jsonl_record_after_a_cut_short_line_is_kept(tmp_path):
    writer = JsonlWriter(tmp_path / "m.jsonl")
    writer.write({"step": 10})
    with open(writer.path, "a") as handle:
        handle.write('{"step": 20, "cut sh')  # a line cut short by a kill
    writer.write({"step": 30})  # starts a line of its own
    assert [r["step"] for r in writer.read()] == [10, 30]
    assert writer.path.read_text().endswith('"cut sh\n{"step": 30}\n')


# ---------------------------------------------------------------- loops


def test_train_steps_learns_and_counts_steps():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] + x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = build_optimizer(model, "sgd", 0.1, 0.0)
    seen = []
    before = evaluate(model, loader)
    stats = train_steps(
        model,
        loader,
        opt,
        steps=40,
        progress=False,
        callback=lambda info: seen.append((info.step, info.epoch)),
    )
    after = evaluate(model, loader)
    assert stats["steps"] == 40 and seen[0] == (1, 0) and seen[-1] == (40, 4)
    assert after["loss"] < before["loss"] and after["top1"] > 0.9
    # continue a run: steps count from the start, so 40 → 48 runs 8 more
    more = train_steps(model, loader, opt, steps=48, start_step=40, progress=False)
    assert more["steps"] == 8
    with pytest.raises(ValueError, match="exactly one"):
        train_steps(model, loader, opt, progress=False)


def test_train_steps_compute_loss_matches_loss_fn_and_sees_the_inputs():
    """compute_loss(model, inputs, labels) -> (loss, logits) trains exactly like the
    loss_fn short form, gets each batch's inputs, and its logits give StepInfo.correct."""
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()

    def run(**loss):
        torch.manual_seed(0)
        loader = DataLoader(
            TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(2)
        )
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        opt = build_optimizer(model, "sgd", 0.1, 0.0)
        infos = []
        stats = train_steps(model, loader, opt, steps=7, progress=False, callback=infos.append, **loss)
        return stats, [(i.loss, i.correct) for i in infos], model.state_dict()

    seen = []

    def compute_loss(model, inputs, labels):
        seen.append(inputs)
        logits = model(inputs)
        return nn.functional.cross_entropy(logits, labels, label_smoothing=0.1), logits

    a = run(loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1))
    b = run(compute_loss=compute_loss)
    assert a[0] == b[0] and a[1] == b[1]
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    assert len(seen) == 7 and all(s.shape == (32, 8) for s in seen)
    assert any(correct > 0 for _, correct in b[1])
    with pytest.raises(ValueError, match="at most one"):
        run(loss_fn=nn.CrossEntropyLoss(), compute_loss=compute_loss)


def tiny_config(out_dir: Path, **overrides):
    settings = dict(
        out_dir=str(out_dir),
        model_kwargs={"width": 4},
        epochs=3,
        batch_size=64,
        lr=0.1,
        checkpoint_every=4,
        log_every=2,
        progress=False,
        seed=7,
    )
    settings.update(overrides)
    return make_config("resnet9", "digits", **settings)


def test_run_files_and_resume_after_crash_match_uninterrupted(tmp_path, monkeypatch, capsys):
    reference = run_training(tiny_config(tmp_path / "a"))
    assert reference["finished"] and reference["total_steps"] == 3 * (1438 // 64)
    assert reference["top1"] > 0.5  # 10 classes: chance is 0.1
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "model.pt", "results.json"} <= files
    records = JsonlWriter(tmp_path / "a" / "metrics.jsonl").read()
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2, 3]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_kwargs"] == {"width": 4}
    # `maddnet eval` on the saved weights reproduces the final numbers
    from maddnet.cli import main

    assert (
        main(
            [
                "eval",
                "--model",
                "resnet9",
                "--data",
                "digits",
                "--model-arg",
                "width=4",
                "--checkpoint",
                str(tmp_path / "a" / "model.pt"),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == reference["top1"] and printed["samples"] == 359

    # crash in the middle of epoch 2, three steps after the last checkpoint (step 28)
    real_train_steps = runner_module.train_steps

    def crashing(*args, callback, **kwargs):
        def wrapped(info):
            callback(info)
            if info.step == 31:
                raise KeyboardInterrupt("simulated kill")

        return real_train_steps(*args, callback=wrapped, **kwargs)

    monkeypatch.setattr(runner_module, "train_steps", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(tmp_path / "b"))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["state"]["step"] == 28
    resumed = run_training(tiny_config(tmp_path / "b"))
    assert resumed["top1"] == reference["top1"] and resumed["loss"] == reference["loss"]
    a = torch.load(tmp_path / "a" / "model.pt")
    b = torch.load(tmp_path / "b" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the metrics file holds each step once, like the uninterrupted run's
    steps_a = [r["step"] for r in records if r["kind"] == "train"]
    steps_b = [
        r["step"] for r in JsonlWriter(tmp_path / "b" / "metrics.jsonl").read() if r["kind"] == "train"
    ]
    assert steps_a == steps_b


def test_resume_refuses_a_different_config(tmp_path):
    run_training(tiny_config(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="lr"):
        run_training(tiny_config(tmp_path, lr=0.5, max_steps=3))
    # execution settings may change; config.json keeps the first piece's, the log the change
    result = run_training(tiny_config(tmp_path, max_steps=3, log_every=1))
    assert result["step"] == 3 and not result["finished"]
    assert json.loads((tmp_path / "config.json").read_text())["log_every"] == 2
    resume = [r for r in JsonlWriter(tmp_path / "metrics.jsonl").read() if r["kind"] == "resume"]
    assert resume[-1]["changed_settings"] == {"max_steps": 3, "log_every": 1}


def test_cli_precedence_defaults_recipe_flags(tmp_path):
    from maddnet.cli import build_parser

    args = build_parser().parse_args(
        [
            "train",
            "--model",
            "resnet9",
            "--data",
            "fashion_mnist",
            "--lr",
            "0.05",
            "--model-arg",
            "width=8",
            "--data-arg",
            "subset=100",
            "--out",
            str(tmp_path),
        ]
    )
    config = config_from_args(args)
    assert args.func.__name__ == "run_train"
    assert config.lr == 0.05  # flag
    assert config.batch_size == 256  # recipe for resnet9/fashion_mnist
    assert config.model_kwargs == {"width": 8}  # flag overrides the recipe's width
    assert config.dataset_kwargs == {"subset": 100}
    assert parse_key_values(["a=1", "b=x", "c=[1,2]"]) == {"a": 1, "b": "x", "c": [1, 2]}


def test_ds_cnn_learns_tones_in_a_speech_commands_folder(tmp_path):
    """The audio path end to end: wav folder → MFCC → DS-CNN → evaluation."""
    import numpy as np
    import soundfile

    t = np.arange(16000) / 16000
    rng = np.random.default_rng(0)
    val = []
    for word, freq in {"yes": 300.0, "no": 700.0, "up": 1500.0}.items():
        (tmp_path / word).mkdir()
        for n in range(12):
            rel = f"{word}/s{n}_nohash_0.wav"
            audio = 0.3 * np.sin(2 * np.pi * freq * (1 + 0.02 * n) * t)
            soundfile.write(tmp_path / rel, audio + 0.01 * rng.standard_normal(16000), 16000)
            if n >= 9:
                val.append(rel)
    (tmp_path / "validation_list.txt").write_text("\n".join(val))
    (tmp_path / "testing_list.txt").write_text("\n".join(val))
    config = make_config(
        "ds_cnn_s",
        "speech_commands",
        data_root=str(tmp_path),
        out_dir=str(tmp_path / "run"),
        epochs=12,
        batch_size=9,
        dataset_kwargs={"keywords": "yes,no,up", "silence_fraction": 0.0},
        progress=False,
        warmup_epochs=0,
    )
    result = run_training(config)
    assert result["samples"] == 9 and result["top1"] >= 7 / 9, result  # chance: 1/3


# ---------------------------------------------------------------- real process kill (CLI)


def _cli(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "maddnet.train.cli",
        "train",
        "--model",
        "resnet9",
        "--data",
        "digits",
        "--model-arg",
        "width=4",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--checkpoint-every",
        "5",
        "--log-every",
        "1",
        "--seed",
        "3",
        "--threads",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]


@pytest.mark.slow
def test_cli_kill_and_rerun_same_command(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _cli(tmp_path / "run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # meanwhile the same run through the Python API, uninterrupted
    reference = run_training(
        make_config(
            "resnet9",
            "digits",
            out_dir=str(tmp_path / "ref"),
            model_kwargs={"width": 4},
            epochs=1,
            batch_size=32,
            checkpoint_every=5,
            log_every=1,
            seed=3,
            progress=False,
        )
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill -9 once step 12 is logged
        if metrics.exists() and any(r.get("step", 0) >= 12 for r in JsonlWriter(metrics).read()):
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    if (tmp_path / "run" / "results.json").exists():
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    subprocess.run(_cli(tmp_path / "run"), check=True, env=env, capture_output=True)
    run = json.loads((tmp_path / "run" / "results.json").read_text())
    assert run["top1"] == reference["top1"] and run["loss"] == reference["loss"]
    a, b = torch.load(tmp_path / "ref" / "model.pt"), torch.load(tmp_path / "run" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumes = [r for r in JsonlWriter(metrics).read() if r["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] % 5 == 0 and resumes[0]["step"] >= 10


# ---------------------------------------------------------------- integration: Fashion-MNIST


@pytest.mark.slow
@pytest.mark.data
def test_fashion_mnist_subset_learns(tmp_path, require_data):
    require_data(
        fashion_mnist.is_available(), "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
    )
    config = make_config(
        "resnet9",
        "fashion_mnist",
        out_dir=str(tmp_path),
        model_kwargs={"width": 4},
        dataset_kwargs={"subset": 2000},
        epochs=4,
        batch_size=64,
        lr=0.2,
        progress=False,
        log_every=50,
    )
    result = run_training(config)
    assert result["total_steps"] == 4 * (2000 // 64) == 124
    assert result["samples"] == 2000  # the first 2000 test images
    assert result["top1"] > 0.65, result  # chance is 0.10; 0.765 when written (2026-12-01)
