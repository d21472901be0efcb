"""The job's stage clock: the stage the orchestration is in, since when, and the seconds spent in each stage.

Why a value the orchestrator keeps, and not bookkeeping of our own: a stage can outlive an execution (the
monitor loop continues-as-new while scoring), and only the orchestration's own state travels across that.
Telemetry must not write into that state, so :func:`advance` is pure: it takes the previous clock and
returns a new one (never changing the one it was given), and the orchestrator stores the result itself.

Replay-safe: the only time it reads is the orchestration's clock (``context.current_utc_datetime``), which
is the same on every replay, so every replay computes the same clock. The clock is plain JSON (strings and
numbers), because it travels in the orchestration's input.

Shape: ``{"stage": "scoring", "since": "<ISO time>", "seconds": {"probing": 4.2}, "ended_in": "scoring"}``
(``ended_in`` only once the job completed or failed). Pipelines that kept this shape under
``state["telemetry"]`` before have valid clocks there.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

QUEUED = "queued"  # the stage of a job that failed before its first stage began
TERMINAL = ("completed", "failed")


@dataclass(frozen=True)
class Step:
    """What one :func:`advance` did: the new clock, and what the records of that change should say."""

    clock: dict[str, Any]
    started: bool = False  # the job's first stage began
    ended: str | None = None  # the stage that ended, if the stage changed
    seconds: float = 0.0  # how long ``ended`` lasted this time


def is_clock(value: object) -> TypeGuard[Mapping[str, Any]]:
    return isinstance(value, Mapping) and isinstance(value.get("stage"), str) and isinstance(value.get("since"), str)


def advance(clock: Mapping[str, Any] | None, stage: str, now: dt.datetime) -> Step:
    """The clock after the orchestration reported ``stage`` at ``now`` (orchestration time)."""
    if not is_clock(clock):
        return Step({"stage": stage, "since": now.isoformat(), "seconds": {}}, started=True)
    previous = clock["stage"]
    if previous == stage:  # reported again (every poll tick): nothing changes
        return Step(dict(clock))
    seconds = (now - dt.datetime.fromisoformat(clock["since"])).total_seconds()
    totals = dict(clock.get("seconds") or {})
    totals[previous] = round(totals.get(previous, 0.0) + seconds, 3)
    new = {"stage": stage, "since": now.isoformat(), "seconds": totals}
    if stage in TERMINAL:
        new["ended_in"] = previous
    return Step(new, ended=previous, seconds=seconds)


def seconds_by_stage(clock: Mapping[str, Any] | None) -> dict[str, float]:
    """Seconds spent in each stage that has ended so far."""
    return dict(clock.get("seconds") or {}) if is_clock(clock) else {}


def last_stage(clock: Mapping[str, Any] | None) -> str:
    """The stage the job was in when it ended (or is in now); ``queued`` before any stage began."""
    if not is_clock(clock):
        return QUEUED
    return clock.get("ended_in") or clock["stage"]
