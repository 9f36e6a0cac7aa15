"""Format converters: the label files the readers expect, made from the files the datasets are published with.

- `prepare_voc_aug`: SBD's `dataset/cls/*.mat` masks -> VOC2012/SegmentationClassAug/*.png, and
  ImageSets/Segmentation/trainaug.txt = VOC train + SBD train + SBD val - VOC val (10,582 ids on the real data).
- `prepare_cityscapes`: gtFine `*_gtFine_labelIds.png` -> `*_gtFine_labelTrainIds.png` (19 trainIds, void 255).

Every output is written to a temporary name and renamed into place; existing outputs are kept unless
`overwrite=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..classes import VOC_PALETTE
from ..errors import DanetError
from . import cityscapes, voc
from .io import read_label, remove_stale_temporaries, write_atomic, write_error


@dataclass
class PrepareReport:
    written: int = 0
    skipped: int = 0  # outputs that existed and were kept
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.written} written, {self.skipped} kept (already there; --overwrite to redo)"
        return "\n".join([text, *self.notes])


def _save_png(path: Path, mask: np.ndarray, palette: list[int] | None = None) -> None:
    im = Image.fromarray(mask, mode="P" if palette else "L")
    if palette:
        im.putpalette(palette)
    write_atomic(path, lambda tmp: im.save(tmp, format="PNG"))


def _voc_palette() -> list[int]:
    flat = [v for rgb in VOC_PALETTE for v in rgb]
    return flat + [0] * (768 - len(flat) - 3) + [224, 224, 192]  # 255 (ignore) drawn as VOC's boundary colour


def sbd_dir(sbd: Path) -> Path:
    for cand in (sbd / "dataset", sbd / "benchmark_RELEASE" / "dataset", sbd):
        if (cand / "cls").is_dir():
            return cand
    raise DanetError(f"no SBD dataset/cls folder under {sbd}; pass the benchmark_RELEASE folder of SBD")


SBD_VALUES = np.array([*range(21), 255])


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class mask `(H, W)` uint8 of an SBD `cls/*.mat` file (struct GTcls, field Segmentation)."""
    try:
        from scipy.io import loadmat  # optional dependency (extra "voc")
    except ImportError:
        raise DanetError("reading SBD .mat masks needs scipy: pip install scipy (or danet[voc])") from None

    try:
        mat = loadmat(str(path))
        mask = np.asarray(mat["GTcls"][0, 0]["Segmentation"])
    except Exception as e:  # scipy raises many types for a bad file
        raise DanetError(
            f"SBD mask {path} is unreadable or not an SBD cls file ({e}); extract it again from SBD's benchmark.tgz"
        ) from None
    if mask.ndim != 2 or mask.size == 0:
        raise DanetError(f"SBD mask {path} does not hold a 2-D class mask (shape {mask.shape})")
    values = np.unique(mask)
    bad = values[~np.isin(values, SBD_VALUES)]
    if bad.size:  # not wrapped or rounded into some class: SBD's masks hold the 21 class indices 0..20 only
        raise DanetError(
            f"SBD mask {path} holds values {[v.item() for v in bad[:5]]} that are not VOC class indices "
            "(0..20, 255 ignore); extract it again from SBD's benchmark.tgz"
        )
    return mask.astype(np.uint8)


def prepare_voc_aug(voc_root: str | Path, sbd_root: str | Path, *, overwrite: bool = False, progress: bool = True):
    """Convert SBD to VOC2012/SegmentationClassAug and write ImageSets/Segmentation/trainaug.txt."""
    base = voc.base_dir(Path(voc_root).expanduser())
    sbd = sbd_dir(Path(sbd_root).expanduser())
    sets = base / "ImageSets" / "Segmentation"
    lists = {}
    for name, path in (("VOC train", sets / "train.txt"), ("VOC val", sets / "val.txt")):
        if not path.is_file():
            raise DanetError(f"{name} list {path} does not exist")
        lists[name] = voc.read_ids(path)
    for name, path in (("SBD train", sbd / "train.txt"), ("SBD val", sbd / "val.txt")):
        if not path.is_file():
            raise DanetError(f"{name} list {path} does not exist")
        lists[name] = voc.read_ids(path)
        if not lists[name]:
            raise DanetError(f"{name} list {path} is empty; extract SBD's benchmark.tgz again")
    mats = sorted((sbd / "cls").glob("*.mat"))
    if not mats:
        raise DanetError(f"no .mat masks in {sbd / 'cls'}")
    val = set(lists["VOC val"])
    ids = sorted(set(lists["VOC train"] + lists["SBD train"] + lists["SBD val"]) - val)
    have = {p.stem for p in mats}
    have |= {p.stem for d in ("SegmentationClass", "SegmentationClassAug") for p in (base / d).glob("*.png")}
    if missing := [i for i in ids if i not in have]:  # NOTE: before anything is written
        raise DanetError(
            f"{len(missing)} of the {len(ids)} trainaug ids have neither a SegmentationClass PNG nor an SBD "
            f"cls/*.mat mask (first: {missing[0]}); extract VOC2012 and SBD's benchmark.tgz again"
        )
    out_dir = base / "SegmentationClassAug"
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise write_error(out_dir, e) from None
    report = PrepareReport()
    remove_stale_temporaries([out_dir])
    palette = _voc_palette()
    for mat in tqdm(mats, desc="SBD -> PNG", unit="mask", disable=not progress):
        out = out_dir / f"{mat.stem}.png"
        if out.exists() and not overwrite:
            report.skipped += 1
            continue
        _save_png(out, read_sbd_mat(mat), palette)
        report.written += 1
    list_file = sets / "trainaug.txt"
    text = "".join(f"{i}\n" for i in ids)
    if list_file.exists() and not overwrite and list_file.read_text("utf-8", errors="replace") != text:
        report.notes.append(f"kept the existing {list_file}, which differs from the computed list (--overwrite)")
        report.skipped += 1
    elif list_file.exists() and not overwrite:
        report.skipped += 1
    else:
        write_atomic(list_file, lambda tmp: tmp.write_text(text))
        report.written += 1
    report.notes.append(f"trainaug: {len(ids)} ids (10,582 on the full VOC 2012 + SBD)")
    return report


def prepare_cityscapes(root: str | Path, *, overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Write *_gtFine_labelTrainIds.png beside every *_gtFine_labelIds.png under ROOT/gtFine."""
    root = Path(root).expanduser()
    gt = root / "gtFine"
    if not gt.is_dir():
        raise DanetError(f"no gtFine folder in {root}; pass the Cityscapes root (with leftImg8bit/ and gtFine/)")
    files = sorted(gt.glob(f"*/*/*{cityscapes.LABELID_SUFFIX}"))
    if not files:
        raise DanetError(f"no *{cityscapes.LABELID_SUFFIX} files under {gt}/<split>/<city>/")
    lut = cityscapes.trainid_lut()
    report = PrepareReport()
    remove_stale_temporaries(sorted({f.parent for f in files}))
    for src in tqdm(files, desc="labelIds -> trainIds", unit="label", disable=not progress):
        out = src.with_name(src.name[: -len(cityscapes.LABELID_SUFFIX)] + cityscapes.LABEL_SUFFIX)
        if out.exists() and not overwrite:
            report.skipped += 1
            continue
        ids = read_label(src)
        if ids.dtype != np.uint8:
            raise DanetError(
                f"{src} is not an 8-bit labelIds image ({ids.dtype.itemsize * 8}-bit); take gtFine's *_labelIds.png "
                "from the official gtFine_trainvaltest.zip"
            )
        _save_png(out, lut[ids])
        report.written += 1
    return report
