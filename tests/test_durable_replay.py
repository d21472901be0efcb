"""The real stylize_video orchestrator replays a history in the Durable extension's own format.

tests/fixtures/stylize_video_episode7.json is the orchestration-trigger payload the extension hands the Python
worker: the 7th episode of an execution that continue-as-new started (its input carries ``state``), in the
extension's shape (PascalCase events, EventType numbers, .NET 7-digit timestamps, every ExecutionStarted and
TaskScheduled field DTFx writes, the timer settings the Azure Storage backend sends). It holds a poll that
failed and was retried through the extension's retry timer, a resubmitted segment, the poll sleep timer and a
last poll that finds every segment done. It is hand-built from the documented format, its ids numbered the way
the extension numbers them. These tests pin the orchestrator's decisions on it (a change that breaks replay of
running instances fails here) and check that the local host numbers the work exactly as recorded.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import azure.durable_functions as df
import azure.functions as func
import pytest

from local.durable_shim import Shim
from local.durable_state import TASK_SCHEDULED, TIMER_CREATED, execution_started, flatten_actions
from orchestrators import stylize_video as stylize_module

FIXTURE = Path(__file__).parent / "fixtures" / "stylize_video_episode7.json"
ORCHESTRATOR_STARTED, ORCHESTRATOR_COMPLETED = 12, 13
RETRY = {"firstRetryIntervalInMilliseconds": 10000, "maxNumberOfAttempts": 5}  # the input's options

_app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
_app.register_functions(stylize_module.bp)
HANDLE = _app.get_functions()[0].get_user_function()


def _context() -> dict:
    return json.loads(FIXTURE.read_text())


def _decide(context: dict) -> dict:
    """What the worker returns to the extension for this context."""
    return json.loads(HANDLE(func.OrchestrationContext(json.dumps(context))))


def _episodes(history: list[dict]) -> list[list[dict]]:
    episodes: list[list[dict]] = []
    for event in history:
        if event["EventType"] == ORCHESTRATOR_STARTED:
            episodes.append([])
        episodes[-1].append(event)
    return episodes


def _as_new_episode(context: dict, episode: int) -> tuple[dict, list[dict], list[dict]]:
    """The context as the extension sent it for ``episode`` (0-based): the earlier episodes played, then the
    events it received; also returns those received events and the work it recorded starting."""
    episodes = _episodes(context["history"])
    received = [e for e in episodes[episode]
                if e["EventType"] not in (TASK_SCHEDULED, TIMER_CREATED, ORCHESTRATOR_COMPLETED)]
    started = [e for e in episodes[episode] if e["EventType"] in (TASK_SCHEDULED, TIMER_CREATED)]
    new = copy.deepcopy(received)
    for event in new:
        event["IsPlayed"] = False
    then = {**context, "history": [e for past in episodes[:episode] for e in past] + new}
    return then, received, started


def _call(action: dict) -> tuple[str, dict]:
    """A retried call is a one-child task_all in the SDK's payload; its name and decoded input."""
    assert action["actionType"] == 12 and len(action["compoundActions"]) == 1
    inner = action["compoundActions"][0]
    assert inner["actionType"] == 1 and inner["retryOptions"] == RETRY
    return inner["functionName"], json.loads(inner["input"])


def test_recorded_episode_decides_to_stitch() -> None:
    context = _context()
    job = json.loads(context["input"])["job"]
    decision = _decide(context)
    assert decision["isDone"] is False and decision["schemaVersion"] == 2
    assert decision.get("output") is None and not decision.get("error")
    actions = decision["actions"][0]  # V2/V3: one list, cumulative over every episode
    assert len(actions) == 5
    assert _call(actions[0]) == ("poll_tasks", {"job": job, "total": 4, "attempts": {"2": 1}, "stitch_attempt": None})
    assert _call(actions[1]) == ("submit_segments", {"job": job, "segments": [[3, 1]]})
    # the poll sleep: 30 s after the episode that decided it, in the SDK's microsecond format
    assert actions[2] == {"actionType": 5, "fireAt": "2024-05-21T09:53:23.982117Z", "isCanceled": False}
    assert _call(actions[3]) == ("poll_tasks", {"job": job, "total": 4, "attempts": {"2": 1, "3": 1},
                                                "stitch_attempt": None})
    assert _call(actions[4]) == ("submit_stitch", {"job": job, "total": 4, "attempt": 0})  # the new decision
    custom = decision["customStatus"]
    assert custom["stage"] == "stitching"
    assert custom["segments"] == {"done": 4, "total": 4, "running": 0}
    assert custom["frames"] == {"done": 960, "total": 960}


@pytest.mark.parametrize("episode", range(7))
def test_each_recorded_episode_gets_the_recorded_ids_from_the_host(episode: int) -> None:
    """Replay the recording one episode at a time through the SDK and the host's numbering (Shim): the work
    each episode starts, with its ids, must be what the extension recorded (TaskScheduled / TimerCreated),
    including the retry timer and the retry attempt, which take their ids when their events arrive."""
    context = _context()
    shim = Shim()
    for earlier in range(episode + 1):
        then, received, recorded = _as_new_episode(context, earlier)
        decision = _decide(then)
        flat = flatten_actions(decision["actions"])
        assert shim.mismatch(flat) is None
        shim.update(decision["actions"], flat)
        for event in received:
            shim.on_event(event)
        work = shim.take_work()
        if earlier < 6:  # the recording holds what these episodes started
            assert [(w.task_id, w.action["functionName"] if w.op == "call" else "timer") for w in work] == \
                [(e["EventId"], e.get("Name", "timer")) for e in recorded]
    assert not decision["isDone"]
    if episode == 6:
        assert [(w.op, w.task_id, w.action["functionName"]) for w in work] == [("call", 6, "submit_stitch")]


def test_recorded_execution_continues_as_new_at_the_tick_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Episode 6 (the sleep timer fired) decided at a tick limit of 101: continue-as-new carries the state."""
    monkeypatch.setattr(stylize_module, "TICKS_PER_EXECUTION", 101)
    context = _context()
    args = json.loads(context["input"])
    then, _, _ = _as_new_episode(context, 5)
    decision = _decide(then)
    assert decision["isDone"] is True and decision.get("output") is None
    actions = decision["actions"][0]
    assert [a["actionType"] for a in actions] == [12, 12, 5, 4]  # poll, submit, sleep, continue-as-new
    carried = json.loads(actions[-1]["input"])
    assert carried["job"] == args["job"] and carried["options"] == args["options"]
    state = carried["state"]
    assert state["ticks"] == 101 and state["attempts"] == {"2": 1, "3": 1}
    assert state["prepared"] == args["state"]["prepared"] and state["started"] == args["state"]["started"]


def test_host_execution_started_has_the_recorded_fields() -> None:
    """The host writes ExecutionStarted with the same fields as the extension (continue-as-new included)."""
    recorded = _context()["history"][1]
    written = execution_started("stylize_video", "clip-1", "e" * 32, '{"a": 1}', generation=1)
    assert set(written) == set(recorded)
    assert written["Input"] == json.dumps('{"a": 1}') and written["Generation"] == 1
    assert written["OrchestrationInstance"] == {"InstanceId": "clip-1", "ExecutionId": "e" * 32}
    assert written["ParentInstance"] is None and written["Version"] == ""


def test_a_continued_execution_shows_where_the_job_stands_before_its_first_poll() -> None:
    """On Azure a new execution starts with no custom status, and the instance's created time moves to it: until
    its first poll returned, a job continued-as-new read "queued" with no progress. Its first episode now reports
    the stage, the plan and the job's own start."""
    context = _context()
    state = json.loads(context["input"])["state"]
    then, _, _ = _as_new_episode(context, 0)
    status = _decide(then)["customStatus"]
    assert status["stage"] == "scoring" and status["segments"]["total"] == state["prepared"]["segments"] == 4
    assert status["frames"]["total"] == 960 and status["started"] == state["started"]
