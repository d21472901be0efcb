"""The worker processes a test's host started, counted as the OS sees them."""

from __future__ import annotations

import psutil


def worker_processes(host: psutil.Process) -> list[psutil.Process]:
    """The processes ``host`` started as ``python -m gpu_worker …``. Only its own children: a worker's child is no
    worker, and a fork shows its parent's command line until it execs (a sampler once counted 3 for 2 slots)."""
    return [child for child in host.children() if _command_line(child)[1:3] == ["-m", "gpu_worker"]]


def _command_line(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # ended meanwhile
        return []
