"""Your own data: a folder of images, a folder of index masks and a classes file.

Layout:
    ROOT/classes.yaml (or classes.yml / classes.txt)
    ROOT/images/<split>/**/<name>.{jpg,jpeg,png,bmp,tif,tiff,webp}
    ROOT/masks/<split>/**/<name>.png          one class index per pixel (0..K-1), 255 = ignore
or, instead of split subfolders, ROOT/<split>.txt listing names (paths relative to images/, extension optional).

Masks are 8-bit grayscale or palette PNGs holding class indices; an RGB mask is accepted too when every colour
is a class colour of the classes file (white = ignore unless it is a class colour).

classes.yaml, any of:
    classes: [{name: background, color: [0, 0, 0]}, {name: road, color: [128, 64, 128]}]
    [background, road]                                     (colours then generated)
    {background: [0, 0, 0], road: [128, 64, 128]}
classes.txt: one class per line, `name` optionally followed by a colour `R G B` (or `R,G,B` / `#rrggbb`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import yaml

from ..errors import DanetError, short
from ..presets import DatasetInfo
from .io import IMAGE_EXTENSIONS, read_text

CLASS_FILES = ("classes.yaml", "classes.yml", "classes.txt")


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved), used when a classes file gives no colours."""
    out = []
    for j in range(n):
        lab, r, g, b, i = j, 0, 0, 0, 0
        while lab:
            r |= ((lab >> 0) & 1) << (7 - i)
            g |= ((lab >> 1) & 1) << (7 - i)
            b |= ((lab >> 2) & 1) << (7 - i)
            i, lab = i + 1, lab >> 3
        out.append((r, g, b))
    return out


def classes_file(root: Path) -> Path:
    """ROOT's one classes file; DanetError where there is none, or several (which one is meant?), or a folder of
    that name."""
    found = [root / name for name in CLASS_FILES if (root / name).exists()]
    if len(found) > 1:
        names = " and ".join(p.name for p in found)
        raise DanetError(f"{root} holds {names}: keep one classes file (the others would be ignored)")
    if found and not found[0].is_file():
        raise DanetError(f"classes file {found[0]} is not a file; write the class names into a file of that name")
    if found:
        return found[0]
    raise DanetError(f"no classes file in {root}; write {root / 'classes.yaml'} (or classes.txt) naming the classes")


def load_classes(root: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """(names, palette) from ROOT's classes file; DanetError naming the file if it is malformed."""
    path = classes_file(root)
    try:
        entries = _parse_yaml(path) if path.suffix in (".yaml", ".yml") else _parse_text(path)
    except KeyError as e:  # NOTE: a mapping entry without its key: "({e})" alone would read ('name')
        raise DanetError(
            f"classes file {path} is malformed (an entry has no {e} key); see the README's Datasets section for the "
            "format"
        ) from None
    except (yaml.YAMLError, ValueError, TypeError) as e:
        raise DanetError(
            f"classes file {path} is malformed ({e}); see the README's Datasets section for the format"
        ) from None
    if not entries:
        raise DanetError(f"classes file {path} names no classes")
    if len(entries) > 255:
        raise DanetError(f"classes file {path} names {len(entries)} classes; at most 255 fit 8-bit masks")
    for k, (name, _) in enumerate(entries):
        if name is None or isinstance(name, list | dict) or not str(name).strip():
            raise DanetError(f"classes file {path}: class {k} has no usable name (got {name!r}); give it a plain name")
        if isinstance(name, bool):  # YAML reads yes / no / true / false / on / off unquoted as booleans
            raise DanetError(f"classes file {path}: class {k} is the boolean {name}; write its name in quotes")
    names = tuple(str(n) for n, _ in entries)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DanetError(f"classes file {path} names {short(twice)} more than once; give each class its own name")
    for k, (_, colour) in enumerate(entries):
        if colour is not None and not _is_rgb(colour):
            raise DanetError(
                f"classes file {path}: colour of {names[k]!r} must be three integers 0..255 like [128, 64, 128], "
                f"got {colour!r}"
            )
    # NOTE: two classes may share a colour (ADE20K's published palette has one pair) as long as the masks hold
    # indices; an RGB mask cannot tell them apart, and is refused then (io.colours_to_indices)
    given = [tuple(int(v) for v in c) if c is not None else None for _, c in entries]
    # class k without a colour: the VOC colour k, as always; only where that is another class's given colour, the
    # first VOC colour no class has (so that RGB masks drawn with the earlier colours keep their meaning)
    table = default_palette(len(entries) + 256)
    own = [c if c is not None else table[k] if table[k] not in given else None for k, c in enumerate(given)]
    spare = iter(c for c in table if c not in own)  # the first VOC colours no class has
    return names, tuple(c if c is not None else next(spare) for c in own)


def _is_rgb(colour) -> bool:
    """Three integers 0..255 (a list or tuple; not a string, number or mapping)."""
    return (
        isinstance(colour, list | tuple)
        and len(colour) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in colour)
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (plain YAML keeps the last one silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    places: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, a merge key: not a name
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float):
            continue  # a list or mapping as a key: construct_mapping reports it
        mark = key_node.start_mark
        place = f"line {mark.line + 1}, column {mark.column + 1}"
        if key in places:
            raise ValueError(f"{key!r} is named twice, at {places[key]} and {place}")
        places[key] = place
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _parse_yaml(path: Path) -> list[tuple[str, list | None]]:
    try:
        data = yaml.load(read_text(path, "classes file"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:  # the parser's message is several lines with a caret drawing: its first line and where
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"not valid YAML{where}: {getattr(e, 'problem', None) or 'cannot parse'}") from None
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if isinstance(data, dict):
        return [(k, v) for k, v in data.items()]
    if not isinstance(data, list):
        raise ValueError("expected a list of classes")
    out = []
    for item in data:
        if isinstance(item, dict):
            out.append((item["name"], item.get("color", item.get("colour"))))
        else:
            out.append((item, None))
    return out


def _parse_text(path: Path) -> list[tuple[str, list | None]]:
    """`name`, `name R G B` (or `R,G,B`) or `name #rrggbb` per line; `#` starts a comment line."""
    out = []
    for n, line in enumerate(read_text(path, "classes file").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        hex_tail = re.fullmatch(r"(.*?)\s+#(\w{6})", line)  # a colour #rrggbb (or six characters meant as one)
        rgb_tail = re.fullmatch(r"(.*?)[\s,]+(\d+)[\s,]+(\d+)[\s,]+(\d+)", line)
        if hex_tail:
            name, h = hex_tail.groups()
            if not re.fullmatch(r"[0-9a-fA-F]{6}", h):
                raise ValueError(f"line {n} ({line!r}): the colour #{h} is not #rrggbb")
            out.append((name, [int(h[i : i + 2], 16) for i in (0, 2, 4)]))
        elif rgb_tail and rgb_tail.group(1).strip():
            out.append((rgb_tail.group(1), [int(rgb_tail.group(i)) for i in (2, 3, 4)]))
        elif (two := re.search(r"[\s,](\d+)[\s,]+(\d+)$", line)) and max(map(int, two.groups())) <= 255:
            # two numbers of 0..255 at the end: taken for a colour missing a value (the README says so)
            raise ValueError(f"line {n} ({line!r}): a colour is three integers R G B after the class name")
        else:
            out.append((line, None))
    return out


def folder_info(
    root: str | Path,
    *,
    name: str = "folder",
    train_split: str = "train",
    val_split: str = "val",
    base_size: tuple[int, int] = (2048, 512),
    crop_size: tuple[int, int] = (512, 512),
) -> DatasetInfo:
    """A DatasetInfo for a folder dataset (classes and palette from its classes file, train count from its files)."""
    root = Path(root)
    names, palette = load_classes(root)
    try:
        num_train = len(list_files(root, train_split))
    except DanetError:
        num_train = 0
    return DatasetInfo(name, names, palette, train_split, val_split, num_train, tuple(base_size), tuple(crop_size))


def own_classes(root: str | Path | None, like: DatasetInfo) -> DatasetInfo:
    """The folder dataset at ROOT with its own classes, in place of a preset's dataset `like` (whose sizes it keeps):
    splits train / val, index masks 0..K-1, 255 ignored (`data.dataset=folder`, `danet test --dataset folder`)."""
    if root is None:
        raise DanetError("a folder dataset with its own classes needs its data root: add --data-root DIR")
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DanetError(f"data root {root} {what}; pass the folder dataset's folder with --data-root DIR")
    return folder_info(root, base_size=like.base_size, crop_size=like.crop_size)


def list_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, expected mask) pairs of a split, sorted by relative path."""
    if not root.is_dir():
        raise DanetError(f"data root {root} " + ("is not a folder" if root.exists() else "does not exist"))
    image_root, mask_root = root / "images", root / "masks"
    if not image_root.is_dir():
        raise DanetError(f"folder dataset {root} has no images/ folder (expected images/<split>/ and masks/<split>/)")
    if (image_root / split).is_dir():
        if not (mask_root / split).is_dir():
            raise DanetError(f"mask folder {mask_root / split} does not exist")
        images = sorted(p for p in walk_files(image_root / split) if p.suffix.lower() in IMAGE_EXTENSIONS)
        pairs = [(p, (mask_root / split / p.relative_to(image_root / split)).with_suffix(".png")) for p in images]
        return _one_mask_each(pairs)
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        raise DanetError(f"folder dataset {root} has neither images/{split}/ nor a {split}.txt list")
    pairs = []
    for n, line in enumerate(read_text(list_file, "split list").splitlines(), 1):
        rel = line.strip()
        if not rel:
            continue
        if Path(rel).is_absolute():
            raise DanetError(
                f"split list {list_file} line {n} is an absolute path ({rel}); list paths relative to {image_root}"
            )
        image = image_root / rel
        if image.suffix.lower() not in IMAGE_EXTENSIONS:
            image = next(
                (image_root / (rel + e) for e in IMAGE_EXTENSIONS if (image_root / (rel + e)).is_file()), image
            )
        if image.suffix.lower() in IMAGE_EXTENSIONS:
            mask = (mask_root / image.relative_to(image_root)).with_suffix(".png")
        else:
            mask = mask_root / f"{rel}.png"
        pairs.append((image, mask))
    return _one_mask_each(pairs)


def walk_files(folder: Path) -> list[Path]:
    """The files under `folder`, following linked folders (each real folder once), without hidden files (`.name`,
    macOS `._name`)."""
    out, seen = [], set()
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        # NOTE: real folders before links, so that a folder linked beside itself is read under its own name
        visible = [d for d in dirs if not d.startswith(".")]
        dirs[:] = sorted(visible, key=lambda d: (os.path.islink(os.path.join(here, d)), d))
        out += [Path(here) / f for f in files if not f.startswith(".")]
    return out


def _one_mask_each(pairs: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """The pairs, refusing two images that would share one mask (`a.jpg` and `a.png`)."""
    owner: dict[Path, Path] = {}
    for image, mask in pairs:
        if mask in owner and owner[mask] != image:
            raise DanetError(
                f"images {owner[mask]} and {image.name} would share the mask {mask}; rename or remove one of them"
            )
        owner[mask] = image
    return pairs


def missing_hint(label: Path) -> str:
    lossy = (".jpg", ".jpeg", ".JPG", ".JPEG", ".webp")
    other = next((label.with_suffix(e) for e in lossy if label.with_suffix(e).is_file()), None)
    if other is None:
        return ""
    return f" (there is {other.name}: masks must be PNG files: lossy compression changes class indices)"


def label_palette(root: Path) -> np.ndarray:
    """The classes file's colours `(K, 3)` uint8 (to read RGB masks)."""
    return np.asarray(load_classes(root)[1], dtype=np.uint8)
