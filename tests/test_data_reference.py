"""The test pipeline and the resize sizes against mmsegmentation / sssegmentation outputs on real photographs.

Fixtures: tests/fixtures/data/*.npz, made by tools/make_data_fixtures.py inside the toolboxes' venvs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from danet.data.io import label_lut, map_label, read_image, read_label
from danet.data.transforms import EvalPipeline, keep_ratio_size, random_scale

FIX = Path(__file__).parent / "fixtures" / "data"
REF = np.load(FIX / "test_pipeline_ref.npz")
CASES = json.loads(str(REF["cases"]))
MEAN = np.array((123.675, 116.28, 103.53), np.float32)
STD = np.array((58.395, 57.12, 57.375), np.float32)


@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_eval_pipeline_matches_both_toolboxes(case):
    key = case["key"]
    out = EvalPipeline(tuple(case["scale"]))(read_image(FIX / "photos" / case["image"])).numpy()
    assert out.shape == tuple(REF[key + "/shape"])
    pos = REF[key + "/sample_pos"]
    np.testing.assert_allclose(out.ravel()[pos], REF[key + "/sample_mmseg"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.ravel()[pos], REF[key + "/sample_ssseg"], atol=1e-4, rtol=0)
    image = np.round(out.transpose(1, 2, 0) * STD + MEAN).astype(np.uint8)  # every pixel, through its hash
    assert hashlib.sha256(image.tobytes()).hexdigest() == str(REF[key + "/sha256"])
    if key + "/uint8" in REF:
        np.testing.assert_allclose(
            out, (REF[key + "/uint8"].transpose(2, 0, 1) - MEAN[:, None, None]) / STD[:, None, None], atol=1e-4
        )
    if case["label"]:
        num_classes = 150 if case["reduce_zero_label"] else 21
        lut = label_lut(num_classes, case["reduce_zero_label"])
        label = map_label(read_label(FIX / "photos" / case["label"]), lut, case["label"], num_classes)
        assert np.array_equal(label, REF[key + "/label"])


class FixedRatio:
    """Stands in for the generator: the ratio of the reference case."""

    def __init__(self, ratio: float):
        self.ratio = float(ratio)

    def uniform(self, low: float, high: float) -> float:
        return self.ratio


def test_random_resize_sizes_match_mmcv_and_ssseg():
    ref = np.load(FIX / "keep_ratio_ref.npz")
    for (h, w, long_, short, ratio), size in zip(ref["inputs"], ref["sizes"], strict=True):
        scale = random_scale((int(long_), int(short)), (0.5, 2.0), FixedRatio(ratio))
        assert keep_ratio_size(int(h), int(w), scale) == tuple(size)
