"""Field faults of the model graph: shared modules (one layer under two names) and MADD
layers that training cannot move (dead surrogate gradients)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from maddnet.nn import (
    MaddConfig,
    MaddLinear,
    calibrate,
    conversion_plan,
    convert,
    convert_layer,
    load_converted,
    prepare,
    rebuild,
    record_inputs,
    save_converted,
    summary,
)
from maddnet.nn.diagnostics import dead_layers, reestimate_batchnorm, threshold_activity
from maddnet.nn.plan import module_names
from maddnet.retrain import RetrainConfig, parameter_groups
from maddnet.retrain.pipeline import Retrainer, forward_order

CONFIG = MaddConfig(min_rows=64)


# ---------------------------------------------------------------------- shared modules
class Tied(nn.Module):
    """One Linear under two attribute names, called at two places."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = self.a
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


class TwoParents(nn.Module):
    """One Linear inside two different containers, and a whole block used twice."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(16, 16)
        self.enc = nn.Sequential(shared, nn.ReLU())
        self.dec = nn.Sequential(nn.Linear(16, 16), shared)
        self.block1 = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.block2 = self.block1

    def forward(self, x):
        return self.block2(self.block1(self.dec(self.enc(x))))


def _data(dim: int, n: int = 1024) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(n, dim)]


def test_convert_replaces_a_shared_module_at_every_name():
    torch.manual_seed(0)
    model = Tied().eval()
    convert(model, _data(32), CONFIG)
    assert isinstance(model.a, MaddLinear) and model.a is model.b
    x = torch.randn(8, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.head(model.a(torch.relu(model.a(x)))))
    table = summary(model, print_fn=None)
    assert "a (= b)" in table and "2 layers" in table  # the shared layer once, plus head


def test_shared_leaf_under_two_parents_and_a_reused_block_become_one_madd_layer_each():
    torch.manual_seed(0)
    model = TwoParents().eval()
    convert(model, _data(16), CONFIG)
    assert isinstance(model.enc[0], MaddLinear) and model.enc[0] is model.dec[1]
    assert isinstance(model.block1[0], MaddLinear) and model.block2 is model.block1
    names = module_names(model)
    assert names[id(model.enc[0])] == ["enc.0", "dec.1"]
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_prepare_records_a_shared_module_once_with_the_inputs_of_both_call_sites():
    model = Tied().eval()
    prepare(model, CONFIG)
    recorders = model._maddnet_prepared.recorders
    assert set(recorders) == {"a", "head"}  # one recorder for a/b
    calibrate(model, [torch.randn(100, 32)])
    assert recorders["a"].seen == 200 and recorders["head"].seen == 100


def test_selection_by_any_name_and_exclusion_by_any_name():
    model = Tied()
    assert set(MaddConfig(layers=["b"]).select(model)) == {"a"}  # the module, under its first name
    assert set(MaddConfig(exclude=["b"]).select(model)) == {"head"}  # excluding one name excludes it
    with pytest.raises(ValueError, match="matches no convertible"):
        MaddConfig(layers=["b", "nothing"]).select(model)


def test_record_inputs_records_a_shared_module_once_under_both_names():
    model = Tied()
    rows = record_inputs(model, ["a", "b"], [torch.randn(50, 32)], config=CONFIG)
    assert rows["a"] is rows["b"] and rows["a"].shape == (100, 32)


def test_convert_layer_by_the_second_name_replaces_both():
    model = Tied()
    rows = record_inputs(model, ["b"], _data(32), config=CONFIG)["b"]
    layer = convert_layer(model, "b", rows, CONFIG)
    assert model.a is layer and model.b is layer


def test_saved_shared_layer_reloads_shared_and_a_mismatched_skeleton_is_refused(tmp_path):
    torch.manual_seed(0)
    model = Tied().eval()
    convert(model, _data(32), CONFIG)
    plan = conversion_plan(model)
    assert plan["layers"]["a"]["aliases"] == ["b"] and "b" not in plan["layers"]
    assert {"a.lut", "b.lut"} <= set(model.state_dict())
    save_converted(model, tmp_path / "tied.pt")
    loaded = load_converted(Tied(), tmp_path / "tied.pt").eval()
    assert isinstance(loaded.a, MaddLinear) and loaded.a is loaded.b
    x = torch.randn(16, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    untied = Tied()
    untied.b = nn.Linear(32, 32)  # the fresh model does not share: refused, naming the layer
    with pytest.raises(ValueError, match="'a'.*share"):
        rebuild(untied, plan)
    separate = {"format": plan["format"], "passes": [], "layers": dict(plan["layers"])}
    separate["layers"] = {"a": {k: v for k, v in plan["layers"]["a"].items() if k != "aliases"}}
    separate["layers"]["b"] = separate["layers"]["a"]  # saved as two layers, the model shares one
    with pytest.raises(ValueError, match="'b'.*already replaced"):
        rebuild(Tied(), separate)


def test_retrain_layer_order_and_optimizer_groups_hold_a_shared_layer_once(tmp_path):
    model = Tied()
    config = RetrainConfig(
        model="resnet9", dataset="digits", out_dir=str(tmp_path), baseline_steps=1, train_replaced=True
    )
    order = forward_order(model, list(MaddConfig().select(model)), torch.randn(2, 32))
    assert order == ["a", "head"]
    rows = record_inputs(model, ["a"], _data(32), config=CONFIG)["a"]
    convert_layer(model, "a", rows, CONFIG)
    groups = parameter_groups(model, order, len(order), config, final=True)
    params = [id(p) for g in groups for p in g["params"]]
    assert len(params) == len(set(params)) == len({id(p) for p in model.parameters()}) == 5
    torch.optim.SGD(groups, lr=0.1)  # would refuse a parameter in two groups


def test_tied_parameters_warn_on_convert_and_sit_in_one_optimizer_group(tmp_path):
    class WeightTied(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(16, 16, bias=False)
            self.down = nn.Linear(16, 16, bias=False)
            self.down.weight = self.up.weight  # parameter tying, two modules

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    model = WeightTied()
    config = RetrainConfig(
        model="resnet9", dataset="digits", out_dir=str(tmp_path), baseline_steps=1, train_replaced=True
    )
    groups = parameter_groups(model, ["up", "down"], -1, config)
    params = [id(p) for g in groups for p in g["params"]]
    assert len(params) == len(set(params))
    torch.optim.SGD(groups, lr=0.1)
    with pytest.warns(UserWarning, match="'up' shares its parameter 'weight' with \\['down.weight'\\]"):
        convert(model, _data(16), MaddConfig(min_rows=64, layers=["up"]))


# ---------------------------------------------------------------------- dead layers
def bn_model(running_mean: float = 1000.0, running_var: float = 1e6) -> nn.Module:
    """Linear -> BatchNorm -> Linear whose BatchNorm running statistics do not describe the
    data: eval mode squeezes the second layer's inputs to about -1 +- 0.0003, train mode
    normalises them to about N(0, 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 8))
    model[1].running_mean.fill_(running_mean)
    model[1].running_var.fill_(running_var)
    return model


def _calib() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(256, 16, generator=generator) for _ in range(4)]


def test_dead_layer_is_found_named_and_really_gets_no_gradient():
    model = bn_model()
    with pytest.warns(UserWarning, match=r"'2' \(0\.0\d%\).*reestimate_batchnorm"):
        convert(model, _calib(), CONFIG)  # convert checks in train mode and warns
    dead = dead_layers(model, _calib()[:1], warn=False)
    assert list(dead) == ["2"]
    shares = threshold_activity(model, _calib()[:1])
    assert shares["0"] > 0.3  # the layer before BatchNorm is fine
    assert threshold_activity(model, _calib()[:1], train=False)["2"] > 0.3  # alive where calibrated
    model.train()
    model(_calib()[0]).square().mean().backward()
    assert model[2].thresholds.grad.abs().max() < 1e-6  # what the check predicts
    assert model[0].thresholds.grad.abs().max() < 1e-6  # and (almost) nothing flows through it


def test_reestimated_batchnorm_removes_the_dead_layer():
    model = bn_model()
    assert reestimate_batchnorm(model, _calib()) == 1
    data = torch.cat(_calib())
    with torch.no_grad():
        hidden = model[0](data)
    assert torch.allclose(model[1].running_mean, hidden.mean(0), atol=1e-5)
    assert model[1].momentum == 0.1 and model[1].training  # restored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model, _calib(), CONFIG)
    assert dead_layers(model, _calib()[:1]) == {}
    model.train()
    model(_calib()[0]).square().mean().backward()
    assert model[2].thresholds.grad.abs().max() > 1e-3 and model[0].thresholds.grad.abs().max() > 1e-3


def test_check_leaves_statistics_modes_and_random_state_as_they_were():
    model = bn_model()
    convert(model, _calib(), CONFIG, check_training=False)
    model.eval()
    model[2].train()  # a mixed-mode model keeps its modes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    threshold_activity(model, _calib()[:1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model] == [False, False, True]


def test_calibrate_restores_every_module_mode():
    model = bn_model().train()
    model[1].eval()  # frozen BatchNorm inside a training model
    calibrate(model, _calib()[:1])
    assert [m.training for m in model] == [True, False, True]


def test_retrain_step_check_warns_with_the_step_and_layer_names():
    model = bn_model()
    convert(model, _calib(), CONFIG, check_training=False)
    with pytest.warns(UserWarning, match=r"step 3/3 \(2\): 1 MADD layer.*'2'"):
        dead = Retrainer._check_dead_layers(model, _calib()[:1], "step 3/3 (2)")
    assert list(dead) == ["2"]


def test_convert_still_converts_when_the_check_cannot_run_in_train_mode():
    model = bn_model()
    single_rows = [row[None] for row in _calib()[0][:64]]  # BatchNorm refuses batches of one in train mode
    with pytest.warns(UserWarning, match="dead-layer check could not run"):
        convert(model, single_rows, CONFIG)
    assert isinstance(model[2], MaddLinear) and model.training  # mode and statistics as they were
    assert torch.all(model[1].running_mean == 1000.0)


def test_codebooks_given_under_a_second_name_of_a_shared_layer_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = self.a

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    assert set(MaddConfig(ncodebooks={"a": 4}).select(Tied())) == {"a"}
    with pytest.raises(ValueError, match="'b' -> 'a'"):
        MaddConfig(ncodebooks={"b": 4}).select(Tied())
