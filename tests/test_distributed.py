"""DistributedDataParallel on 2 CPU processes with the gloo backend.

The DDP-against-one-process comparison runs in float64: DDP averages two batch means of
8 where one process takes one mean of 16, and 10 SGD steps with momentum amplify that
rounding difference. In float32 it came near the 1e-5 tolerance, and the reference ran
with however many threads (and MKL's dynamic thread choice under load) the pytest process
had, so it failed once in 8 loaded full-suite runs; in float64 it is ~1e-13."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maddnet.train import ResumableSampler, build_optimizer, evaluate, train_steps
from maddnet.train.distributed import cleanup, leaving_process_group

pytestmark = pytest.mark.slow


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=gen, dtype=torch.float64)
    return x, (x[:, 0] > x[:, 1]).long() + (x[:, 2] > 1).long()


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()  # no BatchNorm


def _train_and_eval(rank: int, world_size: int, out_dir: str) -> None:
    """Worker: 10 SGD steps of batch 8 per process, then evaluate; rank 0 writes results."""
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{out_dir}/rendezvous",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=120),  # a lost peer fails the test instead of hanging it
        )
    x, y = _data()
    per_process_batch = 16 // world_size
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=per_process_batch,
        drop_last=True,
        sampler=ResumableSampler(len(x), seed=5, rank=rank, world_size=world_size),
    )
    model = _model()
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(model, "sgd", 0.5, 0.0, momentum=0.9)
    train_steps(model, loader, optimizer, steps=10, progress=False)
    eval_loader = DataLoader(
        TensorDataset(x[:91], y[:91]),
        batch_size=10,
        sampler=ResumableSampler(91, shuffle=False, rank=rank, world_size=world_size, pad=False),
    )
    result = evaluate(model, eval_loader)
    state = {k: v.tolist() for k, v in getattr(model, "module", model).state_dict().items()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"result": result, "state": state}, handle)
    del model, optimizer  # the DDP reducer goes before the group (see cleanup)
    cleanup()  # a barrier, then leave: no rank closes its connections while the other reads


def _single_process_reference(world_size: int) -> dict:
    """What 2 processes with batch 8 each must compute: one process, batch 16 made of
    the same samples (DDP averages the gradients, and the model has no BatchNorm)."""
    x, y = _data()
    samplers = [ResumableSampler(len(x), seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    model = _model()
    optimizer = build_optimizer(model, "sgd", 0.5, 0.0, momentum=0.9)
    per = 16 // world_size
    for step in range(10):
        epoch, offset = divmod(step, len(x) // 16)
        shares = []
        for s in samplers:
            s.set_epoch(epoch)
            shares.append(list(s)[offset * per : (offset + 1) * per])
        idx = torch.tensor(sum(shares, []))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v for k, v in model.state_dict().items()}


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_train_and_eval, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # both processes hold the same weights and report whole-data-set numbers
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["result"] == ranks[1]["result"]
    assert ranks[0]["result"]["samples"] == 91
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        reference = _single_process_reference(2)
    finally:
        torch.set_num_threads(threads)
    for key, value in reference.items():
        assert torch.allclose(torch.tensor(ranks[0]["state"][key], dtype=torch.float64), value, atol=1e-10), (
            key
        )
    # evaluation over the shards equals a plain single-process evaluation
    x, y = _data()
    model = _model()
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in ranks[0]["state"].items()})
    plain = evaluate(model, DataLoader(TensorDataset(x[:91], y[:91]), batch_size=91))
    assert plain["top1"] == ranks[0]["result"]["top1"]
    assert plain["loss"] == pytest.approx(ranks[0]["result"]["loss"], rel=1e-6)


def test_torchrun_cli_two_processes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
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
        "3",
        "--batch-size",
        "32",
        "--lr",
        "0.1",
        "--threads",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["finished"]
    assert results["samples"] == 359  # every test image once, though split over 2 processes
    # 1438 training images, 2 × 32 per step → 22 steps per epoch
    assert results["total_steps"] == 3 * (1438 // 2 // 32)
    assert results["top1"] > 0.5  # chance is 0.1
    evals = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
    ]
    assert [e["epoch"] for e in evals] == [1, 2, 3]  # written once, by rank 0


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A gloo process group of one rank in this process; the barriers it sees are counted."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    barriers = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (barriers.append(1), real_barrier(*a, **k)))
    yield barriers
    if dist.is_initialized():
        dist.destroy_process_group()


def test_leaving_process_group_meets_at_a_barrier_after_a_normal_end(one_rank_group):
    with leaving_process_group():
        pass
    assert not dist.is_initialized()
    assert one_rank_group == [1]


def test_leaving_process_group_leaves_at_once_when_the_body_raised(one_rank_group):
    # a failed peer may be gone: a barrier would wait for the group's timeout
    with pytest.raises(ValueError, match="rank failed"), leaving_process_group():
        raise ValueError("rank failed")
    assert not dist.is_initialized()
    assert one_rank_group == []


def test_cleanup_without_a_process_group_does_nothing():
    assert not dist.is_initialized()
    cleanup()
    cleanup(synchronize=False)
    with leaving_process_group():
        pass


def test_leaving_frees_a_ddp_model_in_a_reference_cycle_before_the_group(one_rank_group, monkeypatch):
    # a DDP reducer freed only at interpreter shutdown destroys its gloo work without a live
    # interpreter (a SIGABRT at exit); cleanup collects it while the group still exists
    model = nn.parallel.DistributedDataParallel(_model())
    model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()  # the reducer holds gloo work
    model.__dict__["cycle"] = model  # kept alive by a cycle only, as a run's locals may be
    alive = weakref.ref(model)
    del model
    seen = []
    real_destroy = dist.destroy_process_group
    monkeypatch.setattr(
        dist, "destroy_process_group", lambda *a, **k: (seen.append(alive()), real_destroy(*a, **k))
    )
    with leaving_process_group():
        pass
    assert seen == [None]  # gone before the group was destroyed
    assert not dist.is_initialized()
