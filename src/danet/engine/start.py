"""What a run starts from: its ImageNet backbone (downloaded once per machine) or whole-model weights
(`init_checkpoint`, whose structure decides the model's; with the data's own classes, all but the classifiers)."""

from __future__ import annotations

from pathlib import Path

from .. import checkpoints
from ..config import RunConfig
from ..errors import DanetError
from ..models.danet import DANet
from . import distributed

# the ModelConfig fields a checkpoint's weights decide (checkpoints.load_model takes them from the weights)
WEIGHT_FIELDS = ("num_classes", "depth", "stem", "base_channels", "stem_channels", "head_channels", "key_channels",
                 "aux_channels", "pam_bias", "aux")  # fmt: skip


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
                print(f"note: init_checkpoint {why}: new classifiers, the rest from the checkpoint")
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
