"""Reading a .pth file that may come from anywhere, without ever running code pickled in it.

`load_file` first tries `torch.load(weights_only=True)`. Files that it refuses because they hold foreign objects
(mmengine's message hub, numpy arrays, anything a toolbox pickled into its meta) are read again through
`_RestrictedUnpickler`, which rebuilds tensors and plain containers and turns every other class into an inert
placeholder without importing it. Zip (torch >= 1.6) and legacy torch files both go through it; bare pickles that
are not torch files are refused. `plain` turns placeholders into strings so what was read can be stored again.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .errors import DanetError


class _Inert:
    """Stands for a class found in a file: never imported, never called; keeps the arguments it was given."""

    _origin = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.__dict__["_state"] = state

    def __setitem__(self, key, value) -> None:  # SETITEM(S) on a placeholder dict subclass
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value) -> None:  # APPEND(S) on a placeholder list subclass
        self.__dict__.setdefault("_items", []).append(value)

    def extend(self, values) -> None:
        self.__dict__.setdefault("_items", []).extend(values)

    def __repr__(self) -> str:
        return f"<not loaded: {self._origin}>"


def _allowed_global(module: str, name: str) -> Any | None:
    """The only globals a restricted load may resolve: tensor rebuilding, dtypes, plain containers."""
    if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter"):
        return getattr(torch._utils, name)
    if module == "torch" and (name in ("Size", "device") or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    if module == "collections" and name == "OrderedDict":
        return OrderedDict
    if module == "builtins" and name in ("set", "frozenset", "complex", "slice", "bytearray"):
        return {"set": set, "frozenset": frozenset, "complex": complex, "slice": slice, "bytearray": bytearray}[name]
    if module == "_codecs" and name == "encode":  # bytes pickled with protocol 2
        import _codecs

        return _codecs.encode
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is not None:
            return obj
        return type(name.rsplit(".", 1)[-1], (_Inert,), {"_origin": f"{module}.{name}"})


class _RestrictedPickleModule:
    """What torch.load needs of a `pickle_module`; every unpickler it makes is restricted."""

    __name__ = "danet_restricted_pickle"
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(f, **kwargs):
        return _RestrictedUnpickler(f, **kwargs).load()


def check_file(path: str | Path) -> Path:
    """`path` as a Path if it is a file; else DanetError: not a path, not found, or a folder (naming a checkpoint
    inside it)."""
    if not isinstance(path, str | os.PathLike):  # NOTE: Path(5) is a TypeError
        raise DanetError(f"a checkpoint is a file path (str or pathlib.Path), got {type(path).__name__} {path!r:.60}")
    path = Path(path)
    if path.is_dir():
        try:
            inside = sorted(path.glob("*.pth"), key=lambda p: (p.name not in ("best.pth", "last.pth"), p.name))
        except OSError:  # an unreadable folder
            inside = []
        hint = f"e.g. {inside[0]}" if inside else "a .pth file, not its folder"
        raise DanetError(f"checkpoint {path} is a directory; pass a checkpoint file ({hint})")
    if not path.is_file():
        raise DanetError(f"checkpoint {path} not found; check the path")
    if path.stat().st_size == 0:
        raise DanetError(f"checkpoint {path} is an empty file (0 bytes); download or save it again")
    return path


def load_file(path: Path) -> Any:
    """Load without executing pickled code; DanetError (one line) for missing, truncated or foreign files."""
    check_file(path)
    is_zip = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # plain pickles: refused below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # foreign classes inside: retry with the restricted unpickler below
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for damaged files
        raise _unreadable(path, is_zip, e) from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, is_zip, e) from e


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, or its type name if it has none; past `limit` characters, the
    sentences that fit (a sentence is not cut in its middle: "...; there is a high"), else the cut line and "..."."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    if len(line) <= limit:
        return line
    cut = line[:limit].rfind(". ")
    return line[: cut + 1] if cut > limit // 4 else line[: limit - 3].rstrip() + "..."


# what a file that is not a checkpoint is, by its first bytes
KNOWN_HEADS = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"%PDF": "a PDF",
               b"\x89HDF": "an HDF5 file (Keras / h5py, not PyTorch)", b"\x1f\x8b": "gzip-compressed",
               b"<": "an HTML or XML page, perhaps saved in place of the download"}  # fmt: skip


def _unreadable(path: Path, is_zip: bool, e: Exception) -> DanetError:
    with open(path, "rb") as f:
        head = f.read(512)
    if is_zip or head.startswith(b"PK"):
        reason = first_line(e)
        return DanetError(f"checkpoint {path} is truncated or corrupt ({reason}); download or save it again")
    what = next((name for magic, name in KNOWN_HEADS.items() if head.lstrip().startswith(magic)), None)
    if what is None and head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        what = "text"
    reason = f"it is {what}" if what else first_line(e)
    return DanetError(f"{path} is not a PyTorch checkpoint ({reason}); pass a .pth file written by torch.save")


# NOTE: bounds for `plain`: a meta is a few hundred values a few levels deep; a crafted file can nest lists thousands
# deep (a RecursionError) or share one list at every level (`[a, a]`, 40 deep: 2**40 values from a 1 MB file)
MAX_DEPTH = 100
MAX_VALUES = 100_000
_DAMAGED = "the file is damaged or crafted: download or save it again"


def plain(obj: Any, where: str = "the checkpoint's meta") -> Any:
    """Meta made plain: placeholders become strings, so it can be stored again and loaded with weights_only.

    A value shared by several containers is copied into each (what storing it again writes); DanetError (one line,
    naming `where`) for more than MAX_VALUES values in all or containers nested more than MAX_DEPTH deep."""
    left = [MAX_VALUES]

    def walk(obj: Any, depth: int) -> Any:
        left[0] -= 1
        if depth > MAX_DEPTH:
            raise DanetError(f"{where} nests containers more than {MAX_DEPTH} deep; {_DAMAGED}")
        if left[0] < 0:
            raise DanetError(f"{where} holds more than {MAX_VALUES:,} values; {_DAMAGED}")
        if isinstance(obj, _Inert):
            return repr(obj)
        if isinstance(obj, dict):
            return {
                k if isinstance(k, (str, int)) else str(walk(k, depth + 1)): walk(v, depth + 1) for k, v in obj.items()
            }
        if isinstance(obj, (list, tuple)):
            return type(obj)(walk(v, depth + 1) for v in obj)
        if obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor)):
            return obj
        if isinstance(obj, (set, frozenset, slice)):  # walked only to bound what repr() below goes through
            for v in (obj.start, obj.stop, obj.step) if isinstance(obj, slice) else obj:
                walk(v, depth + 1)
        return repr(obj)

    return walk(obj, 0)
