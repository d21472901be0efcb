"""Turning telemetry on and off, handing records to the exporter, flushing, and the counters.

Off unless configured: without a connection string every hook returns at once, nothing from the exporter's
SDK is imported and no thread starts. Telemetry never fails or slows a job: errors in the hooks are
swallowed and counted, a full backlog drops the record (counted), failed sends are dropped, not retried
from disk (counted), and :func:`flush` and :func:`shutdown` wait at most their timeout.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import warnings
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pipeline.telemetry.events import Record

if TYPE_CHECKING:
    from pipeline.telemetry.exporter import Exporter

CONNECTION_ENV = "APPLICATIONINSIGHTS_CONNECTION_STRING"
AUTHENTICATION_ENV = "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"
FLUSH_TIMEOUT_SECONDS = 5.0
# A job's last record (completed, failed, canceled) is sent at once (flush_soon), not at the next export interval:
# the Functions host stops a scaled-in or recycled worker with SIGTERM, which skips atexit, and what the export
# interval had not sent yet was lost, typically that last record.
TERMINAL_FLUSH_SECONDS = 2.0
_flushing = threading.Lock()  # one background flush at a time
_flush_again = False  # a flush was asked for while one was under way
COUNTERS = ("emitted", "sent", "export_failures", "dropped", "errors")

log = logging.getLogger("stylize.telemetry")  # our own diagnostics (not exported)
_lock = threading.RLock()
_exporter: Exporter | None = None
_configured = False
_final = False  # set at interpreter exit: no exporter starts after that
_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()


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
            _exporter = _build(_normalize(connection_string), _credential(authentication))
        except Exception as exc:  # a bad connection string or credential setting: run without telemetry
            count("errors")
            log.warning("telemetry is off: %s: %s", type(exc).__name__, exc)
            _exporter = None
        return _exporter is not None


def enabled() -> bool:
    return active() is not None


def flush(timeout: float = FLUSH_TIMEOUT_SECONDS) -> bool:
    """Wait (at most ``timeout`` seconds) until what was recorded so far has been sent or dropped."""
    exporter = _exporter
    if exporter is None:
        return True
    try:
        return exporter.flush(timeout)
    except Exception:
        count("errors")
        return False


def flush_soon(timeout: float = TERMINAL_FLUSH_SECONDS) -> None:
    """Start sending what was recorded so far now, on a thread of its own: the caller does not wait (telemetry
    never slows a job, not even with the endpoint down). A flush already under way goes round once more for
    what was recorded after it began (it used to be taken as covering it: the record then waited for the next
    export interval)."""
    global _flush_again
    if _exporter is None:
        return
    if not _flushing.acquire(blocking=False):
        _flush_again = True
        return
    _flush_again = False

    def run() -> None:
        try:
            flush(timeout)
        finally:
            _flushing.release()
        if _flush_again:
            flush_soon(timeout)

    threading.Thread(target=run, name="telemetry-flush", daemon=True).start()


def shutdown(timeout: float = FLUSH_TIMEOUT_SECONDS) -> None:
    """Flush (bounded) and stop the export threads; a later hook configures again from the environment."""
    global _configured
    with _lock:
        _close(timeout)
        _configured = False


def stats() -> dict[str, int]:
    """Counters since the process started: records ``emitted`` (handed to the exporter), envelopes ``sent``
    (their send returned without a failure), ``export_failures`` (in sends the SDK reported as failed),
    ``dropped`` (backlog full) and ``errors`` (inside the hooks themselves)."""
    with _counts_lock:
        return {key: _counts.get(key, 0) for key in COUNTERS}


def active() -> Exporter | None:
    """The exporter, configuring from the environment on first use; None while telemetry is off."""
    if not _configured:
        with _lock:
            if not _configured:
                configure()
    return _exporter


def emit(records: Iterable[Record]) -> None:
    """Hand records to the exporter (a queue put each); nothing when telemetry is off."""
    exporter = _exporter
    if exporter is None:
        return
    for record in records:
        count("emitted" if exporter.send(record) else "dropped")


def count(key: str, n: int = 1) -> None:
    with _counts_lock:
        _counts[key] += n


def _build(connection_string: str, credential: Any) -> Exporter:
    with warnings.catch_warnings():  # the SDK's import-time deprecation warnings are not ours to show
        warnings.simplefilter("ignore", DeprecationWarning)
        from pipeline.telemetry import exporter  # imported only now: without telemetry, no SDK is loaded

    return exporter.build(connection_string, credential, count)


def _close(timeout: float) -> None:
    global _exporter
    exporter, _exporter = _exporter, None
    if exporter is None:
        return
    try:
        exporter.close(timeout)
    except Exception:
        count("errors")


def _normalize(connection_string: str) -> str:
    """Drop empty parts (a trailing ';'), which the SDK's parser rejects."""
    return ";".join(part.strip() for part in connection_string.split(";") if part.strip())


def _credential(authentication: str) -> Any:
    """``ClientId=<id>;Authorization=AAD`` → a managed identity credential; empty → None (no credential).

    Keyless in Azure: the exporter signs in with that user-assigned managed identity (``Authorization=AAD``
    alone: the system-assigned one). Locally and in tests there is no credential.
    """
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


@atexit.register
def _at_exit() -> None:
    global _final
    _final = True
    shutdown()
