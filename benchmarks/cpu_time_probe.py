#!/usr/bin/env python
"""Processor time (not wall time) of one inference and one train step, for any of the three toolboxes.

Run by benchmarks/cpu_side_by_side.py --cpu-time under the toolbox's own Python. The peers' models, inputs, optimiser
and steps are built with their harness's functions (../shared/peers/{mmseg,ssseg}_danet.py), the same calls their
`bench` subcommand times; this project's with danet.benchmark. It reports, per step, `time.process_time()` (the CPU
seconds all the process's threads spent) besides wall time: on a machine shared with other users, wall time also
counts the time the process waited for a core, CPU time mostly does not (with 1 thread, none of it).

    PY mmseg|ssseg|ours [--size H W] [--batch B] [--iters N] [--warmup N] [--threads T] [-- danet benchmark options]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("DANET_PEERS_DIR", ROOT.parent / "shared" / "peers"))


def measure(fn, warmup: int, iters: int) -> dict:
    for _ in range(warmup):
        fn()
    cpu, wall = [], []
    for _ in range(iters):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return {"cpu_s": statistics.median(cpu), "cpu_min_s": min(cpu), "wall_s": statistics.median(wall)}


def mmseg_steps(a):
    sys.path.insert(0, str(PEERS))
    import mmseg_danet as H

    torch = H.import_stack(a.threads)
    from mmengine.optim import OptimWrapper

    h, w = a.size
    args = SimpleNamespace(config="danet_r50-d8_4xb4-160k_ade20k-512x512", d16=False, perturb=False, size=a.size,
                           cfg_options=[f"data_preprocessor.size=({h}, {w})"])  # fmt: skip
    _, _, _, model = H.build_model(args, 0)
    raw = H.make_raw_images(0, a.batch, h, w)
    labels = H.make_labels(0, a.batch, h, w, model.decode_head.num_classes)
    model.eval()
    x = H.preprocess(model, raw, training=False)[1]["inputs"]
    metas = H.metas_for(a.batch, h, w)

    def infer():
        with torch.no_grad():
            model.encode_decode(x, metas)

    data = H.preprocess(model, raw, labels, training=True)[0]
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005))

    def train():
        model.train_step(data, wrapper)

    return model, infer, train


def ssseg_steps(a):
    sys.path.insert(0, str(PEERS))
    import ssseg_danet as S

    torch = S.import_stack(a.threads)
    from ssseg.modules import SSSegInputStructure

    args = SimpleNamespace(config="danet_resnet50os8_ade20k", perturb=False, size=a.size, seed=0)
    cfg, _, model = S.build_model(args, 0, mode="TRAIN")
    _, _, x, lab = S.make_batch(args, cfg, a.batch)

    def infer():
        with torch.no_grad():
            S.infer_logits(model, x, tuple(a.size))

    optimizer, scheduler = S.build_optim_sched(model, cfg)

    def train():
        scheduler.updatelr()
        optimizer.zero_grad()
        model(SSSegInputStructure(mode="TRAIN", images=x, seg_targets=lab)).loss.backward()
        scheduler.step()

    return model, infer, train


def ours_steps(a):
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from danet.benchmark import BenchSpec, build, make_infer_fn, make_train_fn
    from danet.benchmark.cli import add_cli

    p = argparse.ArgumentParser()
    add_cli(p)
    o = p.parse_args(["danet_r50-d8_ade20k", *a.options])
    overrides = dict(kv.split("=", 1) for kv in o.overrides)
    overrides = {k: json.loads(v) for k, v in overrides.items()}
    torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    common = dict(batch=a.batch, size=tuple(a.size), amp=o.amp, channels_last=o.channels_last, attention=o.attention,
                  conv=o.conv, loss=o.loss, overrides=overrides)  # fmt: skip
    specs = [BenchSpec(mode=m, **common) for m in ("infer", "train")]
    model, x, y = build(specs[0], dev)
    infer_fn = make_infer_fn(specs[0], model, x, dev)
    train_fn = make_train_fn(specs[1], model, x, y, dev)[0]
    return model, infer_fn, train_fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tool", choices=["mmseg", "ssseg", "ours"])
    p.add_argument("--size", type=int, nargs=2, default=[256, 256])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("options", nargs=argparse.REMAINDER, help="after --: danet benchmark options (ours)")
    a = p.parse_args(argv)
    a.options = [o for o in a.options if o != "--"]
    model, infer, train = {"mmseg": mmseg_steps, "ssseg": ssseg_steps, "ours": ours_steps}[a.tool](a)
    model.eval()
    res = {"infer": measure(infer, a.warmup, a.iters)}
    model.train()
    res["train"] = measure(train, a.warmup, a.iters)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
