"""Faults found by a black-box probe of the CLI with bad input: outputs that are links, pipes or devices replaced by
regular files; batch norm asked to train on one value per channel; out-of-memory tracebacks; a training run whose
val labels have no labelled pixel ending "successfully" without best.pth; and smaller ones (unhelpful reasons for
files that are not checkpoints, two classes files, a damaged synthetic cache, options without range checks)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from danet.cli import main
from danet.errors import DanetError
from danet.files import atomic_write_text, replace_target
from test_faults_common import cli_error, digest, tiny_folder_dataset

PRESET = "danet_tiny_synthetic"


# ---- outputs: links are written through, pipes and devices refused --------------------------------------------------
def test_a_device_is_refused_as_an_output_before_anything_is_written():
    with pytest.raises(DanetError, match="/dev/null is a character device, not a file"):
        replace_target("/dev/null")  # NOTE: only looked at: as root, os.replace would swap the device for a file


def test_stdout_redirected_to_a_file_is_refused_as_an_output_before_the_work(tmp_path, checkpoint):
    """`danet test --json /dev/stdout > log.txt`: /dev/stdout leads to log.txt, which the atomic write would replace
    (the table printed before lost); refused in one line before the evaluation, log.txt keeps what was printed. Any
    path through /proc/<pid>/fd or /dev/fd is refused so; a file of another name is not."""
    import subprocess
    import sys

    for path in ("/dev/stdout", "/dev/stderr", "/proc/self/fd/1", "/dev/fd/2"):
        with pytest.raises(DanetError, match="is a stream of this process .*give a file path"):
            replace_target(path)
    assert replace_target(tmp_path / "fd" / "1.json") == tmp_path / "fd" / "1.json"
    log = tmp_path / "log.txt"
    log.write_text("before\n")
    argv = ["test", PRESET, "--checkpoint", str(checkpoint), "--json", "/dev/stdout"]
    code = f"import sys; from danet.cli import main; print('printed', flush=True); sys.exit(main({argv!r}))"
    with open(log, "a") as out:
        run = subprocess.run([sys.executable, "-c", code], stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
    assert run.returncode == 2 and log.read_text() == "before\nprinted\n"
    assert run.stderr.strip().splitlines() == [
        "danet test: error: /dev/stdout is a stream of this process (as /dev/stdout, /dev/fd/N), not a file: "
        "outputs are written whole (a temporary file renamed into place), which would replace a file the stream is "
        "redirected to and cannot go through a pipe; give a file path"
    ]


def test_json_dash_and_train_norm_folded_are_refused_in_one_line(tmp_path, checkpoint, capsys, monkeypatch):
    """`--json -` (danet test, danet benchmark) would have written a file named '-' (and '-_confusion.png'): refused
    before the work; `danet train --set norm=folded` says that folded is for inference."""
    monkeypatch.chdir(tmp_path)
    for argv in (["test", PRESET, "--checkpoint", checkpoint, "--json", "-"],
                 ["benchmark", PRESET, "--device", "cpu", "--size", "32", "32", "--json", "-"]):  # fmt: skip
        assert "--json - would write a file named '-'; give a file name" in cli_error(capsys, *argv)
    assert list(tmp_path.iterdir()) == []
    err = cli_error(capsys, "train", PRESET, "--data-root", tmp_path, "--set", "norm=folded")
    assert "got 'folded' (folded is for inference: danet test / predict --norm folded)" in err


def test_outputs_through_a_link_update_its_file_and_keep_the_link(tmp_path):
    """A --json or picture path that is a link writes its file; a checkpoint replaces the link itself (a link in a work
    dir may point to the run's own input, such as a downloaded init_checkpoint, which must keep its bytes)."""
    from danet.checkpoints import atomic_torch_save
    from danet.viz import save_picture

    for name, write, through in (
        ("a.json", lambda p: atomic_write_text(p, "new\n"), True),
        ("a.png", lambda p: save_picture(Image.new("RGB", (4, 4), "red"), p), True),
        ("a.pth", lambda p: atomic_torch_save({"x": 1}, p), False),
    ):
        real, link = tmp_path / f"real_{name}", tmp_path / f"link_{name}"
        real.write_bytes(b"old")
        link.symlink_to(real.name)
        write(link)
        assert link.is_symlink() == through and (real.read_bytes() != b"old") == through, name
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(name)) == [f"link_{name}", f"real_{name}"]


def test_a_named_pipe_as_an_output_is_refused_and_stays_a_pipe(tmp_path, capsys):
    from danet.checkpoints import atomic_torch_save
    from danet.viz import save_picture

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    for write in (
        lambda: atomic_write_text(fifo, "x"),
        lambda: save_picture(Image.new("RGB", (4, 4)), fifo),
        lambda: atomic_torch_save({"x": 1}, fifo),
    ):
        with pytest.raises(DanetError, match="is a named pipe, not a file"):
            write()
    line = cli_error(capsys, "benchmark", PRESET, "--infer", "--iters", "1", "--json", str(fifo))  # before the timing
    assert "is a named pipe" in line and "give a file path" in line
    assert fifo.is_fifo() and os.listdir(tmp_path) == ["out.fifo"]


def test_a_failed_picture_names_its_file_not_the_temporary_one(tmp_path, monkeypatch):
    import errno

    from danet.viz import save_picture

    def full_disk(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError) as e:
        save_picture(Image.new("RGB", (4, 4)), tmp_path / "p.png")
    assert e.value.filename == str(tmp_path / "p.png") and not list(tmp_path.iterdir())


# ---- batch norm on one value per channel ----------------------------------------------------------------------------
def test_one_image_of_a_crop_as_small_as_the_stride_is_refused_before_training(tmp_path, capsys):
    work = tmp_path / "w"
    argv = ["train", PRESET, "--work-dir", str(work), "--set", "schedule.batch_size=1", "--set", "progress=false"]
    line = cli_error(capsys, *argv, "--set", "data.crop_size=[8,8]")
    assert "1 image(s) of 8x8 per process leave one value per channel" in line and "schedule.batch_size" in line
    assert not work.exists()


def test_benchmark_refuses_to_train_on_one_value_per_channel_and_counts_flops_of_tiny_sizes(capsys):
    line = cli_error(capsys, "benchmark", PRESET, "--train", "--size", "8", "8", "--batch", "1", "--iters", "1")
    assert "1 image(s) of 8x8 leave one value per channel" in line and "--batch 2" in line
    # batch 2 trains; the FLOPs (counted on one image) no longer train batch norm on one value either
    assert main(["benchmark", PRESET, "--size", "1", "1", "--iters", "1", "--warmup", "0", "--threads", "1"]) == 0
    assert main(["benchmark", PRESET, "--train", "--size", "9", "9", "--batch", "1", "--iters", "1", "--warmup", "0",
                 "--threads", "1"]) == 0  # fmt: skip


def test_flop_counting_leaves_the_running_statistics_alone():
    import torch

    from danet.benchmark import count_flops
    from test_faults_common import tiny_model

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert count_flops(model, torch.randn(2, 3, 32, 32), train=True) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" in k)


# ---- sizes and memory ------------------------------------------------------------------------------------------------
def test_run_sizes_past_the_checkpoint_bound_are_refused(tmp_path, capsys):
    for key in ("data.crop_size", "data.base_size"):
        line = cli_error(capsys, "train", PRESET, "--work-dir", str(tmp_path / "w"), "--set", f"{key}=[30000,30000]")
        assert f"setting '{key}' allows sizes up to 16384 pixels" in line


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried ..."),
        RuntimeError("Caught error in DataLoader worker process 0.\nTraceback ...\ncv2.error: Insufficient memory"),
    ],
)
def test_out_of_memory_is_one_line(error, monkeypatch, capsys):
    import danet.benchmark.cli as B

    def run_case(spec):
        raise error

    monkeypatch.setattr(B, "run_case", run_case)
    line = cli_error(capsys, "benchmark", PRESET, "--infer", "--iters", "1")
    assert line.startswith("danet benchmark: error: out of memory") and "smaller images or batches" in line


def test_other_errors_keep_their_traceback(monkeypatch):
    import danet.benchmark.cli as B

    def run_case(spec):
        raise RuntimeError("a bug")

    monkeypatch.setattr(B, "run_case", run_case)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["benchmark", PRESET, "--infer", "--iters", "1"])


# ---- training: val labels with no labelled pixel ---------------------------------------------------------------------
def test_a_run_whose_val_labels_are_all_ignore_stops_with_one_line(tmp_path, capsys):
    root = tiny_folder_dataset(tmp_path)
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(root / "masks" / "validation" / "a.png")
    work = tmp_path / "runs"
    sets = {"schedule.epochs": 1, "schedule.batch_size": 1, "data.crop_size": "[32,32]", "progress": "false",
            "data.num_workers": 0, "model.base_channels": 8, "model.stem_channels": 8,
            "model.head_channels": 16}  # fmt: skip
    argv = ["train", PRESET, "--data-root", str(root), "--work-dir", str(work)]
    line = cli_error(capsys, *argv, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert "the label of split 'validation' has no labelled pixel (all ignore 255)" in line
    assert "its training is in last.pth" in line
    assert (work / "last.pth").is_file() and not (work / "best.pth").exists()


# ---- smaller ones ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "is an empty file (0 bytes)"),
        (b"weights: none\n", "(it is text)"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "(it is a PNG image)"),
        (b"<!DOCTYPE html><html>", "(it is an HTML or XML page"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(content, reason, tmp_path, capsys):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    line = cli_error(capsys, "convert", str(path), str(tmp_path / "out.pth"))
    assert reason in line and not (tmp_path / "out.pth").exists()


def test_two_classes_files_are_refused(tmp_path, capsys):
    root = tiny_folder_dataset(tmp_path)
    (root / "classes.txt").write_text("background\nother\n")
    line = cli_error(capsys, "data", "check", PRESET, "--dataset", "folder", "--data-root", str(root))
    assert "holds classes.yaml and classes.txt: keep one classes file" in line


def test_a_classes_entry_without_a_name_says_which_key_is_missing(tmp_path, capsys):
    root = tiny_folder_dataset(tmp_path)
    (root / "classes.yaml").write_text("- {name: background}\n- {color: [1, 2, 3]}\n")
    line = cli_error(capsys, "data", "check", PRESET, "--dataset", "folder", "--data-root", str(root))
    assert "is malformed (an entry has no 'name' key)" in line


def test_options_without_a_meaning_below_one_are_refused(tmp_path, capsys, checkpoint):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    for value in ("0", "-5"):
        line = cli_error(capsys, "predict", "--checkpoint", str(checkpoint), str(image), "--out", str(tmp_path / "o"),
                         "--max-pixels", value)  # fmt: skip
        assert "--max-pixels must be at least 1" in line
        line = cli_error(capsys, "data", "check", PRESET, "--data-root", str(tmp_path), "--jobs", value)
        assert "--jobs must be at least 1" in line
    assert not (tmp_path / "o").exists()


def test_debug_is_taken_after_a_data_action_too(tmp_path):
    with pytest.raises(DanetError, match="--jobs must be at least 1"):  # --debug: raised, not one line
        main(["data", "check", PRESET, "--data-root", str(tmp_path), "--jobs", "0", "--debug"])


def test_a_damaged_synthetic_cache_is_reported(tmp_path, capsys):
    from danet.data import ensure_synthetic

    root = ensure_synthetic(tmp_path)
    kept = digest(root / "synthetic.json")
    for p in list((root / "masks" / "validation").iterdir())[:3]:
        p.unlink()
    line = cli_error(capsys, "data", "synthetic", "--root", str(tmp_path))
    assert "is damaged (3 of the 50 masks of validation are missing)" in line and "delete that folder" in line
    shutil.rmtree(root)
    assert ensure_synthetic(tmp_path) == root and digest(root / "synthetic.json") == kept
    assert len(list(Path(root, "masks", "validation").iterdir())) == 50
