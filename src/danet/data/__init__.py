"""Datasets, pipelines and the bundled synthetic data.

    ds = build_dataset(get_preset("danet_r50-d8_ade20k"), "data/ade", "train")   # random training crops
    image, label = ds[0]        # float32 (3, 512, 512) normalised RGB, int64 (512, 512), ignore 255

One dataset family per file (ade20k, cityscapes, voc, folder; the synthetic data use the folder layout); each
lists its (image, label) files, and `SegmentationDataset` reads, maps and transforms them.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from ..errors import DanetError, short
from ..presets import DatasetInfo
from . import ade20k, cityscapes, folder, voc
from .base import SegmentationDataset, worker_init_fn
from .folder import folder_info, load_classes, own_classes
from .synthetic import ensure_synthetic
from .transforms import EvalPipeline, TrainPipeline, eval_pipeline, train_pipeline

# DatasetInfo.name -> the module that knows its layout
FAMILIES: dict[str, ModuleType] = {
    "ade20k": ade20k,
    "cityscapes": cityscapes,
    "voc12aug": voc,
    "voc": voc,
    "synthetic": folder,
    "folder": folder,
}

__all__ = [
    "FAMILIES",
    "EvalPipeline",
    "SegmentationDataset",
    "TrainPipeline",
    "build_dataset",
    "data_root",
    "ensure_synthetic",
    "eval_pipeline",
    "find_files",
    "folder_info",
    "load_classes",
    "own_classes",
    "resolve_split",
    "train_pipeline",
    "with_own_classes",
    "worker_init_fn",
]


def family(info: DatasetInfo) -> ModuleType:
    if info.name not in FAMILIES:
        raise DanetError(f"no dataset reader for {info.name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[info.name]


def resolve_split(info: DatasetInfo, split: str, root: Path | None = None) -> str:
    """ "train" / "val" -> the dataset's own split names, unless the data at `root` has a split of that very name
    (VOC's train.txt, where the preset trains on trainaug); any other name is taken literally."""
    alias = {"train": info.train_split, "val": info.val_split}.get(split, split)
    if alias != split and root is not None:
        try:
            find_files(info, root, split)
            return split
        except DanetError:
            pass
    return alias


def data_root(info: DatasetInfo, root: str | os.PathLike | None) -> Path:
    """The data root to read: `root`, or the synthetic cache (generated on first use) for the synthetic preset."""
    if root is not None:
        path = Path(root).expanduser()
        if path.exists() and not path.is_dir():
            raise DanetError(f"data root {path} is a file, not a folder; pass the dataset's folder (--data-root DIR)")
        return path
    if info.name == "synthetic":
        return ensure_synthetic()
    raise DanetError(f"the {info.name} dataset needs a data root (--data-root DIR)")


def find_files(info: DatasetInfo, root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) paths of a split (labels where they are expected, which may not exist); split as is."""
    try:
        pairs = family(info).list_files(root, split)
    except DanetError as e:
        own = next((root / n for n in folder.CLASS_FILES if (root / n).is_file()), None) if root.is_dir() else None
        # NOTE: the synthetic preset reads its own splits (training, validation) of the folder layout; data of
        # train / val splits is a folder dataset of its own classes
        own_splits = info.name == "synthetic" and (root / "images" / "train").is_dir()
        if own is None or info.name == "folder" or (info.name == "synthetic" and not own_splits):
            raise
        raise DanetError(  # the user's own data given to a preset that reads its toolbox dataset's layout
            f"{e}; {root} has a {own.name}: to train or test on a folder dataset with its own classes, add --set "
            "data.dataset=folder (train) or --dataset folder (test, data check)"
        ) from None
    if info.name in ("synthetic", "folder"):
        names, _ = load_classes(root)
        if names != tuple(info.classes):
            raise DanetError(
                f"the classes file of {root} names {len(names)} classes {short(names)} but the preset has "
                f"{info.num_classes} {short(info.classes)}; to use the file's classes, lay the data out in "
                "images/{train,val} and masks/{train,val} and add --set data.dataset=folder (train) or --dataset "
                f"folder (test, data check); or list the preset's {info.num_classes} classes in the file, in order"
            )
    return pairs


def with_own_classes(preset, root: str | os.PathLike | None):
    """`preset` on the folder dataset at `root` with its own classes (`own_classes`): one model output per class."""
    info = own_classes(root, preset.dataset)
    return preset.replace(dataset=info, model=preset.model.replace(num_classes=info.num_classes))


def build_dataset(
    preset, root: str | os.PathLike | None, split: str, *, train: bool | None = None, seed: int = 0
) -> SegmentationDataset:
    """The dataset of a preset's split.

    split: "train" / "val" (the preset's train / val split) or a literal split name (e.g. "training", "trainaug").
    train: the training pipeline (random crops at the crop size, padded) or the evaluation one (image resized to
    the base size, label at the original size); default: split is "train" or the preset's train split. ("train"
    names a split of that very name where the data has one, as VOC's own train.txt beside the trainaug the preset
    trains on: pass `preset.dataset.train_split` for the preset's.)
    root: the data root; None is allowed for the synthetic preset (the bundled data, generated on first use).
    seed: the augmentation seed (item i of epoch e draws from default_rng([seed, e, i])).
    """
    info: DatasetInfo = preset.dataset
    root = data_root(info, root)
    name = resolve_split(info, split, root)
    if train is None:
        train = split == "train" or name == info.train_split
    fam = family(info)
    pairs = find_files(info, root, name)
    if not pairs:
        raise DanetError(f"split {name!r} of the {info.name} data at {root} has no images")
    for image, label in pairs:
        if not image.is_file():
            raise DanetError(f"image {image} (split {name!r}) does not exist")
        if not label.is_file():
            raise DanetError(f"label {label} of image {image.name} does not exist{fam.missing_hint(label)}")
    pipeline = train_pipeline(preset) if train else eval_pipeline(preset)
    palette = folder.label_palette(root) if fam is folder else None
    return SegmentationDataset(pairs, info, pipeline, split=name, train=train, seed=seed, label_palette=palette)
