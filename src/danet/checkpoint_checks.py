"""Checks of what a checkpoint file holds beyond being a readable pickle: weight names and tensors, the meta values
the commands use (class names and colours, normalisation, a run's sizes), weight dtypes, and the zip's CRC-32s.

Each failure is one DanetError line naming the file and the field as the file spells it: a damaged, crafted or
hand-edited file must not reach the commands as a traceback, an allocation of gigabytes or a silent cast.
"""

from __future__ import annotations

import math
import reprlib
import zipfile
from pathlib import Path
from typing import Any

import torch

from . import safe_load
from .config_checks import MAX_SIZE  # the largest base / crop size a checkpoint's run settings may give
from .errors import DanetError, os_hint

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother = 2, 4, 4, 4, 40, 40


def brief(value: Any) -> str:
    """`value` for a one-line message, cut short (a crafted value may be huge; a tensor's repr spans lines)."""
    return " ".join(_BRIEF.repr(value).split())


def check_weights(sd: dict, path: Path) -> None:
    """Weight names that are strings, weights that are dense tensors on the CPU (as torch.save(module.state_dict())
    of a model on any device and torch.load(map_location="cpu") give them); else DanetError."""
    redo = "the file is damaged or not a model checkpoint: download or save it again"
    for k, v in sd.items():
        if not isinstance(k, str):
            raise DanetError(f"{path}: its state dict has a key {brief(k)} ({type(k).__name__}), not a name; {redo}")
        if v.layout != torch.strided:
            raise DanetError(f"{path}: weight {k} is a {v.layout} tensor, not a dense one; {redo}")
        if v.device.type != "cpu":
            raise DanetError(f"{path}: weight {k} is on the {v.device.type} device, not the CPU; {redo}")


def check_meta(meta: dict, sd: dict, path: Path, ours: bool, names: dict[str, str]) -> None:
    """DanetError (one line, naming the field) for a meta value that the commands could not use: of another type,
    another class count than the weights, colours or sizes out of range (a damaged, crafted or foreign file)."""
    weight = sd.get("head.cls.conv.weight")
    n = weight.shape[0] if weight is not None and weight.dim() else None  # None: no classifier (infer_config says)

    def per_class(v) -> bool:
        return isinstance(v, list | tuple) and (n is None or len(v) == n)

    def rgb(c) -> bool:
        return isinstance(c, list | tuple) and len(c) == 3 and all(type(x) is int and 0 <= x <= 255 for x in c)

    def three(v, positive: bool = False) -> bool:  # mean / std
        ok = lambda x: type(x) in (int, float) and math.isfinite(x) and (x > 0 or not positive)  # noqa: E731
        return isinstance(v, list | tuple) and len(v) == 3 and all(map(ok, v))

    def require(key: str, ok, expected: str) -> None:
        if meta.get(key) is not None and not ok(meta[key]):
            raise DanetError(
                f"checkpoint {path}: its meta {names.get(key, key)} is {brief(meta[key])}, not {expected}; the file "
                "is damaged or not written by danet or a toolbox it reads: download or save it again"
            )

    each = f"one per class ({n})" if n else "one per class"
    require("preset", lambda v: isinstance(v, str), "a preset name")
    require("model_cfg", lambda v: isinstance(v, dict), "a mapping of model settings")
    require("classes", lambda v: per_class(v) and all(isinstance(c, str) for c in v), f"a list of names, {each}")
    require("palette", lambda v: per_class(v) and all(map(rgb, v)), f"a list of [R, G, B] ints 0..255, {each}")
    require("mean", three, "3 finite numbers")
    require("std", lambda v: three(v, positive=True), "3 finite positive numbers")
    # NOTE: mmseg 0.x files hold their config as text (1.x as `cfg`): only ours must hold a run's settings there
    require("config", lambda v: isinstance(v, dict) or not ours, "a mapping of run settings")
    data = meta["config"].get("data") if isinstance(meta.get("config"), dict) else None
    for key in ("base_size", "crop_size") if isinstance(data, dict) else ():
        # NOTE: sizes that are not ints fall back to the preset's (engine.predict.run_sizes); ints are used as they
        # are, and a huge one would allocate gigabytes (100000 x 100000) before anything else fails
        size = data.get(key)
        ints = [x for x in (size if isinstance(size, list | tuple) else [size]) if type(x) is int]
        if any(not 1 <= x <= MAX_SIZE for x in ints):
            raise DanetError(
                f"checkpoint {path}: its meta config.data.{key} is {brief(size)}, not sizes of 1..{MAX_SIZE} pixels; "
                "the file is damaged or not written by danet: download or save it again"
            )


_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def dtype_kind(t: torch.Tensor) -> str:
    return "floating" if t.is_floating_point() else "integer" if t.dtype in _INTEGERS else str(t.dtype)


def verify_archive(path: str | Path) -> Path:
    """Check the CRC-32 of every entry of a zip checkpoint (torch >= 1.6), which torch.load does not: a flipped bit
    in the weights would load without an error. DanetError (one line) naming a damaged entry; legacy (non-zip) files
    hold no checksums. Returns the path.

    NOTE: read_checkpoint does not call it (it reads the whole file once more: 0.06 s per 200 MB cached, 0.13 s for
    the load itself); `danet zoo` checks its downloads with it."""
    path = safe_load.check_file(path)
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"PK":  # not a zip: a legacy torch file (or none: read_checkpoint says so)
                return path
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:  # NOTE: torch.serialization.set_crc32_options(False) writes 0 for every entry
                    continue
                with archive.open(info) as member:
                    while member.read(1 << 24):  # zipfile compares the CRC at the end: BadZipFile "Bad CRC-32 ..."
                        pass
    except OSError as e:
        raise DanetError(f"cannot read checkpoint {path}: {e.strerror or e}; {os_hint(e, 'check the file')}") from None
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise DanetError(
            f"checkpoint {path} is truncated or corrupt ({safe_load.first_line(e)}); download or save it again"
        ) from None
    return path
