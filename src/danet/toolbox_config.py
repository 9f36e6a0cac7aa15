"""What an mmsegmentation checkpoint's recorded config says about its model that the weights cannot.

mmsegmentation keeps the training config's text in a checkpoint's meta (mmseg 0.x: `meta["config"]`, mmengine's
Runner: `meta["cfg"]`). Two of its settings change the logits without changing any weight:
- the backbone's `strides`: output stride 8 (`(1, 2, 1, 1)`) or 16 (`(1, 2, 2, 1)`);
- the decode head's `align_corners`: the final bilinear resize, True in mmseg's Cityscapes 769x769 configs (and
  their slide test of 769 x 769 windows every 513), False elsewhere.
sssegmentation's checkpoints hold no config: every one of its DANet configs uses align_corners=False, and the output
stride comes from the preset.
"""

from __future__ import annotations

import math
import re

CONFIG_KEYS = ("cfg", "config", "config_text")  # mmengine, mmseg 0.x, the peers' harness


def mmseg_model_settings(meta: dict, filename: str = "") -> dict:
    """{"output_stride": 8 | 16, "align_corners": bool}, each where the file's config says it (an empty dict for a
    file without one). A file named after a 769x769 config (mmseg's zoo names, e.g.
    `danet_r50-d8_769x769_40k_cityscapes_...pth`) without a config text is taken to use align_corners=True."""
    texts = (meta[k] for k in CONFIG_KEYS if isinstance(meta.get(k), str))
    text = next((t for t in texts if "decode_head" in t), "")  # NOTE: the harness's "config" is a file name
    flat = re.sub(r"\s+", "", text)  # NOTE: mmengine's dump spreads a tuple over lines, 0.x's pretty_text does not
    out: dict = {}
    head = flat.find("decode_head=")
    if head >= 0 and (m := re.search(r"align_corners=(True|False)", flat[head:])):
        out["align_corners"] = m.group(1) == "True"
    backbone = flat.find("backbone=")
    if backbone >= 0 and (m := re.search(r"strides=[(\[](\d+),(\d+),(\d+),(\d+),?[)\]]", flat[backbone:])):
        stride = 4 * math.prod(int(g) for g in m.groups())  # NOTE: the stem and its max-pool: 4
        if stride in (8, 16):
            out["output_stride"] = stride
    if "align_corners" not in out and "769x769" in filename:
        out["align_corners"] = True
    return out
