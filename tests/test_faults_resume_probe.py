"""Faults found by a probe of the training lifecycle: a resume into another run's folder mixing the two runs, a resume
from an earlier epoch_N.pth leaving the abandoned run's later best.pth and epochs, a resume into a new folder
without the run's best.pth, stop_iter at or before the checkpoint training on anyway, a moved work dir's config.yaml
resuming another folder, `danet test` not repeating a slide validation, and smaller ones."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from danet.cli import main
from danet.data import ensure_synthetic
from danet.engine.logging import read_log
from danet.engine.run_files import recorded_iter
from danet.errors import DanetError
from test_faults_common import cli_error, digest, interrupt_validation, train_argv

PRESET = "danet_tiny_synthetic"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("data"))


def train(work: Path, data: Path, *extra: str, epochs: int = 3) -> list[str]:
    return train_argv(work, data, *extra, epochs=epochs, schedule__save_interval=1, schedule__eval_interval=1)


def best_is_one_checkpoint(work: Path) -> None:
    """best.pth is the checkpoint of the best mIoU that metrics.json reports."""
    metrics = json.loads((work / "metrics.json").read_text())
    assert recorded_iter(work / "best.pth") == metrics["best_iter"] <= metrics["iter"]


@pytest.fixture(scope="module")
def run_a(data_root, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("a") / "A"
    assert main(train(work, data_root)) == 0
    return work


def test_a_resume_into_another_runs_folder_is_refused(run_a, data_root, tmp_path, capsys):
    other = tmp_path / "B"
    assert main(train(other, data_root, "--set", "seed=7", epochs=1)) == 0
    before = {p.name: digest(p) for p in other.iterdir() if p.is_file()}
    line = cli_error(capsys, "train", "--resume", str(run_a / "epoch_1.pth"), "--work-dir", str(other))
    assert f"{other} holds another run" in line and "its own folder" in line
    assert {p.name: digest(p) for p in other.iterdir() if p.is_file()} == before


def test_a_resume_from_an_earlier_epoch_drops_the_abandoned_later_files(run_a, tmp_path, capsys):
    work = tmp_path / "R"
    shutil.copytree(run_a, work)
    assert recorded_iter(work / "epoch_3.pth") == 6
    argv = ["train", "--resume", str(work / "epoch_1.pth"), "--set", "schedule.lr=0.0001", "--set", "schedule.epochs=2"]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "note: " in err and "the files of this work dir from after it (" in err and "epoch_2.pth, epoch_3.pth" in err
    assert not (work / "epoch_3.pth").exists() and recorded_iter(work / "epoch_2.pth") == 4
    best_is_one_checkpoint(work)
    assert recorded_iter(work / "last.pth") == 4


def test_a_resume_into_a_new_folder_brings_the_runs_best_pth(run_a, tmp_path):
    work = tmp_path / "C"
    assert main(["train", "--resume", str(run_a / "epoch_2.pth"), "--work-dir", str(work)]) == 0
    best_is_one_checkpoint(work)
    assert recorded_iter(work / "last.pth") == 6 and (run_a / "best.pth").is_file()
    # the fork's log starts with the run's records up to the checkpoint (it started empty: its curves and its
    # losses lacked everything before)
    source, fork = read_log(run_a / "log.jsonl"), read_log(work / "log.jsonl")
    before = [r for r in source if r.get("iter", 0) <= 4 and r["type"] in ("train", "val")]
    assert before and [r for r in fork if r.get("iter", 0) <= 4 and r["type"] in ("train", "val")] == before
    assert [r["iter"] for r in fork if r["type"] == "train"] == [r["iter"] for r in source if r["type"] == "train"]


def test_stop_iter_at_or_before_the_checkpoint_is_refused(data_root, tmp_path, capsys):
    work = tmp_path / "S"
    assert main(train(work, data_root, "--set", "stop_iter=3")) == 0
    kept = digest(work / "last.pth")
    for stop in ("3", "2"):
        line = cli_error(capsys, *train(work, data_root, "--set", f"stop_iter={stop}", "--resume"))
        assert f"stop_iter={stop} is not after" in line and "iteration 3" in line
    assert digest(work / "last.pth") == kept
    capsys.readouterr()
    assert main(train(work, data_root, "--set", "stop_iter=6", "--resume")) == 0  # the end: finished, not stopped
    out = capsys.readouterr().out
    assert "done: 6 iterations" in out and "stopped at" not in out


def test_a_moved_work_dirs_config_resumes_that_folder(data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(train(Path("runA"), data_root, "--set", "stop_iter=1")) == 0  # a relative work_dir in config.yaml
    shutil.copytree("runA", "runB")
    kept = digest(tmp_path / "runA" / "last.pth")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["train", "../runB/config.yaml", "--resume"]) == 0
    assert recorded_iter(tmp_path / "runB" / "last.pth") == 6 and digest(tmp_path / "runA" / "last.pth") == kept


def test_danet_test_repeats_a_slide_validation(data_root, tmp_path):
    work = tmp_path / "G"
    assert main(train(work, data_root, "--set", "eval_mode=slide", "--set", "data.base_size=[80,80]", epochs=1)) == 0
    out = tmp_path / "m.json"
    argv = ["test", PRESET, "--checkpoint", str(work / "last.pth"), "--data-root", str(data_root), "--limit", "2"]
    assert main([*argv, "--no-progress", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["settings"]["mode"] == "slide" and got["settings"]["crop"] == [32, 32]
    assert got["mIoU"] == pytest.approx(json.loads((work / "metrics.json").read_text())["mIoU"], abs=1e-9)

    from danet.engine.predict import Predictor

    assert Predictor(work / "last.pth").mode == "slide"  # danet predict segments as the run validated too


def test_a_read_only_image_array_is_segmented_without_a_warning(checkpoint):
    from PIL import Image

    from danet.engine.predict import Predictor

    image = np.asarray(Image.new("RGB", (20, 16), (90, 120, 30)))
    assert not image.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = Predictor(checkpoint)(image)
    assert labels.shape == (16, 20)


def test_predict_says_what_a_bare_state_dict_leaves_out(checkpoint, tmp_path, capsys):
    from PIL import Image

    bare = tmp_path / "bare.pth"
    torch.save(torch.load(checkpoint, weights_only=True)["model"], bare)
    Image.new("RGB", (20, 16)).save(tmp_path / "a.png")
    assert main(["predict", "--checkpoint", str(bare), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 0
    assert "records no preset" in capsys.readouterr().err


# ---- found by a review of the fixes above ---------------------------------------------------------------------------
def test_resume_outputs_decides_what_goes_and_what_comes(tmp_path):
    """Unit: in the checkpoint's own folder the files of later iterations go (and the best restarts where best.pth
    is among them, or missing); a fork brings the source's best.pth where it is from before the checkpoint, and
    refuses a folder holding a run, or a config or log."""
    from danet.checkpoints import save_checkpoint
    from danet.engine.run_files import resume_outputs
    from danet.errors import DanetError
    from test_faults_common import tiny_model

    run = tmp_path / "run"
    model = tiny_model()
    for name, it in (("epoch_1.pth", 2), ("epoch_2.pth", 4), ("epoch_3.pth", 6), ("best.pth", 4), ("last.pth", 6)):
        save_checkpoint(run / name, model, PRESET, extra_meta={"iter": it})
    (run / "metrics.json").write_text(json.dumps({"iter": 6}))
    for picture in ("curves.png", "per_class_iou.png", "confusion.png"):  # metrics.json's (curves: drawn again)
        (run / picture).write_bytes(b"png")
    got = resume_outputs(run, run / "epoch_1.pth", 2, 2)
    assert [p.name for p in got.later] == ["best.pth", "confusion.png", "epoch_2.pth", "epoch_3.pth", "metrics.json",
                                           "per_class_iou.png"]  # fmt: skip
    assert got.best_lost and not got.fork and got.staged
    got = resume_outputs(run, run / "epoch_2.pth", 4, 2)  # best.pth is of iteration 4: kept
    assert [p.name for p in got.later] == ["confusion.png", "epoch_3.pth", "metrics.json", "per_class_iou.png"]
    assert not got.best_lost
    got = resume_outputs(run, run / "last.pth", 6, 2)  # the usual resume: nothing changes
    assert got.later == [] and not got.best_lost and not got.staged
    fork = tmp_path / "fork"
    got = resume_outputs(fork, run / "epoch_3.pth", 6, 2)
    assert got.fork and got.best == run / "best.pth" and not got.best_lost and got.staged
    got = resume_outputs(fork, run / "epoch_1.pth", 2, 2)  # the source's best is from later: none comes
    assert got.best is None and got.best_lost
    fork.mkdir()
    for name in ("log.jsonl", "config.yaml"):
        (fork / name).write_text("x")
        with pytest.raises(DanetError, match="holds another run"):
            resume_outputs(fork, run / "epoch_1.pth", 2, 2)
        (fork / name).unlink()


def test_a_resume_through_a_linked_last_pth_is_its_own_run(run_a, tmp_path):
    work = tmp_path / "L"
    shutil.copytree(run_a, work)
    store = tmp_path / "store"
    store.mkdir()
    (work / "last.pth").rename(store / "last.pth")
    (work / "last.pth").symlink_to(store / "last.pth")
    assert main(["train", "--resume", str(work / "last.pth"), "--set", "schedule.epochs=4"]) == 0
    assert recorded_iter(work / "last.pth") == 8


def test_a_resume_failing_before_its_first_checkpoint_leaves_the_folder_as_it_was(run_a, tmp_path, monkeypatch, capsys):
    import danet.engine.train as T
    from danet.errors import DanetError

    work = tmp_path / "F"
    shutil.copytree(run_a, work)
    kept = {p.name: digest(p) for p in work.iterdir()}

    def failing(loader):
        raise DanetError("a broken image")
        yield

    monkeypatch.setattr(T, "_batches", failing)
    cli_error(capsys, "train", "--resume", str(work / "epoch_1.pth"), "--set", "schedule.epochs=2")
    assert {p.name: digest(p) for p in work.iterdir()} == kept  # config, log and the later files as they were
    fork = tmp_path / "D"
    cli_error(capsys, "train", "--resume", str(work / "epoch_2.pth"), "--work-dir", str(fork))
    assert not fork.exists() or not list(fork.iterdir())  # no staged config, log or best.pth left behind
    monkeypatch.undo()
    assert main(["train", "--resume", str(work / "epoch_2.pth"), "--work-dir", str(fork)]) == 0  # the fork again
    best_is_one_checkpoint(fork)


def test_a_validation_pending_at_stop_iter_is_done_then_the_run_stops(data_root, tmp_path, monkeypatch):
    work = tmp_path / "P"
    interrupt_validation(monkeypatch)
    assert main(train(work, data_root, "--set", "stop_iter=2")) == 130
    monkeypatch.undo()
    assert main(train(work, data_root, "--set", "stop_iter=2", "--resume")) == 0
    assert recorded_iter(work / "last.pth") == 2 and recorded_iter(work / "metrics.json") == 2


def test_a_work_dirs_config_without_last_pth_is_not_resumed_elsewhere(data_root, tmp_path, capsys):
    work = tmp_path / "N"
    assert main(train(work, data_root, "--set", "stop_iter=1")) == 0
    (work / "last.pth").unlink()
    line = cli_error(capsys, "train", str(work / "config.yaml"), "--resume")
    assert "holds no last.pth" in line and "start it again" in line


def test_a_finished_run_forked_writes_nothing_there(run_a, tmp_path):
    fork = tmp_path / "E"
    assert main(["train", "--resume", str(run_a / "last.pth"), "--work-dir", str(fork)]) == 0
    assert not fork.exists() or not list(fork.iterdir())


def test_a_finished_run_in_a_folder_it_cannot_write_says_so(run_a, monkeypatch, capsys):
    """The work dir's lock was taken before the 'finished' check, so a finished run on a read-only mount was refused
    ('cannot write in the work dir') where it should say it is finished and write nothing."""
    from danet.engine.run_files import WorkDirLock

    def read_only(self, work):
        raise DanetError(f"cannot write in the work dir {work}: Read-only file system; pick another --work-dir")

    monkeypatch.setattr(WorkDirLock, "acquire", read_only)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_a / "last.pth"), "--set", "progress=false"]) == 0
    assert "nothing left to train" in capsys.readouterr().out
