"""Telemetry to Application Insights: where each job's time went, per stage and per segment, and its failures.

This is the only module that touches OpenCensus (``opencensus-ext-azure``). OpenCensus is retired upstream;
moving to the Azure Monitor OpenTelemetry distro means rewriting :func:`_build` and :class:`_Exporter` here
and nothing else, because the rest of the code calls only the plain hooks below.

**Off unless configured.** With no ``APPLICATIONINSIGHTS_CONNECTION_STRING`` every hook returns at once:
nothing from OpenCensus is imported and no thread is started. With one, two OpenCensus handlers run, each
with its own bounded queue and background export thread, so a hook only builds a small record and puts it
on a queue (never blocks on the network):

- ``AzureEventHandler`` → **custom events** (``customEvents``): one row per fact with its figures as
  ``customMeasurements``. Chosen over the metrics exporter for the per-segment figures because those are
  facts about one task (one row per segment, joinable by job and segment), not pre-aggregated series:
  OpenCensus metrics would need a view per figure, re-export every series each interval, cannot carry a
  distribution (histograms are not exported) and would turn per-task dimensions into unbounded series.
  Averages, percentiles and charts come from KQL over the events (see ``infra/monitoring/``).
- ``AzureLogHandler`` → **traces** (one readable line per job event and task failure) and **exceptions**
  (activity failures, with their stack).

Every record carries the dimensions in :data:`DIMENSIONS` (empty where they do not apply) and the job id
as its operation id, so Application Insights groups a job's records as one operation.

Keyless in Azure: ``APPLICATIONINSIGHTS_AUTHENTICATION_STRING=ClientId=<id>;Authorization=AAD`` makes the
exporters sign in with that user-assigned managed identity (``Authorization=AAD`` alone: the system-assigned
one). Locally and in tests there is no credential.

Telemetry never fails or slows a job: every hook swallows its own errors (counted in :func:`stats`), a full
queue drops the record (counted), send failures are dropped, not retried from disk (counted), and
:func:`flush`/:func:`shutdown` wait at most their timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

CONNECTION_ENV = "APPLICATIONINSIGHTS_CONNECTION_STRING"
AUTHENTICATION_ENV = "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"
DIMENSIONS = ("job_id", "segment", "task_id", "attempt", "node", "stage")
OPERATION_NAME = "stylize_video"

# Export settings: bounded queues, batches sent from the handlers' own threads, short network timeouts.
QUEUE_CAPACITY = 8192
BATCH_SIZE = 256
EXPORT_INTERVAL_SECONDS = 5.0
SEND_TIMEOUT_SECONDS = 5.0
FLUSH_TIMEOUT_SECONDS = 5.0
DEDUPE_MEMORY = 100_000  # (job, task) pairs remembered so that a finished task is reported once per process

_TASK_ID = re.compile(r"^(?:seg(?P<segment>\d+)|(?P<stitch>stitch))-a(?P<attempt>\d+)$")
_GPU_NAME = re.compile(r"\((?P<name>[^)]+)\)")
_SEGMENT_FIGURES = ("frames", "seconds", "fps", "decode_seconds", "score_seconds", "encode_seconds",
                    "peak_rss_mb", "peak_device_memory_mb", "batch_size", "first_pts_seconds", "last_pts_seconds")

log = logging.getLogger("stylize.telemetry")  # this module's own diagnostics (not exported)
_lock = threading.RLock()
_exporter: _Exporter | None = None
_configured = False
_final = False  # set at interpreter exit: no more exporters after that
_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()
_seen: OrderedDict[tuple[str, str], None] = OrderedDict()
_seen_lock = threading.Lock()
_host = socket.gethostname()


# ---------------------------------------------------------------- lifecycle


def configure(connection_string: str | None = None, authentication: str | None = None) -> bool:
    """Start exporting to ``connection_string`` (default: the environment); True if telemetry is on.

    Replaces (flushes and stops) a previous configuration. A missing or empty connection string turns
    telemetry off. Bad settings turn it off too, with one warning, never an exception.
    """
    global _exporter, _configured
    if connection_string is None:
        connection_string = os.environ.get(CONNECTION_ENV, "")
    if authentication is None:
        authentication = os.environ.get(AUTHENTICATION_ENV, "")
    with _lock:
        _close(FLUSH_TIMEOUT_SECONDS)
        _configured = True
        if not connection_string.strip() or _final:
            return False
        try:
            _exporter = _build(_normalize(connection_string), authentication)
        except Exception as exc:  # a bad connection string or credential setting: run without telemetry
            _count("errors")
            log.warning("telemetry is off: %s: %s", type(exc).__name__, exc)
            _exporter = None
        return _exporter is not None


def enabled() -> bool:
    return _current() is not None


def flush(timeout: float = FLUSH_TIMEOUT_SECONDS) -> bool:
    """Wait (at most ``timeout`` seconds) until what was recorded so far has been sent or dropped."""
    exporter = _exporter
    if exporter is None:
        return True
    try:
        return exporter.flush(timeout)
    except Exception:
        _count("errors")
        return False


def shutdown(timeout: float = FLUSH_TIMEOUT_SECONDS) -> None:
    """Flush (bounded) and stop the export threads; a later hook configures again from the environment."""
    global _configured
    with _lock:
        _close(timeout)
        _configured = False


def stats() -> dict[str, int]:
    """Counters: records ``emitted``, envelopes ``sent``, ``export_failures`` (envelopes not accepted),
    ``dropped`` (queue full) and ``errors`` (inside the hooks themselves)."""
    with _counts_lock:
        return {key: _counts.get(key, 0) for key in ("emitted", "sent", "export_failures", "dropped", "errors")}


def dimensions(job_id: str = "", segment: int | str = "", task_id: str = "", attempt: int | str = "",
               node: str | None = None, stage: str = "", **extra: object) -> dict[str, str]:
    """The dimensions every record carries (strings; empty where they do not apply), plus ``extra``.

    ``node`` is where the work ran: the worker's host for a task, this host (the default) otherwise.
    """
    dims = {"job_id": job_id, "segment": segment, "task_id": task_id, "attempt": attempt,
            "node": _host if node is None else node,
            "stage": stage, **extra}
    return {key: "" if value is None else str(value) for key, value in dims.items()}


# ---------------------------------------------------------------- hooks: compute tasks (pipeline.jobs.poll)


def tasks_polled(job_id: str, states: Mapping[str, Any]) -> None:
    """Report each finished task once: ``SegmentCompleted``/``StitchCompleted`` with the worker's figures,
    or ``TaskFailed`` with its reason. The poll runs every tick; tasks already reported are skipped."""
    if _current() is None:
        return
    try:
        for task_id, state in states.items():
            if state.state not in ("succeeded", "failed") or not _first_time(job_id, task_id):
                continue
            if state.state == "succeeded":
                _task_succeeded(job_id, task_id, state.summary or {})
            else:
                _task_failed(job_id, task_id, state.exit_code, state.error)
    except Exception:
        _count("errors")


def _task_succeeded(job_id: str, task_id: str, summary: Mapping[str, Any]) -> None:
    segment, attempt, stitch = _parse_task_id(task_id)
    node = str(summary.get("node") or "")
    if stitch:
        _event("StitchCompleted", dimensions(job_id, "", task_id, attempt, node, "stitching",
                                             audio=summary.get("audio", "")),
               {"frames": summary.get("frames"), "segments": summary.get("segments"),
                "video_seconds": summary.get("duration_seconds")})
        return
    device = str(summary.get("device") or "")
    gpu = _GPU_NAME.search(device)
    figures = {key: summary.get(key) for key in _SEGMENT_FIGURES}
    latency = summary.get("latency_ms") or {}
    figures.update({f"latency_{q}_ms": latency.get(q) for q in ("p50", "p95", "max")})
    _event("SegmentCompleted", dimensions(job_id, segment, task_id, attempt, node, "scoring", device=device,
                                          device_type=device.split(" ")[0], gpu=gpu["name"] if gpu else "",
                                          scorer=summary.get("scorer", "")), figures)


def _task_failed(job_id: str, task_id: str, exit_code: int | None, error: str | None) -> None:
    segment, attempt, stitch = _parse_task_id(task_id)
    lines = (error or "").strip().splitlines()
    reason = lines[-1].removeprefix("error: ").strip() if lines else f"exit status {exit_code}"
    kind = "input" if exit_code == 2 else "canceled" if reason == "canceled" else "task"
    dims = dimensions(job_id, segment, task_id, attempt, "", "stitching" if stitch else "scoring",
                      reason=reason, kind=kind, exit_code="" if exit_code is None else exit_code)
    _event("TaskFailed", dims, {"exit_code": exit_code})
    _trace(logging.WARNING, f"job {job_id}: task {task_id} failed: {reason}", dims)


# ---------------------------------------------------------------- hooks: activities


@contextlib.contextmanager
def activity(job_id: str, name: str, stage: str, *, bytes_read: Callable[[], int] | None = None,
             bytes_written: Callable[[], int] | None = None, quiet: bool = False) -> Iterator[None]:
    """Time an activity: ``ActivityCompleted`` with its duration (and bytes, from the callables, asked only
    when telemetry is on and the activity succeeded), or an exception record if it raised (re-raised)."""
    if _current() is None:
        yield
        return
    began = time.perf_counter()
    try:
        yield
    except Exception as exc:
        with _guard():
            seconds = time.perf_counter() - began
            level = logging.WARNING if type(exc).__name__ == "InputError" else logging.ERROR
            dims = dimensions(job_id, stage=stage, activity=name, kind="input" if level == logging.WARNING
                              else "internal")
            _trace(level, f"job {job_id}: activity {name} failed after {seconds:.1f} s: {exc}", dims,
                   exc_info=exc, measurements={"duration_seconds": seconds})
        raise
    with _guard():
        figures: dict[str, Any] = {"duration_seconds": time.perf_counter() - began}
        for key, read in (("bytes_read", bytes_read), ("bytes_written", bytes_written)):
            if read is not None and not quiet:
                with contextlib.suppress(Exception):
                    figures[key] = read()
        if not quiet:
            _event("ActivityCompleted", dimensions(job_id, stage=stage, activity=name), figures)


# ---------------------------------------------------------------- hooks: the orchestrator


def job_stage(context: Any, stage: str, state: dict) -> None:
    """Note a stage change of the orchestration; emit ``StageCompleted`` for the stage that ended.

    Replay-safe: the stage marks live in the orchestration's own ``state`` (they survive continue-as-new)
    and are computed from context time on every replay alike; records go out only when not replaying.
    """
    try:
        marks = state.setdefault("telemetry", {})
        previous, since = marks.get("stage"), marks.get("since")
        if previous == stage:
            return
        now = context.current_utc_datetime
        marks.update(stage=stage, since=now.isoformat())
        if previous is None:
            if not context.is_replaying and _current() is not None:
                _event("JobStarted", dimensions(context.instance_id, stage=stage), {})
            return
        seconds = (now - dt.datetime.fromisoformat(since)).total_seconds()
        durations = marks.setdefault("seconds", {})
        durations[previous] = round(durations.get(previous, 0.0) + seconds, 3)
        if stage in ("completed", "failed"):
            marks["ended_in"] = previous
        if context.is_replaying or _current() is None:
            return
        outcome = "failed" if stage == "failed" else "succeeded"
        _event("StageCompleted", dimensions(context.instance_id, stage=previous, outcome=outcome, next=stage),
               {"duration_seconds": seconds})
    except Exception:
        _count("errors")


def job_completed(context: Any, summary: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """``JobCompleted`` with the job's totals and the seconds spent in each stage, and one trace line."""
    with _guard():
        if context.is_replaying or _current() is None:
            return
        marks = state.get("telemetry") or {}
        figures = {key: summary.get(key) for key in ("frames", "segments", "seconds", "retries")}
        seconds = summary.get("seconds") or 0
        figures["fps"] = summary["frames"] / seconds if seconds and summary.get("frames") else None
        figures.update({f"{stage}_seconds": value for stage, value in (marks.get("seconds") or {}).items()})
        dims = dimensions(context.instance_id, stage="completed", outcome="succeeded")
        _event("JobCompleted", dims, figures)
        _trace(logging.INFO, f"job {context.instance_id}: completed, {summary.get('frames')} frames in "
                             f"{summary.get('seconds')} s", dims, measurements=figures)


def job_failed(context: Any, error: Mapping[str, Any], state: Mapping[str, Any] | None = None) -> None:
    """``JobFailed`` (kind ``input`` or ``internal``, the reason, the stage it failed in) and an error trace:
    what the failed-jobs alert counts."""
    with _guard():
        if context.is_replaying or _current() is None:
            return
        marks = (state or {}).get("telemetry") or {}
        dims = dimensions(context.instance_id, stage=marks.get("ended_in") or marks.get("stage") or "queued",
                          outcome="failed", kind=error.get("kind", "internal"), reason=error.get("message", ""))
        figures = {f"{stage}_seconds": value for stage, value in (marks.get("seconds") or {}).items()}
        _event("JobFailed", dims, figures)
        _trace(logging.ERROR, f"job {context.instance_id}: failed ({dims['kind']}): {dims['reason']}", dims)


def job_canceled(job_id: str) -> None:
    """``JobCanceled``: a cancel request ended the job (the orchestration runs no more steps to say so)."""
    if _current() is None:
        return
    with _guard():
        dims = dimensions(job_id, stage="canceled", outcome="canceled")
        _event("JobCanceled", dims, {})
        _trace(logging.WARNING, f"job {job_id}: canceled by request", dims)


# ---------------------------------------------------------------- internals (plain Python)


def _current() -> _Exporter | None:
    if not _configured:
        with _lock:
            if not _configured:
                configure()
    return _exporter


def _count(key: str, n: int = 1) -> None:
    with _counts_lock:
        _counts[key] += n


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    try:
        yield
    except Exception:
        _count("errors")


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


def _parse_task_id(task_id: str) -> tuple[int | str, int | str, bool]:
    match = _TASK_ID.match(task_id)
    if not match:
        return "", "", False
    segment = int(match["segment"]) if match["segment"] is not None else ""
    return segment, int(match["attempt"]), match["stitch"] is not None


def _measurements(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[key] = round(float(value), 3)
    return out


def _event(name: str, dims: dict[str, str], measurements: Mapping[str, Any]) -> None:
    exporter = _exporter
    if exporter is None:
        return
    exporter.event(name, dims, _measurements(measurements))
    _count("emitted")


def _trace(level: int, message: str, dims: dict[str, str], *, exc_info: BaseException | None = None,
           measurements: Mapping[str, Any] | None = None) -> None:
    exporter = _exporter
    if exporter is None:
        return
    exporter.trace(level, message, dims, exc_info, _measurements(measurements or {}))
    _count("emitted")


def _normalize(connection_string: str) -> str:
    """Drop empty parts (a trailing ';'), which the OpenCensus parser rejects."""
    return ";".join(part.strip() for part in connection_string.split(";") if part.strip())


def _credential(authentication: str) -> Any:
    """``ClientId=<id>;Authorization=AAD`` → a managed identity credential; empty → None (no credential)."""
    if not authentication.strip():
        return None
    fields = {}
    for part in authentication.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    if fields.get("authorization", "").lower() != "aad":
        raise ValueError(f"{AUTHENTICATION_ENV} must say Authorization=AAD")
    from azure.identity import ManagedIdentityCredential

    client_id = fields.get("clientid")
    return ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()


def _close(timeout: float) -> None:
    global _exporter
    exporter, _exporter = _exporter, None
    if exporter is None:
        return
    try:
        exporter.close(timeout)
    except Exception:
        _count("errors")
    failures = stats()["export_failures"] - exporter.failures_before
    if failures > 0:
        log.warning("telemetry: %d records could not be sent to Application Insights", failures)


@atexit.register
def _at_exit() -> None:
    global _final
    _final = True
    shutdown()


# ---------------------------------------------------------------- the OpenCensus part


def _build(connection_string: str, authentication: str) -> _Exporter:
    # Statsbeat (the SDK's own usage heartbeat to a Microsoft endpoint) would add a thread and a second
    # destination; it is off unless the environment asks for it.
    os.environ.setdefault("APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL", "true")
    with warnings.catch_warnings():  # its import-time use of locale.getdefaultlocale() is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        from opencensus.common.schedule import QueueEvent
        from opencensus.ext.azure.common.transport import TransportStatusCode
        from opencensus.ext.azure.log_exporter import AzureEventHandler, AzureLogHandler

    # OpenCensus logs each failed send as a warning on the root logger; they are counted here instead.
    logging.getLogger("opencensus").setLevel(logging.ERROR)

    class _Counting:
        """Counts what the queue drops and what ingestion does not accept; tags each job's operation."""

        def emit(self, record: logging.LogRecord) -> None:
            inner = getattr(self._queue, "_queue", None)
            if inner is not None and inner.full():
                _count("dropped")
                return
            super().emit(record)

        def _transmit(self, envelopes: list) -> Any:
            depth = getattr(self, "_depth", 0)
            self._depth = depth + 1
            try:
                result = super()._transmit(envelopes)
            except Exception:
                result = TransportStatusCode.DROP
            finally:
                self._depth = depth
            if depth == 0:
                _count("sent" if result == TransportStatusCode.SUCCESS else "export_failures", len(envelopes))
            return result

        def handleError(self, record: logging.LogRecord) -> None:  # never print tracebacks to stderr
            _count("errors")

    class _Events(_Counting, AzureEventHandler):
        pass

    class _Traces(_Counting, AzureLogHandler):
        pass

    options = dict(connection_string=connection_string, credential=_credential(authentication),
                   enable_local_storage=False, export_interval=EXPORT_INTERVAL_SECONDS, max_batch_size=BATCH_SIZE,
                   queue_capacity=QUEUE_CAPACITY, timeout=SEND_TIMEOUT_SECONDS, grace_period=FLUSH_TIMEOUT_SECONDS)
    role = os.environ.get("WEBSITE_SITE_NAME") or "stylize"
    handlers = []
    try:
        for cls in (_Events, _Traces):
            handler = cls(**options)
            handlers.append(handler)
            handler.add_telemetry_processor(_tagger(role))
    except Exception:
        for handler in handlers:
            handler.close(0.1)
        raise
    return _Exporter(handlers[0], handlers[1], QueueEvent)


def _tagger(role: str) -> Callable[[Any], bool]:
    def tag(envelope: Any) -> bool:
        properties = getattr(envelope.data.baseData, "properties", None) or {}
        job_id = properties.get("job_id")
        if job_id:
            envelope.tags["ai.operation.id"] = job_id
            envelope.tags["ai.operation.parentId"] = job_id
            envelope.tags["ai.operation.name"] = OPERATION_NAME
        envelope.tags["ai.cloud.role"] = role
        return True

    return tag


class _Exporter:
    """The two OpenCensus handlers, each on a private logger that does not propagate: these records go to
    Application Insights only (the Functions host already forwards the app's ordinary logs)."""

    def __init__(self, events: logging.Handler, traces: logging.Handler, queue_event: type) -> None:
        self._queue_event = queue_event
        self.failures_before = stats()["export_failures"]
        self._handlers = (events, traces)
        self._events = self._logger("stylize.telemetry.events", events)
        self._traces = self._logger("stylize.telemetry.traces", traces)

    @staticmethod
    def _logger(name: str, handler: logging.Handler) -> logging.Logger:
        logger = logging.getLogger(name)
        logger.propagate = False
        logger.setLevel(logging.INFO)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        return logger

    def event(self, name: str, dims: dict[str, str], measurements: dict[str, float]) -> None:
        self._events.info(name, extra={"custom_dimensions": dims, "custom_measurements": measurements})

    def trace(self, level: int, message: str, dims: dict[str, str], exc_info: BaseException | None,
              measurements: dict[str, float]) -> None:
        if measurements:
            dims = {**dims, **{key: str(value) for key, value in measurements.items()}}
        self._traces.log(level, "%s", message, exc_info=exc_info, extra={"custom_dimensions": dims})

    def flush(self, timeout: float) -> bool:
        """Put a marker behind what is queued on each handler and wait until its thread has passed it."""
        deadline = time.monotonic() + timeout
        markers = []
        for handler in self._handlers:
            marker = self._queue_event("FLUSH")
            handler._queue.put(marker, block=False)
            markers.append(marker)
        return all(m.wait(max(0.0, deadline - time.monotonic())) for m in markers)

    def close(self, timeout: float) -> None:
        """Flush and stop the threads, within ``timeout`` in all (a thread stuck in a send is left to its
        network timeout: it is a daemon and holds nothing)."""
        deadline = time.monotonic() + timeout
        self.flush(timeout * 0.8)
        for logger in (self._events, self._traces):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
        for handler in self._handlers:
            handler.close(max(0.05, (deadline - time.monotonic()) / 2))  # 0 would mean its 5 s default
