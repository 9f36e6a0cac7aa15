"""The model zoo as data: the 12 sssegmentation DANet configurations plus a CPU-sized preset on synthetic data.

A preset carries everything a run needs to know besides paths: the model structure, the dataset's classes,
palette and label handling, normalisation, the train and test pipelines' sizes, the schedule and the test
settings, and the published result with the public checkpoint and log.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from . import classes as C
from .errors import DanetError
from .models.danet import ModelConfig

MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255
STD = (58.395, 57.12, 57.375)
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
ZOO_URL = "https://github.com/SegmentationBLWX/modelstore/releases/download/ssseg_danet/{config}_train.{ext}"
# the ImageNet-1k ResNetV1c (deep stem) weights sssegmentation's DANet configs start from ('pretrained': True)
BACKBONE_URLS = {
    50: "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    101: "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}


@dataclass(frozen=True)
class DatasetInfo:
    """Facts of one benchmark: its classes, label handling, splits and sizes."""

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    train_split: str
    val_split: str
    num_train: int  # images in the train split (for iterations per epoch)
    base_size: tuple[int, int]  # keep-ratio resize target (long, short), train (x ratio) and test
    crop_size: tuple[int, int]  # train crop (H, W)
    reduce_zero_label: bool = False  # NOTE: ADE20K: 0 ("other") -> ignore, 1..150 -> 0..149
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASETS: dict[str, DatasetInfo] = {
    "voc12aug": DatasetInfo(
        "voc12aug", C.VOC_CLASSES, C.VOC_PALETTE, "trainaug", "val", 10582, (2048, 512), (512, 512)
    ),
    "ade20k": DatasetInfo(
        "ade20k", C.ADE20K_CLASSES, C.ADE20K_PALETTE, "training", "validation", 20210, (2048, 512), (512, 512), True
    ),
    "cityscapes": DatasetInfo(
        "cityscapes", C.CITYSCAPES_CLASSES, C.CITYSCAPES_PALETTE, "train", "val", 2975, (2048, 1024), (512, 1024)
    ),
    # the bundled synthetic scenes, laid out like ADE20K but without the zero-label shift
    "synthetic": DatasetInfo(
        "synthetic", C.SYNTHETIC_CLASSES, C.SYNTHETIC_PALETTE, "training", "validation", 400, (128, 128), (128, 128)
    ),
}


@dataclass(frozen=True)
class Schedule:
    """SGD + poly decay per iteration (REFERENCE.md: lr 0.01, momentum 0.9, wd 5e-4, power 0.9, down to 1e-4)."""

    epochs: int
    batch_size: int  # global batch (over all processes)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    min_lr: float | None = None  # None: lr / 100, sssegmentation's default (1e-4 at its lr 0.01), also for another lr
    eval_interval: int = 10  # epochs between validations
    save_interval: int = 1  # epochs between checkpoints
    # images per reduction of the loss (engine/losses.py): the reference's batch per GPU; 0: each process's batch
    loss_images: int = 0


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: DatasetInfo
    model: ModelConfig
    schedule: Schedule
    alias: str | None = None  # the sssegmentation config name
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # crop re-drawn while one class covers more than this
    eval_mode: str = "whole"  # "whole" or "slide"
    tta_scales: tuple[float, ...] = TTA_SCALES
    published_miou: float | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def classes(self) -> tuple[str, ...]:
        return self.dataset.classes

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        return self.dataset.palette

    @property
    def title(self) -> str:
        """The name pictures carry: the preset's, and for a folder dataset with its own classes, that it is one."""
        if self.dataset.name == "folder":
            return f"{self.name} on {self.num_classes} own classes"
        return self.name

    @property
    def crop_size(self) -> tuple[int, int]:
        return self.dataset.crop_size

    @property
    def base_size(self) -> tuple[int, int]:
        return self.dataset.base_size

    @property
    def iters_per_epoch(self) -> int:
        """sssegmentation's count: the train images padded over its GPUs (DistributedSampler), full batches only
        (VOC 661, ADE20K 1263, Cityscapes 2976 // 8 = 372)."""
        from .engine.sampling import epoch_batches, reference_replicas

        s = self.schedule
        return max(
            1, epoch_batches(self.dataset.num_train, s.batch_size, reference_replicas(s.batch_size, s.loss_images))
        )

    @property
    def total_iters(self) -> int:
        return self.schedule.epochs * self.iters_per_epoch

    @property
    def checkpoint_url(self) -> str | None:
        return ZOO_URL.format(config=self.alias, ext="pth") if self.alias else None

    @property
    def backbone_url(self) -> str | None:
        """The ImageNet backbone the zoo row trained from (None: the preset starts from random weights)."""
        return BACKBONE_URLS.get(self.model.depth) if self.alias and self.model.stem == "deep" else None

    @property
    def log_url(self) -> str | None:
        return ZOO_URL.format(config=self.alias, ext="log") if self.alias else None

    def replace(self, **changes) -> Preset:
        return dataclasses.replace(self, **changes)


_SEED_TABLE = {  # (dataset, depth, output stride) -> published sssegmentation mIoU
    ("voc12aug", 50, 8): 76.39,
    ("voc12aug", 50, 16): 75.04,
    ("voc12aug", 101, 8): 77.97,
    ("voc12aug", 101, 16): 76.99,
    ("ade20k", 50, 8): 42.90,
    ("ade20k", 50, 16): 40.85,
    ("ade20k", 101, 8): 44.37,
    ("ade20k", 101, 16): 42.58,
    ("cityscapes", 50, 8): 79.47,
    ("cityscapes", 50, 16): 77.60,
    ("cityscapes", 101, 8): 80.55,
    ("cityscapes", 101, 16): 78.23,
}
# NOTE: sssegmentation trains these on 8 GPUs (2 images each, Cityscapes 1), each reducing its own loss
_SCHEDULES = {
    "voc12aug": Schedule(60, 16, loss_images=2),
    "ade20k": Schedule(130, 16, loss_images=2),
    "cityscapes": Schedule(220, 8, loss_images=1),
}
_SSSEG_DATA = {"voc12aug": "voc", "ade20k": "ade20k", "cityscapes": "cityscapes"}


def _zoo() -> dict[str, Preset]:
    presets = {}
    for (data, depth, os_), miou in _SEED_TABLE.items():
        info = DATASETS[data]
        name = f"danet_r{depth}-d{os_}_{data}"
        presets[name] = Preset(
            name=name,
            dataset=info,
            model=ModelConfig(num_classes=info.num_classes, depth=depth, output_stride=os_),
            schedule=_SCHEDULES[data],
            alias=f"danet_resnet{depth}os{os_}_{_SSSEG_DATA[data]}",
            published_miou=miou,
        )
    # A CPU-sized DANet for the bundled synthetic scenes: narrow ResNet-26, same head structure. Tuned so that
    # `danet train danet_tiny_synthetic` reaches 82-85 % val mIoU in about 5 minutes on 2 CPU cores: per CPU
    # second, 64 x 64 crops and a narrow backbone trained for many iterations beat larger crops or wider nets.
    presets["danet_tiny_synthetic"] = Preset(
        name="danet_tiny_synthetic",
        # NOTE: tested at 1.5x the scenes' 128 px (val mIoU +2.5 to +5 points over 128 px: 16 x 16 logits are too
        # coarse for the shapes' outlines); the ratio range keeps the training sizes at 128 x (0.5 .. 2.0) px
        dataset=dataclasses.replace(DATASETS["synthetic"], crop_size=(64, 64), base_size=(192, 192)),
        model=ModelConfig(
            num_classes=DATASETS["synthetic"].num_classes,
            depth=26,
            output_stride=8,
            base_channels=8,
            stem_channels=16,
            head_channels=32,
            key_channels=16,
            aux_channels=32,
        ),
        schedule=Schedule(epochs=120, batch_size=8, lr=0.02, min_lr=1e-4, eval_interval=20, save_interval=20),
        ratio_range=(1 / 3, 4 / 3),
        tta_scales=(0.75, 1.0, 1.25),
        notes="CPU-sized preset for the bundled synthetic dataset (the README's main job).",
    )
    return presets


PRESETS: dict[str, Preset] = _zoo()
ALIASES: dict[str, str] = {p.alias: p.name for p in PRESETS.values() if p.alias}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """A preset by our name or its sssegmentation config name; DanetError listing the valid names otherwise."""
    if name in PRESETS:
        return PRESETS[name]
    if name in ALIASES:
        return PRESETS[ALIASES[name]]
    names = list(PRESETS) + list(ALIASES)
    close = [n for n in names if n.lower() == str(name).lower()] or difflib.get_close_matches(str(name), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DanetError(f"unknown preset {name!r}.{hint} Valid names: {', '.join(PRESETS)} (or their ssseg aliases).")
