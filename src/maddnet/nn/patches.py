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

import numba
import numpy as np
import torch
import torch.nn.functional as F

from ..amm.hashing import NonFiniteInputError
from ..amm.lut import QuantizedLut
from . import _conv_kernels, _kernels
from .functional import bf16_node_table, no_autocast

# buffer bytes of one chunk of images in the fused conv backward (MaddConvFunction)
_BACKWARD_CHUNK_BYTES = 16 << 20


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


def gather_patch_columns(images: torch.Tensor, geometry: ConvGeometry, columns: torch.Tensor) -> torch.Tensor:
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
        grad = _kernels.conv_scatter(grad_values.contiguous().numpy(), ctx.taps, *ctx.image_shape, *ctx.args)
        return torch.from_numpy(grad), None, None


@dataclass(frozen=True)
class ConvPlan:
    """Index plan of the numba conv kernels (see :mod:`maddnet.nn._conv_kernels`).

    offsets (C, L) int64: flat offset of each split tap in the padded (Cin, Hp, Wp) plane;
    q_base (nq,) int64 flat origin of each output position, empty for stride 1 (q itself);
    pitch: positions per output row in q space (Wp for stride 1, else Wout).
    """

    offsets: np.ndarray
    q_base: np.ndarray
    out_h: int
    out_w: int
    pitch: int

    @property
    def nq(self) -> int:
        return (self.out_h - 1) * self.pitch + self.out_w

    @property
    def ncols(self) -> int:
        """Columns of q-space buffers: ``out_h * pitch`` (>= nq), so rows reshape to (out_h, pitch)."""
        return self.out_h * self.pitch


def conv_plan(geometry: ConvGeometry, split_dims: torch.Tensor, height: int, width: int) -> ConvPlan:
    """The :class:`ConvPlan` of a conv with these split dims on (H, W) inputs."""
    out_h, out_w = geometry.output_size(height, width)
    offsets = geometry.column_offsets(split_dims.detach().cpu().long(), height, width).numpy()
    if geometry.stride == (1, 1):
        padded_w = width + 2 * geometry.padding[1]
        return ConvPlan(offsets, np.zeros(0, np.int64), out_h, out_w, padded_w)
    q_base = geometry.position_offsets(height, width, torch.device("cpu")).numpy()
    return ConvPlan(offsets, q_base, out_h, out_w, out_w)


def _cpu_float32(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _quantized_args(quantized, lut: torch.Tensor, bias: torch.Tensor | None):
    """(table, inv_scale, offset_sum, bias, accumulator) numpy arguments of conv_forward."""
    ncodebooks, _, nout = lut.shape
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
    return table, inv_scale, offset_sum, bias_np, accumulator


def nonfinite_tap(
    images: torch.Tensor, geometry: ConvGeometry, columns: torch.Tensor, image_ids: list[int] | None = None
):
    """Where the first NaN / +-inf among the patch columns ``columns`` (C, L) of ``images``
    (B, Cin, H, W) lies, as a sentence, or None when every value read is finite.

    Zero padding is not an input value (it is 0); ``image_ids`` (B,) are the images' numbers
    in the sentence (default 0 .. B-1). Slow (gathers every read tap): for errors only.
    """
    values = gather_patch_columns(images.detach(), geometry, columns.to(images.device))
    bad = (~torch.isfinite(values)).reshape(values.shape[0], -1)
    rows = bad.any(1).nonzero()
    if rows.shape[0] == 0:
        return None
    row = int(rows[0])
    index = int(bad[row].nonzero()[0])
    codebook, level = divmod(index, columns.shape[1])
    out_h, out_w = geometry.output_size(images.shape[2], images.shape[3])
    image, position = divmod(row, out_h * out_w)
    oy, ox = divmod(position, out_w)
    kh, kw = geometry.kernel_size
    channel, tap = divmod(int(columns[codebook, level]), kh * kw)
    ky, kx = divmod(tap, kw)
    y = oy * geometry.stride[0] + ky * geometry.dilation[0] - geometry.padding[0]
    x = ox * geometry.stride[1] + kx * geometry.dilation[1] - geometry.padding[1]
    value = float(values[row, codebook, level])
    image = image if image_ids is None else image_ids[image]
    return (
        f"input image {image}, channel {channel}, pixel (y={y}, x={x}) is {value}, "
        f"a value the encoder reads (codebook {codebook}, output position ({oy}, {ox}))"
    )


def check_read_taps(
    images: torch.Tensor, geometry: ConvGeometry, split_dims: torch.Tensor, flagged: np.ndarray
) -> None:
    """Raise :class:`~maddnet.amm.hashing.NonFiniteInputError` when a tap the encoder reads
    is NaN / +-inf. ``flagged`` (B,) bool: the images the fused kernel found a non-finite
    value in (a superset); their taps are checked one by one, so values the encoder does
    not read never raise."""
    ids = np.flatnonzero(flagged).tolist()
    where = nonfinite_tap(images[ids], geometry, split_dims, ids)
    if where is not None:
        raise NonFiniteInputError(where)


def _run_forward(images, geometry, plan, thresholds, lut, quantized, bias, codes, want_out, split_dims):
    """(out, flagged) of conv_forward on ``images``; refuses NaN / +-inf among the taps the
    encoder reads (flagged images hold such values only where the encoder does not read)."""
    table, inv_scale, offset_sum, bias_np, accumulator = _quantized_args(quantized, lut, bias)
    out, flagged = _conv_kernels.conv_forward(
        images.detach().contiguous().numpy(),
        plan.offsets,
        plan.q_base,
        thresholds.detach().float().contiguous().numpy(),
        table,
        inv_scale,
        offset_sum,
        bias_np,
        accumulator,
        plan.out_h,
        plan.out_w,
        plan.pitch,
        geometry.padding[0],
        geometry.padding[1],
        codes,
        want_out,
    )
    if flagged.any():
        check_read_taps(images, geometry, split_dims, flagged)
    return out, flagged


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
    the kernel does not apply (other devices / dtypes). Raises
    :class:`~maddnet.amm.hashing.NonFiniteInputError` for NaN / +-inf among the taps read.
    """
    if not _cpu_float32(images, lut):
        return None
    plan = conv_plan(geometry, split_dims, images.shape[2], images.shape[3])
    no_codes = np.empty((0, lut.shape[0], 0), np.uint8)
    out, _ = _run_forward(
        images, geometry, plan, thresholds, lut, quantized, bias, no_codes, True, split_dims
    )
    return torch.from_numpy(out)


def _codes_as_rows(codes: np.ndarray, plan: ConvPlan) -> torch.Tensor:
    """(B, C, out_h * pitch) q-space codes -> (B * Hout * Wout, C) rows ordered (b, oy, ox)."""
    batch, ncodebooks = codes.shape[:2]
    grid = torch.from_numpy(codes).reshape(batch, ncodebooks, plan.out_h, plan.pitch)[..., : plan.out_w]
    return grid.permute(0, 2, 3, 1).reshape(-1, ncodebooks).contiguous()


def encode_patches(
    images: torch.Tensor, geometry: ConvGeometry, split_dims: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor | None:
    """(B*P, C) uint8 codes of every patch, read straight from the image (numba, CPU).

    Returns None where the fused kernel does not apply (other devices / dtypes; float16 and
    bfloat16 images are widened to float32, which keeps every comparison's result); callers
    then gather the split values and use the core encoder. Raises
    :class:`~maddnet.amm.hashing.NonFiniteInputError` for NaN / +-inf among the taps read.
    """
    if images.device.type == "cpu" and images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()
    if not _cpu_float32(images):
        return None
    plan = conv_plan(geometry, split_dims, images.shape[2], images.shape[3])
    ncodebooks = split_dims.shape[0]
    codes = np.empty((images.shape[0], ncodebooks, plan.ncols), np.uint8)
    # a one-column dummy table: encoding only
    dummy = torch.zeros(ncodebooks, 1, 1)
    _run_forward(images, geometry, plan, thresholds, dummy, None, None, codes, False, split_dims)
    return _codes_as_rows(codes, plan)


class MaddConvFunction(torch.autograd.Function):
    """Fused MADD conv on CPU float32: forward reads the image, backward writes its gradient.

    Forward: hard encoding straight from the image + LUT sum (+ bias), NCHW out. Backward:
    the exact LUT gradient, the tree's surrogate for thresholds and input taps (``"soft"``:
    the maths of :func:`maddnet.nn.functional.tree_surrogate_grads`; ``"soft-bf16"``: the
    same with its leaf-score product in bfloat16 on node differences; ``"path"``: those of
    :func:`maddnet.nn.functional.path_surrogate_grads`), and the bias gradient. The split
    values are never gathered into an (N, C, L) tensor.
    """

    @staticmethod
    def forward(
        ctx,
        images,
        thresholds,
        lut,
        temperature,
        bias,
        q_values,
        q_offsets,
        q_scale,
        bits,
        geometry,
        split_dims,
        surrogate="soft",
    ):
        plan = conv_plan(geometry, split_dims, images.shape[2], images.shape[3])
        ncodebooks = lut.shape[0]
        codes = np.empty((images.shape[0], ncodebooks, plan.ncols), np.uint8)
        quantized = None if q_values is None else QuantizedLut(q_values, q_offsets, q_scale, bits)
        out, flagged = _run_forward(
            images, geometry, plan, thresholds, lut, quantized, bias, codes, True, split_dims
        )
        # the backward sees the table the forward read (the de-quantised one under QAT)
        table = lut.detach() if quantized is None else quantized.dequantize()
        saved = images
        if flagged.any():
            # NaN / inf where the encoder does not read: the backward's soft tree also runs
            # over the ignored positions of each padded row (zero gradient there, but
            # 0 * NaN is NaN), so it gets those values as 0
            saved = torch.where(torch.isfinite(images), images.detach(), 0.0)
        ctx.save_for_backward(saved, thresholds, table, temperature)
        ctx.codes, ctx.plan, ctx.geometry, ctx.surrogate = codes, plan, geometry, surrogate
        ctx.has_bias = bias is not None
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):
        with no_autocast(grad_out.device.type):  # backward() called inside an autocast region
            return MaddConvFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        images, thresholds, table, temperature = ctx.saved_tensors
        plan, geometry = ctx.plan, ctx.geometry
        need_images = ctx.needs_input_grad[0]
        ncodebooks, nprototypes, nout = table.shape
        grad_out = grad_out.detach().float().contiguous()
        flat_table = table.reshape(ncodebooks * nprototypes, nout).float().contiguous()
        batch = images.shape[0]
        # Threads take groups of images (each group its own partial sums); one kernel call
        # and one leaf-score product take `chunk` images, as many as fit in
        # _BACKWARD_CHUNK_BYTES of buffers (per-call costs dominate small feature maps).
        groups = max(1, min(numba.get_num_threads(), batch))
        bf16 = ctx.surrogate == "soft-bf16"
        # float32 leaf scores (C*K per position), or bfloat16 node differences (C*(K-1))
        # plus the bfloat16 copy of dL/dY they are multiplied with
        if ctx.surrogate == "soft":
            score_bytes = 4 * ncodebooks * nprototypes * plan.ncols
        elif bf16:
            score_bytes = 2 * (ncodebooks * (nprototypes - 1) + nout) * plan.ncols
        else:
            score_bytes = 0
        per_image = score_bytes + 4 * 2 * nout * plan.ncols
        # (at least 1: an empty batch runs no chunk and returns zero gradients)
        chunk = max(1, min(batch, max(groups, _BACKWARD_CHUNK_BYTES // per_image // groups * groups)))
        grad_lut = np.zeros((groups, ncodebooks, nprototypes, nout), np.float32)
        grad_thresholds = np.zeros((groups, *thresholds.shape), np.float64)
        images_np = images.detach().contiguous().numpy()
        grad_images = np.empty(images.shape if need_images else (0, 0, 0, 0), np.float32)
        inv_tau = (1.0 / temperature.float()).contiguous().numpy()
        thresholds_np = thresholds.detach().float().contiguous().numpy()
        # buffers reused chunk after chunk (fresh 10 MB allocations page-fault on every call):
        # dL/dY laid out (M, images, positions) for the product, (images, positions, M) for
        # the kernels; the last chunk takes the front of each buffer
        rows_buffer = torch.empty(nout * chunk * plan.ncols)
        rows_t_buffer = torch.empty(chunk * plan.ncols * nout)
        no_scores, no_diffs = np.empty((0, 0, 0), np.float32), np.empty((0, 0, 0), np.uint16)
        if ctx.surrogate == "soft":
            scores_buffer = torch.empty(ncodebooks * nprototypes * plan.ncols * chunk)
        elif bf16:
            # the node differences (T[c, lm(right)] - T[c, lm(node)]) . dL/dY: the soft tree
            # reads only differences of leaf scores, and rounding the difference table
            # (not the leaf table) to bfloat16 keeps its error relative to those differences
            node_table = bf16_node_table(table.float())
            diffs_buffer = torch.empty(node_table.shape[0] * plan.ncols * chunk, dtype=torch.bfloat16)
            rows_bf16_buffer = torch.empty(nout * chunk * plan.ncols, dtype=torch.bfloat16)
        if ctx.surrogate == "path":
            kernel = _conv_kernels.conv_backward_path
            tree = (
                plan.offsets,
                plan.q_base,
                thresholds_np,
                inv_tau,
                ctx.codes,
                table.float().contiguous().numpy(),
            )
        else:
            kernel = _conv_kernels.conv_backward
            centre, factor, direct = _kernels.level_factors(thresholds_np, inv_tau)
            tree = (plan.offsets, plan.q_base, thresholds_np, inv_tau, centre, factor, direct, ctx.codes)
        filled = 0
        for start in range(0, batch, chunk):
            n = min(chunk, batch - start)
            rows = rows_buffer[: nout * n * plan.ncols].view(nout, n, plan.out_h, plan.pitch)
            if n != filled:  # the padding columns (ox >= Wout) stay zero for this layout
                rows.zero_()
                filled = n
            rows[..., : plan.out_w] = grad_out[start : start + n].transpose(0, 1)
            rows_t = rows_t_buffer[: n * plan.ncols * nout].view(n, plan.ncols, nout)
            rows_t.copy_(rows.view(nout, n, plan.ncols).permute(1, 2, 0))
            grads = (rows_t.numpy(), grad_lut, grad_thresholds, grad_images)
            if ctx.surrogate == "soft":
                # (C*K, n * q): T[c, k] . dL/dY[q], one product for the chunk
                scores = scores_buffer[: ncodebooks * nprototypes * n * plan.ncols]
                scores = scores.view(ncodebooks * nprototypes, n * plan.ncols)
                torch.mm(flat_table, rows.view(nout, n * plan.ncols), out=scores)
                grads = (scores.view(-1, n, plan.ncols).numpy(), no_diffs, *grads)
            elif bf16:
                # (C*(K-1), n * q) bfloat16 products (float32 accumulation), read as raw bits
                rows_bf16 = rows_bf16_buffer[: nout * n * plan.ncols].view(nout, n * plan.ncols)
                rows_bf16.copy_(rows.view(nout, n * plan.ncols))
                diffs = diffs_buffer[: node_table.shape[0] * n * plan.ncols]
                diffs = diffs.view(node_table.shape[0], n * plan.ncols)
                torch.mm(node_table, rows_bf16, out=diffs)
                bits = diffs.view(torch.int16).numpy().view(np.uint16)
                grads = (no_scores, bits.reshape(-1, n, plan.ncols), *grads)
            kernel(images_np, start, *tree, *grads, plan.nq, *geometry.padding)
        return MaddConvFunction._gradients(
            ctx, grad_out, grad_images, grad_thresholds, grad_lut, thresholds, table
        )

    @staticmethod
    def _gradients(ctx, grad_out, grad_images, grad_thresholds, grad_lut, thresholds, table):
        """The backward's return tuple from the kernels' per-group partial sums."""
        need_images, need_thresholds, need_lut = ctx.needs_input_grad[:3]
        grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return (
            torch.from_numpy(grad_images) if need_images else None,
            torch.from_numpy(grad_thresholds.sum(0)).to(thresholds.dtype) if need_thresholds else None,
            torch.from_numpy(grad_lut.sum(0)).to(table.dtype) if need_lut else None,
            None,
            grad_bias,
            *(None,) * 7,
        )


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
