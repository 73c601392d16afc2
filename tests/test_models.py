"""Model registry: shapes, sizes, errors, loading weights from local files."""

from __future__ import annotations

import pytest
import torch

from maddnet.models import create_model, list_models, load_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("name", "kwargs", "input_shape", "num_classes"),
    [
        ("resnet9", {"width": 8}, (2, 1, 28, 28), 10),
        ("resnet9", {"width": 8}, (2, 3, 32, 32), 100),
        ("resnet18", {"small_input": True}, (2, 1, 28, 28), 10),
        ("resnet18", {}, (1, 3, 64, 64), 7),
        ("resnet50", {"small_input": True}, (1, 3, 32, 32), 10),
        ("resnet50", {"small_input": True, "stem_stride": 2}, (2, 1, 28, 28), 10),
        ("levit_tiny", {"img_size": 28, "small_input": True}, (2, 1, 28, 28), 10),
        ("levit_128s", {"img_size": 32, "small_input": True}, (2, 3, 32, 32), 10),
        ("levit_128s", {"img_size": 64}, (1, 3, 64, 64), 5),
        ("ds_cnn_s", {}, (2, 1, 49, 10), 12),
        ("ds_cnn_m", {}, (2, 1, 49, 10), 12),
        ("ds_cnn_l", {}, (2, 1, 49, 40), 35),
    ],
)
def test_output_shape(name, kwargs, input_shape, num_classes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_chans=input_shape[1], **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(input_shape))
    assert out.shape == (input_shape[0], num_classes)
    assert torch.isfinite(out).all()


def test_stem_stride_halves_the_stage_resolution():
    model = create_model("resnet50", 10, 1, small_input=True, stem_stride=2).eval()
    shapes = {}
    hooks = [
        getattr(model, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape))
        for n in ("layer1", "layer4")
    ]
    with torch.no_grad():
        model(torch.randn(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    assert shapes["layer1"][-2:] == (14, 14)
    assert shapes["layer4"][-2:] == (2, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"small_input": True, "stem_stride": 3}, "1 or 2"),
        ({"small_input": True, "stem_stride": True}, "1 or 2"),
        ({"small_input": True, "stem_stride": 2.0}, "1 or 2"),
        ({"stem_stride": 2}, "small_input=True"),
    ],
)
def test_stem_stride_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("resnet18", 10, 3, **kwargs)


def test_known_parameter_counts():
    # torchvision's published sizes: resnet18 11 689 512, resnet50 25 557 032 (1000 classes)
    assert sum(p.numel() for p in create_model("resnet18", 1000, 3).parameters()) == 11_689_512
    assert sum(p.numel() for p in create_model("resnet50", 1000, 3).parameters()) == 25_557_032
    # ResNet-9 at width 64 (the DAWNBench net): 6.57 M parameters for 10 classes
    n9 = sum(p.numel() for p in create_model("resnet9", 10, 3, width=64).parameters())
    assert n9 == 6_573_120
    # parameters grow with the square of the width
    n9_half = sum(p.numel() for p in create_model("resnet9", 10, 3, width=32).parameters())
    assert 3.9 < n9 / n9_half < 4.1


def test_registry_lists_all_families():
    names = list_models()
    for expected in (
        "resnet9",
        "resnet18",
        "resnet50",
        "levit_128s",
        "levit_tiny",
        "ds_cnn_s",
        "ds_cnn_m",
        "ds_cnn_l",
    ):
        assert expected in names


def test_unknown_model_lists_known_ones():
    with pytest.raises(KeyError, match="resnet9"):
        create_model("resnet1000")


def test_torchvision_state_dict_loads_as_is(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet18", 1000, 3)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)  # what torchvision's weight files hold
    target = create_model("resnet18", 1000, 3, checkpoint=path)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(source.eval()(x), target.eval()(x))


def test_timm_levit_state_dict_loads_as_is(tmp_path):
    source = create_model("levit_128s", 1000, 3, img_size=224)
    path = tmp_path / "levit.pth"
    torch.save(source.state_dict(), path)
    target = create_model("levit_128s", 1000, 3, img_size=224, checkpoint=path)
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key])


def test_maddnet_checkpoint_and_ddp_prefix_load(tmp_path):
    source = create_model("resnet9", 10, 1, width=8)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "step": 3}, path)
    target = create_model("resnet9", 10, 1, width=8, checkpoint=path)
    assert torch.equal(target.fc.weight, source.fc.weight)


def test_new_head_with_strict_false(tmp_path):
    source = create_model("resnet18", 1000, 3)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(ValueError, match="fc.weight"):
        create_model("resnet18", 10, 3, checkpoint=path)
    with pytest.warns(UserWarning, match="fc.weight"):
        target = create_model("resnet18", 10, 3, checkpoint=path, strict=False)
    assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert target.fc.weight.shape == (10, 512)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(create_model("ds_cnn_s"), tmp_path / "nope.pt")
