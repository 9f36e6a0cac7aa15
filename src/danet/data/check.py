"""Walk a dataset and list every fault (it never stops at the first): missing or unreadable files, labels that
do not match their image's size, label values outside the classes.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import DanetError
from ..presets import DatasetInfo
from . import family, find_files, folder
from .io import fork_safe_opencv, label_lut, map_label, read_image, read_label, size_fault


@dataclass
class SplitReport:
    name: str
    images: int = 0  # listed images
    ok: int = 0  # pairs that read cleanly
    class_pixels: np.ndarray | None = None  # labelled pixels per class over the clean pairs


@dataclass
class CheckReport:
    root: Path
    splits: list[SplitReport] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


def _check_pair(args) -> tuple[list[str], np.ndarray | None]:
    """Every fault of one (image, label) pair (a missing or unreadable image, a missing or unreadable label, label
    values outside the classes, sizes that differ: each found, not the first only), and the labelled pixels per
    class where there is none."""
    image_path, label_path, lut, num_classes, palette, missing_hint = args  # missing_hint: the family's function
    faults: list[str] = []
    image = raw = mapped = None
    if not image_path.is_file():
        faults.append(f"image {image_path} does not exist")
    else:
        try:
            image = read_image(image_path)
        except DanetError as e:
            faults.append(str(e))
    if not label_path.is_file():
        faults.append(f"label {label_path} of image {image_path.name} does not exist{missing_hint(label_path)}")
    else:
        try:
            raw = read_label(label_path, palette)
            mapped = map_label(raw, lut, label_path, num_classes)
        except DanetError as e:
            faults.append(str(e))
    if image is not None and raw is not None and (fault := size_fault(image, raw, image_path, label_path)):
        faults.append(fault)
    if faults:
        return faults, None
    return [], np.bincount(mapped.ravel(), minlength=256)[:num_classes]


def check_dataset(
    info: DatasetInfo, root: Path, splits: list[str] | None = None, *, jobs: int = 1, progress: bool = True
) -> CheckReport:
    """Check the listed splits (default: the dataset's train and val splits) of the data at `root`."""
    if not root.is_dir():  # the family's one line, as every other command says it (not once per split)
        family(info).list_files(root, info.train_split)
    report = CheckReport(root)
    lut = label_lut(info.num_classes, info.reduce_zero_label, info.ignore_index)
    palette = None
    if info.name in ("synthetic", "folder"):
        try:
            palette = folder.label_palette(root)
        except DanetError as e:
            report.faults.append(str(e))
            return report
    for split in splits or [info.train_split, info.val_split]:
        sr = SplitReport(split, class_pixels=np.zeros(info.num_classes, dtype=np.int64))
        report.splits.append(sr)
        try:
            pairs = find_files(info, root, split)
        except DanetError as e:
            report.faults.append(f"[{split}] {e}")
            continue
        sr.images = len(pairs)
        if not pairs:
            report.faults.append(f"[{split}] no images")
            continue
        fam = family(info)
        if label_files := getattr(fam, "label_files", None):  # NOTE: ADE20K, Cityscapes: a folder of labels a split
            listed = {label for _, label in pairs}
            report.faults += [f"[{split}] label {p} has no image in the split (is its image missing?)"
                              for p in label_files(root, split) if p not in listed]  # fmt: skip
        todo = [(image, label, lut, info.num_classes, palette, fam.missing_hint) for image, label in pairs]
        bar = dict(total=len(todo), desc=f"check {split}", unit="img", disable=not progress, leave=False)
        if jobs > 1:
            fork_safe_opencv()
            with ProcessPoolExecutor(jobs) as pool:
                results = list(tqdm(pool.map(_check_pair, todo, chunksize=16), **bar))
        else:
            results = [_check_pair(t) for t in tqdm(todo, **bar)]
        for faults, counts in results:
            if not faults:
                sr.ok += 1
                sr.class_pixels += counts
            report.faults += [f"[{split}] {fault}" for fault in faults]
        if sr.ok and not sr.class_pixels.any():  # NOTE: danet test refuses such a split (its mIoU is undefined)
            report.faults.append(
                f"[{split}] no labelled pixel in its {sr.ok} readable labels (all ignore 255"
                + (", or 0 under reduce-zero-label" if info.reduce_zero_label else "")
                + "): nothing to train on or evaluate"
            )
    return report


def format_report(report: CheckReport, info: DatasetInfo) -> str:
    lines = [f"{info.name} at {report.root}"]
    for sr in report.splits:
        lines.append(f"  {sr.name}: {sr.images} images, {sr.ok} readable pairs")
        if sr.ok and sr.class_pixels is not None:
            absent = [info.classes[k] for k in np.flatnonzero(sr.class_pixels == 0)]
            if absent:
                shown = ", ".join(absent[:8]) + (" ..." if len(absent) > 8 else "")
                lines.append(f"    classes never labelled: {len(absent)} ({shown})")
    if report.faults:
        kinds = Counter(_kind(f) for f in report.faults)
        n_faults = len(report.faults)
        lines.append(
            f"{n_faults} fault{'s' * (n_faults != 1)} ({', '.join(f'{n} {k}' for k, n in kinds.most_common())}):"
        )
        lines += [f"  {f}" for f in report.faults]
    else:
        lines.append("no faults")
    return "\n".join(lines)


def _kind(fault: str) -> str:
    for key, kind in (
        ("does not exist", "missing"),
        ("no images", "missing"),
        ("corrupt", "unreadable"),
        ("truncated", "unreadable"),
        ("empty file", "unreadable"),
        ("same size", "size mismatch"),
        ("outside", "bad label values"),
        ("no labelled pixel", "no labelled pixel"),
        ("has no image", "missing"),
        ("colours", "bad label format"),  # colours of an RGB mask that the classes file does not name
        ("one class index per pixel", "bad label format"),
        ("lossy compression", "bad label format"),
        ("classes file", "bad classes file"),
    ):
        if key in fault:
            return kind
    return "other"
