"""The GPU worker: scores one time range of a video with a PyTorch model and writes an encoded segment.

No Azure import anywhere here: a compute task runs `python -m gpu_worker …` on a source it can read.
"""

import os
import time

# When this process started working, as near as Python lets us see it: a task's fixed cost (start-up, model
# load) is measured from here to its first encoded frame.
STARTED = time.monotonic()


def set_openmp_defaults() -> None:
    """Call before torch loads OpenMP: its idle threads sleep at once rather than spin.

    Spinning starves the decoder and encoder threads that share these cores (measured: identity pass 24 fps
    spinning vs 103 fps passive). A short spin (GOMP_SPINCOUNT=30000) made one task alone on 2 cores ~8%
    faster, and two workers sharing them 1.47x slower (the fault-matrix tests, local_workers=2: 185 vs 126 s),
    so it is left to whoever knows a worker has the machine to itself (pipeline.compute.worker_environment).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
