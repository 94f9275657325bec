"""Stopping on SIGTERM as on Ctrl-C.

Schedulers stop jobs with SIGTERM (Slurm at a time limit or on preemption, Kubernetes evicting a
pod, a spot instance being reclaimed), and so do ``timeout`` and ``kill``; torchrun and
``accelerate launch`` pass it on to every process they started and SIGKILL them some seconds
later (torchrun: 30). Left to Python's default, SIGTERM kills the process on the spot: no
message, and the lock's holder record left behind. Around every command (``cli.main``)
``handling_sigterm`` turns it into ``Terminated``, raised where the program is, so the same
happens as on Ctrl-C: every finished batch is kept, the lock is released and its record
removed, the command says how to resume and exits 143 (128 + SIGTERM, what a shell reports for
a process SIGTERM ended).

Training stops more gently: while ``stop_between_steps`` is active the signal only asks, and
the trainer stops at the end of the optimiser step under way, saves a checkpoint and then
raises ``Terminated`` (``stages.training``), so the rerun resumes from that step instead of from
the last ``save_steps`` checkpoint. A second SIGTERM while it finishes the step raises at once.
The processes of one training job agree at every step whether any of them was asked
(``stop_after_step``), so they all stop after the same step.

No heavy imports (torch only inside ``stop_after_step``, which runs in training).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

EXIT_CODE = 128 + signal.SIGTERM  # 143


class Terminated(BaseException):
    """SIGTERM arrived: stop as on Ctrl-C. A ``BaseException`` like ``KeyboardInterrupt``, so
    no ``except Exception`` takes it for a failure, and ``finally`` blocks and context managers
    (the lock) clean up on the way out."""


_waiting = False  # inside stop_between_steps: a SIGTERM asks instead of raising
_received = False  # this process got a SIGTERM while training
_stopping = False  # this process or another of its job got one: stop after this step


def _on_sigterm(signum, frame) -> None:
    global _received
    if _waiting and not _received:
        _received = True  # the trainer stops after this step (a second SIGTERM raises)
        return
    raise Terminated()


@contextmanager
def handling_sigterm() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` inside (the handler before is put back after). Only the
    main thread may set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextmanager
def stop_between_steps() -> Iterator[None]:
    """Inside, a SIGTERM is only recorded, for the training loop to stop after its step
    (``stop_after_step``); on the way out a recorded one raises ``Terminated`` (the loop has
    saved its checkpoint by then)."""
    global _waiting, _received, _stopping
    _waiting, _received, _stopping = True, False, False
    try:
        yield
    finally:
        _waiting = False
    if _received or _stopping:
        _received = _stopping = False
        raise Terminated()


def stop_after_step(device) -> bool:
    """Whether training stops after this step: this process or another process of the training
    job got a SIGTERM. Every process calls it at the same point of each step (a collective
    under torch.distributed), so they all stop after the same step and save the same
    checkpoint. ``device``: where the job's collectives run (the trainer's ``args.device``).
    Reading the result waits for the device once a step; the trainer already does at each
    micro-step (its NaN check of the loss), so this costs next to nothing more."""
    global _stopping
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized() \
            and torch_dist.get_world_size() > 1:
        import torch

        flag = torch.tensor([1 if _received else 0], device=device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        _stopping = _stopping or bool(flag.item())
    else:
        _stopping = _stopping or _received
    return _stopping
