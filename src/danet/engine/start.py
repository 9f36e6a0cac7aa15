"""How a run starts: what it continues (a resume, a torchrun restart) or starts from (its ImageNet backbone,
downloaded once per machine, or whole-model weights: `init_checkpoint`, whose structure decides the model's; with
the data's own classes, all but the classifiers), its datasets, loader processes and kernels."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import checkpoints
from ..config import RunConfig, from_dict, to_dict
from ..errors import DanetError, note, short
from ..models.danet import WEIGHTS_DECIDE, DANet
from . import distributed

# the ModelConfig fields a checkpoint decides: its weights', and align_corners (how they were trained to be resized)
# from its config
WEIGHT_FIELDS = (*WEIGHTS_DECIDE, "align_corners")


def backbone_source(cfg: RunConfig, preset, info: distributed.DistInfo | None = None) -> Path | None:
    """The local file of the run's ImageNet backbone, downloaded where it is a URL (once into the cache, by each
    machine's first process). None: random backbone weights (`backbone_weights` none, a preset without one, or
    "imagenet" with init_checkpoint, whose backbone comes with it)."""
    from .. import zoo

    src = cfg.backbone_weights
    if src in (None, "none") or (src == "imagenet" and (cfg.init_checkpoint or not preset.backbone_url)):
        return None
    url = preset.backbone_url if src == "imagenet" else src
    if not url.startswith(("http://", "https://", "file://")):
        return Path(url)
    dest = zoo.default_cache() / Path(url.split("?")[0]).name
    if (info is None or info.local_rank == 0) and not dest.is_file():  # NOTE: each machine's first process
        try:
            zoo.fetch(url, dest, progress=cfg.progress)
        except DanetError as e:  # NOTE: its own line names the URL, the reason and where the file would go
            raise DanetError(
                f"{e} (the run's ImageNet backbone; or pass a copy with --set backbone_weights=FILE, or --set "
                "backbone_weights=none to start from random weights)"
            ) from None
    distributed.barrier()  # NOTE: the other processes of each machine read the file its first one wrote
    return dest


def build_model(
    cfg: RunConfig, preset, backbone: Path | None = None, main: bool = True, resuming: bool = False
) -> DANet:
    """The run's DANet, its backbone from `backbone` (see `backbone_source`). From `init_checkpoint` the weights
    decide the structure: a field set explicitly in `cfg.model` that they contradict is an error; other
    differences from the preset go into `cfg.model`, so that config.yaml (written after this) tells the structure
    that trains. `resuming`: the structure of `cfg` (a resumed run's, which recorded it) with random weights, to be
    replaced by the run's own (init_checkpoint is not read again)."""
    if cfg.init_checkpoint and not resuming:
        ck = checkpoints.read_checkpoint(cfg.init_checkpoint)
        n = checkpoints.infer_config(ck.state_dict, ck.path.name, ck.source)["num_classes"]
        # NOTE: with the data's own classes the classifiers (the 1x1 convs to the classes) cannot come from another
        # class list: they start anew, everything else is the checkpoint's (fine-tuning)
        renamed = ck.classes is not None and len(ck.classes) == n and ck.classes != list(preset.classes)
        new_classes = cfg.data.dataset == "folder" and (n != preset.num_classes or renamed)
        if n != preset.num_classes and not new_classes:
            raise DanetError(
                f"init_checkpoint {cfg.init_checkpoint} has {n} classes, the data of preset {cfg.preset} "
                f"{preset.num_classes}; to fine-tune it on a folder dataset with its own classes add --set "
                "data.dataset=folder (its classifiers then start anew), or pick a preset with its classes"
            )
        model = checkpoints.load_model(ck, preset.model.replace(num_classes=n) if new_classes else preset.model)
        got = {k: getattr(model.cfg, k) for k in WEIGHT_FIELDS if getattr(model.cfg, k) != getattr(preset.model, k)}
        if new_classes:
            got.pop("num_classes", None)
        if clash := [k for k in got if k in cfg.model]:
            have = ", ".join(f"model.{k}={got[k]}" for k in clash)
            asked = ", ".join(f"{cfg.model[k]}" for k in clash)
            raise DanetError(
                f"init_checkpoint {cfg.init_checkpoint} holds a model with {have}, not the {asked} asked for; drop "
                "those settings or start from another checkpoint"
            )
        cfg.model.update(got)
        if new_classes:
            model = new_classifiers(model, preset.num_classes)
            if main:
                k = preset.num_classes
                why = f"has {n} classes, the data {k}" if n != k else "names other classes than the data's"
                note(f"init_checkpoint {why}: new classifiers, the rest from the checkpoint")
    else:
        model = DANet(preset.model)
    if backbone is not None:
        checkpoints.load_backbone(model, backbone)
    return model


# the 1x1 convolutions to the classes (main, PAM, CAM, auxiliary): the only class-dependent weights
CLASSIFIERS = ("head.cls.", "head.cls_pam.", "head.cls_cam.", "aux.cls.")


def new_classifiers(model: DANet, num_classes: int) -> DANet:
    """`model` for `num_classes` classes: its weights, but new (freshly initialised) classifiers."""
    new = DANet(model.cfg.replace(num_classes=num_classes))
    keep = {k: v for k, v in model.state_dict().items() if not k.startswith(CLASSIFIERS)}
    missing, unexpected = new.load_state_dict(keep, strict=False)
    assert not unexpected and all(k.startswith(CLASSIFIERS) for k in missing), (missing, unexpected)
    return new


def set_deterministic(on: bool, compiling: bool = False) -> None:
    """Deterministic kernels (cuDNN, cuBLAS, scatter/index ops) or the fast ones (cuDNN benchmark)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != on:
        setter = getattr(torch._C, "_set_deterministic_algorithms", None)
        if compiling or setter is None:
            torch.use_deterministic_algorithms(on, warn_only=True)
        else:  # NOTE: the public call also imports torch._inductor (seconds of start-up) just to set a flag there
            setter(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def build_datasets(cfg: RunConfig, preset, seed: int):
    """(train, val) datasets of the run; the synthetic preset generates its data when no root is given."""
    from .. import data  # NOTE: lazy, so `danet train --help` does not import the data readers

    # NOTE: the preset's own split names: "train" would name VOC's train.txt where the data has one (trainaug is
    # what the preset trains on; `danet test --split train` is how VOC's own list is reached)
    info = preset.dataset
    train_ds = data.build_dataset(preset, cfg.data_root, info.train_split, train=True, seed=seed)
    val_ds = data.build_dataset(preset, cfg.data_root, info.val_split, train=False, seed=seed)
    return train_ds, val_ds


def check_compatible(saved: dict, cfg: RunConfig) -> list[str]:
    """Names of the settings that differ from the checkpoint's run (and so change the result of a resume)."""
    old = to_dict(from_dict(saved).resolve())
    new = to_dict(cfg)
    keys = ["preset", "seed", "loss", "amp", "aux_weight", "schedule", "data", "model"]
    diff = [k for k in keys if old.get(k) != new.get(k)]
    same_data = lambda d: {k: v for k, v in d.items() if k not in ("num_workers", "prefetch")}  # noqa: E731
    if "data" in diff and same_data(old["data"]) == same_data(new["data"]):  # how batches arrive changes nothing
        diff.remove("data")
    return diff


def loader_workers(requested: int | None, device: torch.device) -> int:
    """`data.num_workers`, or when unset: 2 on the CPU (its cores also run the model); on a GPU this process's share
    of the cores less one (torchrun's LOCAL_WORLD_SIZE processes share the machine), at least 2 and at most 8."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 2
    share = distributed.cores_per_process()
    return max(2, min(8, share - 1))


def restart_source(cfg: RunConfig, resume: str | Path | None, info: distributed.DistInfo) -> str | Path | None:
    """What a torchrun restart (--max-restarts) continues from: the work dir's last.pth where this invocation wrote
    it (its `run` token), else what the command asked for (a fresh run, or --resume's file).

    NOTE: a last.pth that an earlier run left (an overwrite=true run restarted before its first checkpoint) is not
    this run's, and a --resume run restarted after its first checkpoint continues from that one, not the file again.
    """
    if not distributed.restart_count():
        return resume
    last = Path(cfg.work_dir) / "last.pth"
    if not last.is_file():
        return resume
    if info.run is None:  # nothing tells invocations apart: a last.pth is taken to be this run's
        return resume or last
    state = checkpoints.read_checkpoint(last).train_state or {}
    return last if state.get("run") == info.run else resume


def read_resume(resume: str | Path, cfg: RunConfig, preset, is_main: bool = True) -> checkpoints.Checkpoint:
    """The checkpoint a run resumes from; DanetError unless it holds a training state (and, for a folder dataset,
    the classes that file names now). Warns (main process) of settings that differ from its run's."""
    ckpt = checkpoints.read_checkpoint(resume)
    if not ckpt.train_state:
        raise DanetError(f"{resume} holds no training state (best.pth is weights only); resume from last.pth")
    saved = ckpt.classes
    if cfg.data.dataset == "folder" and saved is not None and saved != list(preset.classes):
        raise DanetError(
            f"{resume} trained on {len(saved)} classes {short(saved)}, but the classes file of {cfg.data_root} now "
            f"names {preset.num_classes} {short(preset.classes)}; put the run's classes back in that file, or start "
            f"a new run from it (--set init_checkpoint={resume})"
        )
    if is_main and (diff := check_compatible(ckpt.meta.get("config", {}), cfg)):
        print(f"warning: resuming with settings that differ from the checkpoint's run: {', '.join(diff)}")
    return ckpt


def capture_state(
    optimizer, scheduler, scaler, it: int, epoch: int, ipe: int, best: float, best_iter: int | None, pending: bool
) -> dict:
    """A checkpoint's training state: optimiser, schedule, grad scaler and RNG states, iteration `it` in `epoch`
    (epochs of `ipe`), the best mIoU so far and its iteration, whether the epoch's validation is still `pending`."""
    from .sampling import capture_rng_states

    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng": capture_rng_states(),
        "iter": it,
        "epoch": epoch,
        "iters_per_epoch": ipe,
        "best_miou": best,
        "best_iter": best_iter,
        "validation_pending": pending,
    }


def restore_state(state: dict, optimizer, scheduler, scaler) -> tuple[int, float, int | None, bool]:
    """Put a checkpoint's training state back into the optimiser, schedule, grad scaler and RNGs; returns (its
    iteration, the best mIoU so far and its iteration, whether it stopped while validating its last epoch)."""
    from .sampling import restore_rng_states

    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    restore_rng_states(state["rng"])
    best_iter = state.get("best_iter")
    return int(state["iter"]), float(state["best_miou"]), best_iter, bool(state.get("validation_pending"))


def check_resume_point(
    state: dict, resume, sch, ipe: int, full_batches: int, replicas: int, stop_iter: int | None = None
) -> None:
    """DanetError unless the training state `state` resumes inside this run's schedule (`sch.epochs` epochs of
    `ipe` iterations; a finished run, at the last iteration, resumes to no further work) and before its `stop_iter`,
    with epochs of its length. `full_batches`: the train images' whole batches, the epoch length of states written
    before the padding over the reference's `replicas` GPUs, which recorded none."""
    total = sch.epochs * ipe
    if (done := int(state["iter"])) > total:
        raise DanetError(
            f"{resume} is at iteration {done}, past this run's schedule, which ends at {total} ({sch.epochs} "
            f"epochs of {ipe}): nothing left to train; raise schedule.epochs to train further"
        )
    validating = stop_iter == done and state.get("validation_pending")  # NOTE: that validation is done, then it stops
    if stop_iter is not None and stop_iter <= done < total and not validating:  # it would train on past stop_iter
        raise DanetError(
            f"stop_iter={stop_iter} is not after {resume}'s iteration {done}: nothing to train up to it; raise it, "
            "or drop it (--set stop_iter=none) to train to the end"
        )
    # NOTE: a state of another epoch length would resume at the wrong place of its epoch (and of the data order)
    was = state.get("iters_per_epoch", min(full_batches, sch.iters_per_epoch or full_batches))
    if was != ipe:
        why = "" if "iters_per_epoch" in state else f" (earlier versions did not pad them over {replicas} GPUs)"
        fits = isinstance(was, int) and 0 < was < ipe  # NOTE: the cap can only shorten this run's epochs
        remedy = f"--set schedule.iters_per_epoch={was}" if fits else "the run's own data and schedule settings"
        raise DanetError(
            f"{resume} was trained with epochs of {was} iterations, this run's are {ipe}{why}; resume with {remedy}"
        )
