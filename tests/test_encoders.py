"""The Encoder seam: the tree behind it, and a second encoder through every entry point.

The second encoder is the package's "pq" (:class:`maddnet.amm.encoders.PQEncoder`:
product quantisation, each codebook's block of columns goes to its nearest centroid
under L2; it began here as the newcomer's example): an ``Encoder`` (learn / encode /
columns read / cost) and its ``EncoderModule`` (soft-argmin surrogate backward).
Registered by name, it plugs into ``MaddnessMatmul``, ``MaddLinear`` and ``MaddConv2d``,
trains, saves and loads. tests/test_encoder_study.py tests the encoders themselves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maddnet import MaddnessMatmul
from maddnet.amm import EncoderCost, TreeEncoder
from maddnet.amm.encoders import ENCODERS, create_encoder
from maddnet.amm.lut import quantized_lut_sum
from maddnet.nn import (
    LayerSpec,
    MaddConfig,
    MaddConv2d,
    MaddLinear,
    TreeEncoderModule,
    convert,
    load_converted,
    save_converted,
)
from maddnet.nn.encoders import PQModule as NearestPrototypeModule


# ---------------------------------------------------------------------- data
def low_rank_rows(nrows: int, ndims: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(nrows, 6, generator=gen) @ torch.randn(6, ndims, generator=gen)


def nmse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((approx - exact) ** 2).sum() / (exact**2).sum())


# ---------------------------------------------------------------------- the tree behind the seam
def test_tree_encoder_is_what_the_estimator_uses():
    rows, weight = low_rank_rows(2000, 24), torch.randn(24, 5)
    amm = MaddnessMatmul(ncodebooks=6, lut_bits=None).fit(rows, weight)
    tree = TreeEncoder(ncodebooks=6, ncandidates=8).fit(rows.float())
    assert isinstance(amm.encoder_, TreeEncoder)
    assert torch.equal(tree.split_dims_, amm.split_dims_) and torch.equal(tree.thresholds_, amm.thresholds_)
    assert torch.equal(tree.prototypes_, amm.prototypes_)
    assert torch.equal(tree.encode(rows), amm.encode(rows))
    assert torch.equal(tree.read_columns, amm.split_dims_)
    assert tree.cost() == EncoderCost(compares=24, reads=24)  # 4 compares and reads per codebook
    assert "tree" in ENCODERS and type(create_encoder("tree", ncodebooks=2)) is TreeEncoder


def test_encoders_refuse_what_they_cannot_learn_from():
    with pytest.raises(ValueError, match="needs at least 16"):
        TreeEncoder(ncodebooks=2).fit(torch.randn(10, 8))
    with pytest.raises(ValueError, match="cannot exceed"):
        TreeEncoder(ncodebooks=9).fit(torch.randn(100, 8))
    with pytest.raises(ValueError, match="needs the weight"):
        TreeEncoder(ncodebooks=2, hash_objective="output").fit(torch.randn(100, 8))
    with pytest.raises(ValueError, match="unknown encoder 'nope'"):
        MaddnessMatmul(encoder="nope")
    with pytest.raises(ValueError, match="unknown encoder"):
        LayerSpec(encoder="nope")
    with pytest.raises(ValueError, match="configure the tree encoder"):
        LayerSpec(encoder="pq", surrogate="path")


def test_tree_global_layers_take_the_surrogate():
    """tree-global's layer module is the tree's: the spec's surrogate reaches it."""
    spec = LayerSpec(encoder="tree-global", surrogate="soft-bf16")
    layer = MaddLinear.from_dense(nn.Linear(16, 4), low_rank_rows(600, 16), ncodebooks=2, spec=spec)
    assert layer.surrogate == "soft-bf16" and layer.encoder.surrogate == "soft-bf16"
    for tree_only in ({"hash_objective": "input"}, {"refine_sweeps": 0}):
        with pytest.raises(ValueError, match="configure the tree encoder"):
            LayerSpec(encoder="tree-global", **tree_only)


def test_hash_objective_reaches_the_layers():
    rows, linear = low_rank_rows(1500, 16), nn.Linear(16, 4)
    layer = MaddLinear.from_dense(
        linear, rows, ncodebooks=2, hash_objective="output", refine_sweeps=0, lut_bits=None
    )
    amm = MaddnessMatmul(ncodebooks=2, ncandidates=4, hash_objective="output", lut_bits=None)
    amm.fit(rows, linear.weight.detach().T)
    assert torch.equal(layer.split_dims, amm.split_dims_) and torch.equal(
        layer.thresholds.detach(), amm.thresholds_
    )
    assert layer.spec.hash_objective == "output"


# ---------------------------------------------------------------------- the second encoder
def test_second_encoder_in_the_estimator():
    rows, weight = low_rank_rows(3000, 24), torch.randn(24, 7)
    amm = MaddnessMatmul(ncodebooks=4, lut_bits=None, encoder="pq", encoder_options={"iterations": 3})
    amm.fit(rows[:2500], weight)
    test = rows[2500:]
    out = amm(test)
    codes = amm.encode(test)
    # decode = sum over codebooks of (nearest centroid's prototype) @ weight
    expected = sum(amm.prototypes_[c, codes[:, c].long()] @ weight for c in range(4))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert nmse(out, test @ weight) < 0.2  # 4 codebooks of 16 centroids on 6-dim data
    twin = MaddnessMatmul.load_state_dict(MaddnessMatmul(**amm.get_config()), amm.state_dict())
    assert torch.equal(twin(test), out)
    assert amm.encoder_.cost().multiplies == 4 * 16 * 6


def test_second_encoder_surrogate_equals_autograd_of_the_soft_argmin():
    torch.manual_seed(0)
    module = NearestPrototypeModule(3, 4, ndims=6).double()
    with torch.no_grad():
        module.centroids.copy_(torch.randn(3, 4, 2))
        module.temperature.fill_(0.7)
    values = torch.randn(5, 3, 2, dtype=torch.float64)
    table, grad_out = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    codes = module.encode_values(values)
    grad_values, (grad_centroids, _) = module.surrogate_backward(
        values, codes, (module.centroids.detach(), module.temperature), table, grad_out, (True, True, False)
    )
    v, c = values.clone().requires_grad_(), module.centroids.detach().clone().requires_grad_()
    scores = torch.softmax(-((v[:, :, None] - c[None]) ** 2).sum(-1) / 0.7, -1)
    (torch.einsum("nck,ckm->nm", scores, table) * grad_out).sum().backward()
    torch.testing.assert_close(grad_values, v.grad)
    torch.testing.assert_close(grad_centroids, c.grad)


def test_second_encoder_in_madd_linear_trains_saves_and_loads(tmp_path):
    rows, linear = low_rank_rows(2000, 16), nn.Linear(16, 3)
    spec = LayerSpec(encoder="pq", encoder_options={"iterations": 3}, lut_bits=8)
    layer = MaddLinear.from_dense(linear, rows, ncodebooks=4, spec=spec)
    assert isinstance(layer.encoder, NearestPrototypeModule) and layer.encoder_reads == 16
    amm = MaddnessMatmul(ncodebooks=4, lut_bits=8, encoder="pq", encoder_options={"iterations": 3})
    amm.fit_lut(rows, linear.weight.detach().T)  # what conversion runs
    with torch.no_grad():
        assert torch.equal(layer.eval()(rows[:300]), amm(rows[:300]) + linear.bias)
    # one training step moves centroids and LUT and lowers the loss on its batch
    layer.train()
    target = linear(rows[:256]).detach()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.02)
    before = layer.encoder.centroids.detach().clone()
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = F.mse_loss(layer(rows[:256]), target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert not torch.equal(before, layer.encoder.centroids.detach()) and losses[1] < losses[0]
    # save / load into a fresh skeleton: identical outputs
    model = nn.Sequential(layer)
    save_converted(model, tmp_path / "m.pt")
    fresh = load_converted(nn.Sequential(nn.Linear(16, 3)), tmp_path / "m.pt").eval()
    with torch.no_grad():
        assert torch.equal(fresh(rows[:50]), model.eval()(rows[:50]))


def test_second_encoder_in_a_converted_conv_net(tmp_path):
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))

    model = build()
    batches = [(torch.randn(8, 2, 6, 6), None) for _ in range(3)]
    spec = LayerSpec(encoder="pq", encoder_options={"iterations": 2})
    convert(model, batches, MaddConfig(layers=["0"], ncodebooks=2, min_rows=64, spec=spec))
    assert isinstance(model[0], MaddConv2d) and isinstance(model[0].encoder, NearestPrototypeModule)
    x = torch.randn(4, 2, 6, 6)
    # the conv's output equals the estimator's on the unfolded patches (same encoder state)
    rows = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    codes = model[0].encoder.encode_values(rows.reshape(-1, 2, 9))
    with torch.no_grad():
        out = model[0].eval()(x)
    q = model[0].quantized_lut()
    reference = (quantized_lut_sum(codes, q) + model[0].bias.detach()).reshape(4, 6, 6, 4).permute(0, 3, 1, 2)
    assert torch.equal(out, reference)
    # one training step through the conv (general path: no fused kernel for this encoder)
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    assert model[0].encoder.centroids.grad.abs().sum() > 0 and model[0].lut.grad.abs().sum() > 0
    save_converted(model, tmp_path / "conv.pt")
    fresh = load_converted(build(), tmp_path / "conv.pt").eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model.eval()(x))


def test_tree_module_from_spec_and_layer_aliases():
    layer = MaddConv2d(3, 4, 3, ncodebooks=3, spec=LayerSpec(surrogate="path", lut_bits=None))
    assert isinstance(layer.encoder, TreeEncoderModule) and layer.encoder.surrogate == "path"
    assert layer.split_dims is layer.encoder.split_dims and layer.temperature is layer.encoder.temperature
    layer.surrogate = "soft"
    assert layer.encoder.surrogate == "soft" and layer.spec.surrogate == "soft"
    with pytest.raises(ValueError, match="surrogate"):
        layer.surrogate = "hard"
    assert MaddConv2d.from_config(layer.get_config()).spec == layer.spec
