"""Which process of a multi-process job this is, read from the launcher's environment.

torchrun, ``accelerate launch`` and the DeepSpeed launcher start one process per device and tell
each its place through environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT, and under torchrun TORCHELASTIC_RUN_ID). Everything here reads those, so it works
before ``torch.distributed`` is initialised and without importing torch (``cai status`` uses it).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from cai_cli.errors import UserError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not a whole number; the launcher "
                        f"(torchrun / accelerate launch) sets it, so unset it or fix it") from None


def rank() -> int:
    """Global rank of this process: 0 when not launched as part of a multi-process job."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    """Rank of this process on its own machine (its device index): 0 when not distributed."""
    return _env_int("LOCAL_RANK", 0)


def world_size() -> int:
    """How many processes the job has: 1 when not launched by a multi-process launcher."""
    return _env_int("WORLD_SIZE", 1)


def is_distributed() -> bool:
    """True when this process is one of several of one job (torchrun, accelerate launch)."""
    return world_size() > 1


def is_main() -> bool:
    """True for the process that writes shared files and holds the run lock (global rank 0)."""
    return rank() == 0


def job_id() -> str | None:
    """An id every process of this job shares and another concurrent job does not, or None.

    TORCHELASTIC_RUN_ID alone is not enough: a multi-node torchrun without ``--rdzv-id`` and
    other launchers leave it unset or "none". Two jobs running at once cannot share a rendezvous
    address and port, so the id is the run id together with MASTER_ADDR:MASTER_PORT.
    """
    if not is_distributed():
        return None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or "none"
    addr = os.environ.get("MASTER_ADDR") or "?"
    port = os.environ.get("MASTER_PORT") or "?"
    return f"{run_id}@{addr}:{port}"


def _initialised_torch_dist():
    # torch is only looked up, never imported: if nothing imported it, no process group exists.
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def barrier() -> None:
    """Wait for every process of the job (torch.distributed barrier); a no-op when not initialised."""
    dist = _initialised_torch_dist()
    if dist is not None:
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Let rank 0 run the body first (e.g. build a dataset cache), then the other ranks.

    Orders the processes only once torch.distributed is initialised; before that it is a no-op.
    """
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def refuse_multiprocess(command: str) -> None:
    """Stop a stage that runs as one process from being started once per device.

    Generation, labelling and evaluation are not split across ranks: N copies would each do
    the whole job and write the same files. Raises UserError on every rank of such a launch.
    """
    if not is_distributed():
        return
    launched = (f"it was started as process {rank()} of {world_size()} (torchrun / accelerate "
                f"launch)")
    if ", " in command:  # `cai run` over a range that holds such stages
        raise UserError(
            f"`cai run` would run {command}, which run as a single process, but {launched}. Run "
            f"it without the launcher, or under it only over training stages (e.g. `cai run "
            f"--from train-rm --to optimize`).")
    raise UserError(
        f"`cai {command}` runs as a single process, but {launched}. Run it once without the "
        f"launcher: `cai {command} --config ...`; only finetune, train-rm and optimize train "
        f"across devices (for faster generation use a vllm or openai backend, or --shard).")
