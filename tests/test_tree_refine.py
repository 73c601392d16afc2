"""Refining hash trees (maddnet.amm.tree_refine) against brute force and its invariants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maddnet import MaddnessMatmul
from maddnet.amm import hashing
from maddnet.amm.encoders import TreeEncoder
from maddnet.amm.prototypes import block_leaf_means, ridge_lut
from maddnet.amm.tree_refine import best_level_splits, descend, level_cut_table, refine_trees
from maddnet.nn import LayerSpec, MaddConfig, MaddLinear, convert


def brute_force_level(column, nodes, delta, nnodes):
    """Every threshold per node that leaves rows on both sides (x > v splits after v); a node
    whose rows share one value sends them all left."""
    total, chosen = 0.0, []
    for n in range(nnodes):
        mask = nodes == n
        values = column[mask].unique()
        if not mask.any():
            chosen.append(None)
            continue
        candidates = values[:-1] if len(values) > 1 else values
        best = min((float(delta[mask][column[mask] > v].sum()), v) for v in candidates.tolist())
        total += best[0]
        chosen.append(best)
    return total, chosen


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("seed", range(6))
def test_best_level_splits_match_brute_force(seed, backend):
    gen = torch.Generator().manual_seed(seed)
    nnodes = [1, 2, 4, 8, 2, 4][seed]
    columns = torch.randint(0, 7, (60, 3), generator=gen).float() / 2  # ties on purpose
    columns[:, 2] = 1.0  # a constant column: no interior cut anywhere
    nodes = torch.randint(0, nnodes, (60,), generator=gen)
    if seed == 4:
        nodes[nodes == 1] = 0  # an empty node
    delta = torch.randn(60, generator=gen, dtype=torch.float64)
    totals, thresholds = best_level_splits(columns, nodes, delta, nnodes, backend=backend)
    for j in range(3):
        column = columns[:, j]
        expected, per_node = brute_force_level(column, nodes, delta, nnodes)
        assert float(totals[j]) == pytest.approx(expected, abs=1e-12)
        for n in range(nnodes):
            mask = nodes == n
            got = float(delta[mask][column[mask] > thresholds[j, n]].sum())
            if per_node[n] is not None:
                assert got == pytest.approx(per_node[n][0], abs=1e-12)
                # both children keep rows unless every row has the same value
                goes_left = column[mask] <= thresholds[j, n]
                assert bool(goes_left.any())
                assert bool((~goes_left).any()) or len(column[mask].unique()) == 1


def test_level_cut_backends_agree():
    gen = torch.Generator().manual_seed(9)
    columns = torch.randn(500, 5, generator=gen)
    nodes = torch.randint(0, 8, (500,), generator=gen)
    delta = torch.randn(500, generator=gen, dtype=torch.float64)
    orders = torch.argsort(columns, dim=0).T.contiguous()
    kernel = level_cut_table(columns, orders, nodes, delta, 8, "numba")
    tensors = level_cut_table(columns, orders, nodes, delta, 8, "torch")
    torch.testing.assert_close(kernel[0], tensors[0], rtol=0, atol=1e-12)
    for a, b in zip(kernel[1:], tensors[1:], strict=True):
        assert torch.equal(a, b)


def test_best_level_splits_keep_the_current_split_when_nothing_is_better():
    column = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    nodes = torch.zeros(4, dtype=torch.int64)
    delta = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)  # best: 2, 3 go right
    totals, thresholds = best_level_splits(column, nodes, delta, 1, (0, torch.tensor([1.25])))
    assert totals.tolist() == [-2.0] and thresholds.tolist() == [[1.25]]  # equal: current stays
    totals, thresholds = best_level_splits(column, nodes, delta, 1, (0, torch.tensor([2.5])))
    assert totals.tolist() == [-2.0] and thresholds.tolist() == [[1.5]]  # the best cut's midpoint
    # a midpoint that rounds onto the upper float32 value falls back to the lower one
    lower = torch.tensor(1.0)
    upper = torch.nextafter(lower, torch.tensor(2.0))
    _, thresholds = best_level_splits(
        torch.stack([lower, upper])[:, None],
        torch.zeros(2, dtype=torch.int64),
        torch.tensor([1.0, -1.0]).double(),
        1,
    )
    assert float(thresholds[0, 0]) == float(lower)


def test_descend_is_the_encoders_routing():
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(200, 6, generator=gen)
    tree = TreeEncoder(ncodebooks=2).fit(rows)
    for c in range(2):
        leaves = descend(
            rows[:, tree.split_dims_[c]], tree.thresholds_[c], 0, torch.zeros(200, dtype=torch.int64)
        )
        assert torch.equal(leaves, tree.encode(rows)[:, c].long())


def fixed_table_loss(rows, split_dims, thresholds, targets, tables):
    codes = hashing.encode(rows, split_dims, thresholds).long()
    prediction = sum(tables[c][codes[:, c]] for c in range(codes.shape[1]))
    return float(((targets - prediction) ** 2).sum())


def test_refine_trees_lowers_the_loss_of_the_table_it_was_given():
    gen = torch.Generator().manual_seed(3)
    rows, weight = torch.randn(400, 8, generator=gen), torch.randn(8, 3, generator=gen)
    tree = TreeEncoder(ncodebooks=2).fit(rows)
    bounds = hashing.subspace_bounds(8, 2)
    targets = rows.double() @ weight.double()
    initial = tree.prototypes_
    seen = []

    def solve_tables(codes):
        table = ridge_lut(rows, codes, block_leaf_means(rows, codes, bounds, initial), 1.0, weight).double()
        seen.append(table)
        return table

    candidates = [torch.arange(a, b) for a, b in bounds]
    first_table = solve_tables(tree.encode(rows).long())
    before = fixed_table_loss(rows, tree.split_dims_, tree.thresholds_, targets, first_table)
    split_dims, thresholds, codes = refine_trees(
        rows, tree.split_dims_, tree.thresholds_, targets, solve_tables, candidates, 1
    )
    after = fixed_table_loss(rows, split_dims, thresholds, targets, seen[-1])  # the sweep's table
    assert after < before * 0.99
    assert torch.equal(codes, hashing.encode(rows, split_dims, thresholds).long())
    for c, (a, b) in enumerate(bounds):
        assert bool(((split_dims[c] >= a) & (split_dims[c] < b)).all())


def naive_refine(rows, split_dims, thresholds, targets, solve_tables, candidates, sweeps):
    """The coordinate descent of tree_refine's docstring, written plainly: each codebook's
    residual r formed explicitly, its loss ||r - T_k||^2 per row and code."""
    split_dims, thresholds = split_dims.clone(), thresholds.clone()
    ncodebooks, depth = split_dims.shape
    root = torch.zeros(rows.shape[0], dtype=torch.int64)
    index = torch.arange(rows.shape[0])
    codes = hashing.encode(rows, split_dims, thresholds).long()
    for _ in range(sweeps):
        tables = solve_tables(codes)
        for c in range(ncodebooks):
            others = sum(tables[o][codes[:, o]] for o in range(ncodebooks) if o != c)
            residual = targets - others
            loss = ((residual[:, None, :] - tables[c][None]) ** 2).sum(2)  # (N, K)
            values = rows[:, split_dims[c]]
            columns = torch.unique(torch.cat([candidates[c], split_dims[c]]))
            for t in range(depth):
                nodes = descend(values[:, :t], thresholds[c], 0, root) if t else root
                left = descend(values, thresholds[c], t + 1, 2 * nodes)
                right = descend(values, thresholds[c], t + 1, 2 * nodes + 1)
                level = slice((1 << t) - 1, (1 << (t + 1)) - 1)
                current = int((columns == split_dims[c, t]).nonzero()[0, 0])
                totals, level_thresholds = best_level_splits(
                    rows[:, columns],
                    nodes,
                    loss[index, right] - loss[index, left],
                    1 << t,
                    (current, thresholds[c, level]),
                )
                chosen = int(totals.argmin())
                if totals[current] <= totals[chosen]:
                    chosen = current
                split_dims[c, t] = columns[chosen]
                thresholds[c, level] = level_thresholds[chosen]
                values[:, t] = rows[:, columns[chosen]]
            codes[:, c] = descend(values, thresholds[c], 0, root)
    return split_dims, thresholds, codes


# one codebook per chunk; chunks of 2; chunks of 3 (the last one partial); one chunk
@pytest.mark.parametrize("noutputs", [3, 40, 50, 100])
def test_refine_trees_equals_the_plain_coordinate_descent(noutputs):
    gen = torch.Generator().manual_seed(noutputs)
    rows = torch.relu(torch.randn(500, 24, generator=gen) + torch.randn(500, 1, generator=gen))
    weight = torch.randn(24, noutputs, generator=gen)
    # trees of other rows: a poor start, so that many codes move and every update is used
    start = TreeEncoder(ncodebooks=4).fit(torch.randn(500, 24, generator=gen) * 2)
    bounds = hashing.subspace_bounds(24, 4)

    def solve_tables(codes):
        prior = block_leaf_means(rows, codes, bounds, start.prototypes_)
        return ridge_lut(rows, codes, prior, 1.0, weight).double()

    args = (rows, start.split_dims_, start.thresholds_, rows.double() @ weight.double(), solve_tables)
    candidates = [torch.arange(a, b) for a, b in bounds]
    fast = refine_trees(*args, candidates, 2)
    plain = naive_refine(*args, candidates, 2)
    assert torch.equal(fast[0], plain[0])  # split columns
    assert torch.equal(fast[2], plain[2])  # codes of every training row
    # thresholds may differ only within a gap between training values (where the two keep
    # the current threshold or take an equal-cost cut, rounding decides): same partition
    assert torch.equal(hashing.encode(rows, fast[0], fast[1]).long(), plain[2])


def test_refine_trees_backends_agree():
    gen = torch.Generator().manual_seed(8)
    rows, weight = torch.randn(300, 8, generator=gen), torch.randn(8, 2, generator=gen)
    tree = TreeEncoder(ncodebooks=2).fit(rows)
    bounds = hashing.subspace_bounds(8, 2)

    def solve_tables(codes):
        return ridge_lut(
            rows, codes, block_leaf_means(rows, codes, bounds, tree.prototypes_), 1.0, weight
        ).double()

    targets = rows.double() @ weight.double()
    args = (rows, tree.split_dims_, tree.thresholds_, targets, solve_tables)
    candidates = [torch.arange(a, b) for a, b in bounds]
    table = solve_tables(tree.encode(rows).long())  # one sweep: both use this table
    kernel = refine_trees(*args, candidates, 1, backend="numba")
    tensors = refine_trees(*args, candidates, 1, backend="torch")
    # the two sum the same losses in different orders: they may part only where two cuts
    # tie to rounding (e.g. rows whose two candidate leaves have equal table rows)
    kernel_loss = fixed_table_loss(rows, *kernel[:2], targets, table)
    assert kernel_loss == pytest.approx(fixed_table_loss(rows, *tensors[:2], targets, table), rel=1e-9)
    assert torch.equal(kernel[0], tensors[0])
    assert float((kernel[2] == tensors[2]).float().mean()) > 0.97


def test_refine_trees_is_exact_on_one_split_that_greed_misses():
    """One codebook, K = 2: the best threshold for the product is found exactly, even where
    the input objective's split is elsewhere."""
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 11.0]).repeat_interleave(5)[:, None]
    y = torch.tensor([0.0, 0.0, 0.0, 5.0, 5.0, 5.0]).repeat_interleave(5).double()[:, None]
    split_dims = torch.zeros(1, 1, dtype=torch.int64)
    thresholds = torch.tensor([[6.5]])  # the input's best split (0..3 | 10, 11)

    def tables(codes):  # the mean target of each leaf
        means = [
            y[codes[:, 0] == k].mean(0) if (codes[:, 0] == k).any() else y.new_zeros(1) for k in range(2)
        ]
        return torch.stack(means)[None]

    _, refined, codes = refine_trees(x, split_dims, thresholds, y, tables, [torch.tensor([0])], 2)
    assert float(refined[0, 0]) == 2.5
    assert torch.equal(codes[:, 0], (x[:, 0] > 2.5).long())


@pytest.mark.parametrize("objective", ["input", "output"])
def test_tree_refine_sweeps_in_maddness(objective):
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(600, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    weight = torch.randn(16, 4, generator=gen)
    plain = MaddnessMatmul(ncodebooks=4, lut_bits=None, hash_objective=objective).fit(rows, weight)
    refined = MaddnessMatmul(
        ncodebooks=4, lut_bits=None, hash_objective=objective, encoder_options={"refine_sweeps": 2}
    ).fit(rows, weight)
    exact = rows @ weight

    def error(amm):  # what the refinement minimises: the product's or the rows' training error
        if objective == "output":
            return float(((amm(rows) - exact) ** 2).sum())
        codes = amm.encoder_.encode(rows).long()
        rebuilt = sum(amm.encoder_.prototypes_[c][codes[:, c]] for c in range(4))
        return float(((rows - rebuilt) ** 2).sum())

    assert error(refined) < error(plain)
    assert refined.encoder_.get_config()["refine_sweeps"] == 2
    twin = MaddnessMatmul(**refined.get_config()).load_state_dict(refined.state_dict())
    assert torch.equal(twin(rows), refined(rows))
    assert refined.encoder_.cost() == plain.encoder_.cost()


def test_refine_keeps_a_channel_budget():
    gen = torch.Generator().manual_seed(6)
    rows = torch.randn(500, 12, generator=gen)
    weight = torch.randn(12, 3, generator=gen)
    weight[6:] *= 0.01  # channels 2 and 3 (3 columns each) hardly matter
    options = {"channel_budget": 2, "channel_size": 3}
    plain = TreeEncoder(ncodebooks=2, **options).fit(rows, weight)
    refined = TreeEncoder(ncodebooks=2, refine_sweeps=1, **options).fit(rows, weight)
    allowed = set(plain.read_columns.unique().tolist()) | {0, 1, 2, 3, 4, 5}
    assert set(refined.read_columns.unique().tolist()) <= allowed


def test_refine_in_a_converted_layer():
    torch.manual_seed(0)
    rows, linear = torch.randn(500, 12), nn.Linear(12, 3)
    spec = LayerSpec(hash_objective="output", refine_sweeps=1, lut_bits=None)
    layer = MaddLinear.from_dense(linear, rows, ncodebooks=3, spec=spec)
    amm = MaddnessMatmul(
        ncodebooks=3, lut_bits=None, hash_objective="output", encoder_options={"refine_sweeps": 1}
    ).fit_lut(rows, linear.weight.detach().T)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(rows[:100]), amm(rows[:100]) + linear.bias)
    model = nn.Sequential(nn.Linear(12, 8))
    convert(model, [(rows[:200], None)], MaddConfig(layers=["0"], ncodebooks=3, min_rows=64, spec=spec))
    assert model[0].encoder is not None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_refine_sweeps_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="refine_sweeps"):
        TreeEncoder(ncodebooks=2, refine_sweeps=bad)


@pytest.mark.parametrize("ridge", [None, 1.0])
def test_refine_takes_float64_rows_and_weight(ridge):
    gen = torch.Generator().manual_seed(10)
    rows, weight = (
        torch.randn(300, 8, generator=gen, dtype=torch.float64),
        torch.randn(8, 2, generator=gen, dtype=torch.float64),
    )
    options = {"ncodebooks": 2, "hash_objective": "output", "ridge": ridge}
    refined = TreeEncoder(refine_sweeps=1, **options).fit(rows, weight)
    plain = TreeEncoder(**options).fit(rows, weight)
    assert refined.thresholds_.dtype == torch.float32

    def error(tree):  # the product's training error with the tree's prototypes
        codes = tree.encode(rows).long()
        approx = sum(tree.prototypes_[c][codes[:, c]] for c in range(2)).double() @ weight
        return float(((approx - rows @ weight) ** 2).sum())

    assert error(refined) < error(plain)


# ---------------------------------------------------------------------- the layer default
def test_layer_default_is_the_output_objective_with_one_refine_sweep(layer_amm):
    spec = LayerSpec()
    assert (spec.hash_objective, spec.refine_sweeps, spec.ncandidates) == ("output", 1, 4)
    torch.manual_seed(2)
    rows, linear = torch.randn(400, 12), nn.Linear(12, 3)
    layer = MaddLinear.from_dense(linear, rows, ncodebooks=3, lut_bits=None).eval()
    amm = layer_amm(3, lut_bits=None).fit_lut(rows, linear.weight.detach().T)
    assert torch.equal(layer.split_dims, amm.split_dims_)
    with torch.no_grad():
        torch.testing.assert_close(layer(rows[:50]), amm(rows[:50]) + linear.bias, rtol=0, atol=1e-5)
    # MADDness's own trees are one setting away, and differ here
    plain = MaddLinear.from_dense(
        linear, rows, ncodebooks=3, lut_bits=None, hash_objective="input", refine_sweeps=0
    )
    maddness = layer_amm(3, maddness=True, lut_bits=None).fit_lut(rows, linear.weight.detach().T)
    assert torch.equal(plain.split_dims, maddness.split_dims_)
    assert not torch.equal(plain.thresholds, layer.thresholds)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_layer_spec_refuses_bad_refine_sweeps(bad):
    with pytest.raises(ValueError, match="LayerSpec.refine_sweeps"):
        LayerSpec(refine_sweeps=bad)


def test_the_trees_refine_sweeps_is_a_field_not_an_encoder_option():
    with pytest.raises(ValueError, match="refine_sweeps of encoder 'tree' is set by the LayerSpec field"):
        LayerSpec(encoder_options={"refine_sweeps": 1})
    # so is every other argument a field sets (it used to fail later, at learning, as a TypeError)
    with pytest.raises(ValueError, match="hash_objective, ncandidates of encoder 'tree' are set by"):
        LayerSpec(encoder_options={"hash_objective": "input", "ncandidates": 6})
    with pytest.raises(ValueError, match="ridge of encoder 'pq' is set by the LayerSpec field"):
        LayerSpec(encoder="pq", encoder_options={"ridge": 2.0})
    # tree-global's backfitting sweeps stay its own option
    assert LayerSpec(encoder="tree-global", encoder_options={"refine_sweeps": 1}).refine_sweeps == 1


def test_specs_saved_before_the_default_changed_read_as_maddness():
    """A saved spec names every field it had: one lacking refine_sweeps was saved when the
    default was MADDness's trees, and means them (a config file's missing field does not)."""
    old_tree = {k: v for k, v in LayerSpec(hash_objective="input").to_dict().items() if k != "refine_sweeps"}
    assert LayerSpec.from_saved(old_tree) == LayerSpec(hash_objective="input", refine_sweeps=0)
    assert LayerSpec.from_dict(old_tree) == LayerSpec(hash_objective="input", refine_sweeps=1)
    # runs made with the refinement as an encoder option, saved or as a config file
    refined = {**old_tree, "hash_objective": "output", "encoder_options": {"refine_sweeps": 1}}
    assert LayerSpec.from_saved(refined) == LayerSpec(hash_objective="output", refine_sweeps=1)
    assert LayerSpec.from_dict(refined) == LayerSpec(hash_objective="output", refine_sweeps=1)
    with pytest.raises(ValueError, match="both as a field and as an encoder option"):
        LayerSpec.from_dict({**refined, "refine_sweeps": 1})
    # other encoders held the tree fields at their defaults then: read as not given
    old_pq = {**old_tree, "encoder": "pq-l1"}
    assert LayerSpec.from_saved(old_pq) == LayerSpec.from_dict(old_pq) == LayerSpec(encoder="pq-l1")
    with pytest.raises(ValueError, match="configure the tree encoder"):
        LayerSpec.from_dict({**old_pq, "refine_sweeps": 2})  # never a default: refused
    # tree-global has options of these names: a file's top-level "input" is refused, not
    # silently read as its default "output"; a saved spec of then is read as it was meant
    old_global = {**old_tree, "encoder": "tree-global", "encoder_options": {"refine_sweeps": 1}}
    with pytest.raises(ValueError, match="configure the tree encoder"):
        LayerSpec.from_dict(old_global)
    assert LayerSpec.from_saved(old_global) == LayerSpec(
        encoder="tree-global", encoder_options={"refine_sweeps": 1}
    )
    # today's saved specs round-trip unchanged
    for spec in (
        LayerSpec(),
        LayerSpec(refine_sweeps=0),
        LayerSpec(encoder="pq"),
        LayerSpec(hash_objective="input"),
    ):
        assert LayerSpec.from_saved(spec.to_dict()) == spec


def test_a_layer_saved_before_the_default_changed_keeps_its_trees(tmp_path):
    torch.manual_seed(3)
    rows, linear = torch.randn(300, 8), nn.Linear(8, 2)
    layer = MaddLinear.from_dense(linear, rows, ncodebooks=2, hash_objective="input", refine_sweeps=0)
    config = layer.get_config()
    del config["spec"]["refine_sweeps"]  # as written before the field existed
    twin = MaddLinear.from_config(config)
    assert twin.spec == layer.spec
    twin.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(twin.eval()(rows), layer.eval()(rows))


def test_an_analysis_folder_of_maddness_trees_still_resumes(tmp_path):
    from maddnet.analysis.cells import CellLog

    spec = LayerSpec(hash_objective="input", refine_sweeps=0)
    old = {k: v for k, v in spec.to_dict().items() if k != "refine_sweeps"}
    CellLog(tmp_path, {"model": "m", "spec": old}).append(0, {"layer": "a", "C": 2})
    assert list(CellLog(tmp_path, {"model": "m", "spec": spec.to_dict()}).load()) == [("a", 2)]
    with pytest.raises(ValueError, match="--hash-objective input --refine-sweeps 0 resumes it"):
        CellLog(tmp_path, {"model": "m", "spec": LayerSpec().to_dict()}).load()
    with pytest.raises(ValueError, match=r"differing: spec\); use another --out") as error:
        CellLog(tmp_path, {"model": "m", "spec": LayerSpec(lut_bits=4).to_dict()}).load()
    assert "resumes it" not in str(error.value)  # the hint only where the trees are all that differ


def test_a_run_saved_before_the_default_changed_resumes_with_the_pins(tmp_path):
    """A retraining folder saved before refine_sweeps existed: refused under today's
    defaults with the hint, resumed (config accepted) with the two pins."""
    import json

    from maddnet.retrain.config import RetrainConfig
    from maddnet.retrain.pipeline import Retrainer
    from maddnet.retrain.report import markdown_report

    old = RetrainConfig(model="m", dataset="d", checkpoint="c.pt", out_dir=str(tmp_path))
    values = old.to_dict()
    values["spec"] = {
        k: v for k, v in LayerSpec(hash_objective="input").to_dict().items() if k != "refine_sweeps"
    }
    (tmp_path / "config.json").write_text(json.dumps(values))
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    saved = RetrainConfig.load(tmp_path / "config.json")
    assert (saved.spec.hash_objective, saved.spec.refine_sweeps) == ("input", 0)
    assert "hash_objective=input" in markdown_report([], values) and "refine_sweeps=0" in markdown_report(
        [], values
    )
    now = RetrainConfig(model="m", dataset="d", checkpoint="c.pt", out_dir=str(tmp_path))
    assert saved.differences(now) == {
        "spec.hash_objective": ("input", "output"),
        "spec.refine_sweeps": (0, 1),
    }
    checker = Retrainer.__new__(Retrainer)  # only _check_config, no model or data
    checker.out, checker.config = tmp_path, now
    checker.dist = type("Single", (), {"is_main": True})()
    with pytest.raises(ValueError, match="--hash-objective input --refine-sweeps 0 resumes it"):
        checker._check_config()
    checker.config = RetrainConfig(
        model="m",
        dataset="d",
        checkpoint="c.pt",
        out_dir=str(tmp_path),
        spec=LayerSpec(hash_objective="input", refine_sweeps=0),
    )
    checker._check_config()  # accepted; config.json rewritten whole
    assert json.loads((tmp_path / "config.json").read_text())["spec"]["refine_sweeps"] == 0


def test_product_basis_keeps_the_output_objective_losses():
    from maddnet.amm.encoders.tree import product_basis

    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    basis = product_basis(weight)
    assert basis.shape == (6, 6) and basis.dtype == torch.float64
    x = torch.randn(100, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close((x @ basis).norm(dim=1), (x @ weight).norm(dim=1), rtol=1e-12, atol=0)
    tall = torch.randn(40, 6, generator=gen)
    assert product_basis(tall) is tall  # M <= D: nothing to gain
    # the split search finds the same tree on the M = 50 products and on their 8-column basis
    block, block_weight = torch.randn(600, 8, generator=gen), torch.randn(8, 50, generator=gen)
    full = hashing.learn_tree(block, 4, 4, targets=block @ block_weight)
    reduced = hashing.learn_tree(block, 4, 4, targets=block @ product_basis(block_weight))
    assert torch.equal(full.split_dims, reduced.split_dims)
    torch.testing.assert_close(full.thresholds, reduced.thresholds)  # midpoints of the same rows
