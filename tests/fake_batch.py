"""A loopback stand-in for the Azure Batch REST service, strict about what the real SDK sends.

`FakeBatch` answers the endpoints `pipeline.batch_compute` uses (through `azure.batch.BatchClient` 15.x,
unchanged), refuses requests the real service would refuse or that break this project's rules (no SAS, no
keys, no `--gpus`, …) with the service's error shape, and records every violation in ``violations`` so a
test can assert there were none. It also plays the pool's nodes: each queued task's command line runs here
as a process (``python -m gpu_worker …`` in a fresh working directory, with the task's environment
settings), then the "node" uploads the task's output files to Azurite the way a Batch node does. The node's
managed identity is stood in for twice: uploads use the Azurite connection string, and a loopback IMDS
(`FakeImds`) hands workers a token for the pool identity's client id.

Faults a test can inject: a task's first N runs exit non-zero (`fail`), a run is preempted and requeued
(`preempt`), a running task's process dies (`kill`), tasks start late (`delay`), and the next
add-collection request is half accepted, then the connection dropped (`drop_next_add_after`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import glob
import hashlib
import hmac
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import isodate
from azure.storage.blob import BlobServiceClient

from tests import loopback

API_VERSIONS = {"2025-06-01"}  # what azure-batch 15.x sends; anything else is refused
BATCH_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TASKS_PER_ADD = 100
WORKER_PREFIX = ["python", "-m", "gpu_worker"]
SECRET_NAME = re.compile(r"token|secret|password|key|connection|sas", re.IGNORECASE)
SECRET_VALUE = re.compile(r"(?:^|[?&])(?:sig|sv|se|sp|skoid)=|AccountKey=|SharedAccessSignature", re.IGNORECASE)
TASK_FIELDS = {"id", "displayName", "exitConditions", "commandLine", "containerSettings", "resourceFiles",
               "outputFiles", "environmentSettings", "affinityInfo", "constraints", "requiredSlots", "userIdentity",
               "multiInstanceSettings", "dependsOn", "applicationPackageReferences", "authenticationTokenSettings"}
JOB_FIELDS = {"id", "displayName", "usesTaskDependencies", "priority", "allowTaskPreemption", "maxParallelTasks",
              "constraints", "jobManagerTask", "jobPreparationTask", "jobReleaseTask", "commonEnvironmentSettings",
              "poolInfo", "onAllTasksComplete", "onTaskFailure", "networkConfiguration", "metadata"}
TASK_SELECT = {"id", "url", "eTag", "lastModified", "creationTime", "state", "stateTransitionTime", "previousState",
               "commandLine", "containerSettings", "outputFiles", "environmentSettings", "constraints",
               "userIdentity", "executionInfo", "nodeInfo", "displayName"}
JOB_SELECT = {"id", "url", "eTag", "lastModified", "creationTime", "state", "stateTransitionTime", "poolInfo",
              "constraints", "executionInfo", "metadata", "displayName", "onAllTasksComplete", "onTaskFailure"}
POOL_SELECT = {"id", "url", "eTag", "lastModified", "creationTime", "state", "allocationState", "vmSize",
               "taskSlotsPerNode", "enableAutoScale", "currentDedicatedNodes", "currentLowPriorityNodes",
               "resizeErrors"}
NODE_SELECT = {"id", "url", "state", "vmSize"}
UPLOAD_CONDITIONS = {"tasksuccess", "taskfailure", "taskcompletion"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ts(value: dt.datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if value else None


class Refused(Exception):
    """A request the service refuses: HTTP status, Batch error code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass
class Fault:
    runs: int  # how many runs of matching tasks still fail
    exit_code: int
    message: str


@dataclass
class FakeTask:
    job: str
    id: str
    body: dict
    created: dt.datetime = field(default_factory=_now)
    state: str = "active"
    state_time: dt.datetime = field(default_factory=_now)
    exit_code: int | None = None
    result: str | None = None
    failure: dict | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    requeues: int = 0
    runs: int = 0
    proc: subprocess.Popen | None = None
    stop_reason: str | None = None  # why the fake killed its process: preempt | terminate | delete

    def to_json(self, base: str) -> dict:
        data = {
            "id": self.id, "url": f"{base}/jobs/{self.job}/tasks/{self.id}", "eTag": f"0x{id(self):X}",
            "lastModified": _ts(self.state_time), "creationTime": _ts(self.created), "state": self.state,
            "stateTransitionTime": _ts(self.state_time), **{k: v for k, v in self.body.items() if k != "id"},
        }
        execution = {"retryCount": 0, "requeueCount": self.requeues}
        if self.start:
            execution["startTime"] = _ts(self.start)
        if self.state == "completed":
            execution.update({"endTime": _ts(self.end), "result": self.result})
            if self.exit_code is not None:
                execution["exitCode"] = self.exit_code
            if self.failure:
                execution["failureInfo"] = self.failure
        if self.start or self.requeues:
            data["executionInfo"] = execution
        return data


@dataclass
class FakeJob:
    id: str
    body: dict
    created: dt.datetime = field(default_factory=_now)
    state: str = "active"
    state_time: dt.datetime = field(default_factory=_now)
    terminate_reason: str | None = None
    tasks: dict[str, FakeTask] = field(default_factory=dict)  # lower-cased id → task (ids are case-insensitive)

    def to_json(self, base: str) -> dict:
        data = {"id": self.id, "url": f"{base}/jobs/{self.id}", "eTag": f"0x{abs(hash(self.id)):X}",
                "lastModified": _ts(self.state_time), "creationTime": _ts(self.created), "state": self.state,
                "stateTransitionTime": _ts(self.state_time), **{k: v for k, v in self.body.items() if k != "id"},
                "executionInfo": {"startTime": _ts(self.created), "poolId": self.body["poolInfo"]["poolId"]}}
        if self.terminate_reason:
            data["executionInfo"].update({"endTime": _ts(self.state_time), "terminateReason": self.terminate_reason})
        return data


class FakeImds:
    """The node's Instance Metadata Service token endpoint, on loopback (workers get WORKER_IMDS_ENDPOINT)."""

    def __init__(self, client_id: str, token: str) -> None:
        self.client_id, self.token = client_id, token
        self.requests: list[dict] = []
        self.failures: list[int] = []  # statuses to answer first (e.g. 429, 500), one per request
        imds = self

        class Handler(loopback.Handler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                imds.requests.append({"path": url.path, "query": query, "metadata": self.headers.get("Metadata")})
                if imds.failures:
                    status = imds.failures.pop(0)
                    return self._send(status, {"error": "temporarily_unavailable", "error_description": f"{status}"})
                if self.headers.get("Metadata") != "true":
                    return self._send(400, {"error": "invalid_request", "error_description": "Required metadata "
                                                                                           "header not specified"})
                if query.get("resource") != "https://storage.azure.com/" or not query.get("api-version"):
                    return self._send(400, {"error": "invalid_resource", "error_description": "bad resource"})
                if query.get("client_id") != imds.client_id:
                    return self._send(400, {"error": "invalid_request",
                                            "error_description": "Identity not found"})
                return self._send(200, {"access_token": imds.token, "expires_in": "86399", "token_type": "Bearer",
                                        "resource": query["resource"], "client_id": imds.client_id})

            def _send(self, status: int, body: dict) -> None:
                self.reply(status, json.dumps(body), {"Content-Type": "application/json"})

        self._server = loopback.Server(Handler, "fake-imds")
        self.url = f"{self._server.url}/metadata/identity/oauth2/token"

    def close(self) -> None:
        self._server.close()


class FakeBatch:
    """Batch account ``account`` with the pools in ``pools``, served on a loopback port (``url``)."""

    def __init__(self, storage_connection: str, work_root: Path, *, account: str = "fakebatch",
                 pools: tuple[str, ...] = ("stylize-gpu",), worker_image: str = "fakecr.azurecr.io/stylize-worker:1",
                 pool_identity: str = "/subscriptions/0000/resourceGroups/rg/providers/"
                                      "Microsoft.ManagedIdentity/userAssignedIdentities/id-pool",
                 pool_identity_client_id: str = "11111111-2222-3333-4444-555555555555",
                 nodes: int = 2, page_size: int = 1000, bearer_token: str | None = None) -> None:
        self.account = account
        self.key = base64.b64encode(hashlib.sha256(f"fake-batch-key-{uuid.uuid4()}".encode()).digest()).decode()
        self.bearer_token = bearer_token or f"fake-batch-token-{uuid.uuid4().hex}"
        self.pools = set(pools)
        # The fake's nodes are this machine, which has no GPU: its pools are of a CPU size, so BatchCompute runs
        # the workers on the CPU. A test sets a GPU size to see what a node without a working GPU does.
        self.vm_size = "standard_d4s_v5"
        # What a pool that cannot run tasks shows: resize errors ({"code", "message"}) and its nodes' states
        # (None: one idle node per execution slot).
        self.resize_errors: list[dict] = []
        self.node_listings = 0  # how often the pool's nodes were listed (BatchCompute.blocker does, when it checks)
        self.node_states: list[str] | None = None
        self.worker_image = worker_image
        self.pool_identity = pool_identity
        self.pool_identity_client_id = pool_identity_client_id
        self.page_size = page_size
        self.root = Path(work_root)
        self.storage = BlobServiceClient.from_connection_string(storage_connection)
        self.storage_url = self.storage.url.rstrip("/")
        self.imds = FakeImds(pool_identity_client_id, f"fake-storage-token-{uuid.uuid4().hex}")

        self.jobs: dict[str, FakeJob] = {}  # lower-cased id → job
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, query)
        self.violations: list[str] = []
        self.task_creations: Counter[tuple[str, str]] = Counter()  # (job, task) → times created (must stay 1)
        self.task_submissions: Counter[tuple[str, str]] = Counter()  # (job, task) → times sent
        self.add_requests: list[int] = []  # tasks per addtaskcollection request
        self.created_jobs: list[str] = []
        self.terminated_jobs: list[str] = []
        self.deleted_jobs: list[str] = []
        self.finished_runs: list[tuple[str, str, int | None]] = []  # (job, task, exit code) per process run
        self._faults: dict[str, Fault] = {}  # task id prefix → fault
        self._preempt: set[str] = set()
        self._delays: dict[str, float] = {}
        self._drop_after: int | None = None
        self._holds: list[tuple[str, str, threading.Event, threading.Event]] = []  # method, path end, seen, go
        self.termination_seconds = 0.1  # how long a terminated job stays "terminating"
        self._cursors: dict[str, list[dict]] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._closed = False

        fake = self

        class Handler(loopback.Handler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

            def do_PUT(self) -> None:
                fake._handle(self, "PUT")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

        self._server = loopback.Server(Handler, "fake-batch")
        self.url = self._server.url
        self._nodes = [threading.Thread(target=self._node, daemon=True, name=f"fake-batch-node-{i}")
                       for i in range(nodes)]
        for node in self._nodes:
            node.start()

    # ---- test controls -------------------------------------------------------------------------------

    def fail(self, task_prefix: str, runs: int, exit_code: int = 1,
             message: str = "fake_batch: injected failure") -> None:
        """The next ``runs`` runs of tasks whose id starts with ``task_prefix`` exit with ``exit_code``."""
        with self._lock:
            self._faults[task_prefix] = Fault(runs, exit_code, message)

    def preempt(self, task_id: str) -> None:
        """Kill the named task's first run once it is running, and requeue it (a spot node taken back)."""
        with self._lock:
            self._preempt.add(task_id.lower())

    def kill(self, task_id: str) -> bool:
        """Kill a running task's process (a crash, the OOM killer): the task completes as failed, exit 137."""
        with self._lock:
            for job in self.jobs.values():
                task = job.tasks.get(task_id.lower())
                if task is not None and task.proc is not None and task.proc.poll() is None:
                    task.proc.kill()
                    return True
        return False

    def delay(self, task_prefix: str, seconds: float) -> None:
        """Tasks whose id starts with ``task_prefix`` sleep ``seconds`` before their command (a slow task)."""
        with self._lock:
            self._delays[task_prefix] = seconds

    def drop_next_add_after(self, accepted: int) -> None:
        """The next addtaskcollection request creates its first ``accepted`` tasks, then the connection drops."""
        with self._lock:
            self._drop_after = accepted

    def hold(self, method: str, path_end: str) -> tuple[threading.Event, threading.Event]:
        """The next ``method`` request whose path ends with ``path_end`` waits, before the service acts on it,
        until the second event is set; the first is set when it arrives (a request slow in flight)."""
        seen, go = threading.Event(), threading.Event()
        with self._lock:
            self._holds.append((method, path_end, seen, go))
        return seen, go

    def running(self) -> list[tuple[str, str]]:
        """(job, task) of every task process still alive."""
        with self._lock:
            return [(t.job, t.id) for j in self.jobs.values() for t in j.tasks.values()
                    if t.proc is not None and t.proc.poll() is None]

    def job(self, job_id: str) -> FakeJob | None:
        with self._lock:
            return self.jobs.get(job_id.lower())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            procs = [t.proc for j in self.jobs.values() for t in j.tasks.values() if t.proc is not None]
            self._wake.notify_all()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        self._server.close()
        self.imds.close()

    # ---- HTTP ----------------------------------------------------------------------------------------

    def _handle(self, request: http.server.BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(request.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        path = urllib.parse.unquote(url.path)
        with self._lock:
            self.requests.append((method, path, query))
            hold = next((h for h in self._holds if h[0] == method and path.endswith(h[1])), None)
            if hold is not None:
                self._holds.remove(hold)
        if hold is not None:
            hold[2].set()
            hold[3].wait(60)
        try:
            if query.get("api-version") not in API_VERSIONS:
                raise Refused(400, "InvalidApiVersion" if "api-version" in query else "MissingRequiredQueryParameter",
                              f"api-version {query.get('api-version')!r} is not one of {sorted(API_VERSIONS)}")
            self._authenticate(request, method, url)
            if SECRET_VALUE.search(urllib.parse.unquote(request.path)):
                raise Refused(400, "InvalidQueryParameterValue", "a SAS or key in the request URL")
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                raise Refused(400, "InvalidRequestBody", "the body is not JSON") from None
            if raw and "application/json" not in (request.headers.get("Content-Type") or ""):
                raise Refused(400, "InvalidHeaderValue", "a JSON body needs Content-Type: application/json")
            status, payload, headers = self._route(method, path, query, body, request)
        except Refused as exc:
            if exc.status == 400:
                with self._lock:
                    self.violations.append(f"{method} {path}: {exc.code}: {exc.message}")
            status, headers = exc.status, {}
            payload = {"odata.metadata": f"{self.url}/$metadata#Microsoft.Azure.Batch.Protocol.Entities.Container"
                                         ".errors/@Element", "code": exc.code,
                       "message": {"lang": "en-US", "value": f"{exc.message}\nRequestId:{uuid.uuid4()}\n"
                                                             f"Time:{_ts(_now())}"}}
        except _DropConnection:
            request.close_connection = True
            with contextlib.suppress(OSError):
                request.connection.shutdown(socket.SHUT_RDWR)
            return
        content = {"Content-Type": "application/json;odata=minimalmetadata"} if payload is not None else {}
        request.reply(status, json.dumps(payload) if payload is not None else b"",
                      {"request-id": str(uuid.uuid4()), **content, **headers})

    def _authenticate(self, request: http.server.BaseHTTPRequestHandler, method: str, url) -> None:
        header = request.headers.get("Authorization") or ""
        if header == f"Bearer {self.bearer_token}":
            return
        if header.startswith("SharedKey "):
            account, _, signature = header[len("SharedKey "):].partition(":")
            if account == self.account and hmac.compare_digest(signature, self._signature(request, method, url)):
                return
            raise Refused(403, "AuthenticationFailed", "Server failed to authenticate the request: the "
                                                       "SharedKey signature does not match")
        raise Refused(401, "AuthenticationFailed", "no valid Authorization header")

    def _signature(self, request: http.server.BaseHTTPRequestHandler, method: str, url) -> str:
        """Batch's Shared Key scheme, computed from the request as received."""
        names = ["Content-Encoding", "Content-Language", "Content-Length", "Content-MD5", "Content-Type", "Date",
                 "If-Modified-Since", "If-Match", "If-None-Match", "If-Unmodified-Since", "Range"]
        lines = [method] + [request.headers.get(name) or "" for name in names]
        ocp = sorted((k.lower(), v) for k, v in request.headers.items() if k.lower().startswith("ocp-") and v)
        text = "\n".join(lines) + "\n" + "".join(f"{k}:{v}\n" for k, v in ocp)
        text += f"/{self.account}{url.path}"
        for name, values in sorted(urllib.parse.parse_qs(url.query).items()):
            text += f"\n{name}:{values[0]}"
        digest = hmac.new(base64.b64decode(self.key), text.encode(), hashlib.sha256).digest()
        return base64.b64encode(digest).decode()

    def _route(self, method: str, path: str, query: dict, body, request) -> tuple[int, object, dict]:
        parts = [p for p in path.split("/") if p]
        if method == "GET" and len(parts) == 2 and parts[0] == "pools":
            return self._get_pool(parts[1], query)
        if method == "GET" and len(parts) == 3 and parts[0] == "pools" and parts[2] == "nodes":
            return self._list_nodes(parts[1], query)
        if parts[:1] == ["jobs"]:
            if method == "POST" and len(parts) == 1:
                return self._create_job(body)
            if len(parts) >= 2:
                job_id = parts[1]
                rest = parts[2:]
                if method == "GET" and not rest:
                    return self._get_job(job_id, query)
                if method == "DELETE" and not rest:
                    return self._delete_job(job_id)
                if method == "POST" and rest == ["terminate"]:
                    return self._terminate_job(job_id, body)
                if method == "POST" and rest == ["addtaskcollection"]:
                    return self._add_tasks(job_id, body, request)
                if method == "GET" and rest == ["taskcounts"]:
                    return self._task_counts(job_id)
                if method == "GET" and rest == ["tasks"]:
                    return self._list_tasks(job_id, query)
                if method == "GET" and len(rest) == 2 and rest[0] == "tasks":
                    return self._get_task(job_id, rest[1], query)
        raise Refused(400, "UnsupportedRequest", f"the fake does not serve {method} {path}")

    # ---- pools and jobs ------------------------------------------------------------------------------

    def _get_pool(self, pool_id: str, query: dict):
        if pool_id not in self.pools:
            raise Refused(404, "PoolNotFound", f"The specified pool {pool_id} does not exist.")
        pool = {"id": pool_id, "url": f"{self.url}/pools/{pool_id}", "state": "active",
                "allocationState": "steady", "vmSize": self.vm_size, "taskSlotsPerNode": 1,
                "enableAutoScale": True, "currentDedicatedNodes": len(self._node_states()),
                "currentLowPriorityNodes": 0, "eTag": "0x1", "lastModified": _ts(_now()), "creationTime": _ts(_now())}
        if self.resize_errors:
            pool["resizeErrors"] = [{"code": e["code"], "message": e["message"]} for e in self.resize_errors]
        return 200, self._select(pool, query, POOL_SELECT), {}

    def _node_states(self) -> list[str]:
        return ["idle"] * len(self._nodes) if self.node_states is None else list(self.node_states)

    def _list_nodes(self, pool_id: str, query: dict):
        if pool_id not in self.pools:
            raise Refused(404, "PoolNotFound", f"The specified pool {pool_id} does not exist.")
        self.node_listings += 1
        nodes = [{"id": f"tvmps_{i:04d}", "url": f"{self.url}/pools/{pool_id}/nodes/tvmps_{i:04d}", "state": state,
                  "vmSize": self.vm_size} for i, state in enumerate(self._node_states())]
        return 200, {"value": [self._select(node, query, NODE_SELECT) for node in nodes]}, {}

    def _existing_job(self, job_id: str) -> FakeJob:
        job = self.jobs.get(job_id.lower())
        if job is None:
            raise Refused(404, "JobNotFound", f"The specified job {job_id} does not exist.")
        return job

    def _create_job(self, body):
        if not isinstance(body, dict):
            raise Refused(400, "InvalidRequestBody", "the body must be a JSON object")
        unknown = sorted(set(body) - JOB_FIELDS)
        if unknown:
            raise Refused(400, "InvalidRequestBody", f"unknown job properties {unknown}")
        job_id = body.get("id")
        if not isinstance(job_id, str) or not BATCH_ID.match(job_id):
            raise Refused(400, "InvalidPropertyValue", f"job id {job_id!r} breaks Batch's id rules")
        pool = (body.get("poolInfo") or {}).get("poolId")
        if pool not in self.pools:
            raise Refused(400, "InvalidPropertyValue", f"poolInfo.poolId {pool!r} is not a pool of this account")
        if body.get("onAllTasksComplete", "noaction") != "noaction":
            raise Refused(400, "InvalidPropertyValue", "onAllTasksComplete must stay noaction: the orchestrator "
                                                       "adds retries and the stitch after other tasks completed")
        self._check_durations(body.get("constraints") or {}, "job constraints")
        self._check_secrets(body, "job")
        with self._lock:
            if job_id.lower() in self.jobs:
                raise Refused(409, "JobExists", "The specified job already exists.")
            self.jobs[job_id.lower()] = FakeJob(job_id, body)
            self.created_jobs.append(job_id)
        return 201, None, {"Location": f"{self.url}/jobs/{job_id}", "DataServiceId": f"{self.url}/jobs/{job_id}",
                           "ETag": "0x1", "Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT"}

    def _get_job(self, job_id: str, query: dict):
        with self._lock:
            data = self._existing_job(job_id).to_json(self.url)
        return 200, self._select(data, query, JOB_SELECT), {}

    def _terminate_job(self, job_id: str, body):
        with self._lock:
            job = self._existing_job(job_id)
            if job.state == "deleting":
                raise Refused(409, "JobBeingDeleted", "The specified job is in the process of being deleted.")
            if job.state in ("terminating", "completed"):
                raise Refused(409, "JobCompleted", "The specified job is already in a completed state.")
            job.state, job.state_time = "terminating", _now()
            job.terminate_reason = (body or {}).get("terminateReason") or "UserTerminate"
            self.terminated_jobs.append(job.id)
            self._stop_tasks(job, "terminate")
        threading.Timer(self.termination_seconds, self._finish_termination, args=(job,)).start()
        return 202, None, {"DataServiceId": f"{self.url}/jobs/{job_id}/terminate"}

    def _finish_termination(self, job: FakeJob) -> None:
        with self._lock:
            if job.state == "terminating":
                job.state, job.state_time = "completed", _now()

    def _delete_job(self, job_id: str):
        with self._lock:
            job = self._existing_job(job_id)
            if job.state == "deleting":
                raise Refused(409, "JobBeingDeleted", "The specified job is in the process of being deleted.")
            if job.state == "terminating":
                raise Refused(409, "JobBeingTerminated", "The specified job is in the process of being terminated.")
            job.state, job.state_time = "deleting", _now()
            self.deleted_jobs.append(job.id)
            self._stop_tasks(job, "delete")
        threading.Timer(0.1, self._finish_delete, args=(job,)).start()
        return 202, None, {}

    def _finish_delete(self, job: FakeJob) -> None:
        while any(t.proc is not None and t.proc.poll() is None for t in list(job.tasks.values())):
            time.sleep(0.05)
        with self._lock:
            if self.jobs.get(job.id.lower()) is job:
                del self.jobs[job.id.lower()]
        shutil.rmtree(self.root / job.id, ignore_errors=True)

    def _stop_tasks(self, job: FakeJob, reason: str) -> None:
        for task in job.tasks.values():
            if task.proc is not None and task.proc.poll() is None:
                task.stop_reason = reason
                task.proc.kill()

    # ---- tasks -----------------------------------------------------------------------------------------

    def _add_tasks(self, job_id: str, body, request):
        if not isinstance(body, dict) or set(body) != {"value"} or not isinstance(body["value"], list):
            raise Refused(400, "InvalidRequestBody", 'the body must be {"value": [tasks]}')
        tasks = body["value"]
        if not 1 <= len(tasks) <= MAX_TASKS_PER_ADD:
            raise Refused(400, "TooManyTasks" if tasks else "InvalidRequestBody",
                          f"{len(tasks)} tasks in one request; 1 to {MAX_TASKS_PER_ADD} allowed")
        for task in tasks:
            self._check_task(task)
        with self._lock:
            job = self._existing_job(job_id)
            if job.state == "deleting":
                raise Refused(409, "JobBeingDeleted", "The specified job is in the process of being deleted.")
            if job.state != "active":
                raise Refused(409, "JobCompleted", "The specified job is already in a completed state.")
            self.add_requests.append(len(tasks))
            drop, self._drop_after = self._drop_after, None
            results = []
            for n, task in enumerate(tasks):
                if drop is not None and n >= drop:
                    break
                self.task_submissions[(job.id, task["id"])] += 1
                if task["id"].lower() in job.tasks:
                    results.append({"status": "clienterror", "taskId": task["id"], "error": {
                        "code": "TaskExists", "message": {"lang": "en-US", "value": "The specified task already "
                                                                                    "exists."}}})
                    continue
                job.tasks[task["id"].lower()] = FakeTask(job.id, task["id"], task)
                self.task_creations[(job.id, task["id"])] += 1
                results.append({"status": "success", "taskId": task["id"], "eTag": "0x1", "lastModified": _ts(_now()),
                                "location": f"{self.url}/jobs/{job.id}/tasks/{task['id']}"})
            self._wake.notify_all()
        if drop is not None:
            raise _DropConnection()
        return 200, {"value": results}, {}

    def _check_task(self, task) -> None:
        if not isinstance(task, dict):
            raise Refused(400, "InvalidRequestBody", "each task must be a JSON object")
        where = f"task {task.get('id')!r}"
        unknown = sorted(set(task) - TASK_FIELDS)
        if unknown:
            raise Refused(400, "InvalidRequestBody", f"{where}: unknown properties {unknown}")
        if not isinstance(task.get("id"), str) or not BATCH_ID.match(task["id"]):
            raise Refused(400, "InvalidPropertyValue", f"{where}: the id breaks Batch's id rules")
        command = task.get("commandLine")
        if not isinstance(command, str) or not command.strip():
            raise Refused(400, "MissingRequiredProperty", f"{where}: commandLine is required")
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise Refused(400, "InvalidPropertyValue", f"{where}: commandLine does not parse: {exc}") from None
        if argv[:3] != WORKER_PREFIX or len(argv) < 4:
            raise Refused(400, "InvalidPropertyValue", f"{where}: the command line must be `python -m gpu_worker "
                                                       f"<command> …` (run inside the container), not {argv[:3]}")
        settings = task.get("containerSettings")
        if not isinstance(settings, dict) or not settings.get("imageName"):
            raise Refused(400, "InvalidPropertyValue", f"{where}: containerSettings.imageName is required on a "
                                                       "container pool")
        if settings["imageName"] != self.worker_image:
            raise Refused(400, "InvalidPropertyValue", f"{where}: image {settings['imageName']!r} is not the "
                                                       f"pool's pre-fetched worker image {self.worker_image!r}")
        if settings.get("workingDirectory") != "taskWorkingDirectory":
            raise Refused(400, "InvalidPropertyValue", f"{where}: the container must start in the task working "
                                                       "directory (workingDirectory=taskWorkingDirectory)")
        options = settings.get("containerRunOptions") or ""
        if "--gpus" in options:
            raise Refused(400, "ContainerInvalidSettings", f"{where}: --gpus: Batch enables GPUs itself")
        if re.search(r"--privileged|--user\b|-u\s|--network\s*=?\s*host", options):
            raise Refused(400, "InvalidPropertyValue", f"{where}: container run options {options!r} not allowed")
        registry = settings.get("registry")
        if registry is not None:
            if registry.get("username") or registry.get("password"):
                raise Refused(400, "InvalidPropertyValue", f"{where}: registry credentials must be an identity")
            if (registry.get("identityReference") or {}).get("resourceId") != self.pool_identity:
                raise Refused(400, "InvalidPropertyValue", f"{where}: registry identityReference must be the "
                                                           "pool identity")
        constraints = task.get("constraints") or {}
        if constraints.get("maxTaskRetryCount") != 0:
            raise Refused(400, "InvalidPropertyValue", f"{where}: maxTaskRetryCount must be 0 (retries belong to "
                                                       "the orchestrator)")
        if "maxWallClockTime" not in constraints:
            raise Refused(400, "MissingRequiredProperty", f"{where}: constraints.maxWallClockTime is required")
        self._check_durations(constraints, where)
        user = (task.get("userIdentity") or {}).get("autoUser") or {}
        if user.get("elevationLevel") == "admin" or (task.get("userIdentity") or {}).get("username"):
            raise Refused(400, "InvalidPropertyValue", f"{where}: tasks run as the non-admin auto user")
        env = {}
        for item in task.get("environmentSettings") or []:
            if not isinstance(item.get("name"), str) or not isinstance(item.get("value", ""), str):
                raise Refused(400, "InvalidPropertyValue", f"{where}: environment settings are name/value strings")
            if SECRET_NAME.search(item["name"]):
                raise Refused(400, "InvalidPropertyValue", f"{where}: environment setting {item['name']} looks "
                                                           "like a secret; nodes use their managed identity")
            env[item["name"]] = item.get("value", "")
        if env.get("WORKER_STORAGE_AUTH") != "imds" or env.get("AZURE_CLIENT_ID") != self.pool_identity_client_id:
            raise Refused(400, "InvalidPropertyValue", f"{where}: workers must get storage tokens from IMDS for "
                                                       "the pool identity (WORKER_STORAGE_AUTH, AZURE_CLIENT_ID)")
        for resource in task.get("resourceFiles") or []:
            if resource.get("httpUrl") and not (resource.get("identityReference") or {}).get("resourceId"):
                raise Refused(400, "InvalidPropertyValue", f"{where}: resource files need an identity reference")
        outputs = task.get("outputFiles") or []
        patterns = {}
        for output in outputs:
            destination = ((output.get("destination") or {}).get("container")) or {}
            url = destination.get("containerUrl")
            if not output.get("filePattern") or not url:
                raise Refused(400, "MissingRequiredProperty", f"{where}: output files need filePattern and "
                                                              "destination.container.containerUrl")
            if urllib.parse.urlsplit(url).query:
                raise Refused(400, "InvalidPropertyValue", f"{where}: output container URL carries a query (SAS?)")
            if (destination.get("identityReference") or {}).get("resourceId") != self.pool_identity:
                raise Refused(400, "InvalidPropertyValue", f"{where}: output files must be uploaded with the pool "
                                                           "identity (identityReference)")
            condition = (output.get("uploadOptions") or {}).get("uploadCondition")
            if condition not in UPLOAD_CONDITIONS:
                raise Refused(400, "InvalidPropertyValue", f"{where}: uploadCondition {condition!r}")
            patterns[output["filePattern"]] = condition
        if patterns.get("out.mp4") != "tasksuccess":
            raise Refused(400, "InvalidPropertyValue", f"{where}: out.mp4 must be uploaded on success")
        if not {"../stdout.txt", "../stderr.txt"} <= {p for p, c in patterns.items() if c == "taskcompletion"}:
            raise Refused(400, "InvalidPropertyValue", f"{where}: stdout.txt and stderr.txt must be uploaded "
                                                       "whatever the outcome")
        self._check_secrets(task, where)

    def _check_durations(self, constraints: dict, where: str) -> None:
        for name in ("maxWallClockTime", "retentionTime"):
            if name in constraints:
                try:
                    value = isodate.parse_duration(constraints[name])
                except (isodate.ISO8601Error, TypeError, ValueError):
                    raise Refused(400, "InvalidPropertyValue", f"{where}: {name} {constraints[name]!r} is not an "
                                                               "ISO 8601 duration") from None
                if value <= dt.timedelta(0):
                    raise Refused(400, "InvalidPropertyValue", f"{where}: {name} must be positive")

    def _check_secrets(self, body: dict, where: str) -> None:
        text = json.dumps(body)
        if SECRET_VALUE.search(text) or "Bearer " in text:
            raise Refused(400, "InvalidPropertyValue", f"{where}: a SAS, key or token in the request body")

    def _task_counts(self, job_id: str):
        with self._lock:
            job = self._existing_job(job_id)
            states = Counter(t.state for t in job.tasks.values())
            succeeded = sum(1 for t in job.tasks.values() if t.state == "completed" and t.result == "success")
        counts = {"active": states["active"], "running": states["running"] + states["preparing"],
                  "completed": states["completed"], "succeeded": succeeded, "failed": states["completed"] - succeeded}
        return 200, {"taskCounts": counts, "taskSlotCounts": dict(counts)}, {}

    def _get_task(self, job_id: str, task_id: str, query: dict):
        with self._lock:
            task = self._existing_job(job_id).tasks.get(task_id.lower())
            if task is None:
                raise Refused(404, "TaskNotFound", f"The specified task {task_id} does not exist.")
            data = task.to_json(self.url)
        return 200, self._select(data, query, TASK_SELECT), {}

    def _list_tasks(self, job_id: str, query: dict):
        token = query.get("$skiptoken")
        with self._lock:
            if token:
                items = self._cursors.pop(token, None)
                if items is None:
                    raise Refused(400, "InvalidQueryParameterValue", "unknown $skiptoken")
            else:
                job = self._existing_job(job_id)
                keep = _parse_filter(query.get("$filter"))
                items = [self._select(t.to_json(self.url), query, TASK_SELECT) if "$select" in query
                         else t.to_json(self.url) for t in job.tasks.values() if keep(t)]
            limit = min(int(query.get("maxresults") or 1000), self.page_size)
            page, rest = items[:limit], items[limit:]
            payload: dict = {"value": page}
            if rest:
                token = uuid.uuid4().hex
                self._cursors[token] = rest
                payload["odata.nextLink"] = (f"{self.url}/jobs/{job_id}/tasks?api-version=2025-06-01"
                                             f"&$skiptoken={token}")
        return 200, payload, {}

    def _select(self, data: dict, query: dict, allowed: set[str]) -> dict:
        if "$select" not in query:
            return data
        names = [n.strip() for n in query["$select"].split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise Refused(400, "InvalidQueryParameterValue", f"$select {query['$select']!r}: unknown {bad}")
        return {k: v for k, v in data.items() if k in names}

    # ---- the pool's nodes ------------------------------------------------------------------------------

    def _node(self) -> None:
        while True:
            with self._lock:
                task = None
                while task is None:
                    if self._closed:
                        return
                    queued = [t for j in self.jobs.values() if j.state == "active"
                              for t in j.tasks.values() if t.state == "active"]
                    task = min(queued, key=lambda t: t.created, default=None)
                    if task is None:
                        self._wake.wait(0.2)
                task.state, task.state_time, task.start = "running", _now(), _now()
                task.runs += 1
                task.stop_reason = None
                run = task.runs
            self._run(task, run)

    def _run(self, task: FakeTask, run: int) -> None:
        task_dir = self.root / task.job / f"{task.id}-run{run}"
        work_dir = task_dir / "wd"
        work_dir.mkdir(parents=True)
        argv = shlex.split(task.body["commandLine"])
        argv[0] = sys.executable
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_STORAGE", "AZURE_"))}
        env.update({item["name"]: item.get("value", "") for item in task.body.get("environmentSettings") or []})
        env.update({"AZ_BATCH_JOB_ID": task.job, "AZ_BATCH_TASK_ID": task.id, "AZ_BATCH_TASK_DIR": str(task_dir),
                    "AZ_BATCH_TASK_WORKING_DIR": str(work_dir), "AZ_BATCH_NODE_ID": threading.current_thread().name,
                    # the node's link-local IMDS address, here a loopback stand-in
                    "WORKER_IMDS_ENDPOINT": self.imds.url, "PYTHONUNBUFFERED": "1"})
        with self._lock:
            fault = next((f for prefix, f in self._faults.items() if task.id.startswith(prefix) and f.runs > 0), None)
            if fault:
                fault.runs -= 1
                argv = [sys.executable, "-c", f"import sys; print({fault.message!r}, file=sys.stderr); "
                                              f"sys.exit({fault.exit_code})"]
            delay = next((d for prefix, d in self._delays.items() if task.id.startswith(prefix)), 0)
            if delay:
                argv = ["sh", "-c", f'sleep {delay} && exec "$@"', "sh", *argv]
            preempt = task.id.lower() in self._preempt
            self._preempt.discard(task.id.lower())
        limit = isodate.parse_duration(task.body["constraints"]["maxWallClockTime"]).total_seconds()
        with open(task_dir / "stdout.txt", "wb") as out, open(task_dir / "stderr.txt", "wb") as err:
            with self._lock:
                job = self.jobs.get(task.job.lower())
                if job is None or job.state != "active":  # terminated or deleted before the task started
                    task.state, task.start = "active", None
                    shutil.rmtree(task_dir, ignore_errors=True)
                    return
                task.proc = subprocess.Popen(argv, cwd=work_dir, env=env, stdout=out, stderr=err)
            if preempt:
                threading.Timer(0.3, self._preempt_now, args=(task,)).start()
            try:
                code = task.proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                task.stop_reason = "timeout"
                task.proc.kill()
                code = task.proc.wait()
        code = 128 - code if code < 0 else code  # killed by signal N: 128+N, as the container runtime reports
        self.finished_runs.append((task.job, task.id, code))
        with self._lock:
            reason = task.stop_reason
            if reason == "preempt":
                task.state, task.state_time, task.requeues, task.proc = "active", _now(), task.requeues + 1, None
                self._wake.notify_all()
                return
            if reason == "delete" or self.jobs.get(task.job.lower()) is None:
                return
        failure = None
        if reason == "terminate":
            failure = {"category": "usererror", "code": "TaskEnded", "message": "The task was ended by a job "
                                                                               "termination"}
        elif reason == "timeout":
            failure = {"category": "usererror", "code": "MaxWallClockTimeExpiry",
                       "message": "The task ran longer than the maximum time allowed by its constraints"}
        elif code != 0:
            failure = {"category": "usererror", "code": "FailureExitCode",
                       "message": "The task exited with an exit code representing a failure",
                       "details": [{"name": "Message", "value": "The task process exited with an unexpected exit "
                                                                "code"}]}
        success = failure is None
        if reason != "terminate":
            upload_error = self._upload_outputs(task, work_dir, success)
            if upload_error and success:
                success, failure = False, {"category": "usererror", "code": "FileUploadFailed",
                                           "message": upload_error}
        with self._lock:
            task.state, task.state_time, task.end = "completed", _now(), _now()
            task.exit_code, task.result, task.failure = code, "success" if success else "failure", failure
            task.proc = None
        shutil.rmtree(task_dir, ignore_errors=True)

    def _preempt_now(self, task: FakeTask) -> None:
        with self._lock:
            if task.proc is not None and task.proc.poll() is None and task.state == "running":
                task.stop_reason = "preempt"
                task.proc.kill()

    def _upload_outputs(self, task: FakeTask, work_dir: Path, success: bool) -> str | None:
        """What a node does after the task: upload each output file whose condition holds."""
        wanted = {"tasksuccess": success, "taskfailure": not success, "taskcompletion": True}
        for output in task.body.get("outputFiles") or []:
            if not wanted[output["uploadOptions"]["uploadCondition"]]:
                continue
            destination = output["destination"]["container"]
            base = destination["containerUrl"].rstrip("/")
            account_url, _, container = base.rpartition("/")
            if account_url != self.storage_url:
                return f"container URL {base} is not on the storage account {self.storage_url}"
            pattern = output["filePattern"]
            matches = sorted(p for p in glob.glob(str(work_dir / pattern), recursive=True) if os.path.isfile(p))
            for match in matches:
                if glob.has_magic(pattern):
                    name = "/".join(filter(None, [destination.get("path", "").rstrip("/"),
                                                  os.path.relpath(match, work_dir).replace(os.sep, "/")]))
                else:
                    name = destination.get("path") or os.path.basename(match)
                try:
                    with open(match, "rb") as data:
                        self.storage.get_blob_client(container, name).upload_blob(data, overwrite=True)
                except Exception as exc:
                    return f"uploading {pattern} to {container}/{name} failed: {type(exc).__name__}"
        return None


class _DropConnection(Exception):
    pass


_CLAUSE = re.compile(r"^\(?\s*(state|id|executionInfo/exitCode|executionInfo/result)\s+(eq|ne|gt|ge|lt|le)\s+"
                     r"('([^']*)'|-?\d+)\s*\)?$")
_OPS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "gt": lambda a, b: a is not None and a > b,
        "ge": lambda a, b: a is not None and a >= b, "lt": lambda a, b: a is not None and a < b,
        "le": lambda a, b: a is not None and a <= b}


def _parse_filter(text: str | None):
    """The OData subset Batch's list-tasks filter accepts that this project may use; anything else is a 400."""
    if not text:
        return lambda task: True
    joiners = set(re.findall(r"\s(and|or)\s", text))
    if len(joiners) > 1:
        raise Refused(400, "InvalidQueryParameterValue", f"$filter {text!r}: mixed and/or")
    clauses = re.split(r"\s(?:and|or)\s", text) if joiners else [text]
    tests = []
    for clause in clauses:
        match = _CLAUSE.match(clause.strip())
        if not match:
            raise Refused(400, "InvalidQueryParameterValue", f"$filter {text!r}: cannot parse {clause!r}")
        prop, op, literal, string = match.groups()
        if prop == "state" and string not in ("active", "preparing", "running", "completed"):
            raise Refused(400, "InvalidQueryParameterValue", f"$filter {text!r}: no task state {string!r}")
        value = string if string is not None else int(literal)
        getter = {"state": lambda t: t.state, "id": lambda t: t.id,
                  "executionInfo/exitCode": lambda t: t.exit_code,
                  "executionInfo/result": lambda t: t.result}[prop]
        tests.append(lambda t, g=getter, f=_OPS[op], v=value: f(g(t), v))
    combine = any if joiners == {"or"} else all
    return lambda task: combine(test(task) for test in tests)

