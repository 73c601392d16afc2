"""Recording a layer's input rows: a bounded, uniform reservoir sample kept on the CPU.

This is the one place in ``maddnet.nn`` that moves data off the model's device, on
purpose: recorded rows are a calibration set, and CPU memory is where it fits. The
bound per layer is ``capacity`` rows of D float32 values.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import conv_padding
from .patches import ConvGeometry, gather_patches


class RowRecorder:
    """Uniform sample (Algorithm R, vectorised per batch) of up to ``capacity`` rows.

    Args:
        capacity: rows kept at most.
        seed: seed of the sampling (a private ``torch.Generator``).
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._rows: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def nrows(self) -> int:
        """Rows held now: ``min(seen, capacity)``."""
        return min(self.seen, self.capacity)

    def rows(self) -> torch.Tensor | None:
        """(nrows, D) float32 CPU tensor of the sample, or None if nothing was recorded."""
        return None if self._rows is None else self._rows[: self.nrows]

    def choose(self, nrows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of the next ``nrows`` stream rows to keep: (positions in batch, slots).

        Equal to Algorithm R run row by row with the same draws: the slots are distinct,
        and where several rows of the batch land in one slot (a row that fills the
        reservoir and later rows that draw its slot, or two later rows drawing the same
        one) the last of them is the one kept.
        """
        start = self.seen
        self.seen += nrows
        fill = max(0, min(nrows, self.capacity - start))
        positions = torch.arange(fill)
        slots = torch.arange(start, start + fill)
        if fill < nrows:
            index = torch.arange(start + fill, start + nrows)  # global stream index i
            draw = torch.rand(index.shape[0], generator=self._generator)
            slot = (draw * (index + 1).double()).long()  # uniform in [0, i]
            keep = slot < self.capacity
            positions = torch.cat([positions, torch.arange(fill, nrows)[keep]])
            slots = torch.cat([slots, slot[keep]])
        if fill < positions.shape[0]:
            # Resolve shared slots to the row latest in the stream; the stores must not
            # carry duplicate slots, whose order of writing is unspecified (it varies with
            # the thread count and from run to run).
            unique, inverse = torch.unique(slots, return_inverse=True)
            last = torch.full((unique.shape[0],), -1, dtype=torch.int64)
            last.scatter_reduce_(0, inverse, torch.arange(inverse.shape[0]), reduce="amax")
            positions, slots = positions[last], unique
        return positions, slots

    def store(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Write chosen rows (n, D) into ``slots`` (n,)."""
        rows = rows.detach().to(device="cpu", dtype=torch.float32)
        if self._rows is None:
            self._rows = torch.empty(self.capacity, rows.shape[1])
        elif rows.shape[1] != self._rows.shape[1]:
            raise ValueError(f"row width changed from {self._rows.shape[1]} to {rows.shape[1]}")
        self._rows[slots] = rows


def capacity_for(ndims: int, max_rows: int, max_bytes: int) -> int:
    """Rows of D float32 values that fit both bounds (at least 1)."""
    return max(1, min(max_rows, max_bytes // (4 * ndims)))


def record_hook(recorder: RowRecorder, module: nn.Module):
    """A forward pre-hook that offers the module's input rows to ``recorder``."""
    if isinstance(module, nn.Conv2d):
        geometry = ConvGeometry(module.kernel_size, module.stride, conv_padding(module), module.dilation)

        def hook(mod, args):
            images = args[0]
            if images.dim() == 3:
                images = images.unsqueeze(0)
            out_h, out_w = geometry.output_size(images.shape[2], images.shape[3])
            npos = out_h * out_w
            positions, slots = recorder.choose(images.shape[0] * npos)
            if positions.numel():
                positions = positions.to(images.device)
                patches = gather_patches(images.detach(), geometry, positions // npos, positions % npos)
                recorder.store(patches, slots)

    else:

        def hook(mod, args):
            x = args[0]
            rows = x.detach().reshape(-1, x.shape[-1])
            positions, slots = recorder.choose(rows.shape[0])
            if positions.numel():
                recorder.store(rows[positions.to(rows.device)], slots)

    return hook
