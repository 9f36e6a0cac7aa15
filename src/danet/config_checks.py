"""The range checks of a run's settings that a type hint cannot express (`RunConfig.validate`), and the settings
restricted to a set of words."""

from __future__ import annotations

import math
from typing import Any

from .errors import DanetError

MAX_SIZE = 16384  # the largest crop and base size of a run (a 16k x 16k image), also in its checkpoints' settings

# fields whose values are restricted to a set of words
CHOICES: dict[str, tuple[str, ...]] = {
    "amp": ("none", "bf16", "fp16"),
    "loss": ("ssseg", "mmseg"),
    "device": ("auto", "cpu", "cuda", "cuda:N"),  # cuda:N: one GPU of several (one process)
    "eval_mode": ("whole", "slide"),
    "fused_loss_impl": ("chunked", "compiled", "triton"),
    "conv": ("direct", "winograd"),
    "norm": ("native", "triton"),
    "nonfinite": ("stop", "skip"),
    "data.dataset": ("preset", "folder"),
}


def _setting(cfg: Any, key: str) -> Any:
    """The value of a dotted setting, e.g. 'data.dataset'."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def chosen(key: str, value: Any) -> bool:
    """Whether `value` is one of CHOICES[key] ("cuda:N": cuda: and a GPU index)."""
    if key == "device" and isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit():
        return True
    return value in CHOICES[key] and value != "cuda:N"


def not_chosen(key: str, value: Any) -> str:
    """The one line for a setting outside CHOICES[key]."""
    hint = (
        " (folded is for inference: danet test / predict --norm folded)" if (key, value) == ("norm", "folded") else ""
    )
    return f"setting {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}{hint}"


def check_run(cfg: Any) -> None:
    """Raise DanetError naming the first setting of the `RunConfig` `cfg` that is out of range."""
    from .models.resnet import DEPTH_LAYERS, STRIDE_PLANS

    s, d = cfg.schedule, cfg.data
    for key in CHOICES:  # NOTE: also for configs built in code, which skip from_dict's checks
        if not chosen(key, value := _setting(cfg, key)):
            raise DanetError(not_chosen(key, value))
    if cfg.fused_loss_impl != "chunked" and not cfg.fused_loss:
        raise DanetError(
            f"setting 'fused_loss_impl={cfg.fused_loss_impl}' needs fused_loss=true; add --set fused_loss=true"
        )
    if cfg.cuda_graphs and (cfg.amp == "fp16" or cfg.compile):
        what = "amp=fp16 (its GradScaler reads the gradients on the host)" if cfg.amp == "fp16" else "compile=true"
        raise DanetError(
            f"setting 'cuda_graphs=true' captures an eager bf16 or float32 step, not {what}; use amp=bf16 "
            "without compile, or drop cuda_graphs"
        )
    positive = {
        "schedule.epochs": s.epochs,
        "schedule.batch_size": s.batch_size,
        "schedule.iters_per_epoch": s.iters_per_epoch,
        "schedule.eval_interval": s.eval_interval,
        "schedule.save_interval": s.save_interval,
        "log_interval": cfg.log_interval,
        "threads": cfg.threads,
        "stop_iter": cfg.stop_iter,
        "data.train_limit": d.train_limit,
        "data.val_limit": d.val_limit,
    }
    for key, v in positive.items():
        if v is not None and v < 1:
            raise DanetError(f"setting {key!r} must be at least 1, got {v}")
    for key, v in (("schedule.lr", s.lr), ("schedule.min_lr", s.min_lr), ("schedule.momentum", s.momentum),
                   ("schedule.power", s.power), ("schedule.weight_decay", s.weight_decay),
                   ("aux_weight", cfg.aux_weight)):  # fmt: skip
        if v is not None and not (v >= 0 and math.isfinite(v)):  # NOTE: NaN fails every comparison
            raise DanetError(f"setting {key!r} must not be negative (a finite number), got {v}")
    if s.lr is not None and s.lr == 0:
        raise DanetError("setting 'schedule.lr' must be above 0 (the learning rate the poly schedule starts at)")
    if s.lr is not None and s.min_lr is not None and s.min_lr > s.lr:
        raise DanetError(
            f"setting 'schedule.min_lr' ({s.min_lr:g}) is above schedule.lr ({s.lr:g}): the poly schedule decays "
            "from lr down to min_lr; lower min_lr"
        )
    if s.momentum is not None and s.momentum >= 1:
        raise DanetError(f"setting 'schedule.momentum' must be below 1 (SGD's is 0.9), got {s.momentum:g}")
    if not 0 <= cfg.seed < 2**63:
        raise DanetError(f"setting 'seed' must be in 0 .. 2**63 - 1, got {cfg.seed}")
    if not str(cfg.work_dir).strip():
        raise DanetError("setting 'work_dir' is empty; give the run's folder (--work-dir DIR)")
    if s.loss_images is not None and s.loss_images < 0:
        raise DanetError(f"setting 'schedule.loss_images' must be 0 (one group) or more, got {s.loss_images}")
    if d.num_workers is not None and d.num_workers < 0:
        raise DanetError(f"setting 'data.num_workers' must be 0 or more, got {d.num_workers}")
    for key, size in (("data.crop_size", d.crop_size), ("data.base_size", d.base_size)):
        if size is not None and min(size) < 1:
            raise DanetError(f"setting {key!r} needs positive sizes (a crop of at least 1 x 1), got {list(size)}")
        if size is not None and max(size) > MAX_SIZE:
            raise DanetError(f"setting {key!r} allows sizes up to {MAX_SIZE} pixels, got {list(size)}")
    if d.ratio_range is not None and not 0 < d.ratio_range[0] <= d.ratio_range[1]:
        raise DanetError(f"setting 'data.ratio_range' needs 0 < low <= high, got {list(d.ratio_range)}")
    m = cfg.model
    if "depth" in m and m["depth"] not in DEPTH_LAYERS:
        raise DanetError(f"setting 'model.depth' must be one of {sorted(DEPTH_LAYERS)}, got {m['depth']}")
    if "output_stride" in m and m["output_stride"] not in STRIDE_PLANS:
        raise DanetError(
            f"setting 'model.output_stride' must be one of {sorted(STRIDE_PLANS)}, got {m['output_stride']}"
        )
    if "stem" in m and m["stem"] not in ("deep", "single"):
        raise DanetError(f"setting 'model.stem' must be 'deep' or 'single', got {m['stem']!r}")
    for key in ("num_classes", "base_channels", "stem_channels", "head_channels", "key_channels", "aux_channels"):
        if key in m and m[key] < 1:
            raise DanetError(f"setting 'model.{key}' must be at least 1, got {m[key]}")
    if "dropout" in m and not 0 <= m["dropout"] < 1:
        raise DanetError(f"setting 'model.dropout' must be in [0, 1), got {m['dropout']}")
    if d.dataset == "preset" and "num_classes" in m and m["num_classes"] != (n := cfg.base_preset().num_classes):
        raise DanetError(
            f"setting 'model.num_classes={m['num_classes']}' contradicts the dataset of preset {cfg.preset} "
            f"({n} classes); the classes come from the dataset: drop it, pick a preset of another dataset, or "
            "train on a folder dataset with its own classes file (data.dataset=folder)"
        )
