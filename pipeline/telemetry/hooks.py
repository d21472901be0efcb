"""The hooks the pipeline calls: activities, the compute poll, and the orchestrator's stage changes.

Each hook returns at once when telemetry is off, builds its records with ``events``, hands them over with
``lifecycle.emit`` and swallows (and counts) its own errors: telemetry never fails a job.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pipeline.telemetry import events, lifecycle, stages

DEDUPE_MEMORY = 100_000  # (job, task) pairs remembered so that a finished task is reported once per process

_seen: OrderedDict[tuple[str, str], None] = OrderedDict()
_seen_lock = threading.Lock()


# ---------------------------------------------------------------- compute tasks (pipeline.jobs.poll)


def tasks_polled(job_id: str, states: Mapping[str, Any]) -> None:
    """Report each finished task once: ``SegmentCompleted``/``StitchCompleted`` with the worker's figures,
    or ``TaskFailed`` with its reason. The poll runs every tick; tasks already reported are skipped."""
    if lifecycle.active() is None:
        return
    with _guard():
        for task_id, state in states.items():
            if state.state in ("succeeded", "failed") and _first_time(job_id, task_id):
                lifecycle.emit(events.task_finished(job_id, task_id, state.state, state.summary,
                                                    state.exit_code, state.error, state.queued_seconds))


def _first_time(job_id: str, task_id: str) -> bool:
    key = (job_id, task_id)
    with _seen_lock:
        if key in _seen:
            _seen.move_to_end(key)
            return False
        _seen[key] = None
        if len(_seen) > DEDUPE_MEMORY:
            _seen.popitem(last=False)
        return True


# ---------------------------------------------------------------- activities


@contextlib.contextmanager
def activity(job_id: str, name: str, stage: str, *, bytes_read: Callable[[], int] | None = None,
             bytes_written: Callable[[], int] | None = None, quiet: bool = False) -> Iterator[None]:
    """Time an activity: ``ActivityCompleted`` with its duration (and bytes, from the callables, asked only
    when telemetry is on and the activity succeeded), or an exception record if it raised (re-raised).
    ``quiet``: record only failures (an activity that runs every tick)."""
    if lifecycle.active() is None:
        yield
        return
    began = time.perf_counter()
    try:
        yield
    except Exception as exc:
        with _guard():
            lifecycle.emit(events.activity_failed(job_id, name, stage, time.perf_counter() - began, exc))
        raise
    if quiet:
        return
    with _guard():
        figures: dict[str, Any] = {"duration_seconds": time.perf_counter() - began}
        for key, read in (("bytes_read", bytes_read), ("bytes_written", bytes_written)):
            if read is not None:
                with contextlib.suppress(Exception):
                    figures[key] = read()
        lifecycle.emit(events.activity_completed(job_id, name, stage, figures))


# ---------------------------------------------------------------- the orchestrator


def job_stage(context: Any, stage: str, clock: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The job's stage clock after the orchestration reported ``stage``: store it in the orchestration's
    state and pass it back next time (see ``stages``). Emits ``JobStarted`` for the first stage and
    ``StageCompleted`` for a stage that ended, only when not replaying.

    Never changes ``clock`` (nor anything else of the orchestrator's) and never raises.
    """
    try:
        step = stages.advance(clock, stage, context.current_utc_datetime)
    except Exception:
        lifecycle.count("errors")
        return dict(clock) if stages.is_clock(clock) else {}
    if not context.is_replaying and lifecycle.active() is not None:
        with _guard():
            if step.started:
                lifecycle.emit(events.job_started(context.instance_id, stage))
            elif step.ended is not None:
                lifecycle.emit(events.stage_completed(context.instance_id, step.ended, stage, step.seconds))
    return step.clock


def job_completed(context: Any, summary: Mapping[str, Any], clock: Mapping[str, Any] | None = None) -> None:
    """``JobCompleted`` with the job's totals and the seconds spent in each stage (from ``clock``), and
    one trace line."""
    with _guard():
        if context.is_replaying or lifecycle.active() is None:
            return
        lifecycle.emit(events.job_completed(context.instance_id, summary, stages.seconds_by_stage(clock)))
        lifecycle.flush_soon()


def job_failed(context: Any, error: Mapping[str, Any], clock: Mapping[str, Any] | None = None) -> None:
    """``JobFailed`` (kind ``input`` or ``internal``, the reason, the stage it failed in, from ``clock``)
    and an error trace: what the failed-jobs alert counts."""
    with _guard():
        if context.is_replaying or lifecycle.active() is None:
            return
        lifecycle.emit(events.job_failed(context.instance_id, error, stages.last_stage(clock),
                                         stages.seconds_by_stage(clock)))
        lifecycle.flush_soon()


def job_canceled(job_id: str) -> None:
    """``JobCanceled``: a cancel request ended the job (the orchestration runs no more steps to say so)."""
    if lifecycle.active() is None:
        return
    with _guard():
        lifecycle.emit(events.job_canceled(job_id))
        lifecycle.flush_soon()


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    try:
        yield
    except Exception:
        lifecycle.count("errors")
