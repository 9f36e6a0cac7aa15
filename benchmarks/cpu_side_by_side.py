#!/usr/bin/env python
"""CPU side by side: this project's DANet R50-D8 vs mmsegmentation 1.2.2 and sssegmentation 1.7.0, in one run.

Each contender runs in its own process (inference, then one train step, `--warmup` + `--iters` each, median), the
peers through their harness's `bench` subcommand (../shared/peers/{mmseg,ssseg}_danet.py in their venvs), this
project through `danet benchmark`. A round runs every contender once, in an order rotated from round to round, so
load from other users of the machine falls on all of them alike; ratios are taken within a round (peer time / our
time) and the table shows the median over rounds.

Contenders of this project: "ours" = the ssseg layout (the presets) with the CPU speed options, "ours_mm" = the
mmseg layout (PAM projection bias, 256-wide auxiliary head) with the same options, "ours_direct" = "ours" without
the Winograd convolutions (the library's direct kernels, what the toolboxes run), "ours_plain" = the ssseg layout
without options (the baseline the options are measured against), "ours_bf16" = "ours" under bf16 autocast with
channels_last (results differ by bf16 rounding, unlike the others).

    .venv/bin/python benchmarks/cpu_side_by_side.py --rounds 3 --json benchmarks/cpu_side_by_side.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("DANET_PEERS_DIR", ROOT.parent / "shared" / "peers"))
PEERS_HOME = Path(os.environ.get("DANET_PEERS_HOME", Path.home() / ".cache" / "danet-peers"))
# the CPU speed options of this project that keep the result (see benchmarks/RESULTS.md for what each gives)
OUR_OPTIONS = "--attention explicit --loss fused --conv winograd --channels-last"
DIRECT_OPTIONS = "--attention explicit --loss fused"  # the same without Winograd (the library's direct convolutions)
MM_LAYOUT = "--set pam_bias=true --set aux_channels=256"
BF16 = "--amp bf16 --channels-last"  # NOT the same result: bf16 rounding (AVX512-BF16 doubles the conv rate)


def peer_cmd(tool: str, a) -> list[str]:
    py = Path(os.environ.get(f"{tool.upper()}_VENV", PEERS_HOME / f"{tool}-venv")) / "bin" / "python"
    return [str(py), str(PEERS / f"{tool}_danet.py"), "bench", "--size", *map(str, a.size), "--batch", str(a.batch),
            "--iters", str(a.iters), "--warmup", str(a.warmup), "--threads", str(a.threads)]  # fmt: skip


def ours_cmd(options: str, a, json_path: str) -> list[str]:
    return [sys.executable, "-m", "danet.cli", "benchmark", a.preset, "--size", *map(str, a.size),
            "--batch", str(a.batch), "--iters", str(a.iters), "--warmup", str(a.warmup), "--threads", str(a.threads),
            "--no-flops", "--json", json_path, *shlex.split(options)]  # fmt: skip


def run_peer(tool: str, a) -> dict:
    out = subprocess.run(peer_cmd(tool, a), capture_output=True, text=True, cwd=PEERS)
    text = out.stdout + out.stderr
    inf = re.search(r"inference: median ([\d.]+) s/iter.*\(all: ([\d., ]+)\)", text)
    trn = re.search(r"train step: median ([\d.]+) s/iter.*\(all: ([\d., ]+)\)", text)
    if out.returncode or not (inf and trn):
        raise RuntimeError(f"{tool} bench failed (exit {out.returncode}):\n{text[-2000:]}")
    mins = [min(float(t) for t in m.group(2).split(",")) for m in (inf, trn)]
    return {
        "infer_s": float(inf.group(1)),
        "train_s": float(trn.group(1)),
        "infer_min_s": mins[0],
        "train_min_s": mins[1],
    }


def run_probe(tool: str, options: str, a) -> dict:
    """--cpu-time: benchmarks/cpu_time_probe.py under the toolbox's Python; CPU seconds instead of wall seconds."""
    py = sys.executable if tool == "ours" else peer_cmd(tool, a)[0]
    cmd = [py, str(ROOT / "benchmarks" / "cpu_time_probe.py"), tool, "--size", *map(str, a.size), "--batch",
           str(a.batch), "--iters", str(a.iters), "--warmup", str(a.warmup), "--threads", str(a.threads), "--",
           *shlex.split(options)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=PEERS)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"probe {tool} failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-2000:]}")
    r = json.loads(line[-1][7:])
    return {"infer_s": r["infer"]["cpu_s"], "train_s": r["train"]["cpu_s"], "infer_min_s": r["infer"]["cpu_min_s"],
            "train_min_s": r["train"]["cpu_min_s"], "infer_wall_s": r["infer"]["wall_s"],
            "train_wall_s": r["train"]["wall_s"]}  # fmt: skip


def run_ours(options: str, a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.json")
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        out = subprocess.run(ours_cmd(options, a, path), capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(f"danet benchmark failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-2000:]}")
        recs = {r["mode"]: r for r in json.load(open(path))}
    i, t = recs["infer"], recs["train"]
    return {
        "infer_s": i["ms"] / 1e3,
        "train_s": t["ms"] / 1e3,
        "infer_min_s": i["ms_min"] / 1e3,
        "train_min_s": t["ms_min"] / 1e3,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="danet_r50-d8_ade20k")
    p.add_argument("--options", default=OUR_OPTIONS, help=f"danet benchmark options of 'ours' (default: {OUR_OPTIONS})")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="contenders to run (mmseg ssseg ours ours_mm ours_direct ours_plain ours_bf16)",
    )
    p.add_argument("--cpu-time", action="store_true",
                   help="time processor seconds with benchmarks/cpu_time_probe.py instead of the bench subcommands' "
                   "wall seconds (steadier when other users load the machine)")  # fmt: skip
    p.add_argument("--json", help="write every run and the summary here")
    a = p.parse_args(argv)

    peer = (lambda t: run_probe(t, "", a)) if a.cpu_time else (lambda t: run_peer(t, a))
    ours = (lambda o: run_probe("ours", o, a)) if a.cpu_time else (lambda o: run_ours(o, a))
    contenders = {
        "mmseg": lambda: peer("mmseg"),
        "ssseg": lambda: peer("ssseg"),
        "ours": lambda: ours(a.options),
        "ours_mm": lambda: ours(f"{a.options} {MM_LAYOUT}"),
        "ours_direct": lambda: ours(DIRECT_OPTIONS),
        "ours_plain": lambda: ours(""),
        "ours_bf16": lambda: ours(f"{a.options} {BF16}"),
    }
    names = a.only or list(contenders)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    t0 = time.time()
    for r in range(a.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            res = contenders[n]()
            res["round"] = r
            runs[n].append(res)
            print(f"round {r}: {n:10s} infer {res['infer_s']:.3f} s  train {res['train_s']:.3f} s", flush=True)
    unit = "CPU seconds (all threads)" if a.cpu_time else "wall seconds"
    print(f"({time.time() - t0:.0f} s; {unit}; size {a.size[0]}x{a.size[1]} batch {a.batch}, {a.threads} threads, "
          f"median of {a.iters} after {a.warmup} warm-up per run, {a.rounds} rounds)")  # fmt: skip

    # medians over rounds of each run's median (and of each run's fastest iteration: on a shared machine other
    # users only ever slow a run down, so the minimum is the steadier estimate of what the code costs)
    keys = ("infer_s", "train_s", "infer_min_s", "train_min_s")
    summary = {}
    for n in names:
        summary[n] = {k: statistics.median(x[k] for x in runs[n]) for k in keys}
        for peer in ("mmseg", "ssseg"):
            if peer in runs and n.startswith("ours"):
                for k in keys:  # per-round ratio peer / ours, then the median over rounds
                    ratios = [p_[k] / o[k] for p_, o in zip(runs[peer], runs[n], strict=True)]
                    summary[n][f"{k[:-2]}_x_{peer}"] = statistics.median(ratios)
    for stat, suffix in (("median of each run", ""), ("fastest iteration of each run", "_min")):
        head = "| contender | infer s/batch | train s/batch | infer x mmseg | x ssseg | train x mmseg | x ssseg |"
        print(f"\n{stat}, median over rounds:\n" + head + "\n|" + "---|" * 7)
        for n in names:
            s = summary[n]
            cells = [f"{s.get(f'{m}{suffix}_x_{p_}', float('nan')):.2f}x" if n.startswith("ours") else "-"
                     for m in ("infer", "train") for p_ in ("mmseg", "ssseg")]  # fmt: skip
            print(f"| {n} | {s[f'infer{suffix}_s']:.3f} | {s[f'train{suffix}_s']:.3f} | " + " | ".join(cells) + " |")
    if a.json:
        meta = {"size": a.size, "batch": a.batch, "threads": a.threads, "iters": a.iters, "warmup": a.warmup,
                "rounds": a.rounds, "options": a.options, "cpu_time": a.cpu_time,
                "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
        with open(a.json + ".tmp", "w") as f:
            json.dump({"meta": meta, "runs": runs, "summary": summary}, f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
