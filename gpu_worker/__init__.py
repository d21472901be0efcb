"""The GPU worker: scores one time range of a video with a PyTorch model and writes an encoded segment.

No Azure import anywhere here: a compute task runs `python -m gpu_worker …` on a source it can read.
"""

import os
import time

# When this process started working, as near as Python lets us see it: a task's fixed cost (start-up, model
# load) is measured from here to its first encoded frame.
STARTED = time.monotonic()


def set_openmp_defaults() -> None:
    """Call before torch loads OpenMP: its idle threads spin ~30,000 times, then sleep.

    Between the network's back-to-back kernels a sleeping thread costs a wake-up each time; spinning forever
    starves the decoder and encoder threads that share the cores. Measured on 2 cores (bikes, 3 rounds each,
    interleaved): the task command 19.2 s sleeping at once (OMP_WAIT_POLICY=PASSIVE), 17.6 s with this; the
    identity scorer at 1080p 6.8 s and 5.5 s. GOMP_SPINCOUNT takes precedence over OMP_WAIT_POLICY.
    """
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
