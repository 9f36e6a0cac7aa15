"""`danet train` argument handling: one-line errors, work dir defaults, resume sources."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from danet.cli import main
from danet.engine.train_cli import add_cli, resolve_args
from danet.errors import DanetError


def parse(*argv: str):
    p = argparse.ArgumentParser()
    add_cli(p)
    return p.parse_args(list(argv))


def one_error_line(capsys, *argv: str) -> str:
    rc = main(list(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_bad_set_lists_valid_keys(capsys):
    line = one_error_line(capsys, "train", "danet_tiny_synthetic", "--set", "schedule.epoch=2")
    assert line.startswith("danet train: error: unknown setting 'schedule.epoch'") and "schedule.epochs" in line


def test_unknown_preset(capsys):
    assert "unknown preset" in one_error_line(capsys, "train", "danet_r51-d8_ade20k")


def test_missing_data_root_for_a_real_dataset(capsys, tmp_path):
    line = one_error_line(capsys, "train", "danet_r50-d8_ade20k", "--work-dir", str(tmp_path), "--set", "device=cpu")
    assert "data root" in line or "data-root" in line


def run_checkpoint(path, preset="danet_tiny_synthetic", **schedule):
    """A `danet train` checkpoint at `path` whose recorded run (of `preset`, as typed) has these schedule settings."""
    from danet.checkpoints import save_checkpoint
    from danet.config import RunConfig, to_dict
    from test_faults_common import tiny_model

    cfg = RunConfig(preset=preset, work_dir="somewhere/else")
    for k, v in schedule.items():
        setattr(cfg.schedule, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, tiny_model(), "danet_tiny_synthetic", extra_meta={"config": to_dict(cfg.resolve())})
    return path


def test_defaults_and_resume_sources(tmp_path, monkeypatch):
    cfg, resume = resolve_args(parse("danet_tiny_synthetic"))
    assert cfg.work_dir == "runs/danet_tiny_synthetic" and resume is None
    cfg, _ = resolve_args(parse("danet_tiny_synthetic", "--work-dir", str(tmp_path), "--set", "amp=bf16"))
    assert cfg.work_dir == str(tmp_path) and cfg.amp == "bf16"
    with pytest.raises(DanetError, match="last.pth"):
        resolve_args(parse("danet_tiny_synthetic", "--work-dir", str(tmp_path), "--resume"))
    run_checkpoint(tmp_path / "last.pth")
    _, resume = resolve_args(parse("danet_tiny_synthetic", "--work-dir", str(tmp_path), "--resume"))
    assert resume == tmp_path / "last.pth"
    with pytest.raises(DanetError, match="name a preset"):
        resolve_args(parse())


def test_a_torchrun_restart_continues_only_its_own_last_pth(tmp_path, monkeypatch):
    """A restart (--max-restarts) continues the work dir's last.pth where this torchrun invocation wrote it: not an
    earlier run's (an overwrite=true run restarted before its first checkpoint), and not --resume's file again once
    the run has written its own."""
    import torch

    from danet.checkpoints import save_checkpoint
    from danet.config import RunConfig
    from danet.engine.distributed import DistInfo
    from danet.engine.train import restart_source
    from test_faults_common import tiny_model

    cfg = RunConfig(work_dir=str(tmp_path))
    asked = tmp_path / "old" / "epoch_1.pth"

    def last_written_by(run):
        save_checkpoint(
            tmp_path / "last.pth", tiny_model(), "danet_tiny_synthetic", train_state={"iter": 4, "run": run}
        )

    def source(run, resume):
        return restart_source(cfg, resume, DistInfo(0, 2, 0, torch.device("cpu"), run))

    last_written_by("this")
    assert source("this", None) is None and source("this", asked) == asked  # the first attempt: as asked
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert source("this", None) == source("this", asked) == tmp_path / "last.pth"
    last_written_by("an earlier invocation")
    assert source("this", None) is None and source("this", asked) == asked
    # torchrun gives nothing to tell invocations apart: a last.pth is taken for this run's, --resume's file first
    assert source(None, None) == tmp_path / "last.pth" and source(None, asked) == asked
    (tmp_path / "last.pth").unlink()
    assert source("this", None) is None


def test_a_resume_continues_the_checkpoint_s_own_run_beside_it(tmp_path):
    """--resume CKPT writes beside CKPT (not to the work dir recorded in it, which may be another run's or relative to
    another folder); with a preset name the run's own settings come from the checkpoint, --set on top."""
    ck = run_checkpoint(tmp_path / "copy" / "epoch_1.pth", epochs=2, iters_per_epoch=5)
    cfg, resume = resolve_args(parse("--resume", str(ck)))
    assert cfg.work_dir == str(tmp_path / "copy") and resume == ck
    cfg, _ = resolve_args(parse("--resume", str(ck), "--work-dir", str(tmp_path / "there")))
    assert cfg.work_dir == str(tmp_path / "there")
    run_checkpoint(tmp_path / "w" / "last.pth", epochs=2, iters_per_epoch=5)
    argv = ["danet_tiny_synthetic", "--work-dir", str(tmp_path / "w"), "--resume"]
    cfg, _ = resolve_args(parse(*argv))
    assert (cfg.schedule.epochs, cfg.schedule.iters_per_epoch) == (2, 5)  # not the preset's 120 epochs
    cfg, _ = resolve_args(parse(*argv, "--set", "schedule.epochs=3"))
    assert (cfg.schedule.epochs, cfg.schedule.iters_per_epoch) == (3, 5)
    with pytest.raises(DanetError, match="is a run of preset danet_tiny_synthetic, not danet_r50-d8_ade20k"):
        resolve_args(parse("danet_r50-d8_ade20k", "--resume", str(ck)))


def test_a_run_started_under_a_sssegmentation_alias_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/<name as typed>, as a fresh run writes it
    ck = run_checkpoint(tmp_path / "runs" / "danet_resnet50os8_voc" / "last.pth", preset="danet_resnet50os8_voc")
    for name in ("danet_resnet50os8_voc", "danet_r50-d8_voc12aug"):  # the alias, or the preset it stands for
        cfg, resume = resolve_args(parse(name, "--resume", str(ck)))
        assert resume == ck and cfg.work_dir == str(ck.parent)
    cfg, resume = resolve_args(parse("danet_resnet50os8_voc", "--resume"))
    assert resume == Path("runs/danet_resnet50os8_voc/last.pth")
    cfg, _ = resolve_args(parse("--resume", str(ck), "--set", "work_dir='my runs/x'"))
    assert cfg.work_dir == "my runs/x"  # parsed as --set parses values, quotes and all


def test_an_option_s_own_flag_wins_over_set(tmp_path):
    cfg, _ = resolve_args(parse("danet_tiny_synthetic", "--set", "work_dir=a", "--work-dir", str(tmp_path / "b")))
    assert cfg.work_dir == str(tmp_path / "b")


@pytest.mark.parametrize(
    ("setting", "message"),
    [("schedule.min_lr=1", "'schedule.min_lr' (1) is above schedule.lr"),
     ("schedule.momentum=5", "'schedule.momentum' must be below 1"),
     ("schedule.lr=.nan", "'schedule.lr' must not be negative (a finite number), got nan"),
     ("schedule.lr=.inf", "got inf"), ("schedule.lr=0", "'schedule.lr' must be above 0"),
     ("seed=99999999999999999999", "'seed' must be in 0 .. 2**63 - 1"), ("seed=-1", "'seed' must be in"),
     ("work_dir=''", "'work_dir' is empty")],
)  # fmt: skip
def test_settings_out_of_range_are_one_line(capsys, setting, message):
    assert message in one_error_line(capsys, "train", "danet_tiny_synthetic", "--set", setting)


def test_a_config_file_without_a_preset_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("schedule:\n  epochs: 1\n")
    assert "names no preset; add a line 'preset: NAME'" in one_error_line(capsys, "train", str(tmp_path / "c.yaml"))


def test_a_preset_name_in_another_case_is_suggested(capsys):
    assert "Did you mean 'danet_tiny_synthetic'" in one_error_line(capsys, "train", "DANET_TINY_SYNTHETIC")


def test_an_error_line_is_one_write(monkeypatch):
    """Under torchrun the processes share stderr: a line written in two pieces (text, newline) ran into another's."""
    import sys

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert main(["train", "danet_r51-d8_ade20k"]) == 2
    assert len(writes) == 1 and writes[0].startswith("danet train: error: unknown preset") and writes[0].endswith("\n")


@pytest.mark.parametrize(
    ("argv", "line"),
    [(["train", "danet_tiny_synthetic", "--bogus"],
      "danet train: error: unrecognized arguments: --bogus; see danet train --help"),
     (["models", "foo"], "danet models: error: unrecognized arguments: foo; see danet models --help"),
     (["data", "check", "x", "--bogus"],
      "danet data check: error: unrecognized arguments: --bogus; see danet data check --help"),
     (["test"],
      "danet test: error: the following arguments are required: preset, --checkpoint; see danet test --help")],
)  # fmt: skip
def test_argument_errors_are_one_line_named_by_their_command(capsys, argv, line):
    """argparse printed its whole usage (20 lines for danet test) before the error, and named unknown options of a
    subcommand 'danet: error'."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [line]
