import os
import sys

# Before torch loads OpenMP: idle OpenMP threads must sleep, not spin, or they starve the decoder and the
# encoder threads that share these cores (measured: identity pass 24 fps spinning vs 103 fps passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gpu_worker.cli import main

sys.exit(main())
