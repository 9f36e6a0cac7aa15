"""One code path for one process and many: torchrun's environment -> process group, rank, device.

`torchrun --nproc_per_node N -m danet.cli train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is a
single process (world 1) and nothing here touches torch.distributed.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DanetError
from ..models.fused_norm import sync_fused_norm


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    run: str | None = None  # this torchrun invocation's id (`run_token`); None outside torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto" -> this process's CUDA device when there is one, else the CPU."""
    if isinstance(name, torch.device):  # the Python API may pass one
        name = str(name)
    asked = name
    if not isinstance(name, str):
        raise DanetError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda:") and name[5:].isdigit():  # one GPU of several, outside torchrun
        name, local_rank = "cuda", int(name[5:])
        if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():
            raise DanetError(f"device cuda:{local_rank} asked for, but {torch.cuda.device_count()} GPU(s) are visible")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DanetError(
                f"device {asked!r} requested but no CUDA GPU is visible; run on the CPU (danet train: --set "
                "device=cpu; test, predict, benchmark: --device cpu)"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise DanetError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun's variables give them; DanetError for a set that no torchrun made.

    NOTE: a RANK or LOCAL_RANK left in the shell without a WORLD_SIZE above 1 is ignored (one process, rank 0): taken
    at its word, the lone process skipped every write as if another rank made them, and exited 0 having done nothing.
    """
    values = {}
    for key, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        raw = os.environ.get(key, default).strip() or default
        try:
            values[key] = int(raw)
        except ValueError:
            raise DanetError(
                f"environment variable {key}={raw!r} is not a number; unset it, or run under torchrun"
            ) from None
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world <= 1:
        if world < 1:
            raise DanetError(f"environment variable WORLD_SIZE={world} must be at least 1; unset it")
        return 0, 1, 0
    if missing := [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]:
        raise DanetError(
            f"environment variable WORLD_SIZE={world} asks for {world} processes, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start them with torchrun (torchrun --nproc_per_node N "
            "-m danet.cli ...), or unset WORLD_SIZE"
        )
    if not 0 <= rank < world:
        raise DanetError(f"environment variable RANK={rank} is outside 0 .. WORLD_SIZE - 1 = {world - 1}")
    return rank, world, local


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU), or run alone."""
    rank, world, local_rank = env_ranks()
    if world > 1 and device.startswith("cuda:"):
        raise DanetError(f"device {device} under torchrun: each process takes its own GPU; use device cuda or auto")
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        # NOTE: under `torchrun --max-restarts` every attempt of the group meets in the same store; with the same key
        # names a restarted rank can read the address of a rank that died ("Gloo connectFullMesh failed ...
        # Connection refused", or a hang). One key prefix per attempt keeps the attempts apart.
        store, rank, world = next(dist.rendezvous("env://"))
        run = run_token(store)
        store = dist.PrefixStore(f"danet/attempt_{restart_count()}/", store)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
        return DistInfo(rank, world, local_rank, dev, run)
    return DistInfo(rank, world, local_rank, dev, run_token(None))


def restart_count() -> int:
    """How often torchrun (--max-restarts) has restarted this run's processes (0: the first attempt, or no torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def run_token(store) -> str | None:
    """An id of this torchrun invocation: the same in all its processes and in every restart of them, another in the
    next invocation (so that a restart can tell this run's last.pth from one an earlier run left). None outside
    torchrun, and where torchrun gives nothing to tell invocations apart.

    NOTE: with the agent's store (torchrun's default) the first process to ask names the run there; the store lives
    as long as torchrun, across restarts. Else torchrun's run id (a fresh uuid unless --rdzv-id fixes it), and for
    one process the agent's process too (its parent)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    if store is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return store.compare_set("danet/run_token", "", uuid.uuid4().hex).decode()
    if store is None:
        return f"{run_id}/{socket.gethostname()}/{os.getppid()}"
    return None if run_id == "none" else run_id


def cpu_threads(requested: int | None) -> int:
    """Intra-op threads for CPU training: as requested, else $OMP_NUM_THREADS, else half the cores.

    NOTE: on a small shared machine more threads than free cores is far slower (OpenMP threads wait on each other
    whenever one is descheduled: 2 threads ran 2-3x slower than 1 on a busy 2-core box); the other half of the cores
    feeds the DataLoader workers.
    """
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: the processes of this machine share it
    return max(1, (os.cpu_count() or 2) // 2 // per_node)


def cores_per_process() -> int:
    """This process's share of the cores it may run on: torchrun's LOCAL_WORLD_SIZE processes share the machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (one all-reduce; just `flag` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over the ranks (one all-reduce; `values` itself without a process group). Every rank
    must pass the same keys."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist(), strict=True))


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank, so all ranks evaluate the same model.

    NOTE: without SyncBatchNorm (CPU runs) each rank's last training forward updates its own running stats.
    """
    if dist.is_available() and dist.is_initialized():
        for buf in model.buffers():
            dist.broadcast(buf.data, src=0)


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """SyncBatchNorm (CUDA, world > 1) + DistributedDataParallel, or the model itself for one process. Fused batch
    norms (norm=triton) are synchronised themselves (on the CPU only where Triton's interpreter runs them: tests)."""
    if not info.distributed:
        return model
    if sync_fused_norm(model) == 0 and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
