"""The preset table: 12 zoo rows named as in REFERENCE.md, ssseg aliases, and the data each preset carries."""

import numpy as np
import pytest

import danet
from danet.cli import main
from danet.data.transforms import random_scale
from danet.presets import ALIASES, PRESETS, get_preset

ZOO = [n for n in PRESETS if n != "danet_tiny_synthetic"]


def test_twelve_zoo_rows_with_aliases():
    assert len(ZOO) == 12
    for depth in (50, 101):
        for os_ in (8, 16):
            for data, alias_data in (("voc12aug", "voc"), ("ade20k", "ade20k"), ("cityscapes", "cityscapes")):
                p = get_preset(f"danet_r{depth}-d{os_}_{data}")
                assert p.model.depth == depth and p.model.output_stride == os_
                assert get_preset(f"danet_resnet{depth}os{os_}_{alias_data}") is p
    assert len(ALIASES) == 12


@pytest.mark.parametrize("name", ZOO)
def test_zoo_preset_data(name):
    p = get_preset(name)
    assert len(p.classes) == len(p.palette) == p.num_classes
    assert p.model.layout == "ssseg"
    assert p.mean == (123.675, 116.28, 103.53) and p.std == (58.395, 57.12, 57.375)
    assert p.schedule.lr == 0.01 and p.schedule.momentum == 0.9 and p.schedule.weight_decay == 5e-4
    assert p.tta_scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert p.checkpoint_url.endswith(f"ssseg_danet/{p.alias}_train.pth")
    assert p.published_miou > 40


def test_schedules_match_reference_iterations():
    # REFERENCE.md: about 40k / 160k / 80k iterations
    assert get_preset("danet_r50-d8_voc12aug").total_iters == 60 * (10582 // 16)
    assert abs(get_preset("danet_r50-d8_ade20k").total_iters - 160_000) < 5_000
    assert abs(get_preset("danet_r50-d8_cityscapes").total_iters - 80_000) < 2_000
    assert get_preset("danet_r50-d8_cityscapes").crop_size == (512, 1024)
    assert get_preset("danet_r50-d8_ade20k").dataset.reduce_zero_label
    assert not get_preset("danet_r50-d8_voc12aug").dataset.reduce_zero_label


@pytest.mark.parametrize("name", ZOO)
def test_zoo_loss_is_reduced_per_reference_gpu(name):
    """sssegmentation's zoo trains on 8 GPUs, each reducing the loss over its own images (2; Cityscapes 1)."""
    s = get_preset(name).schedule
    assert s.loss_images * 8 == s.batch_size and s.loss_images == (1 if "cityscapes" in name else 2)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(danet.DanetError) as e:
        get_preset("danet_r50-d8_ade")
    msg = str(e.value)
    assert "danet_r50-d8_ade20k" in msg and "danet_r101-d16_cityscapes" in msg and "\n" not in msg
    with pytest.raises(danet.DanetError):
        danet.create_model("resnet50")


def test_cli_models_lists_presets(capsys):
    assert main(["models"]) == 0
    assert capsys.readouterr().out.split() == danet.list_models()


def test_tiny_synthetic_trains_at_128px_scales_and_tests_at_192px():
    """The main job's preset tests at 1.5x the scenes' 128 px; its training sizes are still 128 px x 0.5-2.0."""
    p = get_preset("danet_tiny_synthetic")
    assert p.base_size == (192, 192)
    draws = np.random.default_rng(0)
    same = np.random.default_rng(0)
    for _ in range(10_000):
        assert random_scale(p.base_size, p.ratio_range, draws) == random_scale((128, 128), (0.5, 2.0), same)


def test_min_lr_follows_the_lr_as_sssegmentation_s_scheduler():
    """sssegmentation decays to lr / 100 when its config names no min_lr (none of its DANet configs does): 1e-4 at
    the zoo's lr 0.01, and 2e-4 for a run that sets lr 0.02; an explicit min_lr, and the synthetic preset's, stay."""
    from danet.config import from_dict, load_run_config, to_dict
    from danet.engine.schedule import final_lr

    def floor(preset, *sets):
        s = load_run_config(preset, list(sets)).resolve().schedule
        return final_lr(s.lr, s.min_lr)

    zoo = "danet_r50-d8_ade20k"
    assert floor(zoo) == pytest.approx(1e-4) and floor(zoo, "schedule.lr=0.02") == pytest.approx(2e-4)
    assert floor(zoo, "schedule.lr=0.02", "schedule.min_lr=0") == 0
    assert floor("danet_tiny_synthetic") == 1e-4 and floor("danet_tiny_synthetic", "schedule.lr=0.05") == 1e-4
    # a run's recorded config keeps "lr / 100" (null), so rerunning it with another lr follows that lr too
    recorded = from_dict(to_dict(load_run_config(zoo).resolve()))
    recorded.schedule.lr = 0.02
    assert recorded.schedule.min_lr is None and final_lr(recorded.schedule.lr, recorded.schedule.min_lr) == 2e-4
