"""DANet's dual-attention head and the auxiliary FCN head."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import ChannelAttention, PositionAttention
from .fused_norm import bn_relu

NormLayer = Callable[[int], nn.Module]
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}  # per process, not per module: a model stays deep-copyable
# branch_streams="auto": side by side where the head's map has at most this many positions (batch x h x w), one after
# the other above. On an H200 (bf16, CUDA graphs, folded batch norm, 2026-11-27): a 512x512 image (64x64 = 4,096)
# took 1.14-1.15 ms with the streams, 1.20 without; a whole 1024x2048 image (128x256 = 32,768), whose kernels fill the
# GPU, gained nothing from them (8.13 with, 7.94 without in one run; within 0.1 ms either way in four later rounds)
STREAMS_MAX_POSITIONS = 16384


def _on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return side


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
        # inference on CUDA: the CAM branch on a second stream beside the PAM branch (True; "auto": for small maps,
        # STREAMS_MAX_POSITIONS; not under torch.compile; a CUDA graph keeps the setting it was captured with)
        self.branch_streams: bool | str = "auto"

    def _cam_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_out(self.cam(self.cam_in(x)))

    def _cam_beside(self, x: torch.Tensor) -> torch.Tensor | None:
        """In an inference forward on CUDA (no gradients, eval mode, not traced), with `branch_streams` (True, or
        "auto", the default, on a map of at most STREAMS_MAX_POSITIONS): start the CAM branch on a side stream and
        return its output, which the caller's stream must wait for (`_join`); None otherwise. The branches are
        independent: the same kernels on the same inputs give the same values (bit for bit on an H200, eager and
        replayed as a CUDA graph), but at batch 1 and 64x64 positions each of their kernels leaves most of the GPU
        idle, and side by side they share it: a 512x512 forward replayed as a CUDA graph took 1.83 ms instead of 1.95
        (benchmarks/RESULTS.md); a whole 1024x2048 image, whose kernels fill the GPU, gained nothing."""
        if not (self.branch_streams and _on_cuda(x) and not self.training and not torch.is_grad_enabled()):
            return None
        if self.branch_streams == "auto" and x.shape[0] * x.shape[2] * x.shape[3] > STREAMS_MAX_POSITIONS:
            return None
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
            return None
        side = _side_stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        x.record_stream(side)  # NOTE: x's memory stays x's until the side stream is done, even if a branch raises
        with torch.cuda.stream(side):
            return self._cam_branch(x)

    def _join(self, cam: torch.Tensor) -> None:
        main = torch.cuda.current_stream(cam.device)
        main.wait_stream(_side_stream(cam.device))
        cam.record_stream(main)  # NOTE: allocated on the side stream, freed after use on this one

    def forward(self, x: torch.Tensor, branches: bool = True) -> dict[str, torch.Tensor]:
        cam = self._cam_beside(x)
        try:
            pam = self.pam_out(self.pam(self.pam_in(x)))
        finally:  # NOTE: also when the PAM branch raises (out of memory, caught by a caller who retries)
            if cam is not None:
                self._join(cam)
        if cam is None:
            cam = self._cam_branch(x)
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
