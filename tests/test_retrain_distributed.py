"""``maddnet retrain`` on 2 gloo processes: the same result as one process, a resume after
kill -9 of one rank, and one clear error when one rank fails; ``analyze_layers`` split over
the 2 processes gives the one-process rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader

from maddnet.analysis.cells import CellLog
from maddnet.analysis.single_layer import analyze_layers
from maddnet.data.registry import create_dataset
from maddnet.models.registry import list_models, register_model
from maddnet.retrain import RetrainConfig, pipeline, run_retrain
from maddnet.train.distributed import leaving_process_group

pytest.importorskip("sklearn")
pytestmark = pytest.mark.slow

MLP = "ddp_test_mlp"


def _mlp(num_classes: int = 10, in_chans: int = 1, **_: object) -> nn.Module:
    # no BatchNorm: with per-rank batch statistics DDP could not equal one process
    return nn.Sequential(nn.Flatten(), nn.Linear(64 * in_chans, 24), nn.ReLU(), nn.Linear(24, num_classes))


if MLP not in list_models():  # spawned workers import this module again
    register_model(MLP)(_mlp)


def _config(out_dir: Path, batch_size: int, **overrides) -> RetrainConfig:
    values = dict(
        model=MLP,
        dataset="digits",
        out_dir=str(out_dir),
        baseline_steps=30,
        steps_per_layer=6,
        final_steps=6,
        batch_size=batch_size,
        eval_batch_size=128,
        calib_batches=8,
        max_rows=100_000,
        lr_dense=0.05,
        lr_norm=0.05,
        lr_lut=1e-3,
        lr_threshold=1e-3,
        optimizer="sgd",
        progress=False,
        threads=1,
    )
    values.update(overrides)
    return RetrainConfig(**values)


def _analysis(model: nn.Module, cells: CellLog | None = None) -> dict:
    """Single-layer analysis of ``model`` on digits: 2 layers x 2 values of C."""
    calib = DataLoader(create_dataset("digits", "train", None), batch_size=64)
    evaluation = DataLoader(create_dataset("digits", "test", None), batch_size=128)
    return analyze_layers(
        model, calib, evaluation, widths=(4, 8), calib_batches=4, progress=False, cells=cells
    )


def _worker(rank: int, world_size: int, tmp: str) -> None:
    """Rank ``rank`` of 2: the retraining run of the test below, a
    single-layer analysis (rank 0 saves the rows), then a run whose data set rank 1 cannot
    load (its error message goes to error<rank>.txt)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    # a barrier, then leave (no rank closes its connections while the other reads); at once
    # if this rank raised
    with leaving_process_group():
        run_retrain(_config(Path(tmp) / "two", 16))
        analysis = _analysis(_dense())
        if rank == 0:
            torch.save(analysis, Path(tmp, "analysis.pt"))
        # the same with finished cells on disk; then rank 1's file is lost (as if it was
        # killed before its rows were written) and a rerun computes only those cells
        cells = Path(tmp) / "cells"
        first = _analysis(_dense(), CellLog(cells, {"test": 1}))
        dist.barrier()
        if rank == 0:
            (cells / "cells.rank1.jsonl").unlink()
        dist.barrier()
        resumed = _analysis(_dense(), CellLog(cells, {"test": 1}))
        if rank == 0:
            torch.save({"first": first, "resumed": resumed}, Path(tmp, "resumed.pt"))
        bad = _config(Path(tmp) / "bad", 16, dist_timeout=30.0)
        if rank == 1:
            bad.dataset = "no_such_data_set"
        try:
            run_retrain(bad)
        except RuntimeError as error:
            Path(tmp, f"error{rank}.txt").write_text(str(error))
        # rank 0 (which learns every layer) runs out of memory learning the first one
        if rank == 0:
            pipeline.convert_layer = _out_of_memory
        try:
            run_retrain(_config(Path(tmp) / "oom", 16, dist_timeout=30.0))
        except RuntimeError as error:
            Path(tmp, f"oom{rank}.txt").write_text(str(error))


def _out_of_memory(*_args, **_kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def _dense() -> nn.Module:
    """The test MLP with fixed (untrained) weights: the analysis needs dense layers."""
    torch.manual_seed(3)
    return _mlp()


def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process_and_a_failing_rank_stops_both(tmp_path):
    """2 ranks with batch 16 each against one process with batch 32 of the same samples.

    Calibration rows are the same rows in the same order (exact); the ranks hold identical
    models (checked by the pipeline's checksum after every step). The weights differ from
    one process by float32 rounding only (DDP averages two means of 16 where one process
    takes one mean of 32), so the numbers are compared to a tolerance: accuracy to one
    of the 359 test samples, losses to 1e-3 relative.

    Then rank 1 gets a data set name that does not exist: both ranks raise the same error
    naming rank 1 and the cause (neither waits for the other), and nothing is written. And
    rank 0 runs out of memory learning a layer: the same, with the last checkpoint whole."""
    one = run_retrain(_config(tmp_path / "one", 32))["rows"]
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    two = _rows(tmp_path / "two")
    assert [(r["step"], r["phase"], r["layer"]) for r in two] == [
        (r["step"], r["phase"], r["layer"]) for r in one
    ]
    for a, b in zip(one, two, strict=True):
        assert b["samples"] == a["samples"] == 359  # each test sample counted once
        assert b.get("calib_rows") == a.get("calib_rows")
        assert abs(b["top1"] - a["top1"]) <= 1 / 359 + 1e-12, (a, b)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        if a["train_loss"] is not None:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    assert one[-1]["top1"] > 0.5  # the MADD network still classifies (chance: 0.1)
    assert len(two) == len(one) == 4  # rank 0 alone wrote the rows
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["next_step"] == 4

    # analysis: the same cells and numbers as one process (every rank learns from the same
    # rows and evaluates on all the data; only the learning time differs)
    analysis = torch.load(tmp_path / "analysis.pt", weights_only=False)
    reference = _analysis(_dense())
    assert len(analysis["rows"]) == len(reference["rows"]) == 4
    strip = [{k: v for k, v in row.items() if k != "fit_s"} for row in reference["rows"]]
    assert [{k: v for k, v in row.items() if k != "fit_s"} for row in analysis["rows"]] == strip
    assert analysis["baseline"] == reference["baseline"]
    # with a cell log: the same rows; after losing rank 1's cells, the rerun dealt its two
    # cells over both ranks again (rank 0 had cells 0 and 2, now also one of the lost ones)
    for key in ("first", "resumed"):
        rows = torch.load(tmp_path / "resumed.pt", weights_only=False)[key]["rows"]
        assert [{k: v for k, v in row.items() if k != "fit_s"} for row in rows] == strip
    lines = {r: (tmp_path / "cells" / f"cells.rank{r}.jsonl").read_text().splitlines() for r in range(2)}
    assert (len(lines[0]), len(lines[1])) == (3, 1)

    errors = [(tmp_path / f"error{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1]
    assert errors[0].startswith("loading the data failed on 1 of 2 ranks: rank 1: KeyError:")
    assert "no_such_data_set" in errors[0]
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()

    # out of memory on rank 0 while learning a layer: both ranks stop with one message naming
    # rank 0 and the cause; the checkpoint of the step before is whole and resumable
    errors = [(tmp_path / f"oom{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1]
    assert errors[0].startswith(
        "learning layer '1' on rank 0 failed on 1 of 2 ranks: rank 0: OutOfMemoryError: CUDA out"
    )
    saved = torch.load(tmp_path / "oom" / "checkpoint.pt", weights_only=False)
    assert saved["next_step"] == 1  # the dense step, written whole before the failure
    assert not [p for p in (tmp_path / "oom").iterdir() if p.name.endswith(".tmp")]  # no partial file


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (the torchrun agent's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_kill_9_of_one_rank_then_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "maddnet.cli", "retrain", "--model", "resnet9", "--model-kw", "width=4",
        "--data", "digits", "--baseline-steps", "5", "--steps-per-layer", "2", "--final-steps", "200",
        "--batch-size", "16", "--calib-batches", "8", "--layers", "prep.0", "fc",
        "--threads", "1", "--out", str(out), "--no-progress", "--dist-timeout", "60",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    # wait until the last replace step is checkpointed: the final step (200 steps) is running
    while time.time() < deadline and first.poll() is None:
        if metrics.exists() and sum(1 for _ in metrics.open()) >= 3:
            break
        time.sleep(0.05)
    workers = _children(first.pid)
    assert first.poll() is None and len(workers) == 2, first.communicate()[0][-3000:]
    os.kill(workers[-1], signal.SIGKILL)
    log = first.communicate(timeout=120)[0]
    assert first.returncode != 0, log[-2000:]
    before = metrics.read_text().splitlines()
    assert len(before) == 3 and json.loads(before[-1])["step"] == 2

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    after = metrics.read_text().splitlines()
    assert after[:3] == before  # the finished steps were not run again
    final = json.loads(after[-1])
    assert len(after) == 4 and final["phase"] == "final" and final["replaced"] == 2
    assert final["samples"] == 359
    assert (out / "report.md").exists()
