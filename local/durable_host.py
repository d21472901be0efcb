"""In-process stand-in for the Azure Functions host + Durable extension (Python SDK 1.x protocol).

``LocalDurableHost`` drives the app's real orchestrators through the real ``azure-functions-durable``
SDK the way the host does: it builds host-shaped history JSON, calls the registered orchestrator
handle, parses the (cumulative, V2/V3) action list, checks replay determinism, runs activities on a
thread pool through the worker's JSON round trip, records timers and completions, and replays until
``isDone``.  ``local.durable_client_api`` serves the HTTP management API that
``DurableOrchestrationClient`` talks to, so client code (HTTP / blob-trigger functions) runs unchanged.

One instance's replay loop is :class:`local.durable_driver.Driver`; how the extension numbers and starts work
is :class:`local.durable_shim.Shim`; the protocol's numbers, event shapes and the per-instance state are in
``local.durable_state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import json
import math
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from azure.functions import meta
from azure.functions._durable_functions import df_dumps
from azure.functions.durable_functions import ActivityTriggerConverter

from local.durable_driver import Driver
from local.durable_state import (
    ACTIVE_STATUSES,
    EVENT_NAMES,
    EXECUTION_TERMINATED,
    TERMINAL_STATUSES,
    UTC,
    DurableHostError,
    Instance,
    InstanceAlreadyRunningError,
    InstanceNotFoundError,
    Parent,
    UnknownFunctionError,
    history_event,
    iso,
    ts,
)

__all__ = [
    "DurableHostError",
    "InstanceAlreadyRunningError",
    "InstanceNotFoundError",
    "LocalDurableHost",
    "UnknownFunctionError",
    "close_client_session",
]


class _EventLoopThread:
    """One event loop in its own thread for every async function, as the Python worker has: concurrent HTTP
    invocations and async activities share it (and the Durable SDK's one aiohttp session belongs to it)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="durable-host-loop")
        self._thread.start()

    def run(self, result: Any) -> Any:
        """``result`` itself, or what it resolves to when it is awaitable (waits in the calling thread)."""
        if not inspect.isawaitable(result):
            return result
        if threading.current_thread() is self._thread:
            raise RuntimeError("cannot wait for the host's event loop from inside it")

        async def _await() -> Any:
            from azure.durable_functions.models.utils import http_utils

            session = http_utils._client_session  # one made on another loop (a test's asyncio.run) is unusable
            if session is not None and getattr(session, "_loop", None) is not self.loop:
                http_utils._client_session = None
            return await result

        return asyncio.run_coroutine_threadsafe(_await(), self.loop).result()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close_client_session(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class _Registered:
    name: str
    binding: str
    fn: Callable[..., Any]
    pass_by_keyword: bool


class LocalDurableHost:
    """Runs a ``DFApp``'s orchestrations, activities and client functions in this process.

    ``clock`` returns an aware UTC datetime (default: real time).  ``timer_scale`` multiplies the real
    wait of durable timers and retry intervals (1.0 = real time, 0.01 = 100x faster).  ``0`` is virtual
    time: activities take no time, so an instance's earliest timer fires as soon as it has no activity
    or sub-orchestration in flight (a timeout never beats work that is still running; a timer racing
    an external event fires at once).  Whenever a timer fires early, that orchestration's clock
    (``current_utc_datetime``) jumps to its fire time, so time-based loops still end.

    ``event_seed`` (default: the ``DURABLE_EVENT_SEED`` environment variable, else none) turns on seeded
    random delivery: events that are ready together reach the orchestrator in a random order and in random
    batches, and retry timers may fire while other work runs (see ``local.durable_driver``).  Without a seed,
    events go in the order they arrived.  Task ids are the extension's either way (``local.durable_shim``).
    """

    def __init__(
        self,
        app: Any,
        *,
        max_workers: int = 4,
        clock: Callable[[], dt.datetime] | None = None,
        timer_scale: float = 1.0,
        task_hub: str = "LocalTaskHub",
        event_seed: int | None = None,
    ) -> None:
        if timer_scale < 0:
            raise ValueError("timer_scale must be >= 0")
        if event_seed is None and os.environ.get("DURABLE_EVENT_SEED", "").strip():
            event_seed = int(os.environ["DURABLE_EVENT_SEED"])
        self.event_seed = event_seed
        self.app = app
        self.task_hub = task_hub
        self.timer_scale = float(timer_scale)
        self._clock = clock or (lambda: dt.datetime.now(UTC))
        self._lock = threading.RLock()
        self._instances: dict[str, Instance] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="durable-activity")
        self._async = _EventLoopThread()
        self._closed = False
        self._http: Any = None
        self.orchestrators: dict[str, _Registered] = {}
        self.activities: dict[str, _Registered] = {}
        self.functions: dict[str, Any] = {}  # every function of the app, by function name
        self._index(app)

    # ------------------------------------------------------------------ registration
    def _index(self, app: Any) -> None:
        # get_functions() (the worker's one-time indexing call) records names in app.functions_bindings
        # and rejects a second call as "duplicate names"; index with a clean slate and restore it.
        previous = getattr(app, "functions_bindings", None)
        app.functions_bindings = None
        try:
            functions = app.get_functions()
        finally:
            app.functions_bindings = previous
        for function in functions:
            name = function.get_function_name()
            self.functions[name] = function
            trigger = function.get_trigger()
            trigger_type = getattr(trigger, "type", None)
            if trigger_type not in ("orchestrationTrigger", "activityTrigger"):
                continue
            fn = function.get_user_function()
            try:
                by_keyword = trigger.name in inspect.signature(fn).parameters
            except (TypeError, ValueError):
                by_keyword = False
            entry = _Registered(name, trigger.name, fn, by_keyword)
            table = self.orchestrators if trigger_type == "orchestrationTrigger" else self.activities
            table[name] = entry
            alias = getattr(trigger, "orchestration", None) or getattr(trigger, "activity", None)
            if alias and alias not in table:
                table[alias] = entry

    def _deadline(self, delay: dt.timedelta) -> float:
        """Monotonic time at which a timer ``delay`` ahead fires (inf: virtual time, fire when idle)."""
        if self.timer_scale == 0:
            return math.inf
        return time.monotonic() + max(0.0, delay.total_seconds()) * self.timer_scale

    def _now(self, inst: Instance | None = None) -> dt.datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("clock() must return an aware (UTC) datetime")
        return now + inst.skew if inst is not None else now

    # ------------------------------------------------------------------ public API
    def start(self, orchestrator_name: str, input: Any = None, instance_id: str | None = None) -> str:
        """Start an orchestration; ``input`` goes through ``df_dumps`` as the Python client sends it."""
        token = df_dumps(input) if input is not None else None
        return self._create_instance(orchestrator_name, token, instance_id).instance_id

    def status(self, instance_id: str, show_history: bool = False, show_history_output: bool = False,
               show_input: bool = True) -> dict[str, Any] | None:
        """Durable status-query shape, or None when the id is unknown."""
        with self._lock:
            inst = self._instances.get(instance_id)
            return None if inst is None else self._status_of(inst, show_history, show_history_output,
                                                             show_input)

    def wait(self, instance_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Block until the instance is Completed/Failed/Terminated; TimeoutError otherwise."""
        with self._lock:
            inst = self._get(instance_id)
        if not inst.done.wait(timeout):
            raise TimeoutError(f"instance {instance_id!r} still {inst.runtime_status} after {timeout}s")
        status = self.status(instance_id)
        assert status is not None
        return status

    def terminate(self, instance_id: str, reason: str, recursive: bool = True) -> bool:
        """Ask a Pending/Running instance (and, by default, its sub-orchestrations) to terminate.

        As in the extension, this queues a message: the instance becomes Terminated at its next episode
        boundary, so an episode in progress (or one for events that arrived before the request) still runs
        and its work still starts; poll :meth:`status` or :meth:`wait`.  Returns False when the instance
        had already finished.  Afterwards timers are dropped and results of running work are ignored.
        """
        with self._lock:
            inst = self._get(instance_id)
            if inst.runtime_status not in ACTIVE_STATUSES:
                return False
            inst.inbox.put(("terminate", reason, recursive))
            return True

    def raise_event(self, instance_id: str, name: str, data: Any = None) -> None:
        """Deliver an external event; the orchestrator receives ``data`` after a df_dumps/df_loads trip."""
        self._raise_event_json(instance_id, name, df_dumps(data))

    def list_instances(self, runtime_status: Iterable[str] | None = None,
                       created_from: dt.datetime | None = None, created_to: dt.datetime | None = None,
                       instance_id_prefix: str | None = None, show_input: bool = True) -> list[dict[str, Any]]:
        """Statuses of the matching instances, oldest first."""
        wanted = {s.lower() for s in runtime_status} if runtime_status else None
        with self._lock:
            found = [
                inst for inst in self._instances.values()
                if (wanted is None or inst.runtime_status.lower() in wanted)
                and (created_from is None or inst.created >= created_from)
                and (created_to is None or inst.created <= created_to)
                and (not instance_id_prefix or inst.instance_id.startswith(instance_id_prefix))
            ]
            found.sort(key=lambda inst: inst.created)
            return [self._status_of(inst, False, False, show_input) for inst in found]

    def purge(self, instance_id: str) -> int:
        """Forget a finished instance (returns 1), 0 if unknown or still Pending/Running."""
        with self._lock:
            inst = self._instances.get(instance_id)
            if inst is None or inst.runtime_status not in TERMINAL_STATUSES:
                return 0
            del self._instances[instance_id]
            return 1

    def client_binding_json(self) -> str:
        """The ``durableClient`` binding string the host would pass (starts the loopback API server)."""
        return self.http_api.binding_json()

    @property
    def http_api(self) -> Any:
        """The loopback management API (``local.durable_client_api.DurableHttpApi``), started on demand."""
        with self._lock:
            if self._closed:
                raise DurableHostError("host is closed")
            if self._http is None:
                from local.durable_client_api import DurableHttpApi

                self._http = DurableHttpApi(self)
                self._http.start()
            return self._http

    def invoke_function(self, name: str, **kwargs: Any) -> Any:
        """Call a (non-durable-trigger) app function by function name, like the worker would.

        A ``durableClient`` binding missing from ``kwargs`` gets :meth:`client_binding_json` (the DFApp
        wrapper turns it into a ``DurableOrchestrationClient``); async functions are awaited.
        """
        function = self.functions.get(name)
        if function is None:
            raise UnknownFunctionError(f"the app has no function named {name!r}")
        trigger_type = getattr(function.get_trigger(), "type", None)
        if trigger_type in ("orchestrationTrigger", "activityTrigger", "entityTrigger"):
            raise UnknownFunctionError(f"{name!r} is a durable-trigger function; use start()/activities")
        for binding in function.get_bindings():
            if getattr(binding, "type", None) == "durableClient" and binding.name not in kwargs:
                kwargs[binding.name] = self.client_binding_json()
        return self._async.run(function.get_user_function()(**kwargs))

    def close(self) -> None:
        """Stop all drivers, the activity pool and the HTTP server; instances keep their last status."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for inst in self._instances.values():
                inst.stop = True
                inst.inbox.put(("wake",))
            http, self._http = self._http, None
        if http is not None:
            http.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._async.close()

    def __enter__(self) -> LocalDurableHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals used by the HTTP API
    def _get(self, instance_id: str) -> Instance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise InstanceNotFoundError(f"no instance with id {instance_id!r}")
        return inst

    def _create_instance(self, name: str, input_token: Any, instance_id: str | None,
                         parent: Parent | None = None) -> Instance:
        if name not in self.orchestrators:
            raise UnknownFunctionError(
                f"The function '{name}' doesn't exist, is disabled, or is not an orchestrator function.")
        instance_id = instance_id or uuid.uuid4().hex
        with self._lock:
            if self._closed:
                raise DurableHostError("host is closed")
            existing = self._instances.get(instance_id)
            if existing is not None and existing.runtime_status in ACTIVE_STATUSES:
                raise InstanceAlreadyRunningError(
                    f"An Orchestration instance with the status {existing.runtime_status} already exists.")
            now = self._now()
            inst = Instance(instance_id, name, input_token, created=now, parent=parent, last_updated=now)
            self._instances[instance_id] = inst
            if parent is not None:
                parent.instance.children.append(inst)
            threading.Thread(target=Driver(self, inst).run, name=f"durable-{instance_id}",
                             daemon=True).start()
            return inst

    def _terminate_now(self, inst: Instance, reason: str, recursive: bool) -> None:
        """The driver reached a terminate request (caller holds the lock)."""
        if inst.runtime_status not in ACTIVE_STATUSES:
            return
        inst.history.append(history_event(EXECUTION_TERMINATED, Input=json.dumps(reason),
                                          Timestamp=ts(self._now(inst))))
        self._finish(inst, "Terminated", reason, failure=(f"Instance terminated: {reason}", ""))
        if recursive:
            for child in inst.children:
                if child.runtime_status in ACTIVE_STATUSES:
                    child.inbox.put(("terminate", reason, recursive))

    def _raise_event_json(self, instance_id: str, name: str, input_json: str | None) -> None:
        with self._lock:
            inst = self._get(instance_id)
            if inst.runtime_status not in ACTIVE_STATUSES:
                raise DurableHostError(f"instance {instance_id!r} is {inst.runtime_status}; event not delivered")
            inst.inbox.put(("event", name, input_json))

    def _finish(self, inst: Instance, status: str, output: Any,
                failure: tuple[str, str] | None = None) -> None:
        """Record a terminal status (caller holds the lock) and tell a waiting parent."""
        inst.runtime_status = status
        inst.output = output
        inst.last_updated = self._now(inst)
        inst.done.set()
        parent = inst.parent
        if parent is None or parent.instance.runtime_status not in ACTIVE_STATUSES:
            return
        if status == "Completed":
            msg = ("task", parent.generation, parent.task_id, True, json.dumps(output))
        else:
            msg = ("task", parent.generation, parent.task_id, False, failure or (str(output), ""))
        parent.instance.inbox.put(msg)

    def _status_of(self, inst: Instance, show_history: bool, show_history_output: bool,
                   show_input: bool) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": inst.name,
            "instanceId": inst.instance_id,
            "runtimeStatus": inst.runtime_status,
            "input": inst.input_token if show_input else None,
            "customStatus": inst.custom_status,
            "output": inst.output,
            "createdTime": iso(inst.created),
            "lastUpdatedTime": iso(inst.last_updated or inst.created),
        }
        if show_history:
            hidden = () if show_history_output else ("Result", "Input", "Details")
            status["history"] = [
                {**{k: v for k, v in event.items() if k not in hidden and k != "IsPlayed"},
                 "EventType": EVENT_NAMES.get(event["EventType"], str(event["EventType"]))}
                for event in list(inst.history)
            ]
        return status

    # ------------------------------------------------------------------ activities
    def _run_activity(self, inst: Instance, generation: int, task_id: int, name: str,
                      input_json: str | None) -> None:
        """Pool thread: run an activity with the worker's decode/encode and post the outcome."""
        entry = self.activities.get(name)
        if entry is None:
            reason = f"The function '{name}' doesn't exist, is disabled, or is not an activity function."
            inst.inbox.put(("task", generation, task_id, False, (reason, "")))
            return
        try:  # the worker's own converter both ways (JSON, or the raw string when it is not JSON)
            datum = meta.Datum("null" if input_json is None else input_json, "json")
            value = ActivityTriggerConverter.decode(datum, trigger_metadata=None)
            result = entry.fn(**{entry.binding: value}) if entry.pass_by_keyword else entry.fn(value)
            result_json = ActivityTriggerConverter.encode(self._async.run(result), expected_type=None).value
            inst.inbox.put(("task", generation, task_id, True, result_json))
        except Exception as exc:
            reason = f"Activity function '{name}' failed: {type(exc).__name__}: {exc}"
            inst.inbox.put(("task", generation, task_id, False, (reason, traceback.format_exc())))


async def close_client_session() -> None:
    """Close the Durable SDK's shared aiohttp session if it was opened on the running loop.

    Call it at the end of an ``asyncio.run`` that used ``DurableOrchestrationClient`` directly, so a
    later run on another loop starts a fresh session (and no 'Unclosed client session' warning).
    """
    from azure.durable_functions.models.utils import http_utils

    session = http_utils._client_session
    if session is None:
        return
    if getattr(session, "_loop", None) is asyncio.get_running_loop() and not session.closed:
        await session.close()
    http_utils._client_session = None
