"""ResNetV1c (deep 3x3 stem) and ResNetV1b (single 7x7 stem) with output stride 8, 16 or 32.

Key names follow torchvision / mmseg (`stem.*` or `conv1`/`bn1`, `layer1`..`layer4`) so ImageNet weights load
without renaming.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import triton_pool
from .fused_norm import bn_relu

NormLayer = Callable[[int], nn.Module]

# blocks per stage for the supported depths (all bottleneck, expansion 4)
DEPTH_LAYERS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

# output stride -> (strides, dilations) of the four stages
STRIDE_PLANS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels), residual. Input/output `(B, C, H, W)`."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        # NOTE: stride and dilation sit on the 3x3 conv ("pytorch" style), padding = dilation keeps the size.
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = norm_layer(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = bn_relu(self.bn1, self.conv1(x), self.relu)
        y = bn_relu(self.bn2, self.conv2(y), self.relu)
        if getattr(self.bn3, "folded", False):  # models/folded.py: conv3 + bias + residual + ReLU in one call
            return self.conv3(y, residual=identity)
        return bn_relu(self.bn3, self.conv3(y), self.relu, residual=identity)


class Stem(nn.Sequential):
    """The deep stem: (3x3 conv, norm, ReLU) x 3, keys `stem.0` .. `stem.8`; norm + ReLU through `bn_relu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(0, len(self), 3):
            x = bn_relu(self[i + 1], self[i](x), self[i + 2])
        return x


class ResNet(nn.Module):
    """Dilated ResNet backbone returning the four stage outputs.

    Args:
        depth: 26, 50, 101 or 152 (bottleneck blocks).
        output_stride: 8, 16 or 32; the first block of a dilated stage uses half the stage's dilation
            ("contract dilation"), so OS8 layer4 runs at dilations 2, 4, 4.
        stem: "deep" (V1c: three 3x3 convs 3->s/2->s/2->s) or "single" (V1b / torchvision: one 7x7 conv).
        base_channels: width of layer1's bottleneck (64 in the published nets; narrow variants for tests).
        stem_channels: output channels of the stem (64 in the published nets).
        norm_layer: normalisation layer type, e.g. `nn.BatchNorm2d` or `nn.SyncBatchNorm`.

    Forward: `(B, 3, H, W)` -> tuple of four `(B, C_i, H_i, W_i)`, C_i = 4 * base * 2^i.
    """

    def __init__(
        self,
        depth: int = 50,
        output_stride: int = 8,
        stem: str = "deep",
        base_channels: int = 64,
        stem_channels: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if depth not in DEPTH_LAYERS:
            raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(DEPTH_LAYERS)}")
        if output_stride not in STRIDE_PLANS:
            raise ValueError(f"unsupported output_stride {output_stride}; choose one of {sorted(STRIDE_PLANS)}")
        if stem not in ("deep", "single"):
            raise ValueError(f"unsupported stem {stem!r}; choose 'deep' or 'single'")
        self.stem_type = stem
        if stem == "deep":
            half = stem_channels // 2
            self.stem = Stem(
                nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False),
                norm_layer(half),
                nn.ReLU(inplace=True),
                nn.Conv2d(half, half, 3, padding=1, bias=False),
                norm_layer(half),
                nn.ReLU(inplace=True),
                nn.Conv2d(half, stem_channels, 3, padding=1, bias=False),
                norm_layer(stem_channels),
                nn.ReLU(inplace=True),
            )
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
            self.bn1 = norm_layer(stem_channels)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        strides, dilations = STRIDE_PLANS[output_stride]
        inplanes = stem_channels
        self.out_channels: list[int] = []
        for i, (blocks, stride, dilation) in enumerate(zip(DEPTH_LAYERS[depth], strides, dilations, strict=True)):
            planes = base_channels * 2**i
            layer = self._make_layer(inplanes, planes, blocks, stride, dilation, norm_layer)
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes * Bottleneck.expansion
            self.out_channels.append(inplanes)

    @staticmethod
    def _make_layer(
        inplanes: int, planes: int, blocks: int, stride: int, dilation: int, norm_layer: NormLayer
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                norm_layer(planes * Bottleneck.expansion),
            )
        first_dilation = dilation // 2 if dilation > 1 else 1  # NOTE: "contract dilation" of both toolboxes
        layers = [Bottleneck(inplanes, planes, stride, first_dilation, downsample, norm_layer)]
        inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(inplanes, planes, 1, dilation, None, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stem(x) if self.stem_type == "deep" else bn_relu(self.bn1, self.conv1(x), self.relu)
        x = triton_pool.max_pool(self.maxpool, x) if triton_pool.ENABLED else self.maxpool(x)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4
