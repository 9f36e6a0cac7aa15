"""`danet convert SRC DST [--preset NAME]`: an sssegmentation / mmsegmentation / danet checkpoint to this project's
format, with the structure read from the weights and the preset (classes, palette, output stride) attached; a file of
ours keeps the preset, classes and run settings it records unless --preset names another."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoints import dataset_for, infer_config, load_model, read_checkpoint, save_checkpoint
from .errors import DanetError

KEPT = ("preset", "classes", "palette", "mean", "std", "config")  # the meta a file of ours keeps when converted


def add_cli(parser) -> None:
    parser.add_argument("src", help="an sssegmentation / mmsegmentation / danet checkpoint (.pth)")
    parser.add_argument("dst", help="where to write this project's checkpoint")
    parser.add_argument("--preset", help="the preset it belongs to (class names, output stride); guessed if omitted")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")


def _guess_preset(path: Path, found: dict):
    """A preset named in the file name (e.g. ssseg's `danet_resnet50os8_ade20k_train.pth`) that fits the weights."""
    from .presets import ALIASES, PRESETS

    stem = path.stem
    for alias, pname in sorted({**{p: p for p in PRESETS}, **ALIASES}.items(), key=lambda kv: -len(kv[0])):
        p = PRESETS[pname]
        if alias in stem and p.model.num_classes == found["num_classes"] and p.model.depth == found["depth"]:
            return p
    return None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether `a` and `b` name one file (the same resolved path, or a link to it)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (or cannot be reached): not the same file
        return False


def run_cli(args) -> int:
    from .presets import DATASETS, get_preset

    if same_file(args.src, args.dst):
        raise DanetError(
            f"destination {args.dst} is the source checkpoint: converting in place would drop what the file holds "
            "beyond the weights (a run's training state); give another destination"
        )
    dst = Path(args.dst).expanduser()
    if (dst.exists() or dst.is_symlink()) and not dst.is_dir() and not args.force:
        raise DanetError(f"destination {args.dst} exists; give another file name, or add --force to replace it")
    ck = read_checkpoint(args.src)
    found = infer_config(ck.state_dict, ck.path.name, ck.source)
    # NOTE: a file of ours keeps what its meta records (its preset, classes, a run's settings such as its sizes)
    # unless --preset names one; its model_cfg (a run may have changed the preset's) decides the structure
    from_file = ck.source == "danet" and not args.preset
    kept = {k: ck.meta[k] for k in KEPT if ck.meta.get(k) is not None} if from_file else {}
    preset = get_preset(args.preset) if args.preset else None if "preset" in kept else _guess_preset(ck.path, found)
    how = "given" if args.preset else "from the file name" if preset else None
    model = load_model(ck, preset.model if preset else None, remedy="--preset")
    meta_cfg = ck.meta.get("model_cfg") or {}
    # NOTE: a file of ours converted from a toolbox's keeps that origin (its test resizes and merges as that
    # toolbox does: engine.evaluate.default_resize), also with --preset
    origin = ck.meta.get("source") if ck.source == "danet" and isinstance(ck.meta.get("source"), dict) else None
    extra = {"source": origin or {"format": ck.source, "file": ck.path.name}, **kept}
    if preset is None and "classes" not in extra:
        if ck.meta.get("classes"):
            extra.update(classes=list(ck.meta["classes"]), palette=ck.meta.get("palette"))
        elif ds := dataset_for(found["num_classes"]):
            extra.update(classes=list(DATASETS[ds].classes), palette=[list(c) for c in DATASETS[ds].palette])
    save_checkpoint(args.dst, model, preset, extra_meta=extra)
    cfg = model.cfg
    told = ck.meta.get("toolbox_model") or {}
    if preset or meta_cfg:
        os_note = f"{cfg.output_stride} (from the {'preset' if preset else 'file meta'})"
    elif "output_stride" in told:
        os_note = f"{cfg.output_stride} (from the file's {ck.source} config)"
    else:
        os_note = f"{cfg.output_stride} (default: {ck.source} files do not store it; pass --preset for a -d16 model)"
    print(f"source format : {ck.source} ({len(ck.state_dict)} tensors)")
    print(f"layout        : {cfg.layout} (PAM bias {cfg.pam_bias}, aux width {cfg.aux_channels if cfg.aux else '-'})")
    print(f"structure     : ResNet-{cfg.depth} {cfg.stem} stem, {cfg.num_classes} classes, output stride {os_note}")
    if cfg.align_corners:
        print("final resize  : align_corners=True (from the file's config; mmseg's 769x769 Cityscapes models)")
    named = f"{preset.name} ({how})" if preset else f"{kept['preset']} (from the file)" if "preset" in kept else None
    print(f"preset        : {named or 'none (pass --preset to attach one)'}")
    classes = (list(preset.classes) if preset else extra.get("classes")) or []
    print(f"classes       : {', '.join(map(str, classes[:5])) + (', ...' if len(classes) > 5 else '') or 'unknown'}")
    print(f"wrote {args.dst}")
    return 0
