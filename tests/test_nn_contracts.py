"""Drop-in contracts: what PyTorch code does with an nn.Linear / nn.Conv2d (and with autograd)
either works on a MADD layer exactly as on the layer called eagerly, or fails with a
MaddUnsupportedError that names the layer and says what is unsupported (docs/nn.md,
"Drop-in contracts: supported / refused")."""

from __future__ import annotations

import copy
import functools
import importlib.util
import io
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.utils.checkpoint import checkpoint

from maddnet.nn import MaddConfig, MaddConv2d, MaddLayer, MaddLinear, convert, madd_layers
from maddnet.nn.layers import MaddUnsupportedError
from maddnet.train.distributed import cleanup

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),
    pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning"),
]


def madd_linear(seed: int = 0, bias: bool = True, **spec) -> MaddLinear:
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(16, 6, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(6, 16, generator=gen))
        if bias:
            dense.bias.copy_(torch.randn(6, generator=gen))
    rows = torch.randn(512, 16, generator=gen)
    return MaddLinear.from_dense(dense, rows, 4, **spec)


def madd_conv(seed: int = 0, **spec) -> MaddConv2d:
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(5, 3, 3, 3, generator=gen))
    images = torch.randn(8, 3, 8, 8, generator=gen)
    rows = F.unfold(images, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    return MaddConv2d.from_dense(dense, rows, 3, **spec)


def linear_input(seed: int = 1, rows: int = 7) -> torch.Tensor:
    return torch.randn(rows, 16, generator=torch.Generator().manual_seed(seed))


def conv_input(seed: int = 1, batch: int = 2) -> torch.Tensor:
    # 8x8 outputs: the fused CPU conv paths (eval kernel, training function) run
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


LAYERS = [(madd_linear, linear_input), (madd_conv, conv_input)]


def outputs_and_grads(module: nn.Module, x: torch.Tensor, layer: MaddLayer | None = None):
    """Output, input gradient and the MADD layer's parameter gradients of a training step."""
    layer = module if layer is None else layer
    layer.zero_grad()
    x = x.clone().requires_grad_()
    out = module(x)
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    return out.detach(), x.grad, grads


def assert_same_step(a, b, exact: bool = True) -> None:
    (out_a, gx_a, grads_a), (out_b, gx_b, grads_b) = a, b
    check = torch.equal if exact else (lambda u, v: torch.allclose(u, v, rtol=1e-5, atol=1e-6))
    assert check(out_a, out_b) and check(gx_a, gx_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert check(grads_a[name], grads_b[name]), name


def error_text(exc: BaseException) -> str:
    """The messages of an exception and of those it was raised from."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


# ---------------------------------------------------------------------- attributes
def test_linear_attributes_read_like_nn_linear():
    layer = madd_linear()
    assert (layer.in_features, layer.out_features) == (16, 6)
    assert isinstance(layer.bias, nn.Parameter) and layer.bias.shape == (6,)
    assert madd_linear(bias=False).bias is None
    weight = layer.weight  # metadata of the dense weight, no data
    assert weight.shape == (6, 16) and weight.dtype == torch.float32 and weight.device == layer.lut.device
    assert weight.requires_grad and not layer.requires_grad_(False).weight.requires_grad
    assert "no dense weight of MaddLinear" in repr(weight)
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()


def test_conv_attributes_read_like_nn_conv2d():
    dense = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    rows = torch.randn(300, 3 * 3 * 2)
    layer = MaddConv2d.from_dense(dense, rows, 3)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"):
        assert getattr(layer, name) == getattr(dense, name), name
    for name in ("groups", "padding_mode", "transposed", "output_padding"):
        assert getattr(layer, name) == getattr(dense, name), name
    assert layer.weight.shape == dense.weight.shape
    assert torch.equal(layer.bias, dense.bias)
    same = MaddConv2d.from_dense(nn.Conv2d(3, 5, 3, padding="same"), torch.randn(300, 27), 3)
    assert same.padding == (1, 1)  # nn.Conv2d keeps the string "same"; the MADD conv its pair


@pytest.mark.parametrize("make", [madd_linear, madd_conv])
def test_computing_with_the_placeholder_weight_is_refused(make):
    layer = make()
    name = type(layer).__name__
    attempts = [
        lambda: layer.weight + 1,
        lambda: layer.weight.detach(),
        lambda: layer.weight.sum(),
        lambda: nn.init.kaiming_normal_(layer.weight),
        lambda: layer.weight.clone(),
    ]
    if isinstance(layer, MaddLinear):
        attempts.append(lambda: F.linear(linear_input(), layer.weight, layer.bias))
    else:
        attempts.append(lambda: F.conv2d(conv_input(), layer.weight, layer.bias, padding=1))
    for attempt in attempts:
        with pytest.raises(MaddUnsupportedError, match=f"{name}.* has no dense weight"):
            attempt()


def test_multihead_attention_with_madd_out_proj_is_refused():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 2, batch_first=True)
    attention.out_proj = madd_linear(lut_bits=None).requires_grad_(False)
    x = torch.randn(2, 5, 16)
    for mode in (attention.train, attention.eval):
        mode()
        with pytest.raises(MaddUnsupportedError, match="has no dense weight"):
            attention(x, x, x)


# ---------------------------------------------------------------------- nn.TransformerEncoder
def converted_transformer() -> nn.TransformerEncoder:
    torch.manual_seed(4)
    block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(block, 2, enable_nested_tensor=True)
    convert(model, [torch.randn(8, 10, 16) for _ in range(4)], MaddConfig(min_rows=64))
    assert set(madd_layers(model)) == {f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)}
    return model


def transformer_one_by_one(model: nn.TransformerEncoder, x, mask):
    """The encoder computed by calling every child (the MADD layers among them) in turn."""
    for block in model.layers:
        attn = block.self_attn(x, x, x, key_padding_mask=mask, need_weights=False)[0]
        x = block.norm1(x + attn)
        x = block.norm2(x + block.linear2(block.activation(block.linear1(x))))
    return x


def padding_mask() -> torch.Tensor:
    mask = torch.zeros(4, 10, dtype=torch.bool)
    for row, length in enumerate((10, 7, 5, 9)):
        mask[row, length:] = True  # left aligned: what the nested-tensor fast path takes
    return mask


def test_converted_transformer_encoder_calls_every_madd_layer():
    model = converted_transformer()
    x = torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(5))
    mask = padding_mask()
    dense = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=True
    ).eval()
    with torch.no_grad():  # the dense twin takes the nested-tensor fast path: zeros where padded
        assert dense(x, src_key_padding_mask=mask)[1, 7:].abs().max() == 0
    calls = []
    for layer in madd_layers(model).values():
        layer.register_forward_hook(lambda m, args, out: calls.append(args[0].is_nested))
    for train in (False, True):
        model.train(train)
        for key_mask in (None, mask):
            calls.clear()
            with torch.no_grad():
                out = model(x, src_key_padding_mask=key_mask)
            assert calls == [False] * 4  # every MADD layer called once, on a padded tensor
            with torch.no_grad():
                expected = transformer_one_by_one(model, x, key_mask)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out = model(x, src_key_padding_mask=mask)  # with gradients
    out.square().mean().backward()
    assert model.layers[0].linear1.lut.grad.abs().sum() > 0


# ---------------------------------------------------------------------- tracing and export
@pytest.mark.parametrize("make, data", LAYERS)
def test_jit_trace_is_refused(make, data):
    layer = make().eval()
    with pytest.raises(MaddUnsupportedError, match="cannot be traced with torch.jit.trace"):
        with torch.no_grad():  # this trace would replay the traced input's codes
            torch.jit.trace(layer, data(), check_trace=False)
    with pytest.raises(MaddUnsupportedError, match="cannot be traced"):
        torch.jit.trace(nn.Sequential(nn.ReLU(), layer.train()), data(), check_trace=False)


@pytest.mark.parametrize("make", [madd_linear, madd_conv])
def test_jit_script_is_refused(make):
    layer = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        with pytest.raises(MaddUnsupportedError, match="cannot be compiled by torch.jit.script"):
            torch.jit.script(layer)
        with pytest.raises(MaddUnsupportedError, match="torch.jit.script"):
            torch.jit.script(nn.Sequential(nn.ReLU(), layer))


@pytest.mark.parametrize("make, data", LAYERS)
def test_torch_export_is_refused(make, data):
    layer = make().eval()
    with pytest.raises(MaddUnsupportedError, match="cannot be exported with torch.export"):
        torch.export.export(layer, (data(),))
    with pytest.raises(Exception) as info:  # strict export: dynamo wraps the error
        torch.export.export(nn.Sequential(layer), (data(),), strict=True)
    assert "cannot be exported with torch.export" in error_text(info.value)


def test_onnx_export_is_refused(tmp_path):
    layer = madd_linear().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MaddUnsupportedError, match="cannot be traced"):  # TorchScript exporter
            torch.onnx.export(layer, (linear_input(),), str(tmp_path / "a.onnx"), dynamo=False)
        if importlib.util.find_spec("onnxscript") is None:
            pytest.skip("onnxscript is not installed: the dynamo-based ONNX exporter cannot run")
        with pytest.raises(Exception) as info:
            torch.onnx.export(layer, (linear_input(),), str(tmp_path / "b.onnx"), dynamo=True)
        assert "cannot be exported" in error_text(info.value)


def test_fx_symbolic_trace_refused_and_works_with_madd_layers_as_leaves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), madd_linear()).eval()
    with pytest.raises(MaddUnsupportedError, match="cannot be symbolically traced by torch.fx"):
        torch.fx.symbolic_trace(model)

    class MaddLeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, MaddLayer) or super().is_leaf_module(module, name)

    graph_module = torch.fx.GraphModule(model, MaddLeafTracer().trace(model))
    with torch.no_grad():
        for seed in (1, 2):
            assert torch.equal(graph_module(linear_input(seed)), model(linear_input(seed)))


# ---------------------------------------------------------------------- torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_equals_eager(backend):
    torch._dynamo.reset()
    for make, data in LAYERS:
        layer = make().eval()
        compiled = torch.compile(layer, backend=backend)
        with torch.no_grad():
            for seed in (1, 2):
                assert torch.equal(compiled(data(seed)), layer(data(seed)))
        layer.train()
        assert_same_step(outputs_and_grads(compiled, data(3), layer), outputs_and_grads(layer, data(3)))
        with pytest.raises(Exception) as info:
            x = data(4).requires_grad_()
            torch.autograd.grad(compiled(x).sum(), x, create_graph=True)
        assert "does not support higher-order gradients" in error_text(info.value)
    torch._dynamo.reset()


# ---------------------------------------------------------------------- autograd
@pytest.mark.parametrize("make, data", LAYERS)
@pytest.mark.parametrize("surrogate", ["soft", "path"])
def test_higher_order_gradients_are_refused(make, data, surrogate):
    layer = make(surrogate=surrogate).train()
    x = data().requires_grad_()
    with pytest.raises(MaddUnsupportedError, match=f"{type(layer).__name__} does not support higher-order"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    layer.encoder.requires_grad_(False)  # only the LUT trains, the input needs no gradient
    with pytest.raises(MaddUnsupportedError, match="higher-order"):
        layer(data()).square().sum().backward(create_graph=True)
    # first-order gradients are unaffected
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert grad.shape == x.shape and not grad.requires_grad


def test_create_graph_outside_the_madd_layers_still_works():
    torch.manual_seed(0)
    head = nn.Linear(6, 3)
    layer = madd_linear().train()
    hidden = layer(linear_input())
    # a penalty on the head's weight gradient: differentiated twice through the head only,
    # once (first order) through the MADD layer
    (grad,) = torch.autograd.grad(head(hidden).square().sum(), head.weight, create_graph=True)
    grad.square().sum().backward()
    # the same with the MADD output as a leaf, then its gradient sent through the layer
    leaf = hidden.detach().requires_grad_()
    (grad_leaf,) = torch.autograd.grad(head(leaf).square().sum(), head.weight, create_graph=True)
    head_grad = head.weight.grad.clone()
    head.zero_grad()
    lut_grad = layer.lut.grad.clone()
    layer.zero_grad()
    grad_leaf.square().sum().backward()
    torch.testing.assert_close(head.weight.grad, head_grad)
    layer(linear_input()).backward(leaf.grad)
    torch.testing.assert_close(layer.lut.grad, lut_grad)


@pytest.mark.parametrize("make, data", LAYERS)
def test_forward_mode_ad_and_torch_func_transforms_are_refused(make, data):
    layer = make().eval().requires_grad_(False)  # frozen: the no-grad path would drop the tangent
    x = data()
    with forward_ad.dual_level():
        with pytest.raises(MaddUnsupportedError, match="does not support forward-mode AD"):
            layer(forward_ad.make_dual(x, torch.ones_like(x)))
    for transform in (
        lambda: torch.func.jvp(layer, (x,), (torch.ones_like(x),)),
        lambda: torch.func.vmap(layer)(x[None].expand(2, *x.shape)),
        lambda: torch.func.grad(lambda inp: layer(inp).sum())(x),
    ):
        with pytest.raises(MaddUnsupportedError, match="does not support torch.func transforms"):
            transform()


@pytest.mark.parametrize("make, data", LAYERS)
def test_functional_call_and_checkpoint(make, data):
    layer = make().train()
    doubled = {name: p.detach() * (2 if name == "lut" else 1) for name, p in layer.named_parameters()}
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.lut.mul_(2)
        out = torch.func.functional_call(layer, doubled, (data(),))
        assert torch.equal(out, twin(data()))
        assert torch.equal(layer(data()), copy.deepcopy(layer)(data()))  # the original is intact
    for reentrant in (False, True):
        wrapped = functools.partial(checkpoint, layer, use_reentrant=reentrant)
        assert_same_step(outputs_and_grads(wrapped, data(), layer), outputs_and_grads(layer, data()))


# ---------------------------------------------------------------------- hooks
@pytest.mark.parametrize("make, data", LAYERS)
def test_user_hooks_see_the_right_tensors(make, data):
    layer = make().train()
    x = data().requires_grad_()
    seen = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, args: (args[0] * 2,)),
        layer.register_forward_hook(lambda m, args, out: seen.update(input=args[0], output=out)),
        layer.register_full_backward_hook(
            lambda m, grad_in, grad_out: seen.update(grad_input=grad_in[0], grad_output=grad_out[0])
        ),
    ]
    out = layer(x)
    assert torch.equal(seen["input"], 2 * x) and torch.equal(seen["output"], out)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    assert torch.equal(seen["grad_output"], weights)
    gx = x.grad.clone()
    assert torch.equal(seen["grad_input"] * 2, gx)  # the layer's input was 2 x
    for handle in handles:
        handle.remove()
    # the layer's own guard hooks stay; without user hooks it computes as before
    assert len(layer._forward_pre_hooks) == 1 and len(layer._forward_hooks) == 1
    assert not layer._backward_hooks
    x2 = (2 * x).detach().requires_grad_()
    assert torch.equal(layer(x2), out)
    layer(x2).mul(weights).sum().backward()
    assert torch.equal(x2.grad * 2, gx)


def test_apply_and_modules_visit_madd_layers():
    model = nn.Sequential(madd_conv(), nn.ReLU(), nn.Flatten(), nn.Linear(320, 6))
    visited = []
    model.apply(lambda m: visited.append(type(m).__name__))
    assert visited.count("MaddConv2d") == 1 and "TreeEncoderModule" in visited
    model.apply(lambda m: m.requires_grad_(False) if isinstance(m, MaddLayer) else None)
    assert not any(p.requires_grad for p in model[0].parameters())
    assert all(p.requires_grad for p in model[3].parameters())


# ---------------------------------------------------------------------- copies and saving
def trained_a_step(layer: MaddLayer, x: torch.Tensor) -> MaddLayer:
    """One SGD step: the float LUT moves away from the integer LUT last derived from it."""
    layer.train()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    layer(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return layer


def pickled(module: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(module))


def torch_saved(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("make, data", LAYERS)
@pytest.mark.parametrize("clone", [copy.deepcopy, pickled, torch_saved])
def test_deepcopy_and_pickle_give_identical_outputs(make, data, clone):
    layer = make()
    for stale in (False, True):
        if stale:  # the integer buffers are re-derived from the float LUT at the next use
            trained_a_step(layer, data(9))
        twin = clone(layer)
        assert twin.spec == layer.spec and twin.get_config() == layer.get_config()
        for train in (False, True):
            layer.train(train), twin.train(train)
            with torch.no_grad():
                assert torch.equal(twin(data(1)), layer(data(1)))
        assert_same_step(outputs_and_grads(twin, data(2)), outputs_and_grads(layer, data(2)))
        assert len(twin._forward_pre_hooks) == 1 and len(twin._forward_hooks) == 1


def test_unpickled_layer_without_guard_hooks_gets_them():
    layer = madd_linear()
    layer._forward_pre_hooks.clear()  # as a layer pickled before the hooks existed
    layer._forward_hooks.clear()
    twin = pickled(layer)
    x = linear_input().requires_grad_()
    with pytest.raises(MaddUnsupportedError, match="higher-order"):
        torch.autograd.grad(twin.train()(x).sum(), x, create_graph=True)
    assert len(twin._forward_pre_hooks) == 1


@pytest.mark.parametrize("make, data", LAYERS)
def test_state_dict_round_trip_strict(make, data):
    layer = trained_a_step(make(), data(9))
    fresh = type(layer).from_config(layer.get_config())
    result = fresh.load_state_dict(layer.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for train in (False, True):
        layer.train(train), fresh.train(train)
        with torch.no_grad():
            assert torch.equal(fresh(data(1)), layer(data(1)))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**layer.state_dict(), "weight": torch.zeros(1)}, strict=True)


# ---------------------------------------------------------------------- module API
@pytest.mark.parametrize("make, data", LAYERS)
def test_parameters_modes_and_requires_grad(make, data):
    layer = make()
    names = [name for name, _ in layer.named_parameters(remove_duplicate=False)]
    expected = ["encoder.thresholds", "lut", "bias"]
    assert sorted(names) == sorted(expected) and len(list(layer.parameters())) == 3
    assert layer.thresholds is layer.encoder.thresholds  # an alias, not a second parameter
    layer.eval()
    assert not layer.training and not layer.encoder.training
    with torch.no_grad():
        eval_out = layer(data())
    layer.train()
    assert layer.training and layer.encoder.training
    with torch.no_grad():  # QAT: training forward passes read the integer LUT too
        assert torch.equal(layer(data()), eval_out)
    layer.requires_grad_(False)
    out = layer(data())
    assert not out.requires_grad and torch.equal(out, eval_out)
    x = data().requires_grad_()  # a frozen layer still passes gradients to its input
    layer(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("make, data", LAYERS)
def test_double_precision_does_not_break(make, data):
    layer = make().eval()
    double = copy.deepcopy(layer).double()
    assert double.lut.dtype == torch.float64 and double.encoder.thresholds.dtype == torch.float64
    with torch.no_grad():
        out = double(data().double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, layer(data()).double(), rtol=1e-5, atol=1e-5)
        assert torch.equal(double.codes(data().double()), layer.codes(data()))
        assert torch.equal(double.float()(data()), layer(data()))  # float32 -> 64 -> 32 is exact
    double.double().train()
    _, grad_x, grads = outputs_and_grads(double, data().double())
    assert grad_x.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads.values())


# ---------------------------------------------------------------------- data parallel
def test_data_parallel_on_cpu_equals_the_module():
    model = nn.Sequential(madd_conv(), nn.ReLU(), nn.Flatten(), madd_linear_of(320)).train()
    parallel = nn.DataParallel(model)  # no GPU: calls the module itself
    x = conv_input()
    assert_same_step(outputs_and_grads(parallel, x, model), outputs_and_grads(model, x))


def madd_linear_of(in_features: int) -> MaddLinear:
    gen = torch.Generator().manual_seed(3)
    dense = nn.Linear(in_features, 4)
    return MaddLinear.from_dense(dense, torch.randn(400, in_features, generator=gen), 16)


def _ddp_worker(rank: int, world_size: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world_size
    )
    model = torch.load(f"{directory}/model.pt", weights_only=False)
    x = torch.load(f"{directory}/x.pt")
    ddp = nn.parallel.DistributedDataParallel(model)
    share = x.shape[0] // world_size
    ddp(x[rank * share : (rank + 1) * share]).square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    torch.save(grads, f"{directory}/grads{rank}.pt")
    cleanup()  # a barrier, then leave: no rank closes its connections while the other reads


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    model = nn.Sequential(madd_conv(), nn.ReLU(), nn.Flatten(), madd_linear_of(320)).train()
    x = conv_input(batch=8)
    torch.save(model, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    model(x).square().mean().backward()  # one process, the whole batch
    ranks = [torch.load(tmp_path / f"grads{rank}.pt") for rank in range(2)]
    for name, p in model.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], p.grad, rtol=1e-5, atol=1e-6)
