"""im2col geometry without im2col: read chosen patch columns straight from the image.

A conv's rows are its input patches, flattened in ``F.unfold`` order: column
``d = (ci * kh + ky) * kw + kx``. A MADD conv reads only ``4 C`` of those ``D`` columns,
so instead of unfolding (N x D floats) we index the zero-padded input directly: column
``d`` of the patch at output position ``(oy, ox)`` is
``xpad[ci, oy * sy + ky * dy, ox * sx + kx * dx]``, i.e. flat offset
``column_offset[d] + position_offset[p]`` in the (Cin * Hp * Wp) flattened image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, stride, padding and dilation of a conv, as pairs."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(Hout, Wout) for an (H, W) input."""
        sizes = []
        for size, k, s, p, d in zip(
            (height, width), self.kernel_size, self.stride, self.padding, self.dilation, strict=True
        ):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def pad(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-pad (B, Cin, H, W) images as the conv does."""
        ph, pw = self.padding
        return F.pad(images, (pw, pw, ph, ph)) if ph or pw else images

    def column_offsets(self, columns: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Flat offsets in the padded (Cin, Hp, Wp) image of patch columns (any shape, int64)."""
        kh, kw = self.kernel_size
        dy, dx = self.dilation
        padded_w = width + 2 * self.padding[1]
        padded_hw = (height + 2 * self.padding[0]) * padded_w
        channel, rest = columns // (kh * kw), columns % (kh * kw)
        ky, kx = rest // kw, rest % kw
        return channel * padded_hw + ky * dy * padded_w + kx * dx

    def position_offsets(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(Hout * Wout,) flat offset of each output position's patch origin, row-major."""
        out_h, out_w = self.output_size(height, width)
        padded_w = width + 2 * self.padding[1]
        ys = torch.arange(out_h, device=device) * self.stride[0]
        xs = torch.arange(out_w, device=device) * self.stride[1]
        return (ys[:, None] * padded_w + xs[None, :]).reshape(-1)


def gather_patch_columns(
    images: torch.Tensor, geometry: ConvGeometry, columns: torch.Tensor
) -> torch.Tensor:
    """Columns of every patch: images (B, Cin, H, W), columns (...) -> (B * P, ...).

    Rows are ordered (batch, oy, ox) like ``F.unfold(...).transpose(1, 2)``; equals
    ``unfold(images)[:, columns]`` without forming the unfolded matrix. Differentiable.
    """
    batch, _, height, width = images.shape
    padded = geometry.pad(images).reshape(batch, -1)
    offsets = geometry.column_offsets(columns.reshape(-1), height, width)
    positions = geometry.position_offsets(height, width, images.device)
    index = (positions[:, None] + offsets[None, :]).reshape(-1)
    gathered = padded.index_select(1, index)
    return gathered.reshape(batch * positions.shape[0], *columns.shape)


def gather_patches(
    images: torch.Tensor, geometry: ConvGeometry, batch_index: torch.Tensor, position: torch.Tensor
) -> torch.Tensor:
    """Whole patches (n, D) at chosen rows: ``batch_index`` (n,), ``position`` (n,) in [0, P).

    Used by the row recorder so that only the sampled patches are ever unfolded.
    """
    batch, channels, height, width = images.shape
    kh, kw = geometry.kernel_size
    ndims = channels * kh * kw
    padded = geometry.pad(images).reshape(batch, -1)
    offsets = geometry.column_offsets(torch.arange(ndims, device=images.device), height, width)
    positions = geometry.position_offsets(height, width, images.device)
    flat = positions[position][:, None] + offsets[None, :]  # (n, D)
    return padded[batch_index[:, None], flat]
