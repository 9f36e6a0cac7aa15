"""Export a trained DANet to ONNX or to a torch.export program, with dynamic batch, height and width.

    danet export runs/synth/best.pth --onnx danet.onnx [--opset 17] [--size 128 128]
    danet export runs/synth/best.pth --torch-export danet.pt2

The exported graph takes a normalised `(B, 3, H, W)` float32 image ("image") and returns `(B, K, H, W)` logits
("logits") at the input size. Both files are checked before they are put in place: the ONNX model is run with
onnxruntime and the .pt2 program is reloaded, each on a random input of another batch and size than the
export's, against the PyTorch model; the largest absolute difference is printed. Files are written to a
temporary name in the target folder and renamed into place, so a failed export leaves no partial file and
keeps an older export intact.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import DanetError, note
from .files import discard, replace_target, temp_beside

DEFAULT_OPSET = 17  # SDPA with an explicit scale exports from opset 14; 17 has LayerNormalization etc.
MIN_SIZE = 32  # smallest input side that survives the stride-8 backbone with room to spare


class LogitsOnly(nn.Module):
    """The exported graph: `(B, 3, H, W)` normalised image -> `(B, K, H, W)` logits (the model's "out")."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["out"]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name next to `path` (`replace_target`); rename it onto `path` if the block succeeds, delete
    it otherwise."""
    path = replace_target(path)
    tmp = temp_beside(path, "tmp", keep_suffix=True)  # same suffix: .pt2 loaders check it
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise DanetError(
            f"cannot write {path}: {e.strerror or e}; check the folder exists, is writable and has space"
        ) from e
    finally:
        discard(tmp)


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (one line) when `path` cannot be written: missing folder, not a folder, no write permission."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DanetError(f"output {path} is a folder; give a file name, e.g. {path / 'model.onnx'}")
    if parent.exists() and not parent.is_dir():
        raise DanetError(f"cannot write {path}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise DanetError(f"cannot write {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DanetError(f"cannot write {path}: folder {parent} is not writable")
    return path


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    """A different (H, W) than `size` for the checks, odd-sized so that rounding in the graph is exercised."""
    h, w = size
    return max(MIN_SIZE, h * 3 // 4 + 5), max(MIN_SIZE, w * 5 // 4 + 3)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' deprecation and tracer chatter (the traced shapes are checked afterwards)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _with_attention_fallback(model: nn.Module, do_export: Callable[[], None], log: Callable[[str], None]) -> None:
    """Export with the fused (SDPA) position attention; if the exporter cannot, with the explicit softmax(QK^T)V.

    The two paths compute the same result (the checks after the export compare against the model as it is).
    """
    try:
        do_export()
    except (OSError, DanetError):
        raise
    except Exception as e:  # any exporter failure: retry on the plain matmul path
        if not hasattr(model, "set_fused_attention"):
            raise
        log(
            f"fused attention did not export ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "exporting the explicit attention path (same result)"
        )
        model.set_fused_attention(False)
        do_export()


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    size: tuple[int, int] = (512, 512),
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
    verify: bool = True,
    log: Callable[[str], None] = print,
) -> float | None:
    """Write `model` as ONNX with dynamic batch, height and width; returns the onnxruntime max abs difference.

    Args:
        model: a DANet (any module whose forward returns {"out": (B, K, H, W)}); put in eval mode.
        path: the .onnx file; written atomically.
        size: (H, W) of the example input that is traced.
        opset: ONNX opset (>= 14 for the attention's explicit scale).
        metadata: strings stored in the model's metadata_props (preset, classes, mean, std, ...).
        verify: run the file with onnxruntime at another batch and size and compare with the model.
    """
    path = check_output_path(path)
    model = model.eval()
    wrapped = LogitsOnly(model).eval()
    example = torch.randn(1, 3, *size)
    axes = {0: "batch", 2: "height", 3: "width"}
    with atomic_path(path) as tmp:

        def do_export() -> None:
            with _quiet_export(), torch.no_grad():
                # NOTE: the TorchScript-based exporter: it needs only `onnx`; the dynamo one also needs onnxscript.
                torch.onnx.export(
                    wrapped,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=["image"],
                    output_names=["logits"],
                    dynamic_axes={"image": axes, "logits": axes},
                    do_constant_folding=True,
                )

        _with_attention_fallback(model, do_export, log)
        if metadata:
            _add_metadata(tmp, metadata)
        diff = verify_onnx(tmp, wrapped, check_size(size), log) if verify else None
    return diff


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Store `metadata` in the file's metadata_props; state the class count in the output's shape."""
    import onnx

    proto = onnx.load(str(path))
    if "danet.num_classes" in metadata:  # the exporter leaves dim 1 symbolic after the Resize
        proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = int(metadata["danet.num_classes"])
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def _tolerance(ref: torch.Tensor) -> float:
    return 1e-4 + 1e-4 * float(ref.abs().max())


def verify_onnx(
    path: str | os.PathLike, model: nn.Module, size: tuple[int, int], log: Callable[[str], None] = print
) -> float:
    """Run the ONNX file with onnxruntime on a random `(2, 3, *size)` input; DanetError if it disagrees with `model`.

    Returns the max abs difference of the logits.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise DanetError("onnxruntime is not installed; pip install 'danet[export]' (or pass --no-verify)") from e
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if got.shape != ref.shape:
        raise DanetError(
            f"ONNX check failed: output {tuple(got.shape)} for input {tuple(x.shape)}, expected {tuple(ref.shape)}"
        )
    diff = float((got - ref).abs().max())
    log(
        f"onnxruntime check on a {tuple(x.shape)} input: max abs difference {diff:.3g}"
        f" (max |logit| {ref.abs().max():.3g})"
    )
    if not diff <= _tolerance(ref):
        raise DanetError(f"ONNX check failed: max abs difference {diff:.3g} vs PyTorch; the file was not written")
    return diff


def export_program(
    model: nn.Module,
    path: str | os.PathLike,
    size: tuple[int, int] = (512, 512),
    verify: bool = True,
    log: Callable[[str], None] = print,
) -> float | None:
    """Write `model` as a torch.export program (.pt2) with dynamic batch, height and width.

    Load it with `torch.export.load(path).module()`. Returns the max abs difference of the reloaded program at
    another batch and size (or None without `verify`).
    """
    path = check_output_path(path)
    model = model.eval()
    wrapped = LogitsOnly(model).eval()
    # NOTE: batch 2 in the example: torch.export specialises dimensions of size 0 and 1.
    example = torch.randn(2, 3, *size)
    dim = torch.export.Dim.DYNAMIC
    with atomic_path(path) as tmp:
        programs: list[torch.export.ExportedProgram] = []

        def do_export() -> None:
            with _quiet_export(), torch.no_grad():
                programs.append(
                    torch.export.export(wrapped, (example,), dynamic_shapes={"image": {0: dim, 2: dim, 3: dim}})
                )

        _with_attention_fallback(model, do_export, log)
        # NOTE: serialised in memory, then written from Python: torch's C++ file writer reports a full disk as a
        # RuntimeError and may abort the process while unwinding; Python's write gives an OSError (atomic_path's)
        buffer = io.BytesIO()
        torch.export.save(programs[-1], buffer)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        diff = None
        if verify:
            program = torch.export.load(str(tmp)).module()
            x = torch.randn(1, 3, *check_size(size))
            with torch.no_grad():
                ref, got = wrapped(x), program(x)
            diff = float((got - ref).abs().max())
            log(f"torch.export check on a {tuple(x.shape)} input: max abs difference {diff:.3g}")
            if not diff <= _tolerance(ref):
                raise DanetError(f"torch.export check failed: max abs difference {diff:.3g}; the file was not written")
    return diff


# ----------------------------------------------------------------------------------------------------------- CLI


def load_for_export(checkpoint: str | os.PathLike, preset: str | None = None) -> tuple[nn.Module, dict[str, str]]:
    """The checkpoint's model (eval, CPU) and the metadata to store with the export (preset, classes, mean, std).

    The file is read without executing pickled code (`danet.checkpoints.read_checkpoint`).
    """
    from .checkpoints import load_model, read_checkpoint
    from .engine.predict import preset_from_filename
    from .presets import get_preset

    ck = read_checkpoint(checkpoint)
    named = bool(preset)
    if ck.source == "imagenet":
        raise DanetError(f"{checkpoint} holds a backbone only; export a whole-model checkpoint")
    preset = preset or (None if ck.meta.get("model_cfg") else preset_from_filename(Path(checkpoint).name))
    p = get_preset(preset) if preset else None
    model = load_model(ck, p.model if p else None, remedy="--preset" if named else "").eval().cpu()
    if p is None and not ck.meta.get("model_cfg"):
        told = "from its config" if "output_stride" in ck.meta.get("toolbox_model", {}) else "the default"
        note(
            f"{Path(checkpoint).name} records no preset: exported at output stride {model.cfg.output_stride} "
            f"({told}) and without the normalisation metadata; pass --preset NAME if it is another"
        )
    meta = ck.meta
    name = p.name if p else meta.get("preset")
    classes = list(p.classes) if p else meta.get("classes")
    fields = {
        "danet.preset": name,
        "danet.num_classes": model.num_classes,
        "danet.classes": classes if classes and len(classes) == model.num_classes else None,
        "danet.palette": list(map(list, p.palette)) if p else meta.get("palette"),
        "danet.mean": list(p.mean) if p else meta.get("mean"),
        "danet.std": list(p.std) if p else meta.get("std"),
    }
    return model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items() if v is not None}


def _default_size(meta: dict[str, str]) -> tuple[int, int]:
    from .presets import PRESETS

    name = meta.get("danet.preset")
    return PRESETS[name].crop_size if name in PRESETS else (512, 512)


def add_cli(parser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint of this project (or any file `danet convert` reads)")
    parser.add_argument("--onnx", metavar="FILE", help="write an ONNX model (dynamic batch, height, width)")
    parser.add_argument("--torch-export", metavar="FILE", help="write a torch.export program (.pt2)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="example input size (default: the preset's crop)"
    )
    parser.add_argument("--preset", help="the model's preset, for checkpoints that do not record it")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime / reload check")


def run_cli(args) -> int:
    from .convert import same_file

    if not args.onnx and not args.torch_export:
        raise DanetError("nothing to export: give --onnx FILE and/or --torch-export FILE")
    if args.opset < 14:
        raise DanetError(f"--opset {args.opset} is too old: the attention needs opset 14 or newer")
    max_opset = getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", 20)
    if args.opset > max_opset:
        raise DanetError(f"--opset {args.opset} is newer than this PyTorch exports (at most {max_opset})")
    outs = [Path(o) for o in (args.onnx, args.torch_export) if o]
    for out in outs:
        check_output_path(out)
        if same_file(out, args.checkpoint):
            raise DanetError(f"output {out} is the checkpoint being exported; give another file name")
    if len(outs) == 2 and same_file(*outs):
        raise DanetError(f"--onnx and --torch-export both name {outs[0]}; give two file names")
    model, meta = load_for_export(args.checkpoint, args.preset)
    size = tuple(args.size) if args.size else _default_size(meta)
    if min(size) < MIN_SIZE:
        raise DanetError(f"--size {size[0]} {size[1]} is too small; use at least {MIN_SIZE} pixels a side")
    if args.onnx:
        export_onnx(model, args.onnx, size, args.opset, meta, verify=not args.no_verify)
        print(f"wrote {args.onnx}")
    if args.torch_export:
        export_program(model, args.torch_export, size, verify=not args.no_verify)
        print(f"wrote {args.torch_export}")
    return 0
