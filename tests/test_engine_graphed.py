"""`cuda_graphs=true`: a training step's forward, loss and backward captured once and replayed (engine/graphed.py).

There is no GPU here, so `EagerGraphs` stands in for CUDA's capture and replay, with what matters for the loop's
plumbing: a capture computes nothing (its run is undone: buffers and RNG as before), a replay writes into the
captured outputs and gradients (adding to gradients that existed at the capture, as a captured backward would) and
reads only the captured input buffers. With it, a graphed
run must give the eager run's weights bit for bit. `NoHostSync` fails on what a real capture cannot take: an op
that makes the host wait for the device (`.item()`, `nonzero`, boolean indexing, ...) or builds a tensor from host
data, inside the captured step.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from danet.cli import main
from danet.config import RunConfig, apply_overrides
from danet.data import ensure_synthetic
from danet.engine import fused_loss, graphed, train
from danet.engine.fused_loss import fused_danet_loss
from danet.engine.graphed import WARMUP, GraphedStep
from danet.engine.logging import read_log
from danet.engine.losses import danet_loss
from danet.errors import DanetError
from danet.models.danet import DANet
from danet.models.fused_norm import use_fused_norm
from danet.presets import get_preset

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim,
              aten.unique_consecutive, aten.bincount, aten.is_nonzero, aten.equal, aten.lift_fresh,
              aten.repeat_interleave}  # fmt: skip


class NoHostSync(TorchDispatchMode):
    """Raise on ops a CUDA graph capture cannot hold (the host would wait for, or copy to, the device)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] or [])
        )
        if func.overloadpacket in HOST_READS or bool_index:
            raise AssertionError(f"{func} inside the captured step: the host would wait for the device")
        return func(*args, **kwargs)


class EagerGraphs:
    """CPU stand-in for `graphed.CudaGraphs` (see the module docstring)."""

    made: list[EagerGraphs] = []

    def __init__(self, device: torch.device) -> None:
        self.captures = self.replays = 0
        EagerGraphs.made.append(self)

    @staticmethod
    def why_unused(device: torch.device, world: int) -> str | None:
        return None

    def warmup(self):
        return contextlib.nullcontext()

    def capture(self, fn, params):
        self.captures += 1
        rng = torch.random.get_rng_state()
        adds = {p for p in params if p.grad is not None}  # a backward captured onto gradients adds to them
        buffers = {id(b): b.clone() for b in _all_buffers()}
        with NoHostSync():
            out = fn()
        torch.random.set_rng_state(rng)  # a capture computes nothing: the first replay draws what an eager step would
        for b in _all_buffers():
            b.copy_(buffers[id(b)])
        static = [(p, p.grad) for p in params if p.grad is not None]

        def replay():
            self.replays += 1
            before = [p.grad for p in params]  # a replay writes into the captured tensors, whatever .grad now is
            for p in params:
                p.grad = None
            new = fn()
            for k, v in out.items():
                v.copy_(new[k])
            for p, g in static:
                g.add_(p.grad) if p in adds else g.copy_(p.grad)
            for p, b in zip(params, before, strict=True):
                p.grad = b

        return replay, out


_MODULES: list[nn.Module] = []  # the models whose buffers a stand-in capture restores


def _all_buffers():
    return [b for m in _MODULES for b in m.buffers()]


@pytest.fixture(autouse=True)
def _stand_in(monkeypatch):
    monkeypatch.setattr(train, "GRAPH_BACKEND", EagerGraphs)
    EagerGraphs.made.clear()
    _MODULES.clear()
    real_build = train.build_model
    monkeypatch.setattr(train, "build_model", lambda *a, **k: _MODULES.append(real_build(*a, **k)) or _MODULES[-1])
    yield


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop, self.out = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.Dropout2d(0.3),
            nn.Conv2d(8, 4, 1),
        )

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.bn(self.conv(x)))))


def _batches(n: int, size=(8, 8)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, *size, generator=g), torch.randint(0, 4, (2, *size), generator=g)) for _ in range(n)]


def _run(batches, use_graph: bool):
    torch.manual_seed(0)
    model = Tiny()
    _MODULES.append(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ce = nn.CrossEntropyLoss()

    def fb(x, y):
        loss = ce(model(x), y)
        loss.backward()
        return {"loss": loss.detach()}

    step = GraphedStep(fb, model.parameters(), EagerGraphs(torch.device("cpu"))) if use_graph else None
    losses = []
    for i, (x, y) in enumerate(batches):
        torch.manual_seed(100 + i)
        if step is None:
            opt.zero_grad(set_to_none=True)
            out = fb(x, y)
        else:
            out = step(x, y)
        losses.append(out["loss"].item())
        opt.step()
    return model, losses, step


def test_graphed_step_equals_the_eager_steps():
    """Warm-up, capture, replays on new batches, a batch of another shape in between (run eagerly; the next
    replay's gradients must still reach the optimiser): the same losses and weights bit for bit."""
    batches = _batches(8)
    batches[6] = _batches(1, size=(6, 10))[0]
    eager, eager_losses, _ = _run(batches, False)
    graph, graph_losses, step = _run(batches, True)
    assert graph_losses == eager_losses
    for (name, a), b in zip(eager.state_dict().items(), graph.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    backend = EagerGraphs.made[-1]
    assert step.captured and backend.captures == 1 and step.eager_steps == 1
    assert backend.replays == len(batches) - WARMUP - 1  # the capture's step is replayed too; the odd batch is not


def test_replay_reads_the_captured_inputs_not_the_first_batch():
    """Stale inputs (a replay of the capture's batch) would repeat the same loss; the losses must follow the data."""
    x, y = _batches(1)[0]
    batches = [(x, y)] * (WARMUP + 1) + [(x * 3, y)] + [(x, y)]
    _, losses, _ = _run(batches, True)
    assert losses[WARMUP + 1] != losses[WARMUP] and losses[-1] != losses[WARMUP + 1]


def test_no_host_sync_flags_what_a_capture_cannot_hold():
    x = torch.randn(4)
    for bad in (lambda: x.sum().item(), lambda: x[x > 0], lambda: torch.tensor([1.0, 2.0]), lambda: x.nonzero()):
        with pytest.raises(AssertionError, match="inside the captured step"), NoHostSync():
            bad()
    with NoHostSync():  # what a step does: arithmetic, where, reductions to tensors
        torch.where(x > 0, x, 0.0).sum() / (x != 0).sum().clamp(min=1)


@pytest.mark.parametrize(
    "impl, norm",
    [("reference", "native"), ("chunked", "native"), ("chunked-gemm", "native"), ("triton", "triton")],
)
def test_train_step_holds_no_host_sync(impl, norm, monkeypatch):
    """The model (native or fused batch norm), every loss implementation and the backward: capturable. chunked-gemm
    is the chunked loss's CUDA path (GEMM upsample), forced on here."""
    if impl == "chunked-gemm":
        monkeypatch.setattr(fused_loss, "GEMM_PATH", "always")
    preset = get_preset("danet_tiny_synthetic")
    torch.manual_seed(0)
    model = DANet(preset.model.replace(base_channels=4, stem_channels=8, head_channels=16, key_channels=8,
                                       aux_channels=8))  # fmt: skip
    use_fused_norm(model, norm == "triton")
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, preset.num_classes, (2, 32, 32))
    y[0, :4] = 255

    def step():
        if impl == "reference":
            losses = danet_loss(model(x), y)
        else:
            losses = fused_danet_loss(model(x, resize=False), y, impl="chunked" if impl.startswith("chunked") else impl)
        losses["loss"].backward()
        return losses

    step()  # warm-up: lazy state (the fused norm's cached scalars) is made outside the capture, as in the loop
    with NoHostSync():
        step()


# ----------------------------------------------------------------------------------------------- danet train
SETS = ["schedule.epochs=2", "schedule.iters_per_epoch=4", "schedule.batch_size=2", "schedule.eval_interval=2",
        "data.crop_size=[32,32]", "data.num_workers=0", "data.val_limit=2", "model.base_channels=8",
        "model.stem_channels=8", "model.head_channels=16", "model.key_channels=8", "model.aux_channels=16",
        "deterministic=true", "device=cpu", "progress=false", "log_interval=1", "fused_loss=true"]  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("data"))


def _train(data_root, work, extra=()):
    cfg = apply_overrides(RunConfig(preset="danet_tiny_synthetic", data_root=str(data_root), work_dir=str(work)),
                          [*SETS, *extra])  # fmt: skip
    return train.train(cfg)


def test_danet_train_with_cuda_graphs_equals_eager(data_root, tmp_path):
    """8 steps over 2 epochs (validation between them: the model goes to eval mode and back), 3 eager, capture,
    replays, then resume from a mid-epoch stop (a new capture): the same losses and weights as the eager run."""
    _train(data_root, tmp_path / "eager")
    _train(data_root, tmp_path / "graphs", ["cuda_graphs=true"])
    assert [b.captures for b in EagerGraphs.made] == [1]
    assert EagerGraphs.made[0].replays == 8 - WARMUP
    _train(data_root, tmp_path / "resumed", ["cuda_graphs=true", "stop_iter=6"])
    cfg = apply_overrides(RunConfig(preset="danet_tiny_synthetic", data_root=str(data_root),
                                    work_dir=str(tmp_path / "resumed")), [*SETS, "cuda_graphs=true"])  # fmt: skip
    train.train(cfg, resume=tmp_path / "resumed" / "last.pth")
    losses = {}
    for name in ("eager", "graphs", "resumed"):
        losses[name] = [r["loss"] for r in read_log(tmp_path / name / "log.jsonl") if r.get("type") == "train"]
    assert len(losses["eager"]) == 8 and losses["graphs"] == losses["eager"]
    assert losses["resumed"][-2:] == losses["eager"][-2:]
    from danet.checkpoints import read_checkpoint

    want = read_checkpoint(tmp_path / "eager" / "last.pth").state_dict
    for name in ("graphs", "resumed"):
        got = read_checkpoint(tmp_path / name / "last.pth").state_dict
        assert all(torch.equal(want[k], got[k]) for k in want), name


def test_danet_train_skips_a_nonfinite_step_with_cuda_graphs(data_root, tmp_path, monkeypatch):
    """nonfinite=skip: a replayed step whose loss is NaN changes no weight; the next replays train on."""
    real = fused_loss.fused_danet_loss
    calls = {"n": 0}

    def nan_on_fifth(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        return {kk: v * float("nan") for kk, v in out.items()} if calls["n"] == 6 else out  # 5th step's replay

    monkeypatch.setattr(train, "fused_danet_loss", nan_on_fifth)
    summary = _train(data_root, tmp_path / "w", ["cuda_graphs=true", "nonfinite=skip"])
    log = read_log(tmp_path / "w" / "log.jsonl")
    assert summary["skipped"] == 1 and [r["iter"] for r in log if r.get("type") == "skip"] == [5]
    train_log = [r for r in log if r.get("type") == "train"]
    assert [r["iter"] for r in train_log] == [1, 2, 3, 4, 6, 7, 8]
    assert all(math.isfinite(r["loss"]) for r in train_log) and EagerGraphs.made[0].replays == 8 - WARMUP


def test_cuda_graphs_setting_errors_and_notes(data_root, tmp_path, monkeypatch, capsys):
    for bad, words in (("amp=fp16", "not amp=fp16"), ("compile=true", "not compile=true")):
        with pytest.raises(DanetError, match=words):
            apply_overrides(RunConfig(), ["cuda_graphs=true", bad]).validate()
    monkeypatch.setattr(train, "GRAPH_BACKEND", graphed.CudaGraphs)  # the real one: no CUDA here
    argv = ["train", "danet_tiny_synthetic", "--data-root", str(data_root), "--work-dir", str(tmp_path / "w")]
    argv += [a for s in [*SETS, "schedule.epochs=1", "schedule.iters_per_epoch=1", "cuda_graphs=true"]
             for a in ("--set", s)]  # fmt: skip
    assert main(argv) == 0
    assert "note: cuda_graphs needs a CUDA device; eager steps run" in capsys.readouterr().err
    assert graphed.CudaGraphs.why_unused(torch.device("cuda"), 2).startswith("runs in one process")


def test_benchmark_graphed_train_step_is_the_loops(monkeypatch):
    """`danet benchmark --train --cuda-graphs` times the same GraphedStep as `danet train`: after the same number
    of steps its weights are the eager step's."""
    import danet.benchmark as B

    monkeypatch.setattr(B, "CudaGraphs", EagerGraphs)
    nar = dict(base_channels=4, stem_channels=8, head_channels=16, key_channels=8, aux_channels=8)
    spec = B.BenchSpec(preset="danet_tiny_synthetic", mode="train", batch=2, size=(32, 32), device="cpu",
                       loss="fused", overrides=nar)  # fmt: skip
    weights = []
    for graphs in (False, True):
        spec.cuda_graphs = graphs
        model, x, y = B.build(spec, torch.device("cpu"))
        _MODULES.append(model)
        torch.manual_seed(0)
        step, last = B.make_train_fn(spec, model, x, y, torch.device("cpu"))
        for _ in range(2 if graphs else WARMUP + 3):  # the graphed one ran its warm-up and capture steps already
            step()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert EagerGraphs.made[-1].replays == 3
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
