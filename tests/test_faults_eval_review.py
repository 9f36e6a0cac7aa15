"""Faults found by an exploratory review of `danet test`, `danet benchmark` and the Python API: outputs that replaced
the checkpoint or a dataset image, options taken and ignored, tracebacks for NaN scales and bad benchmark options,
NaN in a JSON file, and the settings a metrics file records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import danet
from danet.cli import main
from danet.errors import DanetError
from test_faults_common import cli_error, digest, tiny_folder_dataset

PRESET = "danet_tiny_synthetic"


@pytest.fixture
def data(tmp_path) -> Path:
    (tmp_path / "data").mkdir()
    return tiny_folder_dataset(tmp_path / "data")


def test(checkpoint: Path, data: Path, *extra) -> list:
    return ["test", PRESET, "--checkpoint", checkpoint, "--data-root", data, "--no-progress", *extra]


test.__test__ = False  # a helper, not a test


def test_outputs_that_would_replace_an_input_or_each_other_are_refused(checkpoint, data, tmp_path, capsys):
    mine = tmp_path / "mine.pth"
    mine.write_bytes(checkpoint.read_bytes())
    image = data / "images" / "validation" / "a.png"
    before = {p: digest(p) for p in (mine, image)}
    os.link(mine, tmp_path / "hard.pth")
    cases = [
        (["--json", mine], "--json would write", "the checkpoint being tested"),
        (["--json", tmp_path / "hard.pth"], "--json would write", "the checkpoint being tested"),
        (["--plot", image], "--plot would write", "a file of the dataset"),
        (["--json", tmp_path / "x.json", "--plot", tmp_path / "x_confusion.png"], "would both write", "x_confusion"),
    ]
    cases += [
        (["--json", data / "classes.yaml"], "--json would write", "inside the dataset folder"),  # not a split's file
        (["--plot", data / "images" / "training" / "a.png"], "--plot would write", "inside the dataset folder"),
    ]
    for extra, says, what in cases:
        line = cli_error(capsys, *test(mine, data, *extra))
        assert says in line and what in line, line
    assert {p: digest(p) for p in before} == before and not (tmp_path / "x.json").exists()
    (tmp_path / "folder.json").mkdir()
    line = cli_error(capsys, *test(mine, data, "--json", tmp_path / "folder.json"))
    assert "--json" in line and "is a folder; give a file name" in line
    assert main([*map(str, test(mine, data, "--json", tmp_path / "m.json"))]) == 0  # beside the checkpoint: fine


@pytest.mark.parametrize(
    ("extra", "says"),
    [(["--scales", "nan"], "--scales must be factors in (0, 8]"), (["--scales", "inf"], "got [inf]"),
     (["--crop", "32", "32"], "--crop and --stride set the sliding window, but this test runs whole"),
     (["--stride", "8", "8"], "add --mode slide"), (["--no-flip"], "--no-flip drops the flipped views of --tta")],
)  # fmt: skip
def test_options_that_would_fail_or_do_nothing_are_one_line(checkpoint, data, capsys, extra, says):
    assert says in cli_error(capsys, *test(checkpoint, data, *extra))


def test_the_metrics_file_records_the_stride_and_the_batch_norm_that_ran(checkpoint, data, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a CPU machine: --norm triton falls back
    out = tmp_path / "m.json"
    argv = test(checkpoint, data, "--mode", "slide", "--crop", "32", "32", "--stride", "10", "12", "--norm", "triton")
    assert main([*map(str, argv), "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["stride"] == [10, 12] and settings["crop"] == [32, 32] and settings["norm"] == "native"


@pytest.mark.parametrize(
    ("extra", "says"),
    [(["--threads", "-1"], "--threads must be at least 1"), (["--threads", "0"], "--threads must be at least 1"),
     (["--compile", "bogus"], "--compile 'bogus': give one of default"),
     (["--stride", "8", "8"], "--stride sets the sliding windows of --slide"),
     (["--window-batch", "2"], "--window-batch sets the sliding windows"),
     (["--loss", "fused"], "--loss fused times the training loss; add --train")],
)  # fmt: skip
def test_benchmark_options_that_would_fail_or_do_nothing(capsys, extra, says):
    assert says in cli_error(capsys, "benchmark", PRESET, "--infer", "--size", "32", "32", "--no-flops", *extra)
    slide = ["benchmark", PRESET, "--slide", "16", "16", "--size", "32", "32", "--no-flops", "--loss", "fused"]
    assert "--loss fused times the training loss" in cli_error(capsys, *slide)  # --slide times inference only


def test_benchmark_checks_every_case_before_timing_any(capsys, monkeypatch):
    """Without --train/--infer both cases run: a setting the train case cannot take is refused before the inference
    case is timed (it used to fail after it, and its figures were lost)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["benchmark", PRESET, "--size", "32", "32", "--no-flops", "--loss", "triton", "--device", "cpu"]
    assert refused_before_timing(capsys, argv, "--loss triton runs on CUDA only")


def refused_before_timing(capsys, argv: list, says: str) -> bool:
    """`danet ARGV` exits 2 with `says` on stderr and printed no timing (no case ran)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc == 2 and says in err and "img/s" not in out


def test_benchmark_json_holds_null_not_nan_and_a_folder_is_refused_first(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["benchmark", PRESET, "--infer", "--size", "32", "32", "--iters", "1", "--warmup", "0", "--no-flops"]
    assert main([*argv, "--json", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)[0]["gflop_per_img"] is None
    (tmp_path / "d").mkdir()
    assert refused_before_timing(capsys, [*argv, "--json", tmp_path / "d"], f"--json {tmp_path / 'd'} is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "r.json"]  # no stray temporary file


def test_predictor_refuses_what_it_would_ignore(checkpoint):
    with pytest.raises(DanetError, match="unknown device None"):
        danet.Predictor(checkpoint, device=None)
    predictor = danet.Predictor(checkpoint)
    with pytest.raises(DanetError, match="merge='logits' merges the views of tta=True"):
        predictor(np.zeros((16, 16, 3), np.uint8), merge="logits")


@pytest.mark.parametrize("field", ["aux", "pam_bias"])
def test_create_model_refuses_a_string_for_a_switch(field):
    with pytest.raises(DanetError, match=f"{field}"):
        danet.create_model(PRESET, **{field: "false"})


def test_the_metrics_file_records_the_output_stride_that_ran(data, tmp_path):
    """A D16 file tested under a D8 preset runs at the preset's stride (the weights do not depend on it; load_model
    warns), and the metrics file records the stride that ran."""
    from test_faults_common import saved_tiny_checkpoint

    ck = saved_tiny_checkpoint(tmp_path, "d16.pth", output_stride=16)
    out = tmp_path / "m.json"
    with pytest.warns(UserWarning, match="saved with output_stride=16; running it at output_stride=8"):
        assert main([*map(str, test(ck, data)), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["output_stride"] == 8


def test_a_run_s_own_checkpoint_keeps_its_output_stride_under_its_own_preset(data, tmp_path):
    """A `danet train` run with model.output_stride=16 of a preset of stride 8: naming that preset (danet test needs
    one; predict, create_model and Predictor take one) ran the file at 8 with 'running it at output_stride=8 as
    requested', though nothing was asked: the run's stride, as its sizes. Another preset, or output_stride=, asks."""
    import warnings

    from danet.checkpoints import save_checkpoint
    from danet.config import RunConfig, to_dict
    from danet.engine.predict import Predictor
    from test_faults_common import tiny_model

    cfg = RunConfig(preset=PRESET, work_dir=str(tmp_path))
    cfg.model = {"output_stride": 16}
    ck = tmp_path / "last.pth"
    save_checkpoint(ck, tiny_model(output_stride=16), PRESET, extra_meta={"config": to_dict(cfg.resolve())})
    out = tmp_path / "m.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "running it at output_stride=8" warning
        assert main([*map(str, test(ck, data)), "--json", str(out)]) == 0
        assert json.loads(out.read_text())["settings"]["output_stride"] == 16
        assert danet.create_model(PRESET, checkpoint=ck).cfg.output_stride == 16
        assert Predictor(ck, preset_name=PRESET).model.cfg.output_stride == 16
    with pytest.warns(UserWarning, match="saved with output_stride=16; running it at output_stride=8 as requested"):
        assert danet.create_model(PRESET, checkpoint=ck, output_stride=8).cfg.output_stride == 8  # asked for
