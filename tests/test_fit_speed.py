"""The fast learning paths compute exactly what the reference algorithms compute.

Reference split search: the one-column numba kernel maddnet used before issue 16 (rows read
one by one in sort order), kept here verbatim as :func:`reference_best_splits`. Reference
co-occurrence counts: the explicit one-hot product ``G^T G``.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

from maddnet import MaddnessMatmul
from maddnet.amm import _split_kernel, hashing, prototypes
from maddnet.threads import set_threads

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch and numba thread: small fits are fastest that way on a shared machine."""
    before = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(before)


@numba.njit(cache=True, nogil=True)
def reference_best_splits(values, value_order, centred, buckets, nbuckets):  # pragma: no cover - jit
    """The pre-issue-16 kernel: best split of every bucket on one column (loss, lower, upper)."""
    nrows, width = centred.shape
    counts = np.zeros(nbuckets, np.int64)
    for i in range(nrows):
        counts[buckets[i]] += 1
    starts = np.zeros(nbuckets + 1, np.int64)
    for b in range(nbuckets):
        starts[b + 1] = starts[b] + counts[b]
    fill = starts[:-1].copy()
    grouped = np.empty(nrows, np.int64)
    for i in range(nrows):
        row = value_order[i]
        b = buckets[row]
        grouped[fill[b]] = row
        fill[b] += 1
    loss = np.zeros(nbuckets, np.float64)
    lower = np.zeros(nbuckets, np.float32)
    upper = np.full(nbuckets, np.inf, np.float32)
    total = np.empty(width, np.float64)
    left = np.empty(width, np.float64)
    for b in range(nbuckets):
        start, stop = starts[b], starts[b + 1]
        n = stop - start
        if n == 0:
            continue
        total[:] = 0.0
        total_sq = 0.0
        for p in range(start, stop):
            row = grouped[p]
            for j in range(width):
                x = centred[row, j]
                total[j] += x
                total_sq += x * x
        total_norm = 0.0
        for j in range(width):
            total_norm += total[j] * total[j]
        left[:] = 0.0
        left_norm = 0.0
        left_dot_total = 0.0
        best_score = -np.inf
        best_p = stop - 1
        for p in range(start, stop):
            row = grouped[p]
            cross = 0.0
            sq = 0.0
            dot_total = 0.0
            for j in range(width):
                x = centred[row, j]
                cross += left[j] * x
                sq += x * x
                dot_total += total[j] * x
                left[j] += x
            left_norm += 2.0 * cross + sq
            left_dot_total += dot_total
            n_left = p - start + 1
            if p == stop - 1:
                score = total_norm / n
            elif values[grouped[p + 1]] > values[row]:
                n_right = n - n_left
                right_norm = total_norm - 2.0 * left_dot_total + left_norm
                score = left_norm / n_left + right_norm / n_right
            else:
                continue
            if score > best_score:
                best_score = score
                best_p = p
        loss[b] = total_sq - best_score
        lower[b] = values[grouped[best_p]]
        if best_p < stop - 1:
            upper[b] = values[grouped[best_p + 1]]
    return loss, lower, upper


def reference_splits(self, cols, buckets, counts, nbuckets):
    """``hashing._SplitSearch.splits`` as it was: one reference kernel call per candidate."""
    out = []
    centred = np.ascontiguousarray(self.loss_values.numpy())
    for col in cols:
        values = np.ascontiguousarray(self.block_np[:, col])
        order = np.argsort(values, kind="stable")
        loss, lower, upper = reference_best_splits(values, order, centred, buckets.numpy(), nbuckets)
        out.append((torch.from_numpy(loss), torch.from_numpy(lower), torch.from_numpy(upper)))
    return out


def pixel_like(nrows: int, width: int, seed: int) -> np.ndarray:
    """Integer-valued float32 rows with many ties (as pixels have), correlated columns."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 6, size=(nrows, 1))
    return np.clip(base + rng.integers(-2, 3, size=(nrows, width)), 0, 8).astype(np.float32)


@pytest.mark.parametrize("nbuckets", [1, 3, 8])
def test_level_kernel_matches_reference(nbuckets):
    block = pixel_like(1001, 7, seed=nbuckets)  # odd row count: the 4-row sweep has a tail
    block[::3] += 0.1  # non-integer values: the centring is not exact
    centred = block.astype(np.float64) - block.astype(np.float64).mean(0)
    rng = np.random.default_rng(0)
    buckets = rng.integers(0, nbuckets, size=len(block))
    if nbuckets > 2:
        buckets[buckets == 1] = 0  # an empty bucket
    cols = [3, 0, 6, 2]
    values = np.ascontiguousarray(block[:, cols].T)
    orders = np.stack([np.argsort(v, kind="stable") for v in values])
    row_sq = _split_kernel.row_sqnorms(centred)
    mean = block.astype(np.float64).mean(0)
    np.testing.assert_array_equal(row_sq, np.array([sum(x * x for x in row) for row in centred]))
    bucket_sq = np.bincount(buckets, weights=row_sq, minlength=nbuckets)
    loss, lower, upper = _split_kernel.best_splits_level(
        values, orders, block, mean, row_sq, bucket_sq, buckets, nbuckets
    )
    for k in range(len(cols)):
        ref_loss, ref_lower, ref_upper = reference_best_splits(
            values[k], orders[k], centred, buckets, nbuckets
        )
        np.testing.assert_array_equal(lower[k], ref_lower)
        np.testing.assert_array_equal(upper[k], ref_upper)
        # Only the candidate-independent sum of ||x||^2 is summed in another order.
        np.testing.assert_allclose(loss[k], ref_loss, rtol=1e-12, atol=1e-9)


def test_radix_argsort_equals_numpy_stable_argsort():
    rng = np.random.default_rng(3)
    values = np.stack(
        [
            rng.integers(-3, 4, size=5000).astype(np.float32),  # ties, negatives, zeros
            rng.normal(size=5000).astype(np.float32) * 1e30,
            np.where(rng.random(5000) < 0.5, np.float32(-0.0), np.float32(0.0)),  # -0.0 == 0.0
            np.concatenate([[np.inf, -np.inf, 1e-45, -1e-45], rng.normal(size=4996)]).astype(np.float32),
        ]
    )
    expected = np.stack([np.argsort(v, kind="stable") for v in values])
    np.testing.assert_array_equal(_split_kernel.stable_argsort(values), expected)


def fit_both(rows: torch.Tensor, weight: torch.Tensor, monkeypatch, **options):
    """(fast, reference) fitted MaddnessMatmul on the same data."""
    fast = MaddnessMatmul(**options).fit(rows, weight)
    with monkeypatch.context() as patch:
        patch.setattr(hashing._SplitSearch, "splits", reference_splits)
        reference = MaddnessMatmul(**options).fit(rows, weight)
    return fast, reference


def assert_same_fit(fast: MaddnessMatmul, reference: MaddnessMatmul) -> None:
    for name in ("split_dims_", "thresholds_", "prototypes_"):
        assert torch.equal(getattr(fast.encoder_, name), getattr(reference.encoder_, name)), name


@pytest.mark.parametrize("objective", ["input", "output"])
def test_trees_and_prototypes_are_bit_identical(monkeypatch, objective):
    rows = torch.from_numpy(pixel_like(3000, 48, seed=5))
    rows[:, 20:30] += torch.randn(3000, 10, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(48, 5, generator=torch.Generator().manual_seed(2))
    fast, reference = fit_both(rows, weight, monkeypatch, ncodebooks=6, hash_objective=objective)
    assert_same_fit(fast, reference)


def test_fashion_mnist_trees_are_bit_identical(monkeypatch, require_data):
    require_data(FASHION_MNIST.exists(), f"Fashion-MNIST not found at {FASHION_MNIST}")
    with gzip.open(FASHION_MNIST) as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)[:6000]
    rows = torch.from_numpy(pixels.astype(np.float32))
    weight = torch.randn(784, 10, generator=torch.Generator().manual_seed(0))
    fast, reference = fit_both(rows, weight, monkeypatch, ncodebooks=16)
    assert_same_fit(fast, reference)


@pytest.mark.parametrize(
    ("ncodebooks", "nprototypes", "dtype"), [(1, 16, torch.uint8), (5, 4, torch.uint8), (6, 16, torch.int64)]
)
def test_cooccurrence_equals_one_hot_product(ncodebooks, nprototypes, dtype):
    codes = torch.randint(
        0, nprototypes, (777, ncodebooks), generator=torch.Generator().manual_seed(ncodebooks)
    )
    codes = codes.to(dtype)
    onehot = torch.nn.functional.one_hot(
        prototypes.code_indices(codes, nprototypes), ncodebooks * nprototypes
    )
    onehot = onehot.sum(1).double()  # (N, C*K) G
    gram = prototypes.code_cooccurrence(codes, nprototypes)
    assert gram.dtype == torch.float64
    assert torch.equal(gram, onehot.T @ onehot)


def run_python(code: str, env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


KERNEL = """
import numpy as np
from _jit import cached_njit


@cached_njit()
def total(x):
    return x.sum()
"""


def test_kernel_cache_is_reused_and_unwritable_places_fall_back(tmp_path):
    import maddnet._jit

    source = Path(maddnet._jit.__file__).read_text()
    call = "import numpy as np, kernel as k; k.total(np.ones(3)); print(dict(k.total.stats.cache_hits))"

    def place(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "_jit.py").write_text(source)
        (folder / "kernel.py").write_text(KERNEL)
        return folder

    # A fresh process loads what the previous one compiled.
    cached = place("cached")
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    run_python(call, env, cached)
    assert run_python(call, env, cached).strip() != "{}"
    # No writable cache folder anywhere (a file where each would go): compiles in memory.
    blocked = place("blocked")
    (blocked / "__pycache__").write_text("")
    nowhere = tmp_path / "not-a-folder"
    nowhere.write_text("")
    env = {"NUMBA_CACHE_DIR": "", "XDG_CACHE_HOME": str(nowhere), "HOME": str(nowhere)}
    assert run_python(call, env, blocked).strip() == "{}"


def test_every_cached_kernel_goes_through_cached_njit():
    """A bare ``numba.njit(cache=True)`` fails at import on a read-only install."""
    import maddnet

    root = Path(maddnet.__file__).parent
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "_jit.py" and "cache=True" in path.read_text().replace("``cache=True``", "")
    ]
    assert offenders == []
