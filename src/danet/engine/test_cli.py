"""`danet test PRESET --checkpoint CKPT [--data-root DIR] [--mode whole|slide] [--tta] [--amp bf16] [--channels-last]
[--json FILE]` (all options: `danet test --help`).

Evaluates a checkpoint on the preset's val split (REFERENCE.md, Metrics): per-class table, mIoU / mAcc / aAcc,
optionally multi-scale + flip (`--tta`, the preset's tta_scales) and sliding-window inference. Runs under torchrun
too (images sharded over the ranks, confusion matrix all-reduced).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

import torch

from ..errors import DanetError, short
from ..models.danet import ATTENTIONS
from .evaluate import TTA_MERGES, TTA_VIEWS
from .graphed import CUDA_GRAPHS_HELP, GraphedForward, with_forward_graphs
from .inference import AMP_DTYPES
from .logging import check_output_file, write_json


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", help="preset name (classes, sizes, TTA scales), e.g. danet_r50-d8_ade20k")
    parser.add_argument("--checkpoint", required=True, help="a danet, sssegmentation or mmsegmentation checkpoint")
    parser.add_argument("--data-root", help="dataset folder (default for danet_tiny_synthetic: the bundled data)")
    parser.add_argument(
        "--dataset",
        choices=("preset", "folder"),
        default="preset",
        help="folder: the data root is a folder dataset with its own classes file (as data.dataset=folder in training)",
    )
    parser.add_argument("--split", default="val", help="split to evaluate (default: the preset's val split)")
    parser.add_argument(
        "--mode", choices=("whole", "slide"), help="inference mode (default: the run's, else the preset's)"
    )
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="slide window (default: the crop size)")
    parser.add_argument(
        "--base-size",
        type=int,
        nargs=2,
        metavar=("LONG", "SHORT"),
        help="keep-ratio resize of the test images (default: the preset's, or the run's), e.g. 2049 1025 for mmseg's "
        "769x769 Cityscapes models",
    )
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide stride (default: 2/3 crop)")
    parser.add_argument("--tta", action="store_true", help="multi-scale (the preset's tta_scales) + flip")
    parser.add_argument("--scales", type=float, nargs="+", help="TTA scales (implies --tta), e.g. 0.75 1 1.25")
    parser.add_argument("--no-flip", action="store_true", help="TTA without the horizontal flip")
    add_view_options(parser)
    parser.add_argument(
        "--resize-logits",
        choices=("once", "twice"),
        help="whole image: the logits to the label size in one step (sssegmentation) or via the input size "
        "(mmsegmentation); default: twice for an mmsegmentation checkpoint, else once",
    )
    add_speed_options(parser)
    parser.add_argument("--limit", type=int, help="evaluate the first N images only")
    parser.add_argument(
        "--workers", type=int, help="processes reading the next images ahead (default: 0 on the CPU, 1-4 on a GPU)"
    )
    parser.add_argument("--json", help="write the metrics to this JSON file (atomically)")
    parser.add_argument("--plot", help="per-class IoU bar chart PNG (default: beside --json, else none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    """--amp, --conv, --norm, --channels-last, --cuda-graphs and --device, as `danet test` and `danet predict` take
    them."""
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype")
    parser.add_argument(
        "--conv", choices=("direct", "winograd"), default="direct", help="3x3 convolutions (winograd: faster on CPU)"
    )
    parser.add_argument(
        "--norm",
        choices=("native", "triton", "folded"),
        default="native",
        help="batch norm + ReLU (triton: fused kernels, CUDA; folded: into the convolutions, on CUDA one cuDNN call "
        "each with bias, residual and ReLU: the fastest on an H200, with --amp bf16, the same results to bf16 "
        "rounding; no faster on the CPU)",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="NHWC memory format (with --amp bf16 the fast layout on a GPU)"
    )
    parser.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (one GPU of several)")


def check_speed_options(args) -> None:
    """DanetError for speed options that exclude each other."""
    if args.norm == "folded" and args.conv == "winograd":
        from ..models.folded import WINOGRAD_REFUSED

        raise DanetError(WINOGRAD_REFUSED)


def check_view_options(args, tta: bool, what: str = "--tta") -> None:
    """DanetError for --tta-merge or --tta-views without the views of TTA (`what` makes them)."""
    for flag, value, verb in (("--tta-merge", args.tta_merge, "merges"), ("--tta-views", args.tta_views, "makes")):
        if value and not tta:
            raise DanetError(f"{flag} {value} {verb} the views of {what}; add --tta")


def add_view_options(parser: argparse.ArgumentParser) -> None:
    """--tta-merge, --tta-views and --attention, as `danet test` and `danet predict` take them."""
    parser.add_argument(
        "--tta-merge",
        choices=TTA_MERGES,
        help="TTA: average the views' logits (sssegmentation's test) or their softmax probabilities (mmsegmentation's "
        "rule); default: probs for an mmsegmentation checkpoint, else logits",
    )
    parser.add_argument(
        "--tta-views",
        choices=TTA_VIEWS,
        help="TTA: rescale the test-resized image (sssegmentation's test), the original image (mmsegmentation's "
        "tta_pipeline), or resize the original to the base size times each scale (mmsegmentation 0.x, its published "
        "ms+flip figures); default: original for an mmsegmentation checkpoint, else resized",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTIONS,
        help="position attention (default: the model's, fused; triton: one kernel over the whole value, CUDA with "
        "--amp bf16 / fp16)",
    )


def run_test(args) -> dict:
    """Evaluate as the arguments say; returns the metrics dict (with the settings under "settings")."""
    from ..checkpoints import load_model, read_checkpoint
    from ..data import build_dataset, data_root, with_own_classes
    from ..models.fused_norm import set_inference_norm, why_unused
    from ..models.triton_attention import set_inference_attention
    from ..models.winograd import set_inference_conv
    from ..presets import get_preset
    from ..safe_load import check_file
    from . import distributed
    from .evaluate import default_resize, default_tta, evaluate
    from .inference import check_slide, default_stride
    from .predict import run_eval_mode

    check_speed_options(args)
    preset = get_preset(args.preset)
    if args.dataset == "folder":
        preset = with_own_classes(preset, args.data_root)
    check_file(args.checkpoint)  # not found, or a folder (naming a checkpoint inside)
    stride = tuple(args.stride) if args.stride else None
    if args.base_size and min(args.base_size) < 1:
        raise DanetError(f"--base-size needs two positive sizes LONG SHORT, got {args.base_size}")
    if args.crop:  # NOTE: a bad window fails here, before the checkpoint is read (the run's crop may be the default)
        check_slide(tuple(args.crop), stride)
    if args.scales and not all(math.isfinite(s) and 0 < s <= MAX_SCALE for s in args.scales):
        raise DanetError(f"--scales must be factors in (0, {MAX_SCALE:g}] (e.g. 0.75 1 1.25), got {args.scales}")
    tta = args.tta or bool(args.scales)
    check_view_options(args, tta, "--tta (or --scales)")
    if args.no_flip and not tta:
        raise DanetError("--no-flip drops the flipped views of --tta (or --scales); add --tta, or leave it out")
    if args.limit is not None and args.limit < 1:
        raise DanetError(f"--limit must be at least 1 (the first N images), got {args.limit}")
    if args.plot and Path(args.plot).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise DanetError(f"--plot {args.plot}: give a .png (or .jpg) file name")
    outputs = output_paths(args)
    for what, out in outputs.items():  # fail before the evaluation, not after it
        check_output_file(out, "--plot" if what == "plot" and args.plot else "--json")
    ck = read_checkpoint(args.checkpoint)
    preset = run_preset(ck, preset, args.dataset)
    if args.base_size:
        preset = preset.replace(dataset=dataclasses.replace(preset.dataset, base_size=tuple(args.base_size)))
    mode = args.mode or run_eval_mode(ck, preset.name) or preset.eval_mode  # as the run validated
    if mode == "slide" and args.resize_logits:
        raise DanetError(
            "--resize-logits sets how whole-image logits reach the label size; slide windows' logits are at the "
            "image's size already: leave it out, or add --mode whole"
        )
    if mode != "slide" and (args.crop or args.stride):
        raise DanetError(
            f"--crop and --stride set the sliding window, but this test runs {mode} (the run's or preset's mode unless "
            "--mode); add --mode slide, or leave them out"
        )
    crop = tuple(args.crop) if args.crop else preset.crop_size
    if mode == "slide" or stride:
        check_slide(crop, stride)
    resize_logits = args.resize_logits or default_resize(ck)
    own_views, own_merge = default_tta(ck)  # the checkpoint's toolbox's own multi-scale + flip
    tta_views, tta_merge = args.tta_views or own_views, args.tta_merge or own_merge
    info = distributed.setup(args.device)
    threads = torch.get_num_threads()
    if info.device.type == "cpu":
        torch.set_num_threads(distributed.cpu_threads(None))
    try:
        remedy = "data" if args.dataset == "folder" else "test"
        model = load_model(ck, preset.model, remedy=remedy).to(info.device).eval()
        output_stride = model.cfg.output_stride  # NOTE: the preset's or its own run's (run_preset)
        set_inference_conv(model, args.conv)
        set_inference_norm(model, args.norm, AMP_DTYPES.get(args.amp, torch.float32))
        attention = set_inference_attention(model, args.attention, args.amp)  # what runs (the settings record it)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if args.cuda_graphs:
            model = with_forward_graphs(model, info.device)
        dataset = build_dataset(preset, args.data_root, args.split, train=False)
        check_outputs_apart(outputs, Path(args.checkpoint), dataset.files, data_root(preset.dataset, args.data_root))
        scales = tuple(args.scales) if args.scales else tuple(preset.tta_scales) if args.tta else (1.0,)
        flip = tta and not args.no_flip
        t0 = time.time()
        cm = evaluate(
            model,
            dataset,
            preset.num_classes,
            device=info.device,
            mode=mode,
            crop=crop,
            stride=stride,
            scales=scales,
            flip=flip,
            amp=args.amp,
            channels_last=args.channels_last,
            ignore_index=preset.dataset.ignore_index,
            limit=args.limit,
            progress=not args.no_progress,
            desc="test",
            workers=args.workers,
            merge=tta_merge,
            resize_logits=resize_logits,
            views=tta_views,
        )
        metrics = cm.compute()
        n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
        cm.check_labelled(n, dataset.split, preset.dataset)
        metrics["settings"] = {
            "preset": preset.name,
            "checkpoint": str(args.checkpoint),
            "split": dataset.split,  # the dataset's own name of it ("val" -> "validation" for ADE20K)
            "images": n,
            "mode": mode,
            "crop": list(crop) if mode == "slide" else None,
            "stride": list(stride or default_stride(crop)) if mode == "slide" else None,
            "scales": list(scales),
            "flip": flip,
            "tta_merge": tta_merge if tta else None,
            "tta_views": tta_views if tta else None,
            "resize_logits": resize_logits if mode != "slide" else None,
            "base_size": list(preset.base_size),
            "output_stride": output_stride,
            "amp": args.amp,
            "conv": args.conv,
            "norm": "native" if args.norm == "triton" and why_unused(info.device) else args.norm,
            "attention": attention,
            "channels_last": args.channels_last,
            "cuda_graphs": isinstance(model, GraphedForward),
            "seconds": round(time.time() - t0, 2),
        }
        if info.is_main:
            print(cm.table(list(preset.classes)))
            print(f"mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f}  ({n} images)")
            if args.json:
                write_json(args.json, metrics)
            plot = outputs.get("plot")
            what = f"{preset.title} ({'TTA ' if len(scales) > 1 or flip else ''}{mode})"
            if plot:
                from ..viz import plot_class_iou

                plot_class_iou(preset.classes, metrics["IoU"], plot, f"{what}: per-class IoU", preset.palette,
                               metrics["mIoU"])  # fmt: skip
            if args.json:
                from ..viz import plot_confusion

                confusion = outputs["confusion"]
                plot_confusion(preset.classes, cm.mat.cpu().numpy(), confusion, f"{what}: confusion")
        return metrics
    finally:
        torch.set_num_threads(threads)
        distributed.cleanup()


def run_preset(ck, preset, dataset: str):
    """`preset` as the run that wrote checkpoint `ck` used it: a `danet train` run of this preset tested at the base
    and crop sizes and the output stride it trained and validated with; its classes checked against a folder
    dataset's own (`dataset`)."""
    from .predict import run_sizes

    if dataset == "preset" and ck.run_data.get("dataset") == "folder":
        raise DanetError(
            f"{ck.path} was trained on a folder dataset with its own classes (data.dataset=folder); test it with "
            "--dataset folder --data-root DIR"
        )
    saved = ck.classes
    if dataset == "folder" and saved is not None and saved != list(preset.classes):
        raise DanetError(
            f"{ck.path.name} was trained on {len(saved)} classes {short(saved)}, but the data's classes file names "
            f"{preset.num_classes} {short(preset.classes)}; test it on data of its classes"
        )
    sizes = run_sizes(ck, preset.name)
    preset = preset.replace(model=ck.run_structure(preset.name, preset.model))
    return preset.replace(dataset=dataclasses.replace(preset.dataset, **sizes)) if sizes else preset


MAX_SCALE = 8.0  # a TTA view 8x the base size is already 64x the pixels


def output_paths(args) -> dict[str, Path]:
    """The files `danet test` writes: the metrics JSON, the per-class IoU chart, the confusion picture."""
    out = {}
    if args.json:
        out["json"] = Path(args.json)
        out["confusion"] = Path(str(Path(args.json).with_suffix("")) + "_confusion.png")
    if args.plot or args.json:
        out["plot"] = Path(args.plot or str(Path(args.json).with_suffix("")) + "_per_class_iou.png")
    return out


def check_outputs_apart(outputs: dict[str, Path], checkpoint: Path, inputs, data_root: Path | None = None) -> None:
    """DanetError, before anything is written, where an output would replace the checkpoint, a file of the dataset
    (anything under its root: images and masks of any split, the classes file, split lists) or another output
    (`--json x.json --plot x_confusion.png`)."""
    names = {"json": "--json", "plot": "--plot", "confusion": "the confusion picture beside --json"}
    seen: dict[Path, str] = {}
    for what, path in outputs.items():
        if (real := path.resolve()) in seen:
            raise DanetError(f"{seen[real]} and {names[what]} would both write {path}; give them different names")
        seen[real] = names[what]
    taken = {checkpoint.resolve(): "the checkpoint being tested"}
    taken.update({Path(f).resolve(): "a file of the dataset" for pair in inputs for f in pair})
    root = Path(data_root).resolve() if data_root is not None else None
    for what, path in outputs.items():
        hard_link = path.exists() and checkpoint.exists() and os.path.samefile(path, checkpoint)
        inside = root is not None and root in path.resolve().parents
        if (why := taken.get(path.resolve())) or hard_link or inside:
            why = why or ("the checkpoint being tested" if hard_link else f"inside the dataset folder {root}")
            raise DanetError(f"{names[what]} would write {path}, {why}; write it elsewhere (nothing was written)")


def run_cli(args) -> int:
    run_test(args)
    return 0
