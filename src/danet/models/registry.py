"""Presets -> models: `create_model` and `list_models`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import DanetError
from ..presets import get_preset, list_presets
from .danet import WEIGHTS_DECIDE, DANet, ModelConfig


def list_models() -> list[str]:
    """Names of all presets (the 12 zoo rows and the CPU-sized synthetic preset)."""
    return list_presets()


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    backbone_weights: str | Path | None = None,
    norm_layer: type[nn.Module] = nn.BatchNorm2d,
    **overrides,
) -> DANet:
    """Build a preset's DANet, optionally with weights.

    Args:
        name: a preset name (see `list_models()`) or its sssegmentation config name.
        num_classes: override the preset's class count (e.g. for your own dataset).
        checkpoint: a whole-model checkpoint: this project's format, an sssegmentation trainer file or an
            mmsegmentation 0.x/1.x file (auto-detected). A file of the mmseg layout selects that layout
            (PAM projection bias, 256-wide auxiliary head).
        backbone_weights: ImageNet ResNet weights (mmseg `resnet*_v1c` deep stem, or torchvision's single stem,
            which needs `stem="single"`).
        overrides: any `ModelConfig` field, e.g. `output_stride=16`, `fused_attention=False`; with a checkpoint, one
            its weights decide (`WEIGHTS_DECIDE`: depth, stem, widths, layout, aux head) must agree with them.

    Raises DanetError for unknown names, unreadable files and weights that do not fit.
    """
    preset = get_preset(name)
    cfg = preset.model
    if num_classes is not None:
        cfg = cfg.replace(num_classes=num_classes)
    if overrides:
        try:
            cfg = cfg.replace(**overrides)
        except TypeError as e:
            raise DanetError(f"unknown model option: {e}; valid: {', '.join(ModelConfig.__dataclass_fields__)}") from e
    if isinstance(backbone_weights, str) and backbone_weights.lower() in ("none", ""):  # as --set backbone_weights=none
        backbone_weights = None
    if isinstance(backbone_weights, str) and backbone_weights.lower() == "imagenet":
        where = f" ({preset.backbone_url})" if preset.backbone_url else ""
        raise DanetError(
            f"backbone_weights='imagenet' is danet train's download of the preset's ImageNet weights{where}; "
            "create_model takes the file: pass its path"
        )
    if not isinstance(norm_layer, type) or not issubclass(norm_layer, nn.Module):
        raise DanetError(f"norm_layer must be a module class such as nn.BatchNorm2d, got {norm_layer!r:.60}")
    if checkpoint is None and backbone_weights is None:
        return DANet(cfg, norm_layer)

    from .. import checkpoints  # lazy: models stay importable without the checkpoint readers

    if checkpoint is not None:
        ck = checkpoints.read_checkpoint(checkpoint)
        if "output_stride" not in overrides:
            cfg = ck.run_structure(preset.name, cfg)
        model = checkpoints.load_model(ck, cfg, norm_layer=norm_layer, explicit_num_classes=num_classes)
        for key in WEIGHTS_DECIDE:  # NOTE: asked for explicitly, so not dropped in silence
            if key in overrides and getattr(model.cfg, key) != overrides[key]:
                raise DanetError(
                    f"checkpoint {ck.path.name} has {key}={getattr(model.cfg, key)!r}, but {key}={overrides[key]!r} "
                    f"was asked for; leave {key} out (the weights decide it)"
                )
        return model
    model = DANet(cfg, norm_layer)
    checkpoints.load_backbone(model, backbone_weights)
    return model


def add_cli(parser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="also show dataset, classes and mIoU")


def run_cli(args) -> int:
    from ..presets import get_preset

    for name in list_models():
        p = get_preset(name)
        if args.verbose:
            miou = f"{p.published_miou:.2f}" if p.published_miou else "-"
            print(f"{name:28s} {p.alias or '-':32s} {p.dataset.name:11s} K={p.num_classes:<4d} mIoU={miou}")
        else:
            print(name)
    return 0
