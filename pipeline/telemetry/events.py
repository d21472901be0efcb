"""What telemetry records: every event and trace, its name, dimensions and measurements, in one place.

Pure: each builder turns the pipeline's own values into :class:`Event` and :class:`Trace` values and sends
nothing. The exporter (``exporter.py``) decides how they travel, so the names, dimensions and measurements
that ``infra/monitoring/*.kql`` read stay the same whichever SDK sends them. Renaming an event here means
changing those queries too.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Every record carries these (empty where they do not apply); ``job_id`` is also its operation id.
DIMENSIONS = ("job_id", "segment", "task_id", "attempt", "node", "stage")
OPERATION_NAME = "stylize_video"

JOB_STARTED = "JobStarted"
STAGE_COMPLETED = "StageCompleted"
JOB_COMPLETED = "JobCompleted"
JOB_FAILED = "JobFailed"
JOB_CANCELED = "JobCanceled"
SEGMENT_COMPLETED = "SegmentCompleted"
STITCH_COMPLETED = "StitchCompleted"
TASK_FAILED = "TaskFailed"
ACTIVITY_COMPLETED = "ActivityCompleted"

# The worker's figures that SegmentCompleted carries as measurements (from the task's JSON summary).
SEGMENT_FIGURES = ("frames", "seconds", "fps", "decode_seconds", "score_seconds", "encode_seconds",
                   "peak_rss_mb", "peak_device_memory_mb", "batch_size", "first_pts_seconds", "last_pts_seconds",
                   "first_frame_seconds", "queued_seconds")
JOB_FIGURES = ("frames", "segments", "seconds", "retries")

_TASK_ID = re.compile(r"^(?:seg(?P<segment>\d+)|(?P<stitch>stitch))-a(?P<attempt>\d+)$")
_GPU_NAME = re.compile(r"\((?P<name>[^)]+)\)")
_HOST = socket.gethostname()


@dataclass(frozen=True)
class Event:
    """A custom event (``customEvents``): its figures go in ``customMeasurements``."""

    name: str
    properties: dict[str, str]
    measurements: dict[str, float]


@dataclass(frozen=True)
class Trace:
    """A trace line (``traces``), or an exception record (``exceptions``) when it carries one."""

    level: int
    message: str
    properties: dict[str, str]
    exception: BaseException | None = None


Record = Event | Trace


def dimensions(job_id: str = "", segment: int | str = "", task_id: str = "", attempt: int | str = "",
               node: str | None = None, stage: str = "", **extra: object) -> dict[str, str]:
    """The dimensions every record carries (strings; empty where they do not apply), plus ``extra``.

    ``node`` is where the work ran: the worker's host for a task, this host (the default) otherwise.
    """
    dims = {"job_id": job_id, "segment": segment, "task_id": task_id, "attempt": attempt,
            "node": _HOST if node is None else node, "stage": stage, **extra}
    return {key: "" if value is None else str(value) for key, value in dims.items()}


def measurements(values: Mapping[str, Any]) -> dict[str, float]:
    """Only real numbers, rounded: App Insights takes doubles, and ``None``/text figures are left out."""
    return {key: round(float(value), 3) for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


# ---------------------------------------------------------------- the job (from the orchestrator)


def job_started(job_id: str, stage: str) -> list[Record]:
    return [Event(JOB_STARTED, dimensions(job_id, stage=stage), {})]


def stage_completed(job_id: str, stage: str, next_stage: str, seconds: float) -> list[Record]:
    outcome = "failed" if next_stage == "failed" else "succeeded"
    return [Event(STAGE_COMPLETED, dimensions(job_id, stage=stage, outcome=outcome, next=next_stage),
                  measurements({"duration_seconds": seconds}))]


def job_completed(job_id: str, summary: Mapping[str, Any], stage_seconds: Mapping[str, float]) -> list[Record]:
    figures: dict[str, Any] = {key: summary.get(key) for key in JOB_FIGURES}
    seconds = summary.get("seconds") or 0
    figures["fps"] = summary["frames"] / seconds if seconds and summary.get("frames") else None
    figures.update({f"{stage}_seconds": value for stage, value in stage_seconds.items()})
    dims = dimensions(job_id, stage="completed", outcome="succeeded")
    text = f"job {job_id}: completed, {summary.get('frames')} frames in {summary.get('seconds')} s"
    return [Event(JOB_COMPLETED, dims, measurements(figures)), _trace(logging.INFO, text, dims, figures)]


def job_failed(job_id: str, error: Mapping[str, Any], stage: str, stage_seconds: Mapping[str, float]) -> list[Record]:
    """What the failed-jobs alert counts: kind ``input`` (bad input the uploader can fix) or ``internal``."""
    dims = dimensions(job_id, stage=stage, outcome="failed", kind=error.get("kind", "internal"),
                      reason=error.get("message", ""))
    figures = {f"{name}_seconds": value for name, value in stage_seconds.items()}
    return [Event(JOB_FAILED, dims, measurements(figures)),
            Trace(logging.ERROR, f"job {job_id}: failed ({dims['kind']}): {dims['reason']}", dims)]


def job_canceled(job_id: str) -> list[Record]:
    dims = dimensions(job_id, stage="canceled", outcome="canceled")
    return [Event(JOB_CANCELED, dims, {}), Trace(logging.WARNING, f"job {job_id}: canceled by request", dims)]


# ---------------------------------------------------------------- compute tasks and activities


def task_finished(job_id: str, task_id: str, state: str, summary: Mapping[str, Any] | None = None,
                  exit_code: int | None = None, error: str | None = None,
                  queued_seconds: float | None = None) -> list[Record]:
    """``SegmentCompleted``/``StitchCompleted`` with the worker's figures and the backend's queue wait, or
    ``TaskFailed`` with its reason."""
    if state == "succeeded":
        return _task_succeeded(job_id, task_id, {**(summary or {}), "queued_seconds": queued_seconds})
    if state == "failed":
        return _task_failed(job_id, task_id, exit_code, error)
    return []


def _task_succeeded(job_id: str, task_id: str, summary: Mapping[str, Any]) -> list[Record]:
    segment, attempt, stitch = parse_task_id(task_id)
    node = str(summary.get("node") or "")
    if stitch:
        dims = dimensions(job_id, "", task_id, attempt, node, "stitching", audio=summary.get("audio", ""))
        figures = {"frames": summary.get("frames"), "segments": summary.get("segments"),
                   "video_seconds": summary.get("duration_seconds"), "seconds": summary.get("seconds"),
                   "queued_seconds": summary.get("queued_seconds")}
        return [Event(STITCH_COMPLETED, dims, measurements(figures))]
    device = str(summary.get("device") or "")
    gpu = _GPU_NAME.search(device)
    figures = {key: summary.get(key) for key in SEGMENT_FIGURES}
    latency = summary.get("latency_ms") or {}
    figures.update({f"latency_{q}_ms": latency.get(q) for q in ("p50", "p95", "max")})
    dims = dimensions(job_id, segment, task_id, attempt, node, "scoring", device=device,
                      device_type=device.split(" ")[0], gpu=gpu["name"] if gpu else "",
                      scorer=summary.get("scorer", ""))
    return [Event(SEGMENT_COMPLETED, dims, measurements(figures))]


def _task_failed(job_id: str, task_id: str, exit_code: int | None, error: str | None) -> list[Record]:
    segment, attempt, stitch = parse_task_id(task_id)
    lines = (error or "").strip().splitlines()
    reason = lines[-1].removeprefix("error: ").strip() if lines else f"exit status {exit_code}"
    # 2: bad input the uploader can fix; 3: a node that could not run it (an operator's matter, e.g. a GPU driver)
    kind = {2: "input", 3: "node"}.get(exit_code) or ("canceled" if reason == "canceled" else "task")
    dims = dimensions(job_id, segment, task_id, attempt, "", "stitching" if stitch else "scoring",
                      reason=reason, kind=kind, exit_code="" if exit_code is None else exit_code)
    return [Event(TASK_FAILED, dims, measurements({"exit_code": exit_code})),
            Trace(logging.WARNING, f"job {job_id}: task {task_id} failed: {reason}", dims)]


def activity_completed(job_id: str, name: str, stage: str, figures: Mapping[str, Any]) -> list[Record]:
    return [Event(ACTIVITY_COMPLETED, dimensions(job_id, stage=stage, activity=name), measurements(figures))]


def activity_failed(job_id: str, name: str, stage: str, seconds: float, exc: BaseException) -> list[Record]:
    """An exception record with the stack; bad input (``InputError``) at warning level, the rest as errors."""
    bad_input = type(exc).__name__ == "InputError"
    dims = dimensions(job_id, stage=stage, activity=name, kind="input" if bad_input else "internal")
    text = f"job {job_id}: activity {name} failed after {seconds:.1f} s: {exc}"
    return [_trace(logging.WARNING if bad_input else logging.ERROR, text, dims, {"duration_seconds": seconds},
                   exc)]


def parse_task_id(task_id: str) -> tuple[int | str, int | str, bool]:
    """``seg00003-a1`` → (3, 1, False); ``stitch-a0`` → ("", 0, True); anything else → ("", "", False)."""
    match = _TASK_ID.match(task_id)
    if not match:
        return "", "", False
    segment = int(match["segment"]) if match["segment"] is not None else ""
    return segment, int(match["attempt"]), match["stitch"] is not None


def _trace(level: int, message: str, dims: dict[str, str], figures: Mapping[str, Any],
           exception: BaseException | None = None) -> Trace:
    # Traces have no measurements field: their figures go along as (text) dimensions.
    properties = {**dims, **{key: str(value) for key, value in measurements(figures).items()}}
    return Trace(level, message, properties, exception)
