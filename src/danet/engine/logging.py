"""Run records: a JSON-lines log (one object per logged step or validation), TensorBoard when it is installed.

Only rank 0 writes. Every line is flushed at once, so a crashed run keeps its log; on --resume the lines after the
checkpoint's iteration are dropped so the log reads as one run.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import DanetError, os_hint
from ..files import atomic_write_text, replace_target


class RunLogger:
    """Append records to `work_dir/log.jsonl` (and TensorBoard scalars under `work_dir/tensorboard`)."""

    STAGED = ".log.jsonl.next"

    def __init__(
        self,
        work_dir: str | Path,
        enabled: bool = True,
        resume_iter: int | None = None,
        revalidate: bool = False,
        staged: bool = False,
        history: Path | None = None,
    ) -> None:
        """resume_iter: drop the records after this iteration (a resume); revalidate: also its validation, which
        the resumed run does again (it stopped before the checkpoint said it was done); staged: write to
        `.log.jsonl.next` until `commit` moves it in place of log.jsonl (a run that leaves the folder as it was until
        its first checkpoint: overwrite=true, a resume from an earlier checkpoint, a fork); history: the log whose
        records up to resume_iter this one starts with (a fork's: the log of the checkpoint's folder; default the
        work dir's own)."""
        self.final = Path(work_dir) / "log.jsonl"
        self.path = self.final.with_name(self.STAGED) if staged else self.final
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iter is not None:  # NOTE: staged, the truncated log goes to the staged file; log.jsonl keeps its own
            truncate_log(history or self.final, resume_iter, drop_val=revalidate, out=self.path)
        elif self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log
        try:  # optional dependency
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(work_dir) / "tensorboard"), purge_step=resume_iter)
        except Exception:  # noqa: BLE001 - tensorboard missing or broken: the JSON log is enough
            self.tb = None

    def log(self, kind: str, **values: Any) -> None:
        """Write one record {"type": kind, "time": unix seconds, **values}."""
        if not self.enabled:
            return
        record = {"type": kind, "time": round(time.time(), 3), **values}
        line = (json.dumps(jsonable(record)) + "\n").encode()
        with open(self.path, "ab", buffering=0) as f:  # NOTE: unbuffered: a failed write fails here, not at close
            start = f.tell()
            try:
                while line:
                    line = line[f.write(line) :]
            except OSError as e:
                with contextlib.suppress(OSError):
                    f.truncate(start)  # no torn line
                raise DanetError(
                    f"cannot write {self.path}: {e.strerror or e}; free some space, then --resume from the last "
                    "checkpoint"
                ) from None
        if self.tb is not None and "iter" in values:
            for k, v in values.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("iter", "epoch"):
                    self.tb.add_scalar(f"{kind}/{k}", v, values["iter"])

    def commit(self) -> None:
        """A staged log: move it in place of log.jsonl (and go on writing there)."""
        if self.enabled and self.path != self.final:
            if self.path.exists():
                self.path.replace(self.final)
            self.path = self.final

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class LossWindow:
    """The losses and speed of the steps since the last log line. A checkpoint holds the window's sums (`state`), so
    that the first line after a resume averages the same steps as a run that was never stopped."""

    def __init__(self, batch_size: int, device) -> None:
        self.batch_size, self.device = batch_size, device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.timed, self.since = 0, 0, time.time()  # timed: the steps of this process (the speed's)

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.timed += 1

    def state(self) -> dict:
        """The window for a checkpoint: its sums (the mean over the ranks: a collective, every rank calls it at the
        same step) and steps."""
        from .distributed import mean_over_ranks

        return {"sums": mean_over_ranks(self.sums, self.device), "steps": self.steps}

    def restore(self, state: dict | None) -> None:
        """Continue a checkpoint's window (None, from a checkpoint written before windows were saved, or one not
        readable as a window: a new one; only the log's next line depends on it)."""
        self.reset()
        try:
            sums, steps = {str(k): float(v) for k, v in state["sums"].items()}, int(state["steps"])
        except (TypeError, ValueError, KeyError, AttributeError):
            return
        if steps > 0:
            self.sums, self.steps = sums, steps

    def record(self) -> tuple[dict[str, float], float, float]:
        """(the mean losses, images/s, steps/s) of the window, which starts again. NOTE: each rank's loss is that of
        its share of the batch; the record is the whole batch's (their mean, as DDP's gradient): a collective, so
        every rank calls it at the same step."""
        from .distributed import mean_over_ranks

        dt = max(time.time() - self.since, 1e-9)
        means = {k: round(v / self.steps, 5) for k, v in mean_over_ranks(self.sums, self.device).items()}
        img_s, steps_s = self.timed * self.batch_size / dt, self.timed / dt
        self.reset()
        return means, img_s, steps_s


def read_log(path: str | Path) -> list[dict]:
    """All records of a log.jsonl (a torn last line, from a crash, is skipped)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_log(path: Path, max_iter: int, drop_val: bool = False, out: Path | None = None) -> None:
    """Keep only the records up to global iteration `max_iter` (records without "iter" are kept); `drop_val`: not
    a validation at `max_iter` either. `out`: write them there instead (a staged log), which starts empty where
    `path` has none."""
    out = out or path
    if not path.exists():
        if out != path:
            out.unlink(missing_ok=True)
        return

    def kept(r: dict) -> bool:
        it = r.get("iter", 0)
        return it < max_iter or (it == max_iter and not (drop_val and r.get("type") == "val"))

    keep = [r for r in read_log(path) if kept(r)]
    out.write_text("".join(json.dumps(r) + "\n" for r in keep))


def jsonable(v: Any) -> Any:
    """Plain JSON values: tensors/arrays as lists, NaN/inf as null (strict JSON has no NaN)."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return jsonable(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def check_output_file(path: Path, flag: str) -> None:
    """Before the work that fills it: `path` (given as `flag`) is a file name, not a folder (nor a device or pipe),
    and its folder exists or can be made and takes a new file; else a one-line DanetError."""
    if path.is_dir():
        raise DanetError(f"{flag} {path} is a folder; give a file name")
    if str(path) == "-":  # NOTE: not stdout (the table goes there): a file named "-" would be a surprise
        raise DanetError(f"{flag} - would write a file named '-'; give a file name (e.g. {flag} metrics.json)")
    target = replace_target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DanetError(f"cannot create the output folder {target.parent}: {e.strerror or e}") from None
    try:  # NOTE: as the atomic write will (a read-only or forbidden folder fails here, not after the work)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as e:
        hint = os_hint(e, "pick another path", elsewhere=f"give {flag} another folder")
        raise DanetError(f"cannot write {flag} {path}: {e.strerror or e}; {hint}") from None


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    try:
        atomic_write_text(Path(path), json.dumps(jsonable(obj), indent=2) + "\n")
    except OSError as e:  # a missing/blocked folder, a full disk: one line, the previous file stays
        hint = os_hint(e, "check the folder and free space")
        raise DanetError(f"cannot write {path}: {e.strerror or e}; {hint} (the previous file is kept)") from None
