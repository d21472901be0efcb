"""The Durable protocol as the local host speaks it: history event and action numbers, event shapes, the
per-instance state the host keeps, and the host's errors.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from local.durable_shim import Shim

UTC = dt.UTC
TERMINAL_STATUSES = frozenset({"Completed", "Failed", "Terminated"})
ACTIVE_STATUSES = frozenset({"Pending", "Running"})
MAX_EVENTS_PER_EPISODE = 32  # the extension's default batch size
CUSTOM_STATUS_LIMIT_BYTES = 16 * 1024  # UTF-16 size, as the extension measures it
OUT_OF_PROC_MARKER = "\n\n$OutOfProcData$:"

# History EventType numbers (azure/durable_functions/models/history/HistoryEventType.py).
EXECUTION_STARTED, EXECUTION_COMPLETED, EXECUTION_TERMINATED = 0, 1, 3
TASK_SCHEDULED, TASK_COMPLETED, TASK_FAILED = 4, 5, 6
SUB_CREATED, SUB_COMPLETED, SUB_FAILED = 7, 8, 9
TIMER_CREATED, TIMER_FIRED = 10, 11
ORCHESTRATOR_STARTED, ORCHESTRATOR_COMPLETED = 12, 13
EVENT_RAISED, CONTINUE_AS_NEW_EVENT = 15, 16
EVENT_NAMES = {
    0: "ExecutionStarted", 1: "ExecutionCompleted", 2: "ExecutionFailed", 3: "ExecutionTerminated",
    4: "TaskScheduled", 5: "TaskCompleted", 6: "TaskFailed", 7: "SubOrchestrationInstanceCreated",
    8: "SubOrchestrationInstanceCompleted", 9: "SubOrchestrationInstanceFailed", 10: "TimerCreated",
    11: "TimerFired", 12: "OrchestratorStarted", 13: "OrchestratorCompleted", 14: "EventSent",
    15: "EventRaised", 16: "ContinueAsNew",
}

# Action types (azure/durable_functions/models/actions/ActionType.py).
CALL_ACTIVITY, CALL_ACTIVITY_RETRY, CALL_SUB, CALL_SUB_RETRY = 0, 1, 2, 3
CONTINUE_AS_NEW, CREATE_TIMER, WAIT_FOR_EVENT = 4, 5, 6
UNSUPPORTED_ACTIONS = {7: "CallEntity", 8: "CallHttp", 9: "SignalEntity"}
ACTION_NAMES = {
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


def ts(value: dt.datetime) -> str:
    """History timestamp (the SDK's DATETIME_STRING_FORMAT)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso(value: dt.datetime) -> str:
    """Status-query timestamp, as the extension writes it (second precision, Z suffix)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def history_event(event_type: int, event_id: int = -1, **fields: Any) -> dict[str, Any]:
    # Timestamp is stamped when the event joins the history (see Driver._episode).
    return {"EventType": event_type, "EventId": event_id, "IsPlayed": False, "Timestamp": "", **fields}


def execution_started(name: str, instance_id: str, execution_id: str, input_token: Any, generation: int,
                      parent: Parent | None = None) -> dict[str, Any]:
    """ExecutionStarted with every field DTFx writes (the SDK reads Name/Version/Input; the rest keeps the
    shape real: ParentInstance for sub-orchestrations, Generation counting continue-as-new)."""
    parent_instance = None if parent is None else {
        "Name": parent.instance.name, "Version": "", "TaskScheduleId": parent.task_id,
        "OrchestrationInstance": {"InstanceId": parent.instance.instance_id, "ExecutionId": parent.execution_id},
    }
    return history_event(
        EXECUTION_STARTED, Name=name, Version="",
        Input=None if input_token is None else json.dumps(input_token),  # the JSON token, as text
        OrchestrationInstance={"InstanceId": instance_id, "ExecutionId": execution_id},
        ParentInstance=parent_instance, Tags=None, Correlation=None, ParentTraceContext=None,
        ScheduledStartTime=None, Generation=generation)


def flatten_actions(actions: Any) -> list[dict[str, Any]]:
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


def describe_action(action: dict[str, Any]) -> tuple[int, str | None]:
    """What the host compares on replay: the action type and the scheduled name (not inputs)."""
    kind = int(action.get("actionType", -1))
    if kind in (CALL_ACTIVITY, CALL_ACTIVITY_RETRY, CALL_SUB, CALL_SUB_RETRY):
        return kind, action.get("functionName")
    if kind == WAIT_FOR_EVENT:
        return kind, action.get("externalEventName")
    return kind, None


def describe_action_text(desc: tuple[int, str | None]) -> str:
    kind, name = desc
    label = ACTION_NAMES.get(kind, f"action type {kind}")
    return f"a {label} named '{name}'" if name is not None else f"a {label}"


def split_out_of_proc_error(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """The SDK raises ``Exception("msg\\n\\n$OutOfProcData$:{state json}")`` on an uncaught error."""
    text = str(exc)
    message, sep, state_json = text.partition(OUT_OF_PROC_MARKER)
    state: dict[str, Any] = {}
    if sep:
        with contextlib.suppress(ValueError):
            state = json.loads(state_json)
    return message, state


def parse_time(value: str) -> dt.datetime:
    from dateutil.parser import parse  # dependency of azure-functions-durable

    parsed = parse(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass
class Timer:
    fire_at: dt.datetime
    deadline: float  # time.monotonic() at which it fires (scaled); inf in virtual-time mode
    retry: bool = False  # the wait after a failed attempt of a retried call


@dataclass(eq=False)  # compared by identity: the driver picks items out of the ready list
class Ready:
    """An event waiting to be delivered in an episode; ``terminate`` marks a terminate request."""

    event: dict[str, Any]
    terminate: tuple[str, bool] | None = None  # (reason, recursive)


@dataclass
class Execution:
    """State of one execution (a continue-as-new starts a new one)."""

    generation: int
    input_token: Any
    execution_id: str
    shim: Shim
    history: list[dict[str, Any]] = field(default_factory=list)
    played: int = 0
    task_kind: dict[int, int] = field(default_factory=dict)  # task id -> CALL_ACTIVITY / CALL_SUB
    timers: dict[int, Timer] = field(default_factory=dict)
    ready: list[Ready] = field(default_factory=list)
    in_flight: set[int] = field(default_factory=set)  # activities / sub-orchestrations running


@dataclass
class Parent:
    instance: Instance
    generation: int
    task_id: int
    execution_id: str = ""


@dataclass
class Instance:
    instance_id: str
    name: str
    input_token: Any
    created: dt.datetime
    parent: Parent | None = None
    runtime_status: str = "Pending"
    custom_status: Any = None
    output: Any = None
    last_updated: dt.datetime | None = None
    skew: dt.timedelta = dt.timedelta(0)
    generation: int = 0
    execution_id: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    inbox: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    stop: bool = False
    children: list[Instance] = field(default_factory=list)
