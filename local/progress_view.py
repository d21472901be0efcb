"""A job's progress on stderr, for `stylize run` and `stylize status`: one line redrawn in place on a
terminal, elsewhere (logs, `make demo` under CI) one line each time the stage changes or another quarter of
the frames is done."""

from __future__ import annotations

import sys
from typing import TextIO


def progress_line(custom: dict) -> str:
    """``stage [#####.....] done/total frames  fps  ETA`` from a job's status (its custom status)."""
    stage = custom.get("stage", "queued")
    frames = custom.get("frames") or {}
    done, total = frames.get("done", 0), frames.get("total")
    if not total:
        return f"{stage}…"
    width = 24
    filled = round(width * min(1.0, done / total))
    line = f"{stage:<9} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} frames"
    if custom.get("fps"):
        line += f"  {custom['fps']:.1f} fps"
    if custom.get("eta_seconds") is not None:
        line += f"  ETA {custom['eta_seconds']} s"
    return line


class ProgressView:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.redraw = self.stream.isatty()
        self._line, self._step = "", ("", 0)

    def show(self, custom: dict) -> None:
        line = progress_line(custom)
        frames = custom.get("frames") or {}
        quarter = 4 * frames.get("done", 0) // frames["total"] if frames.get("total") else 0
        step = (custom.get("stage", "queued"), quarter)
        if self.redraw and line != self._line:
            print(f"\r{line:<78}", end="", file=self.stream, flush=True)
        elif not self.redraw and step != self._step:
            print(line, file=self.stream, flush=True)
        self._line, self._step = line, step

    def close(self) -> None:
        """End the redrawn line, so what follows starts on a line of its own."""
        if self._line and self.redraw:
            print(file=self.stream)
