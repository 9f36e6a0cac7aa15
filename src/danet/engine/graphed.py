"""CUDA graphs: a training step's forward, loss and backward captured once and replayed (`cuda_graphs=true`), and
the evaluation forward replayed per input layout (`danet test` / `predict --cuda-graphs`, `GraphedForward` below).

Eager PyTorch launches each of a step's ~1,000 kernels from Python (with `norm=triton` ~300 more through Triton's
launcher); where the host takes longer to launch a stretch of kernels than the GPU to run them, the GPU waits. A
replay launches them all at once. What is computed does not change: the same kernels on the same buffers.

`GraphedStep(fn, params, backend)` (backend: `CudaGraphs`) runs `fn(images, labels)` (forward, loss, backward;
returns 0-dim loss tensors) eagerly for the first `WARMUP` steps, on a side stream (cuDNN's autotuning, Triton's
compiles and lazy CUDA state happen there, as capture needs), then captures it on that stream and from then on
copies each batch into the captured input buffers and replays. The gradients live in the graph's memory; each call
points the parameters' `.grad` at them again, so the optimiser (outside the graph: the learning rate changes every
step) always reads the new ones.

Outside the graph stay: the learning-rate schedule and the SGD step (a few foreach kernels), reading the losses (the
loop's non-finite check, before the step, as in the eager loop), logging, validation, checkpoints. The dropout masks
are a function of the RNG state at each replay (the loop re-seeds before every step), as in the eager loop.

Where the training step's graph does not run (`CudaGraphs.why_unused`): the CPU; torchrun (DDP's gradient hooks
need their own capture rules; the evaluation forward has none, so there each process replays its own graphs). fp16
(the GradScaler reads the gradients on the host each step) and torch.compile (its `reduce-overhead` mode makes its
own graphs) are refused by the config check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

from ..errors import note
from ..models.amp import autocast_dtype

WARMUP = 3  # eager steps before the capture (cuDNN benchmark picks, Triton compiles, optimiser state)


class CudaGraphs:
    """Capture and replay on CUDA. `capture_error_mode="thread_local"`: the DataLoader's pin-memory thread may use
    the pinned-memory allocator (which queries events) while this thread captures."""

    def __init__(self, device: torch.device) -> None:
        self.side = torch.cuda.Stream(device)

    @staticmethod
    def why_unused(device: torch.device, world: int) -> str | None:
        """Why `cuda_graphs` cannot capture here (None where it can)."""
        if device.type != "cuda":
            return "needs a CUDA device"
        if world > 1:
            return "runs in one process (under torchrun DDP's gradient hooks would need their own capture)"
        return None

    @contextlib.contextmanager
    def warmup(self):
        cur = torch.cuda.current_stream(self.side.device)
        self.side.wait_stream(cur)
        with torch.cuda.stream(self.side):
            yield
        cur.wait_stream(self.side)

    def capture(
        self, fn: Callable[[], dict], params: list[torch.nn.Parameter], pool=None
    ) -> tuple[Callable[[], None], dict]:
        """`pool`: a memory pool shared with earlier captures (`new_pool()`), None: the graph's own."""
        del params  # NOTE: a replay writes the gradients where the capture put them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=self.side, capture_error_mode="thread_local"):
            out = fn()
        return graph.replay, out

    @staticmethod
    def new_pool():
        return torch.cuda.graph_pool_handle()


class GraphedStep:
    """`step(images, labels) -> {name: 0-dim loss}` with the backward done; see the module docstring."""

    def __init__(self, fn: Callable, params: Iterable[torch.nn.Parameter], backend) -> None:
        self.fn = fn
        self.params = [p for p in params if p.requires_grad]
        self.backend = backend
        self.steps = 0  # eager warm-up steps run so far
        self.replay = None
        self.grads: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.eager_steps = 0  # after the capture: batches of another shape, run eagerly (none from `danet train`)

    @property
    def captured(self) -> bool:
        return self.replay is not None

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        if self.replay is None and self.steps < WARMUP:
            self.steps += 1
            self._clear_grads()
            with self.backend.warmup():
                return self.fn(images, labels)
        if self.replay is None:
            self.x, self.y = images.clone(), labels.clone()  # the graph's inputs (clone keeps channels_last)
            self._clear_grads()  # NOTE: so the captured backward writes fresh gradients instead of adding
            self.replay, self.out = self.backend.capture(lambda: self.fn(self.x, self.y), self.params)
            self.grads = [(p, p.grad) for p in self.params if p.grad is not None]
        elif not _same_layout(images, self.x) or not _same_layout(labels, self.y):
            self.eager_steps += 1
            self._clear_grads()
            return self.fn(images, labels)
        self.x.copy_(images)
        self.y.copy_(labels)
        self.replay()
        for p, g in self.grads:  # NOTE: an eager step (another shape) may have pointed .grad elsewhere
            p.grad = g
        return self.out


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride() and a.device == b.device


MAX_FORWARD_GRAPHS = 8  # input layouts captured by one GraphedForward; others run eagerly (each graph holds memory)


class GraphedForward(torch.nn.Module):
    """An evaluation model whose forward is replayed as a CUDA graph per input layout (`danet test` / `predict
    --cuda-graphs`): the same kernels on the same buffers as the eager forward, launched at once instead of one by
    one from Python. (`danet benchmark --cuda-graphs`, which captures its own forward the same way, measured on an
    H200 a 512x512 batch-1 forward at 2.4 ms replayed against 10.0 eager; a whole 1024x2048 image at 14.2 against
    17.3 on one machine, 14.9 on another: the gain depends on how fast the host launches kernels.)

    The first forward of each layout (shape, strides, dtype, `resize`, autocast, grad and inference mode, the model's
    train / eval mode) runs eagerly on the backend's side stream (cuDNN's autotuning, Triton's compiles), the second
    captures it, and from then on each call copies the image into the captured input and replays. The graphs share
    one memory pool: each replay's output is copied before any other graph runs (the logits returned are that copy),
    so the activations of one graph may reuse another's, and the pool holds the largest graph's, not their sum. At
    most `max_graphs` layouts are captured (the rest run eagerly): it pays where the images share a few sizes
    (Cityscapes' 1024x2048, slide windows, the TTA scales of one image size), not for ADE20K's varied ones. Moving
    the model (`.to()`, `.half()`, a memory format) drops the graphs, which read the old tensors; wrap the model
    last. Attributes the wrapper lacks (`num_classes`, `cfg`) come from the model; `unwrap()` finds it as `.module`.
    """

    def __init__(self, module: torch.nn.Module, backend, max_graphs: int = MAX_FORWARD_GRAPHS) -> None:
        super().__init__()
        self.module = module
        # NOTE: the model's own mode (a new Module is in training mode: evaluate()'s model.train(was_training) on
        # the wrapper then put an evaluated model into training mode)
        self.training = module.training
        self.backend = backend
        self.max_graphs = max_graphs
        self.seen: set[tuple] = set()  # layouts whose first (eager) forward has run
        self.graphs: dict[tuple, tuple[Callable[[], None], torch.Tensor, dict]] = {}  # layout -> replay, input, output
        self.pool = None  # the graphs' shared memory pool, made at the first capture

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    def _apply(self, fn, *args, **kwargs):
        self.graphs.clear()  # NOTE: captured graphs read the tensors the model had; .to() / .half() replace them
        self.seen.clear()
        self.pool = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, image: torch.Tensor, resize: bool = True) -> dict:
        dev = image.device.type
        amp = autocast_dtype(dev)
        key = (tuple(image.shape), image.stride(), image.dtype, resize, amp, torch.is_grad_enabled(),
               torch.is_inference_mode_enabled(), self.module.training)  # fmt: skip
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return self.module(image, resize=resize)
            if key not in self.seen:
                self.seen.add(key)
                with self.backend.warmup():
                    return self.module(image, resize=resize)
            x = image.clone()  # the graph's input (clone keeps channels_last)

            def run() -> dict:
                # NOTE: autocast's cache off: weights cast earlier in the caller's autocast region would be read by
                # address, their casts not captured, and freed when that region ends
                cast = torch.autocast(dev, dtype=amp, cache_enabled=False) if amp else contextlib.nullcontext()
                with cast:
                    return {"out": self.module(x, resize=resize)["out"]}

            if self.pool is None:
                self.pool = self.backend.new_pool()
            replay, out = self.backend.capture(run, [], pool=self.pool)
            self.graphs[key] = (replay, x, out)
        replay, x, out = self.graphs[key]
        x.copy_(image)
        replay()
        return {"out": out["out"].clone()}


FORWARD_BACKEND = CudaGraphs  # what `with_forward_graphs` captures with (the tests put a CPU stand-in here)
CUDA_GRAPHS_HELP = (
    "replay each input size's forward as a CUDA graph (CUDA; pays where images share a few sizes, as Cityscapes)"
)


def with_forward_graphs(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` wrapped in a GraphedForward (`--cuda-graphs`); where graphs cannot run, `model` itself, with a note."""
    if why := FORWARD_BACKEND.why_unused(device, 1):
        note(f"--cuda-graphs {why}; eager forwards run")
        return model
    return GraphedForward(model, FORWARD_BACKEND(device))
