"""DANet's dual-attention head and the auxiliary FCN head."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import ChannelAttention, PositionAttention
from .fused_norm import bn_relu

NormLayer = Callable[[int], nn.Module]


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias) + norm + ReLU. Keys: `conv`, `bn`."""

    def __init__(self, cin: int, cout: int, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = norm_layer(cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bn_relu(self.bn, self.conv(x), self.act)


class Classifier(nn.Sequential):
    """Dropout2d + 1x1 conv with bias to the class logits. Keys: `conv`."""

    def __init__(self, cin: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(cin, num_classes, 1)


class DAHead(nn.Module):
    """Dual attention head: a PAM branch and a CAM branch, each conv -> attention -> conv, and three classifiers.

    Args:
        in_channels: channels of the backbone's last stage (2048 for ResNet-50/101).
        channels: width of both branches (512).
        num_classes: K.
        key_channels: PAM query/key width (64).
        pam_bias: bias on the PAM projections (mmseg layout) or not (sssegmentation layout).
        fused_attention: fused (SDPA) position attention.

    Forward: `(B, in_channels, h, w)` -> dict of `(B, K, h, w)` logits: "out" (classifier on the sum of the two
    branches), "pam", "cam".
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        key_channels: int = 64,
        dropout: float = 0.1,
        pam_bias: bool = False,
        fused_attention: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.pam_in = ConvBNReLU(in_channels, channels, norm_layer)
        self.pam = PositionAttention(channels, key_channels, bias=pam_bias, fused=fused_attention)
        self.pam_out = ConvBNReLU(channels, channels, norm_layer)
        self.cam_in = ConvBNReLU(in_channels, channels, norm_layer)
        self.cam = ChannelAttention()
        self.cam_out = ConvBNReLU(channels, channels, norm_layer)
        self.cls = Classifier(channels, num_classes, dropout)
        self.cls_pam = Classifier(channels, num_classes, dropout)
        self.cls_cam = Classifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor, branches: bool = True) -> dict[str, torch.Tensor]:
        pam = self.pam_out(self.pam(self.pam_in(x)))
        cam = self.cam_out(self.cam(self.cam_in(x)))
        out = {"out": self.cls(pam + cam)}
        if branches:
            out["pam"] = self.cls_pam(pam)
            out["cam"] = self.cls_cam(cam)
        return out


class FCNHead(nn.Module):
    """Auxiliary head on stage 3: 3x3 conv + norm + ReLU + Dropout2d + 1x1 conv.

    Forward: `(B, in_channels, h, w)` -> `(B, K, h, w)`.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, norm_layer)
        self.cls = Classifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.conv(x))
