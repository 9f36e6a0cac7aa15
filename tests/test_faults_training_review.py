"""Faults found by an exploratory review of `danet train`: --set overwrite=true leaving the earlier run's best.pth
and metrics.json (and config.yaml recording it), a work dir with best.pth but no last.pth trained over, a stop while
validating losing that validation, resuming a finished run, the Triton loss on the CPU, 1-pixel crops, and the
non-finite-weights line naming a checkpoint that did not exist.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from danet.checkpoints import read_checkpoint
from danet.cli import main
from danet.data import ensure_synthetic
from test_faults_common import cli_error, digest, interrupt_validation, train_argv

PRESET = "danet_tiny_synthetic"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("data"))


def argv(work: Path, data: Path, *extra: str, epochs: int = 2) -> list[str]:
    return train_argv(work, data, *extra, epochs=epochs, log_interval=1)


def records(work: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (work / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_overwrite_replaces_every_file_of_the_earlier_run(data_root, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(argv(work, data_root, "--set", "schedule.save_interval=1")) == 0
    assert (work / "epoch_2.pth").is_file()
    (work / "metrics.json").write_text('{"iter": 100, "best_mIoU": 99.0}')  # an earlier run's figures
    capsys.readouterr()
    assert main(argv(work, data_root, "--set", "overwrite=true", "--set", "stop_iter=1")) == 0
    assert "overwrite=true: removed the earlier run's" in capsys.readouterr().out
    assert not (work / "best.pth").exists() and not (work / "metrics.json").exists()  # nothing passes for this run's
    assert not (work / "epoch_2.pth").exists() and read_checkpoint(work / "last.pth").train_state["iter"] == 1
    # a new run from one of the earlier run's checkpoints: that file is the new run's input, not removed
    assert main(argv(work, data_root, "--set", "overwrite=true", "--set", "stop_iter=1")) == 0
    (work / "epoch_7.pth").write_bytes((work / "last.pth").read_bytes())
    capsys.readouterr()
    init = ("--set", f"init_checkpoint={work / 'epoch_7.pth'}")
    assert main(argv(work, data_root, "--set", "overwrite=true", "--set", "stop_iter=1", *init)) == 0
    assert (work / "epoch_7.pth").is_file() and "epoch_7" not in capsys.readouterr().out
    recorded = yaml.safe_load((work / "config.yaml").read_text())
    assert recorded["overwrite"] is False  # running config.yaml again is refused, not a wipe
    line = cli_error(capsys, "train", work / "config.yaml", "--data-root", data_root)
    assert "already holds a run" in line


def test_an_overwrite_run_failing_before_its_first_checkpoint_leaves_the_earlier_run_whole(
    data_root, tmp_path, capsys, monkeypatch
):
    """overwrite=true, then a failure before the new run's first checkpoint (a bad label in its first batch): the
    earlier run's config.yaml and log.jsonl keep their bytes beside its checkpoints (its config still resumes it);
    the next overwrite run that reaches a checkpoint puts its own config and log in their place, and leaves no
    staged file behind."""
    import danet.engine.train as T
    from danet.errors import DanetError

    work = tmp_path / "w"
    assert main(argv(work, data_root)) == 0
    kept = {name: digest(work / name) for name in ("config.yaml", "log.jsonl", "last.pth")}

    def failing(loader):
        raise DanetError("label value 7 is out of range")
        yield  # a generator, as the loader's items are

    def full_disk(*args, **kwargs):
        raise DanetError("could not write checkpoint: No space left on device")

    with monkeypatch.context() as m:
        m.setattr(T, "_batches", failing)
        line = cli_error(capsys, *argv(work, data_root, "--set", "overwrite=true", "--set", "schedule.lr=0.5"))
    assert "out of range" in line
    assert {name: digest(work / name) for name in kept} == kept
    assert yaml.safe_load((work / "config.yaml").read_text())["schedule"]["lr"] != 0.5
    assert not list(work.glob(".*.next"))  # the failed run's staged config and log are gone
    # its first checkpoint failing to land (a full disk) leaves the earlier run whole too
    with monkeypatch.context() as m:
        m.setattr(T.checkpoints, "save_checkpoint", full_disk)
        line = cli_error(capsys, *argv(work, data_root, "--set", "overwrite=true", "--set", "schedule.lr=0.5"))
    assert "No space left" in line
    assert {name: digest(work / name) for name in kept} == kept and (work / "best.pth").is_file()
    assert not list(work.glob(".*.next"))
    assert main(argv(work, data_root, "--set", "overwrite=true", "--set", "schedule.lr=0.5")) == 0
    assert yaml.safe_load((work / "config.yaml").read_text())["schedule"]["lr"] == 0.5
    starts = records(work, "start")
    assert len(starts) == 1 and records(work, "end")[0]["iter"] == 4  # the new run's log alone, whole
    assert not list(work.glob(".*.next"))


def test_a_work_dir_with_a_kept_best_pth_is_not_trained_over(data_root, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(argv(work, data_root)) == 0
    (work / "last.pth").unlink()  # kept only the best model, as people do
    before = digest(work / "best.pth")
    line = cli_error(capsys, *argv(work, data_root))
    assert "already holds a run (['best.pth', 'metrics.json', " in line
    assert digest(work / "best.pth") == before


def test_a_run_failing_before_its_first_epoch_can_run_again(data_root, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(argv(work, data_root, "--set", "stop_iter=1")) == 0  # mid-epoch stop: config, log, last.pth, curves
    for name in ("last.pth", "curves.png"):  # as if it died before writing them (a stop writes last.pth, then curves)
        (work / name).unlink()
    assert main(argv(work, data_root)) == 0


def test_a_stop_while_validating_is_validated_on_resume(data_root, tmp_path, monkeypatch, capsys):
    work = tmp_path / "w"
    interrupt_validation(monkeypatch)
    assert main(argv(work, data_root, "--set", "schedule.eval_interval=1")) == 130
    assert read_checkpoint(work / "last.pth").train_state["validation_pending"] is True
    assert not records(work, "val") and not (work / "best.pth").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv(work, data_root, "--set", "schedule.eval_interval=1", "--resume")) == 0
    assert "done: 4 iterations (2 of them in " in capsys.readouterr().out  # this call's share, not the run's
    assert [r["iter"] for r in records(work, "val")] == [2, 4]  # epoch 1's validation, then epoch 2's
    assert (work / "best.pth").is_file() and json.loads((work / "metrics.json").read_text())["iter"] == 4


def test_a_stop_after_the_validation_was_logged_does_not_log_it_twice(data_root, tmp_path, monkeypatch):
    """Stopped while writing best.pth: the validation is in the log, last.pth still says it is pending."""
    from danet.engine import train as train_mod

    work = tmp_path / "w"
    real = train_mod.checkpoints.save_checkpoint

    def stop_at_best(path, *args, **kwargs):
        if Path(path).name == "best.pth":
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(train_mod.checkpoints, "save_checkpoint", stop_at_best)
    assert main(argv(work, data_root, "--set", "schedule.eval_interval=1")) == 130
    assert [r["iter"] for r in records(work, "val")] == [2]
    monkeypatch.setattr(train_mod.checkpoints, "save_checkpoint", real)
    assert main(argv(work, data_root, "--set", "schedule.eval_interval=1", "--resume")) == 0
    assert [r["iter"] for r in records(work, "val")] == [2, 4]


def test_resuming_a_finished_run_says_so_and_writes_nothing(data_root, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(argv(work, data_root)) == 0
    before = {p.name: digest(p) for p in work.iterdir()}
    capsys.readouterr()
    assert main(argv(work, data_root, "--resume")) == 0
    assert "has finished its 4 iterations: nothing left to train" in capsys.readouterr().out
    assert {p.name: digest(p) for p in work.iterdir()} == before
    for picture in ("curves.png", "per_class_iou.png"):  # stopped after its last checkpoint, before its pictures
        (work / picture).unlink()
    assert main(argv(work, data_root, "--resume")) == 0
    assert (work / "curves.png").is_file() and (work / "per_class_iou.png").is_file()
    # a full disk at the last picture: the others are there, the confusion matrix cannot be drawn again (it was
    # drawn nothing, in silence)
    (work / "confusion.png").unlink()
    capsys.readouterr()
    assert main(argv(work, data_root, "--resume")) == 0
    err = capsys.readouterr().err
    assert "confusion.png was not drawn and cannot be drawn again" in err and "--json F.json draws" in err


def test_the_triton_loss_on_the_cpu_runs_the_chunked_one(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the test suite's own setting: Triton on the CPU
    work = tmp_path / "w"
    extra = ("--set", "fused_loss=true", "--set", "fused_loss_impl=triton", "--set", "stop_iter=1")
    assert main(argv(work, data_root, *extra)) == 0
    assert "note: fused_loss_impl=triton runs on CUDA only; the chunked fused loss runs" in capsys.readouterr().err
    assert math.isfinite(records(work, "train")[0]["loss"])


def test_one_pixel_crops_train(data_root, tmp_path):
    work = tmp_path / "w"
    assert main(argv(work, data_root, "--set", "data.crop_size=[1,1]", "--set", "seed=3", "--set", "stop_iter=1")) == 0


def test_after_a_divergence_the_line_names_a_checkpoint_only_where_there_is_one(tmp_path):
    """Both lines (the loss, the weights became non-finite) end with this advice; the weights' line named
    WORK/last.pth as 'the last good checkpoint' before any epoch had written one."""
    from danet.engine.train import after_divergence

    assert after_divergence(tmp_path) == "start again (no epoch has finished: there is no checkpoint yet)"
    (tmp_path / "last.pth").write_bytes(b"x")
    assert after_divergence(tmp_path).startswith(f"--resume from {tmp_path / 'last.pth'}")
    # an overwrite=true run before its first checkpoint: that last.pth is the earlier run's
    assert after_divergence(tmp_path, ours=False).startswith("start again")


def test_loss_groups_are_recorded_and_checked_before_training(data_root, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(argv(work, data_root, "--set", "schedule.loss_images=1", "--set", "stop_iter=1")) == 0
    assert yaml.safe_load((work / "config.yaml").read_text())["schedule"]["loss_images"] == 1
    assert math.isfinite(records(work, "train")[0]["loss"])
    assert main(argv(tmp_path / "big", data_root, "--set", "schedule.loss_images=4", "--set", "stop_iter=1")) == 0
    assert "schedule.loss_images=4 but each of the 1 processes has 2 image(s)" in capsys.readouterr().err
    bad = argv(tmp_path / "b", data_root, "--set", "schedule.batch_size=3", "--set", "schedule.loss_images=2")
    line = cli_error(capsys, *bad)
    assert "a batch of 3 images per process does not split into loss groups of schedule.loss_images=2" in line
    assert not (tmp_path / "b" / "last.pth").exists()
    line = cli_error(capsys, *argv(tmp_path / "c", data_root, "--set", "schedule.loss_images=-1"))
    assert "'schedule.loss_images' must be 0 (one group) or more, got -1" in line


def test_an_align_corners_model_refuses_the_fused_loss(data_root, tmp_path, capsys):
    line = cli_error(capsys, *argv(tmp_path / "w", data_root, "--set", "model.align_corners=true",
                                   "--set", "fused_loss=true"))  # fmt: skip
    assert "align_corners=True" in line and "without fused_loss" in line
    assert main(argv(tmp_path / "ok", data_root, "--set", "model.align_corners=true", "--set", "stop_iter=1")) == 0


def test_a_run_recorded_before_loss_groups_keeps_one_group():
    """A config.yaml / checkpoint of a run from before schedule.loss_images lists every other schedule setting: it
    trained one group per process, and resumed or rerun goes on so (the zoo preset's 2 would change its loss); a
    hand-written config naming only some settings gets the preset's."""
    from danet.config import from_dict, load_run_config, to_dict

    recorded = to_dict(load_run_config("danet_r50-d8_ade20k").resolve())
    assert recorded["schedule"]["loss_images"] == 2
    del recorded["schedule"]["loss_images"]
    assert from_dict(recorded).resolve().schedule.loss_images == 0
    written = {"preset": "danet_r50-d8_ade20k", "schedule": {"epochs": 30, "lr": 0.01}}
    assert from_dict(written).resolve().schedule.loss_images == 2


def test_an_align_corners_init_checkpoint_is_recorded_for_the_resume(data_root, tmp_path):
    """Started from mmseg's 769x769 weights (align_corners=True), config.yaml records it, so a resume rebuilds the
    same model (it rebuilt one with align_corners=False)."""
    work = tmp_path / "w"
    fixture = Path(__file__).parent / "fixtures" / "models" / "mmseg_769.pth"  # 5 classes, as the synthetic data
    settings = {
        "init_checkpoint": fixture, "model.depth": 50, "schedule.epochs": 2, "schedule.iters_per_epoch": 1,
        "schedule.batch_size": 2, "data.crop_size": "[32,32]", "data.num_workers": 0, "data.val_limit": 1,
        "progress": "false", "device": "cpu",
    }  # fmt: skip
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    run = ["train", PRESET, "--data-root", str(data_root), "--work-dir", str(work), *sets]
    assert main([*run, "--set", "stop_iter=1"]) == 0
    assert yaml.safe_load((work / "config.yaml").read_text())["model"]["align_corners"] is True
    assert main(["train", "--resume", str(work / "last.pth"), "--set", "progress=false"]) == 0
    ck = read_checkpoint(work / "last.pth")
    assert ck.train_state["iter"] == 2 and ck.meta["model_cfg"]["align_corners"] is True
