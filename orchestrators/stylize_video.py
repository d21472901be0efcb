"""The `stylize_video` orchestration: probe → plan → fan out segment tasks → monitor → stitch → finish.

Deterministic by construction: it reads only its input, activity results and context time. Payloads are
names and counts (the plan itself lives in storage). History stays bounded for long videos: segments are
submitted in chunks of 100 per activity, one poll activity per tick covers every task, and the monitor loop
continues-as-new every ``TICKS_PER_EXECUTION`` ticks.
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
    retry = df.RetryOptions(round(1000 * options["activity_retry_seconds"]), options["activity_attempts"])

    def call(activity: str, payload: dict):
        return context.call_activity_with_retry(activity, retry, payload)

    state = args.get("state") or {}
    prepared = state.get("prepared")
    started = state.get("started") or context.current_utc_datetime.isoformat()

    def report(stage: str, poll: dict | None = None, error: dict | None = None) -> None:
        context.set_custom_status(job_status(stage, job, prepared, poll, started,
                                             context.current_utc_datetime, error))
        telemetry.job_stage(context, stage, state)  # stage durations, kept in state; records only when live

    def info(message: str, *values) -> None:
        if not context.is_replaying:
            log.info("job %s: " + message, job["job_id"], *values)

    try:
        if prepared is None:
            report("probing")
            prepared = _unless_bad_input((yield call("prepare_job", job)))
            info("%d segments planned", prepared["segments"])
            report("scoring")
            pairs = [(i, 0) for i in range(prepared["segments"])]
            yield context.task_all([
                call("submit_segments", {"job": job, "segments": pairs[i:i + SUBMIT_CHUNK]})
                for i in range(0, len(pairs), SUBMIT_CHUNK)
            ])
            state = {**state, "prepared": prepared, "started": started, "attempts": {}, "ticks": 0}

        total, attempts = prepared["segments"], state["attempts"]
        while "stitch_attempt" not in state:
            poll = yield call("poll_tasks", {"job": job, "total": total, "attempts": attempts, "stitch_attempt": None})
            retries = []
            for failed in poll["failed"]:
                index, attempt = failed["segment"], failed["attempt"]
                reason = (failed.get("error") or "").strip().splitlines()
                reason = reason[-1] if reason else f"exit status {failed.get('exit_code')}"
                if failed.get("exit_code") == BAD_INPUT_EXIT:
                    raise InputError(_strip_error_prefix(reason))
                if attempt + 1 >= options["max_attempts"]:
                    raise JobFailed(f"segment {index} failed {attempt + 1} times; last error: {reason}")
                attempts[str(index)] = attempt + 1
                retries.append((index, attempt + 1))
                info("segment %d attempt %d failed (%s); retrying", index, attempt, reason)
            if retries:
                yield call("submit_segments", {"job": job, "segments": retries})
            report("scoring", poll)
            if poll["succeeded"] == total:
                state["frames"] = poll["frames_done"]
                state["stitch_attempt"] = 0
                break
            yield from _sleep(context, options["poll_seconds"])
            state["ticks"] += 1
            if state["ticks"] % TICKS_PER_EXECUTION == 0:
                context.continue_as_new({**args, "state": state})
                return None

        report("stitching", {"succeeded": total, "frames_done": state["frames"]})
        while True:
            attempt = state["stitch_attempt"]
            yield call("submit_stitch", {"job": job, "total": total, "attempt": attempt})
            stitch = {"state": "pending"}
            while stitch["state"] in ("pending", "running"):
                yield from _sleep(context, options["poll_seconds"])
                poll = yield call("poll_tasks", {"job": job, "total": 0, "attempts": {}, "stitch_attempt": attempt})
                stitch = poll["stitch"]
            if stitch["state"] == "succeeded":
                break
            reason = (stitch.get("error") or "unknown error").strip().splitlines()[-1]
            if stitch.get("exit_code") == BAD_INPUT_EXIT:
                raise InputError(_strip_error_prefix(reason))
            if attempt + 1 >= options["max_attempts"]:
                raise JobFailed(f"stitching failed {attempt + 1} times; last error: {reason}")
            state["stitch_attempt"] = attempt + 1

        report("finishing", {"succeeded": total, "frames_done": state["frames"]})
        elapsed = (context.current_utc_datetime - dt.datetime.fromisoformat(started)).total_seconds()
        summary = {"frames": (stitch.get("summary") or {}).get("frames", state["frames"]), "segments": total,
                   "seconds": round(elapsed, 1), "audio": (stitch.get("summary") or {}).get("audio"),
                   "retries": sum(attempts.values()) + state["stitch_attempt"]}
        _unless_bad_input((yield call("finalize_job", {"job": job, "summary": summary})))
        try:  # published: the job has succeeded, whatever happens to its scratch files now
            yield call("cleanup_job", {"job": job, "reason": "completed"})
        except Exception:
            info("cleanup after success failed; its end record says what is left")
        report("completed", {"succeeded": total, "frames_done": state["frames"]})
        info("completed: %d frames in %.0f s", summary["frames"], elapsed)
        telemetry.job_completed(context, summary, state)
        return {"job_id": job["job_id"], "output": job["output_name"], **summary}
    except Exception as exc:
        error = failure(exc)
        report("failed", error=error)
        info("failed: %s", error["message"])
        telemetry.job_failed(context, error, state)
        try:
            yield call("cleanup_job", {"job": job, "reason": "failed"})
        except Exception:  # the job's own failure is the one to report
            info("cleanup after failure failed too")
        raise (InputError if error["kind"] == "input" else JobFailed)(error["message"]) from None


def _unless_bad_input(result: dict) -> dict:
    """Activities hand bad input back as a result (it is not worth a retry); here it fails the job."""
    if "input_error" in result:
        raise InputError(result["input_error"])
    return result


def _sleep(context: df.DurableOrchestrationContext, seconds: float):
    yield context.create_timer(context.current_utc_datetime + dt.timedelta(seconds=seconds))


def _strip_error_prefix(line: str) -> str:
    return line.removeprefix("error: ").strip()
