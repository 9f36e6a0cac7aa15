"""Shared helpers of the tests (mostly the fault-injection ones, test_faults_*.py); this module holds no tests itself.

`cli_error` runs `danet.cli.main` in-process and `cli_error_subprocess` runs `python -m danet.cli`: both assert the
command failed with exit status 2 and printed exactly one line on stderr, without a traceback, and return that line.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import danet

SRC = Path(danet.__file__).resolve().parents[1]

# `--set` overrides that make the presets' model a narrow one (fast on the CPU; same structure)
NARROW_MODEL_SETS = [
    "model.base_channels=8",
    "model.stem_channels=8",
    "model.head_channels=16",
    "model.key_channels=8",
    "model.aux_channels=16",
]


def cli_error(capsys, *argv: str) -> str:
    """Run `danet ARGV` in this process; assert exit 2 and a one-line error on stderr (besides `note: ` lines, which
    say what the command did before it stopped); return the line."""
    from danet.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note: ")]
    assert rc == 2, f"expected exit status 2, got {rc}; stderr: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err}"
    assert lines[0].startswith(f"danet {argv[0]}: error: "), lines[0]
    return lines[0]


def run_cli(*argv: str, env: dict | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python -m danet.cli ARGV` in a fresh interpreter (1 thread), capturing text output."""
    full_env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "danet.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        **kwargs,
    )


def cli_error_subprocess(*argv: str) -> str:
    """Run `python -m danet.cli ARGV`; assert exit 2 and one line on stderr without a traceback; return the line."""
    proc = run_cli(*argv)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr}"
    return lines[0]


def digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_model(num_classes: int | None = None, **overrides) -> danet.DANet:
    """The synthetic preset's DANet with non-zero attention gammas (so both attention paths matter)."""
    model = danet.create_model("danet_tiny_synthetic", num_classes=num_classes, **overrides)
    with torch.no_grad():
        model.head.pam.gamma.fill_(0.5)
        model.head.cam.gamma.fill_(0.25)
    return model.eval()


def tiny_folder_dataset(root: Path) -> Path:
    """A folder dataset at `root` with the synthetic preset's classes and one 48x64 image per split (enough for
    `danet test` to evaluate a checkpoint)."""
    (root / "classes.yaml").write_text(
        "\n".join(f"- {c}" for c in danet.get_preset("danet_tiny_synthetic").classes) + "\n"
    )
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(root / "images" / split / "a.png")
        Image.fromarray(np.zeros((48, 64), np.uint8)).save(root / "masks" / split / "a.png")
    return root


def one_line(e) -> str:
    """The message of a raised DanetError (`pytest.raises(...) as e`), asserted to be one non-empty line."""
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def saved_tiny_checkpoint(folder: Path, name: str = "model.pth", **overrides) -> Path:
    """`tiny_model(**overrides)` saved in our format for the synthetic preset, as `folder / name`."""
    from danet.checkpoints import save_checkpoint

    path = folder / name
    save_checkpoint(path, tiny_model(**overrides), "danet_tiny_synthetic")
    return path


def train_argv(work: Path, data: Path, *extra: str, epochs: int = 2, **settings) -> list[str]:
    """`danet train` of the synthetic preset at tiny widths on `data`: 2 iterations of batch 2 an epoch, 32 px crops,
    2 val images, on the CPU without loader processes; `settings`: more --set values (dots as double underscores)."""
    base = {
        "schedule.epochs": epochs, "schedule.iters_per_epoch": 2, "schedule.batch_size": 2,
        "data.crop_size": "[32,32]", "data.num_workers": 0, "data.val_limit": 2, "progress": "false",
        "device": "cpu", "model.base_channels": 8, "model.stem_channels": 8, "model.head_channels": 16,
    }  # fmt: skip
    base.update({k.replace("__", "."): v for k, v in settings.items()})
    sets = [a for k, v in base.items() for a in ("--set", f"{k}={v}")]
    return ["train", "danet_tiny_synthetic", "--data-root", str(data), "--work-dir", str(work), *sets, *extra]


def interrupt_validation(monkeypatch) -> None:
    """Ctrl-C while `danet train` validates (undone by `monkeypatch.undo()` or the test's end)."""
    import danet.engine.train as T

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "validate", interrupted)
