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
@pytest.fixture
def host():
    with LocalDurableHost(app, max_workers=4, timer_scale=0) as h:
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


def test_terminate_while_activity_blocks(host: LocalDurableHost) -> None:
    key = _key()
    instance_id = host.start("gated", key)
    assert ENTERED[key].wait(5)
    assert host.terminate(instance_id, "operator asked") is True
    status = host.status(instance_id)
    assert status["runtimeStatus"] == "Terminated"
    assert status["output"] == "operator asked"
    assert host.wait(instance_id, 1)["runtimeStatus"] == "Terminated"
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


def test_continue_as_new(host: LocalDurableHost) -> None:
    instance_id = host.start("counter", 0)
    status = host.wait(instance_id, 10)
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == "done at 3"
    assert status["input"] == "3"  # the last execution's input
    history = _history(host, instance_id)
    assert _count(history, "ExecutionStarted") == 1  # history restarts with each execution
    assert [e["EventId"] for e in history if e["EventType"] == "TaskScheduled"] == [0]


def test_sub_orchestration_fan_out(host: LocalDurableHost) -> None:
    instance_id = host.start("chunked_fan_out", list(range(20)))
    status = host.wait(instance_id, 10)
    assert status["runtimeStatus"] == "Completed", status["output"]
    assert status["output"] == [i * i for i in range(20)]
    children = host.list_instances(instance_id_prefix=f"{instance_id}:")
    assert len(children) == 4
    assert {c["runtimeStatus"] for c in children} == {"Completed"}
    assert {c["name"] for c in children} == {"square_chunk"}
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
        await client.terminate(gated_id, "again")  # 410 from the API: accepted silently by the client
        terminated = await client.get_status(gated_id)
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
