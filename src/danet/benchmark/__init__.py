"""`danet benchmark`: speed, peak memory and FLOPs of a preset's DANet, for inference or one training step.

A case is one `BenchSpec`: preset, batch, size, mode ("infer" or "train") and the speed options (autocast dtype,
channels_last, torch.compile, cuDNN benchmark, fused or explicit position attention, the loss implementation,
CUDA graphs). `run_case(spec)` returns a dict of figures; the CLI prints it and can write it as JSON.

Timing: `warmup` untimed runs, then `iters` timed runs, each ended by a device synchronisation; the median is
reported, and `host_ms`, the median time until a run returned before its synchronisation (on a GPU the host's time
to queue the run's kernels: well below `ms` where the GPU is the bound; CUDA's launch queue holds ~1,000 kernels, so
near `ms` it may be either). Peak memory is CUDA's `max_memory_allocated` over the timed runs; where the runs replay
CUDA graphs (`cuda_graphs`, `compile="reduce-overhead"`) it is `max_memory_reserved`, since a replay allocates
nothing and the graphs' memory pools hold the activations as reserved, not allocated, memory (on the CPU: the
process's resident-set high-water mark over the timed runs, which includes the Python process itself). FLOPs are
counted by `torch.utils.flop_counter.FlopCounterMode` on one image with the explicit attention (the algorithm's work,
the same for every option): the forward for inference, forward + backward for training.

The train step is: forward in train mode, the 4-output cross-entropy (main, pam, cam 1.0, aux 0.4, ignore 255,
mean over the labelled pixels), backward, SGD(lr 0.01, momentum 0.9, weight decay 5e-4) step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..config_checks import MAX_SIZE
from ..engine.distributed import pick_device
from ..engine.fused_loss import fused_danet_loss
from ..engine.graphed import WARMUP, CudaGraphs, GraphedStep
from ..engine.inference import AMP_DTYPES, autocast, default_stride, slide_logits, slide_windows
from ..engine.losses import danet_loss
from ..engine.schedule import build_optimizer
from ..errors import DanetError
from ..models.danet import ATTENTIONS
from ..models.folded import WINOGRAD_REFUSED, fold_batch_norm
from ..models.fused_norm import use_fused_norm, why_unused
from ..models.norm_kernels import interpreted
from ..models.registry import create_model
from ..models.winograd import use_winograd
from ..presets import get_preset

GiB = 2**30


@dataclass
class BenchSpec:
    """One benchmark case. `size` None: the preset's crop size. `overrides`: ModelConfig fields."""

    preset: str = "danet_r50-d8_ade20k"
    mode: str = "infer"  # "infer" | "train"
    batch: int = 2
    size: tuple[int, int] | None = None
    amp: str = "none"  # "none" | "bf16" | "fp16"
    channels_last: bool = False
    compile: str | None = None  # None or a torch.compile mode ("default", "max-autotune-no-cudagraphs", ...)
    cudnn_benchmark: bool = False
    attention: str = "fused"  # "fused" (SDPA) | "explicit" (softmax(QK^T)V in memory) | "triton" (inference kernel)
    conv: str = "direct"  # "direct" | "winograd" (models.winograd: CPU float32, F(4x4, 3x3))
    norm: str = "native"  # "native" | "triton" (models.fused_norm, CUDA) | "folded" (models.folded, inference)
    head: str = "auto"  # the head's branches side by side in CUDA inference (DAHead): "auto" (small maps) | "streams"
    # (always) | "serial" (never)
    loss: str = "reference"  # "reference" (engine.losses, full-size logits) | "fused" | "compiled" | "triton"
    cuda_graphs: bool = False  # capture the forward (train: forward, loss, backward; SGD eager) once, replay it
    slide: tuple[int, int] | None = None  # inference only: sliding windows of this size (H, W) instead of whole
    stride: tuple[int, int] | None = None  # slide stride (None: 2/3 of the window)
    window_batch: int | None = None  # windows per forward (None: engine.inference's default, by pixel budget)
    warmup: int = 2
    iters: int = 5
    device: str = "auto"
    threads: int | None = None
    flops: bool = True
    seed: int = 0
    label: str = ""
    overrides: dict = field(default_factory=dict)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        try:  # NOTE: "5" resets the VmHWM (peak RSS) of this process (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _peak_gib(dev: torch.device, pooled: bool = False) -> float:
    """`pooled`: the runs replay CUDA graphs, whose private memory pools count as reserved, not allocated."""
    if dev.type == "cuda":
        return (torch.cuda.max_memory_reserved if pooled else torch.cuda.max_memory_allocated)(dev) / GiB
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def timed(fn, dev: torch.device, iters: int) -> tuple[list[float], list[float]]:
    """Seconds of each of `iters` calls of `fn`, each ended by a device sync; and the seconds until each call
    returned, before its sync (on a GPU: the host's time to queue the work; far below the first where the GPU is
    the bound, close to it where launching is)."""
    _sync(dev)
    times, host = [], []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t)
        _sync(dev)
        times.append(time.perf_counter() - t)
    return times, host


def resolve_device(name: str) -> torch.device:
    return pick_device(name)  # DanetError for a name it does not know or a GPU that is not there


def build(spec: BenchSpec, dev: torch.device):
    """(model, images (B, 3, H, W), labels (B, H, W)) for a case, seeded."""
    preset = get_preset(spec.preset)
    h, w = spec.size or preset.crop_size
    torch.manual_seed(spec.seed)
    model = create_model(spec.preset, **spec.overrides)
    model.set_attention(spec.attention)
    use_winograd(model, spec.conv == "winograd")
    use_fused_norm(model, spec.norm == "triton")
    model.head.branch_streams = {"auto": "auto", "streams": True}.get(spec.head, False)  # NOTE: none in training or
    # on the CPU
    g = torch.Generator().manual_seed(spec.seed)
    x = torch.randn(spec.batch, 3, h, w, generator=g)
    y = torch.randint(0, model.num_classes, (spec.batch, h, w), generator=g)
    y[torch.rand(spec.batch, h, w, generator=g) < 0.1] = preset.dataset.ignore_index
    model, x, y = model.to(dev), x.to(dev), y.to(dev)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if spec.norm == "folded":  # after the memory format: the folded weights keep it
        fold_batch_norm(model.eval(), AMP_DTYPES.get(spec.amp, torch.float32))
    return model, x, y


def count_flops(model, x: torch.Tensor, train: bool, amp: str = "none") -> float:
    """FLOPs per image of the forward (eval) or forward + backward (train) with explicit attention, batch 1, under
    the timed run's autocast (the same count; a model folded in bf16 runs only under it)."""
    from torch.utils.flop_counter import FlopCounterMode

    pam = model.head.pam
    saved = pam.fused, pam.triton
    model.set_attention("explicit")
    model.train(train)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:  # NOTE: the same convolutions and matmuls; one image of a small --size trains no batch norm, and
        m.eval()  # the timed model's running statistics stay as they were
    x1 = x[:1].detach()
    try:
        with FlopCounterMode(display=False) as fc, autocast(x.device, amp):
            if train:
                out = model(x1, resize=False)
                sum(v.float().sum() for v in out.values()).backward()
            else:
                with torch.no_grad():
                    model(x1)
    finally:
        pam.fused, pam.triton = saved
        model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def make_infer_fn(spec: BenchSpec, model, x: torch.Tensor, dev: torch.device):
    model.eval()
    net = torch.compile(model, mode=spec.compile) if spec.compile else model

    def fwd():
        with torch.inference_mode(), autocast(dev, spec.amp):
            if spec.slide:
                return slide_logits(net, x, spec.slide, spec.stride or default_stride(spec.slide), spec.amp,
                                    spec.window_batch)  # fmt: skip
            return net(x)["out"]

    if not spec.cuda_graphs:
        return fwd
    if dev.type != "cuda":
        raise DanetError("--cuda-graphs needs a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture (cuDNN benchmark, lazy init)
            fwd()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd()
    return graph.replay


def make_train_fn(spec: BenchSpec, model, x: torch.Tensor, y: torch.Tensor, dev: torch.device):
    model.train()
    net = torch.compile(model, mode=spec.compile) if spec.compile else model
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)  # the project's SGD
    scaler = torch.amp.GradScaler(dev.type, enabled=spec.amp == "fp16")
    ignore = get_preset(spec.preset).dataset.ignore_index
    last = {}

    def losses_of(x, y) -> dict:
        with autocast(dev, spec.amp):
            if spec.loss in ("fused", "compiled", "triton"):
                impl = "chunked" if spec.loss == "fused" else spec.loss
                return fused_danet_loss(net(x, resize=False), y, ignore_index=ignore, impl=impl)
            return danet_loss(net(x), y, ignore_index=ignore)

    def step():
        opt.zero_grad(set_to_none=True)
        losses = losses_of(x, y)
        scaler.scale(losses["loss"]).backward()
        scaler.step(opt)
        scaler.update()
        last["loss"] = losses["loss"].detach()

    if not spec.cuda_graphs:
        return step, last
    if why := CudaGraphs.why_unused(dev, 1):
        raise DanetError(f"--cuda-graphs {why}")

    def forward_backward(x, y) -> dict:
        losses = losses_of(x, y)
        losses["loss"].backward()
        return {k: v.detach() for k, v in losses.items()}

    graphed = GraphedStep(forward_backward, model.parameters(), CudaGraphs(dev))  # what `danet train` replays

    def graphed_step():
        last["loss"] = graphed(x, y)["loss"]
        opt.step()

    for _ in range(WARMUP + 1):  # the eager warm-up steps and the capture, before the timing
        graphed_step()
    return graphed_step, last


def environment(dev: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(dev)
        env["cudnn"] = torch.backends.cudnn.version()
        env["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
    else:
        env["device_name"] = platform.processor() or platform.machine()
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            env["device_name"] = names[0] if names else env["device_name"]
    return env


HEADS = ("auto", "streams", "serial")
NORMS = ("native", "triton", "folded")
MAX_BATCH, MAX_THREADS = 65536, 4096  # past these a case cannot run on any machine: one line, not an overflow
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_spec(spec: BenchSpec) -> torch.device:
    """One-line DanetError for settings the case cannot run with (before anything is timed); the device."""
    if spec.mode not in ("infer", "train"):
        raise DanetError(f"unknown mode {spec.mode!r}; use 'infer' or 'train'")
    if spec.amp not in ("none", "bf16", "fp16"):
        raise DanetError(f"unknown --amp {spec.amp!r}; use none, bf16 or fp16")
    if spec.attention not in ATTENTIONS:
        raise DanetError(f"unknown --attention {spec.attention!r}; use {', '.join(ATTENTIONS)}")
    if spec.conv not in ("direct", "winograd"):
        raise DanetError(f"unknown --conv {spec.conv!r}; use direct or winograd")
    if spec.norm not in NORMS:
        raise DanetError(f"unknown --norm {spec.norm!r}; use {', '.join(NORMS)}")
    if spec.norm == "folded" and spec.mode != "infer":
        raise DanetError("--norm folded folds the running statistics into the convolutions (inference); use --infer")
    if spec.norm == "folded" and spec.conv == "winograd":
        raise DanetError(WINOGRAD_REFUSED)
    if spec.head not in HEADS:
        raise DanetError(f"unknown --head {spec.head!r}; use {', '.join(HEADS)}")
    if spec.loss not in ("reference", "fused", "compiled", "triton"):
        raise DanetError(f"unknown --loss {spec.loss!r}; use reference, fused, compiled or triton")
    if spec.slide and spec.mode != "infer":
        raise DanetError("--slide times inference; drop --train")
    for name, v in (("--batch", spec.batch), ("--iters", spec.iters)):
        if v < 1:
            raise DanetError(f"{name} must be at least 1, got {v}")
    if spec.batch > MAX_BATCH:
        raise DanetError(f"--batch {spec.batch} is past {MAX_BATCH} images; give a smaller batch")
    if not 0 <= spec.seed < 2**63:
        raise DanetError(f"--seed must be in 0 .. 2**63 - 1, got {spec.seed}")
    if spec.threads is not None and spec.threads > MAX_THREADS:
        raise DanetError(f"--threads {spec.threads} is past {MAX_THREADS}; give at most the machine's cores")
    if spec.warmup < 0:
        raise DanetError(f"--warmup must be 0 or more, got {spec.warmup}")
    if spec.size is not None and (len(spec.size) != 2 or min(spec.size) < 1):
        raise DanetError(f"--size needs two positive sizes H W, got {list(spec.size)}")
    for name, v in (("--size", spec.size), ("--slide", spec.slide), ("--stride", spec.stride)):
        if v is not None and max(v) > MAX_SIZE:
            raise DanetError(f"{name} {list(v)}: sides past {MAX_SIZE} px; give smaller sizes")
    preset = get_preset(spec.preset)
    stride = spec.overrides.get("output_stride", preset.model.output_stride)
    size = spec.size or preset.crop_size
    if spec.mode == "train":
        remedy = f"use --batch 2 or a --size above {stride} (--train)"
        preset.model.replace(output_stride=stride).check_norm_values(spec.batch, size, "", remedy)
    for name, v in (("--slide", spec.slide), ("--stride", spec.stride)):
        if v is not None and (len(v) != 2 or min(v) < 1):
            raise DanetError(f"{name} needs two positive sizes H W, got {list(v)}")
    if spec.window_batch is not None and spec.window_batch < 1:
        raise DanetError(f"--window-batch must be at least 1, got {spec.window_batch}")
    for name, v in (("--stride", spec.stride), ("--window-batch", spec.window_batch)):
        if v is not None and not spec.slide:
            raise DanetError(f"{name} sets the sliding windows of --slide H W; add --slide, or leave it out")
    if spec.threads is not None and spec.threads < 1:
        raise DanetError(f"--threads must be at least 1, got {spec.threads}")
    if spec.compile is not None and spec.compile not in COMPILE_MODES:
        raise DanetError(f"--compile {spec.compile!r}: give one of {', '.join(COMPILE_MODES)} (or no mode)")
    if spec.cuda_graphs and spec.mode == "train" and (spec.amp == "fp16" or spec.compile):
        raise DanetError(
            "--cuda-graphs --train captures an eager bf16 or float32 step (fp16's GradScaler checks the gradients on "
            "the host); for a compiled step use --compile reduce-overhead"
        )
    dev = resolve_device(spec.device)
    if spec.cudnn_benchmark and dev.type != "cuda":  # NOTE: as the other CUDA settings: a record says what ran
        raise DanetError("--cudnn-benchmark picks cuDNN's convolution algorithms on CUDA; drop it on the CPU")
    train_mode = spec.mode == "train"
    if spec.norm == "triton" and (why := why_unused(dev, bool(spec.compile))):
        raise DanetError(f"--norm triton {why}; drop --norm triton")
    if spec.attention == "triton":
        from ..models.triton_attention import why_unused as attention_unused

        why = "runs in inference only (training keeps the fused attention)" if train_mode else None
        why = why or ("is not traced by --compile" if spec.compile else None)
        if why := why or attention_unused(dev, spec.amp):
            raise DanetError(f"--attention triton {why}; drop --attention triton")
    if spec.loss == "triton" and train_mode and dev.type != "cuda" and not interpreted():
        raise DanetError("--loss triton runs on CUDA only; on the CPU time --loss fused (the same values)")
    return dev


def run_case(spec: BenchSpec) -> dict:
    """Run one case; returns the figures (ms per batch median, images/s, peak GiB, GFLOP/image, TFLOP/s)."""
    dev = check_spec(spec)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    old_bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = spec.cudnn_benchmark
    train = spec.mode == "train"
    try:
        model, x, y = build(spec, dev)
        flops = float("nan")
        if spec.flops and spec.slide:  # every window's forward
            boxes = slide_windows(tuple(x.shape[-2:]), spec.slide, spec.stride or default_stride(spec.slide))
            y1, y2, x1, x2 = boxes[0]
            flops = count_flops(model, x[..., y1:y2, x1:x2], False, spec.amp) * len(boxes)
        elif spec.flops:
            flops = count_flops(model, x, train, spec.amp)
        last: dict = {}
        if train:
            fn, last = make_train_fn(spec, model, x, y, dev)
        else:
            fn = make_infer_fn(spec, model, x, dev)
        for _ in range(spec.warmup):
            fn()
        _sync(dev)
        _reset_peak(dev)
        times, host = timed(fn, dev, spec.iters)
        pooled = dev.type == "cuda" and (spec.cuda_graphs or spec.compile == "reduce-overhead")
        peak = _peak_gib(dev, pooled)
    finally:
        torch.backends.cudnn.benchmark = old_bench
    med = statistics.median(times)
    rec = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("overrides", "flops")}
    if not train:
        rec["loss"] = None  # NOTE: no loss is computed in inference (the spec's default would read as one)
    rec.update(
        size=list(x.shape[-2:]),
        device=dev.type,
        ms=round(1000 * med, 3),
        ms_min=round(1000 * min(times), 3),
        ms_all=[round(1000 * t, 3) for t in times],
        host_ms=round(1000 * statistics.median(host), 3),
        img_s=round(spec.batch / med, 3),
        peak_gib=round(peak, 3),
        mem_kind=("cuda_max_reserved" if pooled else "cuda_max_allocated") if dev.type == "cuda" else "rss_high_water",
        gflop_per_img=round(flops / 1e9, 4),
        tflop_s=round(flops * spec.batch / med / 1e12, 3),
        **environment(dev),
    )
    if spec.overrides:
        rec["overrides"] = spec.overrides
    if last:
        rec["loss_value"] = round(float(last["loss"]), 6)
    return rec


def release(compiled: bool = False) -> None:
    """Free what the last case left behind (between cases of one process); `compiled`: also torch.compile's graphs
    (of a compiled model; the compiled loss kernels are kept, the next case reuses them)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if compiled:
        torch._dynamo.reset()
