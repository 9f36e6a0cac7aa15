"""The `danet` command. Each subcommand lives in the module that does the work; this file only dispatches.

A module named in COMMANDS provides `add_cli(parser)` (arguments) and `run_cli(args) -> int` (exit status).
Errors a user can cause (DanetError) are printed as one line, exit status 2, no traceback unless --debug; so is an
OSError no command caught itself (a full disk, a permission), with what to do.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings

from .errors import DanetError, os_hint

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("danet.engine.train_cli", "train a preset or a config file (torchrun for many GPUs)"),
    "test": ("danet.engine.test_cli", "evaluate a checkpoint: mIoU, per-class table, multi-scale + flip"),
    "predict": ("danet.engine.predict", "segment your own images into palette PNGs and overlays"),
    "data": ("danet.data.cli", "prepare (convert) or check a dataset"),
    "convert": ("danet.convert", "convert an sssegmentation / mmsegmentation checkpoint to this project's"),
    "zoo": ("danet.zoo", "list the model zoo, or download a published checkpoint"),
    "benchmark": ("danet.benchmark.cli", "measure speed, memory and FLOPs of a preset"),
    "export": ("danet.export", "export a checkpoint to ONNX or torch.export"),
    "models": ("danet.models.registry", "list the preset names"),
}


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, as every other error of the command (argparse prints the whole usage
    first): what is wrong, and where the options are listed."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="danet", description="DANet semantic segmentation")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):  # that subcommand is not built yet
                continue
            raise
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        mod.add_cli(p)
        p.set_defaults(_run=mod.run_cli)
    return parser


def one_line(e: DanetError) -> str:
    """The error's message. NOTE: a DanetError raised in a DataLoader worker is re-raised by torch with the worker's
    traceback in its text ("Caught DanetError in DataLoader worker process 0. Original Traceback ..."); keep the
    original message, its last line."""
    text = str(e).strip()
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1].split("DanetError: ", 1)[-1]
    return text


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a batch scheduler's time limit, torchrun stopping the other processes of a failed run),
    raised where the command is, so that it ends as an interrupt does: files being written removed, one line."""


def _on_sigterm(signum, frame) -> None:
    # NOTE: torch's SIGCHLD handler raises when a data loader's worker dies of a signal; a SIGTERM sent to the
    # process group ends the workers too, and the iterators' __del__ met that error while Terminated unwound their
    # frames ("Exception ignored in ... __del__", 20 lines): the process is ending, so it is dropped from here on
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # NOTE: a file name that is not valid UTF-8 is printed escaped, not
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):  # a UnicodeEncodeError
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # NOTE: named by the subcommand they were given to (argparse names the top-level parser)
        nested = [v for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str)]  # data check
        command = " ".join(["danet", *([args.command] if getattr(args, "command", None) else []), *nested])
        parser.exit(2, f"{command}: error: unrecognized arguments: {' '.join(extra)}; see {command} --help\n")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    # NOTE: only the main thread may set a handler, and one set by a program that embeds danet is left to it. Not
    # under torchrun with several processes: a Python handler runs only when the C++ call returns, and a process
    # waiting in a collective for a hung peer would then outlive torchrun's SIGTERM until its SIGKILL
    alone = os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1")
    ours = (
        alone
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )
    if ours:
        signal.signal(signal.SIGTERM, _on_sigterm)
    shown = warnings.formatwarning
    if not args.debug:  # NOTE: a warning is one line, as a note is (not "file:line: UserWarning:" and a source line)
        warnings.formatwarning = _one_line_warning
    try:
        return _run(args)
    finally:
        warnings.formatwarning = shown
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def _run(args) -> int:
    try:
        return int(args._run(args) or 0)
    except DanetError as e:
        if args.debug:
            raise
        say(f"danet {args.command}: error: {one_line(e)}")
        return 2
    except Terminated:
        return terminated(args.command)
    except KeyboardInterrupt:
        say(f"danet {args.command}: interrupted")
        return 130
    except BrokenPipeError:  # the reader of the output went away (`danet zoo | head -1`): as a Unix tool, quietly
        # NOTE: stdout still holds unflushed bytes; pointing it at /dev/null keeps the interpreter's exit from failing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by the broken pipe
    except OSError as e:  # NOTE: a safety net: a file the commands did not expect to fail (disk full, permissions)
        if args.debug:
            raise
        say(f"danet {args.command}: error: {os_error_line(e)}")
        return 2
    except Exception as e:  # NOTE: MemoryError, or torch's / OpenCV's error for a failed allocation (also raised
        # again from a data loader's process); under torchrun, the processes left waiting when another one stopped
        if args.debug:
            raise
        if "killed by signal: Terminated" in str(e):  # SIGTERM to the loader's processes too (a scheduler stopping a
            return terminated(args.command)  # job signals all of them)
        if out_of_memory(e):
            say(
                f"danet {args.command}: error: out of memory ({last_line(e)[:200]}); use smaller images or batches "
                "(the sizes and batch the command was given), or a machine with more memory"
            )
            return 2
        if not (isinstance(e, RuntimeError) and peer_stopped(e)):
            raise
        first = str(e).strip().splitlines()[0][:200]
        say(f"danet {args.command}: error: another process of this run stopped ({first}); its own error line says why")
        return 2


def terminated(command: str) -> int:
    """The end of a command stopped by SIGTERM: one line, exit status 143 (128 + SIGTERM, as a shell reports it)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # NOTE: see _on_sigterm (a Terminated raised elsewhere)
    say(f"danet {command}: stopped (SIGTERM)")
    return 143


def say(line: str) -> None:
    """One line on stderr in one write: under torchrun every process's line lands whole (print writes the text and
    its newline separately, and two processes' lines ran together)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


# what torch (CPU allocator, CUDA), NumPy and OpenCV say when an allocation fails
NO_MEMORY = ("can't allocate memory", "out of memory", "Insufficient memory", "Unable to allocate",
             "Failed to allocate")  # fmt: skip


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is a failed allocation: MemoryError (NumPy's too), or a library's error saying so."""
    return isinstance(e, MemoryError) or any(w in str(e) for w in NO_MEMORY)


def last_line(e: BaseException) -> str:
    """The error's own last line (one raised again from a data loader's process carries that process's traceback)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def peer_stopped(e: RuntimeError) -> bool:
    """Whether `e` is a collective (gloo / NCCL) failing because another process of a torchrun run went away."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1") and any(w in str(e) for w in PEER_GONE)


def os_error_line(e: OSError) -> str:
    """`<file>: <reason>; <what to do>` of an OSError, on one line."""
    where = f"{e.filename}: " if e.filename else ""
    reason = e.strerror or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    hint = os_hint(e)
    return f"{where}{reason}" + (f"; {hint}" if hint else "")


if __name__ == "__main__":
    sys.exit(main())
