"""One orchestration instance's life in the local host: wait for work, replay its history through the real
SDK, check determinism, start what the extension would start (numbered by :class:`local.durable_shim.Shim`)
and record the outcome.

Delivery: by default, events go to the orchestrator in the order they arrived, up to 32 per episode. With an
event seed (``LocalDurableHost(event_seed=N)`` or ``DURABLE_EVENT_SEED``) each episode takes a random number
of the ready events in a random order, sometimes lingers a moment so that more complete together, and in
virtual time lets a retry's timer fire while other work is still running: the extension promises no order
between events, and an orchestrator must not depend on one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import queue
import random
import time
import traceback
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import azure.functions as func

from local.durable_shim import Shim, ShimError, Work
from local.durable_state import (
    ACTIVE_STATUSES,
    CALL_ACTIVITY,
    CALL_ACTIVITY_RETRY,
    CALL_SUB,
    CONTINUE_AS_NEW_EVENT,
    CREATE_TIMER,
    CUSTOM_STATUS_LIMIT_BYTES,
    EVENT_RAISED,
    EXECUTION_COMPLETED,
    EXECUTION_TERMINATED,
    MAX_EVENTS_PER_EPISODE,
    ORCHESTRATOR_COMPLETED,
    ORCHESTRATOR_STARTED,
    SUB_COMPLETED,
    SUB_CREATED,
    SUB_FAILED,
    TASK_COMPLETED,
    TASK_FAILED,
    TASK_SCHEDULED,
    TIMER_CREATED,
    TIMER_FIRED,
    DurableHostError,
    Execution,
    Instance,
    Parent,
    Ready,
    Timer,
    execution_started,
    flatten_actions,
    history_event,
    parse_time,
    split_out_of_proc_error,
    ts,
)

if TYPE_CHECKING:
    from local.durable_host import LocalDurableHost

# DTFx OrchestrationStatus values written in ExecutionCompleted / ContinueAsNew events.
STATUS_COMPLETED, STATUS_CONTINUED_AS_NEW, STATUS_FAILED = 1, 2, 3
STUCK = ("LocalDurableHost: the orchestrator waits for a task, but nothing it started is still running and no "
         "timer or external event is pending: the SDK and the Durable extension disagree about task ids (e.g. "
         "call_activity_with_retry inside task_all, where one call failed for good while another was being "
         "retried). On Azure this instance would stay Running forever.")


class Driver:
    """Drives one orchestration instance on its own thread, episode by episode."""

    def __init__(self, host: LocalDurableHost, inst: Instance) -> None:
        self.host = host
        self.inst = inst
        self.entry = host.orchestrators[inst.name]
        # Seeded per instance, so one seed gives each instance its own (reproducible) choices.
        self.rng = None if host.event_seed is None else random.Random(f"{host.event_seed}/{inst.instance_id}")

    # -------------------------------------------------------------- main loop
    def run(self) -> None:
        inst, host = self.inst, self.host
        exe = self._new_execution(inst.input_token)
        items = [self._started(exe)]
        try:
            while True:
                cut = next((i for i, item in enumerate(items) if item.terminate), len(items))
                terminate = items[cut].terminate if cut < len(items) else None
                if cut:  # the events before a terminate request still make an episode
                    outcome = self._episode(exe, items[:cut])
                    if outcome == "stop":
                        return
                    if isinstance(outcome, Execution):
                        exe = outcome
                        items = [self._started(exe), *items[cut:]]
                        continue
                if terminate is not None:
                    with host._lock:
                        host._terminate_now(inst, *terminate)
                    return
                batch = self._next_batch(exe)
                if batch is None:
                    return
                items = batch
        except Exception as exc:  # a host bug must not leave the instance Running forever
            with host._lock:
                if inst.runtime_status in ACTIVE_STATUSES:
                    message = f"LocalDurableHost internal error: {type(exc).__name__}: {exc}"
                    host._finish(inst, "Failed", message, failure=(message, traceback.format_exc()))

    def _new_execution(self, input_token: Any) -> Execution:
        with self.host._lock:
            self.inst.generation += 1
            exe = Execution(self.inst.generation, input_token, uuid.uuid4().hex, Shim())
            self.inst.history = exe.history
            self.inst.input_token = input_token
            self.inst.execution_id = exe.execution_id
            return exe

    def _started(self, exe: Execution) -> Ready:
        inst = self.inst
        return Ready(execution_started(inst.name, inst.instance_id, exe.execution_id, exe.input_token,
                                       exe.generation - 1, inst.parent))

    # -------------------------------------------------------------- waiting for work
    def _next_batch(self, exe: Execution) -> list[Ready] | None:
        inst, lingered = self.inst, False
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
                if self.rng is not None and exe.in_flight and not lingered and self.rng.random() < 0.5:
                    lingered = True  # let a few more completions arrive, to batch them in one episode
                    until = time.monotonic() + self.rng.choice((0.001, 0.005, 0.02))
                    while (left := until - time.monotonic()) > 0:
                        with contextlib.suppress(queue.Empty):
                            self._accept(exe, inst.inbox.get(timeout=left))
                    continue
                return self._take_batch(exe)
            deadline = min((t.deadline for t in exe.timers.values()), default=math.inf)
            timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(queue.Empty):
                self._accept(exe, inst.inbox.get(timeout=timeout))

    def _take_batch(self, exe: Execution) -> list[Ready]:
        """Up to 32 ready events; a terminate request ends the batch (what follows it is never delivered)."""
        ready = exe.ready
        stop = next((item for item in ready if item.terminate), None)
        if self.rng is None:
            if stop is not None:
                exe.ready = []
                return ready[:ready.index(stop) + 1]
            exe.ready = ready[MAX_EVENTS_PER_EPISODE:]
            return ready[:MAX_EVENTS_PER_EPISODE]
        others = [item for item in ready if item is not stop]
        self.rng.shuffle(others)
        if stop is not None:  # terminate at this boundary, after a random share of the other events
            exe.ready = []
            return [*others[:self.rng.randint(0, min(len(others), MAX_EVENTS_PER_EPISODE - 1))], stop]
        batch = others[:self.rng.randint(1, min(len(others), MAX_EVENTS_PER_EPISODE))]
        taken = set(map(id, batch))
        exe.ready = [item for item in ready if id(item) not in taken]
        return batch

    def _accept(self, exe: Execution, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "event":
            _, name, input_json = msg
            exe.ready.append(Ready(history_event(EVENT_RAISED, Name=name, Input=input_json)))
        elif kind == "terminate":
            _, reason, recursive = msg
            exe.ready.append(Ready(history_event(EXECUTION_TERMINATED, Input=json.dumps(reason)),
                                   terminate=(reason, recursive)))
        elif kind == "task":
            _, generation, task_id, ok, payload = msg
            if generation != exe.generation or task_id not in exe.in_flight:
                return  # result of a previous execution (continue-as-new) or unknown: ignored
            exe.in_flight.discard(task_id)
            is_sub = exe.task_kind[task_id] == CALL_SUB
            if ok:
                event = history_event(SUB_COMPLETED if is_sub else TASK_COMPLETED, TaskScheduledId=task_id,
                                      Result=payload)
            else:
                reason, details = payload
                event = history_event(SUB_FAILED if is_sub else TASK_FAILED, TaskScheduledId=task_id,
                                      Reason=reason, Details=details)
            exe.ready.append(Ready(event))

    def _fire_due_timers(self, exe: Execution) -> None:
        now_mono = time.monotonic()
        due = sorted((t.fire_at, task_id) for task_id, t in exe.timers.items() if t.deadline <= now_mono)
        if not due and exe.timers and self.host.timer_scale == 0:
            if not exe.in_flight and not exe.ready:  # virtual time: idle, jump to the earliest timer
                first = min(t.fire_at for t in exe.timers.values())
                due = sorted((t.fire_at, task_id) for task_id, t in exe.timers.items() if t.fire_at == first)
            elif self.rng is not None and self.rng.random() < 0.3:  # a retry's wait may end before others' work
                retries = sorted((t.fire_at, task_id) for task_id, t in exe.timers.items() if t.retry)
                due = [self.rng.choice(retries)] if retries else []
        for fire_at, task_id in due:
            del exe.timers[task_id]
            with self.host._lock:
                now = self.host._now(self.inst)
                if fire_at > now:  # fired early: move this orchestration's clock to the fire time
                    self.inst.skew += fire_at - now
            exe.ready.append(Ready(history_event(TIMER_FIRED, TimerId=task_id, FireAt=ts(fire_at))))

    # -------------------------------------------------------------- one episode
    def _episode(self, exe: Execution, items: list[Ready]) -> str | Execution:
        host, inst = self.host, self.inst
        with host._lock:
            if inst.stop:
                return "stop"
            now = host._now(inst)
            for event in exe.history[exe.played:]:
                event["IsPlayed"] = True
            exe.played = len(exe.history)
            stamp = ts(now)
            exe.history.append(history_event(ORCHESTRATOR_STARTED, Timestamp=stamp))
            for item in items:
                item.event["Timestamp"] = stamp
                exe.history.append(item.event)
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
            error, state = split_out_of_proc_error(exc)
            error = error or type(exc).__name__

        with host._lock:
            if inst.stop or inst.runtime_status not in ACTIVE_STATUSES:
                return "stop"
            return self._apply(exe, state, error, now, items)

    def _apply(self, exe: Execution, state: dict[str, Any], error: str | None, now: dt.datetime,
               items: list[Ready]) -> str | Execution:
        inst = self.inst
        inst.last_updated = now
        if "customStatus" in state:  # omitted when falsy: a falsy value never replaces the last one
            custom = state["customStatus"]
            size = len(json.dumps(custom).encode("utf-16-le"))
            if size > CUSTOM_STATUS_LIMIT_BYTES:
                return self._fail(exe, now, [], f"The UTF-16 size of the JSON-serialized custom status must not "
                                                f"exceed 16 KB; it is {size / 1024:.1f} KB.")
            inst.custom_status = custom
        if error is not None and not state:  # no action list to act on (not the SDK's out-of-proc error)
            return self._fail(exe, now, [], error)

        # The extension first replays the action list (starting what is new), then acts on error/isDone.
        actions = state.get("actions", [])
        flat = flatten_actions(actions)
        mismatch = exe.shim.mismatch(flat, allow_shorter=error is not None)
        if mismatch is not None:
            return self._fail(exe, now, [], mismatch)
        try:
            exe.shim.update(actions, flat)
            for item in items:
                exe.shim.on_event(item.event)
        except ShimError as exc:
            return self._fail(exe, now, [], str(exc))
        new_events: list[dict[str, Any]] = []
        dispatch: list[Callable[[], None]] = []
        continue_input: Any = None
        continued = False
        for work in exe.shim.take_work():
            if work.op == "continue":
                continued, continue_input = True, work.action.get("input")
            else:
                self._start(exe, work, now, new_events, dispatch)
        for action, (_, task_id) in zip(flat, exe.shim.issued, strict=False):
            if int(action.get("actionType", -1)) == CREATE_TIMER and action.get("isCanceled") and task_id is not None:
                exe.timers.pop(task_id, None)  # cancelled by the orchestrator: it never fires
        for start_work in dispatch:  # the episode's messages go out whatever it decided
            start_work()

        if exe.shim.finished:  # every action started has completed: the extension acts on the outcome
            if error is not None:
                return self._fail(exe, now, new_events, error)
            if continued:
                self._commit(exe, now, new_events, history_event(
                    CONTINUE_AS_NEW_EVENT, Result=continue_input, OrchestrationStatus=STATUS_CONTINUED_AS_NEW))
                # As the Azure Storage backend does: the new execution starts with no custom status, and its start
                # becomes the instance's created time (until it sets a status, a client reads null there).
                inst.custom_status, inst.created = None, now  # (under the host's lock, as all of _apply)
                return self._new_execution(continue_input)
            if state.get("isDone"):
                output = state.get("output")
                self._commit(exe, now, new_events, history_event(
                    EXECUTION_COMPLETED, Result=json.dumps(output), OrchestrationStatus=STATUS_COMPLETED))
                self.host._finish(inst, "Completed", output)
                return "stop"
        # Still waiting: for an action the extension started (a WhenAll waits for all its tasks, even after
        # the SDK's task_all failed), or for a task yielded again that is still running. If nothing can
        # ever wake the instance, say so now: on Azure it would hang.
        if self._stuck(exe):
            return self._fail(exe, now, new_events, error or STUCK)
        return self._commit(exe, now, new_events)

    def _commit(self, exe: Execution, now: dt.datetime, new_events: list[dict[str, Any]],
                last: dict[str, Any] | None = None) -> str:
        """Close the episode in the history: what it started, how it ended, OrchestratorCompleted."""
        events = [*new_events, *([last] if last else []), history_event(ORCHESTRATOR_COMPLETED)]
        for event in events:
            event["Timestamp"] = ts(now)
        exe.history.extend(events)
        return "continue"

    def _stuck(self, exe: Execution) -> bool:
        return not (exe.in_flight or exe.timers or exe.ready or exe.shim.waits_for_event
                    or not self.inst.inbox.empty())

    def _start(self, exe: Execution, work: Work, now: dt.datetime, events: list[dict[str, Any]],
               dispatch: list[Callable[[], None]]) -> None:
        """Record and queue one piece of work the extension started (``dispatch`` runs it after the episode)."""
        action, task_id = work.action, work.task_id
        assert task_id is not None
        if work.op == "timer":
            fire_at = parse_time(action["fireAt"])
            if not action.get("isCanceled"):
                exe.timers[task_id] = Timer(fire_at, self.host._deadline(fire_at - now))
            events.append(history_event(TIMER_CREATED, task_id, FireAt=ts(fire_at)))
            return
        if work.op == "retry_timer":
            options = action.get("retryOptions") or {}
            interval = dt.timedelta(milliseconds=options.get("firstRetryIntervalInMilliseconds", 1000))
            exe.timers[task_id] = Timer(now + interval, self.host._deadline(interval), retry=True)
            events.append(history_event(TIMER_CREATED, task_id, FireAt=ts(now + interval)))
            return
        kind = CALL_ACTIVITY if int(action["actionType"]) in (CALL_ACTIVITY, CALL_ACTIVITY_RETRY) else CALL_SUB
        host, inst, generation, name = self.host, self.inst, exe.generation, action["functionName"]
        input_json = action.get("input")
        exe.task_kind[task_id] = kind
        exe.in_flight.add(task_id)
        if kind == CALL_ACTIVITY:
            events.append(history_event(TASK_SCHEDULED, task_id, Name=name, Version="", Input=input_json))
            dispatch.append(lambda: host._pool.submit(host._run_activity, inst, generation, task_id, name,
                                                      input_json))
            return
        child_id = action.get("instanceId") or f"{inst.instance_id}:{task_id}"
        events.append(history_event(SUB_CREATED, task_id, Name=name, InstanceId=child_id, Version="",
                                    Input=input_json))
        parent = Parent(inst, generation, task_id, exe.execution_id)

        def start_child() -> None:
            try:
                host._create_instance(name, input_json, child_id, parent)
            except DurableHostError as exc:
                inst.inbox.put(("task", generation, task_id, False, (str(exc), "")))

        dispatch.append(start_child)

    def _fail(self, exe: Execution, now: dt.datetime, new_events: list[dict[str, Any]], message: str) -> str:
        inst = self.inst
        output = f"Orchestrator function '{inst.name}' failed: {message}"
        self._commit(exe, now, new_events, history_event(
            EXECUTION_COMPLETED, Result=json.dumps(output), OrchestrationStatus=STATUS_FAILED))
        self.host._finish(inst, "Failed", output, failure=(output, ""))
        return "stop"
