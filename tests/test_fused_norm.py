"""Fused batch norm + residual + ReLU (models/fused_norm.py), run through Triton's CPU interpreter (TRITON_INTERPRET=1).

Against PyTorch's batch norm followed by the add and the ReLU: in float64 to ~1e-13 (output, every gradient, the
running statistics), in float32 to rounding, in bf16 / fp16 within PyTorch's own error + 1 ulp; multi-program
reductions; evaluation mode; synchronised over two gloo processes (and a two-process `danet train`); the whole narrow
DANet (logits, gradients, state-dict keys) and a `danet train` run; where PyTorch's kernels take over;
`torch.compile`; `danet benchmark --norm triton`. (tests/test_triton_compile.py compiles the kernels for GPUs.)
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import danet
import danet.models.fused_norm as FN
from danet.errors import DanetError
from test_engine_ddp import spawn_two
from test_faults_common import NARROW_MODEL_SETS

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" and importlib.util.find_spec("triton") is None, reason="no triton wheels off Linux"
)


@pytest.fixture(autouse=True)
def interpreted():
    """tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pair(c: int, dtype=torch.float64, seed: int = 0, momentum: float | None = 0.1) -> tuple[nn.Module, nn.Module]:
    """(PyTorch's BatchNorm2d, the same as FusedBatchNorm2d) with random affine and running statistics."""
    g = torch.Generator().manual_seed(seed)
    ref = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.uniform_(-0.5, 0.5, generator=g)
        ref.running_mean.normal_(0, 0.3, generator=g)
        ref.running_var.uniform_(0.5, 1.5, generator=g)
    ref = ref.to(dtype)
    fused = copy.deepcopy(ref)
    assert FN.use_fused_norm(fused) == 1 and type(fused) is FN.FusedBatchNorm2d
    return ref, fused


def reference(bn: nn.Module, x: torch.Tensor, r: torch.Tensor | None, relu: bool) -> torch.Tensor:
    y = bn(x)
    y = y + r if r is not None else y
    return torch.relu(y) if relu else y


def run_both(shape, dtype, channels_last: bool, residual: bool, relu: bool, seed: int = 0, offset: float = 0.5):
    """Forward + backward of both implementations on the same data; returns {name: (fused value, reference value)}."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset
    r = torch.randn(shape, generator=g, dtype=torch.float64) if residual else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, dy = (t.to(dtype).contiguous(memory_format=fmt) for t in (x, dy))
    r = r.to(dtype).contiguous(memory_format=fmt) if residual else None
    ref, fused = pair(shape[1], torch.float64 if dtype == torch.float64 else torch.float32, seed)  # fp32 as autocast
    grads = []
    for bn in (fused, ref):
        xx = x.clone().requires_grad_()
        rr = r.clone().requires_grad_() if residual else None
        y = fused.forward_act(xx, rr, relu) if bn is fused else reference(ref, xx, rr, relu)
        wrt = [xx, bn.weight, bn.bias] + ([rr] if residual else [])
        grads.append((y, *torch.autograd.grad(y, wrt, dy)))
    names = ["y", "dx", "dweight", "dbias"] + (["dresidual"] if residual else [])
    out = {n: (a, b) for n, a, b in zip(names, grads[0], grads[1], strict=True)}
    out["running_mean"] = (fused.running_mean, ref.running_mean)
    out["running_var"] = (fused.running_var, ref.running_var)
    assert fused.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
    assert out["y"][0].dtype == dtype and out["y"][0].is_contiguous(memory_format=fmt)
    return out


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_float64_equals_pytorch(channels_last, residual, relu):
    for name, (a, b) in run_both((3, 70, 5, 7), torch.float64, channels_last, residual, relu).items():
        assert rel(a, b) < 1e-13, name


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_to_rounding_and_a_large_mean(channels_last):
    """Mean 100 x the spread: the centred partials keep the variance (a sum-of-squares formula loses ~4 digits)."""
    for name, (a, b) in run_both((2, 6, 8, 9), torch.float32, channels_last, True, True, offset=200.0).items():
        assert rel(a, b) < 2e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
def test_half_precision_within_its_rounding_of_pytorch(dtype, residual):
    """bf16 / fp16 activations, float32 parameters (as under autocast): against float64, no further off than
    PyTorch's kernels plus one rounding of the dtype. NOTE: Triton's interpreter truncates to bf16 where a GPU rounds
    to nearest (the GPU suite's `norm` group measures the GPU's own error)."""
    truth = run_both((2, 40, 6, 6), torch.float64, True, residual, True)
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11
    for name, (a, b) in run_both((2, 40, 6, 6), dtype, True, residual, True).items():
        want = truth[name][1]
        assert rel(a, want) <= rel(b, want) + ulp, name


@pytest.mark.parametrize("target_programs", [FN.TARGET_PROGRAMS, 8])
def test_reductions_over_many_programs(monkeypatch, target_programs):
    """9,000 rows: 71 row blocks of 128, one per program (the combine loops over 2 chunks of 64 partials), or with
    fewer programs, 8 blocks a program and a short last one."""
    monkeypatch.setattr(FN, "TARGET_PROGRAMS", target_programs)
    _, _, iters, p = FN._blocks(9000, 3)
    assert (iters, p) == ((1, 71) if target_programs > 8 else (8, 9))
    for name, (a, b) in run_both((1, 3, 90, 100), torch.float64, True, True, True).items():
        assert rel(a, b) < 1e-12, name


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_mode_equals_pytorch(channels_last):
    ref, fused = pair(24)
    ref.eval(), fused.eval()
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(2, 24, 5, 6, generator=g, dtype=torch.float64), torch.randn(2, 24, 5, 6, dtype=torch.float64)
    if channels_last:
        x, r = x.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel(fused.forward_act(x, r), reference(ref, x, r, True)) < 1e-14
        assert rel(fused(x), ref(x)) < 1e-14
    assert torch.equal(fused.running_mean, ref.running_mean) and fused.num_batches_tracked.item() == 0
    # gradients in evaluation mode (rare): PyTorch's kernels run, so they are PyTorch's
    xx = x.clone().requires_grad_()
    (gf,) = torch.autograd.grad(fused.forward_act(xx).sum(), xx)
    (gr,) = torch.autograd.grad(torch.relu(ref(xx)).sum(), xx)
    assert torch.equal(gf, gr)


def test_cumulative_average_momentum_none():
    ref, fused = pair(5, momentum=None)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
        fused(x), ref(x)
    assert rel(fused.running_mean, ref.running_mean) < 1e-14 and rel(fused.running_var, ref.running_var) < 1e-14
    assert fused.num_batches_tracked.item() == 3


def test_pytorch_takes_over_where_the_kernels_do_not_apply(monkeypatch):
    ref, fused = pair(4, torch.float32)
    x = torch.randn(2, 4, 6, 6)
    r = torch.randn(2, 4, 6, 6)
    assert fused.fusable(x, r)
    assert not fused.fusable(x[..., ::2], None)  # neither NCHW- nor NHWC-contiguous
    assert not fused.fusable(x, r.double())  # a residual of another dtype
    assert not fused.fusable(x, r.contiguous(memory_format=torch.channels_last))  # ... or layout
    assert not fused.fusable(x.to(torch.int32), None)
    ref_view, fused_view = pair(4, torch.float32)  # a strided view runs the kernels on a dense copy
    view = x[..., ::2]
    assert rel(fused_view.forward_act(view, r[..., ::2]), reference(ref_view, view, r[..., ::2], True)) < 1e-6
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter
    assert not fused.fusable(x, r)
    assert torch.equal(fused.forward_act(x, r), reference(ref, x, r, True))  # PyTorch's values, bit for bit
    assert torch.equal(fused.running_var, ref.running_var)


def test_compile_traces_pytorchs_batch_norm_in_one_graph():
    """Under torch.compile the fused modules hand over to PyTorch's batch norm (inductor fuses it itself): a whole
    bottleneck traces as one graph (no break at the Triton launches) and gives the plain block's output."""
    from danet.models.resnet import Bottleneck

    torch.manual_seed(0)
    block = Bottleneck(16, 4)
    plain = copy.deepcopy(block)
    assert FN.use_fused_norm(block) == 3
    x = torch.randn(2, 16, 8, 8)
    compiled = torch.compile(block, backend="eager", fullgraph=True)  # dynamo only: fails on any graph break
    assert torch.equal(compiled(x), plain(x))


def test_one_value_per_channel_is_an_error_in_training():
    _, fused = pair(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 3, 1, 1, dtype=torch.float64))


def test_why_unused_and_a_missing_triton(monkeypatch):
    assert FN.why_unused(torch.device("cpu")) is None  # the interpreter runs the kernels here
    assert "compile" in FN.why_unused(torch.device("cpu"), compiled=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in FN.why_unused(torch.device("cpu"))
    monkeypatch.setattr(FN, "triton", None)
    with pytest.raises(DanetError, match="norm=triton needs the triton package"):
        FN.use_fused_norm(nn.BatchNorm2d(3))


def _sync_worker(rank: int, world: int, port: int, out: str, sizes: tuple[int, ...]) -> None:
    """One process of a synchronised fused batch norm: its share of the batch, float64, NHWC, residual + ReLU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, r, dy = sync_data(sum(sizes))
        lo = sum(sizes[:rank])
        xs, rs = (t[lo : lo + sizes[rank]].clone().requires_grad_() for t in (x, r))
        _, bn = pair(6)
        assert FN.sync_fused_norm(nn.Sequential(bn)) == 1
        y = bn.forward_act(xs, rs)
        grads = torch.autograd.grad(y, (xs, rs, bn.weight, bn.bias), dy[lo : lo + sizes[rank]])
        torch.save({"y": y, "grads": grads, "mean": bn.running_mean, "var": bn.running_var}, Path(out, f"{rank}.pt"))
        os.environ["TRITON_INTERPRET"] = "0"  # now the kernels cannot run here: an error, not unsynchronised statistics
        try:
            bn.forward_act(xs)
            raise AssertionError("expected an error")
        except DanetError as e:
            assert "would not be synchronised" in str(e)
    finally:
        dist.destroy_process_group()


def sync_data(n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return tuple(
        (torch.randn(n, 6, 5, 4, generator=g, dtype=torch.float64) + 0.3).contiguous(memory_format=torch.channels_last)
        for _ in range(3)
    )


def test_synchronised_over_two_processes(tmp_path):
    """Two gloo processes holding 3 and 1 images: outputs and input gradients those of one batch norm over all 4,
    dweight / dbias each process's share (DDP averages them), the same running statistics on both."""
    sizes = (3, 1)
    spawn_two(str(tmp_path), sizes, timeout=120, worker=_sync_worker)
    got = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    x, r, dy = sync_data(sum(sizes))
    ref, _ = pair(6)
    xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = reference(ref, xx, rr, True)
    want = torch.autograd.grad(y, (xx, rr, ref.weight, ref.bias), dy)
    assert rel(torch.cat([g["y"] for g in got]), y) < 1e-13
    for i, name in enumerate(("dx", "dresidual", "dweight", "dbias")):
        ours = torch.cat([g["grads"][i] for g in got]) if i < 2 else got[0]["grads"][i] + got[1]["grads"][i]
        assert rel(ours, want[i]) < 1e-13, name
    assert rel(got[0]["grads"][2], want[2]) > 1e-3  # each process's own share, not the sum
    for g in got:
        assert rel(g["mean"], ref.running_mean) < 1e-13 and rel(g["var"], ref.running_var) < 1e-13


def _train_worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    """One rank of `danet train` with norm=triton; counts the merges of statistics over the processes."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    from danet.config import from_dict
    from danet.engine.train import train

    merges, real = [], FN._merge_processes
    FN._merge_processes = lambda *a: merges.append(1) or real(*a)
    summary = train(from_dict(cfg))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"merges": len(merges), "metrics": summary["metrics"]}))


def test_danet_train_on_two_processes_synchronises_the_fused_norms(tmp_path):
    """`danet train` under two gloo processes with norm=triton (Triton's interpreter): every training forward of
    every batch norm merges the statistics of both processes, and both report the same metrics."""
    from danet.config import RunConfig, apply_overrides, to_dict
    from danet.data import ensure_synthetic
    from test_engine_ddp import SETS

    root = ensure_synthetic(tmp_path / "data")
    cfg = apply_overrides(
        RunConfig(preset="danet_tiny_synthetic", data_root=str(root), work_dir=str(tmp_path / "work")),
        [*SETS, "norm=triton"],
    )
    spawn_two(to_dict(cfg), str(tmp_path), timeout=240, worker=_train_worker)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    n_bn = sum(type(m) is nn.BatchNorm2d for m in danet.create_model("danet_tiny_synthetic").modules())
    assert r0["merges"] == r1["merges"] == 2 * n_bn  # two iterations
    assert r0["metrics"] == r1["metrics"]


def test_torchrun_wrapping_synchronises_fused_norms_instead_of_converting(monkeypatch):
    """`danet train` under torchrun on GPUs: PyTorch's batch norms become nn.SyncBatchNorm, fused ones stay fused and
    synchronise themselves (DDP stubbed: no process group here)."""
    from danet.engine import distributed as D

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda model, device_ids=None: model)
    info = D.DistInfo(rank=0, world=2, local_rank=0, device=torch.device("cuda", 0))
    plain = D.wrap_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), info)
    assert type(plain[1]) is nn.SyncBatchNorm
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    FN.use_fused_norm(model)
    wrapped = D.wrap_model(model, info)
    assert type(wrapped[1]) is FN.FusedBatchNorm2d and wrapped[1].sync_group is dist.group.WORLD
    FN.use_fused_norm(wrapped, False)
    assert type(wrapped[1]) is nn.BatchNorm2d and "sync_group" not in vars(wrapped[1])


def narrow_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = danet.create_model(
        "danet_r50-d8_ade20k", num_classes=5, base_channels=4, stem_channels=8, head_channels=16, key_channels=4,
        aux_channels=16,
    ).double()  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gamma"):
                m.gamma.fill_(0.5)  # a fresh init's 0 would leave the attention projections without gradients
    fused = copy.deepcopy(model)
    assert FN.use_fused_norm(fused) == 60  # stem 3 + bottlenecks 16 x 3 + downsamples 4 + heads 5
    return model, fused


def test_whole_model_logits_gradients_and_keys_in_float64():
    model, fused = narrow_pair()
    assert fused.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    outs = []
    for m in (model, fused):
        torch.manual_seed(1)  # the same dropout masks
        out = m.train()(x, resize=False)
        sum((v * v).sum() for v in out.values()).backward()
        outs.append(out)
    for k in outs[0]:
        assert rel(outs[1][k], outs[0][k]) < 1e-10, k
    for (name, p), q in zip(model.named_parameters(), fused.parameters(), strict=True):
        assert rel(q.grad, p.grad) < 1e-9, name
    for (name, b), c in zip(model.named_buffers(), fused.buffers(), strict=True):
        assert rel(c, b) < 1e-12 if b.is_floating_point() else torch.equal(c, b), name
    with torch.no_grad():
        assert rel(fused.eval()(x)["out"], model.eval()(x)["out"]) < 1e-12
    assert FN.use_fused_norm(fused, False) == 60 and not any(type(m) is FN.FusedBatchNorm2d for m in fused.modules())


def test_danet_train_with_norm_triton(tmp_path, monkeypatch, capsys):
    """`danet train` with norm=triton runs the kernels in training and validation; its first loss is norm=native's to
    float32 rounding. (Later steps are not compared: in float32 this narrow net drifts ~1 % from float64 in two steps
    with either implementation; `test_whole_model_logits_gradients_and_keys_in_float64` checks the arithmetic.)"""
    from danet.config import RunConfig, apply_overrides
    from danet.data import ensure_synthetic
    from danet.engine import train as T
    from danet.engine.logging import read_log

    root = ensure_synthetic(tmp_path / "data")
    sets = ["schedule.epochs=1", "schedule.iters_per_epoch=2", "schedule.batch_size=2", "data.crop_size=[32,32]",
            "data.num_workers=0", "data.val_limit=1", *NARROW_MODEL_SETS, "device=cpu", "progress=false",
            "log_interval=1"]  # fmt: skip
    calls = {"train": 0, "eval": 0}
    train_apply, eval_apply = FN._FusedBatchNormAct.apply, FN._eval_apply

    def count(kind, fn):
        def wrapped(*args):
            calls[kind] += 1
            return fn(*args)

        return wrapped

    monkeypatch.setattr(FN._FusedBatchNormAct, "apply", count("train", train_apply))
    monkeypatch.setattr(FN, "_eval_apply", count("eval", eval_apply))
    first = {}
    for norm in ("native", "triton"):
        work = tmp_path / norm
        T.train(
            apply_overrides(
                RunConfig(preset="danet_tiny_synthetic", data_root=str(root), work_dir=str(work)),
                [*sets, f"norm={norm}"],
            )  # fmt: skip
        )
        first[norm] = next(r["loss"] for r in read_log(work / "log.jsonl") if "loss" in r)
        assert f"norm: {norm}" in (work / "config.yaml").read_text()
        if norm == "native":
            assert calls == {"train": 0, "eval": 0}
    n_bn = sum(type(m) is nn.BatchNorm2d for m in danet.create_model("danet_tiny_synthetic").modules())
    assert calls == {"train": 2 * n_bn, "eval": n_bn - 1}  # two steps; one validation image (no auxiliary head)
    assert first["triton"] == pytest.approx(first["native"], rel=1e-5)
    err = capsys.readouterr().err  # NOTE: notes go to stderr
    assert "note: norm=triton" not in err  # the interpreter runs the kernels here
    assert err.count("note: without cuda_graphs=true the fused batch norm") == 1  # eager steps: slower on a GPU
    # where the kernels cannot run (here: the CPU without the interpreter), the run says so and keeps PyTorch's
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    T.train(
        apply_overrides(
            RunConfig(preset="danet_tiny_synthetic", data_root=str(root), work_dir=str(tmp_path / "cpu")),
            [*sets, "norm=triton"],
        )  # fmt: skip
    )
    assert "note: norm=triton runs on CUDA only; PyTorch's batch norm runs" in capsys.readouterr().err
    assert calls == {"train": 2 * n_bn, "eval": n_bn - 1}  # no more kernel calls


def test_benchmark_norm_option():
    import danet.benchmark as B
    from danet.benchmark.cli import format_record

    base = dict(preset="danet_tiny_synthetic", mode="train", batch=2, size=(32, 32), warmup=0, iters=1, flops=False)
    native = B.run_case(B.BenchSpec(**base))
    fused = B.run_case(B.BenchSpec(**base, norm="triton"))
    assert fused["norm"] == "triton" and "norm=triton" in format_record(fused)
    assert fused["loss_value"] == pytest.approx(native["loss_value"], rel=1e-5)  # the first step: same weights, batch
    with pytest.raises(DanetError, match="--norm"):
        B.run_case(B.BenchSpec(**base, norm="fast"))
    with pytest.raises(DanetError, match="--norm triton has no effect under compile"):
        B.run_case(B.BenchSpec(**base, norm="triton", compile="default"))
