"""Training, testing, checking and predicting on a folder dataset with its own class list (`data.dataset=folder`,
`danet test / data check --dataset folder`), and fine-tuning a checkpoint of another class count on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from danet.checkpoints import read_checkpoint, save_checkpoint
from danet.cli import main
from danet.config import RunConfig, apply_overrides, load_run_config
from danet.engine.logging import read_log
from danet.engine.start import CLASSIFIERS, build_model
from danet.errors import DanetError
from test_faults_common import NARROW_MODEL_SETS, cli_error

PRESET = "danet_tiny_synthetic"
CLASSES = ("ground", "crack", "stain")
COLOURS = ((0, 0, 0), (255, 0, 0), (0, 0, 255))
RUN_SETS = [
    "data.dataset=folder",
    "schedule.epochs=2",
    "schedule.batch_size=2",
    "schedule.eval_interval=1",
    "data.crop_size=[32,32]",
    "data.base_size=[96,48]",  # not the preset's: danet test and predict must take the run's
    "data.num_workers=0",
    "device=cpu",
    "progress=false",
    *NARROW_MODEL_SETS,
]


def own_dataset(root: Path, n: int = 4, names: list[str] | None = None) -> Path:
    """Three classes of its own: a dark ground, red cracks (rows), blue stains (squares), ignore 255 at the border
    (`names`: other class names, default colours)."""
    root.mkdir(parents=True, exist_ok=True)
    write_classes(root, names)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.zeros((40, 56), np.uint8)
            mask[rng.integers(0, 30) :][:4] = 1
            y, x = rng.integers(0, 28), rng.integers(0, 44)
            mask[y : y + 10, x : x + 10] = 2
            mask[0] = 255
            image = np.asarray(COLOURS, np.uint8)[np.minimum(mask, 2)] // 2 + rng.integers(0, 60, (40, 56, 3), np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")
    return root


def write_classes(root: Path, names: list[str] | None = None) -> None:
    entries = [f"  - {{name: {c}, color: {list(rgb)}}}\n" for c, rgb in zip(CLASSES, COLOURS, strict=True)]
    (root / "classes.yaml").write_text(f"{names}\n" if names else "classes:\n" + "".join(entries))


def sets(*extra: str) -> list[str]:
    return sum((["--set", s] for s in (*RUN_SETS, *extra)), [])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    data = own_dataset(tmp_path_factory.mktemp("own") / "data")
    work = tmp_path_factory.mktemp("own_run") / "work"
    assert main(["train", PRESET, "--data-root", str(data), "--work-dir", str(work), *sets()]) == 0
    return {"data": data, "work": work}


def test_training_takes_the_data_s_classes(run):
    ck = read_checkpoint(run["work"] / "last.pth")
    assert ck.meta["classes"] == list(CLASSES) and ck.meta["palette"] == [list(c) for c in COLOURS]
    assert ck.meta["model_cfg"]["num_classes"] == 3
    for key in ("head.cls.conv.weight", "head.cls_pam.conv.weight", "head.cls_cam.conv.weight", "aux.cls.conv.weight"):
        assert ck.state_dict[key].shape[0] == 3
    assert ck.train_state["iter"] == 4  # 4 train images // batch 2, 2 epochs
    cfg = load_run_config(str(run["work"] / "config.yaml"))  # config.yaml loads back to the same run
    assert cfg.data.dataset == "folder" and cfg.effective_preset().classes == CLASSES
    assert cfg.effective_preset().title == f"{PRESET} on 3 own classes"  # the pictures' titles say so
    assert RunConfig(preset=PRESET).effective_preset().title == PRESET
    metrics = json.loads((run["work"] / "metrics.json").read_text())
    assert len(metrics["IoU"]) == 3


def test_danet_test_on_the_data_s_classes_gives_the_run_s_validation(run, tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = ["test", PRESET, "--checkpoint", run["work"] / "last.pth", "--data-root", run["data"], "--dataset", "folder"]
    assert main([*map(str, argv), "--no-progress", "--json", str(out)]) == 0
    assert "crack" in capsys.readouterr().out
    tested = json.loads(out.read_text())
    val = [r for r in read_log(run["work"] / "log.jsonl") if r["type"] == "val"][-1]
    assert tested["mIoU"] == pytest.approx(val["mIoU"], abs=1e-9) and len(tested["IoU"]) == 3
    assert tested["settings"]["base_size"] == [96, 48]  # the run's, as its validation
    # without --dataset folder the preset's 5 classes do not match the file's 3: one line naming the option
    line = cli_error(capsys, *argv[:-2])
    assert "--dataset folder" in line and "data.dataset=folder" in line


def test_predict_uses_the_checkpoint_s_classes_and_colours(run, tmp_path):
    image = run["data"] / "images" / "val" / "0.png"
    assert main(["predict", "--checkpoint", str(run["work"] / "last.pth"), str(image), "--out", str(tmp_path)]) == 0
    label = Image.open(tmp_path / "0.png")
    assert label.size == (56, 40) and np.asarray(label).max() < 3
    assert label.getpalette()[:9] == [c for rgb in COLOURS for c in rgb]
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run["work"] / "last.pth"),
                str(image),
                "--out",
                str(tmp_path),
                "--tta-merge",
                "logits",
            ]
        )
        == 2
    )


def test_data_check_on_the_data_s_classes(run, tmp_path, capsys):
    assert main(["data", "check", PRESET, "--data-root", str(run["data"]), "--dataset", "folder", "--no-progress"]) == 0
    bad = own_dataset(tmp_path / "bad", n=1)
    Image.fromarray(np.full((40, 56), 3, np.uint8)).save(bad / "masks" / "val" / "0.png")  # class 3 of 0..2
    assert main(["data", "check", PRESET, "--data-root", str(bad), "--dataset", "folder", "--no-progress"]) == 1
    assert "0.png" in capsys.readouterr().out


def five_class_checkpoint(run, path: Path) -> torch.nn.Module:
    """A 5-class model of the run's narrow structure (weights no fresh model has), saved at `path`."""
    cfg = apply_overrides(RunConfig(preset=PRESET, data_root=str(run["data"]), work_dir=str(path.parent)), RUN_SETS)
    own = cfg.effective_preset()
    source = build_model(cfg, own.replace(model=own.model.replace(num_classes=5)))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    save_checkpoint(path, source, PRESET)
    return source


def test_fine_tuning_a_checkpoint_of_another_class_count(run, tmp_path, capsys):
    """init_checkpoint with 5 classes on 3-class data: every weight but the four classifiers comes from it."""
    source = five_class_checkpoint(run, tmp_path / "five.pth")
    cfg = apply_overrides(RunConfig(preset=PRESET, data_root=str(run["data"]), work_dir=str(tmp_path)), RUN_SETS)
    own = cfg.effective_preset()
    cfg.init_checkpoint = str(tmp_path / "five.pth")
    model = build_model(cfg, own)
    assert "new classifiers" in capsys.readouterr().err
    assert model.num_classes == 3 and "num_classes" not in cfg.model
    old, new = source.state_dict(), model.state_dict()
    reshaped = sorted(k for k in new if new[k].shape != old[k].shape)
    assert len(reshaped) == 8 and all(".cls" in k for k in reshaped)  # the main, PAM, CAM and aux classifiers
    assert all(torch.equal(new[k], old[k]) for k in new if k not in reshaped)
    # without the data's own classes another class count stays an error: the 3-class run into the 5-class preset
    cfg.data.dataset, cfg.data_root, cfg.init_checkpoint = "preset", None, str(run["work"] / "last.pth")
    with pytest.raises(DanetError, match="has 3 classes, the data of preset danet_tiny_synthetic 5; .* folder"):
        build_model(cfg, cfg.effective_preset())


def test_bad_own_class_settings_are_one_line(run, tmp_path, capsys):
    line = cli_error(capsys, "train", PRESET, "--work-dir", tmp_path / "w", "--set", "data.dataset=folder")
    assert "--data-root" in line
    line = cli_error(
        capsys, "train", PRESET, "--data-root", run["data"], "--work-dir", tmp_path / "w",
        "--set", "data.dataset=folder", "--set", "model.num_classes=4",
    )  # fmt: skip
    assert "3 classes" in line and "model.num_classes=4" in line
    line = cli_error(capsys, "train", PRESET, "--set", "data.dataset=mine")
    assert "'data.dataset' must be one of preset, folder" in line
    line = cli_error(capsys, "test", PRESET, "--checkpoint", run["work"] / "last.pth", "--dataset", "folder")
    assert "--data-root" in line
    line = cli_error(capsys, "train", PRESET, "--data-root", tmp_path / "nope", "--set", "data.dataset=folder")
    assert f"data root {tmp_path / 'nope'} does not exist" in line
    argv = ["test", PRESET, "--checkpoint", run["work"] / "last.pth", "--data-root", run["data"], "--dataset", "folder"]
    assert "add --tta" in cli_error(capsys, *argv, "--tta-merge", "logits")


def test_a_fine_tuning_run_resumes_without_its_init_checkpoint(run, tmp_path, capsys):
    five_class_checkpoint(run, tmp_path / "five.pth")
    work = tmp_path / "work"
    argv = ["train", PRESET, "--data-root", str(run["data"]), "--work-dir", str(work)]
    assert main([*argv, *sets(f"init_checkpoint={tmp_path / 'five.pth'}", "stop_iter=1")]) == 0
    assert "new classifiers" in capsys.readouterr().err
    (tmp_path / "five.pth").unlink()  # a resume reads its own weights, not the init checkpoint again
    assert main(["train", str(work / "config.yaml"), "--resume"]) == 0
    assert "new classifiers" not in capsys.readouterr().err
    assert read_checkpoint(work / "last.pth").train_state["iter"] == 4


def test_renamed_classes_are_refused_on_resume_and_test_and_start_new_classifiers(run, tmp_path, capsys):
    data = own_dataset(tmp_path / "data")
    work = tmp_path / "work"
    assert main(["train", PRESET, "--data-root", str(data), "--work-dir", str(work), *sets("stop_iter=1")]) == 0
    write_classes(data, ["soil", "fissure", "spot"])  # the same count, other classes
    line = cli_error(capsys, "train", work / "config.yaml", "--resume")
    assert "trained on 3 classes ['ground', 'crack', 'stain']" in line and "put the run's classes back" in line
    test = ["test", PRESET, "--checkpoint", work / "last.pth", "--data-root", data, "--dataset", "folder"]
    line = cli_error(capsys, *test)
    assert "was trained on 3 classes ['ground', 'crack', 'stain']" in line
    write_classes(data, ["ground", "crack", "stain", "rust"])  # another count: the same message, not num_classes
    line = cli_error(capsys, *test)
    assert "was trained on 3 classes ['ground', 'crack', 'stain'], but the data's classes file names 4" in line
    # fine-tuning the run on the renamed classes: new classifiers, everything else the run's
    write_classes(data, ["soil", "fissure", "spot"])
    cfg = apply_overrides(RunConfig(preset=PRESET, data_root=str(data), work_dir=str(tmp_path / "w2")), RUN_SETS)
    cfg.init_checkpoint = str(work / "last.pth")
    model = build_model(cfg, cfg.effective_preset())
    assert "names other classes than the data's: new classifiers" in capsys.readouterr().err
    old = read_checkpoint(work / "last.pth").state_dict
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, old[k]))
    assert len(changed) == 8 and all(k.startswith(CLASSIFIERS) for k in changed)


def test_danet_test_reads_mmsegmentation_files_with_a_text_config(tmp_path, capsys):
    """mmseg 0.x checkpoints hold their config as text (the mmseg_d8 fixture too): danet test reads them."""
    fixture = Path(__file__).parent / "fixtures" / "models" / "mmseg_d8.pth"
    data = own_dataset(tmp_path / "data", n=1, names=[f"class{i}" for i in range(5)])  # the fixture's 5 classes
    argv = ["test", "danet_r50-d8_ade20k", "--checkpoint", fixture, "--data-root", data, "--dataset", "folder"]
    assert main([*map(str, argv), "--no-progress", "--device", "cpu"]) == 0
    assert "class4" in capsys.readouterr().out
