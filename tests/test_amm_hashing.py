"""Hash trees: encoding against a naive loop, learning against a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maddnet.amm import hashing


def naive_encode(rows: np.ndarray, split_dims: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """One row, one codebook, one level at a time: the definition (docs/design.md, the algorithm, 2)."""
    ncodebooks, depth = split_dims.shape
    codes = np.zeros((rows.shape[0], ncodebooks), dtype=np.int64)
    for n in range(rows.shape[0]):
        for c in range(ncodebooks):
            i = 0
            for t in range(depth):
                i = 2 * i + int(rows[n, split_dims[c, t]] > thresholds[c, 2**t - 1 + i])
            codes[n, c] = i
    return codes


def random_trees(rng, ndims, ncodebooks, depth):
    split_dims = rng.integers(0, ndims, size=(ncodebooks, depth))
    thresholds = rng.normal(size=(ncodebooks, 2**depth - 1)).astype(np.float32)
    return split_dims, thresholds


ENCODERS = [hashing.encode, hashing.encode_torch]  # numba kernel on CPU, tensor ops


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("depth", [2, 4, 8])
def test_encode_matches_naive_loop_on_random_rows(depth, encoder):
    rng = np.random.default_rng(depth)
    rows = rng.normal(size=(200, 12)).astype(np.float32)
    split_dims, thresholds = random_trees(rng, 12, 5, depth)
    codes = encoder(torch.from_numpy(rows), torch.from_numpy(split_dims), torch.from_numpy(thresholds))
    assert codes.dtype == torch.uint8
    np.testing.assert_array_equal(codes.numpy(), naive_encode(rows, split_dims, thresholds))


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encode_matches_naive_loop_on_adversarial_rows(encoder):
    rng = np.random.default_rng(1)
    split_dims, thresholds = random_trees(rng, 6, 3, 4)
    # Values exactly at thresholds, just above/below them, constant columns, duplicates.
    at = thresholds.reshape(-1)
    above = np.nextafter(at, np.float32(np.inf))
    below = np.nextafter(at, np.float32(-np.inf))
    pool = np.concatenate([at, above, below, [0.0, -0.0]]).astype(np.float32)
    rows = rng.choice(pool, size=(300, 6)).astype(np.float32)
    rows[:, 2] = pool[0]  # a constant column
    rows[100:150] = rows[0]  # duplicate rows
    codes = encoder(torch.from_numpy(rows), torch.from_numpy(split_dims), torch.from_numpy(thresholds))
    np.testing.assert_array_equal(codes.numpy(), naive_encode(rows, split_dims, thresholds))


LAYOUTS = {
    "row-major": lambda rows: torch.from_numpy(rows),
    "column-major": lambda rows: torch.from_numpy(np.asfortranarray(rows)),  # rows.T contiguous
    "strided": lambda rows: torch.from_numpy(np.concatenate([rows, rows], axis=1))[:, : rows.shape[1]],
    "every-other-row": lambda rows: torch.from_numpy(np.repeat(rows, 2, axis=0))[::2],
    # column-major with a column stride larger than N (the first rows of a longer matrix)
    "column-major-slice": lambda rows: torch.from_numpy(np.asfortranarray(np.concatenate([rows, rows])))[
        : rows.shape[0]
    ],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("depth", [2, 3, 4, 5, 8])
def test_cpu_kernels_match_naive_loop_in_every_layout(depth, layout):
    # K = 16 goes through the row-major or the column-major select kernel, other K and
    # other strides through the general heap walk; 600 rows span several 256-row blocks.
    rng = np.random.default_rng(10 * depth + len(layout))
    rows = rng.normal(size=(600, 40)).astype(np.float32)
    split_dims, thresholds = random_trees(rng, 40, 7, depth)
    tensor = LAYOUTS[layout](rows)
    assert np.array_equal(tensor.numpy(), rows)
    codes = hashing.encode(tensor, torch.from_numpy(split_dims), torch.from_numpy(thresholds))
    assert codes.dtype == torch.uint8 and codes.shape == (600, 7) and codes.is_contiguous()
    np.testing.assert_array_equal(codes.numpy(), naive_encode(rows, split_dims, thresholds))


def test_column_major_rows_take_the_column_kernel_without_a_copy(monkeypatch):
    from maddnet.amm import _lut_kernel

    rng = np.random.default_rng(3)
    rows = np.asfortranarray(rng.normal(size=(300, 24)).astype(np.float32))
    split_dims, thresholds = random_trees(rng, 24, 4, 4)
    seen = {}
    real = _lut_kernel.encode_cols4

    def spy(cols, *args):
        seen["shares_memory"] = np.shares_memory(cols, rows)
        return real(cols, *args)

    monkeypatch.setattr(_lut_kernel, "encode_cols4", spy)
    codes = hashing.encode(torch.from_numpy(rows), torch.from_numpy(split_dims), torch.from_numpy(thresholds))
    assert seen == {"shares_memory": True}
    np.testing.assert_array_equal(codes.numpy(), naive_encode(rows, split_dims, thresholds))
    # a column-major float64 tensor is converted once and keeps its layout
    seen.clear()
    hashing.encode(
        torch.from_numpy(rows.astype(np.float64, order="F")),
        torch.from_numpy(split_dims),
        torch.from_numpy(thresholds),
    )
    assert seen == {"shares_memory": False}


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("depth", [3, 4])
def test_cpu_kernels_on_values_at_and_next_to_thresholds(depth, layout):
    rng = np.random.default_rng(depth)
    split_dims, thresholds = random_trees(rng, 9, 4, depth)
    thresholds[0, 0] = 0.0  # -0.0 and +0.0 are equal: both go left
    at = thresholds.reshape(-1)
    pool = np.concatenate(
        [
            at,
            np.nextafter(at, np.float32(np.inf)),
            np.nextafter(at, np.float32(-np.inf)),
            [
                0.0,
                -0.0,
                np.float32(1e-45),
                np.float32(-1e-45),
                np.finfo(np.float32).max,
                -np.finfo(np.float32).max,
            ],
        ]
    ).astype(np.float32)
    rows = rng.choice(pool, size=(1000, 9)).astype(np.float32)
    rows[:, 4] = pool[1]  # a constant column
    codes = hashing.encode(LAYOUTS[layout](rows), torch.from_numpy(split_dims), torch.from_numpy(thresholds))
    np.testing.assert_array_equal(codes.numpy(), naive_encode(rows, split_dims, thresholds))
    np.testing.assert_array_equal(
        codes.numpy(),
        hashing.encode_torch(
            torch.from_numpy(rows), torch.from_numpy(split_dims), torch.from_numpy(thresholds)
        ),
    )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("depth", [3, 4])
def test_cpu_kernels_refuse_nan_and_inf_among_read_values(depth, layout):
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(700, 12)).astype(np.float32)
    split_dims, thresholds = random_trees(rng, 12, 3, depth)
    read = sorted(set(split_dims.reshape(-1).tolist()))
    unread = sorted(set(range(12)) - set(read))
    dims, nodes = torch.from_numpy(split_dims), torch.from_numpy(thresholds)
    for value in (np.nan, np.inf, -np.inf):
        bad = rows.copy()
        bad[611, read[-1]] = value
        bad[650, read[0]] = value  # the first bad row is reported
        with pytest.raises(ValueError, match=rf"A contains NaN/inf in row 611, column\(s\) \[{read[-1]}\]"):
            hashing.encode(LAYOUTS[layout](bad), dims, nodes)
        if unread:  # values the trees never read cannot change the codes
            ignored = rows.copy()
            ignored[3, unread[0]] = value
            np.testing.assert_array_equal(
                hashing.encode(LAYOUTS[layout](ignored), dims, nodes).numpy(),
                naive_encode(rows, split_dims, thresholds),
            )


def test_subspace_bounds_are_contiguous_and_balanced():
    bounds = hashing.subspace_bounds(10, 3)
    assert bounds == [(0, 4), (4, 7), (7, 10)]
    widths = [b - a for a, b in hashing.subspace_bounds(784, 64)]
    assert sum(widths) == 784 and max(widths) - min(widths) <= 1
    with pytest.raises(ValueError, match="cannot exceed"):
        hashing.subspace_bounds(3, 4)


def sse(block: np.ndarray) -> float:
    return float(((block - block.mean(0)) ** 2).sum()) if len(block) else 0.0


def brute_force_tree(block: np.ndarray, depth: int):
    """Greedy tree with every column a candidate and every threshold tried (plain loops)."""
    nrows, width = block.shape
    buckets = np.zeros(nrows, dtype=np.int64)
    split_dims, losses = [], []
    for level in range(depth):
        best = None
        for col in range(width):
            total, chosen = 0.0, []
            for b in range(2**level):
                members = block[buckets == b]
                values = np.unique(members[:, col]) if len(members) else np.zeros(1)
                options = [(sse(members), values[-1])]  # all rows left
                for lo, hi in zip(values[:-1], values[1:], strict=True):
                    left = members[members[:, col] <= lo]
                    right = members[members[:, col] > lo]
                    options.append((sse(left) + sse(right), (lo, hi)))
                loss, _ = min(options, key=lambda o: o[0])
                total += loss
                chosen.append(loss)
            if best is None or total < best[0] - 1e-9:
                best = (total, col)
        split_dims.append(best[1])
        losses.append(best[0])
        # route with the same rule as the learner, using its best thresholds per bucket
        col = best[1]
        new = np.empty_like(buckets)
        for b in range(2**level):
            idx = np.nonzero(buckets == b)[0]
            members = block[idx]
            values = np.unique(members[:, col]) if len(idx) else np.zeros(1)
            options = [(sse(members), np.inf)]
            for lo in values[:-1]:
                options.append((sse(members[members[:, col] <= lo]) + sse(members[members[:, col] > lo]), lo))
            _, cut = min(options, key=lambda o: o[0])
            new[idx] = 2 * b + (members[:, col] > cut)
        buckets = new
    return split_dims, losses, buckets


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_learn_tree_matches_brute_force_search(backend):
    rng = np.random.default_rng(7)
    block = rng.normal(size=(48, 4)).astype(np.float32) * np.array([1.0, 3.0, 0.5, 2.0], np.float32)
    fit = hashing.learn_tree(torch.from_numpy(block), depth=3, ncandidates=4, backend=backend)
    split_dims, _, leaves = brute_force_tree(block.astype(np.float64), 3)
    assert fit.split_dims.tolist() == split_dims
    np.testing.assert_array_equal(fit.leaves.numpy(), leaves)
    # The returned partition is the one encode() produces on the training rows.
    codes = hashing.encode(torch.from_numpy(block), fit.split_dims[None], fit.thresholds[None])
    np.testing.assert_array_equal(codes[:, 0].long().numpy(), fit.leaves.numpy())
    # Leaf means are the means of the rows in each leaf.
    for leaf in np.unique(leaves):
        np.testing.assert_allclose(
            fit.leaf_means[leaf].numpy(), block[leaves == leaf].mean(0), rtol=1e-5, atol=1e-6
        )


def test_backends_agree_on_continuous_data():
    block = torch.randn(3000, 10, generator=torch.Generator().manual_seed(3))
    a = hashing.learn_tree(block, 4, 4, backend="numba")
    b = hashing.learn_tree(block, 4, 4, backend="torch")
    assert torch.equal(a.split_dims, b.split_dims)
    assert torch.equal(a.thresholds, b.thresholds)
    assert torch.equal(a.leaves, b.leaves)


def test_learn_tree_on_constant_and_duplicate_rows():
    block = torch.zeros(64, 3)
    block[:, 1] = 2.5  # every column constant
    fit = hashing.learn_tree(block, 4)
    assert torch.all(fit.leaves == 0)  # nothing to split: every row stays left
    assert torch.allclose(fit.leaf_means, block[0].expand(16, 3))  # empty leaves inherit
    dup = torch.cat([torch.ones(30, 2), -torch.ones(34, 2)])
    fit = hashing.learn_tree(dup, 2)
    assert len(torch.unique(fit.leaves)) == 2
    codes = hashing.encode(dup, fit.split_dims[None], fit.thresholds[None])[:, 0].long()
    assert torch.equal(codes, fit.leaves)


def test_thresholds_separate_neighbouring_floats():
    lower = torch.tensor([1.0, 0.0, -3.0])
    upper = torch.nextafter(lower, torch.tensor(float("inf")))
    thresholds = hashing.split_thresholds(lower, upper)
    assert torch.all(lower <= thresholds) and torch.all(upper > thresholds)
    all_left = hashing.split_thresholds(torch.tensor([2.0]), torch.tensor([float("inf")]))
    assert all_left.item() == 2.0


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        hashing.learn_tree(torch.randn(20, 2), 2, backend="cuda-magic")


def test_cpu_kernels_keep_torch_thread_count():
    # numba's OpenMP layer resets the OpenMP thread count when its pool starts; the
    # encoder restores what torch was set to (a fresh process: the pool starts only once).
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from maddnet.amm import hashing, lut\n"
        "dims = torch.zeros(2, 4, dtype=torch.long)\n"
        "codes = hashing.encode(torch.randn(50, 8), dims, torch.zeros(2, 15))\n"
        "lut.packed_lut_sum(codes, lut.pack_lut(lut.quantize_lut(torch.randn(2, 16, 3))))\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
