"""MaddnessMatmul: decoding, LUT quantisation, accuracy, state, input checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maddnet import MaddnessMatmul, NotFittedError
from maddnet.amm import hashing, lut, prototypes


def low_rank_data(nrows=4000, ndims=64, nout=16, rank=8, noise=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(nrows, rank, generator=gen) @ torch.randn(rank, ndims, generator=gen)
    rows += noise * torch.randn(nrows, ndims, generator=gen)
    weight = torch.randn(ndims, nout, generator=gen)
    return rows, weight


def nmse(approx, exact):
    return float(((approx - exact) ** 2).sum() / (exact**2).sum())


def test_decode_is_the_explicit_sum_of_lut_entries():
    rows, weight = low_rank_data(nrows=500, ndims=20, nout=6)
    amm = MaddnessMatmul(ncodebooks=5, nprototypes=8, lut_bits=None).fit(rows, weight)
    codes = amm.encode(rows)
    expected = torch.zeros(500, 6)
    for n in range(500):
        for c in range(5):
            expected[n] += amm.lut_[c, codes[n, c].item()]
    torch.testing.assert_close(amm.decode(codes), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(amm(rows), expected, rtol=0, atol=1e-5)


def test_lut_is_prototypes_times_weight():
    rows, weight = low_rank_data(nrows=300, ndims=12, nout=3)
    amm = MaddnessMatmul(ncodebooks=3, nprototypes=4, lut_bits=None).fit(rows, weight)
    expected = torch.einsum("ckd,dm->ckm", amm.prototypes_.double(), weight.double()).float()
    torch.testing.assert_close(amm.lut_, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["codebook", "column"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_lut_error_is_within_the_documented_bound(granularity, bits):
    rows, weight = low_rank_data(nrows=2000, ndims=48, nout=10)
    weight[:, 0] *= 20  # one large column: the per-column scale should help there
    exact_float = MaddnessMatmul(ncodebooks=12, lut_bits=None).fit(rows, weight)
    quant = MaddnessMatmul(ncodebooks=12, lut_bits=bits, lut_granularity=granularity)
    encoder_state = {k: v for k, v in exact_float.state_dict().items() if k != "lut"}
    quant.load_state_dict({**encoder_state, "config": quant.get_config()})
    quant.set_weight(weight)
    bound = quant.lut_q_.max_abs_error()
    err = (quant(rows) - exact_float(rows)).abs()
    assert torch.all(err <= bound + 1e-4 * exact_float(rows).abs().amax(0))
    # Every entry within half a quantisation step, and the scale is a power of two.
    entry_err = (quant.lut_q_.dequantize() - quant.lut_).abs()
    assert torch.all(entry_err <= 0.5 / quant.lut_q_.scale + 1e-5)
    assert torch.all(torch.log2(quant.lut_q_.scale) == torch.round(torch.log2(quant.lut_q_.scale)))
    assert quant.lut_q_.values.dtype == torch.uint8


def test_column_granularity_is_finer_than_codebook():
    rows, weight = low_rank_data(nrows=2000, ndims=48, nout=10)
    weight[:, 0] *= 50
    errors = {}
    for granularity in ("codebook", "column"):
        amm = MaddnessMatmul(ncodebooks=12, lut_bits=8, lut_granularity=granularity).fit(rows, weight)
        reference = lut.lut_sum(amm.encode(rows), amm.lut_)
        errors[granularity] = nmse(amm(rows)[:, 1:], reference[:, 1:])
    assert errors["column"] < errors["codebook"] / 4


@pytest.mark.parametrize("ncodebooks", [64, 300])  # sums below and above 2**16
def test_integer_accumulation_is_exact(ncodebooks):
    gen = torch.Generator().manual_seed(0)
    low = 0 if ncodebooks < 257 else 240  # large entries: a uint16 adder would overflow at C=300
    values = torch.randint(low, 256, (ncodebooks, 16, 7), generator=gen, dtype=torch.uint8)
    scale = torch.tensor([1.0, 2.0, 0.5, 4.0, 1.0, 1.0, 8.0])
    offsets = torch.randn(ncodebooks, 7, generator=gen)
    qlut = lut.QuantizedLut(values, offsets, scale, 8)
    codes = torch.randint(0, 16, (300, ncodebooks), generator=gen, dtype=torch.uint8)
    int_sum = torch.zeros(300, 7, dtype=torch.int64)
    for c in range(ncodebooks):
        int_sum += values[c, codes[:, c].long()].long()
    assert (int_sum.max() >= 2**16) == (ncodebooks >= 257)
    expected = int_sum.float() / scale + offsets.sum(0)
    # float32 embedding_bag sums of the integer entries are exact (all partial sums < 2**24)
    assert torch.equal(lut.quantized_lut_sum(codes, qlut), expected)
    assert torch.equal(lut.quantized_lut_sum(codes, qlut, qlut.sum_table()), expected)


@pytest.mark.parametrize("granularity", ["codebook", "column"])
@pytest.mark.parametrize(
    ("ncodebooks", "nprototypes", "nout", "bits"),
    [
        (1, 16, 1, 8),
        (3, 4, 7, 4),
        (16, 16, 100, 8),
        (16, 16, 130, 8),
        (64, 16, 64, 8),
        (257, 8, 5, 8),
        (41, 256, 3, 8),
    ],
)
def test_packed_lut_sum_equals_quantized_lut_sum(ncodebooks, nprototypes, nout, bits, granularity):
    gen = torch.Generator().manual_seed(ncodebooks)
    table = torch.randn(ncodebooks, nprototypes, nout, generator=gen) * torch.logspace(-3, 2, nout)
    qlut = lut.quantize_lut(table, bits, granularity)
    qlut.values[0, 0] = 2**bits - 1  # the largest entries: the uint16 sum reaches its bound
    codes = torch.randint(0, nprototypes, (700, ncodebooks), generator=gen, dtype=torch.uint8)
    codes[:5] = 0
    packed = lut.pack_lut(qlut)
    assert packed is not None and packed.values.shape[2] % 64 == 0
    small = -(-ncodebooks // 2) * nprototypes**2 * packed.values.shape[2] * 2 <= lut.PAIR_TABLE_BYTES
    assert (packed.pairs is not None) == (ncodebooks > 1 and small)
    expected = lut.quantized_lut_sum(codes, qlut)
    assert torch.equal(lut.packed_lut_sum(codes, packed), expected)
    assert torch.equal(lut.packed_lut_sum(codes.long(), packed), expected)
    single = dataclasses.replace(packed, pairs=None)  # the kernel without the pair table
    assert torch.equal(lut.packed_lut_sum(codes, single), expected)
    # the integer sums before de-quantisation: a naive loop over codebooks, and the float
    # output is exactly sums * inv_scale + offset_sum
    naive = torch.zeros(codes.shape[0], nout, dtype=torch.int64)
    for c in range(ncodebooks):
        naive += qlut.values[c, codes[:, c].long()].long()
    for form in (packed, single):
        sums = lut.packed_lut_integer_sum(codes, form)
        assert sums.dtype == torch.uint16 and torch.equal(sums.long(), naive)
    rebuilt = sums.float() * torch.from_numpy(packed.inv_scale) + torch.from_numpy(packed.offset_sum)
    assert torch.equal(rebuilt, expected)


@pytest.mark.parametrize("summer", ["packed_lut_sum", "packed_lut_integer_sum"])
def test_packed_sums_refuse_codes_they_would_read_out_of_bounds(summer):
    packed = lut.pack_lut(lut.quantize_lut(torch.randn(4, 16, 3)))
    run = getattr(lut, summer)
    with pytest.raises(ValueError, match=rf"{summer}: codes must lie in \[0, 16\), got \[0, 16\]"):
        run(torch.tensor([[0, 1, 2, 16]], dtype=torch.uint8), packed)
    with pytest.raises(ValueError, match=rf"{summer}: codes must lie in \[0, 16\), got \[-1, 2\]"):
        run(torch.tensor([[0, 1, 2, -1]]), packed)
    with pytest.raises(ValueError, match=rf"{summer}: codes must be an \(N, 4\) CPU tensor, got \(1, 3\)"):
        run(torch.zeros(1, 3, dtype=torch.uint8), packed)
    for dtype in (torch.float32, torch.uint16, torch.bool):
        with pytest.raises(ValueError, match=rf"{summer}: codes must have one of the dtypes .*, got {dtype}"):
            run(torch.zeros(1, 4, dtype=dtype), packed)
    assert run(torch.zeros(0, 4, dtype=torch.uint8), packed).shape == (0, 3)


def test_pack_lut_refuses_what_it_cannot_sum_exactly():
    gen = torch.Generator().manual_seed(0)
    big = lut.quantize_lut(torch.randn(258, 16, 3, generator=gen))  # 258 * 255 >= 2**16
    assert lut.pack_lut(big) is None
    assert lut.pack_lut(lut.quantize_lut(torch.randn(258, 16, 3, generator=gen), bits=7)) is not None
    odd = lut.quantize_lut(torch.randn(4, 16, 3, generator=gen))
    assert lut.pack_lut(lut.QuantizedLut(odd.values, odd.offsets, odd.scale * 3, 8)) is None  # not 2**k
    assert lut.pack_lut(lut.QuantizedLut(odd.values, odd.offsets, odd.scale * 2.0**120, 8)) is None
    # the estimator falls back to the embedding bag there, with the same result
    rows, weight = low_rank_data(nrows=600, ndims=16, nout=3)
    amm = MaddnessMatmul(ncodebooks=4).fit(rows, weight)
    q = amm.lut_q_
    amm.lut_q_ = lut.QuantizedLut(q.values, q.offsets, q.scale * 3, q.bits)  # as a foreign table could be
    amm._lut_q_table, amm._packed = amm.lut_q_.sum_table(), False
    assert torch.equal(amm(rows), lut.quantized_lut_sum(amm.encode(rows), amm.lut_q_))
    assert amm._packed is None


@pytest.mark.parametrize("granularity", ["codebook", "column"])
def test_predict_is_the_same_for_every_input_layout(granularity):
    rows, weight = low_rank_data(nrows=1500, ndims=48, nout=70)
    amm = MaddnessMatmul(ncodebooks=12, lut_granularity=granularity).fit(rows, weight)
    expected = lut.quantized_lut_sum(hashing.encode_torch(rows, amm.split_dims_, amm.thresholds_), amm.lut_q_)
    column_major = rows.T.contiguous().T
    assert column_major.T.is_contiguous()
    for layout in (
        rows,
        column_major,
        rows.numpy(),
        np.asfortranarray(rows.numpy()),
        rows.double().T.contiguous().T,
    ):
        out = amm(layout)
        assert type(out) is type(layout)
        assert torch.equal(torch.as_tensor(out), expected)
    assert torch.equal(amm.decode(amm.encode(column_major)), expected)
    assert torch.equal(amm.decode(amm.encode(column_major).long()), expected)
    # after a new weight the packed table follows
    amm.set_weight(2 * weight)
    assert torch.equal(amm(column_major), lut.quantized_lut_sum(amm.encode(rows), amm.lut_q_))


def test_nmse_is_small_and_falls_as_codebooks_grow():
    rows, weight = low_rank_data(nrows=3000, ndims=64, nout=16)
    train, test = rows[:2500], rows[2500:]
    errors = [
        nmse(MaddnessMatmul(ncodebooks=c).fit(train, weight)(test), test @ weight) for c in (2, 4, 8, 16)
    ]
    assert errors[-1] < 0.1
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def grid_rows(ndims_pairs: int, reps: int = 5, seed: int = 0) -> torch.Tensor:
    """Each pair of columns holds a point of a 4x4 grid (16 distinct points per pair)."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    grid = grid.reshape(16, 2) * torch.tensor([1.0, 10.0])
    pairs = [grid.repeat(reps, 1)[torch.randperm(16 * reps, generator=gen)] for _ in range(ndims_pairs)]
    return torch.cat(pairs, dim=1)


@pytest.mark.parametrize("ridge", [None, 1.0])
def test_separable_grid_is_reconstructed_exactly(ridge):
    rows = grid_rows(2)  # D=4, two codebooks, each seeing one 4x4 grid
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    amm = MaddnessMatmul(ncodebooks=2, nprototypes=16, lut_bits=None, ridge=ridge).fit(rows, weight)
    assert len(torch.unique(amm.encode(rows)[:, 0])) == 16
    torch.testing.assert_close(amm(rows), rows @ weight, rtol=0, atol=1e-4)


def test_uneven_blocks_with_a_constant_column_are_exact():
    rows = torch.cat([grid_rows(1), torch.full((80, 1), 7.0), grid_rows(1, seed=3)], dim=1)  # D=5
    weight = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    amm = MaddnessMatmul(ncodebooks=2, lut_bits=None).fit(rows, weight)
    torch.testing.assert_close(amm(rows), rows @ weight, rtol=0, atol=1e-4)


def test_ridge_solution_matches_dense_normal_equations_and_lowers_error():
    rows, _ = low_rank_data(nrows=400, ndims=12)
    amm = MaddnessMatmul(ncodebooks=3, nprototypes=4, ridge=None, lut_bits=None).fit_encoder(rows)
    codes = amm.encode(rows)
    initial = amm.prototypes_
    solved = prototypes.ridge_prototypes(rows, codes, initial, ridge=0.5)
    onehot = torch.cat([torch.nn.functional.one_hot(codes[:, c].long(), 4) for c in range(3)], 1).double()
    lhs = onehot.T @ onehot + 0.5 * torch.eye(12, dtype=torch.float64)
    rhs = onehot.T @ rows.double() + 0.5 * initial.reshape(12, -1).double()
    expected = torch.linalg.solve(lhs, rhs).reshape(3, 4, 12).float()
    torch.testing.assert_close(solved, expected, rtol=1e-4, atol=1e-4)
    # The optimum never reconstructs the training rows worse than its starting point.
    recon = lambda p: ((rows - onehot.float() @ p.reshape(12, -1)) ** 2).sum()  # noqa: E731
    assert recon(solved) <= recon(initial)


@pytest.mark.parametrize("nrows", [300, 40])  # N >= C*K: primal system; N < C*K: dual system
@pytest.mark.parametrize("code_dtype", [torch.uint8, torch.int64])
def test_ridge_forms_equal_the_dense_solve(nrows, code_dtype):
    """Both systems give the dense normal-equations solution to float64 rounding."""
    ncodebooks, nprototypes, ndims = 6, 16, 10  # C*K = 96
    gen = torch.Generator().manual_seed(nrows)
    rows = torch.randn(nrows, ndims, generator=gen)
    codes = torch.randint(0, nprototypes, (nrows, ncodebooks), generator=gen).to(code_dtype)
    initial = torch.randn(ncodebooks, nprototypes, ndims, generator=gen)
    onehot = torch.nn.functional.one_hot(prototypes.code_indices(codes, nprototypes), 96).sum(1).double()
    lhs = onehot.T @ onehot + 0.7 * torch.eye(96, dtype=torch.float64)
    rhs = onehot.T @ rows.double() + 0.7 * initial.reshape(96, ndims).double()
    expected = torch.linalg.solve(lhs, rhs).reshape(ncodebooks, nprototypes, ndims).float()
    solved = prototypes.ridge_prototypes(rows, codes, initial, ridge=0.7)
    torch.testing.assert_close(solved, expected, rtol=1e-6, atol=1e-6)
    # the one-hot products the forms are built from, exactly
    table = torch.randn(96, ndims, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(prototypes.one_hot_rows(codes, table, nprototypes), onehot @ table)
    # zero columns per codebook (leaf means: zero off-block; here also gaps and empty codebooks)
    support = torch.rand(ncodebooks, 1, ndims, generator=gen) < 0.4
    support[0] = False
    support[1, :, :4], support[1, :, 4:] = True, False
    sparse = (table.reshape(ncodebooks, nprototypes, ndims) * support).reshape(96, ndims).float()
    torch.testing.assert_close(prototypes.one_hot_rows(codes, sparse, nprototypes), onehot @ sparse.double())
    torch.testing.assert_close(prototypes.one_hot_t_rows(codes, rows, nprototypes), onehot.T @ rows.double())
    assert torch.equal(prototypes.code_agreement(codes, nprototypes), onehot @ onehot.T)
    # the tensor-op twins other devices use, run here on CPU tensors
    torch.testing.assert_close(prototypes._one_hot_rows_torch(codes, table, nprototypes), onehot @ table)
    torch.testing.assert_close(
        prototypes._one_hot_t_rows_torch(codes, rows, nprototypes),
        onehot.T @ rows.double(),
        rtol=1e-6,
        atol=1e-5,
    )
    assert torch.equal(prototypes._code_agreement_torch(codes, nprototypes), onehot @ onehot.T)


def test_one_encoder_many_weights():
    rows, weight = low_rank_data(nrows=1000, ndims=32, nout=5)
    amm = MaddnessMatmul(ncodebooks=8, lut_bits=None).fit_encoder(rows)
    codes = amm.encode(rows)
    for scale in (1.0, -3.0):
        amm.set_weight(weight * scale)
        torch.testing.assert_close(amm.decode(codes), amm(rows))
        assert nmse(amm(rows), rows @ (weight * scale)) < 0.2


def test_inputs_that_require_grad_are_accepted():
    rows, weight = low_rank_data(nrows=300, ndims=16, nout=4)
    amm = MaddnessMatmul(ncodebooks=4).fit(rows.requires_grad_(), weight.requires_grad_())
    out = amm(rows)
    assert not out.requires_grad
    torch.testing.assert_close(out, amm(rows.detach()))


def test_numpy_in_numpy_out_and_torch_in_torch_out():
    rows, weight = low_rank_data(nrows=500, ndims=16, nout=4)
    amm = MaddnessMatmul(ncodebooks=4).fit(rows.numpy(), weight.numpy())
    out_np = amm(rows.numpy())
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    np.testing.assert_array_equal(out_np, amm(rows).numpy())
    assert isinstance(amm.encode(rows.numpy()), np.ndarray)
    assert amm.encode(rows.double()).dtype == torch.uint8


def test_state_dict_round_trip_gives_identical_outputs(tmp_path):
    rows, weight = low_rank_data(nrows=800, ndims=24, nout=5)
    for bits in (None, 8):
        amm = MaddnessMatmul(ncodebooks=6, lut_bits=bits, lut_granularity="column").fit(rows, weight)
        twin = MaddnessMatmul(**amm.get_config()).load_state_dict(amm.state_dict())
        assert torch.equal(twin(rows), amm(rows))
        amm.save(tmp_path / "amm.pt")
        loaded = MaddnessMatmul.load(tmp_path / "amm.pt")
        assert torch.equal(loaded(rows), amm(rows))
    with pytest.raises(ValueError, match="config"):
        MaddnessMatmul(ncodebooks=5).load_state_dict(amm.state_dict())


@settings(max_examples=25, deadline=None)
@given(
    nrows=st.integers(16, 80),
    ndims=st.integers(1, 20),
    nout=st.integers(1, 6),
    depth=st.integers(2, 4),
    data=st.data(),
)
def test_shapes_and_dtypes_for_any_valid_configuration(nrows, ndims, nout, depth, data):
    ncodebooks = data.draw(st.integers(1, ndims))
    nprototypes = 2**depth
    nrows = max(nrows, nprototypes)
    dtype = data.draw(st.sampled_from([np.float32, np.float64, np.int64]))
    bits = data.draw(st.sampled_from([None, 8]))
    rng = np.random.default_rng(nrows * 31 + ndims)
    rows = (rng.normal(size=(nrows, ndims)) * 4).astype(dtype)
    weight = rng.normal(size=(ndims, nout)).astype(np.float32)
    amm = MaddnessMatmul(ncodebooks=ncodebooks, nprototypes=nprototypes, lut_bits=bits).fit(rows, weight)
    codes = amm.encode(rows)
    assert codes.shape == (nrows, ncodebooks) and codes.dtype == np.uint8
    assert codes.max() < nprototypes
    out = amm(rows)
    assert out.shape == (nrows, nout) and out.dtype == np.float32 and np.isfinite(out).all()
    assert amm.split_dims_.shape == (ncodebooks, depth)
    assert amm.thresholds_.shape == (ncodebooks, nprototypes - 1)
    np.testing.assert_array_equal(amm(torch.from_numpy(rows)).numpy(), out)


# --------------------------------------------------------------------------- errors
def test_bad_configurations_are_refused():
    for bad in (3, 12, 512, 2):
        with pytest.raises(ValueError, match="power of two"):
            MaddnessMatmul(nprototypes=bad)
    with pytest.raises(ValueError, match="lut_bits"):
        MaddnessMatmul(lut_bits=16)
    with pytest.raises(ValueError, match="ridge"):
        MaddnessMatmul(ridge=0.0)
    with pytest.raises(ValueError, match="ncodebooks"):
        MaddnessMatmul(ncodebooks=0)


def test_bad_inputs_get_clear_errors():
    rows, weight = low_rank_data(nrows=100, ndims=8, nout=2)
    with pytest.raises(ValueError, match="cannot exceed"):
        MaddnessMatmul(ncodebooks=9).fit(rows, weight)
    with pytest.raises(ValueError, match="at least 16"):
        MaddnessMatmul(ncodebooks=2).fit(rows[:10], weight)
    bad = rows.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"A_train contains 1 NaN/inf value\(s\), first at index \(3, 4\)"):
        MaddnessMatmul(ncodebooks=2).fit(bad, weight)
    bad_weight = weight.clone()
    bad_weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="B contains"):
        MaddnessMatmul(ncodebooks=2).fit(rows, bad_weight)
    with pytest.raises(ValueError, match="B has 7 rows but A has 8 columns"):
        MaddnessMatmul(ncodebooks=2).fit(rows, weight[:7])
    with pytest.raises(ValueError, match="2-D"):
        MaddnessMatmul(ncodebooks=2).fit(rows[0], weight)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        MaddnessMatmul(ncodebooks=2).fit(rows.tolist(), weight)
    amm = MaddnessMatmul(ncodebooks=2).fit(rows, weight)
    with pytest.raises(ValueError, match="A has 7 columns"):
        amm(rows[:, :7])
    read = sorted(set(amm.split_dims_.reshape(-1).tolist()))
    for value in (float("nan"), float("inf")):
        bad = rows.clone()
        bad[3, read[-1]] = value
        with pytest.raises(ValueError, match=rf"A contains NaN/inf in row 3, column\(s\) \[{read[-1]}\]"):
            amm(bad)
        with pytest.raises(ValueError, match="A contains NaN/inf"):
            amm.encode(bad)
    unread = sorted(set(range(8)) - set(read))
    if unread:  # values the encoder never reads cannot change the output
        bad = rows.clone()
        bad[3, unread[0]] = float("nan")
        assert torch.equal(amm(bad), amm(rows))
    with pytest.raises(ValueError, match="codes must lie in"):
        amm.decode(torch.full((2, 2), 16, dtype=torch.uint8))


def test_use_before_fit_is_refused():
    amm = MaddnessMatmul(ncodebooks=2)
    with pytest.raises(NotFittedError, match="not fitted"):
        amm(torch.randn(4, 8))
    amm.fit_encoder(torch.randn(64, 8))
    with pytest.raises(NotFittedError, match="set_weight"):
        amm(torch.randn(4, 8))
    amm.encode(torch.randn(4, 8))  # the encoder alone works


def test_output_aware_hash_splits_on_what_the_weight_reads():
    gen = torch.Generator().manual_seed(0)
    # column 0: large but ignored by the weight; column 1: small but all that matters
    rows = torch.stack([100 * torch.randn(4000, generator=gen), torch.randn(4000, generator=gen)], 1)
    weight = torch.tensor([[0.0], [1.0]])
    errors = {}
    for objective in ("input", "output"):
        amm = MaddnessMatmul(ncodebooks=1, lut_bits=None, ncandidates=2, hash_objective=objective)
        amm.fit(rows[:3000], weight)
        errors[objective] = nmse(amm(rows[3000:]), rows[3000:] @ weight)
        used = amm.split_dims_.flatten().tolist()
        assert used == ([1, 1, 1, 1] if objective == "output" else used)
    assert errors["output"] < 0.02 < errors["input"]
    with pytest.raises(ValueError, match="needs the weight"):
        MaddnessMatmul(ncodebooks=1, hash_objective="output").fit_encoder(rows)
    with pytest.raises(ValueError, match="hash_objective"):
        MaddnessMatmul(hash_objective="both")


def test_scatter_sums_do_not_depend_on_the_thread_count():
    import numba

    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (1500, 7), generator=gen).to(torch.uint8)
    rows = torch.randn(1500, 33, generator=gen)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = prototypes.one_hot_t_rows(codes, rows, 16)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        assert torch.equal(prototypes.one_hot_t_rows(codes, rows, 16), single)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("nrows", [1500, 60])  # C*K = 64: the primal and the dual system
@pytest.mark.parametrize("encoder", ["tree", "pq"])
def test_fit_lut_equals_fit(tmp_path, nrows, encoder):
    """The LUT solved for B directly (layer conversion) is fit's LUT to float rounding."""
    rows, _ = low_rank_data(nrows=nrows, ndims=24)
    weight = torch.randn(24, 5, generator=torch.Generator().manual_seed(4))  # M < D
    options = {"iterations": 3} if encoder == "pq" else {}
    kwargs = {"ncodebooks": 4, "lut_bits": None, "encoder": encoder, "encoder_options": options}
    full = MaddnessMatmul(**kwargs).fit(rows, weight)
    direct = MaddnessMatmul(**kwargs).fit_lut(rows, weight)
    assert torch.equal(full.encode(rows), direct.encode(rows))
    scale = full.lut_.abs().max()
    torch.testing.assert_close(direct.lut_, full.lut_, rtol=0, atol=1e-5 * float(scale))
    with pytest.raises(ValueError, match="fitted with fit_lut"):
        direct.set_weight(weight)
    direct.save(tmp_path / "amm.pt")
    again = MaddnessMatmul.load(tmp_path / "amm.pt")
    assert torch.equal(again(rows), direct(rows))
    with pytest.raises(ValueError, match="fitted with fit_lut"):
        again.set_weight(weight)
    # M >= D or no ridge step: fit itself, bit for bit, and set_weight works
    wide = torch.randn(24, 30, generator=torch.Generator().manual_seed(5))
    assert torch.equal(
        MaddnessMatmul(**kwargs).fit_lut(rows, wide).lut_, MaddnessMatmul(**kwargs).fit(rows, wide).lut_
    )
    plain = MaddnessMatmul(**{**kwargs, "ridge": None})
    assert torch.equal(
        plain.fit_lut(rows, weight).lut_, MaddnessMatmul(**{**kwargs, "ridge": None}).fit(rows, weight).lut_
    )
    plain.set_weight(weight)
