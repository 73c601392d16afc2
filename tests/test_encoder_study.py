"""The encoder study's encoders and LUT fit, against naive loops and analytic cases.

tests/test_encoders.py covers the seam (every entry point takes a registered encoder);
this file checks what each encoder computes, its cost, state and refusals, and the
product-fitted LUT (docs/encoders.md).
"""

from __future__ import annotations

import numba
import pytest
import torch
from torch import nn

from maddnet import MaddnessMatmul
from maddnet.amm import hashing
from maddnet.amm.encoders import (
    EncoderCost,
    GlobalTreeEncoder,
    L1Encoder,
    LinfEncoder,
    PQEncoder,
    TreeEncoder,
    create_encoder,
)
from maddnet.amm.encoders.global_tree import best_split_gains
from maddnet.amm.encoders.nearest import nearest_cost
from maddnet.amm.lut import quantized_lut_sum
from maddnet.amm.lut_fit import product_lut
from maddnet.amm.prototypes import ridge_prototypes
from maddnet.nn import LayerSpec, MaddConfig, MaddLinear, _nearest_kernel, convert
from maddnet.nn.encoders import L1Module, LinfModule, PQModule, _nearest_kernel_applies


def clustered_rows(nrows: int, ndims: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, ndims, generator=gen) * 3
    return centres[torch.randint(6, (nrows,), generator=gen)] + torch.randn(nrows, ndims, generator=gen)


# ---------------------------------------------------------------------- the product-fitted LUT
def test_product_lut_is_the_ridge_lstsq_solution_and_the_prototype_lut():
    gen = torch.Generator().manual_seed(1)
    rows, weight = torch.randn(300, 6, generator=gen), torch.randn(6, 3, generator=gen)
    codes = torch.randint(4, (300, 2), generator=gen)
    initial = torch.randn(2, 4, 6, generator=gen)
    ridge = 0.7
    table = product_lut(codes, rows @ weight, 4, ridge, prior=initial @ weight)
    # direct least squares of the stacked system [G; sqrt(l) I] T = [A B; sqrt(l) P0 B]
    onehot = torch.cat([nn.functional.one_hot(codes[:, c], 4) for c in range(2)], 1).double()
    lhs = torch.cat([onehot, ridge**0.5 * torch.eye(8, dtype=torch.float64)])
    rhs = torch.cat([(rows @ weight).double(), ridge**0.5 * (initial @ weight).reshape(8, 3).double()])
    expected = torch.linalg.lstsq(lhs, rhs).solution.reshape(2, 4, 3).float()
    torch.testing.assert_close(table, expected, rtol=1e-5, atol=1e-5)
    # the MADDness LUT (ridge prototypes times B) is the same table: the identity of lut_fit.py
    prototypes = ridge_prototypes(rows, codes, initial, ridge)
    torch.testing.assert_close(prototypes @ weight, table, rtol=1e-4, atol=1e-5)


def test_product_lut_refuses_bad_input():
    codes = torch.zeros(10, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="ridge must be > 0"):
        product_lut(codes, torch.zeros(10, 3), 4, 0.0)
    with pytest.raises(ValueError, match="targets must be"):
        product_lut(codes, torch.zeros(9, 3), 4, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        product_lut(codes, torch.full((10, 3), float("nan")), 4, 1.0)
    with pytest.raises(ValueError, match="prior must be"):
        product_lut(codes, torch.zeros(10, 3), 4, 1.0, prior=torch.zeros(2, 4, 2))


# ---------------------------------------------------------------------- nearest-prototype encoders
@pytest.mark.parametrize(
    "cls, norm", [(PQEncoder, lambda d: d.square().sum()), (L1Encoder, lambda d: d.abs().sum()),
                  (LinfEncoder, lambda d: d.abs().max())],
)  # fmt: skip
def test_nearest_encoders_match_a_naive_loop(cls, norm):
    rows = clustered_rows(400, 7)  # D=7, C=2: blocks of 4 and 3 columns (padding exercised)
    encoder = cls(ncodebooks=2, nprototypes=4, iterations=3).fit(rows)
    codes = encoder.encode(rows[:40])
    blocks = [(0, 4), (4, 7)]
    for n in range(40):
        for c, (start, stop) in enumerate(blocks):
            d = [
                float(norm(rows[n, start:stop] - encoder.centroids_[c, k, : stop - start])) for k in range(4)
            ]
            assert d[int(codes[n, c])] == pytest.approx(min(d), rel=1e-5, abs=1e-5)
    assert torch.equal(encoder.read_columns, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 6]]))


def test_nearest_costs_state_what_one_row_needs():
    # D=7, C=2, K=4: widths 4 and 3 -> K*w subtractions 28, K*(w-1) accumulations 20
    assert nearest_cost("l2", 7, 2, 4) == EncoderCost(compares=6, adds=48, multiplies=28, reads=7)
    assert nearest_cost("l1", 7, 2, 4) == EncoderCost(compares=6, adds=48, multiplies=0, reads=7)
    assert nearest_cost("linf", 7, 2, 4) == EncoderCost(compares=26, adds=28, multiplies=0, reads=7)
    encoder = L1Encoder(ncodebooks=2, nprototypes=4, iterations=1).fit(clustered_rows(200, 7))
    assert encoder.cost() == nearest_cost("l1", 7, 2, 4) == L1Module(2, 4, ndims=7).cost()


def test_l1_centres_are_medians_and_pq_beats_the_tree_on_clusters():
    rows = clustered_rows(1200, 8)
    weight = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    errors = {}
    for name in ("tree", "pq", "pq-l1", "pq-linf"):
        amm = MaddnessMatmul(ncodebooks=2, nprototypes=8, lut_bits=None, encoder=name).fit(
            rows[:1000], weight
        )
        test = rows[1000:]
        errors[name] = float(((amm(test) - test @ weight) ** 2).sum() / (test @ weight).square().sum())
    assert errors["pq"] < errors["tree"] and errors["pq-l1"] < errors["tree"]
    encoder = L1Encoder(ncodebooks=1, nprototypes=4, iterations=5).fit(rows)
    codes = encoder.encode(rows).long()[:, 0]
    for k in range(4):
        members = rows[codes == k]
        if len(members):  # after the last Lloyd step the centroid is its members' median
            assert torch.allclose(encoder.centroids_[0, k], members.median(0).values, atol=0.5)


@pytest.mark.parametrize("name", ["tree", "pq", "pq-l1", "pq-linf", "tree-global"])
def test_encoders_refuse_what_they_cannot_learn_from(name):
    with pytest.raises(ValueError, match="needs at least 16"):
        create_encoder(name, ncodebooks=2).fit(torch.randn(10, 8), torch.randn(8, 2))
    with pytest.raises(ValueError, match="NaN/inf"):
        rows = torch.randn(100, 8)
        rows[3, 2] = float("nan")
        create_encoder(name, ncodebooks=2).fit(rows, torch.randn(8, 2))
    with pytest.raises(ValueError, match=f"^{name} encoder: every training row is the same"):
        create_encoder(name, ncodebooks=2).fit(torch.ones(100, 8), torch.randn(8, 2))
    with pytest.raises(ValueError, match="power of two"):
        create_encoder(name, ncodebooks=2, nprototypes=12)
    rows = torch.randn(100, 8)
    with pytest.raises(
        ValueError, match=rf"^{name} encoder: the training rows must be 2-D \(N, D\), got shape \(100,\)"
    ):
        create_encoder(name, ncodebooks=2).fit(rows[:, 0], torch.randn(8, 2))
    with pytest.raises(ValueError, match=r"must be 2-D \(N, D\), got shape \(100, 2, 4\)"):
        create_encoder(name, ncodebooks=2).fit(rows.reshape(100, 2, 4), torch.randn(8, 2))
    with pytest.raises(ValueError, match=r"the weight must be 2-D \(D, M\), got shape \(8,\)"):
        create_encoder(name, ncodebooks=2).fit(rows, torch.randn(8))
    with pytest.raises(ValueError, match="the weight has 7 rows but the training rows have D=8 columns"):
        create_encoder(name, ncodebooks=2).fit(rows, torch.randn(7, 2))
    with pytest.raises(TypeError, match="the training rows must be a torch.Tensor, got ndarray"):
        create_encoder(name, ncodebooks=2).fit(rows.numpy(), torch.randn(8, 2))


@pytest.mark.parametrize("name", ["tree", "pq-l1"])
def test_a_layer_with_constant_input_is_refused_by_name_and_left_dense(name):
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():  # the first layer emits the same row for every input
        model[0].weight.zero_()
        model[0].bias.fill_(0.5)
    config = MaddConfig(layers=["2"], ncodebooks=2, spec=LayerSpec(encoder=name))
    with pytest.raises(ValueError, match=f"layer '2': {name} encoder: every training row is the same"):
        convert(model, [torch.randn(512, 6)], config)
    assert type(model[2]) is nn.Linear


@pytest.mark.parametrize("name", ["tree", "pq", "pq-l1", "pq-linf", "tree-global"])
def test_every_encoder_refuses_non_finite_rows_or_weight(name):
    rows, weight = torch.randn(100, 8), torch.randn(8, 2)
    rows[5, 1] = float("inf")
    options = {"hash_objective": "output"} if name == "tree" else {}
    with pytest.raises(ValueError, match=f"{name} encoder: the training rows hold 1 NaN/inf"):
        create_encoder(name, ncodebooks=2, **options).fit(rows, weight)
    rows[5, 1] = 0.0
    weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{name} encoder: the weight holds 1 NaN/inf"):
        create_encoder(name, ncodebooks=2, **options).fit(rows, weight)


def test_nearest_refuses_a_block_with_fewer_distinct_rows_than_k():
    rows = torch.randn(200, 8)
    rows[:, 4:] = torch.randint(3, (200, 1)).float()  # codebook 1's block: 3 distinct rows
    with pytest.raises(ValueError, match="codebook 1 .* only 3 distinct"):
        PQEncoder(ncodebooks=2, nprototypes=4).fit(rows)


# ---------------------------------------------------------------------- whole-row trees
def test_best_split_gains_match_a_naive_loop():
    gen = torch.Generator().manual_seed(2)
    columns = torch.randint(5, (30, 3), generator=gen).float()  # ties: only distinct values split
    targets = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    targets -= targets.mean(0)
    gains = best_split_gains(columns, targets)
    for j in range(3):
        best = 0.0
        for threshold in columns[:, j].unique()[:-1]:
            left = columns[:, j] <= threshold
            sse = sum(float((part - part.mean(0)).square().sum()) for part in (targets[left], targets[~left]))
            best = max(best, float(targets.square().sum()) - sse)
        assert float(gains[j]) == pytest.approx(best, rel=1e-9)


def test_global_tree_splits_on_the_columns_that_matter_wherever_they_are():
    # y = x6 + x7, each of 16 values; both columns lie in codebook 1's block (4..7), so the
    # MADDness tree of codebook 0 (block 0..3) reads only noise
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(1500, 8, generator=gen) * 0.1
    rows[:, 6:] = torch.randint(16, (1500, 2), generator=gen).float()
    weight = torch.zeros(8, 1)
    weight[6:] = 1.0
    encoder = GlobalTreeEncoder(ncodebooks=2, nprototypes=16).fit(rows, weight)
    assert set(encoder.read_columns.reshape(-1).tolist()) == {6, 7}  # codebook 0 included
    assert torch.equal(
        encoder.encode(rows), hashing.encode_torch(rows, encoder.split_dims_, encoder.thresholds_)
    )
    amm = MaddnessMatmul(ncodebooks=2, lut_bits=None, encoder="tree-global").fit(rows, weight)
    tree = MaddnessMatmul(ncodebooks=2, lut_bits=None).fit(rows, weight)
    error = float(((amm(rows) - rows @ weight) ** 2).mean())
    assert error < 0.8 * float(((tree(rows) - rows @ weight) ** 2).mean())
    assert encoder.cost() == EncoderCost(compares=8, reads=8)  # the tree's hardware cost


def test_global_tree_refinement_and_state_round_trip():
    rows = clustered_rows(500, 12)
    weight = torch.randn(12, 3, generator=torch.Generator().manual_seed(4))
    options = {"refine_sweeps": 1, "ncandidates": 4}
    amm = MaddnessMatmul(ncodebooks=3, lut_bits=None, encoder="tree-global", encoder_options=options)
    amm.fit(rows, weight)
    twin = MaddnessMatmul(**amm.get_config()).load_state_dict(amm.state_dict())
    assert torch.equal(twin(rows), amm(rows))
    with pytest.raises(ValueError, match="refine_sweeps"):
        GlobalTreeEncoder(ncodebooks=2, refine_sweeps=-1)


@pytest.mark.parametrize("nprototypes", [32, 64])
def test_deeper_trees(nprototypes):
    rows = clustered_rows(800, 8)
    tree = TreeEncoder(ncodebooks=2, nprototypes=nprototypes).fit(rows)
    depth = nprototypes.bit_length() - 1
    assert tree.split_dims_.shape == (2, depth) and tree.thresholds_.shape == (2, nprototypes - 1)
    assert torch.equal(tree.encode(rows), hashing.encode_torch(rows, tree.split_dims_, tree.thresholds_))
    assert tree.cost() == EncoderCost(compares=2 * depth, reads=2 * depth)


# ---------------------------------------------------------------------- trainable in MADD layers
@pytest.mark.parametrize("module_cls", [PQModule, L1Module, LinfModule])
def test_soft_argmin_surrogate_is_the_gradient_of_the_soft_lut_sum(module_cls):
    torch.manual_seed(0)
    module = module_cls(2, 4, ndims=5).double()  # blocks of 3 and 2 columns (one padded)
    with torch.no_grad():
        module.centroids.copy_(torch.randn(2, 4, 3))
        module.temperature.fill_(0.8)
    values = torch.randn(6, 2, 3, dtype=torch.float64)
    table, grad_out = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def soft_sum(v, c):
        return (
            torch.einsum("nck,ckm->nm", module.soft_scores(v, c, module.temperature), table) * grad_out
        ).sum()

    v, c = values.clone().requires_grad_(), module.centroids.detach().clone().requires_grad_()
    # finite differences of the surrogate itself (L-infinity: away from ties, as here)
    assert torch.autograd.gradcheck(soft_sum, (v, c))
    want_v, want_c = torch.autograd.grad(soft_sum(v, c), (v, c))
    codes = module.encode_values(values)
    grad_v, (grad_c, grad_t) = module.surrogate_backward(
        values, codes, (module.centroids.detach(), module.temperature), table, grad_out, (True, True, False)
    )
    torch.testing.assert_close(grad_v, want_v)
    torch.testing.assert_close(grad_c, want_c)
    assert grad_t is None and float(grad_v[:, 1, 2].abs().max()) == 0.0  # padding gets nothing


@pytest.mark.parametrize("module_cls", [PQModule, L1Module])
def test_fused_soft_argmin_backward_equals_autograd(module_cls):
    """float32 on CPU takes the numba kernel (no (N, C, K, W) tensors); it must give the
    float64 autograd gradients of the same surrogate to float32 rounding, over several row
    blocks, with a padded block, for each subset of the wanted gradients."""
    torch.manual_seed(1)
    module = module_cls(3, 16, ndims=8)  # blocks of 3, 3 and 2 columns (one padded)
    with torch.no_grad():
        module.centroids.copy_(torch.randn(3, 16, 3))
        module.temperature.copy_(torch.tensor([0.5, 1.0, 2.0]))
    nrows = 2 * _nearest_kernel.BLOCK + 37
    values = torch.randn(nrows, 3, 3)
    table, grad_out = torch.randn(3, 16, 5), torch.randn(nrows, 5)
    values[:5] = module.centroids.detach()[:, 0][None]  # ties: L1's subgradient is 0 there

    def soft_sum(v, c):
        scores = module.double().soft_scores(v, c, module.temperature.double())
        return (torch.einsum("nck,ckm->nm", scores, table.double()) * grad_out.double()).sum()

    v = values.double().requires_grad_()
    c = module.centroids.detach().double().requires_grad_()
    want_v, want_c = torch.autograd.grad(soft_sum(v, c), (v, c))
    module.float()
    assert _nearest_kernel_applies(module.metric, values, module.centroids, grad_out)
    codes = module.encode_values(values)
    for needs in [(True, True, False), (True, False, False), (False, True, False)]:
        grad_v, (grad_c, _) = module.surrogate_backward(
            values, codes, (module.centroids.detach(), module.temperature), table, grad_out, needs
        )
        if needs[0]:
            assert grad_v.dtype == torch.float32
            torch.testing.assert_close(grad_v.double(), want_v, rtol=1e-4, atol=1e-5)
            assert float(grad_v[:, 2, 2].abs().max()) == 0.0  # the padding column
        else:
            assert grad_v is None
        if needs[1]:
            torch.testing.assert_close(grad_c.double(), want_c, rtol=1e-4, atol=1e-4)
        else:
            assert grad_c is None
    # the per-block centroid gradients are summed in block order: any thread count, same bits
    first = module.surrogate_backward(
        values, codes, (module.centroids.detach(), module.temperature), table, grad_out, (True, True, False)
    )
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        again = module.surrogate_backward(
            values,
            codes,
            (module.centroids.detach(), module.temperature),
            table,
            grad_out,
            (True, True, False),
        )
    finally:
        numba.set_num_threads(before)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1][0], again[1][0])


@pytest.mark.parametrize("encoder", ["tree-global", "pq-l1"])
def test_study_encoders_train_in_madd_linear(encoder):
    rows, linear = clustered_rows(500, 12), nn.Linear(12, 3)
    layer = MaddLinear.from_dense(linear, rows, ncodebooks=3, spec=LayerSpec(encoder=encoder, lut_bits=None))
    amm = MaddnessMatmul(ncodebooks=3, lut_bits=None, ncandidates=4, encoder=encoder).fit(
        rows, linear.weight.detach().T
    )
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(rows[:200]), amm(rows[:200]) + linear.bias)
    assert torch.equal(layer.encoder.read_columns.cpu(), amm.encoder_.read_columns)
    layer.train()
    target = linear(rows[:128]).detach()
    loss = nn.functional.mse_loss(layer(rows[:128]), target)
    loss.backward()
    trained = layer.encoder.thresholds if encoder == "tree-global" else layer.encoder.centroids
    assert trained.grad is not None and float(trained.grad.abs().sum()) > 0


def test_global_tree_in_a_converted_conv_reads_its_global_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    batches = [(torch.randn(8, 2, 6, 6), None) for _ in range(3)]
    spec = LayerSpec(encoder="tree-global")
    convert(model, batches, MaddConfig(layers=["0"], ncodebooks=2, min_rows=64, spec=spec))
    x = torch.randn(4, 2, 6, 6)
    rows = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    codes = model[0].encoder.encode_values(rows[:, model[0].encoder.read_columns])
    with torch.no_grad():
        out = model[0].eval()(x)  # the tree's fused conv kernel, on columns from the whole patch
    reference = quantized_lut_sum(codes, model[0].quantized_lut()) + model[0].bias
    assert torch.equal(out, reference.reshape(4, 6, 6, 4).permute(0, 3, 1, 2))


def test_unknown_encoder_option_is_named():
    from maddnet.amm import MaddnessMatmul

    message = r"encoder 'pq-l1' has no setting\(s\) \['bogus'\]; it takes .*iterations"
    with pytest.raises(ValueError, match=message):
        MaddnessMatmul(4, encoder="pq-l1", encoder_options={"bogus": 1}).fit(
            torch.randn(200, 32), torch.randn(32, 4)
        )


def test_encoder_benchmark_resumes(tmp_path, monkeypatch):
    """benchmarks/encoders.py --resume: rows already written (same row counts) are kept and
    not fitted again; a row lost to an interruption is fitted; other row counts redo all."""
    import argparse
    import importlib.util
    import json
    from pathlib import Path

    from maddnet.analysis.amm_sweep import MatmulTask

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "encoders.py"
    spec = importlib.util.spec_from_file_location("bench_encoders", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gen = torch.Generator().manual_seed(0)
    task = MatmulTask("toy", torch.randn(900, 32, generator=gen), torch.randn(100, 32, generator=gen),
                      torch.randn(32, 6, generator=gen))  # fmt: skip
    monkeypatch.setattr(bench, "build_tasks", lambda names: [task])
    fitted = []
    real_fit = bench.fit_variant

    def counted(name, ncodebooks, train, weight):
        fitted.append((name, ncodebooks))
        return real_fit(name, ncodebooks, train, weight)

    monkeypatch.setattr(bench, "fit_variant", counted)
    monkeypatch.setattr(bench, "plot", lambda results, path: None)
    variants = ["tree (MADDness)", "pq-l1"]

    def args(**kw):
        values = dict(
            out=str(tmp_path), tasks=["toy"], ncodebooks=[4], variants=variants, ntrain=600, nval=200
        )
        return argparse.Namespace(**{**values, "ntest": 100, "append": False, "resume": False, **kw})

    first = bench.run(args())
    assert fitted == [("tree (MADDness)", 4), ("pq-l1", 4)]
    rows = json.loads((tmp_path / "encoders.json").read_text())
    (tmp_path / "encoders.json").write_text(json.dumps(rows[:1]))  # pq-l1's row never written
    fitted.clear()
    resumed = bench.run(args(resume=True))
    assert fitted == [("pq-l1", 4)]
    assert resumed[0] == first[0] and [r["variant"] for r in resumed] == variants
    fitted.clear()
    bench.run(args(resume=True, ntrain=500))  # other training rows: nothing reusable
    assert fitted == [("tree (MADDness)", 4), ("pq-l1", 4)]


@pytest.mark.parametrize("name", ["tree", "pq", "pq-l1", "pq-linf", "tree-global"])
def test_every_encoder_refuses_rows_it_cannot_encode(name):
    rows, weight = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), torch.randn(8, 2)
    encoder = create_encoder(name, ncodebooks=2).fit(rows, weight)
    with pytest.raises(ValueError, match=f"^{name} encoder: rows have 9 columns, it was fit with D=8"):
        encoder.encode(torch.randn(4, 9))
    with pytest.raises(ValueError, match=rf"^{name} encoder: rows must be a 2-D \(N, D\) tensor"):
        encoder.encode(rows[0])
    test = torch.randn(4, 8)
    test[2, encoder.read_columns[1, 0]] = float("nan")
    with pytest.raises(hashing.NonFiniteInputError, match="row 2") as error:
        encoder.encode(test)
    assert error.value.row == 2 and int(encoder.read_columns[1, 0]) in error.value.columns
    # the estimator on top says the same instead of returning a number for the NaN row
    amm = MaddnessMatmul(ncodebooks=2, encoder=name).fit(rows, weight)
    with pytest.raises(hashing.NonFiniteInputError, match="row 2"):
        amm(test)


@pytest.mark.parametrize("name", ["tree", "pq-l1"])
def test_encoders_judge_rows_in_float32_and_refit_clean(name):
    rows = torch.randn(200, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    encoder = create_encoder(name, ncodebooks=2).fit(rows, torch.randn(8, 2))
    # a float64 value beyond float32's range is inf where the encoder computes
    test = rows[:3].clone()
    test[1, encoder.read_columns[0, 0]] = 1e39
    with pytest.raises(hashing.NonFiniteInputError, match="row 1"):
        encoder.encode(test)
    # rows that differ only below float32's resolution are all the same to the encoder
    same = torch.ones(100, 8, dtype=torch.float64) + torch.rand(100, 1, dtype=torch.float64) * 1e-12
    with pytest.raises(ValueError, match="every training row is the same"):
        create_encoder(name, ncodebooks=2).fit(same, torch.randn(8, 2))
    # a refit on rows of another D starts from no state; a refused one leaves the last fit
    encoder.fit(torch.randn(200, 12), torch.randn(12, 2))
    assert encoder.input_dim == 12 and encoder.encode(torch.randn(5, 12)).shape == (5, 2)
    with pytest.raises(ValueError, match="NaN/inf"):
        encoder.fit(torch.full((200, 4), float("nan")), torch.randn(4, 2))
    assert encoder.input_dim == 12 and encoder.encode(torch.randn(5, 12)).shape == (5, 2)


def test_check_finite_reads_names_the_first_bad_row_and_its_read_columns():
    rows = torch.zeros(5, 6)
    rows[3, 4], rows[3, 1], rows[4, 0] = float("inf"), float("nan"), float("nan")
    hashing.check_finite_reads(rows, torch.tensor([[2, 5]]))  # reads no bad value
    with pytest.raises(hashing.NonFiniteInputError, match=r"row 3, column\(s\) \[4\]") as error:
        hashing.check_finite_reads(rows, torch.tensor([[4, 2], [2, 5]]))
    assert (error.value.row, error.value.columns) == (3, [4])
