#!/usr/bin/env python
"""Peak CPU memory of whole-image inference, this project vs mmsegmentation, side by side.

    .venv/bin/python benchmarks/memory_whole_image.py                      # R50-D8, 1024x2048, batch 1
    .venv/bin/python benchmarks/memory_whole_image.py --size 512 1024 --threads 2
    .venv/bin/python benchmarks/memory_whole_image.py --only ours --conv winograd   # the Winograd convolutions' cost

Each measurement runs in a fresh subprocess: build the model (random weights, eval), make the input, then reset the
process's RSS high-water mark (`/proc/self/clear_refs` = 5) and run one no-grad forward of the test path with the
logits resized to the full input size (ours: `model(x)["out"]`; mmseg: `EncoderDecoder.encode_decode`, what its
'whole' inference runs). Reported: the forward's working memory = VmHWM during the forward - VmRSS before it (the
weights and the input are in both baselines), and the absolute peak. mmseg runs in its harness venv
(/work/shared/peers, `$MMSEG_VENV`), through the harness's own model builder (SyncBN -> BN, no pretrained weights).
Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEERS_HOME = Path(os.environ.get("DANET_PEERS_HOME", Path.home() / ".cache/danet-peers"))
MMSEG_PY = Path(os.environ.get("MMSEG_VENV", PEERS_HOME / "mmseg-venv")) / "bin/python"
ROOT = Path(__file__).resolve().parents[1]


def status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(forward) -> dict:
    """Run forward() once under no_grad; memory in MiB."""
    import gc

    import torch

    gc.collect()
    try:  # hand freed heap pages back to the OS, so the baseline holds no reusable slack (glibc)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    reset = reset_peak()
    before = status_kb()["VmRSS"]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = forward()
    seconds = time.perf_counter() - t0
    peak = status_kb()["VmHWM"]
    return {"peak_mib": peak / 1024, "baseline_mib": before / 1024, "forward_mib": (peak - before) / 1024,
            "hwm_reset": reset, "seconds": round(seconds, 1), "out_shape": list(out.shape)}  # fmt: skip


def worker_ours(args) -> dict:
    import torch

    import danet
    import danet.models.winograd

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = danet.create_model(args.preset).eval()
    danet.models.winograd.set_inference_conv(model, args.conv)  # as danet test / predict
    x = torch.randn(1, 3, *args.size)
    return measure(lambda: model(x)["out"])


def worker_mmseg(args) -> dict:
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(args.peers))
    import mmseg_danet as H  # the peer harness (mmseg venv only)

    torch = H.import_stack(args.threads)
    ns = argparse.Namespace(config=args.mmseg_config, d16=False, cfg_options=None, perturb=False, size=args.size)
    _, _, _, model = H.build_model(ns, 0)
    model.eval()
    x = torch.randn(1, 3, *args.size)
    metas = H.metas_for(1, *args.size)
    return measure(lambda: model.encode_decode(x, metas))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="danet_r50-d8_cityscapes")
    p.add_argument("--mmseg-config", default="danet_r50-d8_4xb2-80k_cityscapes-512x1024")
    p.add_argument("--peers", type=Path, default=Path(os.environ.get("DANET_PEERS_DIR", "/work/shared/peers")))
    p.add_argument("--conv", choices=["direct", "winograd"], default="direct", help="ours: 3x3 convolution algorithm")
    p.add_argument("--only", choices=["ours", "mmseg"], default=None, help="measure one side only")
    p.add_argument("--worker", choices=["ours", "mmseg"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = (worker_ours if args.worker == "ours" else worker_mmseg)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    results = {}
    for side in [args.only] if args.only else ["ours", "mmseg"]:
        py = sys.executable if side == "ours" else str(MMSEG_PY)
        cmd = [py, __file__, "--worker", side, "--size", *map(str, args.size), "--threads", str(args.threads),
               "--preset", args.preset, "--mmseg-config", args.mmseg_config, "--peers", str(args.peers),
               "--conv", args.conv]  # fmt: skip
        print(f"[{side}] {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
            raise SystemExit(f"{side} worker failed (exit {proc.returncode})")
        results[side] = json.loads(line[len("RESULT ") :])
        r = results[side]
        print(f"[{side}] forward {r['forward_mib']:,.0f} MiB over a {r['baseline_mib']:,.0f} MiB baseline "
              f"(peak RSS {r['peak_mib']:,.0f} MiB), {r['seconds']} s, out {r['out_shape']}", flush=True)  # fmt: skip
    h, w = args.size
    print(f"\nwhole-image inference, batch 1, {h}x{w}, eval, no_grad, random weights, {args.threads} threads")
    print("| | forward working memory (MiB) | peak RSS (MiB) | time (s) |\n|---|---|---|---|")
    for side, r in results.items():
        ours = f"danet ({args.preset}, fused PAM, {args.conv} conv)"
        name = ours if side == "ours" else f"mmseg 1.2.2 ({args.mmseg_config})"
        print(f"| {name} | {r['forward_mib']:,.0f} | {r['peak_mib']:,.0f} | {r['seconds']} |")
    if len(results) == 2:
        ratio = results["ours"]["forward_mib"] / results["mmseg"]["forward_mib"]
        ratio_peak = results["ours"]["peak_mib"] / results["mmseg"]["peak_mib"]
        print(f"ours / mmseg: forward working memory {ratio:.1%}, peak RSS {ratio_peak:.1%} (target <= 35%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
