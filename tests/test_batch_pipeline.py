"""The whole pipeline through the Azure Batch code path, with no Azure account.

local Durable host → activities → BatchCompute → the real azure-batch SDK → tests/fake_batch.py (loopback, strict
about the requests) → `python -m gpu_worker` run by the fake's "nodes" → Azurite → stitch → output.

The data containers are readable anonymously: Azurite cannot verify Entra ID tokens over plain HTTP, so a
worker's reads must succeed without one. The workers still take the Batch path for their token (the task's
environment says WORKER_STORAGE_AUTH=imds; the fake node's IMDS stand-in answers for the pool identity), send
it, and Azurite ignores it on public containers; tests/test_source_auth.py tests the token path itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import av
import azure.functions as func
import pytest
import torch
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.storage.blob import BlobClient

import function_app
from local.durable_host import LocalDurableHost
from pipeline import batch_compute, runtime
from pipeline.batch_compute import BatchCompute, BatchSetupError, batch_job_id
from pipeline.compute import Task
from pipeline.settings import Settings
from pipeline.storage import BlobStorage
from tests.fake_batch import FakeBatch
from tests.media_helpers import frame_times, make_clip_with_audio
from tests.stacks import batch_settings, new_containers, run_id

SEGMENTS = 2


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 1.6 s at 1 s per segment: two segments, then the stitch
    return make_clip_with_audio(tmp_path_factory.mktemp("clip"), "aac", ".mp4", seconds=1.6)


@pytest.fixture
def fake(azurite: str, tmp_path: Path) -> Iterator[FakeBatch]:
    batch = FakeBatch(azurite, tmp_path / "nodes", nodes=2, page_size=2)  # small pages: paging is exercised
    yield batch
    batch.close()
    assert batch.violations == []


@pytest.fixture
def batch_app(azurite: str, tmp_path: Path, fake: FakeBatch, monkeypatch: pytest.MonkeyPatch):
    # Shared Key works over plain HTTP (bearer tokens don't); the fake checks every signature.
    monkeypatch.setattr(batch_compute, "default_credential", lambda: AzureNamedKeyCredential(fake.account, fake.key))
    svc = runtime.configure(batch_settings(azurite, tmp_path, fake))
    assert isinstance(svc.compute, BatchCompute)  # STYLIZE_COMPUTE=batch selects the backend
    with LocalDurableHost(function_app.app, max_workers=4) as host:
        yield host, svc, fake


def call(host: LocalDurableHost, function: str, method: str = "GET", body: object = None,
         route: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else b""
    request = func.HttpRequest(method, "http://localhost/api/jobs", body=data, route_params=route or {})
    response = host.invoke_function(function, req=request)
    return response.status_code, json.loads(response.get_body() or b"{}")


def start(host: LocalDurableHost, svc: runtime.Services, clip: Path, name: str = "clip.mp4") -> str:
    blob = BlobClient.from_connection_string(svc.settings.blob_connection_string, svc.settings.input_container, name)
    with open(clip, "rb") as data:
        blob.upload_blob(data, overwrite=True)
    code, reply = call(host, "create_job", "POST", {"input": name, "style": "7"})
    assert code == 202, reply
    return reply["id"]


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def assert_job_gone(fake: FakeBatch, svc: runtime.Services, run_id: str) -> None:
    batch_job = batch_job_id(run_id)
    assert batch_job in fake.terminated_jobs and batch_job in fake.deleted_jobs
    wait_until(lambda: fake.job(batch_job) is None and not fake.running())
    assert svc.compute.poll(run_id) == {}
    assert svc.storage.list_names(svc.settings.work_container) == []
    assert max(fake.task_creations.values()) == 1  # no task was ever created twice


def test_batch_job_end_to_end_exact_frames(batch_app, clip: Path) -> None:
    host, svc, fake = batch_app
    s = svc.settings
    fake.preempt("seg00000-a0")  # a spot node taken back mid-task: Batch requeues, the orchestrator sees pending
    job_id = start(host, svc, clip)
    status = host.wait(job_id, timeout=150)
    assert status["runtimeStatus"] == "Completed", status
    result = status["output"]
    assert result["segments"] == SEGMENTS and result["retries"] == 0
    output = Path(s.storage_root) / "out.mp4"
    svc.storage.download_file(s.output_container, "clip.mp4", output)
    assert frame_times(output) == frame_times(clip) and result["frames"] == len(frame_times(clip))
    with av.open(str(output)) as container:
        assert container.streams.audio, "audio kept"
    assert svc.storage.read_json(s.output_container, "clip.json")["frames"] == result["frames"]

    batch_job = batch_job_id(run_id(host, job_id))
    assert [(job, task) for job, task, code in fake.finished_runs if code != 0] == [(batch_job, "seg00000-a0")]
    assert sorted(task for _, task in fake.task_creations) == ["seg00000-a0", "seg00001-a0", "stitch-a0"]
    assert_job_gone(fake, svc, run_id(host, job_id))
    # The nodes uploaded each task's logs; stdout.txt holds the worker's JSON summary.
    logs = svc.storage.list_names(s.logs_container, f"{batch_job}/")
    assert {f"{batch_job}/{t}/{n}" for t in ("seg00000-a0", "seg00001-a0", "stitch-a0")
            for n in ("stdout.txt", "stderr.txt")} <= set(logs)
    svc.storage.download_file(s.logs_container, f"{batch_job}/stitch-a0/stdout.txt", output)
    assert json.loads(output.read_text().splitlines()[-1])["frames"] == result["frames"]
    # Every worker asked the node's IMDS for a storage token for the pool identity.
    assert len(fake.imds.requests) >= 3
    assert {r["query"]["client_id"] for r in fake.imds.requests} == {fake.pool_identity_client_id}


def test_task_failing_twice_then_succeeding_completes_exactly(batch_app, clip: Path) -> None:
    host, svc, fake = batch_app
    fake.fail("seg00001-", runs=2)
    fake.drop_next_add_after(1)  # and the first submission is cut off after one task: it is sent again
    job_id = start(host, svc, clip)
    status = host.wait(job_id, timeout=150)
    assert status["runtimeStatus"] == "Completed", status
    assert status["output"]["retries"] == 2
    output = Path(svc.settings.storage_root) / "out.mp4"
    svc.storage.download_file(svc.settings.output_container, "clip.mp4", output)
    assert frame_times(output) == frame_times(clip)
    batch_job = batch_job_id(run_id(host, job_id))
    created = sorted(task for _, task in fake.task_creations)
    assert created == ["seg00000-a0", "seg00001-a0", "seg00001-a1", "seg00001-a2", "stitch-a0"]
    assert fake.add_requests[:2] == [SEGMENTS, SEGMENTS]  # the dropped request, then all of it again
    assert max(fake.task_submissions[(batch_job, t)] for t in ("seg00000-a0", "seg00001-a0")) == 2
    assert_job_gone(fake, svc, run_id(host, job_id))


def test_task_that_always_fails_fails_the_job_with_reason_and_exit_code(batch_app, clip: Path) -> None:
    host, svc, fake = batch_app
    fake.fail("seg00000-", runs=99, exit_code=3, message="internal error: RuntimeError: CUDA error: device lost")
    job_id = start(host, svc, clip)
    status = host.wait(job_id, timeout=150)
    assert status["runtimeStatus"] == "Failed"
    assert status["customStatus"]["error"] == {
        "kind": "internal",
        "message": "segment 0 failed 3 times; last error: internal error: RuntimeError: CUDA error: device lost "
                   "(exit code 3)",
    }
    assert svc.storage.list_names(svc.settings.output_container) == []
    assert_job_gone(fake, svc, run_id(host, job_id))


def test_a_gpu_pool_whose_nodes_have_no_working_gpu_fails_the_job_as_a_node_fault(batch_app, clip: Path) -> None:
    """On a pool of GPU sizes the tasks must score on the GPU: a task on a node whose driver does not work (here:
    this machine, which has none) fails in seconds as a node fault (exit 3), which is retried, as another node may
    do, and fails the job as an internal fault naming the node's problem: not as bad input, which an operator's
    alert would skip and the uploader cannot fix. Before: each task scored on the node's few CPU cores for hours at
    a GPU's price and failed on its time limit."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    host, svc, fake = batch_app
    fake.vm_size = "standard_nc4as_t4_v3"
    svc.compute._vm_size = None  # read the pool again, as a new Function App instance would
    job_id = start(host, svc, clip)
    status = host.wait(job_id, timeout=150)
    assert status["runtimeStatus"] == "Failed"
    error = status["customStatus"]["error"]
    assert error["kind"] == "internal"
    assert error["message"].startswith("segment ") and " failed 3 times; last error: node error: device cuda was " \
        "asked for but torch finds no CUDA GPU on this machine" in error["message"]
    assert "WORKER_DEVICE=cuda, set by the compute backend" in error["message"]
    codes = [code for _, _, code in fake.finished_runs]
    assert 3 in codes and 0 not in codes and 2 not in codes
    assert svc.storage.list_names(svc.settings.output_container) == []
    assert_job_gone(fake, svc, run_id(host, job_id))


@pytest.mark.parametrize("pool", ["no quota", "unusable nodes", "only slow"])
def test_a_pool_that_cannot_run_tasks_fails_the_job_with_batchs_reason(pool: str, azurite: str, tmp_path: Path,
                                                                       clip: Path, monkeypatch) -> None:
    """Tasks wait with none running: every QUEUE_CHECK_MINUTES the pool is asked whether they can start at all.
    A pool that gets no nodes (no quota for its size) or only unusable ones (billed while they sit there) kept a
    job at "scoring 0/N" forever; now the job fails with Batch's reason and its Batch job ends, so the pool's
    autoscale has nothing left to wait for. A pool that is only slow to get nodes keeps the job waiting."""
    fake = FakeBatch(azurite, tmp_path / "nodes", nodes=0)  # no node ever takes a task
    try:
        if pool == "no quota":
            fake.resize_errors = [{"code": "AccountCoreQuotaReached",
                                   "message": "The specified account has reached VM core quota for the family"}]
            reason = ("the Batch pool stylize-gpu cannot add nodes (AccountCoreQuotaReached: The specified account "
                      "has reached VM core quota for the family)")
        elif pool == "unusable nodes":
            fake.node_states = ["unusable", "starttaskfailed", "unusable"]
            reason = ("every node of the Batch pool stylize-gpu is unusable (1 starttaskfailed, 2 unusable): check "
                      "the node image and the worker image in the registry (docs/batch.md)")
        monkeypatch.setattr(batch_compute, "default_credential",
                            lambda: AzureNamedKeyCredential(fake.account, fake.key))
        svc = runtime.configure(batch_settings(azurite, tmp_path, fake, queue_check_minutes=0.005))  # 0.3 s
        with LocalDurableHost(function_app.app, max_workers=4) as host:
            job_id = start(host, svc, clip)
            if pool == "only slow":
                deadline = time.monotonic() + 60
                while fake.node_listings < 10 and time.monotonic() < deadline:  # ten checks, each found it slow
                    time.sleep(0.1)
                assert fake.node_listings >= 10
                status = host.status(job_id)
                assert status["runtimeStatus"] == "Running" and status["customStatus"]["stage"] == "scoring"
                code, _ = call(host, "cancel_job", "POST", route={"job_id": job_id})
                assert code == 202
            else:
                status = host.wait(job_id, timeout=60)
                assert status["runtimeStatus"] == "Failed"
                assert status["customStatus"]["error"] == {"kind": "internal",
                                                           "message": f"none of this job's tasks can start: {reason}"}
                assert_job_gone(fake, svc, run_id(host, job_id))
    finally:
        fake.close()
    assert fake.violations == []


def test_a_pools_vm_size_decides_the_tasks_device() -> None:
    assert [batch_compute.worker_device(size) for size in ("Standard_NC4as_T4_v3", "standard_nd96isr_h100_v5",
                                                           "Standard_NV36ads_A10_v5", "Standard_D4s_v5",
                                                           "Standard_F8s_v2", "")] == [
        "cuda", "cuda", "cuda", "cpu", "cpu", "cpu"]


class BearerPolicy(SansIOHTTPPolicy):
    """What BearerTokenCredentialPolicy would send, allowed over http (azure-core refuses tokens over http)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def on_request(self, request) -> None:
        request.http_request.headers["Authorization"] = f"Bearer {self.token}"


def test_backend_contract_resubmit_states_and_errors(azurite: str, fake: FakeBatch, clip: Path) -> None:
    """BatchCompute alone, with a bearer authentication policy: a submission cut off half way and a whole
    resubmission create each task once; success, bad input, and a failed output upload come back as the
    orchestrator expects them."""
    names = new_containers(azurite, public=("work",), private=("logs",))
    storage = BlobStorage(connection_string=azurite)
    compute = BatchCompute(fake.url, "stylize-gpu", fake.worker_image, storage, pool_identity=fake.pool_identity,
                           pool_identity_client_id=fake.pool_identity_client_id, logs_container=names["logs"],
                           authentication_policy=BearerPolicy(fake.bearer_token), polling_interval=0.05)
    tasks = [
        Task("probe-ok", ["probe", str(clip)], names["work"], "unused.mp4"),
        Task("bad-input", ["probe", "/no/such/clip.mp4"], names["work"], "unused.mp4"),
        Task("upload-fails", ["stylize", str(clip), "out.mp4", "-s", "0", "--scorer", "identity", "--end", "0.2",
                              "--json"], "no-such-container", "seg.mp4"),
    ]
    fake.drop_next_add_after(2)
    compute.submit("contract job/1", tasks)  # not a valid Batch id: mapped to one
    assert compute.submit("contract job/1", tasks) == 0
    job = batch_job_id("contract job/1")
    assert job.startswith("contract-job-1-") and len(job) <= 64
    assert sorted(fake.task_creations.values()) == [1, 1, 1] and fake.add_requests == [3, 3, 3]

    def done() -> bool:
        return {s.state for s in compute.poll("contract job/1").values()} <= {"succeeded", "failed"} and len(
            compute.poll("contract job/1")) == 3

    wait_until(done, timeout=60)
    states = compute.poll("contract job/1")
    assert states["probe-ok"].state == "succeeded" and states["probe-ok"].summary["frames"] == len(frame_times(clip))
    # from the task's creationTime to its executionInfo.startTime, as the service reports them
    task = fake.job(job).tasks["probe-ok"]
    assert states["probe-ok"].queued_seconds == pytest.approx((task.start - task.created).total_seconds(), abs=1e-3)
    bad = states["bad-input"]
    assert (bad.state, bad.exit_code, bad.error) == ("failed", 2, "error: no such file: /no/such/clip.mp4")
    upload = states["upload-fails"]
    assert upload.state == "failed" and upload.exit_code == 0
    last = upload.error.splitlines()[-1]
    assert last.startswith("FileUploadFailed: uploading out.mp4 to no-such-container/seg.mp4 failed")
    assert last.endswith("(exit code 0)")

    compute.delete("contract job/1")
    assert fake.terminated_jobs == [job] and fake.deleted_jobs == [job]
    wait_until(lambda: fake.job(job) is None)
    assert compute.poll("contract job/1") == {}
    compute.delete("contract job/1")  # deleting again is fine
    compute.close()


def test_refusals_are_clear(azurite: str, fake: FakeBatch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = BlobStorage(connection_string=azurite)
    monkeypatch.setattr(batch_compute, "default_credential", lambda: AzureNamedKeyCredential(fake.account, fake.key))
    settings = Settings(storage="blob", blob_connection_string=azurite, compute="batch", batch_account_url=fake.url,
                        batch_pool_id="no-such-pool", batch_worker_image=fake.worker_image,
                        batch_pool_identity=fake.pool_identity,
                        batch_pool_identity_client_id=fake.pool_identity_client_id)
    with pytest.raises(BatchSetupError, match=r"BATCH_POOL_ID='no-such-pool': the Batch account .* has no such pool"):
        BatchCompute.from_settings(settings, storage)
    with pytest.raises(BatchSetupError, match="needs the settings BATCH_POOL_IDENTITY_CLIENT_ID"):
        BatchCompute.from_settings(replace(settings, batch_pool_identity_client_id=None), storage)
    with pytest.raises(BatchSetupError, match="needs STYLIZE_STORAGE=blob"):
        BatchCompute.from_settings(replace(settings, storage="local"), storage)

    monkeypatch.setattr(batch_compute, "default_credential", lambda: AzureNamedKeyCredential(fake.account, "eA=="))
    with pytest.raises(BatchSetupError, match="authentication refused"):
        BatchCompute.from_settings(replace(settings, batch_pool_id="stylize-gpu"), storage)

    # The fake holds the SDK to its api-version and to Batch's rules: both refusals are recorded.
    old = BatchCompute(fake.url, "stylize-gpu", fake.worker_image, storage, pool_identity=fake.pool_identity,
                       pool_identity_client_id=fake.pool_identity_client_id,
                       credential=AzureNamedKeyCredential(fake.account, fake.key), api_version="2023-05-01.17.0")
    with pytest.raises(BatchSetupError, match="InvalidApiVersion"):
        old.check_pool()
    compute = BatchCompute(fake.url, "stylize-gpu", fake.worker_image, storage, pool_identity=fake.pool_identity,
                           pool_identity_client_id=fake.pool_identity_client_id,
                           credential=AzureNamedKeyCredential(fake.account, fake.key), polling_interval=0.05)
    with pytest.raises(ValueError, match="--gpus"):
        BatchCompute(fake.url, "p", "i", storage, pool_identity="x", pool_identity_client_id="y",
                     container_run_options="--gpus all", credential=AzureNamedKeyCredential("a", "eA=="))
    compute.container_run_options = "--gpus all"  # as if someone bypassed the constructor's check
    with pytest.raises(RuntimeError, match="ContainerInvalidSettings"):
        compute.submit("refused", [Task("t", ["probe", "x.mp4"], "work", "x.mp4")])
    assert [v.split(": ")[1] for v in fake.violations] == ["InvalidApiVersion", "ContainerInvalidSettings"]
    fake.violations.clear()
    compute.delete("refused")


def test_batch_job_ids_follow_batch_rules() -> None:
    assert batch_job_id("clip-0123456789abcdef") == "clip-0123456789abcdef"
    long = "x" * 80
    for instance in (long, "a/b c", "ünïcode-naME", long + "y"):
        job = batch_job_id(instance)
        assert batch_compute.BATCH_ID.match(job) and job == batch_job_id(instance)
    assert batch_job_id(long) != batch_job_id(long + "y")
