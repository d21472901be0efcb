"""Sends telemetry records to Application Insights with ``opencensus-ext-azure``: the only module that imports it.

Only the SDK's public API is used, so that an upgrade cannot silently break what we send or what we count
(``tests/test_telemetry.py`` fails on any name with a leading underscore on an OpenCensus object, and on any
private OpenCensus module):

- ``AzureEventHandler`` (custom events) and ``AzureLogHandler`` (traces, exceptions): plain
  ``logging.Handler`` objects, built with their documented options and fed through a logger, exactly as
  the SDK's README shows. Each has a bounded queue and one export thread that sends in batches.
- ``add_telemetry_processor``: sees each envelope just before it is sent; sets the operation and role tags,
  and drops our own flush markers (a processor returning False keeps an envelope from being sent).
- ``setFormatter`` (stdlib): the handler formats each record when its export thread starts converting a
  batch, which tells us how far that thread has got, and when a batch's send has returned.
- ``flush(timeout)`` and ``close(timeout)``: the handlers' own bounded flush and stop.
- the SDK's diagnostics on the ``opencensus.ext.azure`` logger: it logs a warning or an error for a send it
  gave up on, from the export thread, which is how failures are counted.

Moving to the Azure Monitor OpenTelemetry distro means rewriting this module, keeping :func:`build` and
the :class:`Exporter` methods; nothing else changes (see docs/telemetry.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from pipeline.telemetry.events import OPERATION_NAME, Event, Record, Trace

with warnings.catch_warnings():  # its import-time use of locale.getdefaultlocale() is deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    from opencensus.ext.azure.log_exporter import AzureEventHandler, AzureLogHandler

# Bounded work per handler: records waiting to be sent (more are refused and counted as dropped), batch
# size, how often the export thread sends, and the network timeout of one send.
BACKLOG = 8192
BATCH_SIZE = 256
EXPORT_INTERVAL_SECONDS = 5.0
SEND_TIMEOUT_SECONDS = 5.0
MARKER_ROOM = 1024  # queue room for flush markers beyond BACKLOG, so a marker is never refused
SDK_LOGGER = "opencensus.ext.azure"

_SEQ = "stylize_seq"  # a LogRecord attribute (ours): the record's hand-over number on its channel
_MARKER = "stylize_flush_marker"  # a dimension (ours) that marks a flush marker's envelope

log = logging.getLogger("stylize.telemetry")
Count = Callable[[str, int], None]


def build(connection_string: str, credential: Any, count: Count) -> Exporter:
    """An exporter for ``connection_string``; raises ValueError on a bad one (the SDK validates it)."""
    # Statsbeat (the SDK's own usage heartbeat to a Microsoft endpoint) would add a thread and a second
    # destination; it is off unless the environment asks for it (the SDK's documented switch).
    os.environ.setdefault("APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL", "true")
    options = dict(connection_string=connection_string, credential=credential, enable_local_storage=False,
                   export_interval=EXPORT_INTERVAL_SECONDS, max_batch_size=BATCH_SIZE,
                   queue_capacity=BACKLOG + MARKER_ROOM, timeout=SEND_TIMEOUT_SECONDS,
                   grace_period=SEND_TIMEOUT_SECONDS)
    role = os.environ.get("WEBSITE_SITE_NAME") or "stylize"
    channels: list[_Channel] = []
    try:
        for name, cls in (("events", AzureEventHandler), ("traces", AzureLogHandler)):
            channels.append(_Channel(name, cls(**options), role, count))
    except Exception:
        for channel in channels:
            channel.close(0.1)
        raise
    return Exporter(channels[0], channels[1])


class Exporter:
    """Two channels (events, traces); :meth:`send` only puts a record on a bounded queue."""

    def __init__(self, events: _Channel, traces: _Channel) -> None:
        self._events, self._traces = events, traces
        _SdkLog.install().attach(events, traces)

    def send(self, record: Record) -> bool:
        """Hand ``record`` to its handler; False when its backlog is full (the record is dropped)."""
        if isinstance(record, Event):
            extra = {"custom_dimensions": record.properties, "custom_measurements": record.measurements}
            return self._events.put(logging.INFO, record.name, extra)
        if isinstance(record, Trace):
            return self._traces.put(record.level, record.message, {"custom_dimensions": record.properties},
                                    record.exception)
        raise TypeError(f"not a telemetry record: {record!r}")

    def flush(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until what was handed over so far has been sent or given up on."""
        deadline = time.monotonic() + timeout
        return all([channel.settle(deadline) for channel in (self._events, self._traces)])

    def close(self, timeout: float) -> None:
        """Flush, then stop the export threads, within ``timeout`` in all (a thread stuck in a send is left
        to its network timeout: it is a daemon and holds nothing). Says how many records were not sent."""
        deadline = time.monotonic() + timeout
        self.flush(timeout * 0.8)
        for channel in (self._events, self._traces):
            channel.close(max(0.05, (deadline - time.monotonic()) / 2))  # 0 would mean the SDK's 5 s default
        _SdkLog.install().detach(self._events, self._traces)
        handed = self._events.handed + self._traces.handed
        lost = handed - self._events.sent - self._traces.sent
        if lost > 0:
            log.warning("telemetry: %d of %d records were not confirmed sent to Application Insights", lost, handed)


class _Channel:
    """One SDK handler and its export thread, and how far that thread has got, as seen through public hooks.

    Records get a hand-over number. The formatter sees each record when the export thread converts it
    (``taken``); the processor sees each envelope just before the batch is sent (``pending``). The thread
    converts a whole batch, runs the processors, sends, then converts the next batch: so a conversion after
    processing means the previous batch's send has returned, and unless the SDK logged a failure from this
    thread meanwhile, it was sent.
    """

    def __init__(self, name: str, handler: AzureEventHandler | AzureLogHandler, role: str, count: Count) -> None:
        self.handler = handler
        self.handed = 0  # records handed over (markers not counted)
        self.sent = 0  # envelopes whose send returned without a failure
        self.thread: int | None = None  # the export thread, once it has converted something
        self._role = role
        self._count = count
        self._lock = threading.RLock()
        self._last = 0  # hand-over number of the last record or marker
        self._taken = 0  # highest hand-over number the export thread has converted
        self._pending = 0  # envelopes of the batch being sent
        self._processed = False  # the processors ran since the last conversion
        # A logger of our own, outside the logging tree (not from getLogger): only this handler sees its records.
        self._logger = logging.Logger(f"stylize.telemetry.{name}", logging.INFO)
        self._logger.propagate = False
        self._logger.addHandler(handler)
        handler.setFormatter(_Watching(self.converting))
        handler.add_telemetry_processor(self.process)

    def put(self, level: int, text: str, extra: dict[str, Any], exc: BaseException | None = None,
            marker: bool = False) -> bool:
        with self._lock:  # numbers follow queue order: a marker is behind everything numbered before it
            if not marker and self._last - self._taken >= BACKLOG:
                return False
            self._last += 1
            self.handed += 0 if marker else 1
            self._logger.log(level, "%s", text, exc_info=exc, extra={**extra, _SEQ: self._last})
            return True

    def settle(self, deadline: float) -> bool:
        """True once every record handed over before this call has been sent or given up on.

        Two markers: once the first is converted, every record before it is in that batch or an earlier
        one; the second is handed over only then, so it is in a later batch, and once it is converted the
        first one's batch has been sent.
        """
        return self._reach(deadline) and self._reach(deadline)

    def _reach(self, deadline: float) -> bool:
        target = 0
        for _ in range(BATCH_SIZE):  # a batch the thread fills with markers is sent anyway
            if time.monotonic() >= deadline:
                return False
            # A marker now (again, if the thread took the last one into a batch it is still filling), so
            # that the handler's flush finds something queued: it then queues its own sync event behind
            # it and waits for the thread to pass it, which makes the thread send what it holds now.
            with self._lock:
                self._put_marker()
                target = target or self._last
            self.handler.flush(max(0.001, deadline - time.monotonic()))
            if self._reached(target):
                return True
            time.sleep(0.001)
        while time.monotonic() < deadline:  # the thread is stuck or gone: wait, without adding markers
            if self._reached(target):
                return True
            time.sleep(0.01)
        return False

    def _reached(self, target: int) -> bool:
        with self._lock:
            return self._taken >= target

    def _put_marker(self) -> None:
        self.put(logging.INFO, "flush marker", {"custom_dimensions": {_MARKER: "1"}}, marker=True)

    def converting(self, record: logging.LogRecord) -> None:
        """The export thread is converting ``record`` (the formatter's call)."""
        with self._lock:
            self.thread = threading.get_ident()
            if self._processed:  # a new batch: the previous one's send returned, and no failure was logged
                self.sent += self._pending
                self._count("sent", self._pending)
                self._pending, self._processed = 0, False
            self._taken = max(self._taken, getattr(record, _SEQ, 0))

    def process(self, envelope: Any) -> bool:
        """The telemetry processor: True to send the envelope. Never raises (the SDK would log that as a
        warning from the export thread, which would read as a failed send)."""
        try:
            with self._lock:
                self._processed = True
            properties = envelope.data.baseData.properties or {}
            if properties.get(_MARKER):
                return False
            job_id = properties.get("job_id")
            if job_id:  # the job is the operation: Transaction search and Failures group its records
                envelope.tags["ai.operation.id"] = job_id
                envelope.tags["ai.operation.parentId"] = job_id
                envelope.tags["ai.operation.name"] = OPERATION_NAME
            envelope.tags["ai.cloud.role"] = self._role
            with self._lock:
                self._pending += 1
        except Exception:
            self._count("errors", 1)
        return True

    def failed(self) -> None:
        """The SDK logged a failure from this channel's thread: the batch being sent was not accepted."""
        with self._lock:
            self._count("export_failures", self._pending)
            self._pending = 0

    def close(self, timeout: float) -> None:
        # The handler stays on our logger: a record handed over in a race with this close lands in a queue
        # nobody reads, instead of going to logging's last-resort handler (stderr).
        self.handler.close(timeout)


class _Watching(logging.Formatter):
    """The default format (message, plus the traceback for exceptions), telling the channel first."""

    def __init__(self, seen: Callable[[logging.LogRecord], None]) -> None:
        super().__init__()
        self.seen = seen

    def format(self, record: logging.LogRecord) -> str:
        self.seen(record)
        return super().format(record)


class _SdkLog(logging.Handler):
    """Reads the SDK's diagnostics: a warning or error from a channel's export thread is a failed send.

    Installed once on the ``opencensus.ext.azure`` logger, which then stops propagating: a failed send is
    counted (and summed up at shutdown) instead of logging a line every few seconds while the endpoint is
    down. Errors are passed on to our own logger, so a rejected connection string still shows.
    """

    _installed: _SdkLog | None = None
    _install_lock = threading.Lock()

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.channels: list[_Channel] = []

    @classmethod
    def install(cls) -> _SdkLog:
        with cls._install_lock:
            if cls._installed is None:
                cls._installed = cls()
                sdk = logging.getLogger(SDK_LOGGER)
                sdk.addHandler(cls._installed)
                sdk.setLevel(logging.WARNING)
                sdk.propagate = False
            return cls._installed

    def attach(self, *channels: _Channel) -> None:
        self.channels = [*self.channels, *channels]

    def detach(self, *channels: _Channel) -> None:
        self.channels = [c for c in self.channels if c not in channels]

    def emit(self, record: logging.LogRecord) -> None:
        for channel in self.channels:
            if channel.thread is not None and record.thread == channel.thread:
                channel.failed()
        if record.levelno >= logging.ERROR:
            log.warning("telemetry: %s: %s", record.name, record.getMessage())
