"""numba CPU kernels of the MADD conv: fused eval forward, encoding, training backward.

Layout. Each image is copied into a zero-padded plane (Cin, Hp, Wp) held by the thread
(it stays in cache), so every split tap is a flat offset ``tap_offset = channel * Hp * Wp
+ dy * Wp + dx`` (dilation included) and the tap of output position q is
``plane[q_base[q] + tap_offset]``. Output positions are indexed by ``q``:

* stride 1: ``q = oy * Wp + ox`` (the padded row pitch), so ``q_base[q] = q`` and one
  contiguous loop runs over the whole image; the ``Wp - Wout`` positions per row with
  ``ox >= Wout`` are computed and ignored (their gradients are zero);
* other strides: ``q = oy * Wout + ox`` and ``q_base[q] = oy * sy * Wp + ox * sx``.

``nq = (Hout - 1) * pitch + Wout`` positions in all. Loops run over q, so they are long
and vectorise. Trees of depth 4 (K = 16, the MADDness default) walk the levels with a
chain of selects instead of a threshold gather. Kernels work on float32 only. The forward
flags every image holding a NaN or +-inf while it copies the image into its plane
(``x - x`` summed per column: about 1 % of the eval forward); the caller checks flagged
images' read taps exactly and refuses those inputs.
"""

from __future__ import annotations

import numba
import numpy as np

from .._jit import cached_njit
from ..amm._lut_kernel import _leaf4
from ._kernels import leaves_from_bf16, path_score_differences

# fastmath without nnan / ninf: inputs are finite (the forward refuses others), clamps keep exp finite.
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
# q positions per block of the training backward (its temporaries: ~ (2K) x block floats)
_QBLOCK = 256


@numba.njit(inline="always")
def _pad_image(images, b, plane, pad_y, pad_x):  # pragma: no cover
    """Copy image b into the zeroed padded plane (Cin, Hp, Wp)."""
    channels, height, width = images.shape[1], images.shape[2], images.shape[3]
    for ch in range(channels):
        for y in range(height):
            src = images[b, ch, y]
            dst = plane[ch, y + pad_y, pad_x : pad_x + width]
            for x in range(width):
                dst[x] = src[x]


@numba.njit(inline="always")
def _pad_image_checked(images, b, plane, pad_y, pad_x, check):  # pragma: no cover
    """:func:`_pad_image`; True when image b holds a NaN or +-inf.

    ``x - x`` is 0 for finite x and NaN otherwise; it is summed per column into ``check``
    (a (W,) float32 scratch; no reduction across lanes, so the copy loop stays vectorised).
    The flag is a superset of what the encoder reads: the caller checks the taps of flagged
    images exactly (``patches.check_read_taps``).
    """
    channels, height, width = images.shape[1], images.shape[2], images.shape[3]
    check[:] = 0
    for ch in range(channels):
        for y in range(height):
            src = images[b, ch, y]
            dst = plane[ch, y + pad_y, pad_x : pad_x + width]
            for x in range(width):
                value = src[x]
                dst[x] = value
                check[x] += value - value
    flagged = False
    for x in range(width):
        flagged |= check[x] != 0
    return flagged


@numba.njit(inline="always")
def _encode_codebook(flat, q_base, offsets_c, v, leaf):  # pragma: no cover
    """leaf[q] (uint8, (nq,)) = the codebook's code at every position q.

    flat: the padded plane, flattened; offsets_c (L,) tap offsets; v (K-1,) thresholds.
    q_base empty means stride 1 (q_base[q] = q).
    """
    nq = leaf.shape[0]
    depth = offsets_c.shape[0]
    contiguous = q_base.shape[0] == 0
    if depth == 4:
        # thresholds as scalars: loop-invariant registers in the vector loop
        t0, t1, t2, t3, t4, t5, t6, t7 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
        t8, t9, t10, t11, t12, t13, t14 = v[8], v[9], v[10], v[11], v[12], v[13], v[14]
        o0, o1, o2, o3 = offsets_c[0], offsets_c[1], offsets_c[2], offsets_c[3]
        if contiguous:
            # one view per tap: flat[q + o] with a signed index compiles to a vector gather
            # (numba's negative-index wraparound), a view's [q] to plain vector loads (the
            # encoding loop about 4x faster, measured at 64 channels)
            f0, f1, f2, f3 = flat[o0 : o0 + nq], flat[o1 : o1 + nq], flat[o2 : o2 + nq], flat[o3 : o3 + nq]
            for q in range(nq):
                leaf[q] = _leaf4(
                    f0[q],
                    f1[q],
                    f2[q],
                    f3[q],
                    t0,
                    t1,
                    t2,
                    t3,
                    t4,
                    t5,
                    t6,
                    t7,
                    t8,
                    t9,
                    t10,
                    t11,
                    t12,
                    t13,
                    t14,
                )
        else:
            for q in range(nq):
                base = q_base[q]
                leaf[q] = _leaf4(
                    flat[base + o0],
                    flat[base + o1],
                    flat[base + o2],
                    flat[base + o3],
                    t0,
                    t1,
                    t2,
                    t3,
                    t4,
                    t5,
                    t6,
                    t7,
                    t8,
                    t9,
                    t10,
                    t11,
                    t12,
                    t13,
                    t14,
                )
        return
    node = np.zeros(nq, np.int32)
    for level in range(depth):
        first = (1 << level) - 1
        o = offsets_c[level]
        for q in range(nq):
            base = q if contiguous else q_base[q]
            node[q] = 2 * node[q] + (flat[base + o] > v[first + node[q]])
    for q in range(nq):
        leaf[q] = node[q]


@cached_njit(error_model="numpy")
def _conv_forward_image(
    b,
    out,
    bad,
    images,
    offsets,
    q_base,
    thresholds,
    table,
    inv_scale,
    offset_sum,
    bias,
    accumulator,
    out_h,
    out_w,
    pitch,
    pad_y,
    pad_x,
    codes,
    want_out,
):  # pragma: no cover
    """:func:`conv_forward` for image b: fills out[b] (when wanted), bad[b] and codes[b] (when
    kept).

    The parallel loop's body is a function of its own so that numba's parallel passes and
    lowering work on a loop of one call instead of the whole body: about a quarter less
    compile time on a fresh cache, per signature (three are common). It compiles as numba
    compiles a parallel loop's body, with numpy's error model (no ZeroDivisionError checks),
    and the caller passes the loop index as int64 (prange's may be unsigned in the parallel
    loop), so each signature of conv_forward compiles this once, not once per index type.
    """
    _, channels, height, width = images.shape
    ncodebooks = offsets.shape[0]
    nout = table.shape[2]
    nq = (out_h - 1) * pitch + out_w
    keep_codes = codes.shape[0] > 0
    plane = np.zeros((channels, height + 2 * pad_y, width + 2 * pad_x), np.float32)
    check = np.empty(width, np.float32)
    bad[b] = _pad_image_checked(images, b, plane, pad_y, pad_x, check)
    flat = plane.reshape(-1)
    image_codes = codes[b] if keep_codes else np.empty((ncodebooks, nq), np.uint8)
    for c in range(ncodebooks):
        _encode_codebook(flat, q_base, offsets[c], thresholds[c], image_codes[c, :nq])
    if not want_out:
        return
    acc = np.zeros(nout, accumulator.dtype)
    result = np.empty((out_w, nout), np.float32)
    row_codes = np.empty(ncodebooks, np.int64)
    for oy in range(out_h):
        for ox in range(out_w):
            q = oy * pitch + ox
            for c in range(ncodebooks):
                row_codes[c] = image_codes[c, q]
            acc[:] = 0
            for c in range(ncodebooks):
                entry = table[c, row_codes[c]]
                for m in range(nout):
                    acc[m] += entry[m]
            for m in range(nout):
                result[ox, m] = (np.float32(acc[m]) * inv_scale[m] + offset_sum[m]) + bias[m]
        for m in range(nout):
            target = out[b, m, oy]
            for ox in range(out_w):
                target[ox] = result[ox, m]


@cached_njit(parallel=True)
def conv_forward(
    images,
    offsets,
    q_base,
    thresholds,
    table,
    inv_scale,
    offset_sum,
    bias,
    accumulator,
    out_h,
    out_w,
    pitch,
    pad_y,
    pad_x,
    codes,
    want_out,
):  # pragma: no cover
    """MADD conv forward: encode every patch, sum its LUT rows, write NCHW.

    images (B, Cin, H, W) float32; offsets (C, L) int64 tap offsets; q_base (nq,) int64
    or empty (stride 1); thresholds (C, K-1) float32; table (C, K, M) uint8 (integer LUT)
    or float32; inv_scale, offset_sum, bias (M,) float32 (1 / scale, summed offsets and
    bias; ones / zeros for a float LUT); accumulator: an empty array of the accumulator
    dtype (uint16 / int32 for the integer LUT: exact sums; float32 for a float LUT);
    codes (B, C, >= nq) uint8 to fill (the training backward reads them) or (0, C, 0);
    want_out False skips the LUT sum (encoding only). Returns (B, M, Hout, Wout) float32
    ``acc * inv_scale + offset_sum + bias`` (empty when not wanted) and bad (B,) bool:
    image b holds a NaN or +-inf (the caller checks whether the encoder read it). Threads
    take images.
    """
    batch = images.shape[0]
    out = np.empty((batch if want_out else 0, table.shape[2], out_h, out_w), np.float32)
    bad = np.zeros(batch, np.bool_)
    for b in numba.prange(batch):
        _conv_forward_image(
            np.int64(b),
            out,
            bad,
            images,
            offsets,
            q_base,
            thresholds,
            table,
            inv_scale,
            offset_sum,
            bias,
            accumulator,
            out_h,
            out_w,
            pitch,
            pad_y,
            pad_x,
            codes,
            want_out,
        )
    return out, bad


@numba.njit(inline="always")
def _exp32(z, out, bits, bits_as_float):  # pragma: no cover
    """out[i] = exp(z[i]) for float32 z clamped to [-80, 80], vectorisable (no libm call).

    Cody-Waite reduction ``z = n ln2 + r``, |r| <= ln2 / 2, a degree-7 Taylor polynomial
    for e^r (relative error < 1e-7) and 2^n built from its exponent bits (``bits`` int32
    scratch, ``bits_as_float`` its float32 view).
    """
    f32 = np.float32
    for i in range(z.shape[0]):
        x = min(max(z[i], f32(-80.0)), f32(80.0))
        n = np.floor(x * f32(1.4426950408889634) + f32(0.5))
        r = (x - n * f32(0.693145751953125)) - n * f32(1.428606765330187e-06)
        p = f32(1.0 / 5040.0)
        p = p * r + f32(1.0 / 720.0)
        p = p * r + f32(1.0 / 120.0)
        p = p * r + f32(1.0 / 24.0)
        p = p * r + f32(1.0 / 6.0)
        p = p * r + f32(0.5)
        p = p * r + f32(1.0)
        p = p * r + f32(1.0)
        out[i] = p
        bits[i] = (np.int32(n) + 127) << 23
    for i in range(z.shape[0]):
        out[i] *= bits_as_float[i]


@numba.njit(inline="always")
def _image_planes(images, b, pad_y, pad_x, want_images):  # pragma: no cover
    """(flat padded plane of image b, zeroed flat gradient plane of the same size or an
    empty one when no image gradient is wanted), for the backward kernels."""
    _, channels, height, width = images.shape
    plane = np.zeros((channels, height + 2 * pad_y, width + 2 * pad_x), np.float32)
    _pad_image(images, b, plane, pad_y, pad_x)
    grad_plane = np.zeros(plane.size if want_images else 0, np.float32)
    return plane.reshape(-1), grad_plane


@numba.njit(inline="always")
def _add_lut_gradient(partial, codes, grad_rows, nq):  # pragma: no cover
    """The exact LUT gradient of one codebook and image: ``partial[codes[q]] += grad_rows[q]``
    for the first nq positions (partial (K, M), codes (>= nq,), grad_rows (>= nq, M))."""
    nout = grad_rows.shape[1]
    for q in range(nq):
        entry = partial[codes[q]]
        row = grad_rows[q]
        for m in range(nout):
            entry[m] += row[m]


@numba.njit(inline="always")
def _read_taps(flat, offsets, q_base, start, block, x):  # pragma: no cover
    """x[t, :block] = the tap ``offsets[t]`` of positions start .. start + block - 1."""
    contiguous = q_base.shape[0] == 0
    for t in range(offsets.shape[0]):
        o = offsets[t]
        if contiguous:  # views, not flat[start + i + o]: see _encode_codebook
            x[t, :block] = flat[start + o : start + o + block]
        else:
            for i in range(block):
                x[t, i] = flat[q_base[start + i] + o]


@numba.njit(inline="always")
def _add_tap_gradient(grad_plane, offset, q_base, start, block, values):  # pragma: no cover
    """Add values[:block] into the padded plane's gradient at one tap of each position."""
    if q_base.shape[0] == 0:
        tap_grad = grad_plane[start + offset : start + offset + block]
        for i in range(block):
            tap_grad[i] += values[i]
    else:
        for i in range(block):
            grad_plane[q_base[start + i] + offset] += values[i]


@numba.njit(inline="always")
def _write_image_gradient(grad_plane, grad_images, b, pad_y, pad_x):  # pragma: no cover
    """grad_images[b] = the unpadded part of the padded plane's gradient."""
    _, channels, height, width = grad_images.shape
    summed = grad_plane.reshape(channels, height + 2 * pad_y, width + 2 * pad_x)
    for ch in range(channels):
        for y in range(height):
            grad_images[b, ch, y] = summed[ch, y + pad_y, pad_x : pad_x + width]


@numba.njit(inline="always")
def _soft_node(reach, left, right, p, scale):  # pragma: no cover
    """(gradient of the node's threshold input, dL/d reach of the node) of one soft-tree node
    from its children's dL/d reach (the general loop's maths: ``reach * diff * slope`` and
    ``left + p * diff``, slope ``p (1 - p) scale``)."""
    diff = right - left
    return reach * diff * (p * (np.float32(1.0) - p) * scale), left + p * diff


@numba.njit(inline="always")
def _level_exp(x_t, scale, mid, block, z, out, bits):  # pragma: no cover
    """out[:block] = exp(scale (mid - x_t)) with the exponent clamped to [-50, 50]: the
    soft tree's per-level factor E of a block of positions (see level_factors); z and bits
    are scratch of at least block entries."""
    for i in range(block):
        z[i] = min(max(scale * (mid - x_t[i]), np.float32(-50.0)), np.float32(50.0))
    _exp32(z[:block], out[:block], bits[:block], bits[:block].view(np.float32))


@numba.njit(inline="always")
def _four_leaf_rows(grad_scores, row, j, start):  # pragma: no cover
    """grad_scores[row + k, j, start:] for k = 0..3: contiguous 1-D slices (see _soft_block4)."""
    return (
        grad_scores[row, j, start:],
        grad_scores[row + 1, j, start:],
        grad_scores[row + 2, j, start:],
        grad_scores[row + 3, j, start:],
    )


@numba.njit(inline="always")
def _soft_block4(expo, f, scale, grad_scores, row0, j, start, block, tap_grad, totals):  # pragma: no cover
    """Soft-tree forward and backward of one depth-4 codebook over one block of positions,
    every node in registers (the generic loop keeps (nodes, block) arrays).

    expo (4, >= block) = exp(s_t (centre_t - x_t)) per level; f (15,) node factors (no
    ``direct`` node); scale (4,) = 2 / tau per level; the leaf scores are
    grad_scores[row0 + k, j, start + i] (read as contiguous 1-D slices: a 2-D slice of the
    (C*K, n, q) array has unknown strides, and numba then gathers instead of loading).
    Writes tap_grad[t, :block] (the input gradient per tap) and totals[:] (per node, the
    sum of its gradient over the block).
    """
    one = np.float32(1.0)
    f0, f1, f2, f3, f4, f5, f6, f7 = f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]
    f8, f9, f10, f11, f12, f13, f14 = f[8], f[9], f[10], f[11], f[12], f[13], f[14]
    c0, c1, c2, c3 = scale[0], scale[1], scale[2], scale[3]
    e0, e1, e2, e3 = expo[0], expo[1], expo[2], expo[3]
    s0, s1, s2, s3 = _four_leaf_rows(grad_scores, row0, j, start)
    s4, s5, s6, s7 = _four_leaf_rows(grad_scores, row0 + 4, j, start)
    s8, s9, s10, s11 = _four_leaf_rows(grad_scores, row0 + 8, j, start)
    s12, s13, s14, s15 = _four_leaf_rows(grad_scores, row0 + 12, j, start)
    g0, g1, g2, g3 = tap_grad[0], tap_grad[1], tap_grad[2], tap_grad[3]
    z = np.float32(0.0)
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = z
    t8 = t9 = t10 = t11 = t12 = t13 = t14 = z
    for i in range(block):
        # right-probabilities p, slopes d p / d x, reach of the internal nodes
        p0 = one / (one + e0[i] * f0)
        p1 = one / (one + e1[i] * f1)
        p2 = one / (one + e1[i] * f2)
        p3 = one / (one + e2[i] * f3)
        p4 = one / (one + e2[i] * f4)
        p5 = one / (one + e2[i] * f5)
        p6 = one / (one + e2[i] * f6)
        p7 = one / (one + e3[i] * f7)
        p8 = one / (one + e3[i] * f8)
        p9 = one / (one + e3[i] * f9)
        p10 = one / (one + e3[i] * f10)
        p11 = one / (one + e3[i] * f11)
        p12 = one / (one + e3[i] * f12)
        p13 = one / (one + e3[i] * f13)
        p14 = one / (one + e3[i] * f14)
        r1 = one * (one - p0)
        r2 = one * p0
        r3 = r1 * (one - p1)
        r4 = r1 * p1
        r5 = r2 * (one - p2)
        r6 = r2 * p2
        r7 = r3 * (one - p3)
        r8 = r3 * p3
        r9 = r4 * (one - p4)
        r10 = r4 * p4
        r11 = r5 * (one - p5)
        r12 = r5 * p5
        r13 = r6 * (one - p6)
        r14 = r6 * p6
        # level 3: the leaves' scores
        n7, q7 = _soft_node(r7, s0[i], s1[i], p7, c3)
        n8, q8 = _soft_node(r8, s2[i], s3[i], p8, c3)
        n9, q9 = _soft_node(r9, s4[i], s5[i], p9, c3)
        n10, q10 = _soft_node(r10, s6[i], s7[i], p10, c3)
        n11, q11 = _soft_node(r11, s8[i], s9[i], p11, c3)
        n12, q12 = _soft_node(r12, s10[i], s11[i], p12, c3)
        n13, q13 = _soft_node(r13, s12[i], s13[i], p13, c3)
        n14, q14 = _soft_node(r14, s14[i], s15[i], p14, c3)
        # levels 2, 1, 0
        n3, q3 = _soft_node(r3, q7, q8, p3, c2)
        n4, q4 = _soft_node(r4, q9, q10, p4, c2)
        n5, q5 = _soft_node(r5, q11, q12, p5, c2)
        n6, q6 = _soft_node(r6, q13, q14, p6, c2)
        n1, q1 = _soft_node(r1, q3, q4, p1, c1)
        n2, q2 = _soft_node(r2, q5, q6, p2, c1)
        n0, _ = _soft_node(one, q1, q2, p0, c0)
        g0[i] = n0
        g1[i] = n1 + n2
        g2[i] = ((n3 + n4) + n5) + n6
        g3[i] = ((((((n7 + n8) + n9) + n10) + n11) + n12) + n13) + n14
        t0 += n0
        t1 += n1
        t2 += n2
        t3 += n3
        t4 += n4
        t5 += n5
        t6 += n6
        t7 += n7
        t8 += n8
        t9 += n9
        t10 += n10
        t11 += n11
        t12 += n12
        t13 += n13
        t14 += n14
    totals[0], totals[1], totals[2], totals[3], totals[4] = t0, t1, t2, t3, t4
    totals[5], totals[6], totals[7], totals[8], totals[9] = t5, t6, t7, t8, t9
    totals[10], totals[11], totals[12], totals[13], totals[14] = t10, t11, t12, t13, t14


@cached_njit(parallel=True, fastmath=_FAST)
def conv_backward(
    images,
    image0,
    offsets,
    q_base,
    thresholds,
    inv_tau,
    centre,
    factor,
    direct,
    codes,
    grad_scores,
    diff_scores,
    grad_rows,
    grad_lut,
    grad_thresholds,
    grad_images,
    nq,
    pad_y,
    pad_x,
):  # pragma: no cover
    """Training backward of a MADD conv for images image0 .. image0 + n - 1 (soft-tree
    surrogate, the maths of :func:`maddnet.nn.functional.tree_surrogate_grads`); threads
    take groups of images.

    images (B, Cin, H, W) float32; offsets (C, L); q_base (nq,) or empty (stride 1);
    thresholds (C, K-1) float32; inv_tau (C, L) float32; centre, factor, direct: from
    :func:`maddnet.nn._kernels.level_factors`; codes (B, C, >= nq) uint8 (the forward's
    codes). For image image0 + j: grad_scores[:, j] (C*K, n, >= nq) float32
    = ``T[c, k] . dL/dY[q]``, or (``surrogate="soft-bf16"``: grad_scores empty) the node
    differences diff_scores[:, j] (C*(K-1), n, >= nq) uint16 bfloat16 bits, see
    :func:`maddnet.nn._kernels.leaves_from_bf16` (diff_scores empty otherwise); grad_rows[j] (n, >= nq, M)
    float32 = dL/dY per position (both zero at ignored positions); the first nq positions
    are read. Group g (of G, the first axis of the partial sums) takes images j = g, g + G,
    g + 2G, ... and adds into its partial sums grad_lut[g] (G, C, K, M) float32 (the exact LUT gradient) and
    grad_thresholds[g] (G, C, K-1) float64; grad_images[image0 + j] is written (skipped
    when grad_images is empty).
    """
    ncodebooks, depth = offsets.shape
    nleaves = 1 << depth
    nnodes = nleaves - 1
    want_images = grad_images.shape[0] > 0
    from_bf16 = diff_scores.shape[0] > 0
    f32 = np.float32
    one = f32(1.0)
    ngroups = grad_lut.shape[0]
    nimages = grad_rows.shape[0]
    for group in numba.prange(ngroups):
        right = np.empty((nnodes, _QBLOCK), np.float32)
        slope = np.empty((nnodes, _QBLOCK), np.float32)
        reach = np.empty((nnodes + nleaves, _QBLOCK), np.float32)
        grad_reach = np.empty((nnodes + nleaves, _QBLOCK), np.float32)
        x = np.empty((depth, _QBLOCK), np.float32)
        z = np.empty(_QBLOCK, np.float32)
        acc = np.empty(_QBLOCK, np.float32)
        expo = np.empty(_QBLOCK, np.float32)
        bits = np.empty(_QBLOCK, np.int32)
        bits_as_float = bits.view(np.float32)
        tap_grad = np.empty((depth, _QBLOCK), np.float32)
        totals = np.empty(nnodes, np.float32)
        levels = np.empty((depth, _QBLOCK), np.float32)
        scales = np.empty(depth, np.float32)
        leaves = np.empty((nleaves, 1, _QBLOCK), np.float32)
        ubits = np.empty(_QBLOCK, np.uint32)
        ubits_as_float = ubits.view(np.float32)
        for j in range(group, nimages, ngroups):
            b = image0 + j
            flat, grad_plane = _image_planes(images, b, pad_y, pad_x, want_images)
            for c in range(ncodebooks):
                # exact LUT gradient: sum of dL/dY over the positions with each code
                _add_lut_gradient(grad_lut[group, c], codes[b, c], grad_rows[j], nq)
                # depth 4 without a `direct` node: the tree in registers (same maths, about 3x
                # faster than the (nodes, block) arrays of the general loop below)
                in_registers = depth == 4 and not direct[c].any()
                for start in range(0, nq, _QBLOCK):
                    block = min(_QBLOCK, nq - start)
                    _read_taps(flat, offsets[c], q_base, start, block, x)
                    # where this block's leaf scores are: scores[row0 + k, sj, sstart + i]
                    if from_bf16:
                        leaves_from_bf16(
                            diff_scores, c * nnodes, j, start, block, depth, ubits, ubits_as_float, leaves
                        )
                        scores, row0, sj, sstart = leaves, 0, 0, 0
                    else:
                        scores, row0, sj, sstart = grad_scores, c * nleaves, j, start
                    if in_registers:
                        for t in range(depth):
                            scales[t] = f32(2.0) * inv_tau[c, t]
                            _level_exp(x[t], scales[t], centre[c, t], block, z, levels[t], bits)
                        _soft_block4(
                            levels, factor[c], scales, scores, row0, sj, sstart, block, tap_grad, totals
                        )
                        for node in range(nnodes):
                            grad_thresholds[group, c, node] -= totals[node]
                        if want_images:
                            for t in range(depth):
                                _add_tap_gradient(
                                    grad_plane, offsets[c, t], q_base, start, block, tap_grad[t]
                                )
                        continue
                    # forward through the soft tree: right-probabilities, slopes, reach
                    for i in range(block):
                        reach[0, i] = one
                    for t in range(depth):
                        scale = f32(2.0) * inv_tau[c, t]
                        first = (1 << t) - 1
                        _level_exp(x[t], scale, centre[c, t], block, z, expo, bits)
                        for node in range(first, 2 * first + 1):
                            if direct[c, node]:
                                v = thresholds[c, node]
                                for i in range(block):
                                    z[i] = scale * (v - x[t, i])
                                _exp32(z[:block], acc[:block], bits[:block], bits_as_float[:block])
                            else:
                                f = factor[c, node]
                                for i in range(block):
                                    acc[i] = expo[i] * f
                            for i in range(block):
                                p = one / (one + acc[i])
                                right[node, i] = p
                                slope[node, i] = p * (one - p) * scale
                                reach[2 * node + 1, i] = reach[node, i] * (one - p)
                                reach[2 * node + 2, i] = reach[node, i] * p
                    # backward from the leaves (heap indices nnodes .. nnodes + K - 1)
                    for k in range(nleaves):
                        grad_reach[nnodes + k, :block] = scores[row0 + k, sj, sstart : sstart + block]
                    for t in range(depth - 1, -1, -1):
                        first = (1 << t) - 1
                        for i in range(block):
                            acc[i] = 0
                        for node in range(first, 2 * first + 1):
                            total = f32(0.0)
                            for i in range(block):
                                left_grad = grad_reach[2 * node + 1, i]
                                diff = grad_reach[2 * node + 2, i] - left_grad
                                grad_node = reach[node, i] * diff * slope[node, i]
                                grad_reach[node, i] = left_grad + right[node, i] * diff
                                acc[i] += grad_node
                                total += grad_node
                            grad_thresholds[group, c, node] -= total
                        if want_images:
                            _add_tap_gradient(grad_plane, offsets[c, t], q_base, start, block, acc)
            if want_images:
                _write_image_gradient(grad_plane, grad_images, b, pad_y, pad_x)


@cached_njit(parallel=True, fastmath=_FAST)
def conv_backward_path(
    images,
    image0,
    offsets,
    q_base,
    thresholds,
    inv_tau,
    codes,
    table,
    grad_rows,
    grad_lut,
    grad_thresholds,
    grad_images,
    nq,
    pad_y,
    pad_x,
):  # pragma: no cover
    """Training backward of a MADD conv with the hard-path surrogate (``surrogate="path"``,
    the maths of :func:`maddnet.nn._kernels.path_backward`) for images image0 .. image0 + n - 1;
    threads take groups of images.

    Per position and codebook only the L nodes on the hard path get a gradient: node t
    switches between the reached leaf and the leaf reached by going the other way at t
    (then descending hard), so ``dL/dx_t = p' * dL/dY . (T[c, right] - T[c, left])`` with
    ``p = 1 / (1 + exp(2 (v - x) / tau))``: L + 1 dot products of length M per position and
    codebook, computed here, instead of the soft tree's K leaf scores from a GEMM.

    images (B, Cin, H, W) float32; offsets (C, L); q_base (nq,) or empty (stride 1);
    thresholds (C, K-1) float32; inv_tau (C, L) float32; codes (B, C, >= nq) uint8 (the
    forward's codes); table (C, K, M) float32, the table the forward read. For image
    image0 + j: grad_rows[j] (n, >= nq, M) float32 = dL/dY per position (zero at ignored
    positions). Group g (of G) takes images j = g, g + G, ... and adds into its partial sums
    grad_lut[g] (G, C, K, M) float32 and grad_thresholds[g] (G, C, K-1) float64;
    grad_images[image0 + j] is written (skipped when grad_images is empty).
    """
    ncodebooks, depth = offsets.shape
    want_images = grad_images.shape[0] > 0
    f32 = np.float32
    one = f32(1.0)
    ngroups = grad_lut.shape[0]
    for group in numba.prange(ngroups):
        x = np.empty((depth, _QBLOCK), np.float32)
        node_grad = np.empty((depth, _QBLOCK), np.float32)  # the score differences, then dL/dx
        nodes = np.empty((depth, _QBLOCK), np.int64)
        z = np.empty(_QBLOCK, np.float32)
        expo = np.empty(_QBLOCK, np.float32)
        bits = np.empty(_QBLOCK, np.int32)
        bits_as_float = bits.view(np.float32)
        for j in range(group, grad_rows.shape[0], ngroups):
            b = image0 + j
            flat, grad_plane = _image_planes(images, b, pad_y, pad_x, want_images)
            for c in range(ncodebooks):
                # exact LUT gradient: sum of dL/dY over the positions with each code
                _add_lut_gradient(grad_lut[group, c], codes[b, c], grad_rows[j], nq)
                rows_of_c = table[c]
                for start in range(0, nq, _QBLOCK):
                    block = min(_QBLOCK, nq - start)
                    _read_taps(flat, offsets[c], q_base, start, block, x)
                    for i in range(block):
                        leaf = np.int64(codes[b, c, start + i])
                        g = grad_rows[j, start + i]
                        path_score_differences(
                            g, rows_of_c, leaf, x[:, i], thresholds[c], node_grad[:, i], nodes[:, i]
                        )
                    # the slopes p' a level at a time, with the vectorised exp of the soft kernel
                    for t in range(depth):
                        scale = f32(2.0) * inv_tau[c, t]
                        for i in range(block):
                            z[i] = (thresholds[c, nodes[t, i]] - x[t, i]) * scale
                        _exp32(z[:block], expo[:block], bits[:block], bits_as_float[:block])
                        for i in range(block):
                            p = one / (one + expo[i])
                            grad = p * (one - p) * scale * node_grad[t, i]
                            node_grad[t, i] = grad
                            grad_thresholds[group, c, nodes[t, i]] -= grad
                    if want_images:
                        for t in range(depth):
                            _add_tap_gradient(grad_plane, offsets[c, t], q_base, start, block, node_grad[t])
            if want_images:
                _write_image_gradient(grad_plane, grad_images, b, pad_y, pad_x)
