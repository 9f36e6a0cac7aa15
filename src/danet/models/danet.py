"""DANet = dilated ResNet backbone + dual attention head + auxiliary FCN head."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DanetError
from . import triton_resize
from .folded import TRAIN_REFUSED
from .heads import DAHead, FCNHead
from .resnet import ResNet

ATTENTIONS = ("fused", "explicit", "triton")  # the position attention's paths (DANet.set_attention)


def upsample_logits(
    x: torch.Tensor, size: tuple[int, int], align_corners: bool = False, nchw: bool | None = None
) -> torch.Tensor:
    """`F.interpolate(x, size, mode="bilinear")` of `(B, K, h, w)` logits. On CUDA a channels_last `x` (what a
    channels_last model's classifier gives) goes through PyTorch's NCHW kernel instead of its NHWC one: both evaluate
    the same expression in the same precision (aten/src/ATen/native/cuda/UpSampleBilinear2d.cu), so the values are
    the same, but the NHWC kernel, one thread per output element with three integer divisions each, took 0.36 ms of a
    1.8 ms 512x512 forward on an H200 (150 classes; the same for 19 classes at 1024x2048; benchmarks/RESULTS.md);
    the NCHW kernel (one thread per output pixel, looping over the classes) should take well under 0.1 ms. The copy
    to NCHW reads the small 1/8-size logits once. The result is NCHW. `nchw`: take that path or not (None: on CUDA
    without gradients, i.e. in inference; training keeps the layout its backward was measured with). With
    `triton_resize.ENABLED`, an inference resize (not with nchw=False) runs its Triton kernel instead."""
    if triton_resize.ENABLED and nchw is not False and triton_resize.runs(x):  # (inference on CUDA; NCHW result)
        return triton_resize.resize_bilinear(x, size, align_corners)
    if nchw is None:
        nchw = x.is_cuda and not torch.is_grad_enabled()
    if nchw and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides a DANet's structure (and so its state-dict keys and shapes).

    The two reference toolboxes differ in two places: `pam_bias` (mmseg True, sssegmentation False) and
    `aux_channels` (mmseg 256, sssegmentation 512). `layout` names the pair.
    """

    num_classes: int
    depth: int = 50
    output_stride: int = 8
    stem: str = "deep"  # "deep" (ResNetV1c) or "single" (torchvision's 7x7 stem)
    base_channels: int = 64
    stem_channels: int = 64
    head_channels: int = 512
    key_channels: int = 64
    aux_channels: int = 512
    pam_bias: bool = False
    dropout: float = 0.1
    aux: bool = True
    fused_attention: bool = True
    # the final bilinear resize of the logits: False in every sssegmentation config and in mmseg's, except mmseg's
    # Cityscapes 769x769 ones (True); read from an mmseg file's config (checkpoints.read_checkpoint)
    align_corners: bool = False

    def __post_init__(self) -> None:
        """One-line DanetError for a value no DANet can be built with (create_model(..., depth=34), a bad meta)."""
        from .resnet import DEPTH_LAYERS, STRIDE_PLANS

        for f in dataclasses.fields(self):  # NOTE: NumPy's scalars (np.int64(5), np.float32(0.1)) as Python's
            v = getattr(self, f.name)
            if type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0:  # a NumPy scalar, not an array
                plain = v.item()
                if type(plain) in (bool, int, float) and plain == v:
                    object.__setattr__(self, f.name, plain)

        def positive(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        widths = ("num_classes", "base_channels", "stem_channels", "head_channels", "key_channels", "aux_channels")
        if bad := next((k for k in widths if not positive(getattr(self, k))), None):
            raise DanetError(f"{bad} must be a positive integer, got {getattr(self, bad)!r}")
        for key, allowed in (("depth", sorted(DEPTH_LAYERS)), ("output_stride", sorted(STRIDE_PLANS)),
                             ("stem", ["deep", "single"])):  # fmt: skip
            if getattr(self, key) not in allowed:
                raise DanetError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise DanetError(f"dropout must be in [0, 1), got {self.dropout!r}")
        switches = ("pam_bias", "aux", "fused_attention", "align_corners")
        if bad := next((k for k in switches if not isinstance(getattr(self, k), bool)), None):
            raise DanetError(f"{bad} must be True or False, got {getattr(self, bad)!r}")  # "false" is a true string

    @property
    def layout(self) -> str:
        if self.pam_bias and self.aux_channels == 256:
            return "mmseg"
        if not self.pam_bias and self.aux_channels == 512:
            return "ssseg"
        return "custom"

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def check_norm_values(self, batch: int, size: tuple[int, int], what: str, remedy: str) -> None:
        """DanetError unless batch norm can train on `batch` images of `size` (H, W) (`what`: e.g. "per process"):
        the coarsest features (1/output_stride, every stride-2 layer rounding up) must give each channel at least 2
        values; `remedy`: what to change."""
        s = self.output_stride
        if batch * math.ceil(size[0] / s) * math.ceil(size[1] / s) < 2:
            raise DanetError(
                f"{batch} image(s) of {size[0]}x{size[1]}{what} leave one value per channel at the network's 1/{s} "
                f"features, which batch norm cannot train on; {remedy}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


# the ModelConfig fields a checkpoint's weights decide (checkpoints.load_model takes them from the weights): an
# option that contradicts them is an error (create_model, a run's init_checkpoint)
WEIGHTS_DECIDE = ("num_classes", "depth", "stem", "base_channels", "stem_channels", "head_channels", "key_channels",
                  "aux_channels", "pam_bias", "aux")  # fmt: skip


# layout name -> the fields that differ between the toolboxes
LAYOUTS: dict[str, dict] = {
    "ssseg": {"pam_bias": False, "aux_channels": 512},
    "mmseg": {"pam_bias": True, "aux_channels": 256},
}


class DANet(nn.Module):
    """Dual Attention Network (Fu et al., CVPR 2019).

    Forward: normalised RGB `(N, 3, H, W)` (any H, W) -> dict of logits. Eval mode: {"out": `(N, K, H, W)`}.
    Train mode adds "pam", "cam" (the branch classifiers) and "aux" (FCN head on stage 3). With `resize=True`
    (default) every output is resized bilinearly (`cfg.align_corners`, False but for mmseg's 769x769 configs) to
    H x W, as both toolboxes do; with `resize=False` they stay at 1/output_stride.
    """

    def __init__(self, cfg: ModelConfig, norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet(cfg.depth, cfg.output_stride, cfg.stem, cfg.base_channels, cfg.stem_channels, norm_layer)
        c3, c4 = self.backbone.out_channels[2], self.backbone.out_channels[3]
        self.head = DAHead(
            c4,
            cfg.head_channels,
            cfg.num_classes,
            cfg.key_channels,
            cfg.dropout,
            cfg.pam_bias,
            cfg.fused_attention,
            norm_layer,
        )
        self.aux = FCNHead(c3, cfg.aux_channels, cfg.num_classes, cfg.dropout, norm_layer) if cfg.aux else None

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def train(self, mode: bool = True):
        if mode and any(getattr(m, "folded", False) for m in self.modules()):  # NOTE: before any module's flag moves
            raise DanetError(TRAIN_REFUSED)
        return super().train(mode)

    def set_fused_attention(self, fused: bool) -> None:
        """Switch the position attention between fused (SDPA) and explicit softmax(QK^T)V."""
        self.head.pam.fused = fused

    def set_attention(self, attention: str) -> None:
        """The position attention's path: "fused" (SDPA, the default), "explicit" (the N x N matrix, as the
        toolboxes), or "triton" (one Triton kernel in inference on CUDA in bf16 / fp16, else as fused)."""
        if attention not in ATTENTIONS:
            raise DanetError(f"unknown attention {attention!r}; use {', '.join(ATTENTIONS)}")
        self.head.pam.fused = attention != "explicit"
        self.head.pam.triton = attention == "triton"

    def forward(self, x: torch.Tensor, resize: bool = True) -> dict[str, torch.Tensor]:
        _, _, c3, c4 = self.backbone(x)
        out = self.head(c4, branches=self.training)
        if self.training and self.aux is not None:
            out["aux"] = self.aux(c3)
        if resize:
            size = x.shape[-2:]
            corners = self.cfg.align_corners
            out = {k: upsample_logits(v, size, corners) for k, v in out.items()}
        return out


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
