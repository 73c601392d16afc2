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

import numpy as np
import torch
import torch.nn.functional as F

from . import _kernels


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

    def column_taps(self, columns: torch.Tensor) -> torch.Tensor:
        """(..., 3) int64 (channel, dy, dx) of patch columns, dilation included."""
        kh, kw = self.kernel_size
        channel, rest = columns // (kh * kw), columns % (kh * kw)
        dy = rest // kw * self.dilation[0]
        dx = rest % kw * self.dilation[1]
        return torch.stack((channel, dy, dx), dim=-1).contiguous()

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
    """Columns of every patch: images (B, Cin, H, W), columns (C, L) -> (B * P, C, L).

    Rows are ordered (batch, oy, ox) like ``F.unfold(...).transpose(1, 2)``; equals
    ``unfold(images)[:, columns]`` without forming the unfolded matrix. Differentiable
    (the backward scatters into the taps that were read). numba kernels on CPU.
    """
    if images.device.type == "cpu" and images.dtype == torch.float32:
        return _GatherColumns.apply(images, geometry, columns)
    batch, _, height, width = images.shape
    padded = geometry.pad(images).reshape(batch, -1)
    offsets = geometry.column_offsets(columns, height, width)
    positions = geometry.position_offsets(height, width, images.device)
    index = (positions[:, None] + offsets.reshape(1, -1)).reshape(-1)
    gathered = padded.index_select(1, index)
    return gathered.reshape(batch * positions.shape[0], *columns.shape)


class _GatherColumns(torch.autograd.Function):
    """images (B, Cin, H, W) -> (B*P, C, L) split taps via numba (CPU); padding on the fly."""

    @staticmethod
    def forward(ctx, images, geometry, columns):
        taps = geometry.column_taps(columns).numpy()
        out_h, out_w = geometry.output_size(images.shape[2], images.shape[3])
        args = (out_h, out_w, *geometry.stride, *geometry.padding)
        ctx.taps, ctx.args, ctx.image_shape = taps, args, images.shape
        return torch.from_numpy(_kernels.conv_gather(images.detach().contiguous().numpy(), taps, *args))

    @staticmethod
    def backward(ctx, grad_values):
        grad = _kernels.conv_scatter(
            grad_values.contiguous().numpy(), ctx.taps, *ctx.image_shape, *ctx.args
        )
        return torch.from_numpy(grad), None, None


def conv_lut_forward(
    images: torch.Tensor,
    geometry: ConvGeometry,
    split_dims: torch.Tensor,
    thresholds: torch.Tensor,
    lut: torch.Tensor,
    quantized=None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Eval-mode conv output (B, M, Hout, Wout) from one fused pass (numba, CPU).

    Same numbers as encoding the patches, summing ``lut`` (or the integer ``quantized``
    LUT, a :class:`~maddnet.amm.lut.QuantizedLut`) and adding ``bias``. Returns None where
    the kernel does not apply (other devices / dtypes).
    """
    if images.device.type != "cpu" or images.dtype != torch.float32 or lut.dtype != torch.float32:
        return None
    ncodebooks, _, nout = lut.shape
    out_h, out_w = geometry.output_size(images.shape[2], images.shape[3])
    if quantized is None:
        table = lut.detach().contiguous().numpy()
        inv_scale = np.ones(nout, np.float32)
        offset_sum = np.zeros(nout, np.float32)
        accumulator = np.zeros(0, np.float32)
    else:
        table = quantized.values.contiguous().numpy()
        inv_scale = (1.0 / quantized.scale).float().contiguous().numpy()
        offset_sum = quantized.offsets.sum(0).float().contiguous().numpy()
        # exact integer sums: uint16 holds C * (2**bits - 1) for C <= 257 at 8 bits
        wide = ncodebooks * (2**quantized.bits - 1) >= 1 << 16
        accumulator = np.zeros(0, np.int32 if wide else np.uint16)
    bias_np = np.zeros(nout, np.float32) if bias is None else bias.detach().float().contiguous().numpy()
    out = _kernels.conv_forward(
        images.detach().contiguous().numpy(),
        geometry.column_taps(split_dims).numpy(),
        thresholds.detach().float().contiguous().numpy(),
        table, inv_scale, offset_sum, bias_np, accumulator,
        out_h, out_w, geometry.stride[0], geometry.stride[1], geometry.padding[0], geometry.padding[1],
    )
    return torch.from_numpy(out)


def encode_patches(
    images: torch.Tensor, geometry: ConvGeometry, split_dims: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor | None:
    """(B*P, C) uint8 codes of every patch, read straight from the image (numba, CPU).

    Returns None where the fused kernel does not apply (other devices / dtypes); callers
    then gather the split values and use the core encoder.
    """
    if images.device.type != "cpu" or images.dtype != torch.float32:
        return None
    out_h, out_w = geometry.output_size(images.shape[2], images.shape[3])
    codes = _kernels.conv_encode(
        images.detach().contiguous().numpy(),
        geometry.column_taps(split_dims).numpy(),
        thresholds.detach().float().contiguous().numpy(),
        out_h,
        out_w,
        geometry.stride[0],
        geometry.stride[1],
        geometry.padding[0],
        geometry.padding[1],
    )
    return torch.from_numpy(codes)


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
