"""Faults an audit of the commands found (2026-11-26), each now one line with exit status 2 and nothing lost.

- `danet train`: resuming with another model structure; an init checkpoint of another structure than the settings
  asked for; resuming a run whose schedule is already done; metrics.json never ahead of last.pth when writing a
  checkpoint fails; a picture that cannot be written; a checkpoint given as the config; out-of-range model and
  schedule settings.
- any command: an OSError nothing caught (a full disk) is one line with what to do.
- devices, `danet test` and `danet benchmark` options out of range.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import danet.engine.train as T
from danet.checkpoints import read_checkpoint, save_checkpoint
from danet.cli import main
from danet.config import RunConfig, apply_overrides, load_run_config
from danet.data import ensure_synthetic
from danet.errors import DanetError
from danet.presets import get_preset
from test_faults_common import NARROW_MODEL_SETS, cli_error, digest, tiny_model

PRESET = "danet_tiny_synthetic"
TINY = ["schedule.epochs=1", "schedule.iters_per_epoch=2", "schedule.batch_size=2", "data.crop_size=[32,32]",
        "data.num_workers=0", "data.val_limit=2", "device=cpu", "progress=false", "deterministic=true",
        *NARROW_MODEL_SETS]  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("data"))


def train_argv(data_root: Path, work: Path, *sets: str, config: str = PRESET) -> list[str]:
    return ["train", config, "--data-root", str(data_root), "--work-dir", str(work)] + [
        a for s in [*TINY, *sets] for a in ("--set", s)
    ]


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("run")
    assert main(train_argv(data_root, work)) == 0
    return work


def test_resume_with_another_structure_is_one_line(run, data_root, capsys):
    before = {f: digest(run / f) for f in ("last.pth", "best.pth", "metrics.json", "config.yaml")}
    line = cli_error(capsys, *train_argv(data_root, run, "model.base_channels=16", "schedule.epochs=2"), "--resume")
    assert "another structure" in line and "size mismatch" in line and "config.yaml --resume" in line
    assert {f: digest(run / f) for f in before} == before


def test_resume_past_the_schedule_is_one_line_and_changes_nothing(run, data_root, capsys):
    """The run is at iteration 2; a schedule of 1 iteration has nothing left (the same schedule resumes to no work)."""
    before = {f: digest(run / f) for f in ("last.pth", "config.yaml", "log.jsonl")}
    line = cli_error(capsys, *train_argv(data_root, run, "schedule.iters_per_epoch=1"), "--resume")
    assert "at iteration 2, past this run's schedule, which ends at 1" in line and "raise schedule.epochs" in line
    assert {f: digest(run / f) for f in before} == before


def test_init_checkpoint_structure(data_root, tmp_path, capsys):
    """The weights decide the structure: a width set explicitly that they contradict is an error; one the preset
    gives is replaced, and config.yaml records it (so a resume without the init file builds the same model)."""
    wide = tiny_model(base_channels=8, stem_channels=8, head_channels=24, key_channels=8, aux_channels=16)
    ck = save_checkpoint(tmp_path / "wide.pth", wide, get_preset(PRESET))
    line = cli_error(capsys, *train_argv(data_root, tmp_path / "w1", f"init_checkpoint={ck}"))  # head_channels=16 set
    assert "model.head_channels=24, not the 16 asked for" in line
    assert not (tmp_path / "w1" / "last.pth").exists()
    sets = [s for s in TINY if not s.startswith("model.head_channels")]
    argv = ["train", PRESET, "--data-root", str(data_root), "--work-dir", str(tmp_path / "w2")]
    argv += [a for s in [*sets, f"init_checkpoint={ck}"] for a in ("--set", s)]
    assert main(argv) == 0
    import yaml

    saved = yaml.safe_load((tmp_path / "w2" / "config.yaml").read_text())
    assert saved["model"]["head_channels"] == 24  # the preset says 32
    assert read_checkpoint(tmp_path / "w2" / "last.pth").meta["model_cfg"]["head_channels"] == 24


def test_metrics_never_run_ahead_of_last_pth(run, data_root, tmp_path, monkeypatch, capsys):
    """Writing last.pth fails at the end of epoch 2 of a resumed run: metrics.json keeps epoch 1's bytes."""
    import shutil

    work = tmp_path / "w"
    shutil.copytree(run, work)
    before = digest(work / "metrics.json")
    real = T.checkpoints.save_checkpoint

    def full_disk(path, *a, **k):
        if Path(path).name == "last.pth":
            raise DanetError(f"could not write checkpoint {path}: No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(T.checkpoints, "save_checkpoint", full_disk)
    line = cli_error(capsys, *train_argv(data_root, work, "schedule.epochs=2"), "--resume")
    assert "No space left" in line
    assert digest(work / "metrics.json") == before and json.loads((work / "metrics.json").read_text())["epoch"] == 1


def test_a_picture_that_cannot_be_written_is_one_line(data_root, tmp_path, monkeypatch, capsys):
    import danet.viz as V

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "w" / "curves.png"))

    monkeypatch.setattr(V, "plot_training_curves", no_space)
    line = cli_error(capsys, *train_argv(data_root, tmp_path / "w"))
    assert "training finished" in line and "No space left on device" in line and "curves.png" in line
    assert read_checkpoint(tmp_path / "w" / "last.pth").train_state["iter"] == 2
    line = cli_error(capsys, *train_argv(data_root, tmp_path / "s", "stop_iter=1"))  # a stop draws the curves so far
    assert "training stopped" in line and "resumable with --resume" in line and "curves.png" in line
    assert read_checkpoint(tmp_path / "s" / "last.pth").train_state["iter"] == 1


def test_an_unexpected_os_error_is_one_line_with_a_hint(monkeypatch, capsys, tmp_path):
    import danet.engine.test_cli as TC

    def fail(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/x.png")

    monkeypatch.setattr(TC, "run_test", fail)
    line = cli_error(capsys, "test", PRESET, "--checkpoint", tmp_path / "c.pth")
    assert line.endswith("/somewhere/x.png: No space left on device; free some space or write elsewhere")


@pytest.mark.parametrize(
    "setting, words",
    [
        ("model.dropout=2", "'model.dropout' must be in [0, 1)"),
        ("model.num_classes=3", "contradicts the dataset of preset danet_tiny_synthetic (5 classes)"),
        ("schedule.power=-3", "'schedule.power' must not be negative"),
        ("aux_weight=-1", "'aux_weight' must not be negative"),
        ("device=gpu", "must be one of auto, cpu, cuda, cuda:N, got 'gpu'"),
        ("device=cuda:x", "must be one of auto, cpu, cuda, cuda:N"),
    ],
)
def test_bad_settings_are_one_line(setting, words, tmp_path, capsys):
    line = cli_error(capsys, "train", PRESET, "--work-dir", tmp_path / "w", "--set", setting)
    assert words in line
    assert not (tmp_path / "w").exists()


def test_a_checkpoint_as_the_config_is_one_line(run, capsys):
    line = cli_error(capsys, "train", run / "last.pth")
    assert "is not a YAML text file (a checkpoint: continue its run with --resume" in line


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--device", "foo"], "unknown device 'foo'; use auto, cpu, cuda or cuda:N"),
        (["--scales", "0"], "--scales must be factors in (0, 8]"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--plot", "x.json"], "give a .png (or .jpg) file name"),
    ],
)
def test_test_options_out_of_range(run, data_root, argv, words, capsys):
    base = ["test", PRESET, "--checkpoint", run / "last.pth", "--data-root", data_root, "--no-progress"]
    assert words in cli_error(capsys, *base, *argv)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--size", "0", "0"], "--size needs two positive sizes"),
        (["--iters", "0"], "--iters must be at least 1"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--device", "foo"], "unknown device 'foo'"),
    ],
)
def test_benchmark_options_out_of_range(argv, words, capsys):
    assert words in cli_error(capsys, "benchmark", PRESET, "--infer", "--no-flops", *argv)


def test_cuda_asked_for_without_a_gpu_names_each_commands_option(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = cli_error(capsys, "benchmark", PRESET, "--infer", "--device", "cuda", "--no-flops")
    assert "no CUDA GPU is visible" in line and "--device cpu" in line and "--set device=cpu" in line


def test_written_files_get_the_usual_permissions(run):
    """config.yaml and metrics.json go through a temp file (mkstemp: 0600); they end with a checkpoint's mode."""
    modes = {f: (run / f).stat().st_mode & 0o777 for f in ("config.yaml", "metrics.json", "last.pth")}
    assert modes["config.yaml"] == modes["metrics.json"] == modes["last.pth"] != 0o600, modes


def test_a_folder_given_as_a_checkpoint_names_a_file_inside(run, data_root, capsys):
    line = cli_error(capsys, "test", PRESET, "--checkpoint", run, "--data-root", data_root)
    assert "is a directory; pass a checkpoint file (e.g." in line and "best.pth" in line
    line = cli_error(capsys, "predict", "--checkpoint", run, data_root / "images" / "validation", "--out", run / "p")
    assert "is a directory" in line and not (run / "p").exists()
    assert "is a directory; pass its last.pth" in cli_error(capsys, "train", "--resume", run)


def test_a_corrupt_val_image_keeps_the_epochs_training(tmp_path, capsys):
    """The val split is read at the end of the epoch: the error keeps that epoch's training in last.pth."""
    root = ensure_synthetic(tmp_path / "data")
    first = sorted((root / "images" / "validation").iterdir())[0]
    first.write_bytes(first.read_bytes()[:100])
    line = cli_error(capsys, *train_argv(root, tmp_path / "w"))
    assert first.name in line and "validating epoch 1; its training is in last.pth: --resume" in line
    assert read_checkpoint(tmp_path / "w" / "last.pth").train_state["iter"] == 2


def test_cuda_n_is_a_device_of_train_too(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = cli_error(capsys, "train", PRESET, "--work-dir", tmp_path / "w", "--set", "device=cuda:1")
    assert "no CUDA GPU is visible" in line and "--set device=cpu" in line
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    from danet.engine.distributed import setup

    with pytest.raises(DanetError, match="under torchrun: each process takes its own GPU"):
        setup("cuda:1")


def test_skip_undoes_the_batch_norm_statistics_of_a_nan_batch(data_root, tmp_path, monkeypatch):
    """nonfinite=skip and a NaN pixel in iteration 2's images: the forward poisons the batch norms' running
    statistics before the loss shows it; the skip puts them back, so the run finishes with finite buffers."""
    real = T._batches

    def poisoned(loader):
        for i, (images, labels) in enumerate(real(loader)):
            if i == 1:
                images = images.clone()
                images[0, 0, 0, 0] = float("nan")
            yield images, labels

    monkeypatch.setattr(T, "_batches", poisoned)
    cfg = load_run_config(PRESET, [*TINY, "schedule.iters_per_epoch=3", "nonfinite=skip"], data_root=str(data_root),
                          work_dir=str(tmp_path / "w"))  # fmt: skip
    summary = T.train(cfg)
    assert summary["skipped"] == 1 and summary["iter"] == 3
    state = read_checkpoint(tmp_path / "w" / "last.pth").state_dict
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())


def test_a_nan_before_any_checkpoint_says_to_start_again(data_root, tmp_path, capsys):
    line = cli_error(capsys, *train_argv(data_root, tmp_path / "w", "schedule.lr=1e12", "schedule.iters_per_epoch=6"))
    assert "loss became" in line and "start again (no epoch has finished: there is no checkpoint yet)" in line


# --------------------------------------------------------------------------- the zoo presets' ImageNet backbone
def test_zoo_presets_start_from_the_imagenet_resnet_v1c_as_sssegmentation():
    from danet.presets import PRESETS

    for p in PRESETS.values():
        want = None if not p.alias else f"resnet{p.model.depth}_v1c"
        assert (p.backbone_url and p.backbone_url.rsplit("/", 1)[1].split("-")[0]) == want, p.name
    assert RunConfig().backbone_weights == "imagenet"


def test_backbone_source_downloads_once_and_follows_the_settings(tmp_path, monkeypatch):
    import torch

    import danet.presets as P
    from danet.models.resnet import ResNet

    torch.manual_seed(1)
    sd = ResNet(50, 8, "deep", base_channels=8, stem_channels=8).state_dict()
    src = tmp_path / "mirror" / "resnet50_v1c-2cccc1ad.pth"
    src.parent.mkdir()
    torch.save({"meta": {}, "state_dict": {f"backbone.{k}": v for k, v in sd.items()}}, src)
    monkeypatch.setitem(P.BACKBONE_URLS, 50, src.as_uri())
    monkeypatch.setenv("DANET_CACHE", str(tmp_path / "cache"))
    sets = ["model.base_channels=8", "model.stem_channels=8", "model.head_channels=16", "model.key_channels=8"]
    cfg = apply_overrides(RunConfig(preset="danet_r50-d8_ade20k"), sets).resolve()
    preset = cfg.effective_preset()
    got = T.backbone_source(cfg, preset)
    assert got == tmp_path / "cache" / "checkpoints" / src.name and got.read_bytes() == src.read_bytes()
    src.unlink()  # the second run reads the cache
    assert T.backbone_source(cfg, preset) == got
    model = T.build_model(cfg, preset, got)
    assert torch.equal(model.backbone.layer4[2].conv3.weight, sd["layer4.2.conv3.weight"])
    for change in (["backbone_weights=none"], [f"init_checkpoint={got}"]):
        assert T.backbone_source(apply_overrides(cfg, change), preset) is None
    assert T.backbone_source(RunConfig().resolve(), get_preset(PRESET)) is None  # the synthetic preset has none
    assert T.backbone_source(apply_overrides(cfg, [f"backbone_weights={src}"]), preset) == src


def test_an_offline_backbone_download_is_one_line(data_root, tmp_path, monkeypatch, capsys):
    import danet.presets as P

    monkeypatch.setitem(P.BACKBONE_URLS, 50, "http://127.0.0.1:9/resnet50_v1c.pth")  # nothing listens on port 9
    monkeypatch.setenv("DANET_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "ade" / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(root / "images" / split / f"ADE_{i}.jpg")
            Image.fromarray(np.ones((40, 60), np.uint8)).save(root / "annotations" / split / f"ADE_{i}.png")
    line = cli_error(capsys, "train", "danet_r50-d8_ade20k", "--data-root", root.parent, "--work-dir", tmp_path / "w",
                     *[a for s in [*TINY, "data.train_limit=2"] for a in ("--set", s)])  # fmt: skip
    assert "cannot download http://127.0.0.1:9/resnet50_v1c.pth" in line and "backbone_weights=none" in line
    assert not (tmp_path / "w" / "last.pth").exists()


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_is_off_while_training_unless_asked(tf32, data_root, tmp_path, monkeypatch):
    """sssegmentation trains with TF32 off (PyTorch leaves cuDNN's on); the setting holds during the run only."""
    import torch

    seen = []
    real = T._batches

    def watch(loader):
        for item in real(loader):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            yield item

    monkeypatch.setattr(T, "_batches", watch)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    cfg = load_run_config(PRESET, [*TINY, f"tf32={str(tf32).lower()}"], data_root=str(data_root),
                          work_dir=str(tmp_path / "w"))  # fmt: skip
    T.train(cfg)
    assert seen and set(seen) == {(tf32, tf32)}
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_last_pth_is_saved_before_validating(data_root, tmp_path, monkeypatch):
    """Under torchrun a corrupt val image may be met by a process that does not write files: the epoch's training
    must already be in last.pth when validation starts, whichever process fails."""
    seen = []
    real = T.validate

    def watch(*a, **k):
        seen.append(read_checkpoint(tmp_path / "w" / "last.pth").train_state["iter"])
        return real(*a, **k)

    monkeypatch.setattr(T, "validate", watch)
    cfg = load_run_config(PRESET, [*TINY, "schedule.epochs=2", "schedule.eval_interval=1"], data_root=str(data_root),
                          work_dir=str(tmp_path / "w"))  # fmt: skip
    T.train(cfg)
    assert seen == [2, 4]


def test_a_process_left_waiting_by_a_stopped_peer_prints_one_line(monkeypatch, capsys, tmp_path):
    import danet.engine.test_cli as TC

    def peer_gone(args):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:1")

    monkeypatch.setattr(TC, "run_test", peer_gone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = cli_error(capsys, "test", PRESET, "--checkpoint", tmp_path / "c.pth")
    assert "another process of this run stopped" in line and "Connection closed by peer" in line
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, a RuntimeError is a bug: its traceback stays
    with pytest.raises(RuntimeError, match="Connection closed"):
        main(["test", PRESET, "--checkpoint", str(tmp_path / "c.pth")])


def test_each_machines_first_process_downloads_the_backbone(tmp_path, monkeypatch):
    """Under torchrun over several machines each has its own cache: its local rank 0 downloads, not only rank 0."""
    from danet.engine.distributed import DistInfo

    calls = []
    monkeypatch.setattr("danet.zoo.fetch", lambda url, dest, progress=True: calls.append(dest) or dest)
    monkeypatch.setattr(T.distributed, "barrier", lambda: None)
    monkeypatch.setenv("DANET_CACHE", str(tmp_path / "cache"))
    cfg = apply_overrides(RunConfig(), ["backbone_weights=https://example.org/r.pth"]).resolve()
    import torch

    for rank, local_rank in ((0, 0), (1, 1), (2, 0), (3, 1)):  # two machines of two processes
        T.backbone_source(cfg, get_preset(PRESET), DistInfo(rank, 4, local_rank, torch.device("cpu")))
    assert len(calls) == 2


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(output_stride=7), "output_stride must be one of [8, 16, 32], got 7"),
        (dict(stem="bogus"), "stem must be one of ['deep', 'single'], got 'bogus'"),
        (dict(dropout=2.0), "dropout must be in [0, 1), got 2.0"),
        (dict(depth=34), "depth must be one of"),
        (dict(num_classes=-3), "num_classes must be a positive integer, got -3"),
        (dict(num_classes="5"), "num_classes must be a positive integer, got '5'"),
        (dict(num_classes=0), "num_classes must be a positive integer, got 0"),
    ],
)
def test_create_model_with_values_no_danet_takes_is_one_line(kw, words):
    import danet

    with pytest.raises(DanetError) as e:
        danet.create_model(PRESET, **kw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_benchmark_refuses_cudnn_benchmark_on_the_cpu(capsys):
    """It ran and recorded 'cudnn_benchmark' in its result, where it does nothing (the other CUDA settings are
    refused there, so that a record says what ran)."""
    line = cli_error(capsys, "benchmark", "danet_tiny_synthetic", "--infer", "--size", "32", "32", "--iters", "1",
                     "--cudnn-benchmark", "--device", "cpu")  # fmt: skip
    assert line.endswith("--cudnn-benchmark picks cuDNN's convolution algorithms on CUDA; drop it on the CPU")
