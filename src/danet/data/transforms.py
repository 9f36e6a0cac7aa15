"""Paired (image, label) pipelines: the training augmentation and the test resize, as in REFERENCE.md "Data".

Images are RGB uint8 `(H, W, 3)` and labels uint8 `(H, W)` (already mapped: classes 0..K-1, ignore 255) until
the last step, which returns tensors: image float32 `(3, H, W)` normalised as (x - mean) / std on 0..255 values,
label int64 `(H, W)`.

Randomness comes only from the `numpy.random.Generator` passed in, so an item is reproducible from its generator's
seed (the datasets derive it from (seed, epoch, index); see `danet.data.base`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ..errors import DanetError


def keep_ratio_size(h: int, w: int, target: Sequence[int]) -> tuple[int, int]:
    """The (new_w, new_h) of a keep-ratio resize of an h x w image to `target` (long, short) (either order).

    s = min(max(target) / max(h, w), min(target) / min(h, w)); new size = (int(w * s + 0.5), int(h * s + 0.5)),
    each side at least 1 pixel (NOTE: an extreme aspect ratio, e.g. 2 x 1000, would otherwise round a side to 0).
    """
    s = min(max(target) / max(h, w), min(target) / min(h, w))
    return max(1, int(w * s + 0.5)), max(1, int(h * s + 0.5))


def resize_keep_ratio(
    image: np.ndarray, label: np.ndarray | None, target: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Keep-ratio resize: bilinear (OpenCV) for the image `(H, W, 3)`, nearest for the label `(H, W)`."""
    new_w, new_h = keep_ratio_size(image.shape[0], image.shape[1], target)
    if (new_h, new_w) != image.shape[:2]:
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        if label is not None:
            label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    return image, label


def random_scale(base_size: Sequence[int], ratio_range: Sequence[float], rng: np.random.Generator) -> tuple[int, int]:
    """The base size times a ratio drawn uniformly from `ratio_range`, truncated to integers (as both toolboxes)."""
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    return int(base_size[0] * ratio), int(base_size[1] * ratio)


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    crop_size: Sequence[int],
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
    ignore_index: int = 255,
    tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop `crop_size` (H, W) (or less where the image is smaller) at a random place.

    The place is drawn again, up to `tries` draws in all, while one class covers `cat_max_ratio` or more of the
    labelled (non-ignore) pixels of the crop, or the crop holds a single class; the last draw is kept otherwise.
    """
    h, w = label.shape
    ch, cw = min(crop_size[0], h), min(crop_size[1], w)
    for _ in range(tries):
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        crop = label[top : top + ch, left : left + cw]
        if cat_max_ratio >= 1.0:
            break
        counts = cv2.calcHist([crop], [0], None, [256], [0, 256]).ravel()  # a fast bincount of uint8
        counts[ignore_index] = 0
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return image[top : top + ch, left : left + cw], crop


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """x * alpha + beta in float32, clipped to 0..255 and truncated back to uint8 (as both toolboxes).

    Computed once per value 0..255 and applied as a lookup table: the same numbers, several times faster.
    """
    lut = np.clip(np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)
    return cv2.LUT(x, lut)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: float = 32,
    contrast_range: Sequence[float] = (0.5, 1.5),
    saturation_range: Sequence[float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """Random brightness, contrast, saturation and hue of an RGB uint8 image `(H, W, 3)`, each with p = 0.5.

    Order: brightness; contrast first or last (a fair coin); saturation; hue. Brightness adds U(-32, 32), contrast
    multiplies by U(0.5, 1.5), saturation multiplies the HSV S channel by U(0.5, 1.5), hue adds an integer in
    [-18, 18) to OpenCV's 0..179 hue.
    """
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_last = rng.integers(2) == 0
    if not contrast_last and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(-hue_delta, hue_delta))) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if contrast_last and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    return image


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB uint8 `(H, W, 3)` -> float32 tensor `(3, H, W)` = (x - mean) / std."""
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # NOTE: np.asarray of a PIL image; torch warns about sharing a read-only array
        image = image.copy()
    x = torch.from_numpy(image).permute(2, 0, 1).float().contiguous()
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
    return x.div_(torch.tensor(std, dtype=torch.float32).view(3, 1, 1))


def pad_to(
    image: torch.Tensor, label: torch.Tensor, size: Sequence[int], ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad image `(3, h, w)` with 0 (after normalisation) and label `(h, w)` with ignore to `size` (H, W), centred.

    NOTE: centred as sssegmentation pads; mmsegmentation pads at the bottom/right. Either way only ignore pixels
    are added, so the loss is the same.
    """
    h, w = label.shape
    dh, dw = max(size[0] - h, 0), max(size[1] - w, 0)
    if dh == 0 and dw == 0:
        return image, label
    pad = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)  # left, right, top, bottom
    image = torch.nn.functional.pad(image, pad, value=0.0)
    label = torch.nn.functional.pad(label, pad, value=ignore_index)
    return image, label


def _check_size(what: str, size: Sequence[int]) -> None:
    if len(size) != 2 or not all(isinstance(v, int | np.integer) and v > 0 for v in size):
        raise DanetError(f"{what} {tuple(size)} must be two positive integers")


@dataclass(frozen=True)
class TrainPipeline:
    """Random keep-ratio resize, random crop (cat_max_ratio rule), flip, photometric distortion, normalise, pad."""

    base_size: tuple[int, int]  # (long, short) before the random ratio
    crop_size: tuple[int, int]  # (H, W)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    ignore_index: int = 255

    def __post_init__(self) -> None:
        _check_size("base size", self.base_size)
        _check_size("crop size", self.crop_size)
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise DanetError(f"resize ratio range {tuple(self.ratio_range)} must be 0 < low <= high, e.g. (0.5, 2.0)")
        if not 0 < self.cat_max_ratio <= 1:
            raise DanetError(f"cat_max_ratio {self.cat_max_ratio} must be in (0, 1] (1 disables the crop rule)")

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB uint8 `(H, W, 3)`, label uint8 `(H, W)` -> image float32 `(3, *crop)`, label int64 `crop`."""
        image, label = resize_keep_ratio(image, label, random_scale(self.base_size, self.ratio_range, rng))
        image, label = random_crop(image, label, self.crop_size, rng, self.cat_max_ratio, self.ignore_index)
        if rng.random() < self.flip_prob:
            # NOTE: copies: numpy calls a 1-pixel-wide reversed view contiguous, which torch.from_numpy then refuses
            image, label = image[:, ::-1].copy(), label[:, ::-1].copy()
        image = photometric_distortion(np.ascontiguousarray(image), rng)
        img_t = normalize(image, self.mean, self.std)
        lbl_t = torch.from_numpy(np.ascontiguousarray(label)).long()
        return pad_to(img_t, lbl_t, self.crop_size, self.ignore_index)


@dataclass(frozen=True)
class EvalPipeline:
    """Keep-ratio resize to the base size, normalise (no padding; the label is left at its original size)."""

    base_size: tuple[int, int]
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        _check_size("base size", self.base_size)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 `(H, W, 3)` -> float32 `(3, h', w')` with (w', h') = keep_ratio_size(H, W, base_size)."""
        image, _ = resize_keep_ratio(image, None, self.base_size)
        return normalize(image, self.mean, self.std)


def train_pipeline(preset) -> TrainPipeline:
    """The training pipeline of a `danet.presets.Preset`."""
    info = preset.dataset
    return TrainPipeline(
        base_size=tuple(info.base_size),
        crop_size=tuple(info.crop_size),
        ratio_range=tuple(preset.ratio_range),
        cat_max_ratio=preset.cat_max_ratio,
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        ignore_index=info.ignore_index,
    )


def eval_pipeline(preset) -> EvalPipeline:
    """The test (evaluation) pipeline of a `danet.presets.Preset`."""
    return EvalPipeline(base_size=tuple(preset.dataset.base_size), mean=tuple(preset.mean), std=tuple(preset.std))
