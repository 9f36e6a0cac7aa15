"""Cityscapes (fine annotations): 19 training classes (trainIds), void -> ignore 255.

Layout: ROOT/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png and
ROOT/gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png (`danet data prepare cityscapes ROOT` makes the
latter from the official *_gtFine_labelIds.png).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DanetError

SPLITS = ("train", "val")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"
LABELID_SUFFIX = "_gtFine_labelIds.png"

# The official labelId -> trainId table (cityscapesScripts helpers/labels.py; a dataset fact). Ids not listed
# (0-6 void, 9 parking, 10 rail track, 14 guard rail, 15 bridge, 16 tunnel, 18 polegroup, 29 caravan,
# 30 trailer, -1 license plate) are ignored (255).
LABELID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def trainid_lut() -> np.ndarray:
    """A 256-entry uint8 table labelId -> trainId (255 = ignore); from cityscapesscripts when it is installed."""
    lut = np.full(256, 255, dtype=np.uint8)
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError:
        table = LABELID_TO_TRAINID
    else:
        table = {lb.id: lb.trainId for lb in labels if 0 <= lb.id < 256 and 0 <= lb.trainId < 255}
    for label_id, train_id in table.items():
        lut[label_id] = train_id
    return lut


def list_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, expected label) pairs of a split, sorted by city and name."""
    if not root.is_dir():
        raise DanetError(f"Cityscapes data root {root} does not exist; pass the folder with leftImg8bit/ and gtFine/")
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise DanetError(f"Cityscapes folder {d} does not exist (splits: {', '.join(SPLITS)})")
    images = sorted(p for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}") if p.name[0] != ".")  # NOTE: not macOS's ._name
    return [(p, label_dir / p.parent.name / (p.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX)) for p in images]


def label_files(root: Path, split: str) -> list[Path]:
    """Every trainId label of a split's folder (`danet data check` reports those without an image)."""
    return sorted(p for p in (root / "gtFine" / split).glob(f"*/*{LABEL_SUFFIX}") if p.name[0] != ".")


def missing_hint(label: Path) -> str:
    ids = label.with_name(label.name[: -len(LABEL_SUFFIX)] + LABELID_SUFFIX)
    if ids.is_file():
        return f"; make the trainId labels with `danet data prepare cityscapes {label.parents[3]}`"
    return ""
