"""Split a video into half-open ranges, score each, stitch: the source's exact frames come back.

These run the real decode/encode path with the identity scorer so that they isolate timing and
container behaviour from the network (the network has its own tests).
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from gpu_worker import media
from gpu_worker.runner import CODEC_NICE, run_range
from gpu_worker.scoring import IdentityScorer
from gpu_worker.stitch import stitch
from tests.media_helpers import (
    FFMPEG,
    HARD_CASES,
    RangeFileServer,
    display_aspect,
    display_size,
    distance_from_source,
    frame_times,
    make_clip,
    make_clip_with_audio,
    sample_clip,
    video_stream_info,
)


def split_and_stitch(source: Path, cuts: list[Fraction], tmp: Path, audio: bool = False) -> tuple[list, Path]:
    bounds = [Fraction(0), *cuts, None]
    segments = []
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        out = tmp / f"seg{i:03d}.mp4"
        run_range(str(source), out, IdentityScorer(), start, end)
        segments.append(out)
    final = tmp / "stitched.mp4"
    stitch(segments, final, str(source) if audio else None)
    return segments, final


def cuts_for(times: list[Fraction]) -> list[Fraction]:
    """One cut exactly on a frame's pts, one between two frames, one a hair after a frame."""
    n = len(times)
    on_frame = times[n // 3]
    between = (times[n // 2] + times[n // 2 + 1]) / 2
    after = times[2 * n // 3] + Fraction(1, 10_000_000)
    return [on_frame, between, after]


@pytest.mark.parametrize("case", [*HARD_CASES, "rotated"])
def test_ranges_concatenate_to_the_source_frames(case: str, tmp_path: Path) -> None:
    source = make_clip(tmp_path, case)
    times = frame_times(source)
    cuts = cuts_for(times)
    segments, final = split_and_stitch(source, cuts, tmp_path)

    # every segment holds exactly its half-open range, and starts on an IDR frame
    bounds = [Fraction(-1), *cuts, Fraction(10**9)]
    for segment, lo, hi in zip(segments, bounds, bounds[1:], strict=False):
        assert frame_times(segment) == [t for t in times if lo <= t < hi]
        assert video_stream_info(segment)["starts_with_idr"]

    assert frame_times(final) == times  # same count, same timestamps, nothing duplicated or lost
    src, out = video_stream_info(source), video_stream_info(final)
    assert (out["codec"], out["pix_fmt"]) == ("h264", "yuv420p")
    assert out["rotation"] == 0  # rotation is applied to the pixels …
    assert display_aspect(out) == display_aspect(src)  # … so the display shape is the source's
    if case != "odd_size":  # 4:2:0 cannot store odd sides: that case is checked on its own below
        assert display_size(out) == display_size(src)


def test_cut_between_frames_belongs_to_the_later_range(tmp_path: Path) -> None:
    source = make_clip(tmp_path, "bframes", seconds=1)
    times = frame_times(source)
    cut = (times[10] + times[11]) / 2
    run_range(str(source), tmp_path / "a.mp4", IdentityScorer(), Fraction(0), cut)
    run_range(str(source), tmp_path / "b.mp4", IdentityScorer(), cut, None)
    assert frame_times(tmp_path / "a.mp4")[-1] == times[10]
    assert frame_times(tmp_path / "b.mp4")[0] == times[11]


def test_range_over_http_reads_a_part_of_the_file_not_all_of_it(tmp_path: Path) -> None:
    source = make_clip(tmp_path, "bframes", seconds=20, size="640x480")
    server = RangeFileServer(tmp_path)
    try:
        result = run_range(f"{server.url}/{source.name}", tmp_path / "out.mp4", IdentityScorer(),
                           Fraction(15), Fraction(16))
    finally:
        server.close()
    assert result.frames == 25
    assert frame_times(tmp_path / "out.mp4") == [t for t in frame_times(source) if 15 <= t < 16]
    # the index plus about one second of a twenty-second file; TCP read-ahead keeps it above 1/20
    assert server.bytes_sent < source.stat().st_size / 4


def test_non_square_pixels_keep_their_aspect(tmp_path: Path) -> None:
    source = sample_clip("carphone_pristine.mp4")  # 176x144, SAR 128:117, 29.97 fps
    out = tmp_path / "out.mp4"
    result = run_range(str(source), out, IdentityScorer(), Fraction(1), Fraction(2))
    info = video_stream_info(out)
    assert info["sar"] == Fraction(128, 117)
    assert display_size(info) == display_size(video_stream_info(source))
    assert result.frames == len([t for t in frame_times(source) if 1 <= t < 2])


def test_odd_size_is_encoded_even_with_the_same_display_size(tmp_path: Path) -> None:
    source = make_clip(tmp_path, "odd_size", seconds=1)
    out = tmp_path / "out.mp4"
    run_range(str(source), out, IdentityScorer())
    info = video_stream_info(out)
    assert (info["width"] % 2, info["height"] % 2) == (0, 0)
    # 4:2:0 has no odd sides: the next even size, with the SAR adjusted so the shape is unchanged
    src = video_stream_info(source)
    assert display_aspect(info) == display_aspect(src)
    assert [abs(a - b) for a, b in zip(display_size(info), display_size(src), strict=True)] <= [1, 1]


@pytest.mark.parametrize(("codec", "suffix", "expected"), [("aac", ".mp4", "copy"), ("pcm_s16le", ".mkv", "aac")])
def test_stitch_puts_the_audio_back(codec: str, suffix: str, expected: str, tmp_path: Path) -> None:
    source = make_clip_with_audio(tmp_path, codec, suffix)
    times = frame_times(source)
    segments, final = split_and_stitch(source, [times[20]], tmp_path, audio=True)
    assert frame_times(final) == times
    with av.open(str(final)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
        audio_seconds = float(container.streams.audio[0].duration * container.streams.audio[0].time_base)
    assert audio_seconds == pytest.approx(2.0, abs=0.05)
    assert stitch(segments, tmp_path / "again.mp4", str(source)).audio == expected


def test_big_buck_bunny_keeps_its_5_1_audio(tmp_path: Path) -> None:
    source = sample_clip("bigbuckbunny.mp4")
    times = frame_times(source)
    _, final = split_and_stitch(source, [Fraction(2), Fraction(4)], tmp_path, audio=True)
    assert frame_times(final) == times
    with av.open(str(final)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.channels == 6


def test_failed_run_leaves_nothing_at_output(tmp_path: Path) -> None:
    source = make_clip(tmp_path, "bframes", seconds=1)

    class Exploding(IdentityScorer):
        def score(self, frames):
            raise RuntimeError("model crashed")

    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="model crashed"):
        run_range(str(source), out, Exploding())
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


def test_range_without_frames_is_bad_input(tmp_path: Path) -> None:
    source = make_clip(tmp_path, "bframes", seconds=1)
    with pytest.raises(media.InputError, match="no video frames"):
        run_range(str(source), tmp_path / "out.mp4", IdentityScorer(), Fraction(5), Fraction(6))
    assert not (tmp_path / "out.mp4").exists()


def test_a_segment_ends_as_well_coded_as_the_same_frame_in_one_piece(tmp_path: Path) -> None:
    """A range that another one follows ends as if the video went on: its last frame is as close to the source
    as the same frame of a one-piece encode. Coded as a stream's end it was 11% further off on bikes (x264
    spent fewer bits on frames it saw nothing after), which, with the next segment's keyframe, pulsed at
    every join."""
    source = sample_clip("bikes.mp4")
    with av.open(str(source)) as container:
        source_frame = next(itertools.islice(container.decode(video=0), 49, None)).to_ndarray(format="rgb24")

    def last_frame_error(end: Fraction | None) -> tuple[float, int]:
        out = tmp_path / f"upto-{end}.mp4"
        run_range(str(source), out, IdentityScorer(), Fraction(0), end)
        with av.open(str(out)) as container:
            frames = list(container.decode(video=0))
        frame = frames[49].to_ndarray(format="rgb24").astype(float)
        return float(np.abs(frame - source_frame).mean()), len(frames)

    segment, segment_frames = last_frame_error(Fraction(2))
    whole, whole_frames = last_frame_error(None)
    assert (segment_frames, whole_frames) == (50, 250)
    assert segment <= 1.03 * whole, (segment, whole)


@pytest.mark.parametrize("preset", ["veryfast", "veryslow"])
def test_a_continued_segment_holds_exactly_the_frames_written(preset: str, tmp_path: Path) -> None:
    """commit(continues=True) encodes copies past the last frame and drops them. The file holds the frames written
    with their pts and decodes without a word from ffmpeg, the last one a P frame (a B frame would refer forward to a
    dropped copy), also at the preset with the most B frames, on a still picture that invites them, and with one
    frame object handed in twice (the writer holds a frame back until the next arrives)."""
    with av.open(str(sample_clip("bikes.mp4"))) as container:
        picture = next(container.decode(video=0)).to_ndarray(format="rgb24")
    out = tmp_path / "continued.mp4"
    writer = media.SegmentWriter(out, width=picture.shape[1], height=picture.shape[0], time_base=Fraction(1, 12800),
                                 sample_aspect_ratio=Fraction(1), frame_rate=Fraction(25), matrix="itu709",
                                 preset=preset)
    frames = [writer.yuv_frame(picture) for _ in range(29)]
    written = [512 * i for i in range(30)]
    for frame, pts in zip([*frames, frames[-1]], written, strict=True):
        writer.write(frame, pts)
    writer.commit(continues=True)
    with av.open(str(out)) as container:
        decoded = list(container.decode(video=0))
    assert [f.pts for f in decoded] == written
    assert decoded[-1].pict_type == av.video.frame.PictureType.P
    complaints = subprocess.run([FFMPEG, "-v", "warning", "-i", str(out), "-f", "null", "-"], capture_output=True,
                                text=True).stderr
    assert complaints == ""


@pytest.mark.parametrize("case", ["bframes", "rotated", "mirrored", "upside_down_mirror", "rotated_mirrored",
                                  "rotated_back_mirrored", "yuv444_10bit"])
def test_pixels_survive_the_round_trip(case: str, tmp_path: Path) -> None:
    """Decode, colour conversion on the device, rotation and encode keep the picture: with the identity
    scorer the output is as close to the source (as ffmpeg itself shows it) as ffmpeg's own transcode at the
    same quality. A swapped chroma plane, a wrong matrix or a rotation the wrong way round would each be
    off by tens of levels; so would a mirror shown as a half turn (as PyAV's rotation reads it) or lost."""
    source = make_clip(tmp_path, case, seconds=1, size="160x96")
    out = tmp_path / "out.mp4"
    run_range(str(source), out, IdentityScorer())
    ours, ffmpegs = distance_from_source(source, out, tmp_path)
    assert ours < ffmpegs + 1.0, (ours, ffmpegs)


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own priority is a Linux notion")
def test_on_the_cpu_the_codec_threads_give_way_to_the_network(tmp_path: Path) -> None:
    source = make_clip(tmp_path, "bframes", seconds=1)
    seen: dict[str, int] = {}

    def nice(tid: int) -> int:
        return int((Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2]).split()[16])

    class Watching(IdentityScorer):
        def score(self, frames):
            if not seen:
                seen["scoring"] = nice(threading.get_native_id())
                for thread in threading.enumerate():
                    if thread.name in ("decoder", "encoder"):
                        seen[thread.name] = nice(thread.native_id)
                for task in Path("/proc/self/task").iterdir():
                    with contextlib.suppress(OSError):  # threads come and go meanwhile
                        if (task / "comm").read_text().startswith("av:"):
                            seen[f"ffmpeg {task.name}"] = nice(int(task.name))
            return frames

    run_range(str(source), tmp_path / "out.mp4", Watching())
    assert seen.pop("scoring") == 0  # the thread that runs the network keeps its priority
    assert {"decoder", "encoder"} <= seen.keys() and any(name.startswith("ffmpeg") for name in seen)
    assert all(value >= CODEC_NICE for value in seen.values()), seen


@pytest.mark.parametrize(("suffix", "codecs"), [(".mkv", ["libx264", "aac"]), (".webm", ["libvpx-vp9", "libopus"]),
                                                (".ts", ["libx264", "aac"])])
def test_probe_measures_the_video_not_the_audio_after_it(suffix: str, codecs: list[str], tmp_path: Path) -> None:
    """These containers give no duration for the video stream alone, and theirs counts the audio: 3 s of video
    with 6 s of audio probed as 6 s, so the plan put ranges past the last frame and the progress counted 150
    frames for 75. The video's end is now read from its last packets."""
    source = tmp_path / f"tail{suffix}"
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=128x72:r=25:d=3", "-f", "lavfi", "-i",
                    "sine=r=48000:d=6", "-c:v", codecs[0], "-deadline", "realtime", "-c:a", codecs[1], str(source)],
                   check=True)
    info = media.probe(str(source))
    times = frame_times(source)
    assert abs(info.duration_seconds - float(times[-1] - times[0] + Fraction(1, 25))) < 0.05, info


def test_probe_reads_a_bounded_tail_for_the_videos_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Matroska header that lies about the duration (1 s for 600) made the seek land at the start and the read
    run through the whole file, in the Function App: the read stops at VIDEO_END_READ_LIMIT bytes and the
    container's duration stands."""
    source = tmp_path / "tail.mkv"
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=128x72:r=25:d=3", "-f", "lavfi", "-i",
                    "sine=r=48000:d=6", "-c:v", "libx264", "-c:a", "aac", str(source)], check=True)
    monkeypatch.setattr(media, "VIDEO_END_READ_LIMIT", 1000)  # less than the last seconds take
    assert media.probe(str(source)).duration_seconds > 5.9  # the container's: the video's end was not searched for
