"""The plain modules the activities use: planning, job validation, storage (local folder and Azurite)."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from pathlib import Path

import pytest

from gpu_worker.errors import InputError
from pipeline.jobspec import check_blob_name, instance_id, job_spec
from pipeline.plan import plan_segments
from pipeline.progress import failure, job_status
from pipeline.settings import Settings
from pipeline.storage import BlobStorage, LocalStorage

SETTINGS = Settings()


def test_plan_cuts_every_segment_and_leaves_the_end_open() -> None:
    plan = plan_segments(0.0, 95.0, 30.0, 5000)
    # a 5 s tail (1/6 of a segment) joins the last range instead of starting a task of its own
    assert plan == [("0", "30.000"), ("30.000", "60.000"), ("60.000", None)]


def test_plan_keeps_a_long_tail_as_its_own_segment() -> None:
    assert len(plan_segments(0.0, 100.0, 30.0, 5000)) == 4  # 10 s tail = 1/3 segment


def test_plan_ranges_tile_the_timeline_without_gaps() -> None:
    plan = plan_segments(1.4, 7200.0, 30.0, 5000)
    assert plan[0][0] == "0" and plan[-1][1] is None
    assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))
    assert Decimal(plan[1][0]) == Decimal("31.400")  # cuts count from the stream's first timestamp


def test_plan_caps_the_number_of_tasks() -> None:
    assert len(plan_segments(0.0, 36000.0, 1.0, 1000)) <= 1000


def test_plan_without_a_duration_is_one_open_range() -> None:
    assert plan_segments(0.0, None, 30.0, 10) == [("0", None)]


def test_instance_id_per_upload() -> None:
    first = instance_id("input", "clips/My Holiday.mp4", '"0x8DC1"')
    assert first == instance_id("input", "clips/My Holiday.mp4", "0x8DC1")  # re-delivered event
    assert first != instance_id("input", "clips/My Holiday.mp4", "0x8DC2")  # a new upload of the same name
    assert first.startswith("My-Holiday-") and len(first) <= 100


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs.mp4", "a//b.mp4", "a/./b.mp4", "a\\b.mp4", "bad\x07.mp4",
                                  "", "x" * 600])
def test_blob_names_are_checked(name: str) -> None:
    with pytest.raises(InputError):
        check_blob_name(name)


def test_job_from_metadata_with_defaults() -> None:
    job = job_spec("j1", "input", "clips/a.MOV", {"Style": "3:1,4:1", "strength": "0.5"}, SETTINGS)
    assert (job.style, job.strength, job.preserve_color) == ("3:0.5,4:0.5", 0.5, False)
    assert (job.output_name, job.manifest_name) == ("clips/a.mp4", "clips/a.json")
    assert job.segment_seconds == SETTINGS.segment_seconds


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"style": "99"}, "style", "style 99 does not exist"),
        ({"style": "https://evil.example/x.jpg"}, "style", "not URLs"),
        ({"style": "../x.jpg"}, "style", "must be a relative name"),
        ({"strength": "2"}, "strength", "between 0 and 1"),
        ({"max_size": "12.5"}, "max_size", "whole number"),
        ({"max_size": "10"}, "max_size", "64 to 8192"),
        ({"segment_seconds": "0"}, "segment_seconds", "between 1 and 3600"),
        ({"preserve_color": "perhaps"}, "preserve_color", "true or false"),
    ],
)
def test_bad_job_options_name_the_field(options: dict, field: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as err:
        job_spec("j1", "input", "a.mp4", options, SETTINGS)
    assert err.value.field == field


def test_an_output_suffix_has_one_spelling() -> None:
    """"victim.MP4" shared the manifest victim.json with another job's "victim.mp4" (a security review)."""
    spec = job_spec("j1", "input", "a.mp4", {"output": "victim.MP4"}, SETTINGS)
    assert (spec.output_name, spec.manifest_name) == ("victim.mp4", "victim.json")


def test_input_must_look_like_a_video() -> None:
    with pytest.raises(InputError, match="does not look like a video"):
        job_spec("j1", "input", "notes.txt", {}, SETTINGS)
    for name in ("phone.3gp", "camera.M2TS", "edit.mxf", "clip.ogv"):  # refused before, though the worker reads them
        assert job_spec("j1", "input", name, {}, SETTINGS).input_name == name


def test_failure_reasons_from_activity_errors() -> None:
    text = "Activity function 'prepare_job' failed: InputError: clip.mp4 has no video stream \n Traceback..."
    assert failure(RuntimeError(text)) == {"kind": "input", "message": "clip.mp4 has no video stream"}
    assert failure(ValueError("boom")) == {"kind": "internal", "message": "boom"}


def test_status_reports_fps_and_eta() -> None:
    import datetime as dt

    job = {"input_container": "input", "input_name": "a.mp4", "style": "7", "output_name": "a.mp4"}
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    status = job_status("scoring", job, {"segments": 4, "frames_total": 400},
                        {"succeeded": 1, "running": 1, "frames_done": 100}, start.isoformat(),
                        start + dt.timedelta(seconds=10))
    assert status["segments"] == {"done": 1, "total": 4, "running": 1}
    assert (status["fps"], status["eta_seconds"]) == (10.0, 30)
    assert len(json.dumps(status)) < 1024
    # the planned total was an estimate (an MKV's duration counts its audio): a completed job shows what it counted
    done = job_status("completed", job, {"segments": 4, "frames_total": 400}, {"succeeded": 4, "frames_done": 300})
    assert done["frames"] == {"done": 300, "total": 300}


def exercise_storage(storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"video bytes")
    storage.upload_file(src, "work", "job1/segments/00000.mp4", {"style": "7"})
    storage.upload_file(src, "work", "job1/segments/00001.mp4")
    storage.upload_file(src, "work", "job2/plan.json")
    info = storage.info("work", "job1/segments/00000.mp4")
    assert info.size == 11 and info.metadata == {"style": "7"} and info.etag
    assert storage.info("work", "nope.mp4") is None
    assert storage.list_names("work", "job1/") == ["job1/segments/00000.mp4", "job1/segments/00001.mp4"]
    storage.write_json("work", "job1/plan.json", {"segments": [["0", None]]})
    assert storage.read_json("work", "job1/plan.json") == {"segments": [["0", None]]}
    out = tmp_path / "out.bin"
    storage.download_file("work", "job1/segments/00001.mp4", out)
    assert out.read_bytes() == b"video bytes"
    with pytest.raises(InputError, match="does not exist"):
        storage.download_file("work", "missing.mp4", tmp_path / "missing.bin")
    # publishing: the file appears whole under its new name, and publishing again (a retried activity) works
    storage.publish("work", "job1/segments/00001.mp4", "output", "clips/done.mp4")
    storage.publish("work", "job1/segments/00001.mp4", "output", "clips/done.mp4")
    storage.download_file("output", "clips/done.mp4", out)
    assert out.read_bytes() == b"video bytes" and storage.list_names("output") == ["clips/done.mp4"]
    with pytest.raises(FileNotFoundError, match=r"work/missing\.mp4 does not exist"):
        storage.publish("work", "missing.mp4", "output", "clips/other.mp4")
    assert storage.list_names("output") == ["clips/done.mp4"]
    assert storage.delete_prefix("work", "job1/") == 3
    assert storage.list_names("work") == ["job2/plan.json"]
    with pytest.raises(InputError):
        storage.reader_url("work", "../../etc/passwd")


def test_local_storage(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "root")
    exercise_storage(storage, tmp_path)
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "root").rglob("*"))


def test_blob_storage_on_azurite(azurite: str, tmp_path: Path) -> None:
    storage = BlobStorage(connection_string=azurite)
    storage.service.create_container("work")
    storage.service.create_container("output")
    exercise_storage(storage, tmp_path)
    assert storage.reader_url("input", "a b.mp4").endswith("/input/a%20b.mp4")


def test_blob_storage_reads_sources_with_its_identity_token() -> None:
    """In Azure the Function probes the private source over HTTPS with a bearer token, never a key or SAS."""
    from azure.core.credentials import AccessToken

    class Identity:
        def __init__(self) -> None:
            self.scopes: list[str] = []

        def get_token(self, *scopes: str, **kwargs) -> AccessToken:
            self.scopes.extend(scopes)
            return AccessToken("t0ken", 4_102_444_800)

    identity = Identity()
    storage = BlobStorage(account_url="https://acct.blob.core.windows.net", credential=identity)
    headers = storage.reader_headers()
    assert headers["Authorization"] == "Bearer t0ken" and headers["x-ms-version"]
    assert identity.scopes == ["https://storage.azure.com/.default"]
    assert storage.reader_url("input", "a.mp4") == "https://acct.blob.core.windows.net/input/a.mp4"
    assert LocalStorage(Path("/tmp")).reader_headers() is None


def test_local_poll_answers_at_news_and_waits_quietly_between(tmp_path: Path) -> None:
    """The monitor ticks when a task changes, not every POLL_SECONDS: an idle tick replays the orchestration's
    whole history in the process that shares the machine with the workers."""
    import sys
    import time

    from pipeline.compute import LocalCompute, Task

    fake_python = tmp_path / "fake-python"  # stands in for `python -m gpu_worker …`: a second's work, then out.mp4
    fake_python.write_text(f"#!{sys.executable}\nimport time; time.sleep(1); open('out.mp4', 'wb').write(b'x')\n")
    fake_python.chmod(0o755)
    compute = LocalCompute(LocalStorage(tmp_path / "storage"), tmp_path / "scratch", python=str(fake_python),
                           poll_wait_seconds=30)
    try:
        assert compute.submit("job", [Task("seg-0", ["stylize"], "work", "job/seg-0.mp4")]) == 1
        began = time.monotonic()
        states = compute.poll("job")  # the submission itself is news
        while states["seg-0"].state != "succeeded":
            assert states["seg-0"].state in ("pending", "running"), states
            states = compute.poll("job")  # blocks until the task changes, well before the 30 s wait
        assert time.monotonic() - began < 20
        compute.poll_wait_seconds = 0.3
        quiet = time.monotonic()
        assert compute.poll("job")["seg-0"].state == "succeeded"  # no news: waits the whole wait, then answers
        assert time.monotonic() - quiet >= 0.3
        assert (tmp_path / "storage" / "work" / "job" / "seg-0.mp4").read_bytes() == b"x"
    finally:
        compute.close()


def test_a_stitch_does_not_wait_behind_another_jobs_segments(tmp_path: Path) -> None:
    """Two jobs on one worker: job a's stitch, submitted after job b's segments, runs before them (it waited for
    all of b's scoring before, and a showed "stitching" all that time)."""
    import sys

    from pipeline.compute import LocalCompute, Task

    fake_python = tmp_path / "fake-python"  # records the order tasks ran in
    order = tmp_path / "order.txt"
    fake_python.write_text(f"#!{sys.executable}\nimport sys, time\ntime.sleep(0.2)\n"
                           f"open({str(order)!r}, 'a').write(' '.join(sys.argv[3:]) + '\\n')\n"
                           "open('out.mp4', 'wb').write(b'x')\n")
    fake_python.chmod(0o755)
    compute = LocalCompute(LocalStorage(tmp_path / "storage"), tmp_path / "scratch", python=str(fake_python),
                           poll_wait_seconds=0.1)
    try:
        compute.submit("a", [Task("seg-0", ["stylize", "a0"], "work", "a/0.mp4")])
        compute.submit("b", [Task(f"seg-{i}", ["stylize", f"b{i}"], "work", f"b/{i}.mp4") for i in range(3)])
        compute.submit("a", [Task("stitch", ["stitch", "a"], "work", "a/out.mp4")])
        while any(s.state in ("pending", "running") for job in ("a", "b") for s in compute.poll(job).values()):
            pass
        ran = order.read_text().splitlines()
        assert ran.index("stitch a") < ran.index("stylize b1"), ran
    finally:
        compute.close()


@pytest.mark.parametrize(("workers", "own", "spin"), [(1, None, "30000"), (2, None, None), (1, "0", "0")])
def test_only_a_worker_alone_on_the_machine_lets_its_threads_spin(tmp_path: Path, monkeypatch, workers: int,
                                                                    own: str | None, spin: str | None) -> None:
    """Torch's OpenMP threads may spin between kernels when one worker has the cores (faster), never when
    workers share them (1.47x slower); a setting of the caller's own wins either way."""
    import sys

    from pipeline.compute import LocalCompute, Task

    if own is None:
        monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    else:
        monkeypatch.setenv("GOMP_SPINCOUNT", own)
    fake_python = tmp_path / "fake-python"  # writes what its environment says as its output
    fake_python.write_text(f"#!{sys.executable}\nimport os\n"
                           "open('out.mp4', 'w').write(os.environ.get('GOMP_SPINCOUNT', 'unset'))\n")
    fake_python.chmod(0o755)
    compute = LocalCompute(LocalStorage(tmp_path / "storage"), tmp_path / "scratch", workers=workers,
                           python=str(fake_python), poll_wait_seconds=0.1)
    try:
        compute.submit("job", [Task("seg-0", ["stylize"], "work", "job/seg-0.mp4")])
        while compute.poll("job")["seg-0"].state in ("pending", "running"):
            pass
        assert (tmp_path / "storage" / "work" / "job" / "seg-0.mp4").read_text() == (spin or "unset")
    finally:
        compute.close()


def test_a_running_local_task_reports_its_frames_so_far(tmp_path: Path) -> None:
    """One long segment shows progress while it runs (not 0 until it ends): poll reads the count the worker
    keeps, and the job's frames done add it to the finished segments' frames."""
    import sys

    from pipeline.compute import LocalCompute, Task
    from pipeline.jobs import Services, poll, segment_task_id
    from pipeline.jobspec import JobSpec

    fake_python = tmp_path / "fake-python"  # 40 frames written, then it waits to be told to finish
    fake_python.write_text(f"#!{sys.executable}\nimport os, pathlib, time\n"
                           "pathlib.Path(os.environ['WORKER_PROGRESS_FILE']).write_text('40')\n"
                           "while not os.path.exists('finish'): time.sleep(0.05)\n"
                           "open('out.mp4', 'wb').write(b'x'); print('{\"frames\": 48}')\n")
    fake_python.chmod(0o755)
    storage = LocalStorage(tmp_path / "storage")
    compute = LocalCompute(storage, tmp_path / "scratch", python=str(fake_python), poll_wait_seconds=0.1)
    job = JobSpec.from_dict({**job_spec("job-1", "input", "clip.mp4", {}, SETTINGS).to_dict(), "run": "r1"})
    svc = Services(SETTINGS, storage, compute)
    try:
        compute.submit(job.run_id, [Task(segment_task_id(0, 0), ["stylize"], "work", f"{job.run_id}/seg-0.mp4")])
        seen = [poll(job, svc, 1, {}, None) for _ in range(100)]
        running = [p for p in seen if p["running"] and p["frames_done"]]
        assert running and running[-1] == {"succeeded": 0, "running": 1, "failed": [], "frames_done": 40}
        (tmp_path / "scratch" / job.run_id / segment_task_id(0, 0) / "finish").touch()
        while (done := poll(job, svc, 1, {}, None))["succeeded"] == 0:
            pass
        assert done["frames_done"] == 48  # the summary's count, not the last progress
    finally:
        compute.close()


def test_local_cleanup_waits_for_an_upload_in_flight_and_forgets_the_job(tmp_path: Path) -> None:
    """A segment whose upload began before the cancel lands before the cleanup removes the job's files (never
    after it), and a deleted job leaves nothing in memory: the same id can run again."""
    import sys
    import threading
    import time

    from pipeline.compute import LocalCompute, Task
    from pipeline.jobs import Services, cleanup
    from pipeline.jobspec import JobSpec

    fake_python = tmp_path / "fake-python"
    fake_python.write_text(f"#!{sys.executable}\nopen('out.mp4', 'wb').write(b'x')\n")
    fake_python.chmod(0o755)
    storage = LocalStorage(tmp_path / "storage")
    uploading, release = threading.Event(), threading.Event()
    upload = storage.upload_file

    def slow_upload(*args: object, **kwargs: object) -> None:
        uploading.set()
        release.wait(30)
        upload(*args, **kwargs)

    storage.upload_file = slow_upload
    compute = LocalCompute(storage, tmp_path / "scratch", python=str(fake_python), poll_wait_seconds=0.1)
    job = JobSpec.from_dict({**job_spec("job-1", "input", "clip.mp4", {}, SETTINGS).to_dict(), "run": "r1"})
    svc = Services(SETTINGS, storage, compute)
    try:
        compute.submit(job.run_id, [Task("seg-0", ["stylize"], "work", f"{job.run_id}/seg-0.mp4")])
        assert uploading.wait(30)
        threading.Timer(0.5, release.set).start()
        began = time.monotonic()
        cleanup(job, svc, "canceled")
        assert time.monotonic() - began >= 0.4  # it waited for the upload …
        assert storage.list_names("work") == []  # … and then removed what it wrote
        assert storage.read_json("logs", f"ended/{job.run_id}.json")["reason"] == "canceled"
        assert compute.jobs() == [] and compute.poll(job.run_id) == {}
        storage.upload_file = upload
        assert compute.submit(job.run_id, [Task("seg-0", ["stylize"], "work", "again/seg-0.mp4")]) == 1
    finally:
        compute.close()


@pytest.mark.parametrize(("env", "message"), [
    ({"ACTIVITY_RETRY_SECONDS": "0"}, "setting ACTIVITY_RETRY_SECONDS=0.0: must be 0.1 to 3600"),
    ({"POLL_SECONDS": "five"}, "setting POLL_SECONDS='five': must be a number from 0.01 to 300"),
    ({"MAX_ATTEMPTS": "0"}, "setting MAX_ATTEMPTS=0: must be 1 to 10"),
    ({"LOCAL_WORKERS": "2.5"}, "setting LOCAL_WORKERS='2.5': must be a whole number from 1 to 64"),
    ({"STYLIZE_COMPUTE": "gpu"}, "setting STYLIZE_COMPUTE='gpu': must be local or batch"),
    ({"WORK_CONTAINER": "Work"}, "setting WORK_CONTAINER='Work': must be a container name"),
    ({"DEFAULT_TEMPORAL": "1"}, "setting DEFAULT_TEMPORAL=1.0: temporal must be between 0 (off) and 0.95"),
    ({"DEFAULT_STYLE": "99"}, "setting DEFAULT_STYLE='99': style 99 does not exist"),
    ({"DEFAULT_MAX_SIZE": "32"}, "setting DEFAULT_MAX_SIZE=32: must be 0 (full resolution) or 64 to 8192"),
])
def test_every_setting_is_checked_when_read(env: dict, message: str) -> None:
    from pipeline.settings import SettingsError

    with pytest.raises(SettingsError) as error:
        Settings.from_env(env)
    assert str(error.value).startswith(message) and error.value.field == next(iter(env))


def test_a_bad_setting_stops_the_function_app_at_start_up() -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", "import function_app"], capture_output=True, text=True,
                            cwd=repo, env={**os.environ, "ACTIVITY_RETRY_SECONDS": "0"}, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "pipeline.settings.SettingsError: setting ACTIVITY_RETRY_SECONDS=0.0: must be 0.1 to 3600")
