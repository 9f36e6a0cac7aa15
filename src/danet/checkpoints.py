"""Checkpoints: writing this project's format, and a model from any supported file (reading them:
checkpoint_formats.py; `danet convert`: convert.py).

Our format (a dict that `torch.load(weights_only=True)` reads):
    {"format": "danet", "version": 1, "model": state_dict,
     "meta": {"preset", "model_cfg", "classes", "palette", "mean", "std", "layout", ...}, "train_state": {...}}
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import safe_load
from .checkpoint_checks import dtype_kind
from .checkpoint_checks import verify_archive as verify_archive  # public here too: danet.checkpoints.verify_archive
from .checkpoint_formats import Checkpoint as Checkpoint  # the reading side, public here too
from .checkpoint_formats import file_key as file_key
from .checkpoint_formats import read_checkpoint as read_checkpoint
from .errors import DanetError, os_hint
from .files import discard, replace_target, temp_beside
from .models.danet import DANet, ModelConfig, unwrap
from .models.resnet import DEPTH_LAYERS

FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    preset=None,
    *,
    train_state: dict | None = None,
    extra_meta: dict | None = None,
) -> Path:
    """Write `model` (a DANet, possibly DDP- or torch.compile-wrapped) in our format, atomically.

    preset: a `Preset`, a preset name or None (classes/palette/mean/std then come from `extra_meta` or stay None).
    train_state: plain containers/tensors/numbers/strings only (e.g. optimizer.state_dict(), epoch, iteration).
    The file is written to a temporary name beside `path` and renamed into place; on failure the old file is left
    untouched and a DanetError is raised.
    """
    from .presets import MEAN, STD, get_preset

    net = unwrap(model)
    if isinstance(preset, str):
        preset = get_preset(preset)
    cfg: ModelConfig = net.cfg
    # NOTE: the preset's class names only for a model of its class count (a file's names are one per class)
    named = preset is not None and len(preset.classes) == cfg.num_classes
    meta: dict[str, Any] = {
        "preset": preset.name if preset is not None else None,
        "model_cfg": cfg.to_dict(),
        "classes": list(preset.classes) if named else None,
        "palette": [list(c) for c in preset.palette] if named else None,
        "mean": list(preset.mean if preset is not None else MEAN),
        "std": list(preset.std if preset is not None else STD),
        "layout": cfg.layout,
    }
    meta.update(extra_meta or {})
    obj: dict[str, Any] = {
        "format": "danet",
        "version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "meta": meta,
    }
    if train_state is not None:
        obj["train_state"] = train_state
    _check_plain(obj, "checkpoint")
    return atomic_torch_save(obj, path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to `<path>.tmp-<pid>` in the same folder, fsync, then os.replace; DanetError on failure."""
    path = replace_target(path, follow=False)
    if path.is_dir():  # NOTE: before anything is written beside it
        raise DanetError(f"could not write checkpoint {path}: it is a folder; give a file name")
    tmp = temp_beside(path, "tmp-")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # NOTE: torch's zip writer reports a write that failed midway (full disk, file size limit) as a RuntimeError
        # ("unexpected pos ..."), the OSError being its context; so too an interrupt (Ctrl-C, SIGTERM) midway,
        # which stays an interrupt (not a disk's error)
        cause = e.__context__
        for _ in range(8):  # NOTE: a bounded walk (a chain may loop)
            if cause is None or isinstance(cause, KeyboardInterrupt):
                break
            cause = cause.__context__
        if isinstance(cause, KeyboardInterrupt):
            discard(tmp)
            raise cause from None
        os_error = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        reason = (os_error.strerror or str(os_error)) if os_error else safe_load.first_line(e)
        discard(tmp)
        if path.parent.exists() and not path.parent.is_dir():
            hint = f"{path.parent} is a file, not a folder: give another path"
        else:
            hint = os_hint(os_error, "check free disk space and permissions") if os_error else None
            hint = hint or "check free disk space and permissions"
        raise DanetError(f"could not write checkpoint {path}: {reason}; {hint}") from e
    except BaseException:  # an interrupt midway (Ctrl-C, SIGTERM): the old file stands, no temporary is left
        discard(tmp)
        raise
    return path


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError for anything `torch.load(weights_only=True)` would refuse (a programming error)."""
    if obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a str/int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"{where}: {type(obj).__name__} cannot be stored (plain containers, tensors, numbers only)")


# ---------------------------------------------------------------------------------------------------------------
# structure from weights, and the whole model
# ---------------------------------------------------------------------------------------------------------------
def _blocks(sd: dict, stage: int) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"backbone\.layer{stage}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


# the weights `infer_config` reads the structure from (our key names): every DANet has them, whatever its layout
REQUIRED_KEYS = (
    "backbone.layer1.0.conv1.weight",
    "head.pam_in.conv.weight",
    "head.pam.query_project.weight",
    "head.cam_in.conv.weight",
    "head.cls.conv.weight",
)


def infer_config(sd: dict[str, torch.Tensor], path: str | Path = "checkpoint", source: str = "danet") -> dict:
    """The ModelConfig fields the weights decide (our key names): classes, depth, stem, widths, layout, aux.
    `source`: the file's format (`Checkpoint.source`), for messages that name a weight as the file spells it."""
    attention = any(k.startswith(("head.pam", "head.cam")) for k in sd)
    if "head.cls.conv.weight" not in sd and not attention:
        hint = "pass it as backbone_weights=" if any(k.startswith("backbone.layer1.") for k in sd) else "pass a DANet"
        raise DanetError(f"{path} holds no DANet head (no classifier weights); {hint}")
    if not attention:  # e.g. an mmseg FCN / PSPNet: a ResNet and a `decode_head.conv_seg`, but no attention modules
        raise DanetError(
            f"{path} is not a DANet checkpoint (no position-attention weights, e.g. head.pam_in.conv.weight / "
            "mmseg's decode_head.pam_in_conv); use a DANet checkpoint of sssegmentation, mmsegmentation or danet "
            "(its ResNet can still initialise a model: backbone_weights=)"
        )
    if missing := [k for k in REQUIRED_KEYS if k not in sd]:
        raise DanetError(
            f"{path} is an incomplete DANet checkpoint: required weight{'s' * (len(missing) > 1)} "
            f"{', '.join(file_key(k, source) for k in missing[:3])}{' ...' if len(missing) > 3 else ''} missing; "
            "download, convert or save it again"
        )
    blocks = tuple(_blocks(sd, i) for i in range(1, 5))
    depth = next((d for d, b in DEPTH_LAYERS.items() if b == blocks), None)
    if depth is None:
        raise DanetError(f"{path}: ResNet stages with {blocks} blocks match no supported depth {sorted(DEPTH_LAYERS)}")
    deep = "backbone.stem.0.weight" in sd
    stem_key = "backbone.stem.6.weight" if deep else "backbone.conv1.weight"
    if stem_key not in sd:
        raise DanetError(f"{path}: no ResNet stem weights ({file_key(stem_key, source)}); the file is incomplete")
    convs = (*REQUIRED_KEYS, stem_key, *(["aux.conv.conv.weight"] if "aux.conv.conv.weight" in sd else []))
    if flat := next((k for k in convs if sd[k].dim() != 4), None):
        raise DanetError(
            f"{path}: {file_key(flat, source)} has shape {tuple(sd[flat].shape)}, not a convolution's 4-d weight; "
            "the file is damaged"
        )
    fields = {
        "num_classes": sd["head.cls.conv.weight"].shape[0],
        "depth": depth,
        "stem": "deep" if deep else "single",
        "stem_channels": sd[stem_key].shape[0],
        "base_channels": sd["backbone.layer1.0.conv1.weight"].shape[0],
        "head_channels": sd["head.pam_in.conv.weight"].shape[0],
        "key_channels": sd["head.pam.query_project.weight"].shape[0],
        "pam_bias": "head.pam.query_project.bias" in sd,
        "aux": "aux.conv.conv.weight" in sd,
    }
    if fields["aux"]:
        fields["aux_channels"] = sd["aux.conv.conv.weight"].shape[0]
    return fields


def _preset_name(cfg: ModelConfig) -> str | None:
    from .presets import PRESETS

    for p in PRESETS.values():
        if p.model.replace(fused_attention=cfg.fused_attention, dropout=cfg.dropout) == cfg:
            return p.name
    return None


def _class_count_remedy(n: int, depth: int, remedy: str) -> str:
    """What to do about a checkpoint of `n` classes that a preset of another count was asked to load, in the words
    of the caller (`remedy`): "api" (create_model), "test" (danet test's PRESET), "data" (a dataset's own classes),
    "" (nothing to say), else the option that named the preset (--preset, preset_name=)."""
    from .presets import PRESETS

    fits = [p.name for p in PRESETS.values() if p.num_classes == n and p.model.depth == depth]
    such = f"a {n}-class preset such as {fits[0]}" if fits else None
    if remedy == "api":
        return f"; pass num_classes={n}" + (f", or name {such}" if such else "")
    if remedy == "test":
        if such:
            return f"; test it with {such}"
        return f"; no ResNet-{depth} preset has {n} classes: test it on data of its classes (--dataset folder)"
    if remedy == "data":
        return f"; test it on data of its {n} classes"
    if not remedy:
        return ""
    return f"; leave out {remedy} (the file decides the structure)" + (f", or name {such}" if such else "")


def dataset_for(num_classes: int, depth: int | None = None) -> str | None:
    """The one dataset with `num_classes` classes (and a preset of that depth), else None."""
    from .presets import PRESETS

    names = {
        p.dataset.name for p in PRESETS.values() if p.num_classes == num_classes and depth in (None, p.model.depth)
    }
    return names.pop() if len(names) == 1 else None


def load_model(
    path: str | Path | Checkpoint,
    cfg: ModelConfig | None = None,
    *,
    norm_layer=nn.BatchNorm2d,
    explicit_num_classes: int | None = None,
    remedy: str = "api",
) -> DANet:
    """Build a DANet whose structure the weights decide, load them strictly, return it in eval mode.

    Taken from the weights: class count, depth, stem, channel widths, layout (PAM bias, aux width), aux head.
    Taken from `cfg` (else from our file's meta, else defaults): output stride, dropout, fused attention.
    A class count or depth that contradicts `cfg` (a preset) or `explicit_num_classes` raises one DanetError; its
    advice is in the caller's words (`remedy`, see `_class_count_remedy`).
    """
    ck = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    name = ck.path.name
    found = infer_config(ck.state_dict, name, ck.source)
    n = found["num_classes"]
    if explicit_num_classes is not None and explicit_num_classes != n:
        raise DanetError(
            f"checkpoint {name} has {n} classes but num_classes={explicit_num_classes} was asked for; pass "
            f"num_classes={n}, or backbone_weights= to start a {explicit_num_classes}-class model from its backbone"
        )
    meta_cfg = ck.meta.get("model_cfg") if isinstance(ck.meta.get("model_cfg"), dict) else None
    told = ck.meta.get("toolbox_model", {}) if ck.source == "mmseg" else {}  # an mmseg file's config
    saved_os = (meta_cfg or told).get("output_stride")
    if cfg is not None:
        what = f"preset {p}" if (p := _preset_name(cfg)) else "the requested model"
        if cfg.num_classes != n:
            raise DanetError(
                f"checkpoint {name} has {n} classes but {what} has {cfg.num_classes}"
                + _class_count_remedy(n, found["depth"], remedy)
            )
        if cfg.depth != found["depth"]:
            raise DanetError(
                f"checkpoint {name} is a ResNet-{found['depth']} DANet but {what} is ResNet-{cfg.depth}; "
                f"pick a r{found['depth']} preset"
            )
        if saved_os not in (None, cfg.output_stride):
            warnings.warn(
                f"{name} was saved with output_stride={saved_os}; running it at output_stride={cfg.output_stride} "
                "as requested",
                stacklevel=2,
            )
        # NOTE: the final resize is the weights' (how they were trained), which a preset does not know: the file's
        corners = (meta_cfg or told).get("align_corners")
        base = cfg.replace(align_corners=corners) if isinstance(corners, bool) else cfg
    elif meta_cfg:  # what the weights decide (`found`) replaces the meta's values below; the rest is checked here
        known = set(ModelConfig.__dataclass_fields__)
        try:
            base = ModelConfig(**{**{k: v for k, v in meta_cfg.items() if k in known}, "num_classes": n})
        except DanetError as e:
            raise DanetError(
                f"{name}: its meta holds an invalid model_cfg ({e}); name a preset (--preset) to run it"
            ) from None
        if not isinstance(base.fused_attention, bool):
            raise DanetError(
                f"{name}: its meta holds an invalid model_cfg (fused_attention={base.fused_attention!r}); name a "
                "preset (--preset) to run it"
            )
    else:
        base = ModelConfig(num_classes=n, **told)
    model = DANet(base.replace(**found), norm_layer)
    _load_strict(model, ck.state_dict, name, source=ck.source)
    return model.eval()


def _load_strict(
    module: nn.Module, sd: dict[str, torch.Tensor], name: str, what: str = "model", source: str = "danet"
) -> None:
    own = module.state_dict()

    def key(k: str) -> str:  # as the file spells it
        return file_key(k, source)

    missing = [key(k) for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [key(k) for k in sd if k not in own]
    shapes = [
        f"{key(k)} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
    if problems:
        raise DanetError(f"{name} does not fit the {what}: {'; '.join(problems)}")
    # NOTE: load_state_dict would cast a bool / complex / int weight silently (the weights of a damaged file)
    if k := next((k for k, v in own.items() if k in sd and dtype_kind(sd[k]) != dtype_kind(v)), None):
        raise DanetError(
            f"{name}: {key(k)} is a {sd[k].dtype} tensor where the {what} has {own[k].dtype}; the file is damaged: "
            "download or save it again"
        )
    # NOTE: NaN/inf weights (a diverged run, a damaged file) would evaluate silently; training never saves them
    if bad := [k for k in own if k in sd and sd[k].is_floating_point() and not torch.isfinite(sd[k]).all()]:
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise DanetError(
            f"{name} holds non-finite weights (NaN or inf) in {key(bad[0])}{more}; use a checkpoint saved before "
            "training diverged, or download / save it again"
        )
    # NOTE: a negative running variance makes the batch norm's sqrt NaN (every logit of the image NaN)
    if bad := [k for k in own if k.endswith("running_var") and k in sd and bool((sd[k] < 0).any())]:
        raise DanetError(
            f"{name} holds a negative batch-norm variance in {key(bad[0])}; the file is damaged: download or save it "
            "again"
        )
    module.load_state_dict(sd, strict=False)  # strict by the checks above (num_batches_tracked may be absent)


def load_backbone(model: DANet, path: str | Path) -> DANet:
    """Load ImageNet ResNet weights (mmseg `resnet*_v1c`, torchvision) or the backbone of any DANet checkpoint."""
    ck = read_checkpoint(path)
    name = ck.path.name
    sd = {k[len("backbone.") :]: v for k, v in ck.state_dict.items() if k.startswith("backbone.")}
    file_stem = "deep" if "stem.0.weight" in sd else "single" if "conv1.weight" in sd else None
    if file_stem != model.backbone.stem_type:
        if file_stem == "single":
            raise DanetError(
                f"{name} has a single 7x7 stem (torchvision ResNet) but the model has the deep 3x3 stem; "
                'build the model with stem="single" to use it'
            )
        raise DanetError(f"{name} has a {file_stem or 'missing'} stem but the model's is {model.backbone.stem_type}; "
                         f'build the model with stem="{file_stem or "deep"}"')  # fmt: skip
    _load_strict(model.backbone, sd, name, "backbone")
    return model
