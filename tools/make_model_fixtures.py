#!/usr/bin/env python
"""Regenerate the committed model-equivalence fixtures (tests/fixtures/models/) from the two reference toolboxes.

    .venv/bin/python tools/make_model_fixtures.py                # needs the peers' venvs (see below)
    .venv/bin/python tools/make_model_fixtures.py --peers /work/shared/peers --out tests/fixtures/models

The peers (/work/shared/peers/README.md) run sssegmentation 1.7.0 and mmsegmentation 1.2.2 on CPU in their own
venvs (`$SSSEG_VENV`, `$MMSEG_VENV`, default `~/.cache/danet-peers/{ssseg,mmseg}-venv`). Their full-width models make
~200 MB checkpoints, so the fixtures use NARROW DANet-R50 variants (same depth, blocks, dilations, attention, three
classifiers and aux head; only the widths shrink), built through the toolboxes' own code:

- mmseg: the harness's own `--cfg-options` (backbone.base_channels, stem_channels, decode_head.channels/pam_channels,
  auxiliary_head.channels, num_classes), plus `--d16` for output stride 16.
- ssseg: the harness has no overrides, so this script runs itself inside the ssseg venv (`peer-ssseg` mode):
  it imports `ssseg_danet`, wraps `ssseg_cfg.build` to shrink the same widths in the SEGMENTOR_CFG dict, then calls
  the harness's `main()` unchanged.

For every case (toolbox x output stride 8/16, input size not a multiple of 8) the harness runs `dump --perturb`
twice, in float64 (`--double`) and float32, on the same seed; the fixture keeps the toolbox-format checkpoint
(`<case>.pth`; the mmseg d8 one is re-saved the way mmengine's Runner saves, with a MessageHub of HistoryBuffers,
so the test also covers reading mmseg 1.x files that `weights_only=True` refuses) and `<case>.npz`: the float32
input, logits (64/32), head outputs at 1/os (`pam_cam`, `pam`, `cam`, `aux`, 64/32) and `meta_json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS_HOME = Path(os.environ.get("DANET_PEERS_HOME", Path.home() / ".cache/danet-peers"))
VENVS = {
    "ssseg": Path(os.environ.get("SSSEG_VENV", PEERS_HOME / "ssseg-venv")),
    "mmseg": Path(os.environ.get("MMSEG_VENV", PEERS_HOME / "mmseg-venv")),
}
# widths of the narrow variant (the published nets: 64 / 64 / 512 / 64 / aux 512 ssseg, 256 mmseg / 150 classes)
NARROW = {"base": 4, "stem": 8, "head": 32, "key": 16, "aux_ssseg": 32, "aux_mmseg": 16, "classes": 5}
# (toolbox, output stride, (H, W), seed): sizes that are not multiples of 8 (nor 16)
CASES = [("ssseg", 8, (75, 97), 0), ("ssseg", 16, (67, 101), 1), ("mmseg", 8, (75, 97), 2), ("mmseg", 16, (67, 101), 3)]
SAVED = ("logits", "head_pam_cam", "head_pam", "head_cam", "aux_logits")
TTA_SCALES = [0.5, 1.0, 1.5]  # the TTA fixture (ssseg_d8_tta.npz): scales not a multiple of 8 apart, and flips
# mmseg's own TTA fixture (mmseg_d8_tta.*): the mmseg_d8 model on a PNG of this size (no side a multiple of 8),
# through the ADE20K config's tta_pipeline as it ships (img_ratios 0.5 .. 1.75, flips)
MMSEG_TTA_SIZE, MMSEG_TTA_SEED = (61, 83), 5
# and mmseg 0.x's views (its MultiScaleFlipAug: the test scale (LONG, SHORT) times each ratio, int(), keep-ratio
# Resize), made by 1.2.2's Resize(scale=...) at a small test scale: the same rule, views of a few hundred pixels
MMSEG_TTA_BASE = (100, 50)
# the align_corners fixture (mmseg_769.*): one of mmseg's Cityscapes 769x769 configs (align_corners=True)
CORNERS_CONFIG, CORNERS_SIZE, CORNERS_SEED = "danet_r50-d8_4xb2-40k_cityscapes-769x769", (71, 93), 4


def mmseg_narrow_options() -> list[str]:
    """The mmseg harness's `--cfg-options` of the NARROW variant."""
    b, n = NARROW["base"], NARROW["classes"]
    return [f"backbone.base_channels={b}", f"backbone.stem_channels={NARROW['stem']}",
            f"decode_head.in_channels={b * 32}", f"decode_head.channels={NARROW['head']}",
            f"decode_head.pam_channels={NARROW['key']}", f"decode_head.num_classes={n}",
            f"auxiliary_head.in_channels={b * 16}", f"auxiliary_head.channels={NARROW['aux_mmseg']}",
            f"auxiliary_head.num_classes={n}"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# modes that run inside a peer's venv
# ---------------------------------------------------------------------------------------------------------------
def peer_ssseg(peers: str, argv: list[str]) -> None:
    """Run ssseg_danet.main(argv) with ssseg_cfg.build narrowed (inside the ssseg venv)."""
    sys.dont_write_bytecode = True
    sys.path.insert(0, peers)
    import ssseg_cfg  # noqa: PLC0415 - the peer's module, only importable in its venv
    import ssseg_danet  # noqa: PLC0415

    original = ssseg_cfg.build

    def build(name):
        cfg = original(name)
        base, n = NARROW["base"], NARROW["classes"]
        cfg["num_classes"] = n
        cfg["backbone"].update(base_channels=base, stem_channels=NARROW["stem"])
        cfg["head"].update(in_channels=base * 32, feats_channels=NARROW["head"], transform_channels=NARROW["key"])
        cfg["auxiliary"].update(in_channels=base * 16, out_channels=NARROW["aux_ssseg"])
        if scales := os.environ.get("DANET_FIXTURE_TTA"):  # ssseg's multi-scale + flip test, its logits averaged
            cfg["inference"]["tta"].update(multiscale=[float(f) for f in scales.split(",")], flip=True)
            assert cfg["inference"]["tta"]["use_probs_before_resize"] is False
        return cfg

    ssseg_cfg.build = build
    ssseg_danet.main(argv)


def peer_mmengine(src: str, dst: str) -> None:
    """Re-save an mmseg harness checkpoint as mmengine's Runner does (inside the mmseg venv): meta with
    dataset_meta, state_dict, message_hub (HistoryBuffer objects holding numpy arrays), optimizer, schedulers."""
    import torch  # noqa: PLC0415
    from mmengine.logging import MessageHub  # noqa: PLC0415

    ck = torch.load(src, weights_only=True)
    hub = MessageHub.get_instance("danet-fixture")
    for it in range(3):
        hub.update_scalar("train/loss", 2.5 - it * 0.1)
        hub.update_scalar("train/lr", 0.01)
    hub.update_info("iter", 3)
    names = [f"class{i}" for i in range(NARROW["classes"])]
    meta = {k: v for k, v in ck["meta"].items() if k != "config_text"}
    meta.update(dataset_meta={"classes": tuple(names), "palette": [[i * 40, 0, 0] for i in range(len(names))]},
                epoch=0, iter=3, cfg=ck["meta"]["config_text"])  # fmt: skip
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.01, momentum=0.9)
    param.grad = torch.ones(2)
    opt.step()
    torch.save({"meta": meta, "state_dict": ck["state_dict"], "message_hub": hub.state_dict(),
                "optimizer": opt.state_dict(), "param_schedulers": [{"last_step": 3, "power": 0.9}]}, dst)  # fmt: skip
    try:
        torch.load(dst, weights_only=True)
        raise SystemExit("expected torch.load(weights_only=True) to refuse the mmengine objects")
    except Exception as e:  # noqa: BLE001
        print(f"{dst}: weights_only=True refuses it as expected ({type(e).__name__})")


def peer_mmseg_tta(peers: str, ckpt: str, image: str, out: str, base: str = "") -> None:
    """mmseg's own multi-scale + flip test of the mmseg_d8 model on `image` (inside the mmseg venv), float64.

    The views come from the ADE20K config's `tta_pipeline` unchanged (TestTimeAug: mmcv's Resize(scale_factor=r,
    keep_ratio=True) of the image as read, then RandomFlip prob 0 / 1); with `base` "LONG,SHORT" its Resize is
    Resize(scale=(int(LONG r), int(SHORT r)), keep_ratio=True) instead, the views of mmseg 0.x's MultiScaleFlipAug.
    Each goes through the model's own data_preprocessor (float32, as always) and `EncoderDecoder.predict` in float64
    (postprocess_result flips the logits back and resizes them to the original size); `SegTTAModel.merge_preds`
    gives the labels. Saved: the mean of the views' softmax (the rule merge_preds applies), its labels, each view's
    size."""
    import types

    sys.dont_write_bytecode = True
    sys.path.insert(0, peers)
    import mmseg_danet  # noqa: PLC0415 - the peer's harness, only importable in its venv

    torch = mmseg_danet.import_stack(2)
    import numpy as np  # noqa: PLC0415
    from mmengine.config import ConfigDict  # noqa: PLC0415
    from mmengine.dataset import Compose  # noqa: PLC0415
    from mmseg.models.segmentors import SegTTAModel  # noqa: PLC0415
    from mmseg.registry import MODELS  # noqa: PLC0415

    opts = mmseg_narrow_options()
    args = types.SimpleNamespace(config="danet_r50-d8_4xb4-160k_ade20k-512x512", cfg_options=opts, d16=False)
    cfg, model_cfg, _ = mmseg_danet.load_cfg(args)
    model = MODELS.build(ConfigDict(model_cfg))
    model.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])  # our own fixture (mmengine objects)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        label = Path(tmp) / "label.png"
        import cv2  # noqa: PLC0415

        cv2.imwrite(str(label), np.zeros(cv2.imread(image).shape[:2], np.uint8))
        pipeline = cfg.tta_pipeline
        if base:
            long, short = (int(v) for v in base.split(","))
            resizes = [{"type": "Resize", "scale": (int(long * r), int(short * r)), "keep_ratio": True}
                       for r in cfg.img_ratios]  # fmt: skip
            assert [t["type"] for t in pipeline[1]["transforms"][0]] == ["Resize"] * len(resizes)
            pipeline[1]["transforms"][0] = resizes
        views = Compose(pipeline)(
            {"img_path": image, "seg_map_path": str(label), "reduce_zero_label": False, "seg_fields": []}
        )
    preprocessed = [model.data_preprocessor({"inputs": [x], "data_samples": [d]}, False)
                    for x, d in zip(views["inputs"], views["data_samples"], strict=True)]  # fmt: skip
    model.double()
    with torch.no_grad():
        results = [model.predict(p["inputs"].double(), p["data_samples"])[0] for p in preprocessed]
    merged = SegTTAModel(module=model).merge_preds([results])[0]
    probs = sum(r.seg_logits.data.softmax(dim=0) for r in results) / len(results)
    labels = merged.pred_sem_seg.data.numpy()  # (1, H, W)
    assert np.array_equal(probs.argmax(0).numpy(), labels[0]), "merge_preds' labels are not the argmax of the mean"
    meta = {"ratios": list(cfg.img_ratios), "tta_pipeline": str(pipeline), "versions": mmseg_danet.versions(),
            "views": [{"img_shape": list(r.img_shape), "flip": bool(r.flip)} for r in results]}  # fmt: skip
    np.savez(out, probs_64=probs.numpy(), labels=labels, meta_json=np.array(json.dumps(meta)))


# ---------------------------------------------------------------------------------------------------------------
# driver (this project's venv)
# ---------------------------------------------------------------------------------------------------------------
def run(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def harness_cmd(
    toolbox: str, peers: Path, os_: int, size, seed: int, out: Path, double: bool, config: str | None = None
) -> list[str]:
    py = str(VENVS[toolbox] / "bin/python")
    common = ["--seed", str(seed), "--size", str(size[0]), str(size[1]), "--perturb", "--no-feats", "--out", str(out)]
    common += ["--double"] if double else []
    if toolbox == "ssseg":
        config = f"danet_resnet50os{os_}_ade20k"
        return [py, __file__, "peer-ssseg", str(peers), "dump", "--config", config, *common]
    opts = mmseg_narrow_options()
    config = config or "danet_r50-d8_4xb4-160k_ade20k-512x512"
    cmd = [py, str(peers / "mmseg_danet.py"), "dump", "--config", config, *common]
    return cmd + (["--d16"] if os_ == 16 else []) + ["--cfg-options", *opts]


def make(peers: Path, out_dir: Path) -> None:
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="danet-fixtures-") as tmp:
        tmp = Path(tmp)
        for toolbox, os_, size, seed in CASES:
            name = f"{toolbox}_d{os_}"
            f64, f32 = tmp / f"{name}_64.npz", tmp / f"{name}_32.npz"
            run(harness_cmd(toolbox, peers, os_, size, seed, f64, double=True))
            run(harness_cmd(toolbox, peers, os_, size, seed, f32, double=False))
            a, b = np.load(f64), np.load(f32)
            sd_keys = [k for k in a.files if k.startswith("sd.")]
            assert all(np.array_equal(a[k], b[k]) for k in sd_keys), "float32 and float64 dumps hold different weights"
            assert np.array_equal(a["input"], b["input"].astype(np.float64)), "inputs differ"
            arrays = {"input": b["input"].astype(np.float32)}
            for k in SAVED:
                arrays[f"{k}_64"] = a[k].astype(np.float64)
                arrays[f"{k}_32"] = b[k].astype(np.float32)
            peer_meta = json.loads(str(b["meta_json"]))
            meta = {"toolbox": toolbox, "output_stride": os_, "size": list(size), "seed": seed, "narrow": NARROW}
            meta["harness_meta"] = {k: peer_meta.get(k) for k in ("config", "versions", "num_classes", "perturb")}
            arrays["meta_json"] = np.array(json.dumps(meta))
            np.savez_compressed(out_dir / f"{name}.npz", **arrays)
            pth = out_dir / f"{name}.pth"
            if (toolbox, os_) == ("mmseg", 8):
                py = str(VENVS["mmseg"] / "bin/python")
                run([py, __file__, "peer-mmengine", str(f32.with_suffix(".pth")), str(pth)])
            else:
                shutil.copyfile(f32.with_suffix(".pth"), pth)
            if (toolbox, os_) == ("mmseg", 16):
                describe_d16(pth)
            n = sum(t.numel() for t in _tensors(pth))
            print(f"{name}: {pth.stat().st_size / 1e3:.0f} kB checkpoint ({n:,} numbers), "
                  f"{(out_dir / f'{name}.npz').stat().st_size / 1e3:.0f} kB arrays")  # fmt: skip


def make_tta(peers: Path, out_dir: Path) -> None:
    """ssseg_d8_tta.npz: sssegmentation's test with TTA_SCALES and flip on the ssseg_d8 fixture's model and input
    (auginference, then test.py's resize of every view to the original size and mean of the logits), float64."""
    import numpy as np
    import torch

    toolbox, os_, size, seed = CASES[0]
    with tempfile.TemporaryDirectory(prefix="danet-fixtures-") as tmp:
        f64 = Path(tmp) / "tta_64.npz"
        scales = ",".join(map(str, TTA_SCALES))
        run(harness_cmd(toolbox, peers, os_, size, seed, f64, double=True), env={"DANET_FIXTURE_TTA": scales})
        a = np.load(f64)
        same = np.load(out_dir / "ssseg_d8.npz")
        assert np.array_equal(a["input"].astype(np.float32), same["input"]), "not the ssseg_d8 fixture's input"
        new, old = (
            torch.load(f, weights_only=True)["model"] for f in (f64.with_suffix(".pth"), out_dir / "ssseg_d8.pth")
        )
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new), "not ssseg_d8.pth's weights"
        peer = json.loads(str(a["meta_json"]))
        meta = {"toolbox": toolbox, "output_stride": os_, "size": list(size), "seed": seed, "scales": TTA_SCALES,
                "flip": True, "merge": "the mean of the views' logits resized to the original size",
                "harness_meta": {k: peer.get(k) for k in ("config", "versions", "inference")}}  # fmt: skip
        arrays = {"logits_64": a["logits"].astype(np.float64), "meta_json": np.array(json.dumps(meta))}
        np.savez_compressed(out_dir / "ssseg_d8_tta.npz", **arrays)
        print(f"ssseg_d8_tta: {(out_dir / 'ssseg_d8_tta.npz').stat().st_size / 1e3:.0f} kB")


def make_loss(peers: Path, out_dir: Path) -> None:
    """ssseg_d8_loss.npz: sssegmentation's own training losses (DANet.forward in TRAIN mode, its calculatelosses; nn
    eval mode: no dropout, running statistics) of the ssseg_d8 fixture's model on a batch of 2 with ignored pixels,
    float32; the weights are checked to be ssseg_d8.pth's."""
    import numpy as np
    import torch

    toolbox, os_, size, seed = CASES[0]
    py = str(VENVS["ssseg"] / "bin/python")
    with tempfile.TemporaryDirectory(prefix="danet-fixtures-") as tmp:
        out, pth = Path(tmp) / "loss.npz", Path(tmp) / "loss.pth"
        common = ["--config", f"danet_resnet50os{os_}_ade20k", "--seed", str(seed), "--perturb"]
        size_args = ["--size", str(size[0]), str(size[1])]
        run([py, __file__, "peer-ssseg", str(peers), "loss", *common, *size_args, "--batch", "2", "--out", str(out)])
        run([py, __file__, "peer-ssseg", str(peers), "ckpt", *common, *size_args, "--out", str(pth)])
        new, old = (torch.load(f, weights_only=True)["model"] for f in (pth, out_dir / "ssseg_d8.pth"))
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new), "not ssseg_d8.pth's weights"
        a = np.load(out)
        peer = json.loads(str(a["meta_json"]))
        meta = {"toolbox": toolbox, "output_stride": os_, "size": list(size), "seed": seed,
                "losses": peer["losses"]["eval"], "config": peer["config"]}  # fmt: skip
        arrays = {"input": a["input"], "labels": a["labels"], "meta_json": np.array(json.dumps(meta))}
        np.savez_compressed(out_dir / "ssseg_d8_loss.npz", **arrays)
        print(f"ssseg_d8_loss: {meta['losses']}")


def make_mmseg_tta(peers: Path, out_dir: Path) -> None:
    """mmseg_d8_tta.{png,npz}: a smooth random RGB image (PNG, lossless) and mmseg's own multi-scale + flip test of
    the mmseg_d8 fixture's model on it (`peer_mmseg_tta`), float64: 1.x's views (`probs_64`, `labels`) and 0.x's at
    the test scale MMSEG_TTA_BASE (`base_probs_64`, `base_labels`)."""
    import cv2
    import numpy as np

    h, w = MMSEG_TTA_SIZE
    rng = np.random.default_rng(MMSEG_TTA_SEED)
    coarse = rng.uniform(0, 255, (5, 7, 3)).astype(np.float32)
    image = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, (h, w, 3))
    png = out_dir / "mmseg_d8_tta.png"
    cv2.imwrite(str(png), np.clip(image, 0, 255).round().astype(np.uint8))  # BGR on disk, as any PNG
    meta = {"toolbox": "mmseg", "output_stride": 8, "size": [h, w], "seed": MMSEG_TTA_SEED,
            "merge": "SegTTAModel.merge_preds: the mean of the views' softmax at the original size",
            "base": list(MMSEG_TTA_BASE)}  # fmt: skip
    arrays = {}
    with tempfile.TemporaryDirectory(prefix="danet-fixtures-") as tmp:
        py = str(VENVS["mmseg"] / "bin/python")
        for prefix, base in (("", ""), ("base_", ",".join(map(str, MMSEG_TTA_BASE)))):
            raw = Path(tmp) / f"{prefix}tta.npz"
            run([py, __file__, "peer-mmseg-tta", str(peers), str(out_dir / "mmseg_d8.pth"), str(png), str(raw), base])
            a = np.load(raw)
            meta[f"{prefix}peer"] = json.loads(str(a["meta_json"]))
            arrays.update({f"{prefix}probs_64": a["probs_64"], f"{prefix}labels": a["labels"]})
    np.savez_compressed(out_dir / "mmseg_d8_tta.npz", **arrays, meta_json=np.array(json.dumps(meta)))
    for prefix in ("", "base_"):
        print(f"mmseg_d8_tta {prefix}views: {[v['img_shape'] for v in meta[f'{prefix}peer']['views']]}")
    print(f"mmseg_d8_tta: {(out_dir / 'mmseg_d8_tta.npz').stat().st_size / 1e3:.0f} kB")


def describe_d16(pth: Path) -> None:
    """Make the config text of the harness's `--d16` file say output stride 16, as mmseg's own d16 configs do.

    NOTE: the harness applies --d16 to the built model, not to the config text it saves, which still reads the d8
    config's strides (1, 2, 1, 1) and dilations (1, 1, 2, 4); a real mmseg file's text is the config it trained."""
    import re

    import torch

    ck = torch.load(pth, weights_only=True)
    text = ck["meta"]["config_text"]
    text, n1 = re.subn(r"strides=\(\s*1,\s*2,\s*1,\s*1,?\s*\)", "strides=(1, 2, 2, 1)", text)
    text, n2 = re.subn(r"dilations=\(\s*1,\s*1,\s*2,\s*4,?\s*\)", "dilations=(1, 1, 1, 2)", text)
    assert (n1, n2) == (1, 1), f"{pth}: expected the d8 backbone's strides and dilations once each, got {n1}, {n2}"
    ck["meta"]["config_text"] = text
    torch.save(ck, pth)


def make_corners(peers: Path, out_dir: Path) -> None:
    """mmseg_769.{pth,npz}: a narrow model of mmseg's Cityscapes 769x769 config (align_corners=True), its float64
    logits at an input smaller than the 769 window (its slide test is then one window: the whole image)."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="danet-fixtures-") as tmp:
        f64 = Path(tmp) / "corners_64.npz"
        run(harness_cmd("mmseg", peers, 8, CORNERS_SIZE, CORNERS_SEED, f64, double=True, config=CORNERS_CONFIG))
        a = np.load(f64)
        peer = json.loads(str(a["meta_json"]))
        assert peer["align_corners"] is True, f"{CORNERS_CONFIG} does not use align_corners=True"
        harness = {k: peer.get(k) for k in ("config", "versions", "test_cfg")}
        meta = {"toolbox": "mmseg", "output_stride": 8, "size": list(CORNERS_SIZE), "seed": CORNERS_SEED,
                "narrow": NARROW, "harness_meta": harness}  # fmt: skip
        arrays = {"input_64": a["input"], "logits_64": a["logits"], "meta_json": np.array(json.dumps(meta))}
        np.savez_compressed(out_dir / "mmseg_769.npz", **arrays)
        shutil.copyfile(f64.with_suffix(".pth"), out_dir / "mmseg_769.pth")
        print(f"mmseg_769: {(out_dir / 'mmseg_769.pth').stat().st_size / 1e3:.0f} kB checkpoint")


def _tensors(path: Path):
    sys.path.insert(0, str(ROOT / "src"))
    from danet.checkpoints import read_checkpoint

    return read_checkpoint(path).state_dict.values()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peer-ssseg"]:
        peer_ssseg(argv[1], argv[2:])
        return 0
    if argv[:1] == ["peer-mmseg-tta"]:
        peer_mmseg_tta(*argv[1:6])
        return 0
    if argv[:1] == ["peer-mmengine"]:
        peer_mmengine(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=Path, default=Path(os.environ.get("DANET_PEERS_DIR", "/work/shared/peers")))
    p.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/models")
    p.add_argument("--tta-only", action="store_true", help="only ssseg_d8_tta.npz (beside an existing ssseg_d8)")
    p.add_argument("--corners-only", action="store_true", help="only mmseg_769.{pth,npz} (align_corners=True)")
    p.add_argument("--loss-only", action="store_true", help="only ssseg_d8_loss.npz (beside an existing ssseg_d8)")
    p.add_argument("--mmseg-tta-only", action="store_true", help="only mmseg_d8_tta.{png,npz} (beside mmseg_d8)")
    args = p.parse_args(argv)
    for tb, venv in VENVS.items():
        if not (venv / "bin/python").exists():
            raise SystemExit(f"{tb} venv not found at {venv}: run {args.peers}/setup_{tb}_env.sh")
    if args.corners_only:
        make_corners(args.peers, args.out)
        return 0
    if args.loss_only:
        make_loss(args.peers, args.out)
        return 0
    if args.mmseg_tta_only:
        make_mmseg_tta(args.peers, args.out)
        return 0
    if not args.tta_only:
        make(args.peers, args.out)
        make_corners(args.peers, args.out)
        make_loss(args.peers, args.out)
    make_tta(args.peers, args.out)
    make_mmseg_tta(args.peers, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
