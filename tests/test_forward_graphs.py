"""`danet test` / `predict --cuda-graphs`: the evaluation forward replayed as a CUDA graph per input layout
(engine/graphed.py: GraphedForward).

There is no GPU here, so `ReplayGraphs` stands in for CUDA's capture and replay with what matters for the wrapper:
a capture computes nothing (its output is garbage until a replay), a replay writes into the captured output tensors
and reads only the captured input buffer, and the captured forward may not make the host wait for the device
(`NoHostSync`, as for the training step's capture).
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from danet.cli import main
from danet.engine import graphed
from danet.engine.graphed import GraphedForward
from danet.engine.inference import align_corners, autocast, forward_logits, slide_logits
from danet.models.danet import unwrap
from test_engine_graphed import NoHostSync
from test_faults_common import tiny_model


class ReplayGraphs:
    """CPU stand-in for `graphed.CudaGraphs` in evaluation (see the module docstring)."""

    made: list[ReplayGraphs] = []

    def __init__(self, device: torch.device) -> None:
        self.captures = self.replays = self.warmups = 0
        ReplayGraphs.made.append(self)

    @staticmethod
    def why_unused(device: torch.device, world: int) -> str | None:
        return None

    @contextlib.contextmanager
    def warmup(self):
        self.warmups += 1
        yield

    @staticmethod
    def new_pool():
        return "pool"

    def capture(self, fn, params, pool=None):
        assert pool == "pool"  # the forward's graphs share one pool
        self.captures += 1
        with NoHostSync():
            out = fn()
        for v in out.values():
            v.fill_(float("nan"))  # a capture computes nothing

        def replay():
            self.replays += 1
            for k, v in fn().items():
                out[k].copy_(v)

        return replay, out


def images(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


@torch.inference_mode()
def test_each_layout_is_captured_at_its_second_forward_and_replays_the_eager_logits():
    model = tiny_model()
    net = GraphedForward(model, ReplayGraphs(torch.device("cpu")))
    backend = net.backend
    a1, a2, a3, b1, a4 = images((1, 3, 48, 64), (1, 3, 48, 64), (1, 3, 48, 64), (2, 3, 32, 32), (1, 3, 48, 64))
    outs = []
    for x in (a1, a2, a3, b1, a4):
        out = net(x)["out"]
        assert torch.equal(out, model(x)["out"])
        outs.append(out)
    assert backend.captures == 1 and backend.replays == 3  # a2 captured (then replayed), a3 and a4 replayed
    assert backend.warmups == 2  # a1 and b1: each layout's first forward runs eagerly
    assert torch.equal(outs[2], model(a3)["out"])  # a copy: a4's replay did not overwrite what a3 returned
    assert not torch.equal(outs[2], outs[4])


@torch.inference_mode()
def test_resize_autocast_and_memory_format_are_layouts_of_their_own():
    model = tiny_model()
    net = GraphedForward(model, ReplayGraphs(torch.device("cpu")))
    (x,) = images((1, 3, 32, 48))
    cl = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        assert torch.equal(net(x, resize=False)["out"], model(x, resize=False)["out"])
        assert torch.equal(net(x)["out"], model(x)["out"])
        assert torch.equal(net(cl)["out"], model(cl)["out"])
        with autocast(x.device, "bf16"):
            assert torch.equal(net(x)["out"], model(x)["out"])
    assert net.backend.captures == 4 and len(net.graphs) == 4


def test_grad_modes_train_mode_and_a_moved_model_are_not_replayed_from_old_graphs():
    model = tiny_model()
    net = GraphedForward(model, ReplayGraphs(torch.device("cpu")))
    (x,) = images((1, 3, 32, 48))
    for _ in range(2):
        with torch.inference_mode():
            net(x)
    assert net.backend.captures == 1
    with torch.no_grad():  # a graph captured under inference mode would write into inference tensors here
        assert torch.equal(net(x)["out"], model(x)["out"])
    net.train()
    torch.manual_seed(0)
    a = net(x)["out"]
    torch.manual_seed(0)
    assert torch.equal(a, model(x)["out"])  # training mode (dropout): its own layout, run eagerly first
    assert net.backend.warmups == 3 and net.backend.replays == 1  # inference, no_grad, train: three first forwards
    net.eval().double()  # new parameter tensors: the graphs that read the old ones are dropped
    assert not net.graphs and next(model.parameters()).dtype == torch.float64
    with torch.inference_mode():
        assert torch.equal(net(x.double())["out"], model(x.double())["out"])
    assert net.backend.captures == 1


def test_the_wrapper_keeps_the_models_mode_through_an_evaluation():
    model = tiny_model().eval()
    net = GraphedForward(model, ReplayGraphs(torch.device("cpu")))
    was_training = net.training  # what evaluate() does with the model it is given
    net.eval()
    net.train(was_training)
    assert not model.training  # an evaluated model stays in eval mode (a new Module is in training mode)
    assert GraphedForward(tiny_model().train(), ReplayGraphs(torch.device("cpu"))).training


@torch.inference_mode()
def test_layouts_beyond_max_graphs_run_eagerly():
    model = tiny_model()
    net = GraphedForward(model, ReplayGraphs(torch.device("cpu")), max_graphs=1)
    a, b = images((1, 3, 32, 32), (1, 3, 32, 48))
    for x in (a, a, b, b, b, a):
        assert torch.equal(net(x)["out"], model(x)["out"])
    assert net.backend.captures == 1 and net.backend.replays == 2
    assert net.backend.warmups == 1  # a's first forward; b's all run as usual (no graph slot left for it)


@torch.inference_mode()
def test_the_wrapper_serves_evaluation_helpers_like_the_model():
    model = tiny_model()
    net = GraphedForward(model, ReplayGraphs(torch.device("cpu")))
    assert unwrap(net) is model and net.num_classes == model.num_classes
    assert align_corners(net) == align_corners(model)
    (x,) = images((1, 3, 80, 96))
    for _ in range(2):  # 9 windows of 48x64, stacked 4, 4 and 1 (two layouts)
        assert torch.equal(
            slide_logits(net, x, (48, 64), (16, 16), window_batch=4),
            slide_logits(model, x, (48, 64), (16, 16), window_batch=4),
        )
    assert torch.equal(forward_logits(net, x), forward_logits(model, x))
    assert net.backend.captures == 2


def test_danet_test_with_cuda_graphs_gives_the_same_metrics(checkpoint, tmp_path, monkeypatch, capsys):
    argv = ["test", "danet_tiny_synthetic", "--checkpoint", str(checkpoint), "--limit", "6", "--no-progress",
            "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--json", str(tmp_path / "eager.json")]) == 0
    assert main([*argv, "--cuda-graphs", "--json", str(tmp_path / "cpu.json")]) == 0  # no CUDA here: eager, a note
    assert "note: --cuda-graphs needs a CUDA device; eager forwards run" in capsys.readouterr().err
    monkeypatch.setattr(graphed, "FORWARD_BACKEND", ReplayGraphs)
    ReplayGraphs.made.clear()
    assert main([*argv, "--cuda-graphs", "--json", str(tmp_path / "graphs.json")]) == 0
    eager, cpu, graphs = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("eager", "cpu", "graphs"))
    assert ReplayGraphs.made[0].replays >= 4  # the synthetic val images share one size
    assert eager["settings"]["cuda_graphs"] is False and cpu["settings"]["cuda_graphs"] is False
    assert graphs["settings"]["cuda_graphs"] is True
    for key in ("mIoU", "mAcc", "aAcc", "IoU"):
        assert graphs[key] == eager[key] == cpu[key]
    # TTA: each scale a layout of its own, its flipped view the same layout
    tta = [*argv, "--tta", "--limit", "3"]
    assert main([*tta, "--cuda-graphs", "--json", str(tmp_path / "tta_graphs.json")]) == 0
    assert main([*tta, "--json", str(tmp_path / "tta_eager.json")]) == 0
    tta_eager, tta_graphs = (json.loads((tmp_path / f"tta_{n}.json").read_text()) for n in ("eager", "graphs"))
    scales = tta_graphs["settings"]["scales"]
    assert len(scales) > 1 and tta_graphs["settings"]["flip"] and ReplayGraphs.made[-1].captures == len(scales)
    assert ReplayGraphs.made[-1].replays == len(scales) * (2 * 3 - 1)  # 2 views x 3 images, less the first (eager)
    assert tta_graphs["mIoU"] == tta_eager["mIoU"] and tta_graphs["IoU"] == tta_eager["IoU"]


def test_danet_predict_with_cuda_graphs_writes_the_same_labels(checkpoint, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    argv = ["predict", "--checkpoint", str(checkpoint), str(tmp_path / "im*.png"), "--no-progress", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "eager")]) == 0
    monkeypatch.setattr(graphed, "FORWARD_BACKEND", ReplayGraphs)
    ReplayGraphs.made.clear()
    assert main([*argv, "--out", str(tmp_path / "graphs"), "--cuda-graphs"]) == 0
    assert ReplayGraphs.made[0].replays == 2  # three images of one size: eager, captured, replayed
    for i in range(3):
        eager = np.asarray(Image.open(tmp_path / "eager" / f"im{i}.png"))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "graphs" / f"im{i}.png")), eager)


def test_forward_graphs_refuse_nothing_on_the_cpu_but_say_so(capsys):
    model = tiny_model()
    assert graphed.with_forward_graphs(model, torch.device("cpu")) is model
    assert "eager forwards run" in capsys.readouterr().err
    with pytest.raises(AttributeError):
        GraphedForward(model, ReplayGraphs(torch.device("cpu"))).no_such_attribute  # noqa: B018
