"""ADE20K (SceneParsing, ADEChallengeData2016): 150 classes, labels 1..150 with 0 = "other" (reduce-zero-label).

Layout: ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}/<name>.{jpg,png}
(ROOT may also be the ADEChallengeData2016 folder itself).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DanetError
from .io import IMAGE_EXTENSIONS

SPLITS = ("training", "validation")


def base_dir(root: Path) -> Path:
    if not root.is_dir():
        raise DanetError(f"ADE20K data root {root} does not exist; pass the folder that holds ADEChallengeData2016")
    for cand in (root / "ADEChallengeData2016", root):
        if (cand / "images").is_dir():
            return cand
    raise DanetError(f"no ADEChallengeData2016/images folder under {root}; pass the folder that holds it")


def list_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, expected label) pairs of a split, sorted by name."""
    base = base_dir(root)
    image_dir, label_dir = base / "images" / split, base / "annotations" / split
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise DanetError(f"ADE20K folder {d} does not exist (splits: {', '.join(SPLITS)})")
    # NOTE: not hidden files (macOS's ._name copies beside each image)
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.name[0] != ".")
    return [(p, label_dir / f"{p.stem}.png") for p in images]


def label_files(root: Path, split: str) -> list[Path]:
    """Every label of a split's folder (`danet data check` reports those without an image)."""
    label_dir = base_dir(root) / "annotations" / split
    return sorted(p for p in label_dir.glob("*.png") if p.name[0] != ".") if label_dir.is_dir() else []


def missing_hint(label: Path) -> str:
    return ""
