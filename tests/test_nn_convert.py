"""prepare -> calibrate -> convert, single-layer conversion, summary, save/load, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maddnet.nn import (
    LayerSpec,
    MaddConfig,
    MaddConv2d,
    MaddLinear,
    RowRecorder,
    conversion_plan,
    convert,
    convert_layer,
    load_converted,
    madd_layers,
    prepare,
    rebuild,
    record_inputs,
    save_converted,
    summary,
)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, groups=4, padding=1),  # grouped: skipped by default
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def image_batches(count=4, batch=8, size=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=gen) for _ in range(count)]


class TinyAttentionBlock(nn.Module):
    """Single-head attention + MLP with every projection an nn.Linear."""

    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.o(attn @ v)
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def test_prepare_records_bounded_rows_and_convert_refuses_too_few():
    model = small_cnn().eval()
    batches = image_batches()
    config = MaddConfig(min_rows=64, max_rows=500)
    prepare(model, config)
    with torch.no_grad():
        for x in batches:
            model(x)
    recorded = {name: r.rows().clone() for name, r in model._maddnet_prepared.recorders.items()}
    assert set(recorded) == {"0", "3", "5", "10"}  # the grouped conv is skipped
    assert recorded["0"].shape == (500, 27) and recorded["10"].shape == (32, 16)
    # the Linear saw only 32 rows: converting must refuse and leave the model unchanged
    with pytest.raises(ValueError, match="fewer than the 64"):
        convert(model)
    assert not madd_layers(model)


def test_convert_one_call_matches_maddness_fit_on_the_same_rows(layer_amm):
    model = small_cnn().eval()
    batches = image_batches()
    config = MaddConfig(layers=["0", "3", "5"], min_rows=64, max_rows=400, spec=LayerSpec(lut_bits=8))
    prepare(model, config)
    with torch.no_grad():
        for x in batches:
            model(x)
    rows = {name: r.rows().clone() for name, r in model._maddnet_prepared.recorders.items()}
    dense_convs = {name: model.get_submodule(name) for name in rows}
    convert(model)
    layers = madd_layers(model)
    assert set(layers) == {"0", "3", "5"}
    assert isinstance(layers["3"], MaddConv2d) and layers["3"].ncodebooks == 8  # one per channel
    assert layers["5"].ncodebooks == 2  # 1x1 conv: D // 8
    for name, layer in layers.items():
        conv = dense_convs[name]
        amm = layer_amm(layer.ncodebooks, lut_bits=8)
        amm.fit(rows[name], conv.weight.detach().reshape(conv.out_channels, -1).T)
        assert torch.equal(layer.split_dims, amm.split_dims_)
        assert torch.equal(layer.thresholds.detach(), amm.thresholds_)
        torch.testing.assert_close(layer.lut.detach(), amm.lut_, rtol=0, atol=1e-6)
        assert torch.equal(layer.lut_q_values, amm.lut_q_.values)
    # the converted network runs and stays close to the dense one
    with torch.no_grad():
        dense_out = small_cnn().eval()(batches[0])
        out = model(batches[0])
    assert out.shape == dense_out.shape
    assert float((out - dense_out).norm() / dense_out.norm()) < 0.5


def test_one_call_convert_with_loader_of_pairs_and_summary():
    model = small_cnn().train()
    loader = [(x, torch.zeros(len(x))) for x in image_batches(count=12, batch=16)]
    convert(model, loader, MaddConfig(min_rows=128, max_rows=1500))
    assert model.training  # mode restored; BN statistics untouched by calibration
    assert torch.equal(model[1].running_mean, torch.zeros(8))
    assert isinstance(model[10], MaddLinear) and model[10].ncodebooks == 2
    text = summary(model, print_fn=None)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "kind", "D", "M", "C", "K", "D/C", "lut_bits", "lut_bytes", "reads"]
    row = dict(zip(lines[0].split(), lines[3].split(), strict=True))  # layer "3"
    assert row == {
        "name": "3",
        "kind": "conv2d",
        "D": "72",
        "M": "16",
        "C": "8",
        "K": "16",
        "D/C": "9.0",
        "lut_bits": "8",
        "lut_bytes": str(8 * 16 * 16),
        "reads": "32",
    }
    total = 3 * 16 * 8 + 8 * 16 * 16 + 2 * 16 * 16 + 2 * 16 * 10
    total_row = next(line for line in lines if line.startswith("total"))
    assert total_row.split()[-2:] == [str(total), str(4 * (3 + 8 + 2 + 2))]
    assert "7 (Conv2d" in text and "groups=1 only" in text  # the depthwise conv is listed as kept


def test_transformer_encoder_layer_conversion():
    torch.manual_seed(2)
    block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    loader = [torch.randn(8, 10, 32) for _ in range(4)]
    convert(block, loader, MaddConfig(min_rows=64))
    assert set(madd_layers(block)) == {"linear1", "linear2"}  # out_proj is used via .weight
    block.eval()
    x = loader[0]
    with torch.no_grad():
        out = block(x)  # the fused eval fast path must not bypass the MADD layers
        h = block.norm1(x + block.self_attn(x, x, x, need_weights=False)[0])
        expected = block.norm2(h + block.linear2(F.relu(block.linear1(h))))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_tiny_attention_block_conversion_and_training_step():
    torch.manual_seed(3)
    block = TinyAttentionBlock()
    loader = [torch.randn(4, 12, 16) for _ in range(4)]
    convert(block, loader, MaddConfig(min_rows=128, codebook_width=4))
    assert set(madd_layers(block)) == {"q", "k", "v", "o", "fc1", "fc2"}
    assert block.fc2.ncodebooks == 8 and block.q.ncodebooks == 4
    out = block(loader[0])
    out.square().mean().backward()
    for name in ("q", "fc2"):
        layer = getattr(block, name)
        assert float(layer.lut.grad.abs().sum()) > 0 and float(layer.thresholds.grad.abs().sum()) > 0


def test_state_dict_round_trip_into_fresh_model(tmp_path):
    model = small_cnn()
    loader = image_batches(count=8, batch=16)
    convert(model, loader, MaddConfig(min_rows=128, max_rows=1500))
    # train a little so the float LUT moves away from the saved integer buffers
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    model(loader[0]).square().mean().backward()
    optimizer.step()
    model.eval()
    path = tmp_path / "converted.pt"
    save_converted(model, path)
    fresh = load_converted(small_cnn().eval(), path)
    assert conversion_plan(fresh) == conversion_plan(model)
    with torch.no_grad():
        for x in loader[:2]:
            assert torch.equal(fresh(x), model(x))
    fresh.train()
    model.train()
    x = loader[0].requires_grad_()
    assert torch.equal(fresh(x), model(x))


def test_layer_by_layer_conversion_on_partly_converted_network():
    model = small_cnn().eval()
    loader = image_batches(count=3, batch=8)
    config = MaddConfig(min_rows=64, max_rows=1000)  # keeps every row, in stream order
    for name in ("0", "3"):
        rows = record_inputs(model, [name], loader, config=config)[name]
        if name == "3":  # rows come from the network whose first conv is MADD already
            assert isinstance(model[0], MaddConv2d)
            with torch.no_grad():
                hidden = torch.cat([model[2](model[1](model[0](x))) for x in loader])
            patches = F.unfold(hidden, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 72)
            assert torch.equal(rows, patches)
        layer = convert_layer(model, name, rows, config)
        assert model.get_submodule(name) is layer
    assert set(madd_layers(model)) == {"0", "3"}


def test_row_recorder_is_bounded_uniform_and_deterministic():
    stream = torch.arange(10_000, dtype=torch.float32)[:, None]
    samples = []
    for seed in (0, 0, 1):
        recorder = RowRecorder(capacity=1000, seed=seed)
        for chunk in stream.split(333):
            positions, slots = recorder.choose(chunk.shape[0])
            recorder.store(chunk[positions], slots)
        rows = recorder.rows()
        assert rows.shape == (1000, 1) and recorder.seen == 10_000
        assert rows.unique().numel() == 1000  # no row stored twice
        samples.append(rows)
    assert torch.equal(samples[0], samples[1]) and not torch.equal(samples[0], samples[2])
    mean = float(samples[0].mean())
    assert abs(mean - 4999.5) < 4 * 2887 / 1000**0.5  # uniform over the stream
    assert float((samples[0] >= 9000).float().mean()) > 0.06  # late rows kept too


@pytest.mark.parametrize("chunks", [(3000, 2000, 5000), (999, 2, 4000, 1), (10_000,), (7,) * 300])
def test_row_recorder_equals_algorithm_r_row_by_row(chunks):
    """The batched sample equals Algorithm R run row by row with the same draws, also where
    one batch fills the reservoir and its later rows draw slots of that same batch (a
    duplicate slot in one store would be written in an unspecified order)."""
    capacity, seed = 1000, 3
    recorder = RowRecorder(capacity=capacity, seed=seed)
    stream = torch.arange(sum(chunks), dtype=torch.float32)[:, None]
    for chunk in stream.split(list(chunks)):
        positions, slots = recorder.choose(chunk.shape[0])
        assert slots.unique().numel() == slots.numel()
        recorder.store(chunk[positions], slots)
    generator, reservoir, seen = torch.Generator().manual_seed(seed), list(range(capacity)), 0
    for size in chunks:  # the same draws: one per row past the reservoir's fill, batch by batch
        first = max(seen, capacity)
        draws = torch.rand(max(0, seen + size - first), generator=generator).tolist()
        for i, draw in zip(range(first, seen + size), draws, strict=True):
            slot = int(draw * (i + 1))
            if slot < capacity:
                reservoir[slot] = i
        seen += size
    assert recorder.rows()[:, 0].tolist() == reservoir


def test_recorder_memory_bound():
    model = nn.Sequential(nn.Conv2d(64, 8, 3))
    config = MaddConfig(max_rows=10_000, max_bytes_per_layer=64 * 576 * 4)
    prepare(model, config)
    with torch.no_grad():
        model(torch.randn(2, 64, 12, 12))
    recorder = model._maddnet_prepared.recorders["0"]
    assert recorder.capacity == 64 and recorder.rows().shape == (64, 576)


def test_conversion_errors():
    with pytest.raises(TypeError, match="BatchNorm2d"):
        prepare(small_cnn(), MaddConfig(layers=["1"]))
    with pytest.raises(ValueError, match="matches no convertible layer"):
        prepare(small_cnn(), MaddConfig(layers=["0", "nope*"]))
    with pytest.raises(ValueError, match="selects no layer"):
        prepare(nn.Sequential(nn.ReLU()), MaddConfig())
    with pytest.raises(RuntimeError, match="not prepared"):
        convert(small_cnn())
    model = prepare(small_cnn(), MaddConfig())
    with pytest.raises(RuntimeError, match="no calibration data recorded"):
        convert(model)
    with pytest.raises(RuntimeError, match="already prepared"):
        prepare(model, MaddConfig())
    with pytest.raises(ValueError, match="groups=1 only"):
        convert(small_cnn(), image_batches(count=2), MaddConfig(layers=["7"], min_rows=16))
    with pytest.raises(ValueError, match="fewer than"):
        convert(small_cnn(), image_batches(count=1, batch=2, size=4), MaddConfig(layers=["0"]))
    with pytest.raises(ValueError, match="ncodebooks must be an int in 1..D=27"):
        convert(small_cnn(), image_batches(count=2), MaddConfig(layers=["0"], ncodebooks=40, min_rows=16))
    with pytest.raises(ValueError, match="does not match"):
        rebuild(small_cnn(), {"0": {"kind": "linear", "config": {"in_features": 3, "out_features": 8}}})


def test_per_layer_codebooks():
    model = small_cnn()
    config = MaddConfig(layers=["0", "5"], ncodebooks={"5": 4}, min_rows=64)
    convert(model, image_batches(count=2), config)
    assert model[0].ncodebooks == 3 and model[5].ncodebooks == 4
    model = small_cnn()
    config = MaddConfig(layers=lambda name, m: name == "3", ncodebooks=lambda name, m: 24, min_rows=64)
    convert(model, image_batches(count=2), config)
    assert set(madd_layers(model)) == {"3"} and model[3].ncodebooks == 24


@pytest.fixture
def no_tf32():
    """Dense convs in TF32 (cuDNN's default) round differently from the CPU; a value moved
    across a threshold changes a code, so compare whole models in full float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_converted_model_on_cuda_matches_cpu(no_tf32):
    model = small_cnn()
    loader = image_batches(count=8, batch=16)  # 128 rows for the classifier
    convert(model, loader, MaddConfig(min_rows=128, max_rows=1500))
    model.eval()
    x = loader[0]
    with torch.no_grad():
        cpu_out = model(x)
        cuda_model = small_cnn()
        rebuild(cuda_model, conversion_plan(model))
        cuda_model.load_state_dict(model.state_dict())
        cuda_model = cuda_model.cuda().eval()
        cuda_out = cuda_model(x.cuda())
    assert cuda_out.device.type == "cuda"
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=1e-4, atol=1e-4)
    # a training step runs on the device and gives the CPU's gradients
    model.train()
    cuda_model.train()
    model(x).square().mean().backward()
    cuda_model(x.cuda()).square().mean().backward()
    pairs = zip(model.named_parameters(), cuda_model.named_parameters(), strict=True)
    for (name, p_cpu), (_, p_cuda) in pairs:
        assert p_cuda.grad.device.type == "cuda", name
        torch.testing.assert_close(p_cuda.grad.cpu(), p_cpu.grad, rtol=1e-3, atol=1e-4)


def test_default_codebook_rule_keeps_at_most_nine_inputs_per_codebook():
    from maddnet.nn import default_codebooks

    assert default_codebooks(nn.Conv2d(64, 64, 3)) == 64  # one per input channel, D/C = 9
    assert default_codebooks(nn.Conv2d(1, 64, (10, 4))) == 5  # D = 40: not a single codebook
    assert default_codebooks(nn.Conv2d(3, 64, 7)) == 17  # D = 147
    assert default_codebooks(nn.Conv2d(64, 128, 1)) == 8  # 1x1: D // 8
    assert default_codebooks(nn.Linear(100, 10)) == 12
