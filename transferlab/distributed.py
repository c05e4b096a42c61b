"""Data-parallel runs: the processes that torchrun starts, on one machine or several, train one model together.

    torchrun --nproc-per-node 2 -m transferlab train ...

Every helper here does nothing in one process, so a run without torchrun is exactly the one-process run.
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) says where a process stands;
`start` joins the process group once `devices` knows the device (gloo on the CPU, NCCL on CUDA). Whatever is
not gradients (barriers, summed losses, gathered probabilities) goes through a gloo group on the CPU, which
needs no device tensors and can name a process that stopped answering (`monitored_barrier`). Importing this
module is light: torch loads only where there is more than one process.

What each process does, and which helper sees to it:
- its share of every pass over images: `share` for evaluation and feature caching (each image in exactly one
  process's share), `split` for training (global batch k holds the images that one process's batch k would
  at world_size times the batch size);
- DDP over the trained part of the model only (`wrap`): frozen blocks are no parameters of it;
- sums and probabilities from every process before any metric (`all_sum`, `gather`), so that every process
  computes the same numbers and early stopping decides the same everywhere;
- only the main process writes (`main_only`) and prints (`progress`, `only_main_prints`);
- a process that stops or stops answering ends the others with `ProcessLost` instead of a hang (`watched`,
  TIMEOUT); Ctrl-C or SIGTERM to any process stops it, and the others then find it gone.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import TransferlabError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .model import Classifier

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
TIMEOUT = timedelta(minutes=30)  # how long a process waits for the others in any collective, then gives up
_coordination: Any = None  # once started: the gloo group for barriers, sums and gathers on the CPU

T = TypeVar("T")


class ProcessLost(TransferlabError):
    """Another process of the run stopped, or did not answer within TIMEOUT."""


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def world_size() -> int:
    """How many processes train together (1 without torchrun)."""
    return _env("WORLD_SIZE", 1)


def rank() -> int:
    return _env("RANK", 0)


def local_rank() -> int:
    """This process's index on its machine: which GPU it takes."""
    return _env("LOCAL_RANK", 0)


def local_world_size() -> int:
    """How many processes share this machine (and its cores)."""
    return _env("LOCAL_WORLD_SIZE", 1)


def is_main() -> bool:
    return rank() == 0


def started() -> bool:
    """Whether this process has joined the others (`start`)."""
    return _coordination is not None


def start(device: torch.device) -> None:
    """Join torchrun's process group for `device`, once; nothing without torchrun."""
    global _coordination
    if world_size() == 1 or started():
        return
    backend = BACKENDS.get(device.type)
    if backend is None:
        raise TransferlabError(f"torchrun runs transferlab on the CPU or on CUDA GPUs, not on {device.type}; "
                               "pass --device cpu")
    import torch.distributed as dist

    dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if backend == "nccl" else None)
    _coordination = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else dist.group.WORLD
    atexit.register(dist.destroy_process_group)


def lost(error: BaseException) -> bool:
    """Whether `error` came from a collective that another process left: c10d's own errors, gloo's
    RuntimeErrors ('Connection reset by peer', 'Timed out waiting ...') or a barrier that one never reached."""
    if not started():
        return False
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or any(s in str(error) for s in ("/gloo/", "monitoredBarrier"))


@contextlib.contextmanager
def watched() -> Iterator[None]:
    """Turn a collective's failure, because another process stopped or stopped answering, into `ProcessLost`."""
    try:
        yield
    except RuntimeError as e:
        if not lost(e):
            raise
        reason = re.sub(r"^\[[^\]]*\]:? ", "", str(e).strip().splitlines()[0]).split(". ")[0]
        raise ProcessLost(f"another process of this run stopped, or did not answer within "
                          f"{TIMEOUT.total_seconds() / 60:g} minutes ({reason})") from None


def barrier() -> None:
    """Wait until every process is here; if one does not come, the main process names it."""
    if world_size() > 1:
        import torch.distributed as dist

        with watched():
            dist.monitored_barrier(_coordination, timeout=TIMEOUT, wait_all_ranks=True)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first, then the others (fastai's rank0_first): for work whose result
    the others then read from disk instead of repeating it, where it cannot be shared out (scanning a folder)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """`fn` run by the main process only (torchvision's save_on_master): for every write of a shared result."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None
    return wrapper


@contextlib.contextmanager
def only_main_prints() -> Iterator[None]:
    """What a command prints (results, warnings) comes from the main process only."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere), contextlib.redirect_stderr(nowhere):
        yield


def _check(n: int, what: str) -> None:
    if n < world_size():
        raise TransferlabError(f"{n} {what} cannot be shared by {world_size()} processes: each needs one at least")


def share(n: int, seed: int, of: int | None = None) -> list[int]:
    """Which of n images process `of` (default: this one) evaluates or computes features for: each image in
    exactly one share, drawn by a seeded shuffle so that large and small files (decoding time) even out
    across processes, in folder order within a share."""
    if world_size() == 1:
        return list(range(n))
    import torch

    _check(n, "images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[rank() if of is None else of::world_size()])


def shares(n: int, seed: int) -> list[list[int]]:
    """Every process's `share`, by rank."""
    return [share(n, seed, r) for r in range(world_size())]


def split(order: list[int]) -> list[int]:
    """This process's part of a training epoch's order: every world_size-th item from its rank, the order
    padded with its first items to a multiple of world_size (as DistributedSampler pads), so that every
    process takes as many steps, and global batch k is order[k*G:(k+1)*G], G = world_size x batch size:
    the images one process's batch k holds at batch size G."""
    w = world_size()
    if w == 1:
        return order
    _check(len(order), "training images")
    padded = order + order[: -len(order) % w]
    return padded[rank()::w]


def all_sum(*values: float | torch.Tensor) -> list[float]:
    """Each number summed over every process (a pass's loss total, correct answers, images)."""
    if world_size() == 1:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    summed = torch.tensor([float(v) for v in values], dtype=torch.float64)
    with watched():
        dist.all_reduce(summed, group=_coordination)
    return summed.tolist()


def gather(values: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """[n, ...]: every process's `values` for its `share(n, seed)`, put back in image order; each image once,
    however uneven the shares (no padding reaches a metric)."""
    if world_size() == 1:
        return values
    import torch
    import torch.distributed as dist

    parts = shares(n, seed)
    size = max(map(len, parts))
    padded = values.new_zeros((size, *values.shape[1:]), device="cpu")
    padded[: len(values)] = values.cpu()
    received = [torch.empty_like(padded) for _ in parts]
    with watched():
        dist.all_gather(received, padded, group=_coordination)
    out = padded.new_empty((n, *values.shape[1:]))
    for rows, part in zip(parts, received):
        out[rows] = part[: len(rows)]
    return out


def wrap(model: Classifier) -> nn.Module:
    """What the loop trains: the classifier itself in one process; under torchrun its trained part
    (`Classifier.trained_part`) in DistributedDataParallel, so that frozen blocks are no parameters of it
    (torchvision's `model` beside `model_without_ddp`, which stays `model`)."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model.trained_part())
