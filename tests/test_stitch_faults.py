"""Faults in joining segments and reading sources, each checked for what the user gets.

- re-encoded audio kept its samples but started at 0 while the video kept the source's timestamps, so a source
  whose streams start late (MPEG-TS: ~1.4 s) came out with its sound ahead of the picture;
- segments whose demuxer gives the first packets a pts and no dts (Matroska with B-frames) made the stitch
  fail with a TypeError;
- closing a source while the decoder thread waited inside ffmpeg for a stalled network freed what that read
  was using: the process crashed when the read came back.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import pytest

from gpu_worker.runner import run_range
from gpu_worker.scoring import IdentityScorer
from tests.media_helpers import (
    FFMPEG,
    click_time,
    first_frame_time,
    frame_times,
    make_clip,
    make_clip_with_click,
)

REPO = Path(__file__).resolve().parents[1]


def stitch_cli(output: Path, segments: list[Path], audio_from: Path | None = None) -> subprocess.CompletedProcess:
    listing = output.with_suffix(".json")
    listing.write_text(json.dumps([str(s) for s in segments]))
    args = ["stitch", str(output), "--list", str(listing), "--json"]
    if audio_from is not None:
        args += ["--audio-from", str(audio_from)]
    return subprocess.run([sys.executable, "-m", "gpu_worker", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def segments_of(source: Path, cuts: list[Fraction], tmp: Path) -> list[Path]:
    segments = []
    for i, (start, end) in enumerate(itertools.pairwise([Fraction(0), *cuts, None])):
        segments.append(tmp / f"seg{i}.mp4")
        run_range(str(source), segments[-1], IdentityScorer(), start, end)
    return segments


@pytest.mark.parametrize(
    ("audio_codec", "suffix", "expected"),
    [("mp2", ".ts", "aac"),  # MP4 cannot carry MP2 from MPEG-TS here: re-encoded, and the streams start ~1.4 s
     ("aac", ".mp4", "copy")],
    ids=["mpegts-mp2-reencoded", "mp4-aac-copied"],
)
def test_audio_keeps_its_offset_to_the_video(audio_codec: str, suffix: str, expected: str, tmp_path: Path) -> None:
    # the audio track starts 0.3 s after the video, and a burst 1 s into it marks a moment to hear
    source = make_clip_with_click(tmp_path, audio_codec, suffix, audio_delay=0.3)
    video_start = first_frame_time(source, "video")
    segments = segments_of(source, [video_start + 1], tmp_path)
    out = tmp_path / "out.mp4"

    result = stitch_cli(out, segments, audio_from=source)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["audio"] == expected
    assert frame_times(out) == frame_times(source)
    with av.open(str(source)) as container:
        audio = container.streams.audio[0].codec_context
        one_frame = Fraction(audio.frame_size or 1024, audio.sample_rate)
    source_offset = first_frame_time(source, "audio") - video_start
    out_offset = first_frame_time(out, "audio") - first_frame_time(out, "video")
    assert abs(out_offset - source_offset) <= one_frame, (float(out_offset), float(source_offset))
    # what a viewer notices: the burst is heard at the same moment of the picture as in the source
    heard_at = click_time(out) - first_frame_time(out, "video")
    assert abs(heard_at - (click_time(source) - video_start)) < Fraction(2, 1000), float(heard_at)


def test_segments_with_packets_without_decode_times_stitch(tmp_path: Path) -> None:
    """Matroska stores presentation times only; its demuxer leaves the first packets of a stream with B-frames
    (two here) without a dts, and the last two segments are shorter than that, so none of theirs get one."""
    source = make_clip(tmp_path, "bframes", seconds=2)
    times = frame_times(source)
    segments = []
    for segment in segments_of(source, [times[20], times[-3], times[-1]], tmp_path):
        remuxed = segment.with_suffix(".mkv")
        subprocess.run([FFMPEG, "-loglevel", "error", "-copyts", "-i", str(segment), "-c", "copy", str(remuxed)],
                       check=True)
        segments.append(remuxed)
    with av.open(str(segments[0])) as container:
        first = next(container.demux(video=0))
        assert first.pts is not None and first.dts is None  # the case this test is about

    out = tmp_path / "out.mp4"
    result = stitch_cli(out, segments)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["frames"] == len(times)
    assert frame_times(out) == times


# A reader thread decodes a URL whose server stops sending half way; the main thread closes the source while
# the reader waits inside ffmpeg, then the server sends the rest. MALLOC_PERTURB_ makes glibc scribble over
# freed memory, so a read that goes on in a freed context crashes every time instead of now and then.
_CLOSE_WHILE_READING = textwrap.dedent("""
    import json, sys, threading, time
    from fractions import Fraction
    from pathlib import Path
    from gpu_worker import media
    from tests.media_helpers import RangeFileServer

    source = Path(sys.argv[1])
    server = RangeFileServer(source.parent)
    server.max_response = 1 << 30  # one response for the rest of the file, as a real server sends
    server.stall_at = source.stat().st_size // 2
    container = media.open_source(f"{server.url}/{source.name}")
    stream = container.streams.video[0]
    frames, ended = [], []

    def read():
        try:
            for frame in media.decode_range(container, stream, Fraction(0), None):
                frames.append(frame.pts)
            ended.append("all frames")
        except BaseException as exc:
            ended.append(type(exc).__name__)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert server.stalled.wait(30), "the server never stalled"
    time.sleep(1)  # the reader has decoded what came and waits for more, inside ffmpeg
    waiting = reader.is_alive()
    began = time.monotonic()
    container.close()
    close_seconds = time.monotonic() - began
    server.release.set()
    reader.join(20)
    print(json.dumps({"waiting": waiting, "frames": len(frames), "close_seconds": close_seconds,
                      "reader_alive": reader.is_alive(), "ended": ended}), flush=True)
    server.close()
""")


def test_closing_a_source_while_its_reader_waits_on_the_network(tmp_path: Path) -> None:
    plain = make_clip(tmp_path, "bframes", seconds=4, size="320x240")
    source = tmp_path / "source.mp4"  # index first, so the stall falls among the frames, not in the index
    subprocess.run([FFMPEG, "-loglevel", "error", "-i", str(plain), "-c", "copy", "-movflags", "+faststart",
                    str(source)], check=True)

    result = subprocess.run([sys.executable, "-c", _CLOSE_WHILE_READING, str(source)], capture_output=True,
                            text=True, cwd=REPO, timeout=120, env={**os.environ, "MALLOC_PERTURB_": "165"})

    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["waiting"] and 0 < report["frames"] < 100  # closed mid-file, with the reader in a read
    assert report["close_seconds"] < 1  # close does not wait for the network
    # the reader leaves ffmpeg when its read returns, then stops at its next read instead of reading freed state
    assert not report["reader_alive"] and report["ended"] == ["SourceClosedError"]


def test_a_stitch_of_more_segments_than_open_files_allows(tmp_path: Path) -> None:
    """Every segment was opened at once: 3000 of them (1-second segments of a 50-minute video) ran out of file
    descriptors and failed the job as bad input after all the scoring. They are opened one at a time now."""
    import resource

    from gpu_worker.media import SegmentWriter

    segments = []
    for i in range(300):  # one frame each, at its own time
        path = tmp_path / f"{i:05d}.mp4"
        writer = SegmentWriter(path, width=16, height=16, time_base=Fraction(1, 25), sample_aspect_ratio=Fraction(1),
                               frame_rate=Fraction(25), matrix="itu601", preset="ultrafast")
        writer.write(av.VideoFrame(16, 16, "yuv420p"), i)
        writer.commit()
        segments.append(path)
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([str(p) for p in segments]))
    out = tmp_path / "out.mp4"

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))  # far fewer than the segments

    done = subprocess.run([sys.executable, "-m", "gpu_worker", "stitch", str(out), "--list", str(listing), "--json"],
                          capture_output=True, text=True, timeout=300, preexec_fn=few_files,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["frames"] == 300 and len(frame_times(out)) == 300
