"""The whole app wired up for a test: the real Function App in the local Durable host, with local or Batch compute.

`local`: storage in a folder, worker processes here. `batch`: Blob Storage on Azurite, tasks through the real
azure-batch SDK to tests/fake_batch.py, whose "nodes" run the same worker. A test written against `Stack`
runs on both, so the fault matrix says the same thing about either path.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import azure.functions as func
from azure.core.credentials import AzureNamedKeyCredential
from azure.storage.blob import BlobServiceClient

import function_app
from local.durable_host import LocalDurableHost
from pipeline import batch_compute, runtime
from pipeline.jobspec import JobSpec
from pipeline.settings import Settings
from tests.fake_batch import FakeBatch

FAST = {"poll_seconds": 0.2, "segment_seconds": 1.0, "max_attempts": 3, "activity_retry_seconds": 0.2}


def new_containers(connection: str, public: tuple[str, ...], private: tuple[str, ...] = ()) -> dict[str, str]:
    """Containers of their own on the shared Azurite (kind → name); `public` ones are anonymously readable,
    because Azurite cannot check Entra ID tokens over plain HTTP and the workers read by URL."""
    prefix = uuid.uuid4().hex[:6]
    service = BlobServiceClient.from_connection_string(connection)
    names = {}
    for kind in (*public, *private):
        names[kind] = f"{prefix}-{kind}"
        service.create_container(names[kind], public_access="blob" if kind in public else None)
    return names


def local_settings(tmp_path: Path, **overrides) -> Settings:
    return replace(Settings(storage="local", storage_root=tmp_path / "storage", compute="local", local_workers=2,
                            **FAST), **overrides)


def batch_settings(azurite: str, tmp_path: Path, fake: FakeBatch, **overrides) -> Settings:
    names = new_containers(azurite, public=("input", "styles", "work"), private=("output", "logs"))
    settings = Settings(
        storage="blob", blob_connection_string=azurite, storage_root=tmp_path, compute="batch",
        batch_account_url=fake.url, batch_pool_id="stylize-gpu", batch_worker_image=fake.worker_image,
        batch_pool_identity=fake.pool_identity, batch_pool_identity_client_id=fake.pool_identity_client_id,
        input_container=names["input"], styles_container=names["styles"], output_container=names["output"],
        work_container=names["work"], logs_container=names["logs"], **FAST,
    )
    return replace(settings, **overrides)


@dataclass
class Stack:
    kind: str  # "local" or "batch"
    host: LocalDurableHost
    svc: runtime.Services
    fake: FakeBatch | None = None

    @property
    def settings(self) -> Settings:
        return self.svc.settings

    def put(self, path: Path, name: str = "clip.mp4") -> str:
        self.svc.storage.upload_file(path, self.settings.input_container, name)
        return name

    def call(self, function: str, method: str = "GET", body: object = None,
             route: dict | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
        request = func.HttpRequest(method, "http://localhost/api/jobs", body=data, route_params=route or {})
        response = self.host.invoke_function(function, req=request)
        return response.status_code, json.loads(response.get_body() or b"{}")

    def start(self, name: str, **options) -> str:
        code, reply = self.call("create_job", "POST", {"input": name, **options})
        assert code == 202, reply
        return reply["id"]

    def run_id(self, job_id: str) -> str:
        return run_id(self.host, job_id)

    def job(self, job_id: str) -> JobSpec:
        return job_of(self.host, job_id)

    def wait(self, job_id: str, timeout: float = 180) -> dict:
        return self.host.wait(job_id, timeout=timeout)

    def running(self) -> list[str]:
        """Ids of the tasks whose worker process is alive."""
        pairs = self.fake.running() if self.fake else self.svc.compute.running()
        return [task for _, task in pairs]

    def kill(self, task_id: str) -> bool:
        if self.fake:
            return self.fake.kill(task_id)
        procs = [p for (_, task), p in list(self.svc.compute._running.items()) if task == task_id]
        for proc in procs:
            proc.kill()
        return bool(procs)

    def slow_stitch(self, seconds: float, scratch: Path) -> None:
        """The stitch task sleeps before it starts, so a test can act while it runs."""
        if self.fake:
            self.fake.delay("stitch-", seconds)
            return
        wrapper = scratch / "slow-stitch-python"
        wrapper.write_text(f'#!/bin/sh\n[ "$3" = stitch ] && sleep {seconds}\nexec {self.svc.compute.python} "$@"\n')
        wrapper.chmod(0o755)
        self.svc.compute.python = str(wrapper)

    def names(self, kind: str) -> list[str]:
        """What a container holds: kind is input, output, work, …"""
        return self.svc.storage.list_names(getattr(self.settings, f"{kind}_container"))

    def download(self, kind: str, name: str, path: Path) -> Path:
        self.svc.storage.download_file(getattr(self.settings, f"{kind}_container"), name, path)
        return path


def job_of(host: LocalDurableHost, job_id: str) -> JobSpec:
    """The job as its orchestration runs it (with its current run)."""
    args = host.status(job_id)["input"]
    return JobSpec.from_dict((json.loads(args) if isinstance(args, str) else args)["job"])


def run_id(host: LocalDurableHost, job_id: str) -> str:
    """The key of the job's current run: its compute job, work files and end record."""
    return job_of(host, job_id).run_id


def wait_until(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextlib.contextmanager
def open_stack(kind: str, tmp_path: Path, monkeypatch, azurite: str | None = None, **overrides) -> Iterator[Stack]:
    """The app on `kind` compute, torn down afterwards; for `batch` the fake must have seen no rule broken."""
    fake = None
    if kind == "local":
        settings = local_settings(tmp_path, **overrides)
    else:
        fake = FakeBatch(azurite, tmp_path / "nodes", nodes=2)
        # Shared Key works over plain HTTP (bearer tokens don't); the fake checks every signature.
        monkeypatch.setattr(batch_compute, "default_credential",
                            lambda: AzureNamedKeyCredential(fake.account, fake.key))
        settings = batch_settings(azurite, tmp_path, fake, **overrides)
    svc = runtime.configure(settings)
    try:
        with LocalDurableHost(function_app.app, max_workers=4) as host:
            yield Stack(kind, host, svc, fake)
    finally:
        svc.compute.close()
        if fake:
            fake.close()
    assert fake is None or fake.violations == []
