"""The `danet benchmark` command line: options -> `BenchSpec` cases -> `run_case`, printed and written as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..engine.logging import check_output_file, write_json
from ..errors import DanetError
from ..models.danet import ATTENTIONS
from . import HEADS, NORMS, BenchSpec, check_spec, release, run_case


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise DanetError(f"--set takes KEY=VALUE (a ModelConfig field), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_cli(parser) -> None:
    parser.add_argument("preset", help="a preset name (see `danet models`)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the preset crop)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="modes", action="store_const", const=["train"], help="time one training step")
    mode.add_argument("--infer", dest="modes", action="store_const", const=["infer"], help="time inference")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true", help="NHWC model and input")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        help="torch.compile the model (MODE: default, reduce-overhead, max-autotune-no-cudagraphs, ...)",
    )
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms")
    parser.add_argument(
        "--attention",
        choices=ATTENTIONS,
        default=None,
        help="position attention (default: fused, or the model's --set fused_attention; triton: one kernel, inference "
        "on CUDA in bf16 / fp16)",
    )
    parser.add_argument(
        "--conv",
        choices=["direct", "winograd"],
        default="direct",
        help="3x3 convolutions: the library's (direct) or Winograd F(4x4,3x3) (CPU float32; same results to ~3e-6)",
    )
    parser.add_argument(
        "--norm",
        choices=NORMS,
        default="native",
        help="batch norm: PyTorch's kernels, or batch norm + residual add + ReLU fused in Triton kernels (CUDA), or "
        "folded into the convolutions, which on CUDA run with their bias, residual and ReLU in one cuDNN call "
        "(inference; the same function, rounded once in the compute dtype)",
    )
    parser.add_argument(
        "--head",
        choices=HEADS,
        default="auto",
        help="the head's two branches side by side on two CUDA streams in inference (auto: the default, as in danet "
        "test / predict, where the head's map has at most 16,384 positions, as a 512x512 image's; streams: always), or "
        "one after the other (serial); no effect in training or on the CPU",
    )
    parser.add_argument(
        "--loss",
        choices=["reference", "fused", "compiled", "triton"],
        default="reference",
        help="train: CE of the full-size logits (engine.losses), or the same value from the 1/8-size logits, "
        "chunked (fused), torch.compile'd (compiled) or one Triton kernel (triton), without the full-size tensors",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay a captured CUDA graph (train: forward, loss and backward as `danet train --set cuda_graphs=true`; "
        "bf16/fp32)",
    )
    parser.add_argument("--slide", type=int, nargs=2, metavar=("H", "W"), help="inference: sliding windows of H x W")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide stride (default: 2/3 window)")
    parser.add_argument(
        "--window-batch", type=int, metavar="N", help="slide: windows per forward (default: as fit in 2048x1024 pixels)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ModelConfig override, e.g. --set base_channels=16 (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the results as a JSON list")


def format_record(r: dict) -> str:
    opts = [r["amp"]] + [k for k in ("channels_last", "cudnn_benchmark", "cuda_graphs") if r[k]]
    opts += [f"compile={r['compile']}"] if r["compile"] else []
    opts += [f"attention={r['attention']}"] + ([f"conv={r['conv']}"] if r.get("conv", "direct") != "direct" else [])
    opts += [f"norm={r['norm']}"] if r.get("norm", "native") != "native" else []
    opts += [f"head={r['head']}"] if r.get("head", "auto") != "auto" else []
    opts += [f"loss={r['loss']}"] if r["mode"] == "train" else []
    if r.get("slide"):
        stride = "x".join(map(str, r["stride"])) if r["stride"] else "2/3"
        wb = r["window_batch"] or "auto"
        opts += [f"slide={'x'.join(map(str, r['slide']))} stride={stride} windows/forward={wb}"]
    h, w = r["size"]
    line = (
        f"{r['mode']:5s} {r['preset']} b{r['batch']} {h}x{w} [{' '.join(opts)}] on {r['device_name']}: "
        f"{r['ms']:.1f} ms/batch (median of {len(r['ms_all'])}; host {r['host_ms']:.1f}), {r['img_s']:.2f} img/s, "
        f"peak {r['peak_gib']:.2f} GiB ({r['mem_kind']}), {r['gflop_per_img']:.4g} GFLOP/img, "
        f"{r['tflop_s']:.3f} TFLOP/s"
    )
    return line + (f", loss {r['loss_value']:.5f}" if "loss_value" in r else "")


def run_cli(args) -> int:
    overrides = dict(_parse_override(o) for o in args.overrides)
    modes = args.modes or (["infer"] if args.slide or args.norm == "folded" else ["infer", "train"])
    if "train" not in modes and args.loss != "reference":
        raise DanetError(f"--loss {args.loss} times the training loss; add --train (and no --infer or --slide)")
    if args.json is not None:  # before the timing, not after it
        if not args.json or args.json.endswith(("/", os.sep)):
            raise DanetError(f"--json needs a file name, got {args.json!r}")
        check_output_file(Path(args.json), "--json")
    # NOTE: without --attention, the model's own setting (--set fused_attention=false: the explicit product)
    attention = args.attention or ("explicit" if overrides.get("fused_attention") is False else "fused")
    specs = [
        BenchSpec(
            preset=args.preset,
            mode=mode,
            batch=args.batch,
            size=tuple(args.size) if args.size else None,
            amp=args.amp,
            channels_last=args.channels_last,
            compile=args.compile,
            cudnn_benchmark=args.cudnn_benchmark,
            attention=attention,
            conv=args.conv,
            norm=args.norm,
            head=args.head,
            loss=args.loss,
            cuda_graphs=args.cuda_graphs,
            slide=tuple(args.slide) if args.slide else None,
            stride=tuple(args.stride) if args.stride else None,
            window_batch=args.window_batch,
            warmup=args.warmup,
            iters=args.iters,
            device=args.device,
            threads=args.threads,
            flops=args.flops,
            seed=args.seed,
            overrides=overrides,
        )
        for mode in modes
    ]
    for spec in specs:  # NOTE: every case's settings before the first is timed (a bad one would lose the others)
        check_spec(spec)
    results = []
    for spec in specs:
        rec = run_case(spec)
        print(format_record(rec), flush=True)
        results.append(rec)
        release(compiled=bool(spec.compile))
    if args.json is not None:
        write_json(args.json, results)  # atomic; a missing figure (--no-flops) as null, not NaN
    return 0
