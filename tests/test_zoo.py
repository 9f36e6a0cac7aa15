"""The zoo: 12 rows with URLs; downloads are atomic, checked by loading, and fail in one line when offline."""

from __future__ import annotations

import json

import pytest
import torch

import danet
from danet import zoo
from danet.checkpoints import save_checkpoint
from danet.cli import main
from danet.errors import DanetError


def test_zoo_lists_twelve_rows_with_urls(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert out.count("checkpoint: https://github.com/SegmentationBLWX/modelstore/releases/download/ssseg_danet/") == 12
    assert "danet_resnet101os8_cityscapes_train.log" in out and "80.55" in out
    assert main(["zoo", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 12 and rows[0]["published_miou"] == 76.39
    assert all(r["log_url"].endswith("_train.log") for r in rows)


def _tiny_checkpoint(path):
    model = danet.create_model("danet_tiny_synthetic", base_channels=8, stem_channels=8, head_channels=16)
    save_checkpoint(path, model, "danet_tiny_synthetic")
    return model


ADE_FILE = "danet_resnet50os8_ade20k_train.pth"  # danet_r50-d8_ade20k's published file


def test_download_from_file_url_loads_as_the_preset(tmp_path, capsys):
    model = _tiny_checkpoint(tmp_path / "src.pth")
    cache = tmp_path / "cache"
    url = (tmp_path / "src.pth").as_uri()
    assert main(["zoo", "download", "danet_tiny_synthetic", "--url", url, "--cache", str(cache), "--no-progress"]) == 0
    assert "loads as danet_tiny_synthetic" in capsys.readouterr().out
    got = danet.create_model("danet_tiny_synthetic", checkpoint=cache / "src.pth")
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), model.state_dict().values(), strict=True))
    assert [p.name for p in cache.iterdir()] == ["src.pth"]  # no partial files left


def test_download_of_a_file_that_does_not_fit_is_removed(tmp_path):
    _tiny_checkpoint(tmp_path / "src.pth")
    with pytest.raises(DanetError, match="does not load as danet_r50-d8_ade20k") as e:
        zoo.download("danet_r50-d8_ade20k", tmp_path / "cache", url=(tmp_path / "src.pth").as_uri(), progress=False)
    assert not list((tmp_path / "cache").iterdir())
    assert ".part-" not in str(e.value) and f"{ADE_FILE} has 5 classes" in str(e.value)  # not the temporary name


def test_a_file_already_in_the_cache_that_does_not_fit_is_kept(tmp_path):
    """A file put in the cache by hand (no download in this call) is the user's: an error names it, nothing is
    deleted."""
    cache = tmp_path / "cache"
    cache.mkdir()
    _tiny_checkpoint(cache / ADE_FILE)  # the published file's name, wherever --url fetches it from
    before = (cache / ADE_FILE).read_bytes()
    with pytest.raises(DanetError, match="does not load as danet_r50-d8_ade20k.*replace it, or add --force") as e:
        zoo.download("danet_r50-d8_ade20k", cache, url="https://example.org/src.pth", progress=False)
    assert (cache / ADE_FILE).read_bytes() == before
    assert str(e.value).count("; ") == 1  # one remedy (the loader's own 'download it again' is this one's)


def test_a_forced_download_that_does_not_fit_leaves_the_cache_as_it_was(tmp_path):
    """--force with a bad file, from another place or from the cached file itself (--url file:// pointing at the
    destination): the download is dropped before it replaces anything, so the user's file is never deleted."""
    cache = tmp_path / "cache"
    cache.mkdir()
    mine = cache / ADE_FILE
    _tiny_checkpoint(mine)
    before = mine.read_bytes()
    for source in (mine, tmp_path / "src.pth"):  # (a mirror's other name)
        if source != mine:
            _tiny_checkpoint(source)
        with pytest.raises(DanetError, match=rf"does not load as danet_r50-d8_ade20k \(not kept; {mine} is unchanged"):
            zoo.download("danet_r50-d8_ade20k", cache, url=source.as_uri(), force=True, progress=False)
        assert mine.read_bytes() == before and [p.name for p in cache.iterdir()] == [ADE_FILE]


def test_a_download_with_a_flipped_bit_is_not_kept(tmp_path):
    """torch.load reads a bit flipped in the weights silently; the download's CRCs tell."""
    import zipfile

    from test_faults_checkpoint_review import _flip_a_bit_in

    src = tmp_path / "src.pth"
    _tiny_checkpoint(src)
    with zipfile.ZipFile(src) as archive:
        biggest = max(archive.infolist(), key=lambda i: i.file_size).filename
    _flip_a_bit_in(src, biggest)
    with pytest.raises(DanetError, match=rf"does not load as danet_tiny_synthetic .*Bad CRC-32 for file '{biggest}'"):
        zoo.download("danet_tiny_synthetic", tmp_path / "cache", url=src.as_uri(), progress=False)
    assert not list((tmp_path / "cache").iterdir())


def test_offline_download_fails_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(zoo, "checkpoint_url", lambda preset: "http://127.0.0.1:9/danet.pth")
    rc = main(["zoo", "download", "danet_r50-d8_ade20k", "--cache", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "cannot download http://127.0.0.1:9/danet.pth" in err[0] and "offline" in err[0]
    assert not list(tmp_path.iterdir())


def test_preset_without_checkpoint(tmp_path):
    with pytest.raises(DanetError, match="no published checkpoint"):
        zoo.download("danet_tiny_synthetic", tmp_path)


def test_a_mirror_s_file_is_cached_under_the_published_name_and_a_missing_file_url_says_so(tmp_path, monkeypatch):
    """--url fetched into the cache under the mirror's name, so the next download (without --url) did not find it;
    a file:// URL that names no file said 'check the network (offline?)'."""
    src = tmp_path / "mirror_copy.pth"
    _tiny_checkpoint(src)
    monkeypatch.setattr(zoo, "checkpoint_url", lambda preset: "https://example.org/published_name.pth")
    got = zoo.download("danet_tiny_synthetic", tmp_path / "cache", url=src.as_uri(), progress=False)
    assert got == tmp_path / "cache" / "published_name.pth"
    assert zoo.download("danet_tiny_synthetic", tmp_path / "cache", progress=False) == got  # found, not fetched
    with pytest.raises(
        DanetError, match=r"cannot read file://.*nothere\.pth: No such file or directory; check the path"
    ):
        zoo.download("danet_tiny_synthetic", tmp_path / "c2", url=(tmp_path / "nothere.pth").as_uri(), progress=False)


def test_a_cached_file_s_reason_is_kept_whole_beside_the_remedy(tmp_path):
    """Cutting the loader's message at its last '; ' dropped a reason's own second part ('the file is damaged')."""
    cache = tmp_path / "cache"
    cache.mkdir()
    _tiny_checkpoint(cache / "src.pth")
    raw = torch.load(cache / "src.pth", weights_only=True)
    raw["model"][next(k for k in raw["model"] if k.endswith("running_var"))][0] = -1.0
    torch.save(raw, cache / "src.pth")
    with pytest.raises(DanetError) as e:
        zoo.download("danet_tiny_synthetic", cache, url="https://example.org/src.pth", progress=False)
    assert str(e.value).endswith("running_var; the file is damaged; replace it, or add --force")
