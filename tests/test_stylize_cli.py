"""`stylize` as a person runs it: the whole local pipeline from the command line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.progress import STAGES
from tests.media_helpers import (
    _ffmpeg,
    display_aspect,
    ffmpeg_rgb_frames,
    frame_times,
    make_clip,
    sample_clip,
    video_stream_info,
)

REPO = Path(__file__).resolve().parents[1]


def stylize(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "local.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=_env())


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_run_produces_the_whole_video(tmp_path: Path) -> None:
    source = sample_clip("carphone_pristine.mp4")  # 176x144, SAR 128:117, 29.97 fps, 120 frames
    out = tmp_path / "result" / "carphone.mp4"
    result = stylize("run", str(source), "-s", "3:0.5,12:0.5", "-o", str(out), "--segment-seconds", "1.5",
                     "--workers", "2", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["frames"] == 120 and summary["segments"] == 3 and summary["output"] == str(out)
    assert frame_times(out) == frame_times(source)
    assert display_aspect(video_stream_info(out)) == display_aspect(video_stream_info(source))
    assert sorted(p.name for p in out.parent.iterdir()) == ["carphone.mp4"]  # no partial files beside it
    # --json keeps stdout to the summary, and progress still shows on stderr: off a terminal, a line when the
    # stage changes or another quarter of the frames is done, so stages come in order and counts only grow
    lines = [line.split() for line in result.stderr.splitlines() if line.strip()]
    stages = [words[0].rstrip("…") for words in lines]
    # the stitch of 120 small frames can fall between two redraws; the end is always shown
    assert "scoring" in stages and stages[-1] == "completed", result.stderr
    assert stages == sorted(stages, key=STAGES.index), stages
    done = [int(words[2].split("/")[0]) for words in lines if words[0] == "scoring"]
    assert done == sorted(done) and len(done) <= 5, result.stderr


@pytest.mark.parametrize("case", ["audio outlasts the video (mkv)", "a gap longer than a segment (vfr)"])
def test_ranges_the_video_has_no_frames_in_are_left_out(case: str, tmp_path: Path) -> None:
    """A Matroska file's duration counts its audio, so the plan can put a range past the last video frame; a
    variable-frame-rate video can leave a range between two frames. Both failed the whole job ("no video frames
    in [3.0, 4.0) s"); now such a range's segment is empty and the stitch leaves it out."""
    if case.startswith("audio"):
        source = tmp_path / "tail.mkv"  # 3 s of video at 10 fps, 5 s of audio
        _ffmpeg(["-f", "lavfi", "-i", "testsrc2=s=128x72:r=10:d=3", "-f", "lavfi", "-i", "sine=r=48000:d=5",
                 "-c:v", "libx264", "-c:a", "aac", str(source)])
    else:
        source = tmp_path / "gap.mp4"  # 25 frames in [0, 1) s, then 25 in [2.5, 3.5) s
        _ffmpeg(["-f", "lavfi", "-i", "testsrc2=s=128x72:r=25:d=2", "-vf",
                 "settb=1/1000,setpts='(if(lt(N,25),N/25,1.5+N/25))/TB'", "-fps_mode", "passthrough",
                 "-enc_time_base", "1/1000", "-c:v", "libx264", "-bf", "0", str(source)])
    out = tmp_path / "out.mp4"
    result = stylize("run", str(source), "-s", "7", "-o", str(out), "--segment-seconds", "1", "--temporal", "0",
                     "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert frame_times(out) == frame_times(source)
    assert json.loads(result.stdout)["frames"] == len(frame_times(source))
    if case.startswith("audio"):
        assert json.loads(result.stdout)["audio"] == "copy"


def test_progress_off_a_terminal_is_a_line_per_stage_and_quarter() -> None:
    from local.progress_view import ProgressView

    stream = io.StringIO()
    view = ProgressView(stream)
    for done in (0, 5, 10, 24, 25, 26, 99, 100):
        view.show({"stage": "scoring", "frames": {"done": done, "total": 100}})
    view.show({"stage": "stitching", "frames": {"done": 100, "total": 100}})
    view.close()
    assert [line.split()[2] for line in stream.getvalue().splitlines()] == [
        "0/100", "25/100", "99/100", "100/100", "100/100"]


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda d: d / "missing.mp4", [], "no such file"),
        (lambda d: _write(d / "fake.mp4", "not a video"), [], "fake.mp4 is not a video file"),
        (lambda d: _write(d / "playlist.mp4", "#EXTM3U\n#EXTINF:1,\n/etc/passwd\n"), [], "is not a video file"),
        (lambda d: make_clip(d, "bframes", seconds=1, size="64x48"), ["-s", "40"], "style 40 does not exist"),
        (lambda d: make_clip(d, "bframes", seconds=1, size="64x48"), ["-s", "nope.png"], "style image not found"),
        (lambda d: make_clip(d, "bframes", seconds=1, size="64x48"), ["-s", "https://example.com/starry.jpg"],
         "stylize run takes an image file on this machine"),
        (lambda d: make_clip(d, "bframes", seconds=1, size="64x48"), ["-s", "7", "--temporal", "2"],
         "temporal must be between 0 (off) and 0.95, got 2"),
        (lambda d: make_clip(d, "bframes", seconds=1, size="64x48"), ["-s", "7", "--segment-seconds", "0"],
         "--segment-seconds must be 1 to 3600, got 0"),  # 0 was taken as "not given"
        (lambda d: make_clip(d, "bframes", seconds=1, size="64x48"), ["-s", "7", "--workers", "0"],
         "--workers must be 1 to 64, got 0"),
        # no length known: it ran as one open-ended task past every limit (a security review)
        (lambda d: _raw_h264(d / "raw.mp4"), [], "raw.mp4 does not say how long it is"),
        (lambda d: make_clip(d, "bframes", seconds=0.2, size="64x48", rate=500), [],
         "the video runs at 500 frames a second; up to 240 are accepted"),
    ],
    ids=["missing", "not-a-video", "playlist", "bad-style", "missing-style-image", "style-url", "bad-temporal",
         "segment-seconds-0", "workers-0", "no-duration", "500-fps"],
)
def test_bad_input_exits_2_and_writes_nothing(make, args: list[str], message: str, tmp_path: Path) -> None:
    source = make(tmp_path)
    out = tmp_path / "out" / "result.mp4"
    result = stylize("run", str(source), "-o", str(out), *(args or ["-s", "7"]), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


def test_styles_contact_sheet(tmp_path: Path) -> None:
    picture = tmp_path / "picture.png"
    Image.new("RGB", (96, 64), (200, 120, 40)).save(picture)
    result = stylize("styles", "--image", str(picture), "-o", str(tmp_path / "sheet.png"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (7 * (96 + 6) + 6, 4 * (64 + 18 + 6) + 6)  # the original and 26 styles, 7 a row
    tiles = [sheet.crop((x, y, x + 96, y + 64)) for n in range(27)
             for x, y in [(6 + n % 7 * 102, 24 + n // 7 * 88)]]  # below each tile's label
    assert set(tiles[0].getdata()) == {(200, 120, 40)}  # the original first
    assert len({tile.tobytes() for tile in tiles}) == 27  # then every style, each looking different


def test_function_app_does_not_import_torch() -> None:
    """The Function App's deployment has no torch: importing it must not need one."""
    code = "import sys, function_app; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _raw_h264(path: Path) -> Path:
    _ffmpeg(["-f", "lavfi", "-i", "testsrc2=s=64x48:r=25:d=1", "-c:v", "libx264", "-f", "h264", str(path)])
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_killed_run_leaves_nothing_and_runs_again(tmp_path: Path) -> None:
    """`stylize run` killed mid-job: no output, no worker left running; the same command then succeeds."""
    import signal

    import psutil

    source = make_clip(tmp_path, "bframes", seconds=6, size="320x240")  # one task of several seconds
    out, scratch = tmp_path / "out.mp4", tmp_path / "tmp"
    scratch.mkdir()
    args = [sys.executable, "-m", "local.cli", "run", str(source), "-s", "7", "-o", str(out), "--segment-seconds", "6"]
    proc = subprocess.Popen(args, cwd=tmp_path, env={**_env(), "TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers = _scoring(proc, scratch)  # its work folder is in TMPDIR
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=2)  # far less than the task needs to finish by itself
    assert not alive, "workers outlived the killed run"
    assert not out.exists() and not list(tmp_path.glob(".out.mp4*"))
    again = stylize("run", str(source), "-s", "7", "-o", str(out), "--segment-seconds", "6", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert frame_times(out) == frame_times(source)


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(where: str, tmp_path: Path) -> None:
    """Found only after the whole job before, with a traceback and a partial file left beside it."""
    source = make_clip(tmp_path, "bframes", seconds=1, size="64x48")
    if where == "a folder":
        out = tmp_path / "out.mp4"
        out.mkdir()
    else:
        out = _write(tmp_path / "notes.txt", "x") / "out.mp4"
    result = stylize("run", str(source), "-s", "7", "-o", str(out), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: -o {out}: ") and len(result.stderr.splitlines()) == 1, result.stderr
    assert "scoring" not in result.stderr  # refused before any work
    assert not list(tmp_path.glob(".out.mp4*")) and (where != "a folder" or not list(out.iterdir()))


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_a_run_told_to_stop_cancels_and_leaves_nothing(stop: str, tmp_path: Path) -> None:
    """kill, timeout or a closed terminal: the same as Ctrl-C (its work folder, with the finished segments, stayed
    behind in /tmp before). Nothing else is left in $TMPDIR either: the compiled network's loader unpacked 3 MB
    there that only its destructor removed, which a killed worker never runs."""
    import signal

    import psutil

    source = make_clip(tmp_path, "bframes", seconds=6, size="320x240")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "local.cli", "run", str(source), "-s", "7", "-o", str(out),
                             "--segment-seconds", "6"], cwd=tmp_path, env={**_env(), "TMPDIR": str(scratch)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = _scoring(proc, scratch)  # its work folder is in TMPDIR
    proc.send_signal(getattr(signal, stop))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.rstrip().endswith("interrupted"), stderr
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, "workers outlived the run"
    assert not out.exists() and list(scratch.iterdir()) == []


def _scoring(proc: subprocess.Popen, folder: Path, timeout: float = 60) -> list:
    """The worker processes `stylize run` started, once one of them has written frames: a segment's progress file
    under ``folder`` (where the run's work folder is) counts some."""
    import contextlib
    import time

    import psutil

    from tests.processes import worker_processes

    def frames_done() -> int:
        counts = []
        for path in folder.rglob("progress"):
            with contextlib.suppress(OSError):  # removed meanwhile, with its task's folder
                counts.append(path.read_text().strip())
        return max((int(c) for c in counts if c.isdigit()), default=0)

    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = worker_processes(parent)
        if workers and frames_done() > 0:
            return workers
        time.sleep(0.05)
    raise AssertionError("no worker wrote a frame")


def test_run_takes_the_settings_defaults_for_what_it_is_not_told(tmp_path: Path) -> None:
    """DEFAULT_MAX_SIZE and DEFAULT_STRENGTH apply to stylize run as to the API (it always sent 0 and 1)."""
    source = make_clip(tmp_path, "bframes", seconds=0.4, size="128x96")
    out = tmp_path / "out.mp4"
    result = subprocess.run([sys.executable, "-m", "local.cli", "run", str(source), "-s", "7", "-o", str(out),
                             "--temporal", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**_env(), "DEFAULT_MAX_SIZE": "64", "DEFAULT_STRENGTH": "0"})
    assert result.returncode == 0, result.stderr
    info = video_stream_info(out)
    assert (info["width"], info["height"]) == (64, 48)
    shrunk = [cv2.resize(f, (64, 48), interpolation=cv2.INTER_AREA) for f in ffmpeg_rgb_frames(source, 5)]
    # strength 0 gives the source back: 12.6 levels from it here, as the two scalers differ on testsrc2's sharp
    # edges; style 7 at strength 1 is 84 levels away
    assert np.abs(ffmpeg_rgb_frames(out, 5).astype(float) - np.stack(shrunk)).mean() < 25


def test_run_refuses_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    source = sample_clip("carphone_pristine.mp4")
    result = subprocess.run([sys.executable, "-m", "local.cli", "run", str(source), "-s", "7", "-o",
                             str(tmp_path / "out.mp4")], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**_env(), "MAX_ATTEMPTS": "0"})
    assert result.returncode == 2
    assert result.stderr == "error: setting MAX_ATTEMPTS=0: must be 1 to 10\n"
    assert list(tmp_path.iterdir()) == []
