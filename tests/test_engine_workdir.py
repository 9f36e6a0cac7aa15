"""A fresh run never replaces an earlier run's checkpoints by accident."""

from __future__ import annotations

from danet.cli import main
from danet.data import ensure_synthetic

SETS = [
    "schedule.epochs=1",
    "schedule.iters_per_epoch=1",
    "schedule.batch_size=2",
    "data.crop_size=[32,32]",
    "data.num_workers=0",
    "data.val_limit=1",
    "model.base_channels=8",
    "model.stem_channels=8",
    "model.head_channels=16",
    "model.key_channels=8",
    "model.aux_channels=16",
    "device=cpu",
    "progress=false",
]


def test_fresh_run_into_an_old_run_is_refused_unless_overwrite(tmp_path, capsys):
    root = ensure_synthetic(tmp_path / "data")
    work = tmp_path / "run"
    argv = ["train", "danet_tiny_synthetic", "--data-root", str(root), "--work-dir", str(work)]
    sets = [a for s in SETS for a in ("--set", s)]
    assert main([*argv, *sets]) == 0
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    capsys.readouterr()

    assert main([*argv, *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and "--resume" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before  # nothing touched

    assert main([*argv, *sets, "--set", "overwrite=true"]) == 0
