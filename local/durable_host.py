"""In-process stand-in for the Azure Functions host + Durable extension (Python SDK 1.x protocol).

``LocalDurableHost`` drives the app's real orchestrators through the real ``azure-functions-durable``
SDK the way the host does: it builds host-shaped history JSON, calls the registered orchestrator
handle, parses the (cumulative, V2/V3) action list, checks replay determinism, runs activities on a
thread pool through the worker's JSON round trip, records timers and completions, and replays until
``isDone``.  ``local.durable_client_api`` serves the HTTP management API that
``DurableOrchestrationClient`` talks to, so client code (HTTP / blob-trigger functions) runs unchanged.

Protocol facts used here are listed in shared/notes/durable-host-protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import json
import math
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func
from azure.functions._durable_functions import df_dumps, df_loads

__all__ = [
    "DurableHostError",
    "InstanceAlreadyRunningError",
    "InstanceNotFoundError",
    "LocalDurableHost",
    "UnknownFunctionError",
    "close_client_session",
]

UTC = dt.UTC
TERMINAL_STATUSES = frozenset({"Completed", "Failed", "Terminated"})
ACTIVE_STATUSES = frozenset({"Pending", "Running"})
MAX_EVENTS_PER_EPISODE = 32  # the extension's default batch size
CUSTOM_STATUS_LIMIT_BYTES = 16 * 1024  # UTF-16 size, as the extension measures it
OUT_OF_PROC_MARKER = "\n\n$OutOfProcData$:"

# History EventType numbers (azure/durable_functions/models/history/HistoryEventType.py).
EXECUTION_STARTED, EXECUTION_TERMINATED = 0, 3
TASK_SCHEDULED, TASK_COMPLETED, TASK_FAILED = 4, 5, 6
SUB_CREATED, SUB_COMPLETED, SUB_FAILED = 7, 8, 9
TIMER_CREATED, TIMER_FIRED = 10, 11
ORCHESTRATOR_STARTED, ORCHESTRATOR_COMPLETED = 12, 13
EVENT_RAISED, CONTINUE_AS_NEW_EVENT = 15, 16
_EVENT_NAMES = {
    0: "ExecutionStarted", 1: "ExecutionCompleted", 2: "ExecutionFailed", 3: "ExecutionTerminated",
    4: "TaskScheduled", 5: "TaskCompleted", 6: "TaskFailed", 7: "SubOrchestrationInstanceCreated",
    8: "SubOrchestrationInstanceCompleted", 9: "SubOrchestrationInstanceFailed", 10: "TimerCreated",
    11: "TimerFired", 12: "OrchestratorStarted", 13: "OrchestratorCompleted", 14: "EventSent",
    15: "EventRaised", 16: "ContinueAsNew",
}

# Action types (azure/durable_functions/models/actions/ActionType.py).
CALL_ACTIVITY, CALL_ACTIVITY_RETRY, CALL_SUB, CALL_SUB_RETRY = 0, 1, 2, 3
CONTINUE_AS_NEW, CREATE_TIMER, WAIT_FOR_EVENT = 4, 5, 6
_UNSUPPORTED_ACTIONS = {7: "CallEntity", 8: "CallHttp", 9: "SignalEntity"}
_ACTION_NAMES = {
    0: "activity", 1: "activity (with retry)", 2: "sub-orchestration", 3: "sub-orchestration (with retry)",
    4: "continue-as-new", 5: "timer", 6: "wait-for-external-event", 7: "entity call", 8: "HTTP call",
    9: "entity signal",
}


class DurableHostError(RuntimeError):
    """Base class of the errors raised by :class:`LocalDurableHost`."""


class InstanceAlreadyRunningError(DurableHostError):
    """``start`` was given the id of an instance that is still Pending or Running."""


class InstanceNotFoundError(DurableHostError):
    """No instance with that id exists (or it was purged)."""


class UnknownFunctionError(DurableHostError):
    """The app has no function of that name and trigger type."""


def _ts(value: dt.datetime) -> str:
    """History timestamp (the SDK's DATETIME_STRING_FORMAT)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _iso(value: dt.datetime) -> str:
    """Status-query timestamp, as the extension writes it (second precision, Z suffix)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _event(event_type: int, event_id: int = -1, **fields: Any) -> dict[str, Any]:
    # Timestamp is stamped when the event joins the history (see _Driver._episode).
    return {"EventType": event_type, "EventId": event_id, "IsPlayed": False, "Timestamp": "", **fields}


def _flatten(actions: Any) -> list[dict[str, Any]]:
    """Flatten V1 (list of lists) / V2+V3 (``[[...]]`` with compound task_all/task_any) action lists."""
    out: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for child in node:
                walk(child)
        elif isinstance(node, dict) and "compoundActions" in node:
            walk(node["compoundActions"])
        elif isinstance(node, dict):
            out.append(node)

    walk(actions)
    return out


def _describe(action: dict[str, Any]) -> tuple[int, str | None]:
    """What the host compares on replay: the action type and the scheduled name (not inputs)."""
    kind = int(action.get("actionType", -1))
    if kind in (CALL_ACTIVITY, CALL_ACTIVITY_RETRY, CALL_SUB, CALL_SUB_RETRY):
        return kind, action.get("functionName")
    if kind == WAIT_FOR_EVENT:
        return kind, action.get("externalEventName")
    return kind, None


def _describe_text(desc: tuple[int, str | None]) -> str:
    kind, name = desc
    label = _ACTION_NAMES.get(kind, f"action type {kind}")
    return f"a {label} named '{name}'" if name is not None else f"a {label}"


def _split_out_of_proc_error(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """The SDK raises ``Exception("msg\\n\\n$OutOfProcData$:{state json}")`` on an uncaught error."""
    text = str(exc)
    message, sep, state_json = text.partition(OUT_OF_PROC_MARKER)
    state: dict[str, Any] = {}
    if sep:
        with contextlib.suppress(ValueError):
            state = json.loads(state_json)
    return message, state


def _parse_fire_at(value: str) -> dt.datetime:
    from dateutil.parser import parse  # dependency of azure-functions-durable

    parsed = parse(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


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
class _Retry:
    kind: int  # CALL_ACTIVITY or CALL_SUB
    name: str
    input: str | None
    instance_id: str | None
    first_interval: dt.timedelta
    max_attempts: int
    attempts: int = 1


@dataclass
class _Timer:
    fire_at: dt.datetime
    deadline: float  # time.monotonic() at which it fires (scaled); inf in virtual-time mode
    retry: _Retry | None = None


@dataclass
class _Ready:
    event: dict[str, Any]
    allocates: bool = False  # delivering it makes the SDK take the next task id (retry bookkeeping)
    hook: Callable[[], None] | None = None


@dataclass
class _Execution:
    """State of one execution (a continue-as-new starts a new one)."""

    generation: int
    input_token: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    played: int = 0
    next_id: int = 0
    scheduled: list[tuple[tuple[int, str | None], int | None]] = field(default_factory=list)
    task_kind: dict[int, int] = field(default_factory=dict)  # task id -> CALL_ACTIVITY / CALL_SUB
    retry_of: dict[int, _Retry] = field(default_factory=dict)
    timers: dict[int, _Timer] = field(default_factory=dict)
    ready: list[_Ready] = field(default_factory=list)
    post_events: list[dict[str, Any]] = field(default_factory=list)
    dispatch: list[Callable[[], None]] = field(default_factory=list)
    in_flight: set[int] = field(default_factory=set)  # activities / sub-orchestrations running

    def allocate(self) -> int:
        task_id = self.next_id
        self.next_id += 1
        return task_id


@dataclass
class _Parent:
    instance: _Instance
    generation: int
    task_id: int


@dataclass
class _Instance:
    instance_id: str
    name: str
    input_token: Any
    created: dt.datetime
    parent: _Parent | None = None
    runtime_status: str = "Pending"
    custom_status: Any = None
    output: Any = None
    last_updated: dt.datetime | None = None
    skew: dt.timedelta = dt.timedelta(0)
    generation: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    inbox: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    stop: bool = False
    children: list[_Instance] = field(default_factory=list)


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
    """

    def __init__(
        self,
        app: Any,
        *,
        max_workers: int = 4,
        clock: Callable[[], dt.datetime] | None = None,
        timer_scale: float = 1.0,
        task_hub: str = "LocalTaskHub",
    ) -> None:
        if timer_scale < 0:
            raise ValueError("timer_scale must be >= 0")
        self.app = app
        self.task_hub = task_hub
        self.timer_scale = float(timer_scale)
        self._clock = clock or (lambda: dt.datetime.now(UTC))
        self._lock = threading.RLock()
        self._instances: dict[str, _Instance] = {}
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

    def _now(self, inst: _Instance | None = None) -> dt.datetime:
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
        """Terminate a Pending/Running instance (and, by default, its running sub-orchestrations).

        Returns False when the instance had already finished.  Pending timers are dropped, no further
        episodes run; activities already running finish but their results are ignored.
        """
        with self._lock:
            inst = self._get(instance_id)
            return self._terminate(inst, reason, recursive)

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
    def _get(self, instance_id: str) -> _Instance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise InstanceNotFoundError(f"no instance with id {instance_id!r}")
        return inst

    def _create_instance(self, name: str, input_token: Any, instance_id: str | None,
                         parent: _Parent | None = None) -> _Instance:
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
            inst = _Instance(instance_id, name, input_token, created=now, parent=parent, last_updated=now)
            self._instances[instance_id] = inst
            if parent is not None:
                parent.instance.children.append(inst)
            threading.Thread(target=_Driver(self, inst).run, name=f"durable-{instance_id}",
                             daemon=True).start()
            return inst

    def _terminate(self, inst: _Instance, reason: str, recursive: bool) -> bool:
        if inst.runtime_status not in ACTIVE_STATUSES:
            return False
        inst.history.append(_event(EXECUTION_TERMINATED, Input=json.dumps(reason),
                                   Timestamp=_ts(self._now(inst))))
        self._finish(inst, "Terminated", reason, failure=(f"Instance terminated: {reason}", ""))
        inst.stop = True
        inst.inbox.put(("wake",))
        if recursive:
            for child in inst.children:
                self._terminate(child, reason, recursive)
        return True

    def _raise_event_json(self, instance_id: str, name: str, input_json: str | None) -> None:
        with self._lock:
            inst = self._get(instance_id)
            if inst.runtime_status not in ACTIVE_STATUSES:
                raise DurableHostError(f"instance {instance_id!r} is {inst.runtime_status}; event not delivered")
            inst.inbox.put(("event", name, input_json))

    def _finish(self, inst: _Instance, status: str, output: Any,
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

    def _status_of(self, inst: _Instance, show_history: bool, show_history_output: bool,
                   show_input: bool) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": inst.name,
            "instanceId": inst.instance_id,
            "runtimeStatus": inst.runtime_status,
            "input": inst.input_token if show_input else None,
            "customStatus": inst.custom_status,
            "output": inst.output,
            "createdTime": _iso(inst.created),
            "lastUpdatedTime": _iso(inst.last_updated or inst.created),
        }
        if show_history:
            hidden = () if show_history_output else ("Result", "Input", "Details")
            status["history"] = [
                {**{k: v for k, v in event.items() if k not in hidden and k != "IsPlayed"},
                 "EventType": _EVENT_NAMES.get(event["EventType"], str(event["EventType"]))}
                for event in list(inst.history)
            ]
        return status

    # ------------------------------------------------------------------ activities
    def _run_activity(self, inst: _Instance, generation: int, task_id: int, name: str,
                      input_json: str | None) -> None:
        """Pool thread: run an activity with the worker's decode/encode and post the outcome."""
        entry = self.activities.get(name)
        if entry is None:
            reason = f"The function '{name}' doesn't exist, is disabled, or is not an activity function."
            inst.inbox.put(("task", generation, task_id, False, (reason, "")))
            return
        try:
            try:  # ActivityTriggerConverter.decode: JSON, falling back to the raw string
                value = df_loads(input_json) if input_json is not None else None
            except json.JSONDecodeError:
                value = input_json
            result = entry.fn(**{entry.binding: value}) if entry.pass_by_keyword else entry.fn(value)
            result_json = df_dumps(self._async.run(result))  # ActivityTriggerConverter.encode
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


class _Driver:
    """Drives one orchestration instance on its own thread, episode by episode."""

    def __init__(self, host: LocalDurableHost, inst: _Instance) -> None:
        self.host = host
        self.inst = inst
        entry = host.orchestrators[inst.name]
        self.entry = entry

    # -------------------------------------------------------------- main loop
    def run(self) -> None:
        inst, host = self.inst, self.host
        exe = self._new_execution(inst.input_token)
        items = [_Ready(_event(EXECUTION_STARTED, Name=inst.name, Version="",
                               Input=None if inst.input_token is None else json.dumps(inst.input_token),
                               OrchestrationInstance={"InstanceId": inst.instance_id,
                                                      "ExecutionId": uuid.uuid4().hex}))]
        try:
            while True:
                outcome = self._episode(exe, items)
                if outcome == "stop":
                    return
                if isinstance(outcome, _Execution):
                    exe = outcome
                    items = [_Ready(_event(EXECUTION_STARTED, Name=inst.name, Version="",
                                           Input=json.dumps(exe.input_token)))]
                    continue
                batch = self._next_batch(exe)
                if batch is None:
                    return
                items = batch
        except Exception as exc:  # a host bug must not leave the instance Running forever
            with host._lock:
                if inst.runtime_status in ACTIVE_STATUSES:
                    message = f"LocalDurableHost internal error: {type(exc).__name__}: {exc}"
                    host._finish(inst, "Failed", message, failure=(message, traceback.format_exc()))

    def _new_execution(self, input_token: Any) -> _Execution:
        with self.host._lock:
            self.inst.generation += 1
            exe = _Execution(self.inst.generation, input_token)
            self.inst.history = exe.history
            self.inst.input_token = input_token
            return exe

    # -------------------------------------------------------------- waiting for work
    def _next_batch(self, exe: _Execution) -> list[_Ready] | None:
        inst = self.inst
        while True:
            if inst.stop:
                return None
            while True:
                try:
                    self._accept(exe, inst.inbox.get_nowait())
                except queue.Empty:
                    break
            self._fire_due_timers(exe)
            if inst.stop:
                return None
            if exe.ready:
                return self._take_batch(exe)
            deadline = min((t.deadline for t in exe.timers.values()), default=math.inf)
            timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(queue.Empty):
                self._accept(exe, inst.inbox.get(timeout=timeout))

    @staticmethod
    def _take_batch(exe: _Execution) -> list[_Ready]:
        """Up to 32 events; at most one id-allocating event, and it goes first.

        The SDK gives a failed retry attempt's timer (and the next attempt) the next task id at the
        moment it processes that event, interleaved with ids the generator takes; delivering it first
        in its episode makes that id exactly the host's next id.
        """
        first = next((item for item in exe.ready if item.allocates), None)
        batch = [first] if first is not None else []
        rest: list[_Ready] = []
        for item in exe.ready:
            if item is first:
                continue
            if not item.allocates and len(batch) < MAX_EVENTS_PER_EPISODE:
                batch.append(item)
            else:
                rest.append(item)
        exe.ready = rest
        return batch

    def _accept(self, exe: _Execution, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "event":
            _, name, input_json = msg
            exe.ready.append(_Ready(_event(EVENT_RAISED, Name=name, Input=input_json)))
        elif kind == "task":
            _, generation, task_id, ok, payload = msg
            if generation != exe.generation or task_id not in exe.task_kind:
                return  # result of a previous execution (continue-as-new) or unknown: ignored
            exe.in_flight.discard(task_id)
            is_sub = exe.task_kind[task_id] == CALL_SUB
            if ok:
                event = _event(SUB_COMPLETED if is_sub else TASK_COMPLETED, TaskScheduledId=task_id,
                               Result=payload)
                exe.ready.append(_Ready(event))
                return
            reason, details = payload
            event = _event(SUB_FAILED if is_sub else TASK_FAILED, TaskScheduledId=task_id, Reason=reason,
                           Details=details)
            retry = exe.retry_of.get(task_id)
            if retry is None:
                exe.ready.append(_Ready(event))
            else:
                exe.ready.append(_Ready(event, allocates=True,
                                        hook=lambda: self._schedule_retry_timer(exe, retry)))

    def _fire_due_timers(self, exe: _Execution) -> None:
        now_mono = time.monotonic()
        due = sorted((t.fire_at, task_id) for task_id, t in exe.timers.items() if t.deadline <= now_mono)
        if not due and exe.timers and not exe.in_flight and not exe.ready and self.host.timer_scale == 0:
            first = min(t.fire_at for t in exe.timers.values())  # virtual time: idle, jump ahead
            due = sorted((t.fire_at, task_id) for task_id, t in exe.timers.items() if t.fire_at == first)
        for fire_at, task_id in due:
            timer = exe.timers.pop(task_id)
            with self.host._lock:
                now = self.host._now(self.inst)
                if fire_at > now:  # scaled timer: move this orchestration's clock to the fire time
                    self.inst.skew += fire_at - now
            event = _event(TIMER_FIRED, TimerId=task_id, FireAt=_ts(fire_at))
            retry = timer.retry
            if retry is not None and retry.attempts < retry.max_attempts:
                exe.ready.append(_Ready(event, allocates=True,
                                        hook=lambda r=retry: self._schedule_retry_attempt(exe, r)))
            else:
                exe.ready.append(_Ready(event))

    # -------------------------------------------------------------- retries (the SDK's RetryAbleTask)
    def _schedule_retry_timer(self, exe: _Execution, retry: _Retry) -> None:
        # After every failed attempt, including the last, the host waits on a timer (DTFx
        # RetryInterceptor); the SDK takes the next id for it and fails the task when it fires.
        timer_id = exe.allocate()
        fire_at = self.host._now(self.inst) + retry.first_interval
        exe.timers[timer_id] = _Timer(fire_at, self.host._deadline(retry.first_interval), retry)
        exe.post_events.append(_event(TIMER_CREATED, timer_id, FireAt=_ts(fire_at)))

    def _schedule_retry_attempt(self, exe: _Execution, retry: _Retry) -> None:
        task_id = exe.allocate()
        retry.attempts += 1
        exe.retry_of[task_id] = retry
        self._schedule_call(exe, task_id, retry.kind, retry.name, retry.input, retry.instance_id)

    # -------------------------------------------------------------- one episode
    def _episode(self, exe: _Execution, items: list[_Ready]) -> str | _Execution:
        host, inst = self.host, self.inst
        with host._lock:
            if inst.stop:
                return "stop"
            now = host._now(inst)
            for event in exe.history[exe.played:]:
                event["IsPlayed"] = True
            exe.played = len(exe.history)
            stamp = _ts(now)
            exe.history.append(_event(ORCHESTRATOR_STARTED, Timestamp=stamp))
            for item in items:
                item.event["Timestamp"] = stamp
                exe.history.append(item.event)
                if item.hook is not None:
                    item.hook()
            if inst.runtime_status == "Pending":
                inst.runtime_status = "Running"
            request = json.dumps({
                "history": exe.history,
                "instanceId": inst.instance_id,
                "isReplaying": exe.played > 0,
                "parentInstanceId": inst.parent.instance.instance_id if inst.parent else None,
                "input": exe.input_token,
                "upperSchemaVersion": 1,
                "upperSchemaVersionNew": 2,
            })

        error: str | None = None
        try:
            context = func.OrchestrationContext(request)
            fn = self.entry.fn
            raw = fn(**{self.entry.binding: context}) if self.entry.pass_by_keyword else fn(context)
            state = json.loads(raw)
        except Exception as exc:
            error, state = _split_out_of_proc_error(exc)
            error = error or type(exc).__name__

        with host._lock:
            if inst.stop or inst.runtime_status not in ACTIVE_STATUSES:
                return "stop"
            return self._apply(exe, state, error, now)

    def _apply(self, exe: _Execution, state: dict[str, Any], error: str | None,
               now: dt.datetime) -> str | _Execution:
        host, inst = self.host, self.inst
        inst.last_updated = now
        if "customStatus" in state:  # omitted when falsy: a falsy value never replaces the last one
            custom = state["customStatus"]
            size = len(json.dumps(custom).encode("utf-16-le"))
            if size > CUSTOM_STATUS_LIMIT_BYTES:
                error = error or (f"The UTF-16 size of the JSON-serialized custom status must not exceed "
                                  f"16 KB; it is {size / 1024:.1f} KB.")
            else:
                inst.custom_status = custom

        actions = _flatten(state.get("actions", []))
        if error is None:
            error = self._check_determinism(exe, actions)
        if error is not None:
            return self._fail(exe, error)

        new_events: list[dict[str, Any]] = list(exe.post_events)
        exe.post_events.clear()
        continue_input: Any = None
        continued = False
        for action in actions[len(exe.scheduled):]:
            desc = _describe(action)
            kind = desc[0]
            if kind in _UNSUPPORTED_ACTIONS:
                return self._fail(exe, f"LocalDurableHost does not support {_UNSUPPORTED_ACTIONS[kind]} "
                                       "actions.")
            task_id = None if kind == WAIT_FOR_EVENT else exe.allocate()
            exe.scheduled.append((desc, task_id))
            if task_id is None:
                continue
            if kind == CREATE_TIMER:
                fire_at = _parse_fire_at(action["fireAt"])
                if not action.get("isCanceled"):
                    exe.timers[task_id] = _Timer(fire_at, host._deadline(fire_at - now))
                new_events.append(_event(TIMER_CREATED, task_id, FireAt=_ts(fire_at)))
            elif kind == CONTINUE_AS_NEW:
                continued, continue_input = True, action.get("input")
            else:
                base_kind = CALL_ACTIVITY if kind in (CALL_ACTIVITY, CALL_ACTIVITY_RETRY) else CALL_SUB
                if kind in (CALL_ACTIVITY_RETRY, CALL_SUB_RETRY):
                    options = action.get("retryOptions") or {}
                    exe.retry_of[task_id] = _Retry(
                        base_kind, action["functionName"], action.get("input"), action.get("instanceId"),
                        dt.timedelta(milliseconds=options.get("firstRetryIntervalInMilliseconds", 1000)),
                        int(options.get("maxNumberOfAttempts", 1)))
                self._schedule_call(exe, task_id, base_kind, action["functionName"], action.get("input"),
                                    action.get("instanceId"), new_events)
        self._drop_cancelled_timers(exe, actions)
        for event in new_events:
            event["Timestamp"] = _ts(now)
        exe.history.extend(new_events)
        exe.history.append(_event(ORCHESTRATOR_COMPLETED, Timestamp=_ts(now)))

        if continued:
            exe.history.append(_event(CONTINUE_AS_NEW_EVENT, Input=continue_input, Timestamp=_ts(now)))
            exe.dispatch.clear()
            return self._new_execution(continue_input)
        if state.get("isDone"):
            exe.dispatch.clear()
            host._finish(inst, "Completed", state.get("output"))
            return "stop"
        for start_work in exe.dispatch:
            start_work()
        exe.dispatch.clear()
        return "continue"

    def _schedule_call(self, exe: _Execution, task_id: int, kind: int, name: str, input_json: str | None,
                       instance_id: str | None, events: list[dict[str, Any]] | None = None) -> None:
        """Record TaskScheduled / SubOrchestrationInstanceCreated and queue the work to start."""
        events = exe.post_events if events is None else events
        exe.task_kind[task_id] = kind
        exe.in_flight.add(task_id)
        host, inst, generation = self.host, self.inst, exe.generation
        if kind == CALL_ACTIVITY:
            events.append(_event(TASK_SCHEDULED, task_id, Name=name, Version="", Input=input_json))
            exe.dispatch.append(lambda: host._pool.submit(host._run_activity, inst, generation, task_id,
                                                          name, input_json))
            return
        child_id = instance_id or f"{inst.instance_id}:{task_id}"
        events.append(_event(SUB_CREATED, task_id, Name=name, InstanceId=child_id, Version="",
                             Input=input_json))

        def start_child() -> None:
            try:
                host._create_instance(name, input_json, child_id, _Parent(inst, generation, task_id))
            except DurableHostError as exc:
                inst.inbox.put(("task", generation, task_id, False, (str(exc), "")))

        exe.dispatch.append(start_child)

    @staticmethod
    def _check_determinism(exe: _Execution, actions: list[dict[str, Any]]) -> str | None:
        for index, (desc, task_id) in enumerate(exe.scheduled):
            where = f"with sequence ID {task_id}" if task_id is not None else f"at position {index}"
            if index >= len(actions):
                return (f"Non-Deterministic workflow detected: A previous execution of this orchestration "
                        f"scheduled {_describe_text(desc)} {where}, but the current replay execution "
                        f"hasn't (yet?) scheduled this task. Was a change made to the orchestrator code "
                        f"after this instance had already started running?")
            now_desc = _describe(actions[index])
            if now_desc != desc:
                return (f"Non-Deterministic workflow detected: A previous execution of this orchestration "
                        f"scheduled {_describe_text(desc)} {where}, but the current replay execution "
                        f"scheduled {_describe_text(now_desc)} instead. Was a change made to the "
                        f"orchestrator code after this instance had already started running?")
        return None

    @staticmethod
    def _drop_cancelled_timers(exe: _Execution, actions: list[dict[str, Any]]) -> None:
        for action, (desc, task_id) in zip(actions, exe.scheduled, strict=False):
            if desc[0] == CREATE_TIMER and action.get("isCanceled") and task_id in exe.timers:
                del exe.timers[task_id]

    def _fail(self, exe: _Execution, message: str) -> str:
        inst = self.inst
        output = f"Orchestrator function '{inst.name}' failed: {message}"
        exe.history.append(_event(ORCHESTRATOR_COMPLETED, Timestamp=_ts(self.host._now(inst))))
        exe.dispatch.clear()
        self.host._finish(inst, "Failed", output, failure=(output, ""))
        return "stop"

