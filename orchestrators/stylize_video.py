"""The `stylize_video` orchestration: probe → plan → fan out segment tasks → monitor → stitch → finish.

Deterministic by construction: it reads only its input, activity results and context time. Payloads are
names and counts (the plan itself lives in storage). History stays bounded for long videos: segments are
submitted in chunks of 100 per activity, one poll activity per tick covers every task, and the monitor loops
(scoring, then the stitch) continue-as-new every ``TICKS_PER_EXECUTION`` ticks.

Everything the orchestration must remember across continue-as-new is one JSON dict, ``state``: when it
started, the plan's summary (``prepared``), each segment's attempt, the stitch attempt (and the one submitted),
the monitor's tick count (scoring and stitching), the last progress (``progress``), since when tasks have waited
with none running (``waiting_since``) and the telemetry stage clock. The helpers below read it and return new
values; only the orchestrator function itself assigns to it.
"""

from __future__ import annotations

import datetime as dt
import logging

import azure.durable_functions as df

from gpu_worker.errors import InputError
from pipeline import telemetry
from pipeline.jobs import SUBMIT_CHUNK
from pipeline.progress import failure, job_status

bp = df.Blueprint()
log = logging.getLogger("stylize.orchestrator")
TICKS_PER_EXECUTION = 100
BAD_INPUT_EXIT = 2


class JobFailed(RuntimeError):
    pass


@bp.orchestration_trigger(context_name="context")
def stylize_video(context: df.DurableOrchestrationContext):
    args = context.get_input()
    if "rejected" in args:  # an upload whose options were invalid: fail visibly with the reason
        rejected = args["rejected"]
        context.set_custom_status({"stage": "failed", "input": rejected["input"],
                                   "error": {"kind": "input", "message": rejected["message"]}})
        telemetry.job_failed(context, {"kind": "input", "message": rejected["message"]})
        raise InputError(rejected["message"])
    job, options = args["job"], args["options"]
    state = args.get("state") or {"started": context.current_utc_datetime.isoformat(), "attempts": {}, "ticks": 0}
    retry = df.RetryOptions(round(1000 * options["activity_retry_seconds"]), options["activity_attempts"])

    def call(activity: str, payload: dict) -> df.Task:
        return context.call_activity_with_retry(activity, retry, payload)

    try:
        if "prepared" in state and "stitch_attempt" not in state:
            # A new execution (continue-as-new) starts with no status on Azure: show the progress before the first
            # poll, or the job reads "queued" until it returns (the stitching stage is reported below).
            state["stages"] = _report(context, job, state, "scoring", state.get("progress"))
        elif "prepared" not in state:
            state["stages"] = _report(context, job, state, "probing")
            state["prepared"] = _unless_bad_input((yield call("prepare_job", job)))
            _info(context, job, "%d segments planned", state["prepared"]["segments"])
            state["stages"] = _report(context, job, state, "scoring")
            yield from _submit_all(context, job, state["prepared"]["segments"], options)

        total = state["prepared"]["segments"]
        while "stitch_attempt" not in state:
            poll = yield call("poll_tasks", {"job": job, "total": total, "attempts": state["attempts"],
                                             "stitch_attempt": None})
            retries = _segments_to_retry(poll["failed"], options["max_attempts"])
            if retries:
                for index, attempt, reason in retries:
                    _info(context, job, "segment %d attempt %d failed (%s); retrying", index, attempt - 1, reason)
                state["attempts"] = {**state["attempts"], **{str(i): a for i, a, _ in retries}}
                yield call("submit_segments", {"job": job, "segments": [(i, a) for i, a, _ in retries]})
            state["stages"] = _report(context, job, state, "scoring", poll)
            active = poll["running"] > 0 or poll["succeeded"] != state.get("progress", {}).get("succeeded", 0) \
                or bool(retries)
            # kept for the status the job ends with, should it fail (no running count: nothing runs then)
            state["progress"] = {"succeeded": poll["succeeded"], "frames_done": poll["frames_done"]}
            state["waiting_since"] = yield from _waiting(context, call, job, state.get("waiting_since"), active,
                                                         options)
            if poll["succeeded"] == total:
                state["frames"], state["stitch_attempt"] = poll["frames_done"], 0
                break
            yield _sleep(context, options["poll_seconds"])
            state["ticks"] += 1
            if state["ticks"] % TICKS_PER_EXECUTION == 0:
                context.continue_as_new({**args, "state": state})
                return None

        done = state["progress"] = {"succeeded": total, "frames_done": state["frames"]}
        state["stages"] = _report(context, job, state, "stitching", done)
        while True:  # a stitch can wait behind other jobs' tasks for hours: this loop continues-as-new too
            attempt = state["stitch_attempt"]
            if state.get("stitch_submitted") != attempt:
                yield call("submit_stitch", {"job": job, "total": total, "attempt": attempt})
                state["stitch_submitted"], state["waiting_since"] = attempt, None
            stitch = {"state": "pending"}
            while stitch["state"] in ("pending", "running"):
                yield _sleep(context, options["poll_seconds"])
                poll = yield call("poll_tasks", {"job": job, "total": 0, "attempts": {}, "stitch_attempt": attempt})
                stitch = poll["stitch"]
                state["waiting_since"] = yield from _waiting(context, call, job, state.get("waiting_since"),
                                                             stitch["state"] != "pending", options)
                state["ticks"] += 1
                if stitch["state"] in ("pending", "running") and state["ticks"] % TICKS_PER_EXECUTION == 0:
                    context.continue_as_new({**args, "state": state})
                    return None
            if stitch["state"] == "succeeded":
                break
            state["stitch_attempt"] = _next_attempt("stitching", stitch, attempt, options["max_attempts"])

        state["stages"] = _report(context, job, state, "finishing", done)
        summary = _summary(context, state, stitch.get("summary") or {})
        _unless_bad_input((yield call("finalize_job", {"job": job, "summary": summary})))
        try:  # published: the job has succeeded, whatever happens to its scratch files now
            yield call("cleanup_job", {"job": job, "reason": "completed"})
        except Exception:
            _info(context, job, "cleanup after success failed; its end record says what is left")
        state["stages"] = _report(context, job, state, "completed", done)
        _info(context, job, "completed: %d frames in %.0f s", summary["frames"], summary["seconds"])
        telemetry.job_completed(context, summary, state.get("stages"))
        return {"job_id": job["job_id"], "output": job["output_name"], **summary}
    except Exception as exc:
        error = failure(exc)
        state["stages"] = _report(context, job, state, "failed", state.get("progress"), error=error)
        _info(context, job, "failed: %s", error["message"])
        telemetry.job_failed(context, error, state.get("stages"))
        try:
            yield call("cleanup_job", {"job": job, "reason": "failed"})
        except Exception:  # the job's own failure is the one to report
            _info(context, job, "cleanup after failure failed too")
        raise (InputError if error["kind"] == "input" else JobFailed)(error["message"]) from None


def _submit_all(context: df.DurableOrchestrationContext, job: dict, segments: int, options: dict):
    """Every segment's first task, in chunks of ``SUBMIT_CHUNK`` submitted in parallel.

    Retried here, round by round, rather than with ``call_activity_with_retry``: the retry timers of several
    calls inside one ``task_all`` take task ids the Python SDK does not expect, and after a failure the next
    task can receive another one's result (tests/test_durable_host.py shows it). Submitting is idempotent
    (task ids), so a round simply sends every chunk again.
    """
    pairs = [(i, 0) for i in range(segments)]
    chunks = [{"job": job, "segments": pairs[i:i + SUBMIT_CHUNK]} for i in range(0, len(pairs), SUBMIT_CHUNK)]
    for attempt in range(1, options["activity_attempts"] + 1):
        try:
            yield context.task_all([context.call_activity("submit_segments", chunk) for chunk in chunks])
            return
        except Exception:
            if attempt == options["activity_attempts"]:
                raise
        yield _sleep(context, options["activity_retry_seconds"])


def _waiting(context: df.DurableOrchestrationContext, call, job: dict, since: str | None, active: bool,
             options: dict):
    """When the job's tasks began waiting with none of them running (ISO time, or None): every
    ``queue_check_minutes`` of that, the compute backend is asked whether they can start at all, and the job fails
    with its reason if not. Without this, a pool that gets no nodes (no quota for the size) or only unusable
    ones (a missing image) kept a job at "scoring 0/N" forever, and unusable nodes are billed all along."""
    now = context.current_utc_datetime
    minutes = options.get("queue_check_minutes")  # absent from runs started before it existed
    if active or minutes is None:
        return None
    if since is None or now - dt.datetime.fromisoformat(since) < dt.timedelta(minutes=minutes):
        return since or now.isoformat()
    verdict = yield call("check_compute", {"job": job})
    if verdict["blocked"]:
        raise JobFailed(f"none of this job's tasks can start: {verdict['blocked']}")
    return now.isoformat()


def _report(context: df.DurableOrchestrationContext, job: dict, state: dict, stage: str,
            poll: dict | None = None, error: dict | None = None) -> dict:
    """Show ``stage`` in the job's status; returns the telemetry stage clock to keep in ``state``."""
    context.set_custom_status(job_status(stage, job, state.get("prepared"), poll, state["started"],
                                         context.current_utc_datetime, error))
    return telemetry.job_stage(context, stage, state.get("stages"))


def _segments_to_retry(failed: list[dict], max_attempts: int) -> list[tuple[int, int, str]]:
    """(segment, next attempt, reason) for each failed segment task; raises when a failure is final (bad
    input, or the last attempt)."""
    retries = []
    for task in failed:
        attempt = _next_attempt(f"segment {task['segment']}", task, task["attempt"], max_attempts)
        retries.append((task["segment"], attempt, _reason(task)))
    return retries


def _next_attempt(what: str, task: dict, attempt: int, max_attempts: int) -> int:
    """The attempt after a failed ``attempt`` of a task; raises when there is none worth making."""
    reason = _reason(task)
    if task.get("exit_code") == BAD_INPUT_EXIT:  # the worker's one-line reason is the whole message
        raise InputError(reason.removeprefix("error: ").strip())
    if attempt + 1 >= max_attempts:
        raise JobFailed(f"{what} failed {attempt + 1} times; last error: {reason}")
    return attempt + 1


def _reason(task: dict) -> str:
    lines = (task.get("error") or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {task.get('exit_code')}"


def _summary(context: df.DurableOrchestrationContext, state: dict, stitched: dict) -> dict:
    elapsed = (context.current_utc_datetime - dt.datetime.fromisoformat(state["started"])).total_seconds()
    return {"frames": stitched.get("frames", state["frames"]), "segments": state["prepared"]["segments"],
            "seconds": round(elapsed, 1), "audio": stitched.get("audio"),
            "retries": sum(state["attempts"].values()) + state["stitch_attempt"],
            # what came through of the source, and what was dropped and why, per track (issue 16)
            "tracks": stitched.get("tracks", []), "video": stitched.get("video"),
            "chapters": stitched.get("chapters", 0), "metadata": stitched.get("metadata", {})}


def _unless_bad_input(result: dict) -> dict:
    """Activities hand bad input back as a result (it is not worth a retry); here it fails the job."""
    if "input_error" in result:
        raise InputError(result["input_error"])
    return result


def _sleep(context: df.DurableOrchestrationContext, seconds: float) -> df.Task:
    return context.create_timer(context.current_utc_datetime + dt.timedelta(seconds=seconds))


def _info(context: df.DurableOrchestrationContext, job: dict, message: str, *values: object) -> None:
    if not context.is_replaying:
        log.info("job %s: " + message, job["job_id"], *values)
