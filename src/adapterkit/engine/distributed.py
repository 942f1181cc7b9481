"""The process group of a ``torchrun`` / ``accelerate launch`` run (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
import sys

import torch

_left_group = False


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _dist() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if _dist() else 1


def _is_main() -> bool:
    return _rank() == 0


def init_distributed() -> None:
    """Join the process group torchrun / accelerate launch describe in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _dist():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed() -> None:
    """Leave the process group at a normal end of a run. A process that exits with its gloo
    group still alive can abort in the interpreter's teardown ("terminate called without an
    active exception", SIGABRT from gloo's worker threads), failing a run that had finished.
    Call it only after success: destroying the group while another rank still waits in a
    collective can deadlock."""
    global _left_group
    if _dist():
        torch.distributed.barrier()  # no rank tears its group down while another still writes
        torch.distributed.destroy_process_group()
        _left_group = True


def left_group() -> bool:
    """Has :func:`shutdown_distributed` left a process group in this process? Then the process
    should end through :func:`exit_now`: destroying the group is not enough, a gloo thread still
    joinable when the interpreter's static destructors run aborts the finished process
    ("terminate called without an active exception", SIGABRT; a two-process CLI run in a
    fresh-clone CI on 2026-12-07, after destroy_process_group)."""
    return _left_group


def exit_now(code: int) -> None:
    """End the process with ``code`` without the interpreter's C++ teardown: flush stdio and the
    logging handlers, then ``os._exit``. Only for a process whose work is finished and written."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(code)


def _barrier() -> None:
    if _dist():
        torch.distributed.barrier()


rank, world_size, is_main, barrier = _rank, _world, _is_main, _barrier
