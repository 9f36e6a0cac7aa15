"""`danet zoo`: the 12 published sssegmentation DANet rows; `danet zoo download NAME`: fetch and check a checkpoint.

    danet zoo                                   # table: preset, ssseg config, schedule, mIoU, checkpoint and log URLs
    danet zoo --json                            # the same as JSON
    danet zoo download danet_r50-d8_ade20k      # -> ~/.cache/danet/checkpoints/danet_resnet50os8_ade20k_train.pth

Downloads go to a temporary file beside the target and are renamed into place when complete; the file is then
loaded as the preset's model (`danet.checkpoints.load_model`), so a truncated or wrong file is caught at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from .errors import DanetError
from .files import discard, replace_target, temp_beside
from .presets import PRESETS, Preset, get_preset

CHUNK = 1 << 20
TIMEOUT_S = 30


def zoo_rows() -> list[Preset]:
    """The presets with a published checkpoint (the 12 seed-table rows), in table order."""
    return [p for p in PRESETS.values() if p.alias]


def checkpoint_url(preset: Preset) -> str | None:
    return preset.checkpoint_url


def default_cache() -> Path:
    """`$DANET_CACHE/checkpoints` (default ~/.cache/danet/checkpoints)."""
    return Path(os.environ.get("DANET_CACHE") or Path.home() / ".cache" / "danet").expanduser() / "checkpoints"


def table() -> str:
    """The zoo as text: one line per row, then its checkpoint and log URLs."""
    head = f"{'preset':26s} {'ssseg config':30s} {'crop':>9s} {'batch x epochs':>14s} {'mIoU':>6s}"
    lines = [head, "-" * len(head)]
    for p in zoo_rows():
        crop = "x".join(map(str, p.crop_size))
        sched = f"{p.schedule.batch_size} x {p.schedule.epochs}"
        lines.append(f"{p.name:26s} {p.alias:30s} {crop:>9s} {sched:>14s} {p.published_miou:6.2f}")
        lines.append(f"    checkpoint: {p.checkpoint_url}")
        lines.append(f"    log:        {p.log_url}")
    lines.append("mIoU: sssegmentation's published single-scale val result. Download: danet zoo download PRESET")
    return "\n".join(lines)


def rows_json() -> list[dict]:
    return [
        {
            "preset": p.name,
            "ssseg_config": p.alias,
            "dataset": p.dataset.name,
            "crop_size": list(p.crop_size),
            "batch_size": p.schedule.batch_size,
            "epochs": p.schedule.epochs,
            "published_miou": p.published_miou,
            "checkpoint_url": p.checkpoint_url,
            "log_url": p.log_url,
        }
        for p in zoo_rows()
    ]


def fetch(url: str, dest: Path, progress: bool = True, check=None) -> Path:
    """Download `url` to `dest` atomically (temp file + rename); DanetError in one line when it cannot.

    check: called with the complete temporary file before it replaces `dest` (a DanetError from it leaves `dest` as
    it was and the download removed)."""
    try:
        request = urllib.request.Request(url)
    except ValueError as e:  # "unknown url type": not a URL at all
        raise DanetError(
            f"cannot download {url}: {e}; give a full URL (https://... or file:///path/file.pth)"
        ) from None
    if dest.parent.exists() and not dest.parent.is_dir():
        raise DanetError(f"download folder {dest.parent} is a file, not a folder; give another --cache")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DanetError(
            f"cannot create download folder {dest.parent}: {e.strerror or e}; give another --cache"
        ) from None
    dest = replace_target(dest, follow=False)
    tmp = temp_beside(dest, "part-")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp, open(tmp, "wb") as f:
            size = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress
            ) as bar:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            if size is not None and f.tell() != size:
                raise DanetError(f"download of {url} stopped at {f.tell()} of {size} bytes; run the command again")
        if check is not None:
            check(tmp)
        os.replace(tmp, dest)
    except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
        reason = getattr(e, "reason", None) or e
        if url.startswith("file://"):
            why = getattr(reason, "strerror", None) or reason
            raise DanetError(f"cannot read {url}: {why}; check the path") from None
        raise DanetError(
            f"cannot download {url}: {reason}; check the network (offline?) or fetch the file by hand into {dest}"
        ) from None
    except OSError as e:
        raise DanetError(f"cannot write {dest}: {e.strerror or e}; check free space and permissions") from None
    finally:
        discard(tmp)
    return dest


def download(
    name: str, cache: str | Path | None = None, url: str | None = None, force: bool = False, progress: bool = True
) -> Path:
    """Fetch a preset's published checkpoint into the cache (once) and check it loads as that preset's model."""
    from .checkpoints import load_model, verify_archive

    preset = get_preset(name)
    url = url or checkpoint_url(preset)
    if not url:
        rows = ", ".join(p.name for p in zoo_rows())
        raise DanetError(f"preset {preset.name} has no published checkpoint; zoo rows: {rows}")
    dest = Path(cache).expanduser() if cache else default_cache()
    # NOTE: the published file's name, also when fetched from a mirror (--url): the next download finds it there
    dest = dest / (Path(urlparse(checkpoint_url(preset) or url).path).name or f"{preset.name}.pth")
    if dest.is_file() and not force:  # NOTE: a file already in the cache (perhaps put there by hand) is the user's
        try:
            load_model(dest, preset.model, remedy="")
        except DanetError as e:
            why = re.sub(r"[;:] download or save it again$", "", str(e))  # NOTE: its remedy is this one's
            raise DanetError(f"{dest} does not load as {preset.name}: {why}; replace it, or add --force") from None
        return dest

    def check(tmp: Path) -> None:  # before the download replaces anything: a bad one is removed, the cache kept
        try:
            verify_archive(tmp)  # NOTE: torch.load reads a flipped bit in the weights without a word; the CRCs do not
            load_model(tmp, preset.model, remedy="")
        except DanetError as e:
            kept = f"; {dest} is unchanged" if dest.is_file() else ""
            why = str(e).replace(str(tmp), dest.name).replace(tmp.name, dest.name)  # not the temporary name
            raise DanetError(f"the file from {url} does not load as {preset.name} (not kept{kept}): {why}") from None

    fetch(url, dest, progress, check)
    return dest


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the zoo as JSON")
    sub = parser.add_subparsers(dest="zoo_command", metavar="{download}")
    d = sub.add_parser("download", help="download a published checkpoint into the cache and check it loads")
    d.add_argument("name", help="a zoo preset (or its ssseg config name)")
    d.add_argument("--cache", help="download folder (default $DANET_CACHE/checkpoints or ~/.cache/danet/checkpoints)")
    d.add_argument("--url", help="fetch from this URL (a mirror, or file://) instead of the published one")
    d.add_argument("--force", action="store_true", help="download again even if the file is in the cache")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args) -> int:
    if getattr(args, "zoo_command", None) == "download":
        path = download(args.name, args.cache, args.url, args.force, progress=not args.no_progress)
        print(f"{path} (loads as {get_preset(args.name).name})")
        return 0
    print(json.dumps(rows_json(), indent=2) if args.json else table())
    return 0
