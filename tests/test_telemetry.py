"""Telemetry (pipeline/telemetry.py) against a loopback stand-in for the Application Insights ingestion endpoint.

The whole pipeline runs in-process (Function App + real Durable SDK + local worker processes), exporting
through opencensus-ext-azure to a local HTTP server that records the envelopes it is sent.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import azure.functions as func
import pytest

import function_app
from local.durable_host import LocalDurableHost
from pipeline import runtime, telemetry
from pipeline.compute import TaskState
from pipeline.settings import Settings
from tests.media_helpers import make_clip_with_audio

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "infra" / "monitoring"
IKEY = "00000000-0000-0000-0000-000000000000"


class Ingestion:
    """Accepts POST /v2.1/track and /v2/track (gzip or plain JSON, an array or one envelope per line)."""

    def __init__(self) -> None:
        self.envelopes: list[dict] = []
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.rstrip("/") not in ("/v2.1/track", "/v2/track"):
                    self.send_response(404)
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip" or body[:2] == b"\x1f\x8b":
                    body = gzip.decompress(body)
                text = body.decode()
                try:
                    items = json.loads(text)
                except ValueError:
                    items = [json.loads(line) for line in text.splitlines() if line.strip()]
                items = items if isinstance(items, list) else [items]
                with outer._lock:
                    outer.envelopes.extend(items)
                    outer.headers.append(dict(self.headers))
                reply = json.dumps({"itemsReceived": len(items), "itemsAccepted": len(items), "errors": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def connection_string(self) -> str:
        return f"InstrumentationKey={IKEY};IngestionEndpoint=http://127.0.0.1:{self.server.server_port}/"

    def records(self) -> list[dict]:
        with self._lock:
            return list(self.envelopes)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_connection_string() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"InstrumentationKey={IKEY};IngestionEndpoint=http://127.0.0.1:{port}/"


def base_data(envelope: dict) -> dict:
    return envelope["data"]["baseData"]


def events(envelopes: list[dict], name: str, job_id: str | None = None) -> list[dict]:
    found = [base_data(e) for e in envelopes
             if e["data"]["baseType"] == "EventData" and base_data(e)["name"] == name]
    return [e for e in found if job_id is None or e["properties"]["job_id"] == job_id]


@pytest.fixture(scope="module")
def ingestion() -> Iterator[Ingestion]:
    server = Ingestion()
    yield server
    server.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip_with_audio(tmp_path_factory.mktemp("clip"), "aac", ".mp4", seconds=2.0)


@pytest.fixture(autouse=True)
def _telemetry_off_afterwards() -> Iterator[None]:
    yield
    telemetry.shutdown(timeout=2)
    telemetry.configure("")


def run_job(tmp: Path, clip: Path, connection_string: str, name: str = "clip.mp4") -> tuple[dict, str, float]:
    """Configure telemetry, run one job through the HTTP API, flush; returns (status, job id, flush seconds)."""
    telemetry.configure(connection_string)
    settings = Settings(storage="local", storage_root=tmp / "storage", compute="local", local_workers=2,
                        poll_seconds=0.2, segment_seconds=1.0, max_attempts=2)
    svc = runtime.configure(settings)
    target = Path(svc.storage.path("input", name))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(clip, target)
    try:
        with LocalDurableHost(function_app.app, max_workers=4) as host:
            body = json.dumps({"input": name, "style": "7"}).encode()
            response = host.invoke_function("create_job", req=func.HttpRequest(
                "POST", "http://localhost/api/jobs", body=body, route_params={}))
            assert response.status_code == 202, response.get_body()
            job_id = json.loads(response.get_body())["id"]
            status = host.wait(job_id, timeout=120)
        began = time.monotonic()
        telemetry.flush(timeout=10)
        flushed = time.monotonic() - began
    finally:
        svc.compute.close()
    return status, job_id, flushed


@pytest.fixture(scope="module")
def up_run(tmp_path_factory: pytest.TempPathFactory, clip: Path, ingestion: Ingestion) -> dict:
    status, job_id, _ = run_job(tmp_path_factory.mktemp("up"), clip, ingestion.connection_string)
    telemetry.shutdown(timeout=5)
    return {"status": status, "job_id": job_id, "envelopes": ingestion.records()}


def test_job_records_reach_ingestion_with_segment_figures_and_dimensions(up_run: dict) -> None:
    assert up_run["status"]["runtimeStatus"] == "Completed", up_run["status"]
    job_id, envelopes = up_run["job_id"], up_run["envelopes"]
    mine = [e for e in envelopes if (base_data(e).get("properties") or {}).get("job_id") == job_id]
    assert mine, f"no records for {job_id} among {len(envelopes)}"
    for envelope in mine:  # every record: the common dimensions, the job as its operation, our ikey
        assert set(telemetry.DIMENSIONS) <= set(base_data(envelope)["properties"]), base_data(envelope)
        assert envelope["tags"]["ai.operation.id"] == job_id and envelope["iKey"] == IKEY

    segments = events(envelopes, "SegmentCompleted", job_id)
    # one record per segment although the poll activity ran many times
    assert sorted(int(e["properties"]["segment"]) for e in segments) == [0, 1]
    for event in segments:
        props, figures = event["properties"], event["measurements"]
        assert props["task_id"] == f"seg{int(props['segment']):05d}-a0" and props["attempt"] == "0"
        assert props["stage"] == "scoring" and props["node"] == socket.gethostname()
        assert props["device"] == "cpu" and props["gpu"] == ""
        assert figures["frames"] > 0 and figures["fps"] > 0 and figures["seconds"] > 0
        assert 0 < figures["latency_p50_ms"] <= figures["latency_p95_ms"] <= figures["latency_max_ms"]
        for key in ("decode_seconds", "score_seconds", "encode_seconds", "peak_rss_mb"):
            assert key in figures, key
    assert sum(e["measurements"]["frames"] for e in segments) == 50  # 2 s at 25 fps

    stitched = events(envelopes, "StitchCompleted", job_id)
    assert len(stitched) == 1 and stitched[0]["measurements"]["frames"] == 50

    stages = {e["properties"]["stage"]: e["measurements"]["duration_seconds"]
              for e in events(envelopes, "StageCompleted", job_id)}
    assert set(stages) == {"probing", "scoring", "stitching", "finishing"}, stages
    activities = {e["properties"]["activity"]: e["measurements"]
                  for e in events(envelopes, "ActivityCompleted", job_id)}
    assert activities["prepare_job"]["bytes_read"] > 0 and activities["finalize_job"]["bytes_written"] > 0
    assert "poll_tasks" not in activities  # every tick: only its failures are recorded

    completed = events(envelopes, "JobCompleted", job_id)
    assert len(completed) == 1 and len(events(envelopes, "JobStarted", job_id)) == 1
    figures = completed[0]["measurements"]
    assert figures["frames"] == 50 and figures["segments"] == 2 and figures["scoring_seconds"] > 0
    assert completed[0]["properties"]["outcome"] == "succeeded"
    traces = [base_data(e)["message"] for e in mine if e["data"]["baseType"] == "MessageData"]
    assert any("completed, 50 frames" in t for t in traces), traces


def timed_exporter_calls(monkeypatch) -> list[float]:
    """Seconds spent in each record hand-over to OpenCensus (what a hook costs the job beyond building dicts)."""
    spent: list[float] = []
    for name in ("event", "trace"):
        original = getattr(telemetry._Exporter, name)

        def timed(self, *args, _original=original):
            began = time.perf_counter()
            try:
                return _original(self, *args)
            finally:
                spent.append(time.perf_counter() - began)

        monkeypatch.setattr(telemetry._Exporter, name, timed)
    return spent


def test_endpoint_down_does_not_slow_or_break_the_job(tmp_path: Path, clip: Path, monkeypatch) -> None:
    """What telemetry can add to a job's wall time is what its hooks spend handing records over plus the
    flush at the end: both are measured and bounded here (the job's own time varies by seconds with
    worker start-up on a busy machine, so it is not compared)."""
    spent = timed_exporter_calls(monkeypatch)
    before = telemetry.stats()
    status, _, flushed = run_job(tmp_path, clip, closed_port_connection_string())
    assert status["runtimeStatus"] == "Completed", status
    began = time.monotonic()
    telemetry.shutdown(timeout=3)
    stopped = time.monotonic() - began
    after = telemetry.stats()
    assert after["export_failures"] > before["export_failures"]  # swallowed and counted
    assert after["errors"] == before["errors"] and after["dropped"] == before["dropped"]
    assert len(spent) >= 10 and sum(spent) < 1.0, (len(spent), sum(spent))  # the hooks only queue
    assert flushed < 5 and stopped < 4, (flushed, stopped)
    assert sum(spent) + flushed + stopped < 6


def test_hanging_endpoint_costs_the_caller_nothing_and_flush_is_bounded() -> None:
    """An endpoint that accepts connections and never answers (a black hole, unlike a closed port)."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        port = hole.getsockname()[1]
        assert telemetry.configure(f"InstrumentationKey={IKEY};IngestionEndpoint=http://127.0.0.1:{port}/")
        began = time.monotonic()
        for i in range(500):
            telemetry.job_canceled(f"job-{i}")
        assert time.monotonic() - began < 1.0
        began = time.monotonic()
        assert not telemetry.flush(timeout=1.0)  # not sent yet: it says so, after its timeout and no later
        telemetry.shutdown(timeout=1.0)
        assert time.monotonic() - began < 3.0


def test_failed_job_and_failed_task_are_recorded(tmp_path: Path, ingestion: Ingestion) -> None:
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video\n" * 50)
    status, job_id, _ = run_job(tmp_path, fake, ingestion.connection_string, name="fake.mp4")
    assert status["runtimeStatus"] == "Failed"

    # a task failure reported by two polls (the poll activity runs every tick) is recorded once
    states = {"seg00003-a1": TaskState("seg00003-a1", "failed", exit_code=-9, error="killed by signal 9"),
              "seg00004-a0": TaskState("seg00004-a0", "running")}
    telemetry.tasks_polled(job_id, states)
    telemetry.tasks_polled(job_id, states)
    telemetry.flush(timeout=10)
    envelopes = ingestion.records()

    failed = events(envelopes, "JobFailed", job_id)
    assert len(failed) == 1, failed
    props = failed[0]["properties"]
    assert props["kind"] == "input" and "fake.mp4 is not a video file" in props["reason"]
    assert props["stage"] == "probing" and props["outcome"] == "failed"
    exceptions = [base_data(e) for e in envelopes if e["data"]["baseType"] == "ExceptionData"
                  and base_data(e)["properties"]["job_id"] == job_id]
    assert any(x["properties"].get("activity") == "prepare_job" for x in exceptions), exceptions

    task_failed = events(envelopes, "TaskFailed", job_id)
    assert len(task_failed) == 1
    props = task_failed[0]["properties"]
    assert (props["segment"], props["attempt"], props["reason"], props["kind"]) == ("3", "1", "killed by signal 9",
                                                                                     "task")


def test_managed_identity_credential_signs_the_requests(ingestion: Ingestion, monkeypatch) -> None:
    import azure.identity

    made = []

    class FakeManagedIdentity:
        def __init__(self, client_id=None):
            made.append(client_id)

        def get_token(self, *scopes, **kwargs):
            return SimpleNamespace(token="token-from-managed-identity", expires_on=int(time.time()) + 3600)

    monkeypatch.setattr(azure.identity, "ManagedIdentityCredential", FakeManagedIdentity)
    assert telemetry.configure(ingestion.connection_string, "ClientId=1234-abcd;Authorization=AAD")
    assert made == ["1234-abcd"]
    telemetry.job_canceled("job-signed")
    assert telemetry.flush(timeout=10)
    deadline = time.monotonic() + 5
    while not events(ingestion.records(), "JobCanceled", "job-signed") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert events(ingestion.records(), "JobCanceled", "job-signed")
    assert "Bearer token-from-managed-identity" in [h.get("Authorization") for h in ingestion.headers]


def test_bad_settings_turn_telemetry_off_without_raising() -> None:
    assert not telemetry.configure("InstrumentationKey=not-a-guid;IngestionEndpoint=http://127.0.0.1:9/")
    assert not telemetry.configure(closed_port_connection_string(), "Authorization=ikey")
    assert not telemetry.enabled()


def test_workbook_is_built_from_the_kql_files_which_name_what_is_emitted(up_run: dict, ingestion: Ingestion) -> None:
    builder = runpy.run_path(str(MONITORING / "build_workbook.py"))
    text = (MONITORING / "stylize.workbook.json").read_text(encoding="utf-8")
    assert text == builder["render"](), "stale workbook: run python infra/monitoring/build_workbook.py"
    queries = [item["content"]["query"] for item in json.loads(text)["items"] if item["type"] == 3]
    kql = {path.name: path.read_text(encoding="utf-8") for path in MONITORING.glob("*.kql")}
    assert {"job-timeline.kql", "slowest-segments.kql", "fps-by-node-gpu.kql", "failures-by-reason.kql",
            "failed-jobs-alert.kql"} <= set(kql)
    for name, query in kql.items():
        if name != "failed-jobs-alert.kql":
            assert builder["workbook_query"](query) in queries, name
    assert "loadTextContent('failed-jobs-alert.kql')" in (MONITORING / "workbook.bicep").read_text(encoding="utf-8")

    # what the queries read is what the pipeline writes: the job run above, plus the failure records
    telemetry.configure(ingestion.connection_string)
    context = SimpleNamespace(instance_id="job-kql", is_replaying=False, current_utc_datetime=None)
    telemetry.job_failed(context, {"kind": "internal", "message": "segment 1 failed 3 times"}, {})
    telemetry.tasks_polled("job-kql", {"seg00001-a0": TaskState("seg00001-a0", "failed", 1, "boom")})
    assert telemetry.flush(timeout=10)
    emitted = [base_data(e) for e in ingestion.records() if e["data"]["baseType"] == "EventData"]  # job + failures
    names = {e["name"] for e in emitted}
    dims = {key for e in emitted for key in e["properties"]}
    figures = {key for e in emitted for key in e.get("measurements", {})} | set(telemetry._SEGMENT_FIGURES)
    for name, query in kql.items():
        for event in re.findall(r'"([A-Z][A-Za-z]+(?:Started|Completed|Failed|Canceled))"', query):
            assert event in names, (name, event)
        for key in re.findall(r"customDimensions\.(\w+)", query):
            assert key in dims, (name, key)
        for key in re.findall(r"customMeasurements\.(\w+)", query):
            assert key in figures, (name, key)


NO_TELEMETRY_SCRIPT = """
import sys, threading
from types import SimpleNamespace
import datetime as dt
import function_app  # configures telemetry from the (absent) connection string
from pipeline import telemetry
from pipeline.compute import TaskState

before = {t.name for t in threading.enumerate()}
context = SimpleNamespace(instance_id="job-1", is_replaying=False,
                          current_utc_datetime=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
state = {}
telemetry.configure()
telemetry.job_stage(context, "probing", state)
context.current_utc_datetime += dt.timedelta(seconds=3)
telemetry.job_stage(context, "scoring", state)
with telemetry.activity("job-1", "prepare_job", "probing", bytes_read=lambda: 1 / 0):
    pass
telemetry.tasks_polled("job-1", {"seg00000-a0": TaskState("seg00000-a0", "succeeded", 0, None, {"frames": 3})})
telemetry.job_completed(context, {"frames": 3, "seconds": 3.0}, state)
telemetry.job_failed(context, {"kind": "internal", "message": "x"}, state)
telemetry.job_canceled("job-1")
assert telemetry.flush() and not telemetry.enabled()
telemetry.shutdown()
assert state["telemetry"]["seconds"] == {"probing": 3.0}, state  # stage marks are kept either way
leaked = sorted(m for m in sys.modules if m.startswith("opencensus"))
assert not leaked, leaked
assert {t.name for t in threading.enumerate()} == before, threading.enumerate()
assert telemetry.stats() == dict.fromkeys(("emitted", "sent", "export_failures", "dropped", "errors"), 0)
print("ok")
"""


def test_without_connection_string_nothing_is_imported_or_started() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in (telemetry.CONNECTION_ENV, telemetry.AUTHENTICATION_ENV, "APPINSIGHTS_INSTRUMENTATIONKEY")}
    proc = subprocess.run([sys.executable, "-c", NO_TELEMETRY_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
