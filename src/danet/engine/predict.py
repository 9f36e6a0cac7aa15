"""`danet predict --checkpoint CKPT INPUT... --out DIR [--overlay] [--preset NAME]`: segment your own images.

Inputs are files, folders (their images, recursively) or glob patterns. Each image is keep-ratio resized to the
preset's base size (as in testing), segmented, and the labels brought back to the ORIGINAL resolution; written as
`DIR/<name>.png`, a palette PNG whose pixel values are the class indices, and with --overlay `DIR/<name>_overlay.jpg`.
Classes, palette and normalisation come from the checkpoint's meta (or --preset).

Large inputs: an image over `--max-pixels` (default 2048 x 1024, a Cityscapes frame) after resizing (with TTA views
of the original image: its largest view) is segmented in sliding windows of the crop size. The labels are those
`danet test` computes (logits resized to the original size, once or, for an mmseg checkpoint, via the input size;
with `--tta` the views merged there as the checkpoint's toolbox merges them: sssegmentation's mean logits of the
rescaled image, mmseg's mean probabilities of the rescaled original) unless K x H x W floats would pass
FULL_SIZE_ELEMS; then they are computed at the resized size and upsampled in strips, so memory stays bounded.
"""

from __future__ import annotations

import argparse
import glob
import math
import numbers
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import DanetError, note, os_hint
from ..files import make_dir
from .graphed import with_forward_graphs
from .inference import AMP_DTYPES
from .test_cli import add_speed_options, add_view_options, check_speed_options, check_view_options

DEFAULT_MAX_PIXELS = 2048 * 1024
# labels as `danet test` computes them (logits resized to the original size; --tta: the views merged there, as the
# checkpoint's toolbox merges them) while K x H x W float32 stays under this many elements (1 GiB); above it, at the
# resized size, then upsampled in strips (a few pixels near class edges may differ from `danet test`)
FULL_SIZE_ELEMS = 1 << 28


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--checkpoint", required=True, help="a danet, sssegmentation or mmsegmentation checkpoint")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", help="preset for classes/palette/sizes (default: the checkpoint's)")
    parser.add_argument("--overlay", action="store_true", help="also write colour overlays <name>_overlay.jpg")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the labels (default 0.5)")
    parser.add_argument("--mode", choices=("whole", "slide"), help="force whole-image or sliding-window inference")
    parser.add_argument("--tta", action="store_true", help="multi-scale + flip (the preset's tta_scales)")
    add_view_options(parser)
    parser.add_argument("--no-resize", action="store_true", help="segment at the native resolution")
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="switch to sliding windows above this many pixels"
    )
    add_speed_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def collect_inputs(
    inputs: list[str], out: str | Path | None = None, renamed: list[str] | None = None
) -> list[tuple[Path, str]]:
    """(file, output stem) for every image named by files, folders (recursive, without hidden files and folders) or
    glob patterns; sorted, unique.

    out: the output folder; a folder walked here skips what lies under it when it is inside that folder (the outputs
    of an earlier run are not inputs).
    renamed: a list to receive `input -> output` for the inputs whose names collided (a.png, a.jpg: a_jpg.png).
    """
    from ..data.io import IMAGE_EXTENSIONS

    out_r = Path(out).expanduser().resolve() if out is not None else None
    found: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(p).parts)  # NOTE: as the datasets do
            )  # (hidden: macOS's ._name copies, a .git folder; a hidden file named itself is read)
            where = ""
            if out_r is not None and out_r != p.resolve() and out_r.is_relative_to(p.resolve()):
                files = [f for f in files if not f.resolve().is_relative_to(out_r)]
                where = f" outside --out {out}"
            if not files:
                raise DanetError(f"folder {p} holds no images ({', '.join(IMAGE_EXTENSIONS)}){where}")
            found += [(f, str(f.relative_to(p).with_suffix(""))) for f in files]
        elif p.is_file():
            found.append((p, p.stem))
        elif any(c in item for c in "*?["):
            files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
            if not files:
                raise DanetError(f"pattern {item!r} matches no files")
            found += [(f, f.stem) for f in files]
        elif p.exists():
            raise DanetError(f"input {item} is not a regular file (a pipe or a device?); give image files or folders")
        else:
            raise DanetError(f"input {item} does not exist (give image files, folders or glob patterns)")
    unique: dict[Path, tuple[Path, str]] = {}
    for f, stem in found:
        unique.setdefault(f.resolve(), (f, stem))
    taken = {stem for _, stem in unique.values()}
    result: list[tuple[Path, str]] = []
    names: set[str] = set()
    for f, stem in unique.values():
        name, n = stem, 1
        if name in names:  # the same name from two inputs (a.png, a.jpg): keep both, the second as a_jpg
            name = f"{stem}_{f.suffix.lstrip('.').lower()}"
            while name in names or name in taken:
                name, n = f"{stem}_{f.suffix.lstrip('.').lower()}_{n}", n + 1
        names.add(name)
        result.append((f, name))
        if name != stem and renamed is not None:
            renamed.append(f"{f} -> {name}.png")
    return result


def output_paths(out: Path, name: str, overlay: bool) -> list[Path]:
    """The files `danet predict` writes for the image named `name`."""
    return [out / f"{name}.png"] + ([out / f"{name}_overlay.jpg"] if overlay else [])


def legend_path(files: list[tuple[Path, str]], out: Path) -> Path:
    """Where the class legend goes: OUT/legend.png, or OUT/classes_legend.png (then _1, _2, ...) when an image's
    label map takes that name."""
    names = {name for _, name in files}
    legend, n = "legend", 1
    while legend in names:
        legend, n = ("classes_legend" if n == 1 else f"classes_legend_{n - 1}"), n + 1
    return out / f"{legend}.png"


def check_outputs(files: list[tuple[Path, str]], out: Path, overlay: bool) -> None:
    """DanetError, before anything is written, when an output file (a label map, an overlay, the legend) would be
    one of the input images, or a folder another output goes into."""

    def key(f: Path) -> tuple[int, int] | None:
        try:
            st = os.stat(f)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    inputs = {f.resolve(): f for f, _ in files}
    inputs_by_key = {k: f for f, _ in files if (k := key(f)) is not None}
    targets = [t for _, name in files for t in output_paths(out, name, overlay)] + [legend_path(files, out)]
    folders = {d: f for f, name in files for d in (out / name).parents if out in d.parents}  # made under out
    for f, name in files:
        for target in output_paths(out, name, overlay):
            if target in folders:  # NOTE: a.jpg's a.png, and a folder a.png/ of the inputs (a.png/x.png)
                raise DanetError(
                    f"{f} and {folders[target]} would write {target} both as a file and as a folder; rename one"
                )
    for target in targets:
        src = inputs.get(target.resolve()) or (inputs_by_key.get(key(target)) if target.exists() else None)
        if src is not None:
            raise DanetError(
                f"--out {out} would overwrite the input image {src} with {target.name}; pick another --out folder"
            )


def write_output(path: Path, image: Image.Image, **save_args) -> None:
    """`viz.save_picture` (a temporary file, then os.replace: a full disk leaves no partial file and keeps the
    previous one), its OSError as one line."""
    from ..viz import save_picture

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_picture(image, path, **save_args)
    except OSError as e:
        hint = (
            "a folder has that name: move it or pick another --out"
            if path.is_dir()
            else os_hint(e, "pick another --out", elsewhere="pick another --out")
        )
        raise DanetError(f"cannot write {path}: {e.strerror or e}; {hint}") from None


def preset_from_filename(name: str) -> str | None:
    """The zoo preset whose sssegmentation config name the file name holds (`danet zoo download` keeps it)."""
    from ..presets import ALIASES

    hits = [alias for alias in ALIASES if alias in name]
    return ALIASES[max(hits, key=len)] if hits else None


def _run_of(ck, preset: str | None) -> bool:
    """Whether the `danet train` run that wrote checkpoint `ck` is of `preset` (None: any; an alias names it too)."""
    from ..presets import get_preset

    return preset is None or ck.meta.get("preset") == get_preset(preset).name


def run_sizes(ck, preset: str | None = None) -> dict[str, tuple[int, int]]:
    """The base and crop sizes of the `danet train` run that wrote checkpoint `ck`, where it set them; none if
    `preset` names another preset than the run's."""
    if not _run_of(ck, preset):
        return {}
    out = {}
    for key in ("base_size", "crop_size"):
        v = ck.run_data.get(key)
        if isinstance(v, list | tuple) and len(v) == 2 and all(type(x) is int and x > 0 for x in v):
            out[key] = (v[0], v[1])
    return out


def run_eval_mode(ck, preset: str | None = None) -> str | None:
    """How the `danet train` run that wrote checkpoint `ck` validated (whole or slide), where it says; none if
    `preset` names another preset than the run's."""
    config = ck.meta.get("config")
    mode = config.get("eval_mode") if isinstance(config, dict) else None
    return mode if mode in ("whole", "slide") and _run_of(ck, preset) else None


def pil_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image as RGB uint8 `(H, W, 3)`, as `danet predict` reads its file (OpenCV): 16-bit grayscale keeps its
    high byte (PIL's convert("RGB") clips such values to 0 or 255); floating-point samples are refused, as there."""
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L; I (32-bit: a 16-bit file in older Pillows, or 8-bit values)
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DanetError(f"a {image.mode} PIL image with values outside 0..65535: give 8- or 16-bit samples")
        sixteen = image.mode.startswith("I;16") or (values.size and values.max() > 255)
        return np.repeat((values >> (8 if sixteen else 0)).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode == "F":
        raise DanetError("a PIL image of floating-point samples (mode F), which danet reads only as 8- or 16-bit")
    return np.asarray(image.convert("RGB"))


class Predictor:
    """A loaded checkpoint ready to segment RGB uint8 images of any size, as `danet predict` does.

        predictor = danet.Predictor("runs/synthetic/best.pth")        # or a zoo file, with preset_name=
        labels = predictor(rgb)                 # (H, W, 3) uint8 -> (H, W) uint8 class indices at the image's size
        predictor.classes, predictor.palette    # names and RGB colours of the classes

    The image is resized (keep ratio) to the base size, segmented (sliding windows above `max_pixels`), and the
    logits resized back as the checkpoint's toolbox does (`resize_logits`: once, or via the input size for mmseg);
    `tta=True` adds the preset's scales and flips, by default as the checkpoint's toolbox makes and merges them
    (`tta_views`, `tta_merge`: "resized" and "logits", sssegmentation's test; "original" and "probs" for an mmseg
    file, its tta_pipeline and SegTTAModel); the keywords `views` and `merge` choose otherwise (views="base": the
    original image resized to the base size times each scale, mmseg 0.x's views; it needs a base size).
    """

    def __init__(self, checkpoint: str | Path, preset_name: str | None = None, device: str = "auto") -> None:
        from ..checkpoints import load_model, read_checkpoint
        from ..presets import get_preset
        from ..safe_load import check_file
        from .distributed import pick_device
        from .evaluate import default_resize, default_tta

        check_file(checkpoint)  # not found, or a folder (naming a checkpoint inside)
        ck = read_checkpoint(checkpoint)
        name = preset_name or ck.meta.get("preset") or preset_from_filename(Path(checkpoint).name)
        self.preset = get_preset(name) if name else None
        self.device = pick_device(device)
        # NOTE: our files carry their exact model config (a run may have overridden the preset's); foreign files
        # do not, and then the preset decides what the weights cannot tell (the output stride)
        structure = self.preset.model if self.preset and (preset_name or not ck.meta.get("model_cfg")) else None
        if structure is not None:
            structure = ck.run_structure(self.preset.name, structure)
        # NOTE: a preset guessed from the file name is nothing the user can leave out
        remedy = "--preset / preset_name=" if preset_name else ""
        self.model = load_model(ck, structure, remedy=remedy).to(self.device).eval()
        self.resize_logits = default_resize(ck)  # as the checkpoint's toolbox resizes its logits
        self.tta_views, self.tta_merge = default_tta(ck)  # and makes and merges its TTA views
        meta = ck.meta
        p = self.preset
        self.classes = list(p.classes) if preset_name and p else meta.get("classes") or (list(p.classes) if p else None)
        if self.classes is None:
            self.classes = [f"class {i}" for i in range(self.model.num_classes)]
        palette = meta.get("palette") if not preset_name else None
        self.palette = palette or (list(p.palette) if p else None)
        self.mean = tuple(meta.get("mean") or (p.mean if p else (123.675, 116.28, 103.53)))
        self.std = tuple(meta.get("std") or (p.std if p else (58.395, 57.12, 57.375)))
        run = run_sizes(ck, preset_name)  # NOTE: a run may have trained at other sizes than its preset's
        self.base_size = run.get("base_size") or (tuple(p.base_size) if p else None)
        self.crop = run.get("crop_size") or (tuple(p.crop_size) if p else (512, 512))
        self.tta_scales = tuple(p.tta_scales) if p else (0.75, 1.0, 1.25)
        self.mode = run_eval_mode(ck, preset_name) or (p.eval_mode if p else None)  # None: by the image's size
        if self.model.num_classes > 255:
            raise DanetError(
                f"{Path(checkpoint).name} has {self.model.num_classes} classes; label maps are 8-bit (255 = ignore), "
                "so prediction takes at most 255"
            )

    def __call__(
        self,
        image: np.ndarray,
        *,
        resize: bool = True,
        mode: str | None = None,
        tta: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        amp: str = "none",
        merge: str | None = None,
        views: str | None = None,
    ) -> np.ndarray:
        """RGB uint8 `(H, W, 3)` (or a PIL image) -> class indices uint8 `(H, W)` at the original size."""
        from ..data.transforms import normalize, resize_keep_ratio
        from .evaluate import TTA_MERGES, TTA_VIEWS, OriginalViews, segment
        from .inference import align_corners, upsample_argmax

        choices = (("mode", mode, (None, "whole", "slide")), ("amp", amp, ("none", "bf16", "fp16")),
                   ("merge", merge, (None, *TTA_MERGES)), ("views", views, (None, *TTA_VIEWS)))  # fmt: skip
        for what, value, allowed in choices:
            if value not in allowed:
                raise DanetError(f"Predictor {what}={value!r}: give one of {', '.join(map(repr, allowed))}")
        for what, value in (("tta", tta), ("resize", resize)):  # NOTE: tta="no" would be a true string
            if not isinstance(value, bool | np.bool_):
                raise DanetError(f"Predictor {what}={value!r}: give True or False")
        for what, value, verb in (("merge", merge, "merges"), ("views", views, "makes")):
            if value is not None and not tta:
                raise DanetError(
                    f"Predictor {what}={value!r} {verb} the views of tta=True; add tta=True, or leave it out"
                )
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral) or max_pixels < 1:
            raise DanetError(f"Predictor max_pixels={max_pixels!r}: give a whole number of pixels, at least 1")
        merge, views = merge or self.tta_merge, views or self.tta_views
        if tta and views == "base" and not (resize and self.base_size):
            raise DanetError(
                "Predictor views='base' resizes the image to the base size times each scale, but there is none "
                f"({'resize=False' if not resize else 'no preset'}): name a preset, or take views='original'"
            )

        if isinstance(image, Image.Image):
            image = pil_rgb(image)
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise DanetError(
                f"Predictor takes an RGB image as a (H, W, 3) uint8 array (0..255) or a PIL image, got a "
                f"{image.dtype} array of shape {image.shape}; e.g. PIL.Image.open(f) itself"
            )
        h, w = image.shape[:2]
        small = resize_keep_ratio(image, None, self.base_size)[0] if resize and self.base_size else image
        resized = tuple(small.shape[:2])  # the size the logits are merged at when K x H x W would be too large
        scales = self.tta_scales if tta else (1.0,)
        if tta and views != "resized":  # NOTE: the views are made from `image`; `small` gives only its size
            base = tuple(self.base_size) if views == "base" else None
            source = OriginalViews(image, self.mean, self.std, self.device, torch.float32, base=base)
        else:
            source = normalize(small, self.mean, self.std)[None].to(self.device)
        if mode is None and self.mode == "slide":  # as the run (or preset) validates
            mode = "slide"
        if mode is None:  # NOTE: views of the original image may be much larger than the resized one
            sizes = [source.size(s) for s in scales] if isinstance(source, OriginalViews) else [resized]
            mode = "slide" if max(math.prod(hw) for hw in sizes) > max_pixels else "whole"
        if self.model.num_classes * h * w <= FULL_SIZE_ELEMS:
            # as `danet test`: the logits resized to the original size (with TTA, before each view's softmax)
            scores = segment(self.model, source, (h, w), mode, self.crop, None, scales, tta, amp, merge,
                             self.resize_logits)  # fmt: skip
            labels = scores[0].argmax(0)
        else:  # at the resized size, then upsampled in strips: K x H x W floats never exist
            scores = segment(self.model, source, resized, mode, self.crop, None, scales, tta, amp, merge)
            labels = upsample_argmax(scores[0], (h, w), corners=align_corners(self.model))
        return labels.to(torch.uint8).cpu().numpy()


def run_cli(args) -> int:
    from ..data.io import read_image
    from ..models.fused_norm import set_inference_norm
    from ..models.triton_attention import set_inference_attention
    from ..models.winograd import set_inference_conv
    from ..viz import label_image, legend_image, overlay
    from .distributed import cpu_threads

    check_view_options(args, args.tta)
    check_speed_options(args)
    if not 0 <= args.alpha <= 1:
        raise DanetError(f"--alpha {args.alpha} is outside 0..1 (0: the photo only, 1: the labels only)")
    if args.max_pixels < 1:
        raise DanetError(f"--max-pixels must be at least 1 (images above it are segmented in windows), got "
                         f"{args.max_pixels}")  # fmt: skip
    if args.tta and args.tta_views == "base" and args.no_resize:
        raise DanetError("--tta-views base resizes the image to the base size times each scale, which --no-resize "
                         "turns off: drop one of them (or take --tta-views original)")  # fmt: skip
    out = Path(args.out)
    renames: list[str] = []
    files = collect_inputs(args.inputs, out, renames)
    check_outputs(files, out, args.overlay)
    if renames:  # NOTE: before the work, so that the user knows which file is which
        more = f" (and {len(renames) - 5} more)" if len(renames) > 5 else ""
        print(f"inputs of one name, written apart: {'; '.join(renames[:5])}{more}")
    predictor = Predictor(args.checkpoint, args.preset, args.device)
    if predictor.preset is None:  # NOTE: a bare state dict: nothing says how its run resized or named things
        named = predictor.classes != [f"class {i}" for i in range(predictor.model.num_classes)]  # the file's own
        how = "named and coloured as the file records them" if named else "numbered and coloured as VOC's"
        note(
            f"{Path(args.checkpoint).name} records no preset: images are segmented at their own size, classes "
            f"are {how}; give --preset NAME for the run's sizes, names and colours"
        )
    if predictor.device.type == "cpu":  # NOTE: the command's threads; the Python API leaves the process's as they are
        torch.set_num_threads(cpu_threads(None))
    set_inference_conv(predictor.model, args.conv)
    set_inference_norm(predictor.model, args.norm, AMP_DTYPES.get(args.amp, torch.float32))
    set_inference_attention(predictor.model, args.attention, args.amp)
    if args.channels_last:
        predictor.model = predictor.model.to(memory_format=torch.channels_last)
    if args.cuda_graphs:
        predictor.model = with_forward_graphs(predictor.model, predictor.device)
    if out.exists() and not out.is_dir():
        raise DanetError(f"--out {out} is a file, not a folder; give a folder for the predictions")
    try:
        make_dir(out)
    except OSError as e:
        raise DanetError(f"cannot create output folder {out}: {e.strerror or e}; give another --out") from None
    for path, name in tqdm(files, desc="predict", unit="img", dynamic_ncols=True, disable=args.no_progress):
        image = read_image(path)
        label = predictor(
            image,
            resize=not args.no_resize,
            mode=args.mode,
            tta=args.tta,
            max_pixels=args.max_pixels,
            amp=args.amp,
            merge=args.tta_merge,
            views=args.tta_views,
        )
        write_output(out / f"{name}.png", label_image(label, predictor.palette))
        if args.overlay:
            colour = Image.fromarray(overlay(image, label, predictor.palette, args.alpha))
            write_output(out / f"{name}_overlay.jpg", colour, quality=92)
    legend = legend_path(files, out)
    write_output(legend, legend_image(predictor.classes, predictor.palette))
    what = f"{len(files)} label map(s){' and overlays' if args.overlay else ''}"
    print(f"wrote {what} to {out}, and the classes' colours in {legend.name}")
    return 0
