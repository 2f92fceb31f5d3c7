"""Several processes on torch.distributed: launched by torchrun, every command splits its work across ranks.

``torchrun --standalone --nproc-per-node N -m ckptdiff COMMAND ...`` (or ``--nnodes ... --rdzv-endpoint ...``)
sets WORLD_SIZE, RANK and LOCAL_RANK; :func:`init_from_env` starts the process group (nccl when every rank has a
GPU and the device is not the CPU, gloo otherwise). The pipeline then gives each rank its share of the work,
balanced by an estimate of its cost, and gathers every analysis's per-tensor results to rank 0, which alone
finishes, prints and writes; the finished results are sent back so every rank returns the same thing. Inputs
are checked on every rank and the ranks agree on the outcome at each step (:func:`agree`), so a bad input is
reported once (by rank 0) with the same exit code everywhere, and no rank waits forever for one that failed.

Nothing here runs in a single process: with WORLD_SIZE unset or 1, :func:`world` is None.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ckptdiff.errors import CkptdiffError, InputError

T = TypeVar("T")
TIMEOUT = _dt.timedelta(hours=6)  # a rank waits this long at a step for the slowest one (long SVD batches)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks."""

    rank: int
    size: int
    local_rank: int

    @property
    def leader(self) -> bool:
        """Rank 0: the one that prints and writes."""
        return self.rank == 0


_group: Any = None  # a gloo group for Python objects, also when the default backend is nccl


def env_world() -> World | None:
    """The world torchrun describes in the environment, or None for a single process."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise InputError("WORLD_SIZE, RANK and LOCAL_RANK must be integers; launch with torchrun") from None
    return World(rank, size, local) if size > 1 else None


def world() -> World | None:
    """The running world when torch.distributed is initialised with more than one rank, else None."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    size = torch.distributed.get_world_size()
    if size <= 1:
        return None
    return World(torch.distributed.get_rank(), size, int(os.environ.get("LOCAL_RANK", "0")))


def is_leader() -> bool:
    """True in a single process and on rank 0."""
    w = world()
    return w is None or w.leader


def init_from_env(device: str = "auto") -> World | None:
    """Start the process group when launched by torchrun with more than one rank; the world, or None."""
    global _group
    w = env_world()
    if w is None or world() is not None:
        return world()
    gpu = torch.cuda.is_available() and device.strip().lower() != "cpu"
    if gpu:
        torch.cuda.set_device(w.local_rank % torch.cuda.device_count())
    torch.distributed.init_process_group(backend="nccl" if gpu else "gloo", timeout=TIMEOUT)
    _group = torch.distributed.new_group(backend="gloo", timeout=TIMEOUT) if gpu else None
    return w


def device_spec(spec: str) -> str:
    """--device under ranks: 'auto' and 'cuda' mean this rank's GPU (LOCAL_RANK)."""
    w = world()
    if w is None or not torch.cuda.is_available() or spec.strip().lower() not in ("auto", "cuda"):
        return spec
    return f"cuda:{w.local_rank % torch.cuda.device_count()}"


def shutdown(wait: bool = True) -> None:
    """Leave the process group at the end of a command, after every rank got there (bounded wait).

    The wait keeps a rank that is done (or failed and agreed on it) alive until rank 0 has printed and written:
    torchrun stops every rank as soon as one exits with an error, which could cut rank 0 off mid-message.
    ``wait=False`` (a rank stopped by a signal) leaves at once: the other ranks may be anywhere, and waiting for
    them in a barrier they never reach would hold the user's Ctrl-C until torchrun kills everything.
    """
    global _group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            with contextlib.suppress(RuntimeError):  # a rank died: torchrun reports it; leave anyway
                torch.distributed.monitored_barrier(group=_group, timeout=_dt.timedelta(seconds=60))
        torch.distributed.destroy_process_group()
    _group = None


def all_gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    w = world()
    if w is None:
        return [value]
    out: list[Any] = [None] * w.size
    torch.distributed.all_gather_object(out, value, group=_group)
    return out


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if world() is None:
        return value
    box: list[Any] = [value]
    torch.distributed.broadcast_object_list(box, src=0, group=_group)
    return box[0]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Failure:
    kind: str  # "input" (exit 2), or the exception's type name (exit 3)
    message: str
    exit_code: int


class RankError(CkptdiffError):
    """A failure on another rank, raised on every rank so that all of them stop with the same code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def agree(step: Callable[[], T], what: str = "") -> T:
    """Run ``step`` on every rank; if it fails anywhere, fail everywhere with the first failing rank's error.

    In a single process this is just ``step()``. Under ranks every rank reaches the same exchange whether its
    step worked or not, so none waits for one that already gave up.
    """
    w = world()
    if w is None:
        return step()
    failure: _Failure | None = None
    result: T | None = None
    error: BaseException | None = None
    try:
        result = step()
    except CkptdiffError as e:
        failure, error = _Failure("input", str(e), e.exit_code), e
    except Exception as e:  # a bug on one rank must still stop the others
        failure, error = _Failure(type(e).__name__, f"{type(e).__name__}: {e}", 3), e
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: the others must not wait in a collective for this one
        signum = int(getattr(e, "signum", signal.SIGINT))
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        failure, error = _Failure("interrupt", how, 128 + signum), e
    from ckptdiff.runtime.signals import signals_held

    with signals_held():  # a signal now waits until every rank has its part of the exchange: none is left waiting
        outcomes = all_gather(failure)
    first = next(((r, f) for r, f in enumerate(outcomes) if f is not None), None)
    if first is None:
        return result  # type: ignore[return-value]
    rank, f = first
    if error is not None and rank == w.rank:
        raise error
    where = f" (on rank {rank}{', ' + what if what else ''})"
    if f.kind == "input":
        raise RankError(f.message, f.exit_code)
    if f.kind == "interrupt":
        raise RankError(f"{f.message} on rank {rank}; no output file was written", f.exit_code)
    raise RankError(f"internal error on rank {rank} ({f.message}){where}; rerun with CKPTDIFF_DEBUG=1", 3)


def balance(costs: Sequence[float], ranks: int) -> list[int]:
    """Which rank takes each unit of work: longest first onto the least-loaded rank (deterministic)."""
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(ranks), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += costs[i]
    return owner
