"""Reading any supported checkpoint: this project's format, sssegmentation / mmsegmentation / ImageNet files, their
weight names converted to ours (`read_checkpoint` -> `Checkpoint`).

Nothing from a file is ever executed: every file is read through `danet.safe_load.load_file` (`torch.load` with
weights_only=True, else a restricted unpickler that turns foreign classes into inert placeholders, importing none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import safe_load
from .checkpoint_checks import brief, check_meta, check_weights
from .errors import DanetError
from .toolbox_config import mmseg_model_settings


@dataclass
class Checkpoint:
    """A checkpoint read from disk, whatever its origin.

    state_dict: tensors under this project's key names (`backbone.*`, `head.*`, `aux.*`).
    source: "danet" (ours), "ssseg", "mmseg" or "imagenet" (a backbone alone).
    meta: our meta dict; for foreign files their meta made plain, with "classes"/"palette" when they name them.
    train_state: optimizer/scheduler/epoch state of our own training runs, else None.
    """

    path: Path
    source: str
    state_dict: dict[str, torch.Tensor]
    meta: dict
    train_state: dict | None = None

    @property
    def classes(self) -> list[str] | None:
        """The class names the weights were trained on, where the file records them."""
        names = self.meta.get("classes")
        return [str(c) for c in names] if isinstance(names, list | tuple) else None

    @property
    def run_data(self) -> dict:
        """The data settings of the `danet train` run that wrote this file (its config's `data`), else {} (foreign
        files: mmseg 0.x ones hold their config as text)."""
        config = self.meta.get("config")
        data = config.get("data") if isinstance(config, dict) else None
        return data if isinstance(data, dict) else {}

    def run_structure(self, preset_name: str, cfg):
        """`cfg` (a ModelConfig) with the output stride of the `danet train` run of preset `preset_name` that wrote
        this file: a run may set another than its preset's, which its weights cannot tell, and naming the run's own
        preset asks for no other. `cfg` itself for another preset's run or another file."""
        model_cfg = self.meta.get("model_cfg")
        stride = model_cfg.get("output_stride") if isinstance(model_cfg, dict) else None
        run = isinstance(self.meta.get("config"), dict) and self.meta.get("preset") == preset_name
        return cfg.replace(output_stride=stride) if run and type(stride) is int else cfg


# ---------------------------------------------------------------------------------------------------------------
# format detection and key conversion
# ---------------------------------------------------------------------------------------------------------------
# (old prefix, new prefix), first match wins; keys are compared after stripping "module." (DDP)
SSSEG_RULES = [
    ("backbone_net.", "backbone."),
    ("pam_in_conv.0.", "head.pam_in.conv."), ("pam_in_conv.1.", "head.pam_in.bn."),
    ("pam_out_conv.0.", "head.pam_out.conv."), ("pam_out_conv.1.", "head.pam_out.bn."),
    ("cam_in_conv.0.", "head.cam_in.conv."), ("cam_in_conv.1.", "head.cam_in.bn."),
    ("cam_out_conv.0.", "head.cam_out.conv."), ("cam_out_conv.1.", "head.cam_out.bn."),
    ("pam_net.gamma.scale", "head.pam.gamma"), ("cam_net.gamma.scale", "head.cam.gamma"),
    ("pam_net.", "head.pam."),
    ("decoder_pamcam.1.", "head.cls.conv."), ("decoder_pam.1.", "head.cls_pam.conv."),
    ("decoder_cam.1.", "head.cls_cam.conv."),
    ("auxiliary_decoder.0.", "aux.conv.conv."), ("auxiliary_decoder.1.", "aux.conv.bn."),
    ("auxiliary_decoder.4.", "aux.cls.conv."),
]  # fmt: skip
MMSEG_RULES = [
    ("backbone.", "backbone."),
    ("decode_head.pam_in_conv.", "head.pam_in."), ("decode_head.pam_out_conv.", "head.pam_out."),
    ("decode_head.cam_in_conv.", "head.cam_in."), ("decode_head.cam_out_conv.", "head.cam_out."),
    ("decode_head.pam.gamma.scale", "head.pam.gamma"), ("decode_head.cam.gamma.scale", "head.cam.gamma"),
    ("decode_head.pam.", "head.pam."),
    ("decode_head.conv_seg.", "head.cls.conv."), ("decode_head.pam_conv_seg.", "head.cls_pam.conv."),
    ("decode_head.cam_conv_seg.", "head.cls_cam.conv."),
    ("auxiliary_head.convs.0.", "aux.conv."), ("auxiliary_head.conv_seg.", "aux.cls.conv."),
]  # fmt: skip


def _rename(sd: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for old, new in rules:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        if k.endswith(".gamma") and v.numel() == 1:
            v = v.reshape(())  # a 0-d scalar in both toolboxes and here; (1,) in some mmcv versions
        out[k] = v
    return out


def file_key(key: str, source: str) -> str:
    """Our weight name `key` as a file of `source` ("mmseg", "ssseg") spells it (without a DDP `module.`)."""
    rules = {"mmseg": MMSEG_RULES, "ssseg": SSSEG_RULES}.get(source, [])
    hits = [(old, new) for old, new in rules if key.startswith(new)]
    if not hits:
        return key
    old, new = max(hits, key=lambda rule: len(rule[1]))  # e.g. head.pam.gamma before head.pam.*
    return old + key[len(new) :]


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _state_dict_of(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict, dict | None, bool]:
    """(state dict, meta, train state, is ours) from whatever container the file holds."""
    if not isinstance(obj, dict):
        raise DanetError(f"{path} holds a {type(obj).__name__}, not a state dict; pass a model checkpoint")
    if obj.get("format") == "danet":
        return (*_our_entries(obj, path), True)
    meta = obj.get("meta")
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise DanetError(
            f"{path} holds no tensors (keys: {', '.join(map(brief, list(obj)[:6]))}); pass a model checkpoint"
        )
    check_weights(sd, path)
    sd = _strip(sd, "module.")  # DDP
    meta = safe_load.plain(meta, f"checkpoint {path}: its meta") if isinstance(meta, dict) else {}
    return sd, meta, None, False


def _our_entries(obj: dict, path: Path) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """(model, meta, train_state) of a file in our format, each checked for the type save_checkpoint writes."""
    redo = "pass a complete checkpoint (best.pth / last.pth of a run, or `danet convert` output)"
    model = obj.get("model")
    if model is None:
        raise DanetError(f'{path} is a danet checkpoint without its "model" entry (the weights); {redo}')
    if not isinstance(model, dict) or not model:
        got = "empty" if isinstance(model, dict) else f"a {type(model).__name__}, not a dict of tensors"
        raise DanetError(f'{path}: its "model" entry (the weights) is {got}; {redo}')
    if bad := next((k for k, v in model.items() if not isinstance(v, torch.Tensor)), None):
        raise DanetError(f'{path}: "model" entry {bad!r} is a {type(model[bad]).__name__}, not a tensor; {redo}')
    for key in ("meta", "train_state"):
        if obj.get(key) is not None and not isinstance(obj[key], dict):
            raise DanetError(f'{path}: its "{key}" entry is a {type(obj[key]).__name__}, not a dict; {redo}')
    check_weights(model, path)
    meta = safe_load.plain(obj.get("meta") or {}, f"checkpoint {path}: its meta")
    return dict(model), meta, obj.get("train_state")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported checkpoint (auto-detected) into our key names, without executing pickled code."""
    path = safe_load.check_file(path)
    sd, meta, train_state, ours = _state_dict_of(safe_load.load_file(path), path)
    keys = list(sd)
    if ours:
        source = "danet"
    elif any(k.startswith("decode_head.") for k in keys):
        source, sd = (
            "mmseg",
            _rename({k: v for k, v in sd.items() if not k.startswith("data_preprocessor.")}, MMSEG_RULES),
        )
    elif any(k.startswith(("backbone_net.", "decoder_pamcam.", "pam_in_conv.")) for k in keys):
        source, sd = "ssseg", _rename(sd, SSSEG_RULES)
    elif any(k.startswith("head.") for k in keys) and any(k.startswith("backbone.") for k in keys):
        source = "danet"  # a bare state dict of ours
    elif any(re.match(r"(backbone\.)?layer1\.", k) for k in keys):
        source = "imagenet"
        sd = {"backbone." + k: v for k, v in _strip(sd, "backbone.").items() if not k.startswith(("fc.", "head."))}
    else:
        raise DanetError(
            f"{path}: unrecognised checkpoint layout (first keys: {', '.join(keys[:3])}); "
            "expected a danet, sssegmentation or mmsegmentation DANet checkpoint or an ImageNet ResNet"
        )
    names = {}  # our meta key -> how the file spells it, where it differs
    if not ours:
        meta = dict(meta)
        dm = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
        for ours_key, keys_ in (("classes", ("classes", "CLASSES")), ("palette", ("palette", "PALETTE"))):
            found = next(
                ((f"{at}{k}", src[k]) for at, src in (("dataset_meta.", dm), ("", meta)) for k in keys_
                 if isinstance(src.get(k), (list, tuple))),
                (ours_key, None),
            )  # fmt: skip
            names[ours_key] = found[0]
            meta[ours_key] = list(found[1]) if found[1] is not None else None
    check_meta(meta, sd, path, ours, names)
    if source == "mmseg":  # NOTE: what its config says beyond the weights (output stride, align_corners)
        meta["toolbox_model"] = mmseg_model_settings(meta, path.name)
    return Checkpoint(path, source, sd, meta, train_state)
