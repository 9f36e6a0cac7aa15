"""`danet train PRESET_OR_CONFIG.yaml [--data-root DIR] [--work-dir DIR] [--set key=value ...] [--resume [CKPT]]`.

Many GPUs: `torchrun --nproc_per_node N -m danet.cli train ...` (the preset batch is the global batch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import RunConfig, apply_overrides, from_dict, is_config_file, load_run_config, valid_keys
from ..errors import DanetError
from ..presets import get_preset

EPILOG = """examples:
  danet train danet_tiny_synthetic --work-dir runs/synthetic
  danet train danet_r50-d8_ade20k --data-root data/ade --work-dir runs/ade --set amp=bf16 --set channels_last=true
  danet train runs/ade/config.yaml --resume            # continue from runs/ade/last.pth
  torchrun --nproc_per_node 4 -m danet.cli train danet_r50-d8_cityscapes --data-root data/cityscapes

settings for --set (dotted keys, YAML values):
  """


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG + "\n  ".join(_wrap(valid_keys()))
    parser.add_argument(
        "config", nargs="?", help="a preset name (see `danet models`) or a run config .yaml (e.g. a work dir's)"
    )
    parser.add_argument("--data-root", help="dataset folder (default for danet_tiny_synthetic: the bundled data)")
    parser.add_argument("--work-dir", help="where checkpoints, logs, metrics and pictures go (default runs/<preset>)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CKPT",
        help="continue a run exactly: from CKPT, or from WORK_DIR/last.pth when no path is given",
    )


def _wrap(keys: list[str], width: int = 100) -> list[str]:
    lines, cur = [], ""
    for k in keys:
        if cur and len(cur) + len(k) + 2 > width:
            lines.append(cur + ",")
            cur = ""
        cur = f"{cur}, {k}" if cur else k
    return [*lines, cur]


def resolve_args(args) -> tuple[RunConfig, Path | None]:
    """The run config and the checkpoint to resume from (None: a fresh run).

    A resume continues the checkpoint's own run: its settings come from the checkpoint (a preset name on the command
    line must be that run's), with `--set` on top, and its outputs go beside it (or to --work-dir). A config .yaml
    is taken as written."""
    resume = None
    is_yaml = args.config is not None and is_config_file(args.config)
    if args.config is None and (not args.resume or args.resume == "auto"):
        raise DanetError("name a preset or a config .yaml (e.g. danet train danet_tiny_synthetic), or --resume CKPT")
    set_dir = _set_work_dir(args)
    if args.resume and not is_yaml:
        if args.resume != "auto":
            resume = Path(args.resume)
            work = args.work_dir or set_dir or str(resume.parent)
        else:  # the work dir a fresh run of this name writes to
            work = args.work_dir or set_dir or str(Path("runs") / args.config)
            resume = Path(work) / "last.pth"
        cfg = _config_of_checkpoint(resume)
        if args.config is not None and get_preset(args.config).name != get_preset(cfg.preset).name:
            raise DanetError(
                f"{resume} is a run of preset {cfg.preset}, not {args.config}; resume it with danet train --resume "
                f"{resume}"
            )
        cfg = apply_overrides(cfg, args.overrides)
        cfg.work_dir = work
        if args.data_root:
            cfg.data_root = args.data_root
        cfg.validate()
    else:
        cfg = load_run_config(args.config, args.overrides, data_root=args.data_root, work_dir=args.work_dir)
        if args.work_dir is None and not is_yaml and set_dir is None:
            cfg.work_dir = str(Path("runs") / cfg.preset)
        # NOTE: a work dir's config.yaml resumes that folder's run, also moved or copied (its work_dir says where
        # the run was, perhaps relative to another folder)
        here = Path(args.config).parent if is_yaml and args.work_dir is None and set_dir is None else None
        if args.resume == "auto" and here and (here / "last.pth").exists():
            cfg.work_dir = str(here)
        elif args.resume == "auto" and here and (here / "log.jsonl").exists():  # a work dir, but no checkpoint yet
            raise DanetError(
                f"cannot resume: {here} holds no last.pth (its run stopped before its first epoch ended); start it "
                f"again: danet train {args.config}"
            )
        if args.resume:
            resume = _resume_file(Path(cfg.work_dir) / "last.pth" if args.resume == "auto" else Path(args.resume))
        # NOTE: a torchrun restart (--max-restarts) continues this run's own last.pth: train.restart_source
    if resume is not None and not any(o.startswith("stop_iter=") for o in args.overrides):
        cfg.stop_iter = None  # an interrupted run's stop point does not carry over
    return cfg, resume


def _set_work_dir(args) -> str | None:
    """The work dir given as `--set work_dir=DIR` (parsed as --set parses it), if any."""
    sets = [o for o in args.overrides if o.startswith("work_dir=")]
    return apply_overrides(RunConfig(), sets).work_dir if sets else None


def _resume_file(path: Path) -> Path:
    if path.is_dir():
        raise DanetError(f"cannot resume: {path} is a directory; pass its last.pth (or --resume with no path)")
    if not path.is_file():
        raise DanetError(f"cannot resume: {path} does not exist (a run writes last.pth at every epoch end)")
    return path


def _config_of_checkpoint(path: Path) -> RunConfig:
    from ..checkpoints import read_checkpoint

    saved = read_checkpoint(_resume_file(path)).meta.get("config")
    if not isinstance(saved, dict):
        raise DanetError(f"{path} holds no run config (not a danet train checkpoint); resume a run's last.pth")
    return from_dict(saved)


def run_cli(args) -> int:
    from .train import train

    cfg, resume = resolve_args(args)
    summary = train(cfg, resume)
    m = summary["metrics"]
    if summary["rank"]:  # the first process reports
        return 0
    if summary["stopped"]:
        last = Path(cfg.work_dir) / "last.pth"
        print(f"stopped at iteration {summary['iter']} (stop_iter); continue with --resume {last}")
    elif m:
        took, start = f"{summary['seconds'] / 60:.1f} min", summary.get("start_iter")
        took = f"({summary['iter'] - start} of them in {took}, after iteration {start})" if start else f"in {took}"
        print(
            f"done: {summary['iter']} iterations {took}; final mIoU {m['mIoU']:.2f} "
            f"mAcc {m['mAcc']:.2f} aAcc {m['aAcc']:.2f}; best mIoU {summary['best_miou']:.2f}; "
            f"outputs in {cfg.work_dir}"
        )
    return 0
