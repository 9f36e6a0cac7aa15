#!/usr/bin/env python
"""Full-size numerical equivalence with sssegmentation and mmsegmentation (issue 2 "Done when"; not a unit test).

    .venv/bin/python tools/check_equivalence.py                      # R-50-D8 + R-101-D16 ADE20K, both toolboxes
    .venv/bin/python tools/check_equivalence.py --presets danet_r50-d8_ade20k --sizes 512x512 --toolboxes ssseg

For each preset x toolbox x input size the peer harness (/work/shared/peers, README there) builds the toolbox's
DANet with seeded random weights (`--perturb`: random BN parameters/statistics, non-zero PAM/CAM gamma), writes its
checkpoint, and dumps its test-path logits twice: float64 (`dump --double`) and float32. Then
`danet.create_model(preset, checkpoint=<toolbox .pth>)` reproduces them:
    f64      ours float64 vs toolbox float64 (exactness of the port: expect ~1e-15)
    f32      ours float32 with fused attention vs toolbox float64
    f32-tb   ours float32 fused vs toolbox float32
    tb32     toolbox float32 vs toolbox float64 (the yardstick: the toolbox's own float32 error)
Errors are relative L2: ||a - b|| / ||b||. Temporary files go under --tmp (default: a new folder in /tmp), removed
unless --keep. Takes a while on 2 cores (R-50-D8 at 512x512 float64 is the slow one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import danet

PEERS_HOME = Path(os.environ.get("DANET_PEERS_HOME", Path.home() / ".cache/danet-peers"))
VENVS = {
    "ssseg": Path(os.environ.get("SSSEG_VENV", PEERS_HOME / "ssseg-venv")),
    "mmseg": Path(os.environ.get("MMSEG_VENV", PEERS_HOME / "mmseg-venv")),
}
MMSEG_CONFIGS = {  # dataset -> the mmseg DANet config suffix (mmseg ships d8 only; --d16 switches the stride)
    "ade20k": "4xb4-160k_ade20k-512x512",
    "cityscapes": "4xb2-80k_cityscapes-512x1024",
    "voc12aug": "4xb4-40k_voc12aug-512x512",
}


def harness(toolbox: str, peers: Path, preset, size, seed: int, threads: int, out: Path, double: bool) -> list[str]:
    cmd = [str(VENVS[toolbox] / "bin/python"), str(peers / f"{toolbox}_danet.py"), "dump"]
    if toolbox == "ssseg":
        cmd += ["--config", preset.alias]
    else:
        cmd += ["--config", f"danet_r{preset.model.depth}-d8_{MMSEG_CONFIGS[preset.dataset.name]}"]
        cmd += ["--d16"] if preset.model.output_stride == 16 else []
    cmd += ["--seed", str(seed), "--size", str(size[0]), str(size[1]), "--threads", str(threads), "--perturb"]
    return cmd + ["--no-feats", "--out", str(out)] + (["--double"] if double else [])


def rel(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def check(toolbox: str, peers: Path, name: str, size, args, tmp: Path) -> dict:
    preset = danet.get_preset(name)
    stem = tmp / f"{toolbox}_{name}_{size[0]}x{size[1]}"
    f64, f32 = stem.with_name(stem.name + "_64.npz"), stem.with_name(stem.name + "_32.npz")
    t0 = time.perf_counter()
    for out, double in ((f64, True), (f32, False)):
        cmd = harness(toolbox, peers, preset, size, args.seed, args.threads, out, double)
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if not args.verbose else None)
    t_peer = time.perf_counter() - t0
    a, b = np.load(f64), np.load(f32)
    ref64, ref32, x = a["logits"], b["logits"], torch.from_numpy(b["input"])
    t0 = time.perf_counter()
    model = danet.create_model(name, checkpoint=f32.with_suffix(".pth"))  # fused attention (the default)
    with torch.no_grad():
        ours64 = model.double()(x.double())["out"]
        ours32 = model.float()(x)["out"]
    row = {
        "toolbox": toolbox,
        "preset": name,
        "size": f"{size[0]}x{size[1]}",
        "layout": model.cfg.layout,
        "f64": rel(ours64, ref64),
        "f32": rel(ours32, ref64),
        "f32_tb": rel(ours32, ref32),
        "tb32": rel(ref32, ref64),
        "argmax_agree_f32": float((ours32.argmax(1).numpy() == ref64.argmax(1)).mean()),
        "peer_s": round(t_peer, 1),
        "ours_s": round(time.perf_counter() - t0, 1),
    }
    if not args.keep:
        for p in (f64, f32, f64.with_suffix(".pth"), f32.with_suffix(".pth")):
            p.unlink(missing_ok=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["danet_r50-d8_ade20k", "danet_r101-d16_ade20k"])
    p.add_argument("--toolboxes", nargs="+", default=["ssseg", "mmseg"], choices=["ssseg", "mmseg"])
    p.add_argument("--sizes", nargs="+", default=["512x512", "333x517"], help="HxW")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peers", type=Path, default=Path(os.environ.get("DANET_PEERS_DIR", "/work/shared/peers")))
    p.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: a new one under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the dumps and checkpoints")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="show the harness output")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="danet-equiv-", dir="/tmp"))
    tmp.mkdir(parents=True, exist_ok=True)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    rows = []
    header = "| toolbox | preset | input | layout | f64 | f32 (fused) vs tb f64 | f32 vs tb f32 | tb f32 vs tb f64 |"
    try:
        for name in args.presets:
            for tb in args.toolboxes:
                for size in sizes:
                    r = check(tb, args.peers, name, size, args, tmp)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    finally:
        if args.tmp is None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        print(f"| {r['toolbox']} | {r['preset']} | {r['size']} | {r['layout']} | {r['f64']:.2e} | {r['f32']:.2e} "
              f"| {r['f32_tb']:.2e} | {r['tb32']:.2e} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    worst64 = max(r["f64"] for r in rows)
    worst32 = max(r["f32"] for r in rows)
    ok = worst64 < 1e-9 and worst32 < 2e-3
    print(f"worst float64 {worst64:.2e} (< 1e-9), worst float32 fused {worst32:.2e} (< 2e-3): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
