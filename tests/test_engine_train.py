"""End to end on the synthetic data: train -> stop mid-epoch -> resume (same weights) -> test (TTA, slide) -> predict.

Everything is tiny (a narrow model, 32x32 crops, batch 2, 2 iterations per epoch, 2 epochs, 2 val images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from danet.checkpoints import read_checkpoint
from danet.cli import main
from danet.config import RunConfig, apply_overrides, load_run_config
from danet.data import ensure_synthetic
from danet.engine.logging import read_log
from danet.engine.train import train
from danet.presets import get_preset

PRESET = "danet_tiny_synthetic"
SETTINGS = {
    "schedule.epochs": 2,
    "schedule.iters_per_epoch": 2,
    "schedule.batch_size": 2,
    "schedule.eval_interval": 1,
    "schedule.save_interval": 2,
    "data.crop_size": "[32,32]",
    "data.num_workers": 0,
    "data.val_limit": 2,
    "model.base_channels": 8,
    "model.stem_channels": 8,
    "model.head_channels": 16,
    "model.key_channels": 8,
    "model.aux_channels": 16,
    "deterministic": "true",
    "device": "cpu",
    "progress": "false",
    "log_interval": 1,
}
SETS = [f"{k}={v}" for k, v in SETTINGS.items()]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted run (in-process API) and a run stopped at iteration 3 then resumed (through the CLI)."""
    ref = tmp_path_factory.mktemp("reference")
    cfg = apply_overrides(RunConfig(preset=PRESET, data_root=str(data_root), work_dir=str(ref)), SETS)
    summary = train(cfg)
    assert summary["iter"] == 4 and not summary["stopped"]

    work = tmp_path_factory.mktemp("interrupted")
    argv = ["train", PRESET, "--data-root", str(data_root), "--work-dir", str(work)]
    argv += [a for s in SETS for a in ("--set", s)]
    assert main([*argv, "--set", "stop_iter=3"]) == 0
    stopped = read_checkpoint(work / "last.pth")
    assert stopped.train_state["iter"] == 3  # mid-epoch 2
    # the pictures so far (the curves; epoch 1's validation), drawn again at the end of the resumed run
    assert (work / "curves.png").is_file() and (work / "per_class_iou.png").is_file()
    assert main([*argv, "--resume"]) == 0
    return {"reference": ref, "resumed": work}


def test_resume_gives_the_same_weights(runs):
    a = read_checkpoint(runs["reference"] / "last.pth")
    b = read_checkpoint(runs["resumed"] / "last.pth")
    assert a.train_state["iter"] == b.train_state["iter"] == 4
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    opt_a, opt_b = a.train_state["optimizer"]["state"], b.train_state["optimizer"]["state"]
    assert all(torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"]) for k in opt_a)
    ma = json.loads((runs["reference"] / "metrics.json").read_text())
    mb = json.loads((runs["resumed"] / "metrics.json").read_text())
    assert ma["mIoU"] == mb["mIoU"] and ma["IoU"] == mb["IoU"]


def test_work_dir_contents(runs):
    work = runs["resumed"]
    names = {p.name for p in work.iterdir()}
    assert {"config.yaml", "log.jsonl", "last.pth", "best.pth", "epoch_2.pth", "metrics.json"} <= names
    assert {"curves.png", "per_class_iou.png", "confusion.png"} <= names
    assert "confusion" not in json.loads((runs["reference"] / "metrics.json").read_text())  # a picture, not numbers
    assert not [n for n in names if n.startswith(".")]  # no temp files left
    log = read_log(work / "log.jsonl")
    train_iters = [r["iter"] for r in log if r["type"] == "train"]
    assert train_iters == [1, 2, 3, 4]  # the stopped run's records, then the resumed ones, no repeats
    first = next(r for r in log if r["type"] == "train")
    assert {"loss", "loss_out", "loss_pam", "loss_cam", "loss_aux", "lr", "img_s", "elapsed_s", "eta_s"} <= set(first)
    assert first["lr"] == get_preset(PRESET).schedule.lr  # poly starts at the base lr
    assert [r["epoch"] for r in log if r["type"] == "val"] == [1, 2]
    best = read_checkpoint(work / "best.pth")
    assert best.train_state is None and best.meta["preset"] == PRESET and best.meta["classes"]
    assert Image.open(work / "curves.png").size[0] > 1000


def test_resolved_config_is_accepted_back(runs, data_root):
    work = runs["resumed"]
    cfg = load_run_config(str(work / "config.yaml"))
    assert cfg.schedule.epochs == 2 and cfg.data.crop_size == (32, 32) and cfg.model["head_channels"] == 16
    assert cfg.stop_iter is None  # the resumed run's config
    assert read_checkpoint(work / "last.pth").meta["config"]["schedule"]["lr"] == get_preset(PRESET).schedule.lr
    # an already finished run resumes to no further work
    assert main(["train", str(work / "config.yaml"), "--resume", "--set", "progress=false"]) == 0
    assert read_checkpoint(work / "last.pth").train_state["iter"] == 4


def test_test_cli_tta_and_slide(runs, data_root, tmp_path, capsys):
    ckpt = runs["resumed"] / "best.pth"
    base = ["test", PRESET, "--checkpoint", str(ckpt), "--data-root", str(data_root), "--limit", "2", "--no-progress"]
    assert main([*base, "--json", str(tmp_path / "whole.json")]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "background" in out
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert {"mIoU", "mAcc", "aAcc", "IoU", "Acc", "settings"} <= set(whole) and len(whole["IoU"]) == 5
    assert (tmp_path / "whole_per_class_iou.png").exists() and (tmp_path / "whole_confusion.png").exists()
    val = [r for r in read_log(runs["resumed"] / "log.jsonl") if r["type"] == "val"][-1]
    assert whole["mIoU"] == pytest.approx(val["mIoU"])  # the same numbers as the run's validation
    assert whole["settings"]["resize_logits"] == "once"  # a run of ours: sssegmentation's one resize
    assert main([*base, "--resize-logits", "twice", "--json", str(tmp_path / "twice.json")]) == 0
    assert json.loads((tmp_path / "twice.json").read_text())["settings"]["resize_logits"] == "twice"
    assert main([*base, "--base-size", "150", "100", "--json", str(tmp_path / "base.json")]) == 0
    based = json.loads((tmp_path / "base.json").read_text())
    assert based["settings"]["base_size"] == [150, 100]  # what the test images were resized to
    assert main([*base, "--base-size", "0", "100"]) == 2
    assert main([*base, "--mode", "slide", "--resize-logits", "twice"]) == 2  # windows: nothing to resize twice

    assert main([*base, "--tta", "--json", str(tmp_path / "tta.json")]) == 0
    tta = json.loads((tmp_path / "tta.json").read_text())
    assert tta["settings"]["scales"] == list(get_preset(PRESET).tta_scales) and tta["settings"]["flip"] is True
    assert tta["settings"]["tta_merge"] == "logits" and whole["settings"]["tta_merge"] is None  # sssegmentation's
    assert tta["settings"]["tta_views"] == "resized" and whole["settings"]["tta_views"] is None
    assert main([*base, "--tta", "--tta-merge", "probs", "--json", str(tmp_path / "probs.json")]) == 0
    assert json.loads((tmp_path / "probs.json").read_text())["settings"]["tta_merge"] == "probs"
    assert main([*base, "--tta", "--tta-views", "original", "--json", str(tmp_path / "original.json")]) == 0
    original = json.loads((tmp_path / "original.json").read_text())["settings"]
    assert (original["tta_views"], original["tta_merge"]) == ("original", "logits")  # each flag alone
    assert main([*base, "--tta", "--tta-views", "base", "--json", str(tmp_path / "base_views.json")]) == 0
    assert json.loads((tmp_path / "base_views.json").read_text())["settings"]["tta_views"] == "base"
    assert main([*base, "--tta-views", "original"]) == 2 and "add --tta" in capsys.readouterr().err
    assert main([*base, "--mode", "slide", "--crop", "64", "64", "--json", str(tmp_path / "slide.json")]) == 0
    slide = json.loads((tmp_path / "slide.json").read_text())
    assert slide["settings"]["mode"] == "slide" and slide["settings"]["crop"] == [64, 64]
    for m in (tta, slide):
        assert 0 <= m["mIoU"] <= 100 and 0 <= m["aAcc"] <= 100


def test_predict_writes_palette_pngs_and_overlays(runs, data_root, tmp_path, capsys):
    images = sorted((data_root / "images" / "validation").glob("*.jpg"))[:2]
    big = tmp_path / "in" / "big.png"
    big.parent.mkdir()
    Image.open(images[0]).resize((300, 200)).save(big)
    out = tmp_path / "out"
    ckpt = str(runs["resumed"] / "best.pth")
    assert main(["predict", "--checkpoint", ckpt, str(images[0]), str(images[1]), "--out", str(out), "--overlay"]) == 0
    for img in images:
        label = Image.open(out / f"{img.stem}.png")
        assert label.mode == "P" and label.size == Image.open(img).size
        assert np.asarray(label).max() < 5
        assert label.getpalette()[:15] == [c for rgb in get_preset(PRESET).palette for c in rgb]
        assert Image.open(out / f"{img.stem}_overlay.jpg").size == label.size
    # a folder input, natively sized, forced into sliding windows by a tiny pixel threshold
    argv = ["predict", "--checkpoint", ckpt, str(big.parent), "--out", str(out), "--no-resize", "--max-pixels", "5000"]
    assert main(argv) == 0
    assert Image.open(out / "big.png").size == (300, 200)


def test_python_predictor_gives_the_cli_s_labels(runs, data_root, tmp_path):
    """danet.Predictor (the public API) segments as `danet predict` does, with the checkpoint's classes."""
    import danet

    image = sorted((data_root / "images" / "validation").glob("*.jpg"))[3]
    assert main(["predict", "--checkpoint", str(runs["resumed"] / "best.pth"), str(image), "--out", str(tmp_path)]) == 0
    predictor = danet.Predictor(runs["resumed"] / "best.pth", device="cpu")
    labels = predictor(np.asarray(Image.open(image).convert("RGB")))
    assert labels.dtype == np.uint8 and np.array_equal(labels, np.asarray(Image.open(tmp_path / f"{image.stem}.png")))
    assert predictor.classes == list(get_preset(PRESET).classes) and "Predictor" in danet.__all__
    assert np.array_equal(predictor(Image.open(image)), labels)  # a PIL image too
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    danet.Predictor(runs["resumed"] / "best.pth", device="cpu")  # leaves the process's threads as they are
    assert torch.get_num_threads() == max(1, threads - 1)
    torch.set_num_threads(threads)
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)):
        with pytest.raises(danet.DanetError, match=r"RGB image as a \(H, W, 3\) uint8 array"):
            predictor(bad)


def test_predict_tta_gives_danet_test_labels(runs, data_root, monkeypatch):
    """--tta: each view's probabilities at the original size, as `danet test` (evaluate.segment) takes them; past the
    size limit at the resized size (a few pixels differ, never the shape). The model: coarse, smooth logits, so that
    where the softmax is taken matters (a trained model's crisp edges hide it)."""
    import danet.engine.predict as P
    from danet.data.transforms import normalize, resize_keep_ratio
    from danet.engine.evaluate import segment

    class Coarse(torch.nn.Module):
        num_classes = 5

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)

        def forward(self, x, resize: bool = True):
            y = 3 * self.conv(x)[:, :, ::8, ::8]
            if not resize:
                return {"out": y}
            return {"out": torch.nn.functional.interpolate(y, x.shape[-2:], mode="bilinear", align_corners=False)}

    pred = P.Predictor(runs["resumed"] / "best.pth")
    torch.manual_seed(0)
    pred.model = Coarse().eval()
    image = Image.open(sorted((data_root / "images" / "validation").glob("*.jpg"))[0]).convert("RGB")
    image = np.asarray(image.resize((500, 350)))  # shrunk to the base size before the model
    x = normalize(resize_keep_ratio(image, None, pred.base_size)[0], pred.mean, pred.std)[None]
    want = segment(pred.model, x, image.shape[:2], "whole", None, None, pred.tta_scales, True)[0].argmax(0).numpy()
    assert len(np.unique(want)) >= 3 and np.array_equal(pred(image, tta=True), want)
    # --tta-merge probs: the views' softmax probabilities averaged (mmseg's rule), other labels here
    by_probs = segment(pred.model, x, image.shape[:2], scales=pred.tta_scales, flip=True, merge="probs")
    by_probs = by_probs[0].argmax(0).numpy()
    assert (by_probs != want).any() and np.array_equal(pred(image, tta=True, merge="probs"), by_probs)
    monkeypatch.setattr(P, "FULL_SIZE_ELEMS", 0)
    small = pred(image, tta=True)
    assert small.shape == image.shape[:2] and 0 < (small != want).mean() < 0.05


def test_test_cli_bad_slide_window_is_one_line(runs, data_root, capsys):
    base = ["test", PRESET, "--checkpoint", str(runs["resumed"] / "best.pth"), "--data-root", str(data_root)]
    for extra, words in ((["--stride", "0", "0"], "must be 1.."), (["--crop", "16", "16", "--stride", "24", "24"],
                                                                    "at most the window [16, 16]")):  # fmt: skip
        assert main([*base, "--mode", "slide", *extra]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and words in err[0] and "Traceback" not in err[0]


def test_predict_missing_input_is_one_line(runs, tmp_path, capsys):
    rc = main(["predict", "--checkpoint", str(runs["resumed"] / "best.pth"), str(tmp_path / "nope.jpg"), "--out", "x"])
    assert rc == 2
    assert "nope.jpg does not exist" in capsys.readouterr().err


def test_the_log_after_a_resume_averages_the_same_steps_as_an_uninterrupted_run(data_root, tmp_path):
    """With log_interval > 1 a log line averages the steps since the previous one: the checkpoint holds that window,
    so the first line after a resume is the uninterrupted run's (it averaged only the resumed steps)."""
    lines = {}
    for name, stops in (("reference", []), ("resumed", ["stop_iter=2", "stop_iter=3"])):
        work = tmp_path / name
        argv = ["train", PRESET, "--data-root", str(data_root), "--work-dir", str(work)]
        argv += [a for s in [*SETS, "log_interval=4", "schedule.epochs=3"] for a in ("--set", s)]
        for i, stop in enumerate(stops):  # stopped at an epoch's end, then mid-epoch
            assert main([*argv, "--set", stop, *(["--resume"] if i else [])]) == 0
        assert main([*argv, *(["--resume"] if stops else [])]) == 0
        lines[name] = [r for r in read_log(work / "log.jsonl") if r["type"] == "train"]
    assert [r["iter"] for r in lines["reference"]] == [r["iter"] for r in lines["resumed"]] == [4, 6]
    for ref, resumed in zip(lines["reference"], lines["resumed"], strict=True):
        assert {k: v for k, v in ref.items() if k.startswith("loss")} == {
            k: v for k, v in resumed.items() if k.startswith("loss")
        }
