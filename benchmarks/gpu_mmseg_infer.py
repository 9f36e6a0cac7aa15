"""mmsegmentation's inference anchors alone (`gpu_bench.sh` with ANCHORS=infer): 512x512 batch 1 (ADE20K) and a
whole 1024x2048 image (Cityscapes), fp32 and AMP fp16, through the peers' own harness (`.whl/peer_scripts/
gpu_anchor_mmseg.py`: its model builder, timer and log), with cuDNN benchmark on as mmseg's runtime sets it. Writes
OUT/anchor_gpu.json in that harness's format, so `summarize_gpu.py` puts its figures beside this project's in the
same call. ~30 s on an H200, where the harness's full run (training cases first) takes ~150 s.

    python benchmarks/gpu_mmseg_infer.py --out $OUT [--quick]     (--quick: tiny sizes, the CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent / ".whl" / "peer_scripts"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--quick", action="store_true", help="tiny sizes, fp32 only (a CPU check of this script)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(HARNESS))
    import gpu_anchor_mmseg as mm  # the peers' harness (benchmarks/gpu_prepare.sh copies it)
    import torch

    torch.backends.cudnn.benchmark = True
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mm.log("env", torch=torch.__version__, device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           cudnn_benchmark=True, cudnn_tf32=torch.backends.cudnn.allow_tf32)  # fmt: skip
    modes = ("fp32",) if a.quick else ("fp32", "fp16")
    warm, iters = (0, 1) if a.quick else (3, 10)
    cases = [("danet_r50-d8_4xb4-160k_ade20k-512x512", (64, 64) if a.quick else (512, 512)),
             ("danet_r50-d8_4xb2-40k_cityscapes-512x1024", (64, 128) if a.quick else (1024, 2048))]  # fmt: skip
    for config, (h, w) in cases:
        model = mm.build_mmseg(config, dev)
        mm.count_flops(model, dev, h, w)
        for mode in modes:
            mm.bench_infer(model, dev, 1, h, w, mode, warm, iters)
        del model
        mm.peak_reset()
    (Path(a.out) / "anchor_gpu.json").write_text(json.dumps(mm.RESULTS, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
