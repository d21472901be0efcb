"""LocalDurableHost drives real Durable SDK orchestrators of a toy DFApp defined here."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
import uuid
from collections import defaultdict

import azure.durable_functions as df
import azure.functions as func
import pytest
from azure.durable_functions import DurableOrchestrationClient, OrchestrationRuntimeStatus, RetryOptions

from local.durable_host import (
    InstanceAlreadyRunningError,
    LocalDurableHost,
    UnknownFunctionError,
    close_client_session,
)
from orchestrators import stylize_video as stylize_module

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)

GATES: defaultdict[str, threading.Event] = defaultdict(threading.Event)  # activity waits on it
ENTERED: defaultdict[str, threading.Event] = defaultdict(threading.Event)  # activity has started
COUNTERS: defaultdict[str, int] = defaultdict(int)
RECORDED: list[str] = []
NONDET_RUNS: defaultdict[str, int] = defaultdict(int)  # orchestrator invocations per instance


# ----------------------------------------------------------------------------- activities
@app.activity_trigger(input_name="name")
def hello(name: str) -> str:
    return f"Hello {name}"


@app.activity_trigger(input_name="n")
def square(n: int) -> int:
    return n * n


@app.activity_trigger(input_name="n")
async def async_double(n: int) -> int:
    await asyncio.sleep(0)
    return 2 * n


@app.activity_trigger(input_name="message")
def explode(message: str) -> None:
    raise ValueError(message)


@app.activity_trigger(input_name="key")
def flaky(key: str) -> int:
    COUNTERS[key] += 1
    if COUNTERS[key] < 3:
        raise RuntimeError(f"attempt {COUNTERS[key]} of {key} failed")
    return COUNTERS[key]


@app.activity_trigger(input_name="key")
def poll(key: str) -> int:
    COUNTERS[key] += 1
    return COUNTERS[key]


@app.activity_trigger(input_name="key")
def gate(key: str) -> str:
    ENTERED[key].set()
    GATES[key].wait(10)
    return f"{key} opened"


@app.activity_trigger(input_name="key")
def record(key: str) -> str:
    RECORDED.append(key)
    return key


@app.activity_trigger(input_name="key")
def gate_then_fail(key: str) -> str:
    """The first call waits for its gate and fails; later calls succeed."""
    COUNTERS[key] += 1
    if COUNTERS[key] == 1:
        ENTERED[key].set()
        GATES[key].wait(10)
        raise RuntimeError(f"{key} failed once")
    return key


# ----------------------------------------------------------------------------- orchestrators
@app.orchestration_trigger(context_name="context")
def sequence(context: df.DurableOrchestrationContext):
    first = yield context.call_activity("hello", "Tokyo")
    second = yield context.call_activity(hello, {"city": "Seattle"})
    third = yield context.call_activity("async_double", 21)
    return [first, second, third]


@app.orchestration_trigger(context_name="context")
def fan_out(context: df.DurableOrchestrationContext):
    count = context.get_input()
    results = yield context.task_all([context.call_activity("square", i) for i in range(count)])
    return results


@app.orchestration_trigger(context_name="context")
def catch_failure(context: df.DurableOrchestrationContext):
    try:
        yield context.call_activity("explode", "bad input")
    except Exception as exc:
        return f"caught: {exc}"
    return "not reached"


@app.orchestration_trigger(context_name="context")
def uncaught_failure(context: df.DurableOrchestrationContext):
    yield context.call_activity("hello", "before")
    yield context.call_activity("explode", "kaboom")
    return "not reached"


@app.orchestration_trigger(context_name="context")
def with_retry(context: df.DurableOrchestrationContext):
    args = context.get_input()
    options = RetryOptions(first_retry_interval_in_milliseconds=5000, max_number_of_attempts=args["attempts"])
    result = yield context.call_activity_with_retry("flaky", options, args["key"])
    after = yield context.call_activity("hello", "after retries")
    return [result, after]


@app.orchestration_trigger(context_name="context")
def monitor(context: df.DurableOrchestrationContext):
    key = context.get_input()
    started = context.current_utc_datetime
    expiry = started + dt.timedelta(hours=1)
    while context.current_utc_datetime < expiry:
        polls = yield context.call_activity("poll", key)
        if polls >= 4:
            minutes = (context.current_utc_datetime - started).total_seconds() / 60
            return {"polls": polls, "minutes": round(minutes, 3)}
        yield context.create_timer(context.current_utc_datetime + dt.timedelta(minutes=10))
    return {"polls": -1}


@app.orchestration_trigger(context_name="context")
def gated(context: df.DurableOrchestrationContext):
    key = context.get_input()
    context.set_custom_status({"stage": "waiting", "key": key})
    opened = yield context.call_activity("gate", key)
    context.set_custom_status({"stage": "recording"})
    yield context.call_activity("record", key)
    context.set_custom_status({"stage": "done"})
    return opened


@app.orchestration_trigger(context_name="context")
def paused_episode(context: df.DurableOrchestrationContext):
    key = context.get_input()
    yield context.call_activity("hello", key)
    if not context.is_replaying:  # hold this episode open while the test asks for termination
        ENTERED[f"{key}-episode"].set()
        GATES[f"{key}-episode"].wait(10)
    yield context.call_activity("record", key)
    yield context.wait_for_external_event("never sent")
    return "not reached"


@app.orchestration_trigger(context_name="context")
def schedule_then_raise(context: df.DurableOrchestrationContext):
    yield context.wait_for_external_event("ready")
    started = context.call_activity("record", context.get_input())
    # "cancel" was raised before anyone waited for it: both the SDK and the extension hold it, so this
    # task_any completes in the episode that starts `record`, and the orchestrator raises in that episode.
    yield context.task_any([started, context.wait_for_external_event("cancel")])
    raise ValueError("gave up")


@app.orchestration_trigger(context_name="context")
def retries_in_task_all(context: df.DurableOrchestrationContext):
    options = RetryOptions(first_retry_interval_in_milliseconds=1000, max_number_of_attempts=3)
    try:
        results = yield context.task_all([context.call_activity_with_retry("explode", options, "always"),
                                          context.call_activity_with_retry("gate_then_fail", options,
                                                                           context.get_input())])
    except Exception:
        context.set_custom_status("task_all failed")
        after = yield context.call_activity("hello", "after the failure")
        return {"failed": True, "after": after}
    return {"results": results}


@app.orchestration_trigger(context_name="context")
def cancelled_wait(context: df.DurableOrchestrationContext):
    timer = context.create_timer(context.current_utc_datetime + dt.timedelta(minutes=5))
    timer.cancel()
    yield timer  # a cancelled timer never fires: nothing can wake this orchestration again
    return "not reached"


@app.orchestration_trigger(context_name="context")
def nondeterministic(context: df.DurableOrchestrationContext):
    NONDET_RUNS[context.instance_id] += 1
    if NONDET_RUNS[context.instance_id] == 1:  # differs between the first run and its replay
        yield context.call_activity("hello", "first")
    else:
        yield context.call_activity("square", 2)
    return "unreachable"


@app.orchestration_trigger(context_name="context")
def counter(context: df.DurableOrchestrationContext):
    n = context.get_input()
    yield context.call_activity("hello", n)
    if n < 3:
        context.continue_as_new(n + 1)
        return None
    return f"done at {n}"


@app.orchestration_trigger(context_name="context")
def square_chunk(context: df.DurableOrchestrationContext):
    chunk = context.get_input()
    results = yield context.task_all([context.call_activity("square", n) for n in chunk])
    return results


@app.orchestration_trigger(context_name="context")
def chunked_fan_out(context: df.DurableOrchestrationContext):
    items = context.get_input()
    chunks = [items[i:i + 5] for i in range(0, len(items), 5)]
    parts = yield context.task_all([context.call_sub_orchestrator("square_chunk", c) for c in chunks])
    return [value for part in parts for value in part]


@app.orchestration_trigger(context_name="context")
def approval(context: df.DurableOrchestrationContext):
    decision = yield context.wait_for_external_event("approval")
    return {"decision": decision, "replaying": context.is_replaying}


@app.route(route="orchestrators/{name}", methods=["POST"])
@app.durable_client_input(client_name="client")
async def http_start(req: func.HttpRequest, client: DurableOrchestrationClient) -> func.HttpResponse:
    instance_id = await client.start_new(req.route_params["name"], client_input=req.get_json())
    return client.create_check_status_response(req, instance_id)


# ----------------------------------------------------------------------------- helpers
# None: events in arrival order; a number: seeded random delivery order, batching and retry-timer interleaving.
SEEDS = [None, 3, 17, 42]


@pytest.fixture(params=SEEDS, ids=lambda seed: "ordered" if seed is None else f"seed{seed}")
def host(request: pytest.FixtureRequest):
    with LocalDurableHost(app, max_workers=4, timer_scale=0, event_seed=request.param) as h:
        yield h
    for event in GATES.values():
        event.set()


def _key() -> str:
    return uuid.uuid4().hex[:8]


def _history(host: LocalDurableHost, instance_id: str) -> list[dict]:
    status = host.status(instance_id, show_history=True, show_history_output=True)
    assert status is not None
    return status["history"]


def _count(history: list[dict], event_type: str) -> int:
    return sum(1 for event in history if event["EventType"] == event_type)


def _wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# ----------------------------------------------------------------------------- tests
def test_sequence_of_activities(host: LocalDurableHost) -> None:
    instance_id = host.start("sequence", {"ignored": True})
    status = host.wait(instance_id, 10)
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == ["Hello Tokyo", "Hello {'city': 'Seattle'}", 42]
    assert status["name"] == "sequence"
    assert status["input"] == '{"ignored": true}'  # the client's JSON text, as the extension reports it
    history = _history(host, instance_id)
    assert history[0]["EventType"] == "OrchestratorStarted"
    assert history[1]["EventType"] == "ExecutionStarted" and history[1]["Version"] == ""
    assert [e["EventId"] for e in history if e["EventType"] == "TaskScheduled"] == [0, 1, 2]
    assert _count(history, "TaskCompleted") == 3
    assert history[-1]["EventType"] == "OrchestratorCompleted"


def test_fan_out_fan_in_keeps_order(host: LocalDurableHost) -> None:
    instance_id = host.start("fan_out", 50)
    status = host.wait(instance_id, 10)
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == [i * i for i in range(50)]
    history = _history(host, instance_id)
    assert sorted(e["EventId"] for e in history if e["EventType"] == "TaskScheduled") == list(range(50))
    assert _count(history, "TaskCompleted") == 50
    assert _count(history, "OrchestratorStarted") <= 51


def test_activity_failure_caught_and_uncaught(host: LocalDurableHost) -> None:
    caught = host.wait(host.start("catch_failure"), 10)
    assert caught["runtimeStatus"] == "Completed"
    assert caught["output"].startswith("caught: Activity function 'explode' failed: ValueError: bad input")

    failed = host.wait(host.start("uncaught_failure"), 10)
    assert failed["runtimeStatus"] == "Failed"
    assert failed["output"].startswith("Orchestrator function 'uncaught_failure' failed: ")
    assert "ValueError: kaboom" in failed["output"]
    assert "$OutOfProcData$" not in failed["output"]


def test_activity_retry_succeeds_on_third_attempt(host: LocalDurableHost) -> None:
    key = _key()
    instance_id = host.start("with_retry", {"key": key, "attempts": 3})
    status = host.wait(instance_id, 10)
    assert status["runtimeStatus"] == "Completed", status["output"]
    assert status["output"] == [3, "Hello after retries"]
    history = _history(host, instance_id)
    # attempt 0 fails -> timer 1 -> attempt 2 fails -> timer 3 -> attempt 4 succeeds -> next activity 5
    assert [e["EventId"] for e in history if e["EventType"] == "TaskScheduled"] == [0, 2, 4, 5]
    assert [e["EventId"] for e in history if e["EventType"] == "TimerCreated"] == [1, 3]
    assert _count(history, "TaskFailed") == 2

    exhausted = host.wait(host.start("with_retry", {"key": _key(), "attempts": 2}), 10)
    assert exhausted["runtimeStatus"] == "Failed"
    assert "attempt 2 of" in exhausted["output"]


def test_monitor_timer_loop_with_scaled_timers(host: LocalDurableHost) -> None:
    key = _key()
    started = time.monotonic()
    status = host.wait(host.start("monitor", key), 10)
    assert time.monotonic() - started < 5  # three 10-minute timers, scaled to zero
    assert status["runtimeStatus"] == "Completed"
    assert status["output"]["polls"] == 4
    assert 30 <= status["output"]["minutes"] < 31  # orchestration clock moved with the timers


def test_custom_status_visible_mid_run(host: LocalDurableHost) -> None:
    key = _key()
    instance_id = host.start("gated", key)
    assert ENTERED[key].wait(5)
    _wait_until(lambda: (host.status(instance_id) or {}).get("customStatus") is not None)
    running = host.status(instance_id)
    assert running["runtimeStatus"] == "Running"
    assert running["customStatus"] == {"stage": "waiting", "key": key}
    GATES[key].set()
    done = host.wait(instance_id, 10)
    assert done["runtimeStatus"] == "Completed"
    assert done["output"] == f"{key} opened"
    assert done["customStatus"] == {"stage": "done"}


def test_non_deterministic_orchestrator_fails(host: LocalDurableHost) -> None:
    status = host.wait(host.start("nondeterministic"), 10)
    assert status["runtimeStatus"] == "Failed"
    assert "Non-Deterministic workflow detected" in status["output"]
    assert "'hello'" in status["output"] and "'square'" in status["output"]
    assert "sequence ID 0" in status["output"]


def test_waiting_for_nothing_fails_instead_of_hanging(host: LocalDurableHost) -> None:
    started = time.monotonic()
    status = host.wait(host.start("cancelled_wait"), 10)
    assert time.monotonic() - started < 5
    assert status["runtimeStatus"] == "Failed"
    assert "nothing it started is still running" in status["output"]
    assert "On Azure this instance would stay Running forever" in status["output"]
    history = _history(host, status["instanceId"])
    assert [e["EventId"] for e in history if e["EventType"] == "TimerCreated"] == [0]
    assert _count(history, "TimerFired") == 0


def test_terminate_while_activity_blocks(host: LocalDurableHost) -> None:
    key = _key()
    instance_id = host.start("gated", key)
    assert ENTERED[key].wait(5)
    assert host.terminate(instance_id, "operator asked") is True
    status = host.wait(instance_id, 5)  # a queued request: Terminated at the next episode boundary
    assert status["runtimeStatus"] == "Terminated"
    assert status["output"] == "operator asked"
    GATES[key].set()  # the running activity finishes; its result must be ignored
    time.sleep(0.3)
    assert key not in RECORDED
    after = host.status(instance_id)
    assert after["runtimeStatus"] == "Terminated"
    assert after["customStatus"] == {"stage": "waiting", "key": key}
    history = _history(host, instance_id)
    assert history[-1]["EventType"] == "ExecutionTerminated"
    assert _count(history, "TaskCompleted") == 0
    assert host.terminate(instance_id, "again") is False


def test_terminate_lets_the_running_episode_finish(host: LocalDurableHost) -> None:
    """The episode in progress when terminate is asked still completes, and the work it starts still runs."""
    key = _key()
    instance_id = host.start("paused_episode", key)
    assert ENTERED[f"{key}-episode"].wait(5)
    assert host.terminate(instance_id, "stop") is True
    assert host.status(instance_id)["runtimeStatus"] == "Running"  # not until the episode ends
    GATES[f"{key}-episode"].set()
    assert host.wait(instance_id, 5)["runtimeStatus"] == "Terminated"
    history = _history(host, instance_id)
    assert [e["Name"] for e in history if e["EventType"] == "TaskScheduled"] == ["hello", "record"]
    assert history[-1]["EventType"] == "ExecutionTerminated"
    _wait_until(lambda: key in RECORDED)  # started by the last episode, as the extension would
    if host.event_seed is None:  # asked before `record` started: its result comes after the request
        time.sleep(0.1)
        assert _count(_history(host, instance_id), "TaskCompleted") == 1


@pytest.mark.filterwarnings("ignore:Potential duplicate Task completion")  # the SDK, on the early "cancel"
def test_orchestrator_error_still_schedules_the_episode_work(host: LocalDurableHost) -> None:
    key = _key()
    instance_id = host.start("schedule_then_raise", key)
    host.raise_event(instance_id, "cancel")
    _wait_until(lambda: _count(_history(host, instance_id), "EventRaised") == 1)  # delivered before "ready"
    host.raise_event(instance_id, "ready")
    status = host.wait(instance_id, 10)
    assert status["runtimeStatus"] == "Failed"
    assert status["output"] == "Orchestrator function 'schedule_then_raise' failed: gave up"
    history = _history(host, instance_id)
    assert [(e["EventId"], e["Name"]) for e in history if e["EventType"] == "TaskScheduled"] == [(0, "record")]
    # started and failed in one episode, as the extension does: the actions first, then the error
    assert [e["EventType"] for e in history[-3:]] == ["TaskScheduled", "ExecutionCompleted", "OrchestratorCompleted"]
    _wait_until(lambda: key in RECORDED)


def test_retry_inside_task_all_after_a_failure_crosses_task_ids(host: LocalDurableHost) -> None:
    """One retried call fails for good while another is still running; the latter fails once more.

    The SDK's task_all fails at once and the generator yields `hello`, which takes the next id. The
    extension's WhenAll waits for the other call: its retry timer takes that id, and when the timer fires
    the SDK completes `hello` with it (result None), as on Azure. `hello` itself starts only after the
    retried call has succeeded. Hence: keep call_activity_with_retry out of task_all, or let none fail.
    """
    key = _key()
    with LocalDurableHost(app, timer_scale=0.001, event_seed=host.event_seed) as real_time:  # 1 s retries: 1 ms
        instance_id = real_time.start("retries_in_task_all", key)
        _wait_until(lambda: real_time.status(instance_id)["customStatus"] == "task_all failed")
        assert ENTERED[key].is_set() and real_time.status(instance_id)["runtimeStatus"] == "Running"
        GATES[key].set()
        status = real_time.wait(instance_id, 10)
        history = _history(real_time, instance_id)
    assert status["runtimeStatus"] == "Completed", status["output"]
    assert status["output"] == {"failed": True, "after": None}  # not "Hello after the failure"
    scheduled = [(e["EventId"], e["Name"]) for e in history if e["EventType"] == "TaskScheduled"]
    timers = [e["EventId"] for e in history if e["EventType"] == "TimerCreated"]
    assert [name for _, name in scheduled] == ["explode", "gate_then_fail", "explode", "explode",
                                               "gate_then_fail", "hello"]
    hello_id = scheduled[-1][0]
    assert hello_id == max(timers + [task_id for task_id, _ in scheduled])  # started after everything else
    assert COUNTERS[key] == 2


def test_continue_as_new(host: LocalDurableHost) -> None:
    instance_id = host.start("counter", 0)
    status = host.wait(instance_id, 10)
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == "done at 3"
    assert status["input"] == "3"  # the last execution's input
    history = _history(host, instance_id)
    assert _count(history, "ExecutionStarted") == 1  # history restarts with each execution
    assert [e["EventId"] for e in history if e["EventType"] == "TaskScheduled"] == [0]
    started = history[1]  # the fourth execution's, with every field the extension writes
    assert started["Name"] == "counter" and started["Input"] == json.dumps("3") and started["Generation"] == 3
    assert started["OrchestrationInstance"]["InstanceId"] == instance_id and started["ParentInstance"] is None
    assert {"Version", "Tags", "Correlation", "ScheduledStartTime"} <= started.keys()


def test_sub_orchestration_fan_out(host: LocalDurableHost) -> None:
    instance_id = host.start("chunked_fan_out", list(range(20)))
    status = host.wait(instance_id, 10)
    assert status["runtimeStatus"] == "Completed", status["output"]
    assert status["output"] == [i * i for i in range(20)]
    children = host.list_instances(instance_id_prefix=f"{instance_id}:")
    assert len(children) == 4
    assert {c["runtimeStatus"] for c in children} == {"Completed"}
    assert {c["name"] for c in children} == {"square_chunk"}
    parents = [_history(host, c["instanceId"])[1]["ParentInstance"] for c in children]
    assert sorted(p["TaskScheduleId"] for p in parents) == [0, 1, 2, 3]
    assert {(p["Name"], p["OrchestrationInstance"]["InstanceId"]) for p in parents} == {
        ("chunked_fan_out", instance_id)}
    history = _history(host, instance_id)
    assert _count(history, "SubOrchestrationInstanceCreated") == 4
    assert _count(history, "SubOrchestrationInstanceCompleted") == 4


def test_external_event_and_unknown_orchestrator(host: LocalDurableHost) -> None:
    instance_id = host.start("approval")
    _wait_until(lambda: host.status(instance_id)["runtimeStatus"] == "Running")
    host.raise_event(instance_id, "approval", {"ok": True})
    status = host.wait(instance_id, 10)
    assert status["output"] == {"decision": {"ok": True}, "replaying": False}
    with pytest.raises(UnknownFunctionError, match="no_such_orchestrator"):
        host.start("no_such_orchestrator")


def test_start_running_id_twice_is_refused(host: LocalDurableHost) -> None:
    key = _key()
    instance_id = host.start("gated", key, instance_id=f"singleton-{key}")
    assert instance_id == f"singleton-{key}"
    with pytest.raises(InstanceAlreadyRunningError, match="already exists"):
        host.start("gated", key, instance_id=instance_id)
    GATES[key].set()
    assert host.wait(instance_id, 10)["runtimeStatus"] == "Completed"
    host.start("sequence", instance_id=instance_id)  # a finished id may be reused
    again = host.wait(instance_id, 10)
    assert again["name"] == "sequence" and again["runtimeStatus"] == "Completed"
    assert host.purge(instance_id) == 1
    assert host.status(instance_id) is None


def test_http_management_api_with_real_client(host: LocalDurableHost) -> None:
    key = _key()

    async def scenario() -> dict:
        client = DurableOrchestrationClient(host.client_binding_json())
        done_id = await client.start_new("fan_out", client_input=5)
        gated_id = await client.start_new("gated", instance_id=f"http-{key}", client_input=key)
        with pytest.raises(Exception, match="already exists"):
            await client.start_new("gated", instance_id=gated_id, client_input=key)
        for _ in range(500):
            done = await client.get_status(done_id)
            if done.runtime_status == OrchestrationRuntimeStatus.Completed:
                break
            await asyncio.sleep(0.01)
        missing = await client.get_status("no-such-instance")
        await asyncio.to_thread(ENTERED[key].wait, 5)
        running = await client.get_status(gated_id, show_history=True)
        await client.terminate(gated_id, "stop it")
        for _ in range(500):  # terminate is queued: Terminated at the instance's next episode boundary
            terminated = await client.get_status(gated_id)
            if terminated.runtime_status == OrchestrationRuntimeStatus.Terminated:
                break
            await asyncio.sleep(0.01)
        await client.terminate(gated_id, "again")  # 410 from the API: accepted silently by the client
        everything = await client.get_status_all()
        only_terminated = await client.get_status_by(runtime_status=[OrchestrationRuntimeStatus.Terminated])
        waiting_id = await client.start_new("approval")
        for _ in range(500):
            if (await client.get_status(waiting_id)).runtime_status == OrchestrationRuntimeStatus.Running:
                break
            await asyncio.sleep(0.01)
        await client.raise_event(waiting_id, "approval", {"ok": True})
        purged = await client.purge_instance_history(done_id)
        await close_client_session()
        return {"done": done, "missing": missing, "running": running, "terminated": terminated,
                "all": everything, "terminated_only": only_terminated, "purged": purged,
                "ids": (done_id, gated_id, waiting_id)}

    result = asyncio.run(scenario())
    done_id, gated_id, waiting_id = result["ids"]
    assert result["done"].output == [0, 1, 4, 9, 16]
    assert not result["missing"]  # 404 -> empty status object
    assert result["running"].runtime_status == OrchestrationRuntimeStatus.Running
    assert result["running"].custom_status == {"stage": "waiting", "key": key}
    assert any(e["EventType"] == "TaskScheduled" for e in result["running"].history)
    assert result["terminated"].runtime_status == OrchestrationRuntimeStatus.Terminated
    assert result["terminated"].output == "stop it"
    assert {done_id, gated_id} <= {s.instance_id for s in result["all"]}
    assert [s.instance_id for s in result["terminated_only"]] == [gated_id]
    assert result["purged"].instances_deleted == 1
    assert host.status(done_id) is None
    # Over HTTP the extension stores the posted JSON token, and the Python client posts
    # json.dumps(data): the orchestrator receives the JSON text (azure-functions-durable-python#295).
    assert host.wait(waiting_id, 10)["output"]["decision"] == '{"ok": true}'


def test_invoke_http_function_with_durable_client(host: LocalDurableHost) -> None:
    request = func.HttpRequest(
        method="POST",
        url="http://localhost:7071/api/orchestrators/fan_out",
        body=json.dumps(6).encode(),
        headers={"Content-Type": "application/json"},
        route_params={"name": "fan_out"},
    )
    response = host.invoke_function("http_start", req=request)
    assert response.status_code == 202
    payload = json.loads(response.get_body())
    instance_id = payload["id"]
    assert payload["statusQueryGetUri"].startswith(
        f"http://localhost:7071/runtime/webhooks/durabletask/instances/{instance_id}?")
    assert response.headers["Location"] == payload["statusQueryGetUri"]
    assert {"sendEventPostUri", "terminatePostUri", "purgeHistoryDeleteUri"} <= payload.keys()
    assert host.wait(instance_id, 10)["output"] == [i * i for i in range(6)]
    # a second call reuses the SDK's shared HTTP session machinery on a new event loop
    second = host.invoke_function("http_start", req=request)
    assert host.wait(json.loads(second.get_body())["id"], 10)["runtimeStatus"] == "Completed"


# ----------------------------------------------------------------------------- the real stylize_video
# The app's orchestrator against scripted activities (same names), in virtual time, under every seed.
video_app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
video_app.register_functions(stylize_module.bp)
JOBS: dict[str, dict] = {}
JOBS_LOCK = threading.Lock()
OPTIONS = {"activity_retry_seconds": 2, "activity_attempts": 3, "max_attempts": 3, "poll_seconds": 5}


def _fake(payload: dict, activity: str) -> dict:
    """The job's script; raises once for each activity named in its ``flaky`` list (a transient error)."""
    job = JOBS[payload.get("job", payload)["job_id"]]
    with JOBS_LOCK:
        job["calls"].append(activity)
        if activity in job["flaky"]:
            job["flaky"].remove(activity)
            raise ConnectionError(f"{activity}: connection reset")
    return job


def _done(job: dict, task: object, polls: int = 2) -> bool:
    """A task finishes on the second poll that sees it (or the ``polls``th)."""
    with JOBS_LOCK:
        job["seen"][task] += 1
        return job["seen"][task] >= polls


@video_app.activity_trigger(input_name="job")
def prepare_job(job: dict) -> dict:
    fake = _fake(job, "prepare_job")
    return {"segments": fake["segments"], "frames_total": 10 * fake["segments"]}


@video_app.activity_trigger(input_name="request")
def submit_segments(request: dict) -> int:
    fake = _fake(request, "submit_segments")
    if any(index in fake["unsubmittable"] for index, _ in request["segments"]):
        raise PermissionError("AuthorizationPermissionMismatch")
    gate = f"{fake['job_id']}-submit-{request['segments'][0][0]}"
    if gate in GATES and not ENTERED[gate].is_set():  # held by the test, then a transient error
        ENTERED[gate].set()
        GATES[gate].wait(10)
        raise ConnectionError("submit_segments: connection reset")
    with JOBS_LOCK:
        fake["submitted"].extend((index, attempt) for index, attempt in request["segments"])
    return len(request["segments"])


@video_app.activity_trigger(input_name="request")
def poll_tasks(request: dict) -> dict:
    fake = _fake(request, "poll_tasks")
    if request["stitch_attempt"] is not None:
        attempt = request["stitch_attempt"]
        if not _done(fake, f"stitch-{attempt}", fake.get("stitch_polls", 2)):
            return {"stitch": {"state": "running"}}
        if attempt in fake["stitch_fails"]:
            return {"stitch": {"state": "failed", "error": "error: muxer died", "exit_code": 1}}
        return {"stitch": {"state": "succeeded", "summary": {"frames": 10 * fake["segments"], "audio": None}}}
    failed, succeeded = [], 0
    for index in range(request["total"]):
        attempt = request["attempts"].get(str(index), 0)
        if (index, attempt) not in fake["submitted"] or not _done(fake, (index, attempt)):
            continue
        if (index, attempt) in fake["fails"]:
            failed.append({"segment": index, "attempt": attempt, "error": "worker died", "exit_code": 137})
        else:
            succeeded += 1
    return {"failed": failed, "succeeded": succeeded, "running": request["total"] - succeeded - len(failed),
            "frames_done": 10 * succeeded, "stitch": None}


@video_app.activity_trigger(input_name="request")
def submit_stitch(request: dict) -> int:
    _fake(request, "submit_stitch")
    return request["attempt"]


@video_app.activity_trigger(input_name="request")
def finalize_job(request: dict) -> dict:
    _fake(request, "finalize_job")
    return {"summary": request["summary"]}


@video_app.activity_trigger(input_name="request")
def cleanup_job(request: dict) -> int:
    _fake(request, "cleanup_job")
    return 0


def _video_job(**script) -> dict:
    job_id = f"job-{_key()}"
    JOBS[job_id] = {"job_id": job_id, "segments": 1, "fails": set(), "flaky": [], "unsubmittable": set(),
                    "stitch_fails": set(), "calls": [], "submitted": [], "seen": defaultdict(int), **script}
    job = {"job_id": job_id, "input_container": "input", "input_name": "clip.mp4", "style": "7",
           "output_name": "clip.mp4"}
    return {"job": job, "options": OPTIONS}


def _run_video(seed: int | None, **script) -> tuple[dict, dict]:
    args = _video_job(**script)
    job_id = args["job"]["job_id"]
    with LocalDurableHost(video_app, max_workers=4, timer_scale=0, event_seed=seed) as h:
        status = h.wait(h.start("stylize_video", args, instance_id=job_id), 30)
    return status, JOBS[job_id]


@pytest.mark.parametrize("seed", SEEDS, ids=lambda seed: "ordered" if seed is None else f"seed{seed}")
def test_stylize_video_completes_whatever_the_delivery_order(seed: int | None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two submit chunks in task_all, retried segments and stitch, transient activity errors, continue-as-new."""
    monkeypatch.setattr(stylize_module, "TICKS_PER_EXECUTION", 2)
    status, fake = _run_video(seed, segments=150, fails={(3, 0), (120, 0), (120, 1)}, stitch_fails={0},
                              flaky=["prepare_job", "submit_segments", "poll_tasks", "submit_stitch", "cleanup_job"])
    assert status["runtimeStatus"] == "Completed", status["output"]
    assert status["output"]["segments"] == 150 and status["output"]["frames"] == 1500
    assert status["output"]["retries"] == 4  # segment 3 once, segment 120 twice, the stitch once
    # a failed submit round sends every chunk again (submitting is idempotent by task id)
    assert set(fake["submitted"]) == {*((i, 0) for i in range(150)), (3, 1), (120, 1), (120, 2)}
    assert fake["calls"].count("submit_stitch") == 3 and fake["calls"].count("finalize_job") == 1
    assert fake["calls"].count("cleanup_job") == 2 and not fake["flaky"]  # one transient failure, one success
    assert status["customStatus"]["stage"] == "completed"
    assert json.loads(status["input"])["state"]["ticks"] >= 2  # the last execution came from continue-as-new


def test_a_long_stitch_continues_as_new_and_is_submitted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stitch that waits behind other jobs' tasks: its monitor loop continues-as-new too (its history grew
    ~8 events a poll without bound), and the new execution goes on polling the stitch it had submitted."""
    monkeypatch.setattr(stylize_module, "TICKS_PER_EXECUTION", 2)
    status, fake = _run_video(None, segments=3, stitch_polls=9, stitch_fails={0})
    assert status["runtimeStatus"] == "Completed", status["output"]
    assert fake["calls"].count("submit_stitch") == 2  # the failed attempt and its retry, each once
    state = json.loads(status["input"])["state"]
    assert state["stitch_submitted"] == 1 and state["ticks"] >= 2 * 9 - 2  # continued while the stitch ran
    assert status["customStatus"]["stage"] == "completed"


@pytest.mark.parametrize("seed", SEEDS, ids=lambda seed: "ordered" if seed is None else f"seed{seed}")
def test_stylize_video_fails_once_when_a_submit_chunk_cannot_be_submitted(seed: int | None) -> None:
    """The second chunk fails every attempt while the first may still be retrying its transient error."""
    status, fake = _run_video(seed, segments=150, unsubmittable={100}, flaky=["submit_segments"])
    assert status["runtimeStatus"] == "Failed"
    assert status["customStatus"]["stage"] == "failed"
    assert status["customStatus"]["error"] == {"kind": "internal", "message": "AuthorizationPermissionMismatch"}
    assert fake["calls"].count("cleanup_job") == 1  # started after the whole task_all, never twice
    assert "submit_stitch" not in fake["calls"] and "poll_tasks" not in fake["calls"]


@pytest.mark.parametrize("seed", SEEDS, ids=lambda seed: "ordered" if seed is None else f"seed{seed}")
def test_stylize_video_submit_rounds_cross_no_task_ids(seed: int | None) -> None:
    """What used to cross ids (see test_retry_inside_task_all_…): chunk 100 fails for good while chunk 0's
    first submit is still running, then chunk 0 fails too. The orchestrator retries the whole fan-out in
    rounds of plain calls, so every task gets its own result: the job fails once, after the last round,
    with the chunk's reason, and cleanup runs once, last."""
    args = _video_job(segments=150, unsubmittable={100})
    job_id = args["job"]["job_id"]
    GATES[f"{job_id}-submit-0"].clear()
    with LocalDurableHost(video_app, max_workers=4, timer_scale=0.001, event_seed=seed) as h:
        h.start("stylize_video", args, instance_id=job_id)
        assert ENTERED[f"{job_id}-submit-0"].wait(10)
        _wait_until(lambda: JOBS[job_id]["calls"].count("submit_segments") >= 2)
        assert h.status(job_id)["runtimeStatus"] == "Running"
        assert (h.status(job_id)["customStatus"] or {}).get("stage") == "scoring"  # no round may fail early
        GATES[f"{job_id}-submit-0"].set()
        status = h.wait(job_id, 10)
        history = _history(h, job_id)
    assert status["runtimeStatus"] == "Failed"
    assert status["customStatus"]["error"] == {"kind": "internal", "message": "AuthorizationPermissionMismatch"}
    scheduled = [e["Name"] for e in history if e["EventType"] == "TaskScheduled"]
    assert scheduled.count("submit_segments") == 2 * OPTIONS["activity_attempts"] and scheduled[-1] == "cleanup_job"
    assert JOBS[job_id]["calls"].count("cleanup_job") == 1
    assert set(JOBS[job_id]["submitted"]) == {(i, 0) for i in range(100)}
