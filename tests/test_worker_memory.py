"""The worker's memory does not grow with the number of frames it processes (no timing involved)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.media_helpers import make_clip

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20

# Measured on a 2-CPU machine, 8 rounds: the 400-frame run peaked 2.3 to 4.6 MiB above the 40-frame run (~281
# MiB), and 5 MiB above it at 4000 frames (per-frame bookkeeping: the pts and latency lists, the MP4 sample
# tables, ~250 bytes a frame). Keeping one 320x180 I420 frame (86,400 bytes) per frame adds 360 x 86,400 B =
# 29.7 MiB (injected: +29.6 MiB, fails), 40% of one +13.5 MiB (fails), 25% +9.3 MiB (passes); a float RGB frame
# would be 237 MiB. A relative allowance would miss the first: 15% of 281 MiB is 42 MiB.
ALLOWANCE_MIB = 12


def _peak_rss_mib(source: Path, output: Path) -> tuple[float, dict]:
    """Run the CLI on the identity scorer and reap it with wait4: the kernel's ru_maxrss of that child alone."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gpu_worker", "stylize", str(source), str(output), "-s", "1",
                                 "--scorer", "identity", "--device", "cpu", "--json"], stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        assert proc.returncode == 0, err.read()
        return usage.ru_maxrss * 1024 / MiB, json.loads(out.read())


def test_peak_rss_is_bounded_by_the_pipeline_not_the_clip_length(tmp_path: Path) -> None:
    (tmp_path / "short").mkdir()
    (tmp_path / "long").mkdir()
    short = make_clip(tmp_path / "short", "bframes", seconds=1.6, size="320x180")  # 40 frames at 25 fps
    long = make_clip(tmp_path / "long", "bframes", seconds=16, size="320x180")  # 400 frames
    short_peak, short_summary = _peak_rss_mib(short, tmp_path / "short.mp4")
    long_peak, long_summary = _peak_rss_mib(long, tmp_path / "long.mp4")
    assert (short_summary["frames"], long_summary["frames"]) == (40, 400)
    assert long_peak <= short_peak + ALLOWANCE_MIB, (
        f"peak RSS {long_peak:.1f} MiB at 400 frames vs {short_peak:.1f} MiB at 40: "
        f"{(long_peak - short_peak) * MiB / 360:.0f} bytes a frame")
