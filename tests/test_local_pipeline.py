"""The whole pipeline through the Function App and the real Durable SDK, hosted in-process.

HTTP function → orchestrator → activities → local worker processes → stitch → output + manifest.
Faults are real: worker processes are killed, inputs are broken files.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import azure.durable_functions as df
import azure.functions as func
import pytest

import function_app
from local.durable_host import LocalDurableHost
from pipeline import runtime
from pipeline.settings import Settings
from tests.media_helpers import frame_times, make_clip_with_audio, video_stream_info
from tests.stacks import run_id


def local_settings(tmp_path: Path, **changes) -> Settings:
    return Settings(**{"storage": "local", "storage_root": tmp_path / "storage", "compute": "local",
                       "local_workers": 2, "poll_seconds": 0.2, "segment_seconds": 1.0, "max_attempts": 3, **changes})


@pytest.fixture
def local_app(tmp_path: Path) -> Iterator[tuple[LocalDurableHost, runtime.Services]]:
    svc = runtime.configure(local_settings(tmp_path))
    with LocalDurableHost(function_app.app, max_workers=4) as host:
        yield host, svc
    svc.compute.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip_with_audio(tmp_path_factory.mktemp("clip"), "aac", ".mp4", seconds=2.4)


def put_input(svc: runtime.Services, clip: Path, name: str = "clip.mp4") -> str:
    target = Path(svc.storage.path("input", name))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(clip, target)
    return name


def call(host: LocalDurableHost, function: str, method: str = "GET", body: object = None,
         route: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    request = func.HttpRequest(method, "http://localhost/api/jobs", body=data, route_params=route or {})
    response = host.invoke_function(function, req=request)
    return response.status_code, json.loads(response.get_body() or b"{}")


def start(host: LocalDurableHost, **body) -> str:
    code, reply = call(host, "create_job", "POST", body)
    assert code == 202, reply
    return reply["id"]


def wait(host: LocalDurableHost, job_id: str, timeout: float = 180) -> dict:
    return host.wait(job_id, timeout=timeout)


def test_job_end_to_end_keeps_frames_timestamps_size_and_audio(local_app, clip: Path) -> None:
    host, svc = local_app
    job_id = start(host, input=put_input(svc, clip), style="7", strength=0.8)
    status = wait(host, job_id)
    assert status["runtimeStatus"] == "Completed", status
    result = status["output"]
    output = Path(svc.storage.path("output", "clip.mp4"))
    assert frame_times(output) == frame_times(clip)  # every frame, at its own timestamp
    assert result["frames"] == len(frame_times(clip)) and result["segments"] == 3
    info = video_stream_info(output)
    assert (info["width"], info["height"], info["codec"]) == (96, 64, "h264")
    with av.open(str(output)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
    manifest = svc.storage.read_json("output", "clip.json")
    assert manifest["job_id"] == job_id and manifest["frames"] == result["frames"] and manifest["style"] == "7"
    assert svc.storage.list_names("work") == []  # work files cleaned up
    assert svc.compute.poll(run_id(host, job_id)) == {}
    code, view = call(host, "get_job", route={"job_id": job_id})
    assert code == 200 and view["runtime_status"] == "Completed" and view["stage"] == "completed"
    assert view["frames"]["done"] == result["frames"] and view["output"] == "clip.mp4"


def test_same_request_twice_is_one_job(local_app, clip: Path) -> None:
    host, svc = local_app
    name = put_input(svc, clip)
    first = start(host, input=name, style="3")
    assert start(host, input=name, style="3") == first
    other = start(host, input=name, style="4", output="clip-4.mp4")  # other options: another job
    assert other != first
    for job_id in (first, other):
        assert wait(host, job_id)["runtimeStatus"] == "Completed"
    code, listing = call(host, "list_jobs")
    assert code == 200 and {first, other} <= {j["id"] for j in listing["jobs"]}


def kill_attempts(svc: runtime.Services, task_ids: set[str], stop: threading.Event) -> threading.Thread:
    """Kill each listed worker process as soon as it runs (a node lost mid-segment)."""

    def loop() -> None:
        killed = set()
        while not stop.is_set():
            for (job, task), proc in list(svc.compute._running.items()):
                if task in task_ids and (job, task) not in killed:
                    time.sleep(0.3)  # let it start decoding: killed in the middle, not before
                    proc.kill()
                    killed.add((job, task))
            time.sleep(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_segment_that_always_fails_fails_the_job(local_app, clip: Path) -> None:
    host, svc = local_app
    stop = threading.Event()
    kill_attempts(svc, {"seg00000-a0", "seg00000-a1", "seg00000-a2"}, stop)
    try:
        job_id = start(host, input=put_input(svc, clip), style="7")
        status = wait(host, job_id)
    finally:
        stop.set()
    assert status["runtimeStatus"] == "Failed"
    message = status["customStatus"]["error"]["message"]
    assert message == "segment 0 failed 3 times; last error: killed by signal 9"
    assert svc.storage.list_names("output") == [] and svc.storage.list_names("work") == []


def test_a_failed_job_shows_the_progress_it_had_made(local_app, clip: Path) -> None:
    """The last segment fails on every attempt; it can only start once an earlier one has finished (two workers,
    three segments). The failed status keeps the segments and frames done (it showed 0 of each) and nothing
    running."""
    host, svc = local_app
    stop = threading.Event()
    kill_attempts(svc, {"seg00002-a0", "seg00002-a1", "seg00002-a2"}, stop)
    try:
        job_id = start(host, input=put_input(svc, clip), style="7", temporal=0)
        status = wait(host, job_id)
    finally:
        stop.set()
    assert status["runtimeStatus"] == "Failed"
    code, view = call(host, "get_job", route={"job_id": job_id})
    assert code == 200 and view["stage"] == "failed"
    assert view["segments"]["done"] >= 1 and view["segments"]["running"] == 0
    assert view["frames"]["done"] == 25 * view["segments"]["done"]  # 25 fps, 1-second segments


def test_a_job_keeps_its_created_time_and_urls_across_continue_as_new(local_app, clip: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Continue-as-new moves an instance's created time (Azure's backend does, and so does the local host): the
    job's "created" stays its own start, so a long job keeps its place in GET /api/jobs. The 202 answer's URLs
    are the job's status and cancel endpoints."""
    from orchestrators import stylize_video as stylize_module

    monkeypatch.setattr(stylize_module, "TICKS_PER_EXECUTION", 1)  # a new execution every poll
    host, svc = local_app
    code, reply = call(host, "create_job", "POST", {"input": put_input(svc, clip), "style": "7", "temporal": 0})
    job_id = reply["id"]
    assert code == 202 and reply == {"id": job_id, "status_url": f"http://localhost/api/jobs/{job_id}",
                                     "cancel_url": f"http://localhost/api/jobs/{job_id}/cancel"}
    status = wait(host, job_id)
    assert status["runtimeStatus"] == "Completed", status
    started = json.loads(status["input"])["state"]["started"]  # the input of the last execution: it continued
    code, view = call(host, "get_job", route={"job_id": job_id})
    assert code == 200 and view["created"] == started and "started" not in view
    moved = dt.datetime.fromisoformat(status["createdTime"].replace("Z", "+00:00"))
    assert dt.datetime.fromisoformat(started) < moved  # what the instance itself now says
    assert [job["created"] for job in call(host, "list_jobs")[1]["jobs"]] == [started]


def test_the_same_job_posted_twice_at_once_answers_both(local_app, clip: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two identical POSTs whose checks both ran before either started the job: the second start finds the
    instance there (the Durable API refuses it) and answers 202 with the same job; it answered 500."""
    host, svc = local_app
    body = {"input": put_input(svc, clip), "style": "7", "temporal": 0}
    first = call(host, "create_job", "POST", body)
    exists, writing = function_app._exists, function_app._writing
    raced: list[str] = []

    async def not_yet(starter, job_id, restartable=False):  # what the second request saw, a moment too early
        if not raced:
            raced.append(job_id)
            return False
        return await exists(starter, job_id, restartable)

    async def nobody(starter, output_name, **kwargs):
        return None if len(raced) == 1 else await writing(starter, output_name, **kwargs)

    monkeypatch.setattr(function_app, "_exists", not_yet)
    monkeypatch.setattr(function_app, "_writing", nobody)
    second = call(host, "create_job", "POST", body)
    assert raced == [first[1]["id"]] and first[0] == 202 and second == first
    assert wait(host, first[1]["id"])["runtimeStatus"] == "Completed"


def test_a_completed_job_whose_cleanup_failed_says_so(tmp_path: Path, clip: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The video is published, then removing its work files fails on every attempt: the job has succeeded, and
    GET says what is left (it showed nothing for a completed job); a cancel then finishes the cleanup."""
    from pipeline import jobs

    svc = runtime.configure(local_settings(tmp_path, activity_retry_seconds=0.1))
    remove_work = jobs._remove_work

    def unreachable(job, services):
        raise ConnectionError("work container unreachable")

    monkeypatch.setattr(jobs, "_remove_work", unreachable)
    try:
        with LocalDurableHost(function_app.app, max_workers=4) as host:
            job_id = start(host, input=put_input(svc, clip), style="7", temporal=0)
            assert wait(host, job_id)["runtimeStatus"] == "Completed"
            code, view = call(host, "get_job", route={"job_id": job_id})
            assert code == 200 and view["stage"] == "completed"
            assert view["cleanup"] == "incomplete: ConnectionError: work container unreachable"
            assert svc.storage.list_names("work") != []  # what is left
            monkeypatch.setattr(jobs, "_remove_work", remove_work)
            code, reply = call(host, "cancel_job", "POST", route={"job_id": job_id})
            assert code == 202 and reply == {"id": job_id, "stage": "completed", "cleanup": "done"}
            assert "cleanup" not in call(host, "get_job", route={"job_id": job_id})[1]
            assert svc.storage.list_names("work") == [] and svc.storage.list_names("output") != []
    finally:
        svc.compute.close()


def test_the_job_list_reads_every_page(local_app) -> None:
    """The management API answers a page at a time (100 by default) with the next page's token in a header, which
    the SDK's get_status_by ignores: past a page, GET /api/jobs missed jobs (and the check for another job writing
    the same output missed it). Here a page holds 2."""
    from gpu_worker.errors import InputError
    from pipeline.jobspec import rejected_input

    host, _ = local_app
    host.http_api.page_size = 2
    ids = [host.start("stylize_video", rejected_input("input", f"clip{i}.mp4", InputError("bad style")),
                      instance_id=f"rejected-{i}") for i in range(5)]
    for job_id in ids:
        assert wait(host, job_id)["runtimeStatus"] == "Failed"
    code, listing = call(host, "list_jobs")
    assert code == 200 and sorted(job["id"] for job in listing["jobs"]) == ids


def test_a_cancel_that_comes_as_the_job_completes_says_so(local_app, clip: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The job completes between the cancel's status read and its terminate (which the SDK then ignores): the
    cancel answers 409 "already Completed" and leaves the output; it answered "canceled" and cleaned up."""
    host, svc = local_app
    job_id = start(host, input=put_input(svc, clip), style="7", temporal=0)
    terminate = df.DurableOrchestrationClient.terminate

    async def too_late(self, instance_id, reason):
        await asyncio.to_thread(wait, host, instance_id)
        return await terminate(self, instance_id, reason)

    monkeypatch.setattr(df.DurableOrchestrationClient, "terminate", too_late)
    code, reply = call(host, "cancel_job", "POST", route={"job_id": job_id})
    assert code == 409 and reply["error"] == f"job {job_id} is already Completed"
    assert host.status(job_id)["runtimeStatus"] == "Completed"
    assert call(host, "get_job", route={"job_id": job_id})[1]["stage"] == "completed"
    assert svc.storage.list_names("output") == ["clip.json", "clip.mp4"]


def test_unknown_job_is_404(local_app) -> None:
    host, _ = local_app
    assert call(host, "get_job", route={"job_id": "nope"})[0] == 404
    assert call(host, "cancel_job", "POST", route={"job_id": "nope"})[0] == 404


@pytest.mark.parametrize("job_id", ["x/../../y", "x?taskHub=Other&a=", "x%3FtaskHub=Other", "", "a" * 101])
def test_an_id_no_job_can_have_is_404_before_the_durable_client(local_app, job_id: str, monkeypatch) -> None:
    """The SDK puts the id into the management API's URL unquoted: "?" or "/" in it would add to that URL."""
    host, _ = local_app
    asked = []
    monkeypatch.setattr(df.DurableOrchestrationClient, "get_status",
                        lambda self, instance_id, *a, **k: asked.append(instance_id))
    assert call(host, "get_job", route={"job_id": job_id})[0] == 404
    assert call(host, "cancel_job", "POST", route={"job_id": job_id})[0] == 404
    assert asked == []


def test_stylize_status_follows_a_job_over_http(local_app, clip: Path) -> None:
    """`stylize status` against the Function App's GET /api/jobs/{id}, served on loopback from the local host."""
    import subprocess
    import sys

    from tests import loopback

    host, svc = local_app
    seen_keys = []

    class Front(loopback.Handler):
        def do_GET(self) -> None:
            seen_keys.append(self.headers.get("x-functions-key"))
            if len(seen_keys) == 2:  # a Function App restarting answers 503 for a moment: following goes on
                self.reply(503, "Service Unavailable")
                return
            job_id = self.path.split("?")[0].rsplit("/", 1)[-1]
            code, body = call(host, "get_job", route={"job_id": job_id})
            self.reply(code, json.dumps(body))

    server = loopback.Server(Front, "status-front")
    try:
        job_id = start(host, input=put_input(svc, clip), style="7")
        follow = subprocess.run(
            [sys.executable, "-m", "local.cli", "status", job_id, "--app", server.url,
             "--key", "k3y", "--interval", "0.3"], capture_output=True, text=True, timeout=300,
            cwd=Path(__file__).resolve().parents[1])
        missing = subprocess.run(
            [sys.executable, "-m", "local.cli", "status", "nope", "--app", server.url],
            capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    finally:
        server.close()
    nobody = subprocess.run(  # the server is gone: a one-line reason, no traceback
        [sys.executable, "-m", "local.cli", "status", "nope", "--app", server.url, "--once"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert nobody.returncode == 2 and nobody.stderr.startswith(f"error: cannot read the status endpoint {server.url}")
    assert len(nobody.stderr.splitlines()) == 1, nobody.stderr
    assert follow.returncode == 0, follow.stderr
    final = json.loads(follow.stdout)
    assert final["runtime_status"] == "Completed" and final["frames"]["done"] == len(frame_times(clip))
    assert set(seen_keys[:-1]) == {"k3y"}
    assert missing.returncode == 2 and "status endpoint answered 404" in missing.stderr


def test_a_standby_worker_runs_the_first_task_as_a_fresh_one_would(tmp_path: Path) -> None:
    """`stylize run` starts a worker before it knows the task, so torch imports while the host does: the task
    it takes writes the same output, reports the same summary and fails the same way as a fresh process."""
    import av

    from pipeline import compute as backend
    from pipeline.compute import LocalCompute, Task
    from pipeline.storage import LocalStorage
    from tests.media_helpers import make_clip

    clip = make_clip(tmp_path, "bframes", seconds=1)
    storage = LocalStorage(tmp_path / "storage")
    local = LocalCompute(storage, tmp_path / "scratch", poll_wait_seconds=0.2)
    standbys = []
    try:
        for task_id, start in (("good", "0"), ("empty", "50")):
            standbys.append(backend.start_standby())
            local.submit("job", [Task(task_id, ["stylize", str(clip), "out.mp4", "-s", "7", "--scorer", "identity",
                                                "--start", start, "--json"], "work", f"job/{task_id}.mp4")])
            while (state := local.poll("job")[task_id]).state in ("pending", "running"):
                pass
            # the standby ran it (an idle one waits on its stdin) and ended as the task did; one that crashed on
            # start-up is passed over for a fresh process, and would show another exit status here
            assert standbys[-1].wait(10) == (0 if task_id == "good" else 2)
            if task_id == "good":
                assert state.state == "succeeded" and state.summary["frames"] == 25, state
                with av.open(str(tmp_path / "storage" / "work" / "job" / "good.mp4")) as out:
                    assert sum(1 for _ in out.decode(video=0)) == 25
            else:  # bad input: exit 2 and the one-line reason, as from a fresh process
                assert state.state == "failed" and state.exit_code == 2, state
                assert "no video frames in [50.0, end) s" in state.error
        idle = backend.start_standby()  # one nobody takes ends when its starter is done
        backend.stop_standbys()
        assert idle.returncode is not None and backend._standbys == []
    finally:
        local.close()
        backend.stop_standbys()
