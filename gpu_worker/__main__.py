import os
import sys

from gpu_worker import set_openmp_defaults

set_openmp_defaults()


def _die_with_parent(parent_pid: int) -> None:
    """A local run that is killed must not leave its workers running: ask Linux to kill us with it."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


if os.environ.get("WORKER_PARENT_PID", "").isdigit():
    _die_with_parent(int(os.environ["WORKER_PARENT_PID"]))

from gpu_worker.cli import main  # noqa: E402

code = main()
# The work is written and reported: tearing the interpreter down (torch, the compiled network, the codec's
# threads) only delays the exit that a backend waits on, by 0.4-0.55 s a task here. So leave at once.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
