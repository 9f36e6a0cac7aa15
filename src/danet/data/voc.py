"""PASCAL VOC 2012 (+ SBD "aug"): 21 classes (0 = background), 255 = ignore (object boundaries).

Layout: ROOT/VOC2012/{JPEGImages,SegmentationClass,SegmentationClassAug,ImageSets/Segmentation/<split>.txt}
(ROOT may also be a VOCdevkit folder or the VOC2012 folder itself). `danet data prepare voc-aug` makes
SegmentationClassAug (SBD masks as PNG) and ImageSets/Segmentation/trainaug.txt (10,582 ids).

A label of VOC's own splits (train, val, trainval) is read from SegmentationClass (the official VOC masks, index
PNGs), as both toolboxes evaluate; of any other list (trainaug) from SegmentationClass when it has the id, otherwise
from SegmentationClassAug (as mmsegmentation's voc12aug: VOC masks where they exist, SBD for the rest).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DanetError
from .io import read_text

LABEL_DIRS = ("SegmentationClass", "SegmentationClassAug")
VOC_SPLITS = ("train", "val", "trainval")  # VOC's own lists: their masks are VOC's, never SBD's


def base_dir(root: Path) -> Path:
    if not root.is_dir():
        raise DanetError(f"VOC data root {root} does not exist; pass the folder that holds VOC2012 (or VOCdevkit)")
    for cand in (root / "VOC2012", root / "VOCdevkit" / "VOC2012", root):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DanetError(f"no VOC2012/JPEGImages folder under {root}; pass the folder that holds VOC2012 (or VOCdevkit)")


def read_ids(list_file: Path) -> list[str]:
    # the whole line is the id, as both toolboxes read it (an id may hold a space)
    return [line.strip() for line in read_text(list_file, "split list").splitlines() if line.strip()]


def list_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs in the order of ImageSets/Segmentation/<split>.txt."""
    base = base_dir(root)
    list_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        hint = (
            " (make it with `danet data prepare voc-aug --voc DIR --sbd DIR`)" if split in ("trainaug", "aug") else ""
        )
        raise DanetError(f"VOC split list {list_file} does not exist{hint}")
    dirs = LABEL_DIRS[:1] if split in VOC_SPLITS else LABEL_DIRS  # NOTE: a missing VOC val mask is no SBD mask
    present = {d: _names(base / d) for d in dirs}
    pairs = []
    for i in read_ids(list_file):
        name = f"{i}.png"
        label = next((base / d / name for d in dirs if name in present[d]), base / LABEL_DIRS[0] / name)
        pairs.append((base / "JPEGImages" / f"{i}.jpg", label))
    return pairs


def _names(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def missing_hint(label: Path) -> str:
    return f" (VOC's own splits read SegmentationClass; trainaug also {label.parent.parent / LABEL_DIRS[1]})"
