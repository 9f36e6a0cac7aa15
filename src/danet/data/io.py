"""Reading images and label maps, and mapping raw label values to training labels, with one-line errors.

Images are decoded with OpenCV exactly as both reference toolboxes do (``cv2.IMREAD_COLOR``: grayscale is
replicated to three channels, an alpha channel is dropped, 16-bit samples are scaled to 8 bits, EXIF orientation
is applied), then turned into RGB. Label maps are decoded with Pillow (as mmsegmentation does), which returns the
indices of a palette ("P" mode) PNG rather than its colours.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..errors import DanetError, os_hint
from ..files import discard, remove_dead_temporaries, replace_target, temp_beside

# NOTE: OpenCV logs decoder warnings ("PNG input buffer is incomplete") straight to stderr; a bad file is reported
# once, as the DanetError below, so that a CLI error stays one line.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file into RGB uint8 `(H, W, 3)`; DanetError naming the file if that is impossible."""
    path = Path(path)
    try:
        buf = np.fromfile(path, dtype=np.uint8)  # NOTE: not cv2.imread, which cannot open non-ASCII paths everywhere
    except FileNotFoundError:
        raise DanetError(f"image {path} does not exist") from None
    except OSError as e:
        raise DanetError(f"cannot read image {path}: {e.strerror or e}") from None
    if buf.size == 0:
        raise DanetError(f"image {path} is an empty file; re-download or remove it from the split")
    if buf[:8].tobytes() == PNG_SIGNATURE and b"IEND" not in buf[-4096:].tobytes() and b"IEND" not in buf.tobytes():
        # NOTE: checked here because libpng prints its own line to stderr for a truncated file as OpenCV decodes it
        raise DanetError(f"image {path} is truncated (its PNG data stop before the end); re-download or remove it")
    bgr = _decode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raw = _decode(buf, cv2.IMREAD_UNCHANGED)  # NOTE: what it holds, for the message only
        if raw is not None and raw.dtype.kind == "f":
            raise DanetError(
                f"image {path} holds floating-point samples ({raw.dtype}), which OpenCV (as both toolboxes) reads "
                "only as 8- or 16-bit; save it as an 8-bit PNG or JPEG"
            )
        if (pixels := _declared_pixels(buf)) and pixels > CV_MAX_PIXELS:
            raise DanetError(
                f"image {path} has {pixels:,} pixels, more than OpenCV decodes ({CV_MAX_PIXELS:,}); shrink it"
            )
        raise DanetError(f"image {path} is corrupt or not an image format OpenCV can decode; replace or remove it")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


CV_MAX_PIXELS = 1 << 30  # OpenCV's default limit on an image it decodes (OPENCV_IO_MAX_IMAGE_PIXELS)


def _declared_pixels(buf: np.ndarray) -> int | None:
    """The pixel count an image file's header declares (None where Pillow cannot tell), for the message only."""
    import io
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NOTE: Pillow's DecompressionBombWarning
            with Image.open(io.BytesIO(buf.tobytes())) as im:
                return im.size[0] * im.size[1]
    except Image.DecompressionBombError as e:  # "Image size (N pixels) exceeds limit ..."
        m = re.search(r"\((\d+) pixels\)", str(e))
        return int(m.group(1)) if m else None
    except Exception:  # noqa: BLE001 - not an image Pillow knows: nothing to say
        return None


def _decode(buf: np.ndarray, flags: int) -> np.ndarray | None:
    """cv2.imdecode without OpenCV's own warning lines on stderr (a 32-bit TIFF: "TIFFRGBAImageOK: Sorry, ...")."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        return cv2.imdecode(buf, flags)
    except cv2.error:
        return None
    finally:
        cv2.utils.logging.setLogLevel(level)


def read_label(path: str | os.PathLike, palette: np.ndarray | None = None) -> np.ndarray:
    """Decode a label map into `(H, W)` integers (uint8, or uint16/int32 for 16-bit files).

    8-bit grayscale and palette PNGs give their pixel values / palette indices. A colour (RGB/RGBA) mask is accepted
    only when `palette` `(K, 3)` is given: each colour is then mapped to its class index (an unknown colour is an
    error; pure white (255, 255, 255) means ignore (255) unless it is a class colour).
    """
    path = Path(path)
    if not path.is_file():
        raise DanetError(f"label {path} does not exist")
    try:
        with Image.open(path) as im:
            if im.format in ("JPEG", "MPO", "WEBP"):
                raise DanetError(
                    f"label {path} holds {im.format} data, not PNG; save the masks as PNG files (JPEG's lossy "
                    "compression changes the class indices)"
                )
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m.group(1)):,} pixels" if m else "more pixels than Pillow opens"
        raise DanetError(
            f"label {path} has {size}, more than Pillow opens ({2 * Image.MAX_IMAGE_PIXELS:,}: its "
            "decompression-bomb limit); shrink the image and its label"
        ) from None
    except (OSError, ValueError) as e:
        raise DanetError(f"label {path} is corrupt or not an image ({e}); replace or remove it") from None
    if mode == "1":
        return arr.astype(np.uint8)
    if mode in ("L", "P"):
        return arr
    if mode.startswith("I"):  # 16/32-bit grayscale: values are checked against the classes by map_label
        return arr
    if mode in ("RGB", "RGBA") and palette is not None:
        return colours_to_indices(arr[..., :3], palette, path)
    raise DanetError(
        f"label {path} is a {mode} image; expected one class index per pixel (8-bit grayscale or palette PNG)"
    )


def colours_to_indices(rgb: np.ndarray, palette: np.ndarray, path: Path) -> np.ndarray:
    """Map an RGB mask `(H, W, 3)` to class indices `(H, W)` uint8 through `palette` `(K, 3)`."""
    key = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours, inverse = np.unique(key.ravel(), return_inverse=True)
    pal_key = (palette[:, 0].astype(np.int32) << 16) | (palette[:, 1].astype(np.int32) << 8) | palette[:, 2]
    lut = np.full(len(colours), -1, dtype=np.int32)
    for k, c in enumerate(pal_key.tolist()):
        if (lut[colours == c] >= 0).any():
            first = pal_key.tolist().index(c)
            raise DanetError(
                f"label {path} is an RGB mask, but classes {first} and {k} of the classes file have the same colour "
                f"{palette[k].tolist()}; give each class its own colour, or save the masks as class indices"
            )
        lut[colours == c] = k
    lut[(lut < 0) & (colours == 0xFFFFFF)] = 255
    if (lut < 0).any():
        bad = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in colours[lut < 0][:3].tolist()]
        raise DanetError(f"label {path} has colours {bad} that are not in the classes file; add them or fix the mask")
    return lut[inverse].reshape(key.shape).astype(np.uint8)


def label_lut(num_classes: int, reduce_zero_label: bool = False, ignore_index: int = 255) -> np.ndarray:
    """Raw label value -> training label, as a 256-entry int16 table; -1 marks a value that is not allowed.

    Plain datasets: 0..K-1 stay, `ignore_index` stays, anything else is invalid.
    NOTE: reduce-zero-label (ADE20K): 0 ("other") -> ignore, 1..K -> 0..K-1, 255 stays ignore.
    """
    lut = np.full(256, -1, dtype=np.int16)
    if reduce_zero_label:
        lut[0] = ignore_index
        lut[1 : num_classes + 1] = np.arange(num_classes)
    else:
        lut[:num_classes] = np.arange(num_classes)
    lut[ignore_index] = ignore_index
    return lut


def map_label(raw: np.ndarray, lut: np.ndarray, path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """Apply `label_lut` to a raw label `(H, W)`; DanetError naming the file and the bad values. Returns uint8."""
    if raw.dtype != np.uint8:
        if raw.size and (int(raw.max()) > 255 or int(raw.min()) < 0):
            bad = np.unique(raw[(raw > 255) | (raw < 0)])[:5].tolist()
            raise DanetError(f"label {path} has values {bad} outside the {num_classes} classes and ignore index 255")
        raw = raw.astype(np.uint8)
    out = lut[raw]
    invalid = out < 0
    if invalid.any():
        bad = np.unique(raw[invalid])[:5].tolist()
        raise DanetError(
            f"label {path} has values {bad} outside the {num_classes} classes (allowed: {_allowed(lut)} and "
            f"ignore 255); fix the mask or check the dataset/preset"
        )
    return out.astype(np.uint8)


def _allowed(lut: np.ndarray) -> str:
    ok = np.flatnonzero((lut >= 0) & (np.arange(256) != 255))
    return f"{ok.min()}..{ok.max()}" if ok.size else "none"


def read_pair(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    lut: np.ndarray,
    num_classes: int,
    palette: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an image (RGB uint8 `(H, W, 3)`) and its mapped label (uint8 `(H, W)`), checking that their sizes agree."""
    image = read_image(image_path)
    label = map_label(read_label(label_path, palette), lut, label_path, num_classes)
    if fault := size_fault(image, label, image_path, label_path):
        raise DanetError(fault)
    return image, label


def size_fault(image: np.ndarray, label: np.ndarray, image_path, label_path) -> str | None:
    """What is wrong where a label `(H, W)` is not its image's size `(H, W, 3)` (None where it is)."""
    if image.shape[:2] == label.shape[:2]:
        return None
    return (
        f"label {label_path} is {label.shape[1]}x{label.shape[0]} but image {image_path} is "
        f"{image.shape[1]}x{image.shape[0]} (WxH); they must be the same size{_turned_hint(image_path)}"
    )


def _turned_hint(image_path: str | os.PathLike) -> str:
    """Why an image may not be its file's stored size: its EXIF orientation tag, which is applied on reading."""
    try:
        with Image.open(image_path) as im:
            turn = im.getexif().get(0x0112, 1)  # Orientation
    except (OSError, ValueError):
        return ""
    if turn in (None, 1):
        return ""
    return (
        f" (the image's EXIF orientation tag ({turn}) turns it when read, as the toolboxes read it: turn the mask "
        "the same way, or store the image upright without the tag)"
    )


def fork_safe_opencv() -> None:
    """Run OpenCV single-threaded in this process, so that processes forked from it cannot deadlock in OpenCV.

    NOTE: a process forked (DataLoader workers, `danet data check --jobs`) while OpenCV's thread pool is alive
    inherits the pool's state without its threads and can hang on the first OpenCV call that touches the pool
    (seen with `cv2.setNumThreads` in a worker). With 0 threads the pool is never used. The parallelism of data
    loading comes from the worker processes anyway (as mmengine and detectron2 do).
    """
    if cv2.getNumThreads() > 1:  # NOTE: after setNumThreads(0) it reports 1 (sequential); never touch it again then
        cv2.setNumThreads(0)


def read_text(path: Path, what: str) -> str:
    """The text of a small UTF-8 file (a classes file, a split list; a BOM is dropped); DanetError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DanetError(
            f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            f"save it as UTF-8 plain text"
        ) from None
    except OSError as e:
        raise DanetError(f"cannot read {what} {path}: {e.strerror or e}") from None


def write_error(path: Path, e: OSError) -> DanetError:
    """A one-line DanetError for an OSError met writing `path`: the file, the reason, what to do."""
    hint = os_hint(e, "check the folder")
    return DanetError(f"cannot write {path}: {e.strerror or e}; {hint} and run again (files already written are kept)")


STALE_S = 600  # a temporary file untouched this long is no live writer's


def remove_stale_temporaries(folders) -> int:
    """Delete the temporary files `write_atomic` left in `folders` when a process writing them was killed: their
    writer's process id is not running here, and they have not changed for STALE_S (a writer on another machine of
    a shared disk has another process id space). Returns how many were removed."""
    return sum(len(remove_dead_temporaries(f, r"\..*\.tmp(?P<pid>\d+)(\.\w+)?", STALE_S)) for f in folders)


def write_atomic(path: Path, write) -> None:
    """Call `write(tmp_path)` for a temporary name beside `path`, then rename it into place.

    A failed write (a full disk, no permission) leaves `path` as it was (no partial file) and raises a DanetError
    naming `path`. A symbolic link is replaced by the file (not written through); a device or pipe is refused.
    """
    path = replace_target(path, follow=False)
    tmp = temp_beside(path, "tmp", keep_suffix=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        discard(tmp)
