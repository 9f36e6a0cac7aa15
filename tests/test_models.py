"""DANet model: structure matches the reference toolboxes, shapes, strides/dilations, attention, registry."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import danet
from danet.models.attention import PositionAttention, attend, attend_explicit
from danet.models.danet import LAYOUTS, DANet, ModelConfig
from danet.models.resnet import ResNet

# a narrow DANet-R50 that runs in milliseconds
TINY = ModelConfig(num_classes=5, depth=50, base_channels=4, stem_channels=8, head_channels=32, key_channels=16,
                   aux_channels=16)  # fmt: skip


def count(model: torch.nn.Module) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters()), len(model.state_dict())


@pytest.mark.parametrize(
    ("layout", "params", "entries"),
    [("ssseg", 52_479_418, 373), ("mmseg", 50_081_850, 376)],
)
def test_param_counts_equal_toolboxes(layout, params, entries):
    cfg = danet.get_preset("danet_r50-d8_ade20k").model.replace(**LAYOUTS[layout])
    with torch.device("meta"):  # no memory for the weights
        model = DANet(cfg)
    assert cfg.layout == layout
    assert count(model) == (params, entries)


@pytest.mark.parametrize("name", danet.list_models())
def test_every_preset_builds(name):
    preset = danet.get_preset(name)
    with torch.device("meta"):
        model = danet.create_model(name)
    assert isinstance(model, DANet)
    assert model.num_classes == preset.num_classes == len(preset.classes)
    assert model.head.cls.conv.out_channels == preset.num_classes
    assert model.backbone.out_channels[3] == model.head.pam_in.conv.in_channels
    if preset.alias:  # the 12 zoo rows: ssseg layout, depth and stride from the name
        assert f"r{preset.model.depth}-d{preset.model.output_stride}" in name
        assert model.cfg.layout == "ssseg"
        assert danet.get_preset(preset.alias) is preset


def test_unknown_name_lists_valid_names():
    with pytest.raises(danet.DanetError) as e:
        danet.create_model("danet_r50-d8_ade")
    msg = str(e.value)
    assert "danet_r50-d8_ade20k" in msg and "danet_r101-d16_cityscapes" in msg and "\n" not in msg


def test_unknown_override_is_a_user_error():
    with pytest.raises(danet.DanetError, match="unknown model option"):
        danet.create_model("danet_tiny_synthetic", widht=3)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(97, 131), (33, 50)])
def test_output_shapes_any_size(output_stride, size):
    torch.manual_seed(0)
    model = DANet(TINY.replace(output_stride=output_stride))
    x = torch.randn(2, 3, *size)
    model.eval()
    with torch.no_grad():
        out = model(x)
        low = model(x, resize=False)
    assert set(out) == {"out"} and out["out"].shape == (2, 5, *size)
    s = output_stride
    assert low["out"].shape == (2, 5, -(-size[0] // s), -(-size[1] // s))
    model.train()
    out = model(x)
    assert set(out) == {"out", "pam", "cam", "aux"}
    assert all(v.shape == (2, 5, *size) for v in out.values())  # batch 2: train-mode BN needs > 1 value
    sum(v.float().mean() for v in out.values()).backward()
    assert model.head.pam.gamma.grad is not None and model.aux.cls.conv.weight.grad is not None


@pytest.mark.parametrize(
    ("output_stride", "strides", "dilations"),
    [
        # per stage: conv2 stride of the first block; conv2 dilation of every block (ResNet-50: 3/4/6/3)
        (8, (1, 2, 1, 1), ([1] * 3, [1] * 4, [1, 2, 2, 2, 2, 2], [2, 4, 4])),
        (16, (1, 2, 2, 1), ([1] * 3, [1] * 4, [1] * 6, [1, 2, 2])),
    ],
)
def test_strides_and_contract_dilation(output_stride, strides, dilations):
    net = ResNet(50, output_stride, base_channels=4, stem_channels=8)
    for i in range(4):
        layer = getattr(net, f"layer{i + 1}")
        assert layer[0].conv2.stride == (strides[i],) * 2
        assert all(b.conv2.stride == (1, 1) for b in layer[1:])
        assert [b.conv2.dilation[0] for b in layer] == dilations[i]
        assert all(b.conv2.padding == b.conv2.dilation for b in layer)
    feats = net(torch.randn(1, 3, 64, 96))
    low = (64 // output_stride, 96 // output_stride)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), low, low]
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128]


@pytest.mark.parametrize(("channels", "key"), [(64, 16), (48, 32)])  # value split into heads / one wide head
def test_fused_pam_equals_explicit(channels, key):
    torch.manual_seed(0)
    pam = PositionAttention(channels, key, bias=True).eval()
    with torch.no_grad():
        pam.gamma.fill_(0.7)
        for conv in (pam.query_project, pam.key_project):
            conv.weight.mul_(3.0)  # peaky attention: not close to uniform
    x = torch.randn(2, channels, 13, 11)
    with torch.no_grad():
        pam.fused = True
        fused = pam(x)
        pam.fused = False
        explicit = pam(x)
        q, k, v = (torch.randn(2, 143, d, dtype=torch.float64) for d in (key, key, channels))
        exact = attend_explicit(q, k, v)
        assert (attend(q, k, v) - exact).norm() / exact.norm() < 1e-12
        pam.fused = True
        if channels % key == 0:  # value split into key-wide heads: the flash kernel must accept the inputs
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if they forced the N x N math fallback
                assert torch.equal(pam(x), fused)
    err = ((fused - explicit).norm() / explicit.norm()).item()
    assert err < 1e-5
    assert (explicit - x).abs().max() > 0.1  # the attention term is not negligible
