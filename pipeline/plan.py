"""Cut a video into half-open presentation-time ranges, one compute task each."""

from __future__ import annotations

import math
from decimal import Decimal


def plan_segments(
    start_seconds: float, duration_seconds: float | None, segment_seconds: float, max_segments: int
) -> list[tuple[str, str | None]]:
    """Boundaries as exact decimal strings: [(start, end), …], the last range open-ended.

    Cuts fall every ``segment_seconds`` from the stream's start; the workers find each range's frames
    themselves, so cuts need not sit on keyframes or even on frames. The last range runs to the end of the
    stream (metadata durations are estimates) and a short tail joins the range before it, so no task
    starts up for a handful of frames. Very long videos get longer segments rather than more than
    ``max_segments`` tasks.
    """
    if not duration_seconds or duration_seconds <= 0:
        return [("0", None)]
    length = max(segment_seconds, duration_seconds / max_segments)
    count = max(1, math.floor(duration_seconds / length + 0.75))  # a tail under 1/4 segment is merged
    # Round cut times to the millisecond so that task ids and command lines stay readable; cuts need no
    # particular precision, only the same value on both sides of each boundary.
    origin = Decimal(repr(start_seconds)).quantize(Decimal("0.001"))
    step = Decimal(repr(length)).quantize(Decimal("0.001"))
    cuts = [origin + step * k for k in range(1, count)]
    starts = ["0", *(str(c) for c in cuts)]
    ends: list[str | None] = [*(str(c) for c in cuts), None]
    return list(zip(starts, ends, strict=True))
