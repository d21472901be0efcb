"""Faults, injected into the real app: the local Durable host, the real orchestrator and activities, real workers.

Each test here runs on local compute and on the Batch path (azure-batch SDK → tests/fake_batch.py) unless its
name says otherwise. The matrix (README "Reliability" has the same table):

fault                                          → what the user sees (tests here follow this order)
worker process killed mid-segment              → retried; exactly the source's frames
spot node preempted mid-task (Batch)           → requeued, not counted as a retry; exact  (test_batch_pipeline)
task fails twice, add-tasks cut off (Batch)    → retried; each task created once; exact  (test_batch_pipeline)
a segment fails on every attempt               → Failed "segment N failed 3 times; last error: …" (test_*_pipeline)
an activity hits a transient storage error     → activity retried; completes exactly
an activity fails on every attempt             → Failed with the storage's reason; nothing left
bad input                                      → Failed at once, not retried
the same upload event delivered twice          → one run  (test_blob_pipeline)
a new upload of the same name while a job runs → older job publishes nothing; newer output only
a new upload, then the API job posted again     → the new run goes ahead; the older publishes nothing (local only)
two API jobs for one output path               → the second is refused (409) until the first ends
two uploads whose names give one output path   → the second fails at once, naming the first
cancel while segments are scored               → Terminated; nothing running; no work, no output
cancel while the stitch runs                   → the same
a job terminated outside the API               → cancel stops its tasks and removes its work (it answered 409)
steps queued before a cancel, run after it      → refused by the run's end record, also after an app restart
a submit in flight when the job ends           → it takes back the Batch job / tasks it made
a restart of a canceled job                    → a new run; completes exactly
GET before the queued terminate lands          → stage "canceled" from the end record  (local only)
a manifest or publish that fails               → Failed; nothing published
Batch job still terminating after the wait     → "cleanup: incomplete" in the cancel reply and status; finished
                                                 by another cancel  (batch only)
the local `stylize run` process killed         → nothing at the output path; rerun works  (test_stylize_cli)
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError, ServiceRequestError
from azure.storage.blob import BlobClient

from pipeline import jobs, runtime
from pipeline.batch_compute import batch_job_id
from pipeline.jobspec import instance_id, job_spec
from tests.media_helpers import frame_times, make_clip_with_audio
from tests.stacks import Stack, open_stack, wait_until


@pytest.fixture(params=["local", "batch"])
def stack(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    azurite = request.getfixturevalue("azurite") if request.param == "batch" else None
    with open_stack(request.param, tmp_path, monkeypatch, azurite) as stack:
        yield stack


@pytest.fixture
def local_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    with open_stack("local", tmp_path, monkeypatch) as stack:
        yield stack


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 1.6 s at 1 s per segment: two segments, then the stitch
    return make_clip_with_audio(tmp_path_factory.mktemp("clip"), "aac", ".mp4", seconds=1.6)


def assert_nothing_left(stack: Stack, job_id: str) -> None:
    """No task running, no work file, nothing published, the backend has forgotten the job."""
    wait_until(lambda: not stack.running(), timeout=30, what="task processes to end")
    run_id = stack.run_id(job_id)
    assert stack.svc.compute.poll(run_id) == {}
    assert stack.names("work") == [] and stack.names("output") == []
    if stack.fake:
        batch_job = batch_job_id(run_id)
        wait_until(lambda: stack.fake.job(batch_job) is None, timeout=30, what="the Batch job to be deleted")
        if batch_job in stack.fake.created_jobs:
            assert batch_job in stack.fake.terminated_jobs


def assert_output_is(stack: Stack, source: Path, tmp_path: Path, name: str = "clip.mp4") -> None:
    assert frame_times(stack.download("output", name, tmp_path / "downloaded.mp4")) == frame_times(source)
    assert stack.names("work") == []


def test_killed_worker_is_retried_and_output_is_exact(stack: Stack, clip: Path, tmp_path: Path) -> None:
    stop = threading.Event()

    def kill_first_attempt_of_segment_1() -> None:
        while not stop.is_set():
            if "seg00001-a0" in stack.running():
                time.sleep(0.3)  # let it start decoding: killed in the middle, not before
                if stack.kill("seg00001-a0"):
                    return
            time.sleep(0.02)

    threading.Thread(target=kill_first_attempt_of_segment_1, daemon=True).start()
    try:
        status = stack.wait(stack.start(stack.put(clip), style="7"))
    finally:
        stop.set()
    assert status["runtimeStatus"] == "Completed", status
    assert status["output"]["retries"] == 1
    assert_output_is(stack, clip, tmp_path)


def test_transient_activity_error_is_retried(stack: Stack, clip: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    read_json, failures = stack.svc.storage.read_json, []

    def flaky_read_json(container: str, name: str) -> object:
        if len(failures) < 2:  # the first two reads of the plan hit a dropped connection
            failures.append(name)
            raise ServiceRequestError("Connection reset by peer")
        return read_json(container, name)

    monkeypatch.setattr(stack.svc.storage, "read_json", flaky_read_json)
    status = stack.wait(stack.start(stack.put(clip), style="7"))
    assert status["runtimeStatus"] == "Completed", status
    assert len(failures) == 2 and "error" not in status["customStatus"]
    assert status["output"]["retries"] == 0  # activity retries are not segment retries
    assert_output_is(stack, clip, tmp_path)


def test_permanent_activity_error_fails_the_job_with_the_reason(stack: Stack, clip: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = []

    def refused_write_json(container: str, name: str, data: object) -> None:
        attempts.append(name)  # a role assignment missing: every attempt is refused the same way
        raise HttpResponseError(message="This request is not authorized to perform this operation using this "
                                        "permission. ErrorCode:AuthorizationPermissionMismatch")

    monkeypatch.setattr(stack.svc.storage, "write_json", refused_write_json)
    name = stack.put(clip)
    job_id = stack.start(name, style="7")
    status = stack.wait(job_id)
    assert status["runtimeStatus"] == "Failed"
    error = status["customStatus"]["error"]
    assert error["kind"] == "internal"
    assert error["message"] == ("This request is not authorized to perform this operation using this permission. "
                                "ErrorCode:AuthorizationPermissionMismatch")
    assert len([n for n in attempts if n.endswith("/plan.json")]) == stack.settings.activity_attempts
    assert_nothing_left(stack, job_id)
    assert stack.names("input") == [name]


def test_bad_input_fails_at_once_without_retries(local_stack: Stack, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    prepare, calls = jobs.prepare, []
    monkeypatch.setattr(jobs, "prepare", lambda *args: calls.append(1) or prepare(*args))
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\x00" * 4096)
    status = local_stack.wait(local_stack.start(local_stack.put(fake, "fake.mp4")))
    assert status["runtimeStatus"] == "Failed"
    error = status["customStatus"]["error"]
    assert error["kind"] == "input" and error["message"].startswith("fake.mp4 is not a video file")
    assert len(calls) == 1


def test_new_upload_of_the_same_name_while_a_job_runs(azurite: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Both uploads run; the older one sees at finalize that its input changed and publishes nothing, so the
    output is wholly the newer upload's: never two jobs racing for one path, never a mix of two videos."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first_clip = make_clip_with_audio(tmp_path / "a", "aac", ".mp4", seconds=1.6)
    second_clip = make_clip_with_audio(tmp_path / "b", "aac", ".mp4", seconds=1.2)
    with open_stack("batch", tmp_path, monkeypatch, azurite) as stack:
        blob = BlobClient.from_connection_string(azurite, stack.settings.input_container, "clips/trip.mp4")

        def upload(path: Path, style: str) -> str:
            with open(path, "rb") as data:
                etag = blob.upload_blob(data, overwrite=True, metadata={"style": style})["etag"]
            stack.host.invoke_function("on_video_uploaded", blob=blob)
            return instance_id(stack.settings.input_container, "clips/trip.mp4", etag)

        first = upload(first_clip, "3")
        wait_until(lambda: stack.running(), what="the first job's tasks")
        second = upload(second_clip, "6")
        assert second != first
        older, newer = stack.wait(first), stack.wait(second)
        assert older["runtimeStatus"] == "Failed"
        assert older["customStatus"]["error"]["message"] == (
            f"input {stack.settings.input_container}/clips/trip.mp4 was replaced by a newer upload while this job "
            "ran; nothing was published")
        assert newer["runtimeStatus"] == "Completed", newer
        assert stack.names("output") == ["clips/trip.json", "clips/trip.mp4"]
        assert_output_is(stack, second_clip, tmp_path, "clips/trip.mp4")
        assert stack.svc.storage.read_json(stack.settings.output_container, "clips/trip.json")["job_id"] == second


def test_an_api_job_on_a_newer_upload_of_the_input_goes_ahead(local_stack: Stack, tmp_path: Path) -> None:
    """The input is uploaded again while its job runs, and the job posted again: the running job will publish
    nothing (its input changed), so the new one starts instead of a 409 that told the user to wait for a job
    that ends publishing nothing. The output is the newer upload's."""
    stack = local_stack
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first_clip = make_clip_with_audio(tmp_path / "a", "aac", ".mp4", seconds=1.6)
    second_clip = make_clip_with_audio(tmp_path / "b", "aac", ".mp4", seconds=1.2)
    first = stack.start(stack.put(first_clip), style="3")
    wait_until(lambda: stack.running(), what="the first job's tasks")  # planned: its plan holds the input's ETag
    second = stack.start(stack.put(second_clip), style="3")  # same body, newer input: 202, not 409
    assert second != first
    assert stack.wait(first)["customStatus"]["error"]["message"].endswith("was replaced by a newer upload while "
                                                                          "this job ran; nothing was published")
    assert stack.wait(second)["runtimeStatus"] == "Completed"
    assert frame_times(stack.download("output", "clip.mp4", tmp_path / "out.mp4")) == frame_times(second_clip)


def test_second_api_job_for_one_output_waits_its_turn(local_stack: Stack, clip: Path, tmp_path: Path) -> None:
    stack = local_stack
    name = stack.put(clip)
    first = stack.start(name, style="3")
    code, reply = stack.call("create_job", "POST", {"input": name, "style": "4"})
    assert code == 409 and reply["field"] == "output"
    assert reply["error"] == (f"job {first} is already writing {stack.settings.output_container}/clip.mp4; wait for "
                              "it to finish or give this job another \"output\" name")
    second = stack.start(name, style="4", output="clip-style4.mp4")  # a path of its own
    assert stack.wait(first)["runtimeStatus"] == "Completed" and stack.wait(second)["runtimeStatus"] == "Completed"
    assert stack.names("output") == ["clip-style4.json", "clip-style4.mp4", "clip.json", "clip.mp4"]
    read = stack.svc.storage.read_json
    assert read(stack.settings.output_container, "clip.json")["style"] == "3"
    assert read(stack.settings.output_container, "clip-style4.json")["style"] == "4"
    third = stack.start(name, style="4")  # the path is free again: the same request now runs
    assert third not in (first, second) and stack.wait(third)["runtimeStatus"] == "Completed"
    assert read(stack.settings.output_container, "clip.json")["style"] == "4"


def test_two_uploads_for_one_output_path(azurite: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trip.mov and trip.mp4 both become output/trip.mp4: the second upload waits its turn, visibly."""
    clip = make_clip_with_audio(tmp_path, "aac", ".mp4", seconds=1.6)
    with open_stack("batch", tmp_path, monkeypatch, azurite) as stack:
        jobs_started = []
        for name in ("trip.mov", "trip.mp4"):
            blob = BlobClient.from_connection_string(azurite, stack.settings.input_container, name)
            with open(clip, "rb") as data:
                etag = blob.upload_blob(data, overwrite=True, metadata={"style": "3"})["etag"]
            stack.host.invoke_function("on_video_uploaded", blob=blob)
            jobs_started.append(instance_id(stack.settings.input_container, name, etag))
        first, second = (stack.wait(job_id) for job_id in jobs_started)
        assert first["runtimeStatus"] == "Completed", first
        assert second["runtimeStatus"] == "Failed"
        assert second["customStatus"]["error"]["message"] == (
            f"job {jobs_started[0]} is already writing {stack.settings.output_container}/trip.mp4 from another "
            "input; set the 'output' metadata to another name, or upload again when it has finished")
        manifest = stack.svc.storage.read_json(stack.settings.output_container, "trip.json")
        assert manifest["input"].endswith("/trip.mov")


def cancel(stack: Stack, job_id: str) -> None:
    code, reply = stack.call("cancel_job", "POST", route={"job_id": job_id})
    assert code == 202 and reply == {"id": job_id, "stage": "canceled", "cleanup": "done"}


def test_cancel_during_scoring_stops_everything(stack: Stack, clip: Path) -> None:
    job_id = stack.start(stack.put(clip), style="7")
    wait_until(lambda: any(t.startswith("seg") for t in stack.running()), what="a segment task to run")
    cancel(stack, job_id)
    wait_terminated(stack, job_id)
    assert_nothing_left(stack, job_id)
    code, reply = stack.call("cancel_job", "POST", route={"job_id": job_id})
    assert code == 409 and "already Terminated" in reply["error"]
    code, view = stack.call("get_job", route={"job_id": job_id})
    assert code == 200 and view["stage"] == "canceled"
    assert view["segments"]["running"] == 0  # it showed the segments that ran when it was canceled


def test_a_job_terminated_outside_the_api_is_stopped_by_cancel(stack: Stack, clip: Path) -> None:
    """An operator's terminate (Durable's own endpoint or tools) ends the orchestration without its cleanup: its
    Batch job went on running its tasks, and cancel answered 409 "already Terminated". Cancel now ends the run."""
    job_id = stack.start(stack.put(clip), style="7")
    wait_until(lambda: any(t.startswith("seg") for t in stack.running()), what="a segment task to run")
    assert stack.host.terminate(job_id, "by an operator")
    wait_terminated(stack, job_id)
    code, reply = stack.call("cancel_job", "POST", route={"job_id": job_id})
    assert code == 202 and reply == {"id": job_id, "stage": "canceled", "cleanup": "done"}
    assert_nothing_left(stack, job_id)
    code, reply = stack.call("cancel_job", "POST", route={"job_id": job_id})
    assert code == 409 and "already Terminated" in reply["error"]


def test_cancel_during_stitching_publishes_nothing(stack: Stack, clip: Path, tmp_path: Path) -> None:
    stack.slow_stitch(3.0, tmp_path)
    job_id = stack.start(stack.put(clip), style="7")
    wait_until(lambda: "stitch-a0" in stack.running(), timeout=120, what="the stitch task to run")
    assert stack.call("get_job", route={"job_id": job_id})[1]["stage"] == "stitching"
    cancel(stack, job_id)
    wait_terminated(stack, job_id)
    assert_nothing_left(stack, job_id)
    time.sleep(3.5)  # past the moment the stitch would have finished
    assert stack.names("output") == [] and not stack.running()


def wait_terminated(stack: Stack, job_id: str) -> None:
    """Terminate is a queued message, as in the Durable extension: the instance stops at its next episode."""
    wait_until(lambda: stack.host.status(job_id)["runtimeStatus"] == "Terminated", timeout=30,
               what="the orchestration to stop")


def restarted_app(stack: Stack) -> jobs.Services:
    """The same settings in a fresh process: nothing of the old one's memory."""
    storage = runtime.build_storage(stack.settings)
    compute = runtime.build_compute(stack.settings, storage)
    if stack.fake is None:
        compute.python = stack.svc.compute.python
    return jobs.Services(stack.settings, storage, compute)


def test_steps_queued_before_a_cancel_create_nothing(stack: Stack, clip: Path) -> None:
    """Activities the extension had already queued run after the cancel: in this process and after a restart
    of the app, none of them creates a compute job, a task or a file."""
    job_id = stack.start(stack.put(clip), style="7")
    wait_until(lambda: any(t.startswith("seg") for t in stack.running()), what="a segment task to run")
    job = stack.job(job_id)
    cancel(stack, job_id)
    wait_terminated(stack, job_id)
    for svc in (stack.svc, restarted_app(stack)):
        try:
            with pytest.raises(jobs.JobEnded, match=f"job {job_id} has ended \\(canceled\\)"):
                jobs.submit_segments(job, svc, [(0, 1), (1, 1)])
            with pytest.raises(jobs.JobEnded):
                jobs.submit_stitch(job, svc, 2, 0)
            with pytest.raises(jobs.JobEnded):
                jobs.prepare(job, svc)
        finally:
            if svc is not stack.svc:
                svc.compute.close()
    assert_nothing_left(stack, job_id)
    if stack.fake:
        assert stack.fake.created_jobs.count(batch_job_id(job.run_id)) == 1


def test_a_submit_in_flight_when_the_job_ends_is_taken_back(stack: Stack, clip: Path) -> None:
    """The worst order: a submit has checked that its job runs, the job is canceled and cleaned up, and only
    then does the submit reach the compute backend (on Batch: its create-job request was held in flight, so
    it creates a job under the id the cleanup had just freed). The submit takes back what it made."""
    settings = stack.settings
    job = dataclasses.replace(job_spec("late-job", settings.input_container, stack.put(clip), {"style": "7"},
                                       settings), run="r1")
    jobs.prepare(job, stack.svc)
    if stack.fake:
        arrived, release = stack.fake.hold("POST", "/jobs")
    else:
        arrived, release = threading.Event(), threading.Event()
        submit = stack.svc.compute.submit

        def slow_submit(run_id: str, tasks: list) -> int:
            arrived.set()
            release.wait(30)
            return submit(run_id, tasks)

        stack.svc.compute.submit = slow_submit
    outcome: list[BaseException | int] = []

    def late_submit() -> None:
        try:
            outcome.append(jobs.submit_segments(job, stack.svc, [(0, 0), (1, 0)]))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=late_submit)
    thread.start()
    assert arrived.wait(30)
    jobs.cleanup(job, stack.svc, "canceled")
    release.set()
    thread.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], jobs.JobEnded), outcome
    wait_until(lambda: not stack.running(), timeout=30, what="task processes to end")
    assert stack.svc.compute.poll(job.run_id) == {}
    assert stack.names("work") == [] and stack.names("output") == []
    if stack.fake:
        batch_job = batch_job_id(job.run_id)
        assert batch_job in stack.fake.created_jobs  # the late request did create it …
        wait_until(lambda: stack.fake.job(batch_job) is None, timeout=30, what="the Batch job to be deleted")


def test_a_restarted_job_runs_again_after_a_cancel(stack: Stack, clip: Path, tmp_path: Path) -> None:
    """POST /api/jobs after a cancel restarts the job under the same id, as a new run that nothing of the old
    one can block or touch."""
    name = stack.put(clip)
    job_id = stack.start(name, style="7")
    wait_until(lambda: any(t.startswith("seg") for t in stack.running()), what="a segment task to run")
    first = stack.run_id(job_id)
    cancel(stack, job_id)
    wait_terminated(stack, job_id)
    assert stack.start(name, style="7") == job_id
    status = stack.wait(job_id)
    assert status["runtimeStatus"] == "Completed", status
    assert stack.run_id(job_id) != first
    assert_output_is(stack, clip, tmp_path)
    if stack.fake is None:
        assert stack.svc.compute.jobs() == []  # no memory kept of either run


def test_manifest_that_cannot_be_written_publishes_nothing(stack: Stack, clip: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Publishing is one step for the user: no video appears unless its manifest did."""
    write_json = stack.svc.storage.write_json

    def refuse_manifests(container: str, name: str, data: object) -> None:
        if container == stack.settings.output_container:
            raise HttpResponseError(message="The specified container is being deleted. ErrorCode:ContainerBeingDeleted")
        write_json(container, name, data)

    monkeypatch.setattr(stack.svc.storage, "write_json", refuse_manifests)
    job_id = stack.start(stack.put(clip), style="7")
    status = stack.wait(job_id)
    assert status["runtimeStatus"] == "Failed"
    assert "ContainerBeingDeleted" in status["customStatus"]["error"]["message"]
    assert_nothing_left(stack, job_id)


def test_a_video_that_cannot_be_published_takes_its_manifest_back(stack: Stack, clip: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise RuntimeError("copying work/… to output/clip.mp4 ended failed")

    monkeypatch.setattr(stack.svc.storage, "publish", refuse)
    status = stack.wait(stack.start(stack.put(clip), style="7"))
    assert status["runtimeStatus"] == "Failed" and "ended failed" in status["customStatus"]["error"]["message"]
    assert stack.names("output") == []


def test_a_cleanup_left_incomplete_is_shown_and_finished_later(azurite: str, clip: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch keeps the canceled job terminating past the wait: the cancel says so, so does the job's status,
    and a second cancel, once Batch has finished, deletes it."""
    with open_stack("batch", tmp_path, monkeypatch, azurite) as stack:
        stack.fake.termination_seconds = 4.0
        stack.svc.compute.wait_seconds = 0.5
        job_id = stack.start(stack.put(clip), style="7")
        wait_until(lambda: any(t.startswith("seg") for t in stack.running()), what="a segment task to run")
        code, reply = stack.call("cancel_job", "POST", route={"job_id": job_id})
        assert code == 202 and reply["stage"] == "canceled"
        assert reply["cleanup"].startswith("incomplete: JobNotDeleted: Batch job ") and "still terminating" in \
            reply["cleanup"]
        assert not stack.running()  # terminating already stopped the tasks: nothing more is paid for
        wait_terminated(stack, job_id)
        code, view = stack.call("get_job", route={"job_id": job_id})
        assert code == 200 and view["stage"] == "canceled" and view["cleanup"] == reply["cleanup"]
        batch_job = batch_job_id(stack.run_id(job_id))
        wait_until(lambda: stack.fake.job(batch_job).state == "completed", timeout=10, what="termination")
        code, reply = stack.call("cancel_job", "POST", route={"job_id": job_id})
        assert code == 202 and reply["cleanup"] == "done"
        assert "cleanup" not in stack.call("get_job", route={"job_id": job_id})[1]
        assert_nothing_left(stack, job_id)
        code, reply = stack.call("cancel_job", "POST", route={"job_id": job_id})
        assert code == 409 and "already Terminated" in reply["error"]


def test_status_says_canceled_before_the_terminate_is_delivered(local_stack: Stack, clip: Path) -> None:
    """Between the cancel and the orchestration's next episode (where the queued terminate lands), the job
    still runs as far as Durable knows; its status already says canceled, from the run's end record."""
    stack = local_stack
    job_id = stack.start(stack.put(clip), style="7")
    wait_until(lambda: any(t.startswith("seg") for t in stack.running()), what="a segment task to run")
    jobs.cleanup(stack.job(job_id), stack.svc, "canceled")  # the cancel's cleanup, its terminate not yet sent
    code, view = stack.call("get_job", route={"job_id": job_id})
    assert code == 200 and view["runtime_status"] == "Running" and view["stage"] == "canceled"
    stack.host.terminate(job_id, "canceled by request")
    wait_terminated(stack, job_id)
    assert_nothing_left(stack, job_id)
