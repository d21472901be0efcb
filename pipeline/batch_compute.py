"""Azure Batch compute backend: one Batch job per orchestration, one Batch task per worker Task.

Same contract as :class:`pipeline.compute.LocalCompute` (see the ComputeBackend protocol):

- ``submit`` creates the Batch job on first use (``JobExists`` is fine) and adds the tasks with
  ``create_tasks``; task ids are the pipeline's own (``seg00042-a1``, ``stitch-a0``) and Batch answers
  ``TaskExists`` for an id it already has, which the SDK counts as success, so a retried submit (after a
  dropped connection, or a retried activity) creates nothing twice.
- Each task runs ``python -m gpu_worker …`` in the worker image (a container task whose working directory is
  the task's working directory, where the worker writes ``out.mp4``). The node itself uploads ``out.mp4`` to
  the task's output blob when the task succeeds, and its stdout/stderr to the logs container under
  ``<batch job>/<task>/`` whatever happens, with the pool's managed identity: no SAS, no key anywhere.
- A pool of GPU sizes runs its tasks on the GPU and nowhere else (``WORKER_DEVICE=cuda``, see
  :func:`worker_device`): a node whose driver does not work fails the task in seconds with that reason, rather
  than scoring for hours on its few CPU cores at a GPU's price. A pool of CPU sizes runs them on the CPU.
  With ``--json`` the worker's stdout is its one-line JSON summary, so ``stdout.txt`` is the summary.
- Batch never retries a task (``maxTaskRetryCount`` 0): a failure must reach the orchestrator, which
  resubmits the segment under a new task id and counts attempts. A preempted spot node is different: Batch
  requeues its task (active again) and the orchestrator just sees it pending again.
- ``poll`` asks for the job's task counts on every call and lists tasks (with ``$filter``/``$select``) only
  when the counts show running or newly completed ones; a completed task's summary or error is read once
  from the logs container and remembered (completed tasks never change).
- ``cancel`` terminates the Batch job (running tasks are killed, queued ones never start); ``delete``
  terminates and deletes it, and raises :class:`JobNotDeleted` when Batch has not let it start deleting within
  the wait, so that the cleanup is retried and the job's status says so. One Batch job per *run* (see
  ``JobSpec.run_id``): a job restarted under the same id never waits for its old Batch job to go.

Nothing here waits for nodes: tasks wait in the job's queue while the pool's autoscale formula adds nodes
(10–30 minutes from zero for GPU sizes), and the per-task time limit (TASK_TIMEOUT_MINUTES) counts from
the moment a task starts running. See docs/batch.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import shlex
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpu_worker.errors import InputError
from pipeline.compute import OUTPUT_FILE, STDERR_TAIL, JobCanceled, Task, TaskState, last_json_line
from pipeline.settings import Settings
from pipeline.storage import Storage

log = logging.getLogger("stylize.batch")

BATCH_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # job and task ids: letters, digits, hyphens, underscores
STDOUT_LOG, STDERR_LOG = "stdout.txt", "stderr.txt"
BAD_INPUT_EXIT = 2  # the worker's "bad input, here is why" status: its stderr line is the whole message
LOG_READ_LIMIT = 64 * 1024
# Job states in which tasks can no longer be added: the job was canceled (terminated) or is going away.
_STOPPED_JOB_STATES = {"terminating", "completed", "deleting"}
_SAS = re.compile(r"[?&](?:sig|se|sv|sp|skoid)=", re.IGNORECASE)
_STOPPED_JOB_CODES = {"JobCompleted", "JobBeingTerminated", "JobBeingDeleted", "JobNotActive"}


def worker_device(vm_size: str) -> str:
    """The device a pool's tasks score on: ``cuda`` for Azure's GPU sizes (the N family: NC, ND, NG, NV), else
    ``cpu``. The worker then refuses to start without a working CUDA GPU, instead of falling back to the CPU."""
    return "cuda" if vm_size.lower().startswith("standard_n") else "cpu"


class BatchSetupError(RuntimeError):
    """The Batch settings do not describe a usable account and pool."""


class JobNotDeleted(RuntimeError):
    """A Batch job could not be deleted within the wait (it is still terminating)."""


def batch_job_id(instance_id: str) -> str:
    """The Batch job id for an orchestration instance id: the id itself when Batch accepts it, otherwise a
    readable stem plus a hash of the whole id (Batch ids: letters, digits, ``-``, ``_``, at most 64)."""
    if BATCH_ID.match(instance_id):
        return instance_id
    digest = hashlib.sha256(instance_id.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", instance_id).strip("-_")[:47] or "job"
    return f"{stem}-{digest}"


def default_credential() -> Any:
    """The Function App's managed identity in Azure (DefaultAzureCredential: AZURE_CLIENT_ID picks a
    user-assigned one). Tests replace this function to sign requests for the loopback fake."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


class _NoCredential:
    """Stands in for a credential when the caller brings its own ``authentication_policy``."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        raise RuntimeError("BatchCompute was given an authentication_policy; no credential is used")


class BatchCompute:
    """Runs worker Tasks as Azure Batch tasks (container tasks on a GPU pool)."""

    def __init__(
        self,
        account_url: str,
        pool_id: str,
        worker_image: str,
        storage: Storage,
        *,
        pool_identity: str,
        pool_identity_client_id: str,
        logs_container: str = "logs",
        task_timeout_minutes: float = 60,
        task_retention: dt.timedelta = dt.timedelta(hours=2),
        container_run_options: str = "",
        credential: Any = None,
        authentication_policy: Any = None,
        client: Any = None,
        polling_interval: float = 5.0,
        wait_seconds: float = 30.0,
        submit_attempts: int = 3,
        **client_kwargs: Any,
    ) -> None:
        if "--gpus" in container_run_options:
            raise ValueError("container_run_options must not contain --gpus: Batch gives GPU pools' containers "
                             "the GPUs itself and refuses the option (ContainerInvalidSettings)")
        self.account_url = account_url if "://" in account_url else f"https://{account_url}"
        self.pool_id = pool_id
        self.worker_image = worker_image
        self.storage = storage
        self.pool_identity = pool_identity
        self.pool_identity_client_id = pool_identity_client_id
        self.logs_container = logs_container
        self.task_timeout = dt.timedelta(minutes=task_timeout_minutes)
        self.task_retention = task_retention
        self.container_run_options = container_run_options.strip()
        self.polling_interval = polling_interval
        self.wait_seconds = wait_seconds
        self.submit_attempts = max(1, submit_attempts)
        if client is None:
            from azure.batch import BatchClient

            if authentication_policy is not None:
                client_kwargs["authentication_policy"] = authentication_policy
                credential = credential or _NoCredential()
            client = BatchClient(self.account_url, credential or default_credential(), **client_kwargs)
        self.client = client
        self._lock = threading.Lock()
        # (batch job id, job creation time) → completed tasks' final states; a job deleted and created again
        # under the same id (a restarted orchestration) gets a new creation time and so a fresh cache.
        self._completed: dict[tuple[str, str], dict[str, TaskState]] = {}
        self._readers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="batch-logs")
        self._vm_size: str | None = None  # the pool's, read once

    @classmethod
    def from_settings(cls, settings: Settings, storage: Storage) -> BatchCompute:
        """Build from the app settings and check, now, that the pool exists (a clear error otherwise)."""
        required = {
            "BATCH_ACCOUNT_URL": settings.batch_account_url,
            "BATCH_POOL_ID": settings.batch_pool_id,
            "BATCH_WORKER_IMAGE": settings.batch_worker_image,
            "BATCH_POOL_IDENTITY_RESOURCE_ID": settings.batch_pool_identity,
            "BATCH_POOL_IDENTITY_CLIENT_ID": settings.batch_pool_identity_client_id,
        }
        missing = [name for name, value in required.items() if not value]
        if missing:
            raise BatchSetupError(f"STYLIZE_COMPUTE=batch needs the settings {', '.join(missing)}")
        if settings.storage != "blob":
            raise BatchSetupError("STYLIZE_COMPUTE=batch needs STYLIZE_STORAGE=blob: Batch nodes read and write "
                                  "Blob Storage, not a folder on this machine")
        compute = cls(
            settings.batch_account_url, settings.batch_pool_id, settings.batch_worker_image, storage,
            pool_identity=settings.batch_pool_identity,
            pool_identity_client_id=settings.batch_pool_identity_client_id,
            logs_container=settings.logs_container,
            task_timeout_minutes=settings.task_timeout_minutes,
            polling_interval=min(5.0, settings.poll_seconds),
        )
        compute.check_pool()
        return compute

    # ---- setup ---------------------------------------------------------------------------------------

    def check_pool(self) -> None:
        """Read the pool (its VM size decides the tasks' device), with a clear error where it cannot be read."""
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        try:
            pool = self.client.get_pool(self.pool_id, select=["id", "state", "vmSize"])
        except ResourceNotFoundError:
            raise BatchSetupError(f"BATCH_POOL_ID={self.pool_id!r}: the Batch account {self.account_url} has no "
                                  f"such pool (check BATCH_POOL_ID and BATCH_ACCOUNT_URL)") from None
        except HttpResponseError as exc:
            if exc.status_code in (401, 403):
                raise BatchSetupError(f"BATCH_ACCOUNT_URL={self.account_url}: authentication refused "
                                      f"({_reason(exc)}); the app's identity needs the Azure Batch Job Submitter "
                                      f"role on the account") from None
            raise BatchSetupError(f"BATCH_ACCOUNT_URL={self.account_url}: cannot read pool {self.pool_id!r} "
                                  f"({_reason(exc)})") from None
        log.info("Batch pool %s is %s (%s)", pool.id, _value(pool.state), pool.vm_size)
        self._vm_size = pool.vm_size or ""

    # ---- ComputeBackend --------------------------------------------------------------------------------

    def blocker(self) -> str | None:
        """What Batch says keeps the pool from running tasks: resize errors (no quota or capacity for the size,
        an image it cannot use), or nodes that are all unusable or failed their start task (which are billed
        while they sit there). A pool with no nodes yet and no errors is only slow (10-30 minutes for GPU sizes)."""
        from azure.core.exceptions import HttpResponseError

        pool = self.client.get_pool(self.pool_id, select=["id", "resizeErrors"])
        errors = [f"{e.code}: {e.message}" for e in pool.resize_errors or []]
        if errors:
            return f"the Batch pool {self.pool_id} cannot add nodes ({'; '.join(errors[:2])})"
        try:
            states = [_value(node.state) for node in self.client.list_nodes(self.pool_id, select=["id", "state"])]
        except HttpResponseError:  # listing nodes needs more than the Job Submitter role may give: errors suffice
            return None
        broken = {"unusable", "starttaskfailed"}
        if states and all(state in broken for state in states):
            counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(broken) if s in states)
            return (f"every node of the Batch pool {self.pool_id} is unusable ({counts}): check the node image "
                    "and the worker image in the registry (docs/batch.md)")
        return None

    def submit(self, job_id: str, tasks: list[Task]) -> int:
        if not tasks:
            return 0
        job = batch_job_id(job_id)
        for task in tasks:  # refuse what must never reach Batch before sending anything
            self._check(task)
        if self._vm_size is None:
            self.check_pool()
        options = [self._task_options(job, task) for task in tasks]
        self._ensure_job(job, job_id)
        result = self._add_tasks(job, options)
        new = sum(1 for r in result.result_values or [] if _value(r.status) == "success")
        log.info("Batch job %s: %d of %d tasks new", job, new, len(tasks))
        return new

    def poll(self, job_id: str) -> dict[str, TaskState]:
        from azure.core.exceptions import ResourceNotFoundError

        job_name = batch_job_id(job_id)
        try:
            job = self.client.get_job(job_name, select=["id", "state", "creationTime"])
            counts = self.client.get_job_task_counts(job_name).task_counts
        except ResourceNotFoundError:
            self._forget(job_name)
            return {}
        generation = (job_name, _when(job.creation_time))
        with self._lock:
            for key in [k for k in self._completed if k[0] == job_name and k != generation]:
                del self._completed[key]
            known = self._completed.setdefault(generation, {})
            states = dict(known)
        # Counts are cheap and may lag by a few seconds; they only decide whether a list is worth it.
        if counts.running:
            for task in self.client.list_tasks(job_name, filter="state eq 'running'", select=["id", "state"]):
                states.setdefault(task.id, TaskState(task.id, "running"))
        if counts.completed > len(known):
            listed = self.client.list_tasks(job_name, filter="state eq 'completed'",
                                            select=["id", "creationTime", "executionInfo"])
            new = [task for task in listed if task.id not in known]
            finished = list(self._readers.map(lambda task: self._completed_state(job_name, task), new))
            with self._lock:  # a state whose log could not be read (yet) is read again next time
                known.update({state.id: state for state, final in finished if final})
            states.update({state.id: state for state, _ in finished})
        return {key: TaskState(**asdict(value)) for key, value in states.items()}

    def cancel(self, job_id: str) -> None:
        from azure.batch.models._models import BatchJobTerminateOptions  # not re-exported by azure.batch.models
        from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

        job = batch_job_id(job_id)
        try:
            poller = self.client.begin_terminate_job(
                job, BatchJobTerminateOptions(termination_reason="canceled"), polling_interval=self.polling_interval)
        except (ResourceNotFoundError, ResourceExistsError):  # gone, or already terminated / being deleted
            return
        poller.result(timeout=self.wait_seconds)
        log.info("Batch job %s terminated", job)

    def delete(self, job_id: str) -> None:
        from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

        job = batch_job_id(job_id)
        self.cancel(job_id)
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                poller = self.client.begin_delete_job(job, polling_interval=self.polling_interval)
                break
            except ResourceNotFoundError:
                self._forget(job)
                return
            except ResourceExistsError as exc:  # 409: being deleted already (Batch finishes that), or terminating
                if _code(exc) == "JobBeingDeleted":
                    self._forget(job)
                    return
                if time.monotonic() > deadline:  # the caller (an activity, the cancel request) tries again later
                    raise JobNotDeleted(f"Batch job {job} was still terminating after {self.wait_seconds:.0f} s "
                                        f"({_code(exc)}): its tasks are stopping, and it is deleted on the next "
                                        "cleanup") from None
                time.sleep(max(self.polling_interval, 0.05))
        poller.result(timeout=self.wait_seconds)
        self._forget(job)
        log.info("Batch job %s deleted", job)

    def close(self) -> None:
        self._readers.shutdown(wait=False)
        close = getattr(self.client, "close", None)
        if close:
            close()

    # ---- helpers ---------------------------------------------------------------------------------------

    def _ensure_job(self, job: str, instance_id: str) -> None:
        from azure.batch import models
        from azure.core.exceptions import ResourceExistsError, ServiceRequestError, ServiceResponseError

        options = models.BatchJobCreateOptions(
            id=job,
            display_name=instance_id[:1024],
            pool_info=models.BatchPoolInfo(pool_id=self.pool_id),
            # Tasks never retry inside Batch, and the job stays open after failures and after all its tasks
            # are done: the orchestrator adds retries and the stitch later, and deletes the job itself.
            constraints=models.BatchJobConstraints(max_task_retry_count=0),
            all_tasks_complete_mode="noaction",
            task_failure_mode="noaction",
            metadata=[models.BatchMetadataItem(name="orchestration", value=instance_id[:512])],
        )
        for attempt in range(self.submit_attempts):
            try:
                self.client.create_job(options)
                log.info("Batch job %s created on pool %s", job, self.pool_id)
                return
            except ResourceExistsError as exc:
                if _code(exc) in _STOPPED_JOB_CODES:
                    raise JobCanceled(f"Batch job {job} was canceled or is being deleted ({_code(exc)})") from None
                break  # JobExists: check below that it still takes tasks
            except (ServiceRequestError, ServiceResponseError):  # a dropped connection: POSTs aren't retried
                if attempt + 1 == self.submit_attempts:
                    raise
                time.sleep(min(2.0**attempt, 10.0) * min(1.0, self.polling_interval))
        state = _value(self.client.get_job(job, select=["id", "state"]).state)
        if state in _STOPPED_JOB_STATES:
            raise JobCanceled(f"Batch job {job} is {state}: it was canceled or is being deleted (a restarted job "
                              f"can be submitted again once the old one is gone)")

    def _add_tasks(self, job: str, options: list) -> Any:
        from azure.batch.models import CreateTasksError

        for attempt in range(self.submit_attempts):
            try:
                return self.client.create_tasks(job, options)
            except CreateTasksError as exc:
                if exc.failure_tasks:  # refused for good (not TaskExists, which counts as success)
                    first = exc.failure_tasks[0]
                    error = first.error
                    message = getattr(error.message, "value", error.message) if error else ""
                    raise RuntimeError(f"Batch refused task {first.task_id} of job {job}: "
                                       f"{error.code if error else 'error'}: {message}") from None
                stopped = [e for e in exc.errors if _code(e) in _STOPPED_JOB_CODES]
                if stopped:
                    raise JobCanceled(f"Batch job {job} no longer takes tasks ({_code(stopped[0])})") from None
                refused = [e for e in exc.errors if not _transient(e)]
                if refused:
                    raise RuntimeError(f"Batch refused the tasks of job {job}: {_reason(refused[0])}") from None
                # The outcome of some requests is unknown (the connection dropped: azure-core does not retry a
                # POST without an answer). Send all of them again: those that did arrive come back TaskExists.
                if attempt + 1 == self.submit_attempts:
                    raise
                log.warning("Batch job %s: adding tasks failed (%s); sending them again", job, exc.message)
                time.sleep(min(2.0**attempt, 10.0) * min(1.0, self.polling_interval))
        raise AssertionError("unreachable")

    def _check(self, task: Task) -> None:
        if not BATCH_ID.match(task.id):
            raise ValueError(f"task id {task.id!r} is not a valid Batch id (letters, digits, - and _, ≤64)")
        if any(_SAS.search(arg) for arg in task.args):
            raise ValueError(f"task {task.id}: a command line must not carry a SAS (it is visible in Batch); "
                             f"workers authenticate with the pool identity")
        urls = self._container_url(self.logs_container), self._container_url(task.output_container)
        if any(_SAS.search(url) for url in urls):  # storage reached through a SAS connection string
            raise ValueError(f"task {task.id}: an output container URL must not carry a SAS (it is visible in "
                             f"Batch); nodes upload with the pool identity")

    def _task_options(self, job: str, task: Task) -> Any:
        from azure.batch import models

        identity = models.BatchNodeIdentityReference(resource_id=self.pool_identity)
        logs_url, output_url = self._container_url(self.logs_container), self._container_url(task.output_container)
        env = {**task.env, "WORKER_STORAGE_AUTH": "imds", "AZURE_CLIENT_ID": self.pool_identity_client_id,
               "WORKER_DEVICE": worker_device(self._vm_size or "")}
        registry = _registry_server(self.worker_image)

        def upload(pattern: str, container_url: str, path: str, condition: str) -> Any:
            return models.OutputFile(
                file_pattern=pattern,
                destination=models.OutputFileDestination(container=models.OutputFileBlobContainerDestination(
                    container_url=container_url, path=path, identity_reference=identity)),
                upload_options=models.OutputFileUploadConfiguration(upload_condition=condition),
            )

        return models.BatchTaskCreateOptions(
            id=task.id,
            display_name=f"{task.args[0] if task.args else 'task'} {task.id}",
            command_line=" ".join(["python", "-m", "gpu_worker", *(shlex.quote(a) for a in task.args)]),
            container_settings=models.BatchTaskContainerSettings(
                image_name=self.worker_image,
                container_run_options=self.container_run_options or None,
                working_directory="taskWorkingDirectory",
                registry=models.ContainerRegistryReference(registry_server=registry, identity_reference=identity)
                if registry else None,
            ),
            environment_settings=[models.EnvironmentSetting(name=k, value=v) for k, v in sorted(env.items())],
            constraints=models.BatchTaskConstraints(
                max_task_retry_count=0, max_wall_clock_time=self.task_timeout, retention_time=self.task_retention),
            user_identity=models.UserIdentity(
                auto_user=models.AutoUserSpecification(scope="task", elevation_level="nonadmin")),
            output_files=[
                upload(OUTPUT_FILE, output_url, task.output_name, "tasksuccess"),
                # stdout.txt and stderr.txt sit in the task directory, one level above the working directory.
                upload(f"../{STDOUT_LOG}", logs_url, f"{job}/{task.id}/{STDOUT_LOG}", "taskcompletion"),
                upload(f"../{STDERR_LOG}", logs_url, f"{job}/{task.id}/{STDERR_LOG}", "taskcompletion"),
            ],
        )

    def _container_url(self, container: str) -> str:
        service = getattr(self.storage, "service", None)
        if service is not None:
            return service.get_container_client(container).url
        url = self.storage.reader_url(container, "x")
        if not url.startswith(("https://", "http://")):
            raise BatchSetupError("Azure Batch needs Blob Storage (STYLIZE_STORAGE=blob)")
        return url.rsplit("/", 1)[0]

    def _completed_state(self, job: str, task: Any) -> tuple[TaskState, bool]:
        """A completed task's state, and whether it is final (its log was read, or is known to be missing)."""
        info = task.execution_info
        code = info.exit_code if info else None
        result = _value(info.result) if info else None
        started = info.start_time if info else None  # its last run's (a requeued task ran more than once)
        queued = (started - task.creation_time).total_seconds() if started and task.creation_time else None
        if result == "success" or (result is None and code == 0 and not (info and info.failure_info)):
            stdout = self._read_log(job, task.id, STDOUT_LOG)
            summary = last_json_line(stdout or "")
            return TaskState(task.id, "succeeded", exit_code=0 if code is None else code, summary=summary,
                             queued_seconds=queued), stdout is not None
        stderr = self._read_log(job, task.id, STDERR_LOG)
        failure = info.failure_info if info else None
        return TaskState(task.id, "failed", exit_code=code, error=_failure_text(stderr or "", code, failure),
                         queued_seconds=queued), stderr is not None

    def _read_log(self, job: str, task_id: str, name: str) -> str | None:
        """The tail of a log the node uploaded for the task: '' when there is none (the node could not upload
        it), None when it could not be read now."""
        with tempfile.TemporaryDirectory(prefix="batch-log-") as tmp:
            path = Path(tmp) / name
            try:
                self.storage.download_file(self.logs_container, f"{job}/{task_id}/{name}", path)
            except InputError:
                return ""
            except Exception as exc:  # storage unreachable or throttling: a poll must not fail for it
                log.warning("cannot read %s of Batch task %s/%s: %s", name, job, task_id, exc)
                return None
            with open(path, "rb") as data:
                data.seek(max(0, path.stat().st_size - LOG_READ_LIMIT))
                return data.read().decode("utf-8", errors="replace")

    def _forget(self, job: str) -> None:
        with self._lock:
            for key in [k for k in self._completed if k[0] == job]:
                del self._completed[key]


def _failure_text(stderr: str, code: int | None, failure: Any) -> str:
    """The worker's last stderr lines, with the exit code on the last line. When Batch itself failed the task
    (an output upload, the time limit, a termination) its reason is the last line; with no stderr at all,
    Batch's failure info is the whole text."""
    lines = [line.rstrip() for line in stderr.strip().splitlines() if line.strip()][-3:]
    failure_code = getattr(failure, "code", None)
    failure_line = f"{failure_code}: {getattr(failure, 'message', None) or 'the task failed'}" if failure_code \
        else getattr(failure, "message", None)
    if failure_code and failure_code != "FailureExitCode":
        lines = [*lines[-2:], failure_line]
    elif not lines:
        lines = [failure_line or "the task failed"]
    if code == BAD_INPUT_EXIT:  # the worker's one-line reason is the whole message
        return "\n".join(lines)[-STDERR_TAIL:]
    suffix = f" (exit code {code})" if code is not None else ""
    return "\n".join(lines)[-(STDERR_TAIL - len(suffix)):] + suffix


def _registry_server(image: str) -> str | None:
    """``myacr.azurecr.io`` for ``myacr.azurecr.io/stylize-worker:latest``; None for Docker Hub names."""
    first, sep, _ = image.partition("/")
    return first if sep and ("." in first or ":" in first or first == "localhost") else None


def _value(value: Any) -> str | None:
    """An SDK enum member or a plain string, as the lower-case wire value (str() of an enum is its name)."""
    value = getattr(value, "value", value)
    return str(value).lower() if value is not None else None


def _when(value: Any) -> str:
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)


def _transient(exc: BaseException) -> bool:
    """A failure worth another try: no answer at all, or a server-side / throttling status."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    if status is None:
        return True
    return status >= 500 or status in (408, 429)


def _code(exc: BaseException) -> str | None:
    error = getattr(exc, "error", None)
    return getattr(error, "code", None)


def _reason(exc: BaseException) -> str:
    code = _code(exc)
    message = getattr(exc, "message", None) or str(exc)
    first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return f"{code}: {first}" if code else first
