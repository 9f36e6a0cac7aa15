"""Inference paths: slide windows cover the image, TTA averages probabilities, strip-wise upsampled argmax; reader
processes give the same metrics."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import danet
from danet.engine.evaluate import segment
from danet.engine.inference import slide_logits, upsample_argmax


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster than several on a shared machine (and CI has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder(nn.Module):
    """Logits = a fixed 1x1 conv of the input; remembers the window shapes it was called with."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, k, 1)
        self.calls: list[tuple[int, int]] = []

    def forward(self, x, resize: bool = True):  # NOTE: pointwise: the output has the input's size either way
        self.calls.append(tuple(x.shape[-2:]))
        return {"out": self.conv(x)}


def test_slide_windows_match_mmseg_grid_and_average():
    torch.manual_seed(0)
    m = Recorder()
    x = torch.randn(1, 3, 50, 70)
    out = slide_logits(m, x, crop=(32, 32), stride=(20, 20), window_batch=1)
    # rows: max(50 - 32 + 19, 0) // 20 + 1 = 2; cols: (70 - 32 + 19) // 20 + 1 = 3; all windows full-size
    assert m.calls == [(32, 32)] * 6
    with torch.no_grad():
        assert torch.allclose(out, m(x)["out"], atol=1e-6)  # a pointwise model: averaging changes nothing


@pytest.mark.parametrize("window_batch, forwards", [(None, [2] * 6), (1, [2] * 6), (4, [8, 4]), (6, [12])])
def test_slide_windows_batched_give_the_same_logits(window_batch, forwards):
    """Windows of both images stacked into one forward (or a few) give the logits of one window at a time, float64."""
    torch.manual_seed(0)
    model = danet.create_model("danet_tiny_synthetic", base_channels=8, stem_channels=8, head_channels=16)
    model = model.double().eval()
    x = torch.randn(2, 3, 50, 70, dtype=torch.float64)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        one = slide_logits(model, x, crop=(32, 32), stride=(20, 20), window_batch=1)
        seen.clear()
        out = slide_logits(model, x, crop=(32, 32), stride=(20, 20), window_batch=window_batch)
    assert seen == forwards
    assert (out - one).abs().max() <= 1e-12 * one.abs().max()


def test_windows_per_forward_default(monkeypatch):
    import danet.engine.inference as E

    assert E.windows_per_forward(torch.device("cpu"), 1, (512, 1024)) == 1  # measured fastest on the CPU
    assert E.windows_per_forward(torch.device("cuda"), 1, (512, 1024)) == 4  # 2048 x 1024 pixels a forward
    assert E.windows_per_forward(torch.device("cuda"), 2, (512, 512)) == 4
    assert E.windows_per_forward(torch.device("cuda"), 1, (2048, 2048)) == 1
    monkeypatch.setattr(E, "SLIDE_BATCH_PIXELS", 64 * 64)
    assert E.windows_per_forward(torch.device("cuda"), 1, (32, 32)) == 4


def test_slide_window_larger_than_image_is_cut():
    m = Recorder()
    out = slide_logits(m, torch.randn(2, 3, 20, 25), crop=(32, 32), stride=(21, 21))
    assert m.calls == [(20, 25)] and out.shape == (2, 3, 20, 25)


def test_tta_averages_softmax_over_scales_and_flips():
    torch.manual_seed(0)
    model = danet.create_model("danet_tiny_synthetic", base_channels=8, stem_channels=8, head_channels=16).eval()
    x = torch.randn(1, 3, 48, 40)
    probs = segment(model, x, (60, 50), scales=(0.75, 1.0, 1.25), flip=True, merge="probs")
    assert probs.shape == (1, 5, 60, 50)
    assert torch.allclose(probs.sum(1), torch.ones(1, 60, 50), atol=1e-5)
    with torch.no_grad():
        views = []
        for s in (0.75, 1.0, 1.25):
            xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else x
            for flip in (False, True):
                logit = model(xs.flip(-1) if flip else xs, resize=False)["out"]  # at the output stride
                logit = logit.flip(-1) if flip else logit
                views.append(F.interpolate(logit, (60, 50), mode="bilinear", align_corners=False).softmax(1))
        assert torch.allclose(probs, torch.stack(views).mean(0), atol=1e-6)
    logits = segment(model, x, (60, 50))
    assert logits.shape == (1, 5, 60, 50) and not torch.allclose(logits.sum(1), torch.ones(1, 60, 50))
    with torch.no_grad():  # one resize, from the output stride straight to the label size (as sssegmentation)
        once = F.interpolate(model(x, resize=False)["out"], (60, 50), mode="bilinear", align_corners=False)
        twice = F.interpolate(model(x)["out"], (60, 50), mode="bilinear", align_corners=False)
    assert torch.equal(logits, once) and not torch.equal(logits, twice)
    slide = segment(model, x, (60, 50), mode="slide", crop=(32, 32), scales=(1.0, 1.5), flip=True)
    assert slide.shape == (1, 5, 60, 50)


def test_upsample_argmax_in_strips_equals_direct():
    torch.manual_seed(0)
    logits = torch.randn(7, 13, 17)
    direct = F.interpolate(logits[None], (101, 77), mode="bilinear", align_corners=False)[0].argmax(0)
    strips = upsample_argmax(logits, (101, 77), max_elems=7 * 77 * 9)  # forces strips of 9 rows
    assert torch.equal(direct, strips)


def test_reader_processes_give_the_same_confusion_matrix(tmp_path):
    """Evaluation with 2 reader processes (a GPU's default reads ahead) sees the same items in the same order as
    reading them here: the same confusion matrix, bit for bit; the whole list is read, also when uneven."""
    import danet
    from danet.data import build_dataset, ensure_synthetic
    from danet.engine.evaluate import evaluate
    from danet.presets import get_preset

    preset = get_preset("danet_tiny_synthetic")
    val = build_dataset(preset, ensure_synthetic(tmp_path / "data"), "val")
    torch.manual_seed(0)
    model = danet.create_model("danet_tiny_synthetic", base_channels=8, stem_channels=8, head_channels=16,
                               key_channels=8, aux_channels=16)  # fmt: skip
    kw = dict(device=torch.device("cpu"), limit=7, progress=False)
    cms = [evaluate(model, val, preset.num_classes, workers=w, **kw).mat for w in (0, 2)]
    labelled = sum(int((val[i][1] != preset.dataset.ignore_index).sum()) for i in range(7))
    assert torch.equal(cms[0], cms[1]) and cms[0].sum() == labelled  # every image counted once


def test_eval_workers_default(monkeypatch):
    import danet.engine.evaluate as E

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert E.eval_workers(torch.device("cpu")) == 0  # the CPU's cores run the model
    assert E.eval_workers(torch.device("cuda")) == 4  # a GPU: capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert E.eval_workers(torch.device("cuda")) == 1  # 16 cores over 8 processes: 2 each, one left for the process
    assert E.eval_workers(torch.device("cuda"), 3) == 3  # asked for: kept
    with pytest.raises(E.DanetError, match="0 or more"):
        E.eval_workers(torch.device("cpu"), -1)


@pytest.mark.parametrize(
    "crop, stride, words",
    [((32, 32), (33, 20), "at most the window"), ((32, 32), (0, 20), "must be 1..32"), ((0, 32), None, "positive")],
)
def test_slide_rejects_windows_that_leave_gaps(crop, stride, words):
    """A stride beyond the window would leave pixels without logits (NaN, then argmax 0): an error instead."""
    from danet.engine.inference import slide_windows
    from danet.errors import DanetError

    with pytest.raises(DanetError, match=words):
        slide_windows((50, 70), crop, stride or (20, 20))


def test_default_slide_stride_is_mmseg_s():
    """Two thirds of the window, rounded, as in mmseg's slide configs: (341, 683) for Cityscapes' 512 x 1024 windows,
    (513, 513) for its 769 x 769 ones (floored, they were 682 and 512)."""
    from danet.engine.inference import default_stride

    assert default_stride((512, 1024)) == (341, 683)
    assert default_stride((769, 769)) == (513, 513)
    assert default_stride((1, 2)) == (1, 1)


def test_original_views_evaluate_each_image_as_read(tmp_path):
    """views="original" (mmseg's TTA) and "base" (mmseg 0.x's): each image's views are made from the image as read,
    not from the test-resized one: the confusion matrix of `segment` on `OriginalViews` of every image (with "base",
    resized to the base size times each scale), with 0 or 2 reader processes; other than the resized views'. Without
    TTA the setting changes nothing; an unknown one is refused."""
    from danet.data import build_dataset, ensure_synthetic
    from danet.engine.evaluate import OriginalViews, evaluate
    from danet.engine.metrics import ConfusionMatrix
    from danet.presets import get_preset

    class Coarse(torch.nn.Module):  # logits at 1/8 of a colour filter: labels that follow the image
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)

        def forward(self, x, resize: bool = True):
            y = 3 * self.conv(x)[:, :, ::8, ::8]
            return {"out": F.interpolate(y, x.shape[-2:], mode="bilinear") if resize else y}

    preset = get_preset("danet_tiny_synthetic")
    val = build_dataset(preset, ensure_synthetic(tmp_path / "data"), "val")
    torch.manual_seed(0)
    model = Coarse().eval()
    tta = dict(scales=(0.5, 1.0), flip=True, merge="probs", resize_logits="twice")
    kw = dict(device=torch.device("cpu"), limit=3, progress=False, **tta)
    for views, base in (("original", None), ("base", preset.base_size)):
        want = ConfusionMatrix(preset.num_classes, ignore_index=preset.dataset.ignore_index)
        for i in range(3):
            image, label = val.read(i)
            assert image.shape[:2] != tuple(val[i][0].shape[-2:])  # the test pipeline resizes them
            source = OriginalViews(image, preset.mean, preset.std, base=base)
            want.update(segment(model, source, label.shape, **tta).argmax(1)[0], torch.from_numpy(label).long())
        assert int((want.mat.sum(0) > 0).sum()) >= 3  # labels of several classes
        for workers in (0, 2):
            cm = evaluate(model, val, preset.num_classes, workers=workers, views=views, **kw)
            assert torch.equal(cm.mat, want.mat)
        assert not torch.equal(evaluate(model, val, preset.num_classes, **kw).mat, want.mat)
    sliver = OriginalViews(np.zeros((1, 83, 3), np.uint8), preset.mean, preset.std)  # a 0-pixel target side
    assert sliver.size(0.25) == (1, 21) and sliver.view(0.25).shape == (1, 3, 1, 21)
    plain = dict(device=torch.device("cpu"), limit=2, progress=False)
    assert torch.equal(evaluate(model, val, 5, views="original", **plain).mat, evaluate(model, val, 5, **plain).mat)
    with pytest.raises(Exception, match="TTA views must be one of resized, original, base, got 'tensor'"):
        evaluate(model, val, 5, views="tensor", **plain)


@pytest.mark.parametrize("views", ["resized", "original"])
def test_a_float64_model_is_evaluated_in_float64(tmp_path, views):
    """A float64 model (the equivalence checks') gets float64 images, also as views of the original image: the
    confusion matrix of `segment` on float64 inputs, where float32 images met float64 weights and failed."""
    from danet.data import build_dataset, ensure_synthetic
    from danet.engine.evaluate import OriginalViews, evaluate
    from danet.engine.metrics import ConfusionMatrix
    from danet.presets import get_preset

    preset = get_preset("danet_tiny_synthetic")
    val = build_dataset(preset, ensure_synthetic(tmp_path / "data"), "val")
    torch.manual_seed(0)
    model = danet.create_model("danet_tiny_synthetic", base_channels=8, stem_channels=8, head_channels=16,
                               key_channels=8, aux_channels=16).double().eval()  # fmt: skip
    tta = dict(scales=(0.75, 1.0), flip=True) if views == "original" else {}
    cm = evaluate(model, val, preset.num_classes, device=torch.device("cpu"), limit=2, progress=False, views=views,
                  **tta)  # fmt: skip
    expected = ConfusionMatrix(preset.num_classes, ignore_index=preset.dataset.ignore_index)
    pipe = val.pipeline
    for i in range(2):
        if views == "original":
            image, label = val.read(i)
            x = OriginalViews(np.asarray(image), pipe.mean, pipe.std, dtype=torch.float64)
        else:
            image, label = val[i]
            x = torch.as_tensor(image)[None].double()
        label = torch.as_tensor(label)
        scores = segment(model, x, tuple(label.shape[-2:]), **tta, merge="probs" if tta else "logits")
        assert scores.dtype == torch.float64
        expected.update(scores.argmax(1)[0], label)
    assert torch.equal(cm.mat, expected.mat) and cm.mat.sum() > 0
