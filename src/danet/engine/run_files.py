"""The files a training run leaves in its work dir besides checkpoints and logs: metrics.json and the pictures;
which files make a run (a fresh run refuses a work dir holding them); what to do after a divergence."""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DanetError, note
from ..files import atomic_copy, remove_dead_temporaries
from .logging import RunLogger, read_log, write_json


def after_divergence(work: Path, ours: bool = True) -> str:
    """What to do after a run diverged: resume from its last checkpoint, or start again when it has none (`ours`
    False: the work dir's last.pth is an earlier run's, which an overwrite=true run replaces at its first)."""
    if ours and (work / "last.pth").is_file():
        return f"--resume from {work / 'last.pth'} (the last checkpoint with finite weights)"
    return "start again (no epoch has finished: there is no checkpoint yet)"


# NOTE: not config.yaml or log.jsonl, which a run writes as it starts: a run that failed before its first epoch ended
# leaves only those, and the same command may run again
RUN_FILES = ("last.pth", "best.pth", "metrics.json", "curves.png", "per_class_iou.png", "confusion.png")


def run_outputs(work: Path, keep=()) -> list[Path]:
    """The files of a training run in `work` (not config.yaml alone, nor the user's other files); `keep`: paths (or
    None) of files the new run reads (its init_checkpoint), which are not counted."""
    if not work.is_dir():
        return []
    kept = {Path(p).resolve() for p in keep if p and Path(p).exists()}
    found = [work / n for n in RUN_FILES if (work / n).is_file()]
    found += sorted(p for p in work.glob("epoch_*.pth") if p.is_file())
    return [p for p in found if p.resolve() not in kept]


def recorded_iter(path: Path) -> int | None:
    """The iteration a run's checkpoint (its meta) or metrics.json records; None where there is none to read."""
    import torch

    try:
        if path.suffix == ".json":
            return int(json.loads(path.read_text())["iter"])
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["meta"]["iter"])
    except Exception:  # noqa: BLE001 - missing, foreign or damaged: nothing known about it
        return None


class WorkDirBusy(DanetError):
    """Another run holds the work dir (`WorkDirLock`)."""


class WorkDirLock:
    """Hold a work dir for one run: an exclusive POSIX lock on its `.lock` file (which names the holder's process id),
    kept until `release()` (which removes the file) or the end of the process, however it ends (its forked data
    loader workers do not hold it; a file left by a killed run is taken over by the next). A second run started in
    the same work dir meanwhile is refused in one line (two runs there would interleave their logs and replace each
    other's checkpoints). Where the system has no `fcntl` (Windows) or the file system no locks, nothing is locked
    (with a note there)."""

    def __init__(self) -> None:
        self.handle, self.path = None, None
        self.held = False  # this run may change the work dir's files

    def acquire(self, work: Path) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            self.held = True
            return
        path = work / ".lock"
        for _ in range(10):  # NOTE: a holder that released removed the file it locked: lock the file at the path
            try:
                if path.is_symlink():  # NOTE: replaced, never written through (it may point anywhere)
                    path.unlink()
                handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
            except OSError as e:
                raise DanetError(
                    f"cannot write in the work dir {work}: {e.strerror or e}; pick another --work-dir"
                ) from None
            try:  # NOTE: a POSIX lock is this process's own: forked children (data loader workers) do not hold it,
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # so it ends with the process, however it ends
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):  # NOTE: no locks on this file system (ENOLCK,
                    handle.close()  # ENOSYS: Lustre without -o flock, some network mounts): run without one
                    note(f"the work dir {work} cannot be locked ({e.strerror or e}): a second run started there "
                         "meanwhile would not be refused")  # fmt: skip
                    self.held = True
                    return
                handle.seek(0)
                pid = handle.read().strip()
                handle.close()
                who = f" (process {pid})" if pid.isdigit() else ""
                raise WorkDirBusy(
                    f"another danet train is running in {work}{who}; wait for it to end, or pick another --work-dir"
                ) from None
            if _is_open_file(path, handle):
                break
            handle.close()
        else:
            raise WorkDirBusy(f"cannot lock the work dir {work}: its .lock file keeps changing; try again")
        self.handle, self.path, self.held = handle, path, True
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        except OSError as e:  # NOTE: a full disk; the next run takes the (locked, then released) file over
            self.release()
            raise DanetError(
                f"cannot write in the work dir {work}: {e.strerror or e}; free some space, or pick another --work-dir"
            ) from None
        remove_dead_writers_files(work)

    def release(self) -> None:
        if self.handle is not None:
            try:  # NOTE: while still locked (see acquire), and only the file this run locked
                if _is_open_file(self.path, self.handle):
                    self.path.unlink()
            except OSError:
                pass  # a read-only or vanished work dir: the file stays, and the next run takes it over
            try:
                self.handle.close()
            except OSError:
                pass  # NOTE: a pid that did not fit on a full disk, flushed again: the lock ends with the file
        self.handle, self.path, self.held = None, None, False


def _is_open_file(path: Path, handle) -> bool:
    """Whether `path` names the file `handle` has open (not one made there since, nor nothing)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except OSError:
        return False


def remove_dead_writers_files(work: Path) -> list[Path]:
    """Remove the temporary files (`.<name>.tmp-<pid>`: checkpoints, the large ones) of a run's files that a writer
    killed hard (SIGKILL) left in `work`, where that process no longer runs; called holding the work dir's lock, so
    no other run is writing there. Returns what was removed."""
    names = "|".join([*map(re.escape, RUN_FILES), r"epoch_\d+\.pth"])
    return remove_dead_temporaries(work, rf"\.(?:{names})\.tmp-(?P<pid>\d+)")


# an overwrite=true run's, a resume's from an earlier checkpoint and a fork's config, log and best.pth until its first
# checkpoint has landed
STAGED = (".config.yaml.next", RunLogger.STAGED, ".best.pth.next")


@dataclass
class Resumed:
    """What a run resumed at iteration `it` does with the files around it (`resume_outputs`)."""

    later: list[Path]  # files of the work dir from after `it`, removed with the first checkpoint
    best: Path | None  # the run's best.pth in the folder it was resumed from, brought into a fork
    best_lost: bool  # the best so far has no checkpoint left: the next validation writes best.pth whatever its mIoU
    fork: bool  # resumed into another folder than the checkpoint's

    @property
    def staged(self) -> bool:
        """Whether the config and log wait for the first checkpoint (else they change at once)."""
        return bool(self.later) or self.fork


def resume_outputs(work: Path, resume: Path, it: int, ipe: int) -> Resumed:
    """In the checkpoint's own folder, the files of iterations after `it` (epochs of `ipe`) are an abandoned future (a
    resume from an earlier epoch_N.pth): the later epoch_K.pth, and best.pth and metrics.json where they record a
    later iteration, and that metrics.json's pictures. Into another folder (a fork), which must hold no run, nor a
    config or log (DanetError), the run's best.pth comes along where it is from before `it`."""
    if work.resolve() == resume.parent.resolve():  # NOTE: the folder it is in, not where a link to it points
        later = [p for p in work.glob("epoch_*.pth") if p.stem[6:].isdigit() and int(p.stem[6:]) * ipe > it]
        later += [work / n for n in ("best.pth", "metrics.json") if (recorded_iter(work / n) or 0) > it]
        if work / "metrics.json" in later:  # NOTE: its validation's pictures (curves.png is drawn again at the end)
            later += [work / n for n in ("per_class_iou.png", "confusion.png") if (work / n).is_file()]
        lost = work / "best.pth" in later or not (work / "best.pth").is_file()
        return Resumed(sorted(later), None, lost, fork=False)
    if found := run_outputs(work) + [work / n for n in ("config.yaml", "log.jsonl") if (work / n).is_file()]:
        raise DanetError(
            f"{work} holds another run ({', '.join(p.name for p in found[:4])}); resume {resume} into its own folder "
            f"({resume.parent}) or an empty --work-dir"
        )
    best = resume.parent / "best.pth"
    n = recorded_iter(best)
    return Resumed([], best if n is not None and n <= it else None, n is None or n > it, fork=True)


class FilesAround:
    """The files a run settles once its first checkpoint has landed, so that a run failing before it (or while
    writing it) leaves them as they were: an overwrite=true run's `earlier` run's files and a resume's `later` ones
    (an abandoned future) go; a `staged` config and log (`config_file`, the `logger`'s) and best.pth (staged from
    `best` at once: the run's best.pth in a fork's source folder, which may change meanwhile) move into place,
    the best.pth unless this run has written its own."""

    def __init__(self, work: Path, earlier: list[Path], resumed: Resumed | None, staged: bool, config_file: Path,
                 logger, is_main: bool) -> None:  # fmt: skip
        self.work, self.earlier, self.later = work, earlier, resumed.later if resumed else []
        self.staged, self.config_file, self.logger = staged, config_file, logger
        self.best = work / STAGED[2] if resumed and resumed.best else None
        if self.best and is_main:
            atomic_copy(resumed.best, self.best)

    @property
    def settled(self) -> bool:
        """Whether the work dir's files are this run's (its last.pth, if any, the run's own)."""
        return not self.staged

    def landed(self, checkpoint: Path) -> None:
        """`checkpoint` (in the work dir) has just been written: it replaced its own name already."""
        for old in (*self.earlier, *self.later):
            if old != checkpoint:
                old.unlink(missing_ok=True)
        if self.earlier:
            names = ", ".join(p.name for p in self.earlier)
            print(f"overwrite=true: removed the earlier run's {names} from {self.work}")
        if self.staged:
            os.replace(self.config_file, self.work / "config.yaml")
            self.logger.commit()
        if self.best is not None:
            if (self.work / "best.pth").exists():  # this run has written its own
                self.best.unlink(missing_ok=True)
            else:
                os.replace(self.best, self.work / "best.pth")
        self.earlier, self.later, self.best, self.staged = [], [], None, False


def write_metrics(work: Path, metrics: dict, best: float, best_iter, it: int, epoch: int, seconds: float) -> None:
    """metrics.json (atomic): the latest validation and the best mIoU so far (its confusion matrix: confusion.png)."""
    out = {"iter": it, "epoch": epoch, "seconds": round(seconds, 1), "best_mIoU": best, "best_iter": best_iter}
    out.update({k: v for k, v in metrics.items() if k != "confusion"})
    write_json(work / "metrics.json", out)


def draw_pictures(work: Path, preset, metrics: dict, stopped: bool = False) -> None:
    """curves.png (loss, lr, val mIoU vs iteration), per_class_iou.png and confusion.png (the last validation of this
    call, if any); `stopped`: at a `stop_iter`, before the schedule's end."""
    try:
        _draw_pictures(work, preset, metrics)
    except OSError as e:
        what, state = ("stopped", "resumable with --resume") if stopped else ("finished", "complete")
        raise DanetError(
            f"training {what} (checkpoints and metrics.json are in {work}) but a picture could not be written: "
            f"{e.filename or ''} {e.strerror or e}; free some space (the run itself is {state})"
        ) from None


def missing_pictures(work: Path) -> list[str]:
    """The names of a run's pictures that are not in `work`."""
    return [n for n in ("curves.png", "per_class_iou.png", "confusion.png") if not (work / n).is_file()]


def draw_missing_pictures(work: Path, preset, it: int) -> None:
    """The pictures of a finished run resumed at its last iteration `it`, where it stopped after its last checkpoint
    but before drawing them all (a full disk): the curves and the per-class IoU (from metrics.json's validation where
    that is of iteration `it`); the confusion matrix, which metrics.json does not keep, gets a note saying how."""
    if not (missing := missing_pictures(work)):
        return
    try:
        last = json.loads((work / "metrics.json").read_text())
    except (OSError, ValueError):
        last = {}
    last = last if isinstance(last, dict) and last.get("iter") == it else {}
    if "confusion.png" in missing and last.get("IoU") is not None:
        note(
            f"{work / 'confusion.png'} was not drawn and cannot be drawn again (metrics.json keeps no confusion "
            f"matrix): danet test {preset.name} --checkpoint {work / 'last.pth'} --json F.json draws F_confusion.png"
        )
    if missing != ["confusion.png"]:
        draw_pictures(work, preset, last)


def _draw_pictures(work: Path, preset, metrics: dict) -> None:
    from .. import viz

    viz.plot_training_curves(read_log(work / "log.jsonl"), work / "curves.png", title=f"{preset.title} training")
    if metrics.get("IoU") is not None:
        viz.plot_class_iou(
            preset.classes, metrics["IoU"], work / "per_class_iou.png", title=f"{preset.title}: per-class IoU",
            palette=preset.palette, miou=metrics.get("mIoU"),
        )  # fmt: skip
    if metrics.get("confusion") is not None:
        title = f"{preset.title}: val confusion"
        viz.plot_confusion(preset.classes, metrics["confusion"], work / "confusion.png", title)
