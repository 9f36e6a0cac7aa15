"""`danet train` argument handling: one-line errors, work dir defaults, resume sources."""

from __future__ import annotations

import argparse

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


def test_defaults_and_resume_sources(tmp_path, monkeypatch):
    cfg, resume = resolve_args(parse("danet_tiny_synthetic"))
    assert cfg.work_dir == "runs/danet_tiny_synthetic" and resume is None
    cfg, _ = resolve_args(parse("danet_tiny_synthetic", "--work-dir", str(tmp_path), "--set", "amp=bf16"))
    assert cfg.work_dir == str(tmp_path) and cfg.amp == "bf16"
    with pytest.raises(DanetError, match="last.pth"):
        resolve_args(parse("danet_tiny_synthetic", "--work-dir", str(tmp_path), "--resume"))
    (tmp_path / "last.pth").write_bytes(b"x")
    _, resume = resolve_args(parse("danet_tiny_synthetic", "--work-dir", str(tmp_path), "--resume"))
    assert resume == tmp_path / "last.pth"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a torchrun restart continues by itself
    _, resume = resolve_args(parse("danet_tiny_synthetic", "--work-dir", str(tmp_path)))
    assert resume == tmp_path / "last.pth"
    with pytest.raises(DanetError, match="name a preset"):
        resolve_args(parse())
