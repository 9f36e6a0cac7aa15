#!/usr/bin/env python
"""Turn the GPU run's JSON ($OUT of benchmarks/gpu_bench.sh) into the markdown tables of benchmarks/RESULTS.md.

    python benchmarks/summarize_gpu.py OUTDIR [--md summary.md]

Reads OUTDIR/ours.jsonl (benchmarks/gpu_suite.py), OUTDIR/anchor_gpu.json (mmsegmentation) and
OUTDIR/anchor_ssseg.json (sssegmentation). Ratios compare with the peer's case of the same precision
("same") and with the peer's fastest case ("best"); speed ratios > 1 mean this project is faster, memory ratios < 1
mean it needs less. The issue's goals: train >= 3x sssegmentation's best images/s and peak memory <= 0.6x mmseg's;
inference 512x512 >= 3x and whole 1024x2048 >= 2.5x faster at <= 0.25x peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _json_lines(path: Path, prefix: str) -> list[dict]:
    """The JSON objects printed one per line in `path` whose "name" starts with `prefix` (the anchors' stdout)."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith("{") and f'"name": "{prefix}' in line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def load(out: Path, peers: Path | None = None):
    """(our records, mmseg records, ssseg records); a peer's from this run's folder, else from `peers` (an earlier
    run) when given. A peer's JSON file is missing when its anchor ran out of time: its lines are then read back from
    log.txt."""
    ours = [json.loads(x) for x in (out / "ours.jsonl").read_text().splitlines() if x.strip()] if (
        out / "ours.jsonl").exists() else []  # fmt: skip

    def peer(name: str, prefix: str) -> list:  # this run's file first (ANCHORS=infer writes mmseg's), else `peers`
        for src in (out, peers) if peers else (out,):
            if (src / name).exists():
                return json.loads((src / name).read_text())
        return _json_lines((peers or out) / "log.txt", prefix)

    return ours, peer("anchor_gpu.json", "mmseg_"), peer("anchor_ssseg.json", "ssseg_")


def peer_cases(mm: list, ss: list) -> dict:
    """{(toolbox, kind, precision): {"ms": per batch, "img_s", "peak_gib"}} with kind train | infer512 | whole."""
    res = {}
    for r in mm + ss:
        name = r.get("name", "")
        if "error" in r or name not in ("mmseg_train", "mmseg_infer", "ssseg_train", "ssseg_infer"):
            continue
        tool = name.split("_")[0]
        prec = {"bf16_cl": "bf16"}.get(r["mode"], r["mode"])
        if name.endswith("train"):
            kind, ms = "train", 1000 * r["s_per_iter"]
        else:
            kind = "whole" if list(r["size"]) != list(r["size"][:1] * 2) else "infer512"
            ms = r.get("ms_per_img", r.get("ms")) * r.get("batch", 1)
        res[(tool, kind, prec)] = {"ms": ms, "img_s": r.get("img_per_s", r.get("batch", 1) * 1000 / ms),
                                   "peak_gib": r.get("peak_gb")}  # fmt: skip
    return res


def kind_of(r: dict) -> str:
    if r["mode"] == "train":
        return "train"
    if r.get("slide"):
        return "slide"
    return "whole" if r["size"][0] != r["size"][1] else "infer512"


def fmt(x, spec=".2f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def model_table(ours: list, peers: dict, kind: str, rate: float | None) -> list[str]:
    rows = [r for r in ours if r.get("group") in ("train", "infer", "compile") and "ms" in r and kind_of(r) == kind]
    if not rows:
        return []
    same_prec = lambda r: "fp32" if r["amp"] == "none" else r["amp"]  # noqa: E731
    speed = "img/s" if kind == "train" else "ms"
    head = (f"| case | {speed} | host ms | peak GiB | TFLOP/s | % of bf16 matmul | x mmseg same | x mmseg best | "
            "x ssseg same | x ssseg best | mem / mmseg same | mem / ssseg same |")  # fmt: skip
    out = [head, "|" + "---|" * 12]
    for r in rows:
        cells = []
        for tool in ("mmseg", "ssseg"):
            same = peers.get((tool, kind, same_prec(r)))
            best = min((v for (t, k, _), v in peers.items() if t == tool and k == kind), key=lambda v: v["ms"],
                       default=None)  # fmt: skip
            cells += [fmt(ratio(same and same["ms"], r["ms"]), ".2f", "x"), fmt(ratio(best and best["ms"], r["ms"]),
                      ".2f", "x")]  # fmt: skip
        mems = [fmt(ratio(r["peak_gib"], (peers.get((t, kind, same_prec(r))) or {}).get("peak_gib")), ".2f")
                for t in ("mmseg", "ssseg")]  # fmt: skip
        val = r["img_s"] if kind == "train" else r["ms"]
        frac = ratio(r.get("tflop_s"), rate)
        first = [r.get("label") or r["mode"], f"{val:.2f}", fmt(r.get("host_ms"), ".1f"), f"{r['peak_gib']:.2f}",
                 fmt(r.get("tflop_s"), ".1f"), fmt(frac and 100 * frac, ".0f", "%")]  # fmt: skip
        out.append("| " + " | ".join(first + cells + mems) + " |")
    return out


def e2e_table(ours: list) -> list[str]:
    """The real training loop (group e2e) next to the isolated train step of the same settings (group train)."""
    rows = [r for r in ours if r.get("group") == "e2e" and "img_s" in r]
    if not rows:
        return []
    step = {r["label"]: r for r in ours if r.get("group") in ("train", "compile") and "img_s" in r}
    r0 = rows[0]
    h, w = r0["image_hw"]
    out = ["", f"Training loop end to end (`danet train`, in the suite's process: {r0['images']} ADE20K-layout {w}x{h} "
           f"JPEGs, batch {r0['batch']}, loader workers: {r0['num_workers']} ({r0['cpus']} CPUs), bf16, channels_last, "
           f"fused loss; images/s over iterations {r0['warmup'] + 1}-{r0['iters']}) vs the isolated train step of the "
           "same settings (random tensors; loop / step = the loop's efficiency):", "",
           "| loop case | img/s | step case | step img/s | loop / step | ms/iter | step ms | data wait ms/iter | "
           "peak GiB | step peak GiB | warm-up s | run s |", "|" + "---|" * 12]  # fmt: skip
    for r in rows:
        s = step.get(r.get("isolated"), {})
        cells = [r["label"], f"{r['img_s']:.2f}", r.get("isolated", "-"), fmt(s.get("img_s")),
                 fmt(ratio(r["img_s"], s.get("img_s")), ".2f", "x"), f"{r['ms_per_iter']:.1f}", fmt(s.get("ms"), ".1f"),
                 f"{r['data_wait_ms']:.1f}", fmt(r.get("peak_gib")), fmt(s.get("peak_gib")),
                 fmt(r.get("warmup_s"), ".1f"), fmt(r.get("wall_s"), ".1f")]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return out


CONV_WAYS = ("conv", "conv_bn", "conv_bias_act", "cudnn_fused", "gemm_epilogue", "padded8")


def convs_table(ours: list) -> list[str]:
    """Group convs: each distinct convolution of the folded network run each way (ms; a way's error instead), the
    network's totals and the stem's pooling."""
    layers = [r for r in ours if r.get("group") == "convs" and "count" in r]
    if not layers:
        return []
    lines = ["", "The folded network's convolutions on a whole image, each way (ms a call; relative difference of the "
             "fused ways' values from the folded convolution's; the fastest folded way):", "",
             "| input | weight | stride | dilation | residual | layers | " + " | ".join(CONV_WAYS) +
             " | rel fused / gemm / padded | fastest folded |", "|" + "---|" * (8 + len(CONV_WAYS))]  # fmt: skip
    for r in layers:
        ways = [fmt(r.get(f"ms_{w}"), ".4f") if f"ms_{w}" in r else (r.get(f"{w}_error", "-")[:40] or "-")
                for w in CONV_WAYS]  # fmt: skip
        rels = " / ".join(fmt(r.get(f"rel_{w}"), ".1e") for w in ("cudnn_fused", "gemm_epilogue", "padded8"))
        lines.append(f"| {'x'.join(map(str, r['input']))} | {'x'.join(map(str, r['weight']))} | {r['stride']} | "
                     f"{r['dilation']} | {r['residual']} | {r['count']} | " + " | ".join(ways) +
                     f" | {rels} | {r.get('fastest_folded', '-')} |")  # fmt: skip
    for r in (r for r in ours if r.get("group") == "convs" and "total_ms" in r):
        totals = ", ".join(f"{k} {v}" for k, v in r["total_ms"].items())
        lines += ["", f"Totals over the {r['layers']} layers, ms: {totals}; the fastest folded way per layer: "
                  f"{r['total_ms_fastest_folded_per_layer']} (gemm_epilogue's and padded8's totals cover only the "
                  "layers they can run)."]  # fmt: skip
    for r in (r for r in ours if r.get("group") == "convs" and "pool_input" in r):
        lines += ["", f"The stem's max pooling of {'x'.join(map(str, r['pool_input']))}: PyTorch {r['pool_ms_torch']} "
                  f"ms, Triton {r['pool_ms_triton']} ms, same bits: {r['pool_same_bits']}."]  # fmt: skip
    return lines


def summarize(out: Path, peers_dir: Path | None = None) -> str:
    ours, mm, ss = load(out, peers_dir)
    peers = peer_cases(mm, ss)
    env = next((r for r in ours if r.get("group") == "env"), {})
    sys_ = {r["name"]: r for r in ours if r.get("group") == "sys"}
    rate = sys_.get("matmul_bf16", {}).get("tflop_s")
    lines = [f"Device: {env.get('device', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
             f"cuDNN {env.get('cudnn', '?')}. bf16 matmul 8192^3: {fmt(rate, '.0f')} TFLOP/s; device copy "
             f"{fmt(sys_.get('copy', {}).get('tb_s'), '.2f')} TB/s (read + write)."]  # fmt: skip
    where = f"this run's where it ran them, else from {peers_dir}" if peers_dir else "on this card, this run"
    lines += ["", f"Peers ({where}):", "", "| toolbox | case | precision | ms/batch | img/s | peak GiB |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for (tool, kind, prec), v in sorted(peers.items()):
        lines.append(f"| {tool} | {kind} | {prec} | {v['ms']:.1f} | {v['img_s']:.2f} | {fmt(v['peak_gib'])} |")
    titles = {"train": "Train step, R50-D8 ADE20K 512x512 batch 8 (images/s; ratios of images/s)",
              "infer512": "Inference 512x512 batch 1 (ms per image; ratios of time)",
              "whole": "Inference whole 1024x2048 batch 1, Cityscapes (ms per image; ratios of time)",
              "slide": "Inference by sliding windows over 1024x2048 batch 1, Cityscapes (windows 512x1024, stride "
                       "341x683: 9 windows; ms per image; the toolboxes' slide mode was not timed)"}  # fmt: skip
    for kind, title in titles.items():
        t = model_table(ours, peers, kind, rate)
        if t:
            lines += ["", title + ":", ""] + t
        if kind == "train":  # the real loop next to its isolated step
            lines += e2e_table(ours)
    pam = [r for r in ours if r.get("group") == "pam"]
    if pam:
        lines += ["", "PAM core softmax(q k^T) v, q/k 64 wide, v 512 wide:", "",
                  "| impl | dtype | batch x N | fwd ms | fwd+bwd ms | peak GiB fwd+bwd | rel err vs f64 |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in pam:
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['dtype']} | {r['batch']}x{r['n']} | {r['error'][:60]} | | | |")
            else:
                lines.append(f"| {r['impl']} | {r['dtype']} | {r['batch']}x{r['n']} | {fmt(r.get('ms_fwd'))} | "
                             f"{fmt(r.get('ms_fwd_bwd'))} | {fmt(r.get('peak_gib_fwd_bwd'))} | "
                             f"{fmt(r.get('rel_err_vs_f64'), '.1e')} |")  # fmt: skip
    loss = [r for r in ours if r.get("group") == "loss"]
    if loss:
        lines += ["", "Training loss alone (4 outputs, bf16 logits, to 512x512), forward + backward:", "",
                  "| implementation | ms | peak GiB | gradient vs reference |", "|---|---|---|---|"]  # fmt: skip
        for r in loss:
            lines.append(f"| {r['impl']} | {r.get('ms_fwd_bwd', r.get('error', '-'))} | {fmt(r.get('peak_gib'))} | "
                         f"{fmt(r.get('grad_rel_vs_reference'), '.1e')} |")  # fmt: skip
    parts = [r for r in ours if r.get("group") == "loss_part"]
    if parts:
        lines += ["", f"Loss parts on one output {parts[0]['shape']} (float32):", "", "| kernel | ms |", "|---|---|"]
        lines += [f"| {r['part']} | {r['ms']} |" for r in parts]
    norm = [r for r in ours if r.get("group") == "norm"]
    if norm:
        head = ["shape", "residual", "PyTorch ms", "fused ms", "speed-up", "fused TB/s", "dx err PyTorch",
                "dx err fused", "dw err PyTorch", "dw err fused"]  # fmt: skip
        lines += ["", "Batch norm + ReLU [+ residual] in training, forward + backward, bf16 channels_last (PyTorch's "
                  "kernels vs the fused Triton ones; errors against float64):", "",
                  "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]  # fmt: skip
        for r in norm:
            nat, fus = r.get("native_ms"), r.get("triton_ms")
            cells = ["x".join(map(str, r["shape"])), str(r["residual"]), fmt(nat, ".3f"),
                     fmt(fus, ".3f") if fus else r.get("triton_error", "-")[:60], fmt(ratio(nat, fus), ".2f", "x"),
                     fmt(r.get("triton_tb_s"))] + [fmt(r.get(f"{i}_{g}_rel"), ".1e")
                                                   for g in ("dx", "dw") for i in ("native", "triton")]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    for r in (r for r in ours if r.get("group") == "eval" and "img_s_workers0" in r):
        lines += ["", f"Evaluation, {r['images']} ADE20K-layout val images of {r['image_hw'][0]}x{r['image_hw'][1]} "
                  "(whole, bf16, channels_last), images/s:", "",
                  "| read in the process | read ahead by reader processes | the same + `--cuda-graphs` | processes | "
                  "same confusion matrix | + `--norm folded` | its confusion matrix moved |",
                  "|---|---|---|---|---|---|---|",
                  f"| {r['img_s_workers0']} | {r['img_s_workers_auto']} | {r.get('img_s_workers_auto_graphs', '-')} | "
                  f"{r['workers_auto']} | {r['same_confusion_matrix']} | "
                  f"{r.get('img_s_workers_auto_graphs_folded', '-')} | "
                  f"{fmt(r.get('folded_confusion_moved'), '.1e')} |"]  # fmt: skip
        if "img_s_slide_tta_eager" in r:
            lines += ["", "Sliding windows + multi-scale (0.75, 1, 1.25) + flip, the first 8 of those images, "
                      "images/s:", "",
                      "| eager | `--cuda-graphs` | graphs captured | same confusion matrix |", "|---|---|---|---|",
                      f"| {r['img_s_slide_tta_eager']} | {r['img_s_slide_tta_graphs']} | {r['slide_tta_graphs']} | "
                      f"{r['slide_tta_same_confusion_matrix']} |"]  # fmt: skip
    for r in (r for r in ours if r.get("group") == "fidelity" and "fast" in r):
        ref, fast = r["fp32_reference"], r["fast"]
        lines += ["", f"Fidelity: {r['steps']} SGD steps from the same weights and batches, the fastest settings "
                  "(bf16, channels_last, Triton loss and batch norm, CUDA graphs) against float32, reference loss:",
                  "", "| max relative loss deviation | mean | within the bf16 bound (2 % / 0.6 %) | first / last loss "
                  "float32 | first / last loss fast |", "|---|---|---|---|---|",
                  f"| {r['max_rel_dev']} | {r['mean_rel_dev']} | {r['within_bf16_bound']} | "
                  f"{ref[0]} / {ref[-1]} | {fast[0]} / {fast[-1]} |"]  # fmt: skip
    heads = [r for r in ours if r.get("group") == "head" and "streams_eager_rel" in r]
    if heads:
        lines += ["", "The head's branches on two CUDA streams, the defaults before 2026-11-27 (olddefaults; "
                  "lazyexp2_tritonpool in earlier runs: exp2 + lazy rescaling with the pooling kernel), and the batch "
                  "norms folded into the convolutions (folded_variants in an earlier run: with the kernels' "
                  "variants), against the serial unfolded network (relative difference of the logits; share of "
                  "pixels whose class changed):", "",
                  "| case | amp | variant | eager rel | eager changed | graph rel | graph changed |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in heads:
            for v in (
                "streams",
                "lazyexp2_tritonpool",
                "variants",
                "olddefaults",
                "folded",
                "folded_variants",
                "folded_apart",
            ):
                err = r.get(f"{v}_eager_error") or r.get(f"{v}_graph_error")
                if f"{v}_eager_rel" not in r:
                    lines += [f"| {r['case']} | {r['amp']} | {v} | {err} | | | |"] if err else []
                    continue
                lines.append(f"| {r['case']} | {r['amp']} | {v} | {r[f'{v}_eager_rel']:.1e} | "
                             f"{r[f'{v}_eager_changed']} | {fmt(r.get(f'{v}_graph_rel'), '.1e')} | "
                             f"{r.get(f'{v}_graph_changed', err or '-')} |")  # fmt: skip
    resize = [r for r in ours if r.get("group") == "resize" and "ms_nhwc" in r]
    if resize:
        lines += ["", "The logits' bilinear resize, channels_last input: PyTorch's NHWC kernel vs `upsample_logits` "
                  "(NCHW) and the Triton kernel (`models/triton_resize.py`; its values against the NCHW kernel's), "
                  "ms:", "", "| classes | from | to | dtype | NHWC ms | NCHW ms | same bits | Triton ms | Triton same "
                  "bits | Triton rel | Triton changed |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['classes']} | {r['from'][0]}x{r['from'][1]} | {r['to'][0]}x{r['to'][1]} | {r['dtype']} | "
                  f"{r['ms_nhwc']} | {r['ms_nchw']} | {r['same_bits']} | {r.get('ms_triton', '-')} | "
                  f"{r.get('triton_same_bits', '-')} | {fmt(r.get('triton_rel'), '.1e')} | "
                  f"{r.get('triton_changed', '-')} |" for r in resize]  # fmt: skip
    lines += convs_table(ours)
    bad = [r for r in ours if "error" in r and r.get("group") != "pam"] + [r for r in ours if "skipped" in r]
    if bad:
        lines += ["", "Errors / skipped:", ""] + [f"- {json.dumps(r)[:300]}" for r in bad]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder of the GPU run's files")
    p.add_argument("--md", type=Path, help="also write the markdown here")
    p.add_argument("--peers", type=Path, help="take the toolboxes' figures from this earlier run's folder")
    a = p.parse_args(argv)
    text = summarize(a.out, a.peers)
    print(text)
    if a.md:
        a.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
