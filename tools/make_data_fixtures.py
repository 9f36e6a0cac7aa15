#!/usr/bin/env python
"""Regenerate tests/fixtures/data/ from the two reference toolboxes (mmsegmentation 1.2.2, sssegmentation 1.7.0).

    .venv/bin/python tools/make_data_fixtures.py          # ~20 s; needs scikit-image here and the peer venvs

What it writes (all small, committed):
- photos/*.{jpg,png}: five real photographs from scikit-image's sample data, shrunk, in the formats the readers
  must handle (JPEG, portrait JPEG, 8-bit grayscale PNG, RGBA PNG, 16-bit RGB PNG), plus label PNGs.
- test_pipeline_ref.npz: each toolbox's test pipeline (mmseg: LoadImageFromFile + Resize(keep_ratio) +
  SegDataPreProcessor; ssseg: cv2.imread + Resize + Normalize + ToTensor) on every photo at three scales. Per case:
  the output shape, the SHA-256 of the image it normalised (uint8 HWC RGB, recovered exactly from the output),
  4096 sampled output values, and for the smallest scale the whole uint8 image; plus mmseg's mapped labels
  (LoadAnnotations: reduce_zero_label, palette PNG indices).
- keep_ratio_ref.npz: mmcv.rescale_size and ssseg Resize output sizes for 300 random (h, w, scale, ratio).
- metrics_ref.npz: random predictions / labels (with ignore pixels, a class absent from both, one only predicted,
  one only labelled) and mmseg IoUMetric's per-class IoU / Acc and aAcc (unrounded and its rounded summary),
  cross-checked against ssseg's Evaluation.

The toolboxes run in their own venvs (see /work/shared/peers/README.md); nothing of theirs is imported here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "data"
PEERS_DIR = Path(os.environ.get("DANET_PEERS_DIR", "/work/shared/peers"))
PEERS_HOME = Path(os.environ.get("DANET_PEERS_HOME", Path.home() / ".cache" / "danet-peers"))
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
SCALES = ((2048, 512), (2048, 1024), (128, 128))  # ADE20K/VOC, Cityscapes, the synthetic preset
N_SAMPLES = 4096

PEER_SCRIPT = r"""
import json, sys, warnings
import numpy as np
warnings.filterwarnings("ignore")
peers_dir, toolbox, job_path, out_path = sys.argv[1:5]
sys.path.insert(0, peers_dir)
job = json.load(open(job_path))
out = {}
if toolbox == "mmseg":
    import mmseg_danet
    mmseg_danet.install_mmcv_ops_stub()
    import torch
    from mmcv.image import rescale_size
    from mmcv.transforms import Compose
    from mmseg.evaluation.metrics import IoUMetric
    from mmseg.models.data_preprocessor import SegDataPreProcessor
    from mmseg.registry import TRANSFORMS
    from mmseg.utils import register_all_modules
    register_all_modules()
    pre = SegDataPreProcessor(mean=job["mean"], std=job["std"], bgr_to_rgb=True, pad_val=0, seg_pad_val=255)
    for case in job["cases"]:
        steps = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=tuple(case["scale"]), keep_ratio=True)]
        results = dict(img_path=case["image"], seg_fields=[], reduce_zero_label=case["reduce_zero_label"])
        if case["label"]:
            steps.append(dict(type="LoadAnnotations", reduce_zero_label=case["reduce_zero_label"]))
            results["seg_map_path"] = case["label"]
        steps.append(dict(type="PackSegInputs"))
        res = Compose([TRANSFORMS.build(s) for s in steps])(results)
        data = pre(dict(inputs=[res["inputs"]], data_samples=[res["data_samples"]]), training=False)
        out[case["key"] + "/image"] = data["inputs"][0].numpy()
        if case["label"]:
            out[case["key"] + "/label"] = res["data_samples"].gt_sem_seg.data[0].numpy().astype(np.uint8)
    kr = np.array(job["keep_ratio"], dtype=np.float64)  # h, w, long, short, ratio
    sizes = []
    for h, w, long_, short, ratio in kr:
        scale = (int(long_ * ratio), int(short * ratio))  # mmcv RandomResize._random_sample_ratio
        sizes.append(rescale_size((int(w), int(h)), scale))
    out["keep_ratio"] = np.array(sizes, dtype=np.int64)
    m = np.load(job["metrics"])
    metric = IoUMetric(ignore_index=255)
    metric.dataset_meta = dict(classes=[f"c{k}" for k in range(int(m["num_classes"]))])
    samples = [dict(pred_sem_seg=dict(data=torch.from_numpy(p[None].astype(np.int64))),
                    gt_sem_seg=dict(data=torch.from_numpy(t[None].astype(np.int64))))
               for p, t in zip(m["preds"], m["labels"])]
    metric.process({}, samples)
    areas = [sum(x) for x in zip(*metric.results)]
    ret = IoUMetric.total_area_to_metrics(*areas, metrics=["mIoU"])
    out["IoU"], out["Acc"], out["aAcc"] = ret["IoU"], ret["Acc"], np.asarray(ret["aAcc"])
    summary = metric.compute_metrics(metric.results)
    out["rounded"] = np.array([summary["mIoU"], summary["mAcc"], summary["aAcc"]], dtype=np.float64)
else:
    import ssseg_danet
    ssseg_danet.install_torchvision_stub()
    import cv2
    from ssseg.modules.datasets.pipelines.evaluation import Evaluation
    from ssseg.modules.datasets.pipelines.transforms import Compose, Normalize, Resize, ToTensor
    for case in job["cases"]:
        pipe = Compose([Resize(output_size=tuple(case["scale"]), keep_ratio=True, scale_range=None),
                        Normalize(mean=job["mean"], std=job["std"], to_rgb=True), ToTensor()])
        sm = pipe({"image": cv2.imread(case["image"])})  # as ssseg's BaseDataset.read
        out[case["key"] + "/image"] = sm["image"].numpy()
    sizes = []
    for h, w, long_, short, ratio in np.array(job["keep_ratio"], dtype=np.float64):
        r = Resize(output_size=(int(long_ * ratio), int(short * ratio)), keep_ratio=True, scale_range=None)
        sm = r({"image": np.zeros((int(h), int(w), 1), np.uint8)})
        sizes.append((sm["image"].shape[1], sm["image"].shape[0]))
    out["keep_ratio"] = np.array(sizes, dtype=np.int64)
    m = np.load(job["metrics"])
    ev = Evaluation(list(m["preds"]), list(m["labels"]), int(m["num_classes"]), ignore_index=255)
    res = ev.all_metric_results
    out["IoU"], out["Acc"], out["aAcc"] = res["iou"], res["accuracy"], np.asarray(res["all_accuracy"])
np.savez(out_path, **out)
"""


def make_photos(photo_dir: Path) -> list[tuple[str, Path]]:
    """Shrunk scikit-image sample photos in five formats; returns (key, path)."""
    from skimage import data

    photo_dir.mkdir(parents=True, exist_ok=True)

    def shrink(rgb, w, h):
        return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)

    out = []
    coffee = shrink(data.coffee(), 150, 100)  # landscape JPEG
    p = photo_dir / "coffee.jpg"
    Image.fromarray(coffee).save(p, quality=90)
    out.append(("coffee", p))
    chelsea = shrink(data.chelsea()[:, 120:320], 100, 150)  # portrait JPEG
    p = photo_dir / "chelsea_portrait.jpg"
    Image.fromarray(chelsea).save(p, quality=90)
    out.append(("chelsea", p))
    p = photo_dir / "camera_gray.png"  # 8-bit grayscale
    Image.fromarray(shrink(data.camera(), 96, 96)).save(p)
    out.append(("camera", p))
    astro = shrink(data.astronaut(), 120, 120)  # RGBA: the alpha channel must be dropped, not blended
    alpha = np.tile(np.linspace(40, 255, 120, dtype=np.uint8), (120, 1))
    p = photo_dir / "astronaut_rgba.png"
    Image.fromarray(np.dstack([astro, alpha]), mode="RGBA").save(p)
    out.append(("astronaut", p))
    rocket = (
        shrink(data.rocket(), 90, 60).astype(np.uint16) * 256
        + (np.arange(90, dtype=np.uint16) * 37 % 256)[None, :, None]
    )
    p = photo_dir / "rocket16.png"
    cv2.imwrite(str(p), cv2.cvtColor(rocket, cv2.COLOR_RGB2BGR))
    out.append(("rocket", p))
    return out


def make_labels(photo_dir: Path) -> dict[str, tuple[Path, bool]]:
    """An ADE20K-like label (0..150 and 255, reduce-zero-label) and a VOC-like palette PNG, both 150 x 100."""
    rng = np.random.default_rng(3)
    ade = rng.integers(0, 151, (100, 150)).astype(np.uint8)
    ade[:10] = 0
    ade[-5:, :20] = 255
    p_ade = photo_dir / "coffee_ade_label.png"
    Image.fromarray(ade, mode="L").save(p_ade)
    voc = rng.integers(0, 21, (100, 150)).astype(np.uint8)
    voc[40:45] = 255
    im = Image.fromarray(voc, mode="P")
    im.putpalette(list(rng.integers(0, 256, 768).astype(np.uint8)))
    p_voc = photo_dir / "coffee_voc_label.png"
    im.save(p_voc)
    return {"ade": (p_ade, True), "voc": (p_voc, False)}


def make_metric_inputs(path: Path) -> None:
    rng = np.random.default_rng(7)
    k = 7  # class 6: absent from both; class 5: only predicted; class 4: only labelled
    labels = rng.integers(0, 5, (3, 40, 30)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.1] = 255
    preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, 6, labels.shape)).astype(np.uint8)
    preds[preds == 255] = 0
    preds[preds == 4] = 3
    np.savez(path, preds=preds, labels=labels, num_classes=k)


def run_peer(toolbox: str, job: Path, out: Path) -> dict[str, np.ndarray]:
    py = PEERS_HOME / f"{toolbox}-venv" / "bin" / "python"
    if not py.exists():
        sys.exit(f"{py} not found: run {PEERS_DIR}/setup_{toolbox}_env.sh first")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([str(py), "-c", PEER_SCRIPT, str(PEERS_DIR), toolbox, str(job), str(out)], check=True, env=env)
    with np.load(out) as f:
        return dict(f)


def recover_uint8(x: np.ndarray) -> np.ndarray:
    """The uint8 HWC RGB image behind a normalised `(3, H, W)` output (asserting it is one)."""
    u = x.transpose(1, 2, 0) * np.array(STD, np.float32) + np.array(MEAN, np.float32)
    r = np.round(u)
    assert np.abs(u - r).max() < 1e-3 and r.min() >= 0 and r.max() <= 255
    return r.astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    photo_dir = OUT / "photos"
    photos = make_photos(photo_dir)
    labels = make_labels(photo_dir)
    cases = []
    for key, path in photos:
        for scale in SCALES:
            case = dict(key=f"{key}@{scale[0]}x{scale[1]}", image=str(path), scale=list(scale))
            case.update(label=None, reduce_zero_label=False)
            cases.append(case)
    for name, (lpath, rzl) in labels.items():
        cases.append(dict(key=f"label_{name}", image=str(photo_dir / "coffee.jpg"), scale=[2048, 512]))
        cases[-1].update(label=str(lpath), reduce_zero_label=rzl)
    rng = np.random.default_rng(11)
    kr = np.stack(
        [
            rng.integers(16, 3000, 300),
            rng.integers(16, 3000, 300),
            rng.choice([2048, 1024, 512, 128], 300),
            rng.choice([1024, 512, 128, 96], 300),
            rng.uniform(0.5, 2.0, 300),
        ],
        axis=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_metric_inputs(tmp / "metric_inputs.npz")
        job = dict(
            cases=cases, mean=list(MEAN), std=list(STD), keep_ratio=kr.tolist(), metrics=str(tmp / "metric_inputs.npz")
        )
        (tmp / "job.json").write_text(json.dumps(job))
        mm = run_peer("mmseg", tmp / "job.json", tmp / "mm.npz")
        ss = run_peer("ssseg", tmp / "job.json", tmp / "ss.npz")
        with np.load(tmp / "metric_inputs.npz") as f:
            metric_inputs = dict(f)

    ref: dict[str, np.ndarray] = {}
    for case in cases:
        key = case["key"]
        a, b = mm[key + "/image"], ss[key + "/image"]
        assert a.shape == b.shape, (key, a.shape, b.shape)
        assert np.abs(a - b).max() < 1e-4, (key, np.abs(a - b).max())  # the two toolboxes agree
        u8 = recover_uint8(a)
        pos = np.random.default_rng(0).integers(0, a.size, N_SAMPLES)
        ref[key + "/shape"] = np.array(a.shape)
        ref[key + "/sha256"] = np.array(hashlib.sha256(u8.tobytes()).hexdigest())
        ref[key + "/sample_pos"] = pos
        ref[key + "/sample_mmseg"] = a.ravel()[pos]
        ref[key + "/sample_ssseg"] = b.ravel()[pos]
        if max(case["scale"]) <= 128:
            ref[key + "/uint8"] = u8
        if case["label"]:
            ref[key + "/label"] = mm[key + "/label"]
    ref["cases"] = np.array(
        json.dumps([{k: Path(v).name if k in ("image", "label") and v else v for k, v in c.items()} for c in cases])
    )
    np.savez_compressed(OUT / "test_pipeline_ref.npz", **ref)

    assert (mm["keep_ratio"] == ss["keep_ratio"]).all()
    np.savez_compressed(OUT / "keep_ratio_ref.npz", inputs=kr, sizes=mm["keep_ratio"])

    for name in ("IoU", "Acc", "aAcc"):
        np.testing.assert_allclose(mm[name], ss[name], rtol=1e-6, equal_nan=True)
    np.savez_compressed(
        OUT / "metrics_ref.npz", **metric_inputs, IoU=mm["IoU"], Acc=mm["Acc"], aAcc=mm["aAcc"], rounded=mm["rounded"]
    )
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e3:.0f} kB); mmseg mIoU/mAcc/aAcc (rounded): {mm['rounded'].tolist()}")


if __name__ == "__main__":
    main()
