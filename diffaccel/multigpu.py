"""``--cp N``: run a command on N processes under diffusers' context parallelism (Ulysses), launched by torchrun.

``diffaccel generate --cp N ...`` started by hand re-runs itself as ``python -m torch.distributed.run --standalone
--nproc-per-node N -m diffaccel.cli generate --cp N ...``; started by torchrun (``WORLD_SIZE`` set), each process
joins the process group (NCCL on CUDA, one GPU per local rank; gloo on the CPU), loads the pipeline, and the
denoiser gets ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``: diffusers shards the
sequence, diffaccel's processors exchange it around the method (:mod:`diffaccel.pipelines.parallel`). Every rank
runs the same calls (the collectives need it); only rank 0 writes outputs and prints.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Any, Iterator, Sequence

import torch

from diffaccel.errors import ConfigError

TORCHRUN_ENV = "WORLD_SIZE"
"""Set by torchrun in every process it starts: a command that sees it is already one of the N ranks."""


def under_torchrun() -> bool:
    return TORCHRUN_ENV in os.environ and "RANK" in os.environ


def check_degree(cp: Any) -> int:
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ConfigError(f"cp must be an integer >= 1 (the number of processes of the Ulysses group), got {cp!r}")
    return cp


def torchrun_command(cp: int, argv: Sequence[str]) -> list[str]:
    """The command that runs ``diffaccel <argv>`` on ``cp`` local processes (``argv`` keeps its ``--cp N``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp}",
            "-m", "diffaccel.cli", *argv]


def relaunch(cp: int, argv: Sequence[str]) -> int:
    """Run :func:`torchrun_command` and return its exit status (the first failing rank's)."""
    return subprocess.call(torchrun_command(cp, argv))


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or not distributed): the process that writes outputs and prints."""
    return rank() == 0


def init(cp: int, device: torch.device) -> torch.device:
    """Join torchrun's process group for ``cp`` ranks; the device of this rank (``cuda:LOCAL_RANK`` on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != cp:
        raise ConfigError(
            f"--cp {cp} was given but torchrun started {world} processes (--nproc-per-node); use the same N"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


@contextlib.contextmanager
def _cpu_device_count() -> Iterator[None]:
    """diffusers' ``_resolve_parallel_config`` places rank ``r`` on device ``r % torch.accelerator.device_count()``,
    a ZeroDivisionError without an accelerator; on the CPU the count reads 1 while the config is built."""
    original = torch.accelerator.device_count
    if original() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = original  # type: ignore[assignment]


def enable(pipe: Any, cp: int) -> None:
    """Ulysses context parallelism of degree ``cp`` on every denoiser of ``pipe`` (diffusers' own engine)."""
    from diffusers import ContextParallelConfig

    from diffaccel.pipelines.hooks import denoisers_of

    for model in denoisers_of(pipe):
        if getattr(model, "_cp_plan", None) is None:
            raise ConfigError(
                f"--cp {cp}: {type(model).__name__} has no diffusers context-parallel plan (_cp_plan); "
                "context parallelism runs on the models diffusers shards (Wan, FLUX, ...)"
            )
        with _cpu_device_count():
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=cp))
