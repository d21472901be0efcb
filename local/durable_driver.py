"""One orchestration instance's life in the local host: wait for work, replay its history through the real
SDK, check determinism, apply the actions it returns (activities, timers, sub-orchestrations, retries,
continue-as-new) and record the outcome.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import queue
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any

import azure.functions as func

from local.durable_state import (
    ACTIVE_STATUSES,
    CALL_ACTIVITY,
    CALL_ACTIVITY_RETRY,
    CALL_SUB,
    CALL_SUB_RETRY,
    CONTINUE_AS_NEW,
    CONTINUE_AS_NEW_EVENT,
    CREATE_TIMER,
    CUSTOM_STATUS_LIMIT_BYTES,
    EVENT_RAISED,
    EXECUTION_STARTED,
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
    UNSUPPORTED_ACTIONS,
    WAIT_FOR_EVENT,
    DurableHostError,
    Execution,
    Instance,
    Parent,
    Ready,
    Retry,
    Timer,
    describe_action,
    describe_action_text,
    flatten_actions,
    history_event,
    parse_time,
    split_out_of_proc_error,
    ts,
)

if TYPE_CHECKING:
    from local.durable_host import LocalDurableHost


class Driver:
    """Drives one orchestration instance on its own thread, episode by episode."""

    def __init__(self, host: LocalDurableHost, inst: Instance) -> None:
        self.host = host
        self.inst = inst
        entry = host.orchestrators[inst.name]
        self.entry = entry

    # -------------------------------------------------------------- main loop
    def run(self) -> None:
        inst, host = self.inst, self.host
        exe = self._new_execution(inst.input_token)
        items = [Ready(history_event(EXECUTION_STARTED, Name=inst.name, Version="",
                               Input=None if inst.input_token is None else json.dumps(inst.input_token),
                               OrchestrationInstance={"InstanceId": inst.instance_id,
                                                      "ExecutionId": uuid.uuid4().hex}))]
        try:
            while True:
                outcome = self._episode(exe, items)
                if outcome == "stop":
                    return
                if isinstance(outcome, Execution):
                    exe = outcome
                    items = [Ready(history_event(EXECUTION_STARTED, Name=inst.name, Version="",
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

    def _new_execution(self, input_token: Any) -> Execution:
        with self.host._lock:
            self.inst.generation += 1
            exe = Execution(self.inst.generation, input_token)
            self.inst.history = exe.history
            self.inst.input_token = input_token
            return exe

    # -------------------------------------------------------------- waiting for work
    def _next_batch(self, exe: Execution) -> list[Ready] | None:
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
    def _take_batch(exe: Execution) -> list[Ready]:
        """Up to 32 events; at most one id-allocating event, and it goes first.

        The SDK gives a failed retry attempt's timer (and the next attempt) the next task id at the
        moment it processes that event, interleaved with ids the generator takes; delivering it first
        in its episode makes that id exactly the host's next id.
        """
        first = next((item for item in exe.ready if item.allocates), None)
        batch = [first] if first is not None else []
        rest: list[Ready] = []
        for item in exe.ready:
            if item is first:
                continue
            if not item.allocates and len(batch) < MAX_EVENTS_PER_EPISODE:
                batch.append(item)
            else:
                rest.append(item)
        exe.ready = rest
        return batch

    def _accept(self, exe: Execution, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "event":
            _, name, input_json = msg
            exe.ready.append(Ready(history_event(EVENT_RAISED, Name=name, Input=input_json)))
        elif kind == "task":
            _, generation, task_id, ok, payload = msg
            if generation != exe.generation or task_id not in exe.task_kind:
                return  # result of a previous execution (continue-as-new) or unknown: ignored
            exe.in_flight.discard(task_id)
            is_sub = exe.task_kind[task_id] == CALL_SUB
            if ok:
                event = history_event(SUB_COMPLETED if is_sub else TASK_COMPLETED, TaskScheduledId=task_id,
                               Result=payload)
                exe.ready.append(Ready(event))
                return
            reason, details = payload
            event = history_event(SUB_FAILED if is_sub else TASK_FAILED, TaskScheduledId=task_id, Reason=reason,
                           Details=details)
            retry = exe.retry_of.get(task_id)
            if retry is None:
                exe.ready.append(Ready(event))
            else:
                exe.ready.append(Ready(event, allocates=True,
                                        hook=lambda: self._schedule_retry_timer(exe, retry)))

    def _fire_due_timers(self, exe: Execution) -> None:
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
            event = history_event(TIMER_FIRED, TimerId=task_id, FireAt=ts(fire_at))
            retry = timer.retry
            if retry is not None and retry.attempts < retry.max_attempts:
                exe.ready.append(Ready(event, allocates=True,
                                        hook=lambda r=retry: self._schedule_retry_attempt(exe, r)))
            else:
                exe.ready.append(Ready(event))

    # -------------------------------------------------------------- retries (the SDK's RetryAbleTask)
    def _schedule_retry_timer(self, exe: Execution, retry: Retry) -> None:
        # After every failed attempt, including the last, the host waits on a timer (DTFx
        # RetryInterceptor); the SDK takes the next id for it and fails the task when it fires.
        timer_id = exe.allocate()
        fire_at = self.host._now(self.inst) + retry.first_interval
        exe.timers[timer_id] = Timer(fire_at, self.host._deadline(retry.first_interval), retry)
        exe.post_events.append(history_event(TIMER_CREATED, timer_id, FireAt=ts(fire_at)))

    def _schedule_retry_attempt(self, exe: Execution, retry: Retry) -> None:
        task_id = exe.allocate()
        retry.attempts += 1
        exe.retry_of[task_id] = retry
        self._schedule_call(exe, task_id, retry.kind, retry.name, retry.input, retry.instance_id)

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
            error, state = split_out_of_proc_error(exc)
            error = error or type(exc).__name__

        with host._lock:
            if inst.stop or inst.runtime_status not in ACTIVE_STATUSES:
                return "stop"
            return self._apply(exe, state, error, now)

    def _apply(self, exe: Execution, state: dict[str, Any], error: str | None,
               now: dt.datetime) -> str | Execution:
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

        actions = flatten_actions(state.get("actions", []))
        if error is None:
            error = self._check_determinism(exe, actions)
        if error is not None:
            return self._fail(exe, error)

        new_events: list[dict[str, Any]] = list(exe.post_events)
        exe.post_events.clear()
        continue_input: Any = None
        continued = False
        for action in actions[len(exe.scheduled):]:
            desc = describe_action(action)
            kind = desc[0]
            if kind in UNSUPPORTED_ACTIONS:
                return self._fail(exe, f"LocalDurableHost does not support {UNSUPPORTED_ACTIONS[kind]} "
                                       "actions.")
            task_id = None if kind == WAIT_FOR_EVENT else exe.allocate()
            exe.scheduled.append((desc, task_id))
            if task_id is None:
                continue
            if kind == CREATE_TIMER:
                fire_at = parse_time(action["fireAt"])
                if not action.get("isCanceled"):
                    exe.timers[task_id] = Timer(fire_at, host._deadline(fire_at - now))
                new_events.append(history_event(TIMER_CREATED, task_id, FireAt=ts(fire_at)))
            elif kind == CONTINUE_AS_NEW:
                continued, continue_input = True, action.get("input")
            else:
                base_kind = CALL_ACTIVITY if kind in (CALL_ACTIVITY, CALL_ACTIVITY_RETRY) else CALL_SUB
                if kind in (CALL_ACTIVITY_RETRY, CALL_SUB_RETRY):
                    options = action.get("retryOptions") or {}
                    exe.retry_of[task_id] = Retry(
                        base_kind, action["functionName"], action.get("input"), action.get("instanceId"),
                        dt.timedelta(milliseconds=options.get("firstRetryIntervalInMilliseconds", 1000)),
                        int(options.get("maxNumberOfAttempts", 1)))
                self._schedule_call(exe, task_id, base_kind, action["functionName"], action.get("input"),
                                    action.get("instanceId"), new_events)
        self._drop_cancelled_timers(exe, actions)
        for event in new_events:
            event["Timestamp"] = ts(now)
        exe.history.extend(new_events)
        exe.history.append(history_event(ORCHESTRATOR_COMPLETED, Timestamp=ts(now)))

        if continued:
            exe.history.append(history_event(CONTINUE_AS_NEW_EVENT, Input=continue_input, Timestamp=ts(now)))
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

    def _schedule_call(self, exe: Execution, task_id: int, kind: int, name: str, input_json: str | None,
                       instance_id: str | None, events: list[dict[str, Any]] | None = None) -> None:
        """Record TaskScheduled / SubOrchestrationInstanceCreated and queue the work to start."""
        events = exe.post_events if events is None else events
        exe.task_kind[task_id] = kind
        exe.in_flight.add(task_id)
        host, inst, generation = self.host, self.inst, exe.generation
        if kind == CALL_ACTIVITY:
            events.append(history_event(TASK_SCHEDULED, task_id, Name=name, Version="", Input=input_json))
            exe.dispatch.append(lambda: host._pool.submit(host._run_activity, inst, generation, task_id,
                                                          name, input_json))
            return
        child_id = instance_id or f"{inst.instance_id}:{task_id}"
        events.append(history_event(SUB_CREATED, task_id, Name=name, InstanceId=child_id, Version="",
                             Input=input_json))

        def start_child() -> None:
            try:
                host._create_instance(name, input_json, child_id, Parent(inst, generation, task_id))
            except DurableHostError as exc:
                inst.inbox.put(("task", generation, task_id, False, (str(exc), "")))

        exe.dispatch.append(start_child)

    @staticmethod
    def _check_determinism(exe: Execution, actions: list[dict[str, Any]]) -> str | None:
        for index, (desc, task_id) in enumerate(exe.scheduled):
            where = f"with sequence ID {task_id}" if task_id is not None else f"at position {index}"
            if index >= len(actions):
                return (f"Non-Deterministic workflow detected: A previous execution of this orchestration "
                        f"scheduled {describe_action_text(desc)} {where}, but the current replay execution "
                        f"hasn't (yet?) scheduled this task. Was a change made to the orchestrator code "
                        f"after this instance had already started running?")
            now_desc = describe_action(actions[index])
            if now_desc != desc:
                return (f"Non-Deterministic workflow detected: A previous execution of this orchestration "
                        f"scheduled {describe_action_text(desc)} {where}, but the current replay execution "
                        f"scheduled {describe_action_text(now_desc)} instead. Was a change made to the "
                        f"orchestrator code after this instance had already started running?")
        return None

    @staticmethod
    def _drop_cancelled_timers(exe: Execution, actions: list[dict[str, Any]]) -> None:
        for action, (desc, task_id) in zip(actions, exe.scheduled, strict=False):
            if desc[0] == CREATE_TIMER and action.get("isCanceled") and task_id in exe.timers:
                del exe.timers[task_id]

    def _fail(self, exe: Execution, message: str) -> str:
        inst = self.inst
        output = f"Orchestrator function '{inst.name}' failed: {message}"
        exe.history.append(history_event(ORCHESTRATOR_COMPLETED, Timestamp=ts(self.host._now(inst))))
        exe.dispatch.clear()
        self.host._finish(inst, "Failed", output, failure=(output, ""))
        return "stop"
