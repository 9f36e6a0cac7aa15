"""Run configs: YAML round trip, preset resolution, dotted overrides with type checks."""

from __future__ import annotations

import pytest

from danet.config import RunConfig, apply_overrides, load_run_config, valid_keys
from danet.errors import DanetError
from danet.presets import get_preset


def test_yaml_round_trip_of_a_resolved_config(tmp_path):
    cfg = apply_overrides(
        RunConfig(preset="danet_tiny_synthetic"),
        ["schedule.epochs=3", "data.crop_size=[64,48]", "amp=bf16", "model.head_channels=32", "stop_iter=7"],
    ).resolve()
    cfg.save(tmp_path / "config.yaml")
    back = RunConfig.load(tmp_path / "config.yaml")
    assert back == cfg
    assert back.data.crop_size == (64, 48) and isinstance(back.data.crop_size, tuple)
    assert back.schedule.batch_size == get_preset("danet_tiny_synthetic").schedule.batch_size  # from the preset
    assert back.model == {"head_channels": 32}
    assert not list(tmp_path.glob(".*"))  # atomic write leaves no temp file


def test_effective_preset_applies_overrides():
    cfg = apply_overrides(RunConfig(), ["schedule.lr=0.05", "data.crop_size=32", "model.output_stride=16"])
    p = cfg.effective_preset()
    base = get_preset("danet_tiny_synthetic")
    assert p.schedule.lr == 0.05 and p.schedule.epochs == base.schedule.epochs
    assert p.crop_size == (32, 32) and p.base_size == base.base_size
    assert p.model.output_stride == 16 and p.model.num_classes == base.num_classes


def test_preset_name_or_yaml(tmp_path):
    cfg = load_run_config("danet_r50-d8_ade20k", ["seed=3"], work_dir="w")
    assert (cfg.preset, cfg.seed, cfg.work_dir) == ("danet_r50-d8_ade20k", 3, "w")
    path = tmp_path / "run.yaml"
    path.write_text("preset: danet_tiny_synthetic\nschedule: {epochs: 2}\n")
    cfg = load_run_config(str(path), ["schedule.batch_size=4"])
    assert (cfg.schedule.epochs, cfg.schedule.batch_size) == (2, 4)


@pytest.mark.parametrize(
    "override, words",
    [
        ("schedule.epoch=3", ["unknown setting 'schedule.epoch'", "schedule.epochs"]),
        ("lr=0.1", ["unknown setting 'lr'", "schedule.lr"]),
        ("model.width=3", ["model.width", "head_channels"]),
        ("schedule.epochs=three", ["schedule.epochs", "integer"]),
        ("schedule.lr=fast", ["schedule.lr", "number"]),
        ("amp=fp8", ["amp", "none, bf16, fp16"]),
        ("data.crop_size=[1,2,3]", ["data.crop_size", "2 values"]),
        ("deterministic=maybe", ["deterministic", "true or false"]),
        ("noequals", ["key=value"]),
    ],
)
def test_bad_override_names_the_valid_choices(override, words):
    with pytest.raises(DanetError) as e:
        apply_overrides(RunConfig(), [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_yaml_file(tmp_path):
    (tmp_path / "a.yaml").write_text("preset: danet_tiny_synthetic\nschedul: {epochs: 2}\n")
    with pytest.raises(DanetError, match="unknown setting 'schedul'"):
        load_run_config(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("preset: no_such_preset\n")
    with pytest.raises(DanetError, match="unknown preset"):
        load_run_config(str(tmp_path / "b.yaml"))
    with pytest.raises(DanetError, match="not found"):
        load_run_config(str(tmp_path / "missing.yaml"))


def test_valid_keys_cover_the_sections():
    keys = valid_keys()
    assert {"schedule.epochs", "data.crop_size", "amp", "loss", "stop_iter"} <= set(keys)
    assert any(k.startswith("model.<") for k in keys)


def test_none_clears_an_optional_value():
    cfg = apply_overrides(RunConfig(stop_iter=5), ["stop_iter=null"])
    assert cfg.stop_iter is None
