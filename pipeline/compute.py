"""Compute backends: where worker tasks run. `local` runs them as processes here; Azure Batch is the other.

A task is a `python -m gpu_worker …` command run in its own working directory; on exit 0 the file it wrote
there (`out.mp4`) is uploaded to the task's output blob and its JSON summary (stdout) kept. Submitting is
idempotent by task id, so an activity retried after a partial submission creates nothing twice.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from pipeline.storage import Storage

OUTPUT_FILE = "out.mp4"
PROGRESS_FILE = "progress"
STDERR_TAIL = 800


@dataclass(frozen=True)
class Task:
    id: str
    args: list[str]  # arguments after `python -m gpu_worker`
    output_container: str
    output_name: str
    env: dict[str, str] = field(default_factory=dict)  # non-secret settings only


@dataclass
class TaskState:
    id: str
    state: str  # pending | running | succeeded | failed
    exit_code: int | None = None
    error: str | None = None  # last stderr line(s) of a failed task
    summary: dict | None = None  # the worker's --json output; while running, {"frames": n} where the backend knows
    # from the task's submission to the start of its process: waiting for a worker slot, or for a Batch node to
    # be allocated, start and pull the image (None where the backend cannot say)
    queued_seconds: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ComputeBackend(Protocol):
    def submit(self, job_id: str, tasks: list[Task]) -> int:
        """Queue tasks; ids already known to the job are skipped. Returns how many were new."""
        ...

    def poll(self, job_id: str) -> dict[str, TaskState]: ...

    def cancel(self, job_id: str) -> None:
        """Stop the job's running tasks and refuse new ones."""
        ...

    def delete(self, job_id: str) -> None:
        """Forget the job and remove its scratch space (after success, failure or cancel)."""
        ...

    def blocker(self) -> str | None:
        """Why no task can start, where the backend knows one will never start as things are (a pool that gets
        no nodes, or only unusable ones); None when waiting is all it takes."""
        ...


class JobCanceled(RuntimeError):
    pass


# Worker processes started by start_standby(), each waiting for a task; LocalCompute takes them in turn.
_standbys: list[tuple[str, int, subprocess.Popen]] = []
_standby_lock = threading.Lock()


def worker_environment(workers: int) -> dict[str, str]:
    """What worker processes get when ``workers`` of them run at a time here (the caller's own environment
    overrides it).

    One worker alone lets torch's OpenMP threads spin a moment at each of the network's barriers before they
    sleep: bikes `stylize run` 18.3 -> 17.1 s. Workers sharing the cores must not (two on two cores ran 1.47x
    slower), so they keep the worker's default, sleeping at once.
    """
    return {"GOMP_SPINCOUNT": "30000"} if workers == 1 else {}


def _worker_env(workers: int) -> dict[str, str]:
    """The environment every worker process starts with, fresh or standing by."""
    # WORKER_PARENT_PID: the worker dies with this process (a killed `stylize run` leaves no workers)
    return {**worker_environment(workers), **os.environ, "PYTHONUNBUFFERED": "1",
            "WORKER_PARENT_PID": str(os.getpid())}


def start_standby(python: str = sys.executable, workers: int = 1) -> subprocess.Popen:
    """Start a worker that imports torch and the codecs now and then waits for its task on stdin.

    For a caller that knows work is coming before it can say what: ``stylize run`` starts one before its host
    imports, and the first task then starts ~1 s sooner. Whoever starts one calls :func:`stop_standbys` when
    done; a standby also dies with the thread that started it (``WORKER_PARENT_PID``).
    """
    proc = subprocess.Popen([python, "-m", "gpu_worker", "standby"], env=_worker_env(workers), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with _standby_lock:
        _standbys.append((python, workers, proc))
    return proc


def stop_standbys() -> None:
    """End the standbys no task took: they hold no work, so they are killed, even mid-import."""
    with _standby_lock:
        procs = [proc for _, _, proc in _standbys]
        _standbys.clear()
    for proc in procs:
        proc.kill()
        proc.communicate()


def _take_standby(python: str, workers: int) -> subprocess.Popen | None:
    with _standby_lock:
        for i, (exe, count, proc) in enumerate(_standbys):
            if (exe, count) == (python, workers) and proc.poll() is None:
                return _standbys.pop(i)[2]
    return None


@dataclass
class _LocalJob:
    """One job's tasks in :class:`LocalCompute`, from its first submit until it is deleted."""

    states: dict[str, TaskState] = field(default_factory=dict)
    canceled: bool = False
    version: int = 0  # count of its task changes
    submitted: dict[str, float] = field(default_factory=dict)  # task id -> time.monotonic() at submit
    seen: int = 0  # the count its last poll answered
    # Held while a finished task's output is uploaded: delete waits for it, so no upload lands after cleanup.
    uploading: threading.Lock = field(default_factory=threading.Lock)


class LocalCompute:
    """Worker processes on this machine, ``workers`` at a time, in submission order, except that a stitch goes
    first: a job whose segments are done waits seconds for its stitch, not for another job's whole scoring.

    :meth:`poll` waits up to ``poll_wait_seconds`` for one of the job's tasks to change state: the monitor
    then ticks when there is news rather than every ``POLL_SECONDS``, and replaying its history on every
    idle tick no longer takes CPU from the workers on the same machine (10% of a core at 0.5 s ticks).
    Memory is per job and freed by :meth:`delete`; whether a job may run again is not this class's memory
    but the end record in storage (pipeline.jobs), which outlives the process.
    """

    def __init__(self, storage: Storage, scratch: Path, workers: int = 1, timeout_seconds: float = 3600.0,
                 python: str = sys.executable, poll_wait_seconds: float = 5.0) -> None:
        self.storage = storage
        self.poll_wait_seconds = poll_wait_seconds
        self.scratch = Path(scratch)
        self.timeout_seconds = timeout_seconds
        self.python = python
        self.workers = max(1, workers)
        self._lock = threading.Condition()
        self._jobs: dict[str, _LocalJob] = {}
        self._queue: deque[tuple[_LocalJob, str, Task]] = deque()
        self._running: dict[tuple[str, str], subprocess.Popen] = {}
        self._closed = False
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"local-worker-{i}")
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, job_id: str, tasks: list[Task]) -> int:
        with self._lock:
            job = self._jobs.setdefault(job_id, _LocalJob())
            if job.canceled:
                raise JobCanceled(f"job {job_id} was canceled")
            new = [t for t in tasks if t.id not in job.states]
            for task in new:
                job.states[task.id] = TaskState(task.id, "pending")
                job.submitted[task.id] = time.monotonic()
                if task.args[:1] == ["stitch"]:
                    self._queue.appendleft((job, job_id, task))
                else:
                    self._queue.append((job, job_id, task))
            self._changed(job)
            return len(new)

    def poll(self, job_id: str) -> dict[str, TaskState]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return {}
            self._lock.wait_for(lambda: job.version != job.seen or self._closed, timeout=self.poll_wait_seconds)
            job.seen = job.version
            states = {k: TaskState(**asdict(v)) for k, v in job.states.items()}
        for state in states.values():
            if state.state == "running":
                state.summary = self._progress(job_id, state.id)
        return states

    def _progress(self, job_id: str, task_id: str) -> dict | None:
        """A running task's frames so far, from the file its worker keeps (absent until its first frame)."""
        try:
            return {"frames": int((self.scratch / job_id / task_id / PROGRESS_FILE).read_text())}
        except (OSError, ValueError):
            return None

    def _changed(self, job: _LocalJob) -> None:
        """Wake the job's pollers; call with the lock held."""
        job.version += 1
        self._lock.notify_all()

    def running(self) -> list[tuple[str, str]]:
        """(job, task) of every worker process alive now."""
        with self._lock:
            return list(self._running)

    def jobs(self) -> list[str]:
        """The jobs this backend still holds state for (until they are deleted)."""
        with self._lock:
            return list(self._jobs)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return
            job.canceled = True
            self._queue = deque(item for item in self._queue if item[0] is not job)
            procs = [p for (name, _), p in self._running.items() if name == job_id]
            self._changed(job)
        for proc in procs:
            proc.kill()

    def delete(self, job_id: str) -> None:
        self.cancel(job_id)
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is not None:
            with job.uploading:  # an upload that began before the cancel finishes first; later ones see it
                pass
        shutil.rmtree(self.scratch / job_id, ignore_errors=True)

    def blocker(self) -> str | None:
        return None  # the workers here take every task in turn

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.clear()
            procs = list(self._running.values())
            self._lock.notify_all()
        for proc in procs:
            proc.kill()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job, job_id, task = self._queue.popleft()
                job.states[task.id].state = "running"
                queued = round(time.monotonic() - job.submitted[task.id], 3)
                job.states[task.id].queued_seconds = queued
                self._changed(job)
            final = self._run(job, job_id, task)
            final.queued_seconds = queued
            with self._lock:
                if not job.canceled:
                    job.states[task.id] = final
                    self._changed(job)

    def _run(self, job: _LocalJob, job_id: str, task: Task) -> TaskState:
        workdir = self.scratch / job_id / task.id
        # WORKER_PROGRESS_FILE: where the worker keeps its count of frames written, which poll reads
        per_task = {"WORKER_PROGRESS_FILE": str(workdir / PROGRESS_FILE)}
        canceled = TaskState(task.id, "failed", error="canceled")
        try:  # everything in here fails the task, never this worker thread (later tasks would wait forever)
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            headers = self.storage.reader_headers()  # Blob Storage with an identity: workers read with its
            if headers:  # token, passed in the environment (or a standby's stdin), never on the command line
                per_task["WORKER_STORAGE_TOKEN"] = headers["Authorization"].removeprefix("Bearer ")
            with self._lock:
                if job.canceled:
                    return canceled
                # a standby worker has its imports done; its environment is this process's, so a task that
                # brings its own settings starts afresh
                proc = None if task.env else _take_standby(self.python, self.workers)
                request = None
                if proc is not None:
                    request = json.dumps({"args": task.args, "cwd": str(workdir), "env": per_task}) + "\n"
                else:
                    env = {**_worker_env(self.workers), **task.env, **per_task}
                    proc = subprocess.Popen([self.python, "-m", "gpu_worker", *task.args], cwd=workdir, env=env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
                self._running[(job_id, task.id)] = proc
            try:
                stdout, stderr = proc.communicate(request, timeout=self.timeout_seconds)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
                stderr += f"\ntask timed out after {self.timeout_seconds:.0f} s"
            finally:
                with self._lock:
                    self._running.pop((job_id, task.id), None)
            if proc.returncode != 0:
                return TaskState(task.id, "failed", exit_code=proc.returncode, error=_tail(stderr, proc.returncode))
            with job.uploading:  # a job canceled while its last task was finishing gets no output
                if job.canceled:
                    return canceled
                self.storage.upload_file(workdir / OUTPUT_FILE, task.output_container, task.output_name)
            return TaskState(task.id, "succeeded", exit_code=0, summary=last_json_line(stdout))
        except Exception as exc:  # an upload or spawn failure fails the task, not the host
            return TaskState(task.id, "failed", exit_code=None, error=f"{type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _tail(stderr: str, code: int) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return f"exit status {code}" if code >= 0 else f"killed by signal {-code}"
    return "\n".join(lines[-3:])[-STDERR_TAIL:]


def last_json_line(stdout: str) -> dict | None:
    """The worker's --json summary: the last line of its output that is a JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None
