"""`danet data`: prepare (convert) a dataset's labels, check a dataset, or make the bundled synthetic data.

danet data prepare voc-aug --voc data/VOCdevkit --sbd data/benchmark_RELEASE [--overwrite]
danet data prepare cityscapes data/cityscapes [--overwrite]
danet data check danet_r50-d8_ade20k --data-root data/ade [--split training] [--jobs 4]
danet data synthetic [--root DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import DanetError


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = sub.add_parser("prepare", help="convert published label formats into the ones the readers expect")
    psub = prep.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    va = psub.add_parser("voc-aug", help="SBD .mat masks -> SegmentationClassAug PNGs, and trainaug.txt")
    va.add_argument("--voc", required=True, help="VOCdevkit (or VOC2012) folder")
    va.add_argument("--sbd", required=True, help="SBD benchmark_RELEASE folder (with dataset/cls/*.mat)")
    va.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    cs = psub.add_parser("cityscapes", help="*_gtFine_labelIds.png -> *_gtFine_labelTrainIds.png (19 classes)")
    cs.add_argument("root", help="Cityscapes root (with leftImg8bit/ and gtFine/)")
    cs.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    for p in (va, cs):
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    chk = sub.add_parser("check", help="walk a dataset and list every fault; exit status 1 if there are any")
    chk.add_argument("preset", help="preset name (its dataset is checked), e.g. danet_r50-d8_ade20k")
    chk.add_argument("--data-root", help="dataset root (default for the synthetic preset: the bundled data)")
    chk.add_argument(
        "--dataset",
        choices=("preset", "folder"),
        default="preset",
        help="folder: a folder dataset with its own classes file (as data.dataset=folder in training)",
    )
    chk.add_argument("--split", action="append", help="split to check (repeatable; default: train and val)")
    chk.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    chk.add_argument("--no-progress", action="store_true", help="no progress bar")

    syn = sub.add_parser("synthetic", help="generate the bundled synthetic dataset (once) and print its folder")
    syn.add_argument("--root", help="cache folder (default $DANET_CACHE or ~/.cache/danet)")
    for p in (va, cs, chk, syn):  # NOTE: also after the action, as every other command takes it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


def run_cli(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        from .prepare import prepare_cityscapes, prepare_voc_aug

        progress = not args.no_progress
        if args.dataset == "voc-aug":
            report = prepare_voc_aug(args.voc, args.sbd, overwrite=args.overwrite, progress=progress)
        else:
            report = prepare_cityscapes(args.root, overwrite=args.overwrite, progress=progress)
        print(report.summary())
        return 0
    if args.data_command == "check":
        from ..presets import get_preset
        from . import data_root, own_classes, resolve_split
        from .check import check_dataset, format_report

        info = get_preset(args.preset).dataset
        if args.dataset == "folder":
            info = own_classes(args.data_root, info)
        root = data_root(info, args.data_root)
        splits = (
            list(dict.fromkeys(resolve_split(info, s, root) for s in args.split)) if args.split else None
        )  # once each
        if args.jobs < 1:
            raise DanetError(f"--jobs must be at least 1 (worker processes), got {args.jobs}")
        report = check_dataset(info, root, splits, jobs=args.jobs, progress=not args.no_progress)
        print(format_report(report, info))
        return 0 if report.ok else 1
    if args.data_command == "synthetic":
        from .synthetic import ensure_synthetic

        print(ensure_synthetic(Path(args.root) if args.root else None))
        return 0
    print(f"unknown action {args.data_command}", file=sys.stderr)
    return 2
