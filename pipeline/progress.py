"""The job's custom status (what `GET /api/jobs/{id}` shows), and failure reasons a person can read.

Pure functions of the orchestrator's own state and context time, so they are replay-safe.
"""

from __future__ import annotations

import datetime as dt
import re

STAGES = ("queued", "probing", "scoring", "stitching", "finishing", "completed", "failed")


def job_status(
    stage: str, job: dict, prepared: dict | None = None, poll: dict | None = None,
    started: str | None = None, now: dt.datetime | None = None, error: dict | None = None,
) -> dict:
    """A small dict (far under the 16 KB custom-status limit) describing where the job stands."""
    status: dict = {"stage": stage, "input": f"{job['input_container']}/{job['input_name']}", "style": job["style"]}
    if started:  # the job's start: on Azure the instance's created time moves to each continue-as-new
        status["started"] = started
    if prepared:
        done = (poll or {}).get("succeeded", 0)
        status["segments"] = {"done": done, "total": prepared["segments"],
                              "running": (poll or {}).get("running", 0)}
        frames_done = (poll or {}).get("frames_done", 0)
        # the total is an estimate from the container's duration and frame rate (a Matroska file's duration counts
        # its audio too); once the job has completed, what it counted is the total
        total = frames_done if stage == "completed" else prepared.get("frames_total")
        status["frames"] = {"done": frames_done, "total": total}
        if started and now and frames_done:
            elapsed = (now - dt.datetime.fromisoformat(started)).total_seconds()
            if elapsed > 0:
                fps = frames_done / elapsed
                status["fps"] = round(fps, 2)
                total = prepared.get("frames_total")
                if total and stage == "scoring":
                    status["eta_seconds"] = round(max(0, total - frames_done) / fps)
    if stage == "completed":
        status["output"] = job["output_name"]
    if error:
        status["error"] = error
    return status


_ACTIVITY_PREFIX = re.compile(r"^Activity function '[^']*' failed:\s*")
_TYPE_PREFIX = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Failed|Canceled)):\s*")


def failure(exc: BaseException) -> dict:
    """{"kind": "input" | "internal", "message": one line} from an exception thrown into the orchestrator.

    The Durable SDK hands activity failures over as text ("Activity function 'x' failed: Type: message
    \\n traceback"); keep the message and tell bad input (the person can fix it) from everything else.
    """
    text = _ACTIVITY_PREFIX.sub("", str(exc)).strip()
    first = text.splitlines()[0].strip() if text else type(exc).__name__
    match = _TYPE_PREFIX.match(first)
    kind_name = match.group(1) if match else type(exc).__name__
    message = _TYPE_PREFIX.sub("", first) or kind_name
    return {"kind": "input" if kind_name in ("InputError", "BadInput") else "internal", "message": message}
