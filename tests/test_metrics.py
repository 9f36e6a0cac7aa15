"""ConfusionMatrix: mmsegmentation's IoUMetric numbers (fixture), hand-computed NaN cases, table, all_reduce."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from danet.engine.metrics import ConfusionMatrix

FIX = Path(__file__).parent / "fixtures" / "data" / "metrics_ref.npz"


def test_matches_mmseg_iou_metric():
    ref = np.load(FIX)
    k = int(ref["num_classes"])
    cm = ConfusionMatrix(k)
    for pred, label in zip(ref["preds"], ref["labels"], strict=True):
        cm.update(torch.from_numpy(pred).long(), torch.from_numpy(label).long())
    res = cm.compute()
    np.testing.assert_allclose(np.array(res["IoU"]) / 100, ref["IoU"], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(np.array(res["Acc"]) / 100, ref["Acc"], rtol=1e-6, equal_nan=True)
    assert res["aAcc"] / 100 == pytest.approx(float(ref["aAcc"]), rel=1e-6)
    # mmseg's summary (nan-means, rounded to 2 decimals)
    rounded = [round(res[m], 2) for m in ("mIoU", "mAcc", "aAcc")]
    np.testing.assert_allclose(rounded, ref["rounded"], atol=1e-4)
    # the fixture has the three special cases: absent from both, only predicted, only labelled
    assert math.isnan(res["IoU"][6]) and math.isnan(res["Acc"][6])
    assert res["IoU"][5] == 0 and math.isnan(res["Acc"][5])
    assert res["IoU"][4] == 0 and res["Acc"][4] == 0


def test_hand_computed_case_and_batched_update():
    label = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 3], [2, 0, 1, 3]])
    cm = ConfusionMatrix(5)
    cm.update(pred[None], label[None])  # (N, H, W)
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: TP 1, FN 1 -> 1/2
    # class 3: predicted once on a labelled pixel -> IoU 0, Acc NaN; class 4 absent -> NaN
    res = cm.compute()
    expect_iou = [100 / 3, 50.0, 50.0, 0.0, math.nan]
    np.testing.assert_allclose(res["IoU"], expect_iou, equal_nan=True)
    np.testing.assert_allclose(res["Acc"], [50.0, 200 / 3, 50.0, math.nan, math.nan], equal_nan=True)
    assert res["mIoU"] == pytest.approx((100 / 3 + 50 + 50 + 0) / 4)
    assert res["mAcc"] == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert res["aAcc"] == pytest.approx(100 * 4 / 7)  # the ignore pixel is not counted
    assert cm.mat.sum() == 7
    cm2 = ConfusionMatrix(5)
    for p, t in zip(pred, label, strict=True):  # (H, W) rows one at a time: same matrix
        cm2.update(p, t)
    assert torch.equal(cm.mat, cm2.mat)


def test_empty_and_reset():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    res = cm.compute()
    assert all(math.isnan(res[m]) for m in ("mIoU", "mAcc", "aAcc"))
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    assert cm.compute()["mIoU"] == 100.0
    cm.reset()
    assert cm.mat.sum() == 0
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 3))


def test_table_lists_every_class():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    text = cm.table(["road", "sky", "a long class name"])
    lines = text.splitlines()
    assert lines[0].split() == ["Class", "IoU", "Acc"]
    assert "road" in lines[2] and "50.00" in lines[2] and "100.00" in lines[3]
    assert lines[4].startswith("a long class name") and lines[4].split()[-2:] == ["nan", "nan"]
    with pytest.raises(ValueError):
        cm.table(["one"])


def test_all_reduce_in_a_process_group(tmp_path):
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    cm.all_reduce()  # no process group: nothing to do
    before = cm.mat.clone()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cm.all_reduce()
    finally:
        dist.destroy_process_group()
    assert torch.equal(cm.mat, before)  # a group of one sums to itself
