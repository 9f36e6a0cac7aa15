"""The configuration of a whole run: dataclasses, YAML in/out, dotted `key=value` overrides with type checks.

A run starts from a preset (`danet.presets`) and overrides what it needs:

    preset: danet_tiny_synthetic
    work_dir: runs/synthetic
    amp: bf16
    schedule: {epochs: 2, batch_size: 4, lr: 0.02}
    data: {crop_size: [64, 64], val_limit: 8}
    model: {head_channels: 32}

`RunConfig.resolve()` fills every schedule/data field left empty from the preset, so the YAML written to a work dir
states the whole run and loads back to the same run. `RunConfig.effective_preset()` is the preset with the overrides
applied (model structure, crop, schedule), which is what the data, model and checkpoint code see.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

import yaml

from .config_checks import CHOICES, check_run, chosen, not_chosen
from .errors import DanetError
from .files import atomic_write_text
from .models.danet import ModelConfig
from .presets import Preset, Schedule, get_preset


@dataclass
class ScheduleConfig:
    """SGD + poly schedule; None takes the preset's value (see `danet.presets.Schedule`)."""

    epochs: int | None = None
    batch_size: int | None = None  # GLOBAL batch, split evenly over the processes
    iters_per_epoch: int | None = None  # cap on iterations per epoch (None: all: padded as sssegmentation, drop_last)
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    power: float | None = None
    min_lr: float | None = None  # None (also once resolved): lr / 100, whatever the lr (schedule.final_lr)
    eval_interval: int | None = None  # epochs between validations (the last epoch is always validated)
    save_interval: int | None = None  # epochs between epoch_N.pth checkpoints (last.pth is written every epoch)
    loss_images: int | None = None  # images per reduction of the loss (engine/losses.py); 0: each process's batch


# the schedule settings a run's resolved config records whatever its version (config.yaml, checkpoints' meta)
RECORDED = {f.name for f in dataclasses.fields(ScheduleConfig)} - {"loss_images"}


@dataclass
class DataConfig:
    """Data overrides; None takes the preset's value."""

    crop_size: tuple[int, int] | None = None  # train crop (H, W)
    base_size: tuple[int, int] | None = None  # keep-ratio resize target (long, short)
    ratio_range: tuple[float, float] | None = None  # train random rescale range
    # loader processes; None: 2 on the CPU (its cores also compute), on a GPU this process's share of the cores less
    # one, 2 to 8 (engine/train.py: loader_workers; config.yaml records the number used)
    num_workers: int | None = None
    prefetch: bool = True  # CUDA: copy the next batch on a side stream while this step computes (engine/transfer.py)
    # preset: the preset's dataset and classes; folder: the data root is a folder dataset with its own classes file
    # (classes.yaml / classes.txt, images/{train,val}, masks/{train,val}), whose classes replace the preset's (the
    # model gets one output per class; the preset keeps the rest: sizes, schedule, model)
    dataset: str = "preset"
    train_limit: int | None = None  # use only the first N train images (quick runs)
    val_limit: int | None = None  # validate on the first N val images only (quick runs)


@dataclass
class RunConfig:
    """Everything a `danet train` run needs besides the code."""

    preset: str = "danet_tiny_synthetic"
    data_root: str | None = None  # None: the preset's default (the synthetic cache for danet_tiny_synthetic)
    work_dir: str = "runs/default"
    seed: int = 0
    deterministic: bool = False  # deterministic kernels; same seed -> same weights, also across --resume
    device: str = "auto"
    threads: int | None = None  # CPU intra-op threads; None: $OMP_NUM_THREADS, else half the cores (see train.py)
    amp: str = "none"  # autocast dtype: none | bf16 | fp16 (fp16 uses a GradScaler)
    channels_last: bool = False
    tf32: bool = False  # TF32 convolutions and matmuls in float32 on Ampere+ GPUs (sssegmentation turns both off)
    compile: bool = False  # torch.compile the training module
    loss: str = "ssseg"  # ssseg: CE mean over labelled pixels; mmseg: CE sum over labelled / all pixels
    aux_weight: float = 0.4
    fused_loss: bool = False  # same loss from the 1/8-size logits, chunked: no full-size logits in memory
    # how fused_loss computes: chunked (any device) | compiled (torch.compile'd kernels, compiles on the first steps) |
    # triton (one Triton kernel, CUDA; engine/triton_loss.py); compiled and triton need fused_loss=true (an error
    # otherwise, so config.yaml always says what ran)
    fused_loss_impl: str = "chunked"
    conv: str = "direct"  # 3x3 convs: direct | winograd (CPU float32/64 without autocast, else direct; models.winograd)
    # batch norm (+ residual add + ReLU): native (PyTorch's kernels) | triton (fused Triton kernels, CUDA, eager mode,
    # synchronised over torchrun's processes like SyncBatchNorm; on the CPU or under compile native runs;
    # models.fused_norm)
    norm: str = "native"
    # capture a step's forward, loss and backward once as a CUDA graph and replay it (one GPU process; bf16 or
    # float32, eager: an error with amp=fp16 or compile=true; on the CPU or under torchrun eager steps run;
    # engine/graphed.py)
    cuda_graphs: bool = False
    eval_mode: str = "whole"  # validation inference: whole | slide
    # a non-finite loss (on any rank): stop with the last good checkpoint, or skip that step (no update; the run
    # still stops after MAX_SKIPS_IN_A_ROW in a row, see engine/train.py)
    nonfinite: str = "stop"
    log_interval: int = 10  # iterations between log lines
    stop_iter: int | None = None  # stop after this global iteration (writes last.pth; --resume continues)
    progress: bool = True  # tqdm bar on rank 0
    overwrite: bool = False  # allow a fresh run in a work dir that already holds one (its last.pth is replaced)
    init_checkpoint: str | None = None  # start from these whole-model weights
    # ImageNet backbone: "imagenet" (the zoo presets' ResNetV1c, as sssegmentation trains; downloaded once into
    # $DANET_CACHE/checkpoints; none for presets without one, and not with init_checkpoint), a file or URL, or "none"
    backbone_weights: str | None = "imagenet"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides, e.g. {head_channels: 32}

    # ---- views -------------------------------------------------------------------------------------------------
    def base_preset(self) -> Preset:
        return get_preset(self.preset)

    def resolve(self) -> RunConfig:
        """A copy with every empty schedule/data field taken from the preset (what gets written to the work dir)."""
        p = self.base_preset()
        cfg = from_dict(to_dict(self))
        for f in dataclasses.fields(ScheduleConfig):
            if getattr(cfg.schedule, f.name) is None and hasattr(p.schedule, f.name):
                setattr(cfg.schedule, f.name, getattr(p.schedule, f.name))
        d = cfg.data
        d.crop_size = d.crop_size or p.dataset.crop_size
        d.base_size = d.base_size or p.dataset.base_size
        d.ratio_range = d.ratio_range or p.ratio_range
        return cfg

    def effective_preset(self) -> Preset:
        """The preset with this run's model, data and schedule overrides applied."""
        p = self.base_preset()
        r = self.resolve()
        sched_fields = {f.name for f in dataclasses.fields(Schedule)}
        schedule = dataclasses.replace(
            p.schedule, **{k: v for k, v in dataclasses.asdict(r.schedule).items() if k in sched_fields}
        )
        dataset = dataclasses.replace(p.dataset, crop_size=tuple(r.data.crop_size), base_size=tuple(r.data.base_size))
        if self.data.dataset == "folder":
            from .data.folder import own_classes  # NOTE: lazy: reading a config needs no data code

            dataset = own_classes(self.data_root, dataset)
            if self.model.get("num_classes", dataset.num_classes) != dataset.num_classes:
                raise DanetError(
                    f"setting 'model.num_classes={self.model['num_classes']}' contradicts the classes file of "
                    f"{self.data_root} ({dataset.num_classes} classes); the classes come from the data: drop it"
                )
        try:
            model = p.model.replace(**{**self.model, "num_classes": dataset.num_classes})
        except TypeError as e:
            raise DanetError(f"bad model override: {e}; valid keys: {', '.join(_names(ModelConfig))}") from e
        return p.replace(schedule=schedule, dataset=dataset, model=model, ratio_range=tuple(r.data.ratio_range))

    def validate(self) -> RunConfig:
        """Range checks a type cannot express; DanetError naming the setting. Returns self."""
        check_run(self)
        return self

    # ---- YAML --------------------------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        return yaml.safe_dump(to_dict(self), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the YAML atomically (temp file in the same folder, then rename)."""
        atomic_write_text(Path(path), self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise DanetError(f"config file {str(path)!r} not found; pass a preset name or an existing .yaml file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            hint = ""
            if path.suffix in (".pth", ".pt", ".ckpt"):
                hint = (
                    " (a checkpoint: continue its run with --resume CKPT, or start from it with --set init_checkpoint="
                )
                hint += "CKPT)"
            raise DanetError(f"{path} is not a YAML text file{hint}; pass a preset name or a .yaml config") from None
        except yaml.YAMLError as e:
            raise DanetError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(data, dict):
            raise DanetError(f"{path} must hold a mapping of run settings (e.g. 'preset: danet_tiny_synthetic')")
        if "preset" not in data:  # NOTE: not the field's default: a config for ADE20K would train the synthetic data
            raise DanetError(f"{path} names no preset; add a line 'preset: NAME' (see danet models)")
        return from_dict(data)


# ---- (de)serialisation with type checks ---------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict:
    """Plain dict (tuples as lists) of a config dataclass."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(data: dict, cls: type = RunConfig, prefix: str = "") -> Any:
    """Build a config dataclass from a dict, checking every key and value; DanetError names the valid keys."""
    if cls is ScheduleConfig and "loss_images" not in data and RECORDED <= set(data):
        # NOTE: a run's recorded config (config.yaml, a checkpoint's) lists every schedule setting; one from before
        # loss_images existed trained with one group per process: resumed or rerun, it must go on so
        data = {**data, "loss_images": 0}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise DanetError(f"unknown setting {name!r}; valid keys: {', '.join(valid_keys(cls, prefix))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise DanetError(
                    f"setting {name!r} must be a mapping; valid keys: {', '.join(valid_keys(tp, name + '.'))}"
                )
            kwargs[key] = from_dict(value, tp, name + ".")
        elif key == "model" and cls is RunConfig:
            if not isinstance(value, dict):
                raise DanetError(
                    f"setting 'model' must be a mapping of ModelConfig fields: {', '.join(_names(ModelConfig))}"
                )
            kwargs[key] = {k: _check_model_value(k, v) for k, v in value.items()}
        else:
            kwargs[key] = coerce(name, value, tp)
    return cls(**kwargs)


def valid_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, e.g. 'schedule.epochs', 'model.<ModelConfig field>'."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        elif name == "model" and cls is RunConfig:
            keys.append(f"{prefix}model.<{'|'.join(_names(ModelConfig))}>")
        else:
            keys.append(prefix + name)
    return keys


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert: int -> float, list -> tuple) `value` against the type hint `tp`."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (UnionType, typing.Union):
        if value is None and NoneType in args:
            return None
        inner = [a for a in args if a is not NoneType]
        return coerce(name, value, inner[0])
    if origin is tuple:
        if isinstance(value, int | float):  # "crop_size=64" -> (64, 64)
            value = [value] * len(args)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise DanetError(f"setting {name!r} needs {len(args)} values like [{', '.join(a.__name__ for a in args)}]")
        return tuple(coerce(name, v, a) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if not isinstance(value, bool):
            raise DanetError(f"setting {name!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DanetError(f"setting {name!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # NOTE: YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DanetError(f"setting {name!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DanetError(f"setting {name!r} must be a string, got {value!r}")
        if name in CHOICES and not chosen(name, value):
            raise DanetError(not_chosen(name, value))
        return value
    return value


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_model_value(key: str, value: Any) -> Any:
    hints = typing.get_type_hints(ModelConfig)
    if key not in hints:
        raise DanetError(f"unknown setting 'model.{key}'; valid model keys: {', '.join(_names(ModelConfig))}")
    return coerce(f"model.{key}", value, hints[key])


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `key=value` strings (dotted keys, YAML values: `schedule.epochs=2`, `data.crop_size=[64,64]`)."""
    data = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DanetError(f"bad --set {item!r}: use key=value, e.g. schedule.epochs=2; valid keys: {_keys_line()}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and value.lower() == "none":
            value = None
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise DanetError(f"unknown setting {key!r}; valid keys: {_keys_line()}")
            node = node[part]
        if parents != ["model"] and leaf not in node:
            raise DanetError(f"unknown setting {key!r}; valid keys: {_keys_line()}")
        node[leaf] = value
    return from_dict(data)


def _keys_line() -> str:
    return ", ".join(valid_keys())


def is_config_file(preset_or_yaml: str) -> bool:
    """Whether `danet train NAME` names a run config file (a .yaml, or any existing file) rather than a preset."""
    return preset_or_yaml.endswith((".yaml", ".yml")) or Path(preset_or_yaml).is_file()


def load_run_config(preset_or_yaml: str, overrides: list[str] | None = None, **fields: Any) -> RunConfig:
    """A preset name or a YAML file, then `key=value` overrides, then explicit fields (None skipped)."""
    if is_config_file(preset_or_yaml):
        cfg = RunConfig.load(preset_or_yaml)
    else:
        get_preset(preset_or_yaml)  # DanetError with the valid names
        cfg = RunConfig(preset=preset_or_yaml)
    cfg = apply_overrides(cfg, overrides or [])
    for k, v in fields.items():  # NOTE: after --set: an option given by its own flag (--work-dir) wins
        if v is not None:
            setattr(cfg, k, v)
    cfg.base_preset()  # validates the preset name of a YAML file
    return cfg.validate()
