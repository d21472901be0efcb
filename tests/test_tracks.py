"""Every track comes through (issue 16): all audio tracks, text subtitles, chapters, the container's title and
creation time, and the video's colour description; what MP4 cannot carry is dropped and listed with its reason.

The source (tests/media_helpers.make_clip_with_tracks) is a 1.6 s Matroska file with three audio tracks — AAC that
MP4 takes, PCM 5.1 that MP4 players do not, WMA that the mp4 muxer refuses, the last starting 0.25 s late — SRT
and ASS subtitles, VobSub, PGS and DVB bitmap subtitles, a font attachment, two chapters, a title and a creation
time. It goes through the worker's commands (`stylize` twice, then `stitch`), through `stylize run --json` (the
Function App in the local Durable host) and through the Batch path (fake Batch, Azurite). Colour sources and
sources over the track limits go through the worker's commands.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from gpu_worker import colour, media, tracks
from gpu_worker.errors import InputError
from gpu_worker.runner import run_range
from gpu_worker.scoring import IdentityScorer
from gpu_worker.stitch import stitch
from tests.media_helpers import (
    AUDIO_TRACKS,
    BITMAP_SUBTITLES,
    CHAPTERS,
    CONTAINER_TITLE,
    CREATION_TIME,
    TEXT_SUBTITLES,
    click_time,
    colour_description,
    distance_from_source,
    first_frame_time,
    frame_times,
    make_clip_with_many_tracks,
    make_clip_with_tracks,
    make_colour_clip,
    subtitle_cues,
)
from tests.stacks import open_stack

REPO = Path(__file__).resolve().parents[1]
BITMAP_REASON = "bitmap subtitles cannot be carried in MP4"


def worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpu_worker", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def stylize_and_stitch(source: Path, tmp: Path, cuts: list[str]) -> tuple[Path, dict]:
    """The task commands as the pipeline runs them: `stylize` per range (at once: they are separate tasks), then
    `stitch` of the segments with the source."""
    bounds = [None, *cuts, None]
    procs, segments = [], []
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        segments.append(tmp / f"seg{i}.mp4")
        procs.append(worker("stylize", str(source), str(segments[-1]), "-s", "1", "--scorer", "identity", "--json",
                            *(["--start", start] if start else []), *(["--end", end] if end else [])))
    for proc in procs:
        result = finish(proc)
        assert result.returncode == 0, result.stderr
    listing = tmp / "segments.json"
    listing.write_text(json.dumps([str(s) for s in segments]))
    out = tmp / "out.mp4"
    result = finish(worker("stitch", str(out), "--list", str(listing), "--audio-from", str(source), "--json"))
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip_with_tracks(tmp_path_factory.mktemp("tracks"))


@pytest.fixture(scope="module")
def stitched(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return stylize_and_stitch(source, tmp_path_factory.mktemp("stitched"), ["1"])


def streams_of(path: Path) -> list[dict]:
    with av.open(str(path)) as container:
        return [{"type": s.type, "codec": s.codec_context.name if getattr(s, "codec_context", None) else None,
                 "language": tracks.language(s), "title": tracks.title(s),
                 "default": bool(s.disposition & av.stream.Disposition.default),
                 "forced": bool(s.disposition & av.stream.Disposition.forced),
                 **({"channels": s.codec_context.channels, "layout": s.codec_context.layout.name,
                     "rate": s.codec_context.sample_rate} if s.type == "audio" else {})}
                for s in container.streams]


def assert_tracks_came_through(out: Path, report: list[dict]) -> None:
    """The output's streams, in order, with their labels; and the report's account of every source stream."""
    streams = streams_of(out)
    # video, the audio tracks, the text subtitles — then only the chapter list's text track that MP4 writes
    assert [s["type"] for s in streams[:6]] == ["video", "audio", "audio", "audio", "subtitle", "subtitle"]
    assert [s["type"] for s in streams[6:]] == ["data"]
    audio = streams[1:4]
    assert [s["codec"] for s in audio] == ["aac"] * 3
    assert [(s["language"], s["title"], s["default"]) for s in audio] == [
        (t["language"], t["title"], t["disposition"] == "default") for t in AUDIO_TRACKS]
    assert [(s["channels"], s["layout"], s["rate"]) for s in audio] == [
        (t["channels"], t["layout"], t["rate"]) for t in AUDIO_TRACKS]
    subtitles = streams[4:6]
    assert [(s["codec"], s["language"], s["title"], s["default"], s["forced"]) for s in subtitles] == [
        ("mov_text", lang, title, disposition == "default", disposition == "forced")
        for _, lang, title, disposition in TEXT_SUBTITLES]

    assert [t["index"] for t in report] == list(range(10)), "every source stream is listed once, in order"
    assert [(t["type"], t["codec"], t["action"]) for t in report] == [
        ("video", "h264", "stylized"),
        ("audio", "aac", "copied"),
        ("audio", "pcm_s16le", "re-encoded to aac"),
        ("audio", "wmav2", "re-encoded to aac"),
        ("subtitle", "subrip", "converted to mov_text"),
        ("subtitle", "ass", "converted to mov_text"),
        *[("subtitle", codec, "dropped") for codec, _ in BITMAP_SUBTITLES],
        ("attachment", "application/x-truetype-font", "dropped"),
    ]
    assert [(t["language"], t["reason"]) for t in report[6:9]] == [(lang, BITMAP_REASON)
                                                                  for _, lang in BITMAP_SUBTITLES]
    assert report[9]["reason"].startswith("MP4 cannot carry attachments")
    assert report[2]["reason"] == "MP4 players do not take pcm_s16le" and report[2]["bit_rate"] == 416_000


def test_every_audio_and_text_subtitle_track_comes_through_in_order(stitched: tuple[Path, dict],
                                                                     source: Path) -> None:
    out, summary = stitched
    assert frame_times(out) == frame_times(source)
    assert summary["audio"] == "copy+aac"
    assert_tracks_came_through(out, summary["tracks"])
    # the AAC track is copied, not re-encoded: its packets are the source's, byte for byte
    with av.open(str(source)) as a, av.open(str(out)) as b:
        ours = [bytes(p) for p in b.demux(b.streams.audio[0]) if p.size]
        theirs = [bytes(p) for p in a.demux(a.streams.audio[0]) if p.size]
    assert ours == theirs


def test_each_audio_track_keeps_its_offset_to_the_picture(stitched: tuple[Path, dict], source: Path) -> None:
    """Each track's burst is heard at the same moment of the picture as in the source (within 2 ms), the
    re-encoded ones included, and the late-starting track's 0.25 s too."""
    out, _ = stitched
    video_in, video_out = first_frame_time(source, "video"), first_frame_time(out, "video")
    for track, spec in enumerate(AUDIO_TRACKS):
        expected = click_time(source, track=track) - video_in
        assert abs(expected - Fraction(spec["click"] + spec["delay"]).limit_denominator(1000)) < Fraction(2, 1000)
        heard = click_time(out, track=track) - video_out
        assert abs(heard - expected) < Fraction(2, 1000), (spec["codec"], float(heard), float(expected))


def test_text_subtitles_keep_their_cues(stitched: tuple[Path, dict], source: Path) -> None:
    out, _ = stitched
    for index in range(len(TEXT_SUBTITLES)):
        cues = subtitle_cues(out, index)
        assert cues == subtitle_cues(source, index) and len(cues) == 2  # start, duration and text, exactly


def test_chapters_title_and_creation_time_come_through(stitched: tuple[Path, dict]) -> None:
    out, summary = stitched
    with av.open(str(out)) as container:
        chapters = [(round(1000 * c["start"] * c["time_base"]), round(1000 * c["end"] * c["time_base"]),
                     c["metadata"]["title"]) for c in container.chapters()]
        metadata = container.metadata
    assert chapters == CHAPTERS and summary["chapters"] == 2
    assert metadata["title"] == CONTAINER_TITLE and metadata["creation_time"] == CREATION_TIME
    assert summary["metadata"] == {"title": CONTAINER_TITLE, "creation_time": CREATION_TIME}


def test_bt709_tags_are_carried(stitched: tuple[Path, dict]) -> None:
    out, summary = stitched
    assert colour_description(out) == {"primaries": "bt709", "transfer": "bt709", "matrix": "bt709", "range": "tv",
                                       "pixel_format": "yuv420p"}
    assert summary["video"]["colour"] == {"primaries": "bt709", "transfer": "bt709", "matrix": "bt709",
                                          "range": "tv"}
    assert summary["video"]["converted"] == []


def test_an_mp4_output_stitched_again_is_copied_whole(stitched: tuple[Path, dict], tmp_path: Path) -> None:
    """The output as a source: AAC and mov_text are copied as they are; MP4's chapter text track is a data stream,
    listed as dropped (its chapters come through as chapters)."""
    out, _ = stitched
    again = stitch([out.parent / "seg0.mp4", out.parent / "seg1.mp4"], tmp_path / "again.mp4", str(out))
    assert [t["action"] for t in again.tracks] == ["stylized", *["copied"] * 5, "dropped"]
    assert again.tracks[-1]["type"] == "data" and "chapters come through as chapters" in again.tracks[-1]["reason"]
    assert streams_of(tmp_path / "again.mp4") == streams_of(out)
    assert again.chapters == 2


@pytest.mark.parametrize(("case", "expected", "converted"), [
    ("full_range", {"primaries": "bt470bg", "transfer": "smpte170m", "matrix": "bt470bg", "range": "pc"}, []),
    ("ten_bit", {"primaries": "bt709", "transfer": "bt709", "matrix": "bt709", "range": "tv"}, ["10-bit → 8-bit"]),
    ("hdr_pq", {"primaries": "bt709", "transfer": "bt709", "matrix": "bt709", "range": "tv"},
     ["HDR (PQ) → SDR (bt709)", "10-bit → 8-bit"]),
])
def test_colour_description_is_carried_and_conversions_are_said(case: str, expected: dict, converted: list[str],
                                                                 tmp_path: Path) -> None:
    """The segment is made in-process (the `stylize` command is run_range behind its options; the tracks tests
    above run the command) and stitched by the `stitch` command, whose JSON says what was converted."""
    source = make_colour_clip(tmp_path, case)
    segment, out = tmp_path / "seg.mp4", tmp_path / "out.mp4"
    run_range(str(source), segment, IdentityScorer())
    result = finish(worker("stitch", str(out), str(segment), "--audio-from", str(source), "--json"))
    assert result.returncode == 0, result.stderr
    video = json.loads(result.stdout)["video"]
    tags = colour_description(out)
    assert {k: tags[k] for k in expected} == expected and tags["pixel_format"] in ("yuv420p", "yuvj420p")
    assert video["colour"] == expected and video["converted"] == converted
    if case == "full_range":
        # the picture as a player shows it is the source's, as close as ffmpeg's own transcode gets: full-range
        # pixels tagged limited (or the reverse) would be off by up to 16 levels in the darks and lights
        ours, ffmpegs = distance_from_source(source, out, tmp_path)
        assert ours < ffmpegs + 1.0, (ours, ffmpegs)


def test_full_range_conversion_on_the_device_matches_swscale() -> None:
    """The GPU path's RGB → YUV (colour.rgb_to_yuv420) in full range, as swscale does it on the CPU path."""
    rgb = np.random.default_rng(16).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    ours = colour.rgb_to_yuv420(colour.to_floats(torch.from_numpy(rgb[None])), "itu601",
                                full_range=True)[0].numpy().astype(int)
    swscale = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
        format="yuv420p", src_colorspace="itu601", dst_colorspace="itu601", src_color_range=2, dst_color_range=2,
        interpolation="AREA").to_ndarray().astype(int)
    assert np.abs(ours[:64] - swscale[:64]).max() <= 1  # luma
    assert np.abs(ours[64:] - swscale[64:]).mean() < 1  # chroma (both average 2x2 blocks)


@pytest.mark.parametrize("kind", ["audio", "subtitle"])
def test_more_than_32_tracks_are_refused_before_any_work(kind: str, tmp_path: Path) -> None:
    message = f"33_{kind}.mkv has 33 {kind} tracks; at most 32 audio and 32 subtitle tracks are accepted"
    many = make_clip_with_many_tracks(tmp_path, kind, 33)
    with pytest.raises(InputError, match=message):
        media.probe(str(many))  # what pipeline.jobs.prepare runs: the job fails before any task
    assert media.probe(str(make_clip_with_many_tracks(tmp_path, kind, 32))).audio_tracks == (32 if kind == "audio"
                                                                                            else 0)
    if kind == "audio":
        result = finish(worker("stylize", str(many), str(tmp_path / "seg.mp4"), "-s", "1", "--scorer", "identity"))
    else:
        plain = make_colour_clip(tmp_path, "bt709", seconds=0.2)
        result = finish(worker("stitch", str(tmp_path / "out.mp4"), str(plain), "--audio-from", str(many)))
        assert not (tmp_path / "out.mp4").exists()
    assert result.returncode == 2 and result.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "seg.mp4").exists()


def test_a_job_with_too_many_tracks_fails_at_probing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    many = make_clip_with_many_tracks(tmp_path, "audio", 33)
    with open_stack("local", tmp_path, monkeypatch) as stack:
        submitted, submit = [], stack.svc.compute.submit
        monkeypatch.setattr(stack.svc.compute, "submit", lambda job, tasks: submitted.append(tasks) or submit(job,
                                                                                                              tasks))
        job_id = stack.start(stack.put(many, "many.mkv"), style="7")
        status = stack.wait(job_id)
        assert status["runtimeStatus"] == "Failed"
        assert status["customStatus"]["error"] == {
            "kind": "input", "message": "many.mkv has 33 audio tracks; at most 32 audio and 32 subtitle tracks are "
                                        "accepted"}
        assert submitted == []  # no task was ever submitted
        assert "segments" not in status["customStatus"]  # nor planned


def test_aac_settings_for_awkward_tracks() -> None:
    assert tracks.aac_settings(192000, 2, "stereo") == (tracks.AacSettings(96000, "stereo", 160_000),
                                                        ["resampled 192000 → 96000 Hz"])
    assert tracks.aac_settings(48000, 6, "6 channels")[0] == tracks.AacSettings(48000, "5.1", 416_000)
    assert tracks.aac_settings(44100, 1, "mono")[0].bit_rate == 96_000


def test_stylize_run_json_and_the_manifest_list_every_track(source: Path, tmp_path: Path) -> None:
    """`stylize run --json`: the whole local pipeline (Function App, Durable orchestrator, worker processes)."""
    out, work = tmp_path / "out.mp4", tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "local.cli", "run", str(source), "-s", "7", "-o", str(out),
                             "--segment-seconds", "1", "--json", "--work-dir", str(work)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert_tracks_came_through(out, summary["tracks"])
    assert summary["audio"] == "copy+aac" and summary["chapters"] == 2
    assert summary["video"]["colour"]["matrix"] == "bt709" and summary["video"]["converted"] == []
    manifest = json.loads(next((work / "output").glob("*.json")).read_text())
    assert manifest["tracks"] == summary["tracks"] and manifest["video"] == summary["video"]


def test_batch_stitch_keeps_every_track(source: Path, azurite: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with open_stack("batch", tmp_path, monkeypatch, azurite) as stack:
        job_id = stack.start(stack.put(source, "tracks.mkv"), style="7")
        status = stack.wait(job_id)
        assert status["runtimeStatus"] == "Completed", status
        out = stack.download("output", "tracks.mp4", tmp_path / "out.mp4")
        manifest = stack.svc.storage.read_json(stack.settings.output_container, "tracks.json")
    assert_tracks_came_through(out, manifest["tracks"])
    assert status["output"]["tracks"] == manifest["tracks"] and manifest["chapters"] == 2
    assert manifest["metadata"]["creation_time"] == CREATION_TIME
