"""The GPU worker: scores one time range of a video with a PyTorch model and writes an encoded segment.

No Azure import anywhere here: a compute task runs `python -m gpu_worker …` on a source it can read.
"""

import time

# When this process started working, as near as Python lets us see it: a task's fixed cost (start-up, model
# load) is measured from here to its first encoded frame.
STARTED = time.monotonic()
