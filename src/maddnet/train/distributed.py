"""DistributedDataParallel set-up from the environment that ``torchrun`` provides, and the
few collectives the pipelines need (gathering calibration rows, sharing a learned layer,
checking that all ranks hold the same model, failing together).

Every collective here has the process group's timeout (``init_distributed(timeout_s=)``):
a rank that stops answering makes the others raise after that many seconds instead of
waiting forever. Under torchrun a rank that exits with an error makes the agent stop the
others at once (see docs/retrain.md, "Failures").
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

# torch's own default is 30 min (10 min for NCCL); one calibration or evaluation phase of
# the pipelines takes far less between two collectives, so 10 min catches a dead rank early
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1).

    gloo on CPU, nccl on CUDA (``device`` should then be this rank's GPU, which becomes
    the current CUDA device). Collectives that wait longer than ``timeout_s`` seconds
    raise. A process group that is already initialised (e.g. by a test harness) is used
    as it is. Without torchrun this returns a single-process DistInfo.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else local_rank % torch.cuda.device_count())
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def process_device(name: str) -> torch.device:
    """The device this process computes on: ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``)
    with plain ``cuda``/``auto`` meaning the GPU ``LOCAL_RANK`` under torchrun (one GPU per
    process on each node); an explicit ``cuda:N`` is kept."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(name, local_rank)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the local CUDA device when there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (no-op when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


class RankFailedError(RuntimeError):
    """A step failed on one or more ranks of a multi-process run; the message names each
    failed rank and its exception (the ``maddnet`` command prints it as one error line)."""


def fail_together(fn: Callable[[], T], what: str) -> T:
    """Run ``fn()`` on every rank; if it raises on any, raise on all of them.

    Returns ``fn()``'s value. Under torch.distributed the ranks exchange their outcome
    (one ``all_gather_object``), and every rank raises ``RankFailedError("<what> failed on
    rank R: <Type>: <message>")`` naming each failed rank and its exception (the rank's
    own exception is chained), so no rank goes on to wait in a collective for one that
    died. Not distributed: ``fn()`` is called plainly and its exception propagates as is.
    """
    if not is_distributed():
        return fn()
    value, error = None, None
    try:
        value = fn()
    except Exception as caught:  # noqa: BLE001 (reported to every rank, then re-raised)
        error = caught
    status = None if error is None else f"{type(error).__name__}: {error}"
    statuses: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, status)
    failed = [(rank, text) for rank, text in enumerate(statuses) if text is not None]
    if failed:
        lines = "; ".join(f"rank {rank}: {text}" for rank, text in failed)
        message = f"{what} failed on {len(failed)} of {len(statuses)} ranks: {lines}"
        raise RankFailedError(message) from error
    return value  # type: ignore[return-value]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small things such as a layer's
    config). Not distributed: ``obj``."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """This process's peak memory so far in MiB: ``rss`` (resident host memory, Linux
    ``ru_maxrss``) and, on a CUDA device, ``cuda`` (peak bytes torch allocated there)."""
    import resource

    peaks = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peaks["cuda"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank ``dst``; None on the others.
    Not distributed: ``[obj]``."""
    if not is_distributed():
        return [obj]
    rank = dist.get_rank()
    received: list[Any] | None = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(obj, received, dst=dst)
    return received


def gather_rows(rows: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
    """Concatenate every rank's ``rows`` (n_r, D) in rank order on rank ``dst``.

    ``rows`` must be on the process group's device (the GPU for nccl) and have the same
    D and dtype on every rank; n_r may differ (also 0). Rank ``dst`` gets the (sum n_r, D)
    tensor, the others None. Memory on ``dst``: world_size * max n_r rows while gathering.
    Not distributed: ``rows``.
    """
    if not is_distributed():
        return rows
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device))
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = torch.zeros(longest, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    rank = dist.get_rank()
    parts = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
    dist.gather(padded, parts, dst=dst)
    if rank != dst:
        return None
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s values, in
    place (all ranks must hold the same structure). Not distributed: nothing to do."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            dist.broadcast(tensor.data, src=src)


def state_checksum(module: nn.Module) -> float:
    """A float64 fingerprint of ``module``'s state dict: sum over tensors of
    sum_i x_i * (1 + i mod 1009) * (1 + tensor index), on the tensors' device. Equal
    state dicts give bit-equal checksums on the same kind of device; a changed, swapped
    or permuted value changes it (with probability ~1)."""
    total = None
    for index, tensor in enumerate(module.state_dict().values()):
        flat = tensor.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64).remainder_(1009).add_(1)
        term = (flat * weights).sum() * (1 + index)
        total = term if total is None else total + term
    return 0.0 if total is None else float(total)


def check_same_model(module: nn.Module, what: str, device: torch.device) -> float:
    """The :func:`state_checksum` of ``module``, after checking that every rank has the
    same one; RuntimeError naming the ranks that differ from rank 0 and ``what`` was done."""
    checksum = state_checksum(module)
    if not is_distributed():
        return checksum
    values = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    values[dist.get_rank()] = checksum
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    others = [rank for rank, value in enumerate(values.tolist()) if value != values[0].item()]
    if others:
        raise RuntimeError(
            f"after {what} ranks {others} hold another model than rank 0 (state checksums {values.tolist()})"
        )
    return checksum


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def leaving_process_group() -> Iterator[None]:
    """Run a command's body, then leave the process group (under torchrun; a no-op
    without one): after a barrier when the body ends normally, at once when it raised
    (see :func:`cleanup`)."""
    try:
        yield
    except BaseException:
        cleanup(synchronize=False)
        raise
    cleanup()


def cleanup(synchronize: bool = True) -> None:
    """Leave the process group (a no-op without one).

    With ``synchronize`` (the normal end of a run) the ranks first meet at a barrier, so
    that no rank tears down its gloo connections while a peer may still use them. Without
    one, a 2-rank test once saw a rank abort in C++ at the end (SIGABRT, "terminate called
    without an active exception"; not reproduced in ~100 reruns, so the teardown race is
    the likely cause, not a proven one). After a failure pass ``synchronize=False``: a
    peer may be gone, and the barrier would wait for the process group's timeout.

    First it collects garbage: a DistributedDataParallel wrapper the run no longer
    references can still sit in a reference cycle, and its reducer keeps the group's last
    gloo work (and its tensors) alive; left to the interpreter's shutdown, that work is
    destroyed without a live interpreter, which aborts the process (the same message;
    pytorch/pytorch PR 179291 describes this failure for groups never destroyed). Callers
    should drop their own references to a DDP model before leaving.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # DDP reducers in unreachable cycles go while the group is still alive
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()
