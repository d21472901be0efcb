"""`python -m gpu_worker` as a compute task runs it: exit codes, one-line errors, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tests.media_helpers import (
    FFMPEG,
    RangeFileServer,
    display_aspect,
    frame_times,
    make_clip,
    sample_clip,
    video_stream_info,
)

REPO = Path(__file__).resolve().parents[1]


def worker(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpu_worker", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300, env={**os.environ, **(env or {})})


def assert_bad_input(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip"), "bframes", seconds=2, size="64x48")


def identity(source: str, output: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return worker("stylize", source, str(output), "-s", "1", "--scorer", "identity", *extra, env=env)


def test_json_summary(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg.mp4"
    result = identity(str(clip), out, "--start", "0.5", "--end", "1.5", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["frames"] == 25 == len(frame_times(out))
    for key in ("seconds", "fps", "device", "decode_seconds", "score_seconds", "encode_seconds", "peak_rss_mb"):
        assert key in summary


def test_progress_file_counts_frames_written_for_the_backend(clip: Path, tmp_path: Path) -> None:
    """A backend that sets WORKER_PROGRESS_FILE reads a running task's frames from it: a whole number, never
    above the range's frames, and no partial file left beside it."""
    progress = tmp_path / "progress"
    result = identity(str(clip), tmp_path / "seg.mp4", "--end", "1", "--json",
                      env={"WORKER_PROGRESS_FILE": str(progress)})
    assert result.returncode == 0, result.stderr
    assert 1 <= int(progress.read_text()) <= json.loads(result.stdout)["frames"] == 25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress", "seg.mp4"]


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d, clip: d / "missing.mp4", "no such file"),
        (lambda d, clip: _write(d / "empty.mp4", b""), "empty.mp4 is empty"),
        (lambda d, clip: _write(d / "notes.mp4", "just some text\n" * 50), "notes.mp4 is not"),
        (lambda d, clip: _write(d / "cut.mp4", clip.read_bytes()[: clip.stat().st_size // 2]), "cut.mp4 is not"),
        (lambda d, clip: d, "not a file"),
    ],
    ids=["missing", "empty", "text", "truncated", "directory"],
)
def test_unreadable_sources(make, message: str, clip: Path, tmp_path: Path) -> None:
    source = make(tmp_path, clip)
    out = tmp_path / "out" / "seg.mp4"
    out.parent.mkdir()
    assert_bad_input(identity(str(source), out), message)
    assert list(out.parent.iterdir()) == []


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    audio = tmp_path / "tone.m4a"
    subprocess.run([FFMPEG, "-loglevel", "error", "-f", "lavfi", "-i", "sine", "-t", "1", str(audio)], check=True)
    assert_bad_input(identity(str(audio), tmp_path / "o.mp4"), "tone.m4a has no video stream")


def test_playlists_and_concat_lists_are_refused_not_followed(clip: Path, tmp_path: Path) -> None:
    server = RangeFileServer(tmp_path)
    shutil.copy(clip, tmp_path / "remote.mp4")
    try:
        lists = {
            "local.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{clip}\n#EXT-X-ENDLIST\n",
            "remote.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{server.url}/remote.mp4\n#EXT-X-ENDLIST\n",
            "list.ffconcat": f"ffconcat version 1.0\nfile '{clip}'\n",
            "list.txt": f"file '{clip}'\n",
        }
        for name, text in lists.items():
            result = identity(str(_write(tmp_path / name, text)), tmp_path / "o.mp4")
            assert result.returncode == 2, (name, result.stderr)
            assert "not a video file this service accepts" in result.stderr
        served_playlist = identity(f"{server.url}/remote.m3u8", tmp_path / "o.mp4")
        assert served_playlist.returncode == 2
    finally:
        server.close()
    assert server.bytes_sent == len(lists["remote.m3u8"])  # the playlist itself, never the file it names
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("source", ["file:///etc/passwd", "concat:a.mp4|b.mp4", "ftp://example.org/a.mp4"])
def test_other_protocols_are_refused(source: str, tmp_path: Path) -> None:
    assert_bad_input(identity(source, tmp_path / "o.mp4"), "unsupported source")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--start", "2", "--end", "1"], "bad range"),
        (["--start", "-1"], "must not be negative"),
        (["--start", "abc"], "not a number of seconds"),
        (["--start", "inf"], "not a number of seconds"),
        (["--end", "Infinity"], "not a number of seconds"),
        (["--start", "50"], "no video frames in [50.0, end)"),
    ],
)
def test_bad_ranges(args: list[str], message: str, clip: Path, tmp_path: Path) -> None:
    assert_bad_input(identity(str(clip), tmp_path / "o.mp4", *args), message)
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize(("case", "size", "max_size"), [("odd_size", "99x75", 64), ("bframes", "2048x16", 160),
                                                       ("non_square", "160x120", 64)])
def test_max_size_keeps_the_display_aspect(case: str, size: str, max_size: int, tmp_path: Path) -> None:
    """Scaling rounds each side to whole pixels (2048x16 at --max-size 160 is 160x2, not 160x1.25); the rounding
    now goes into the pixel aspect ratio, as the rounding up to even sides does, instead of squashing the picture
    (a display aspect of 80 instead of 128 there, 1.333 instead of 1.32 for 99x75)."""
    source = make_clip(tmp_path, case, seconds=0.4, size=size)
    out = tmp_path / "out.mp4"
    result = worker("stylize", str(source), str(out), "-s", "7", "--max-size", str(max_size), "--temporal", "0")
    assert result.returncode == 0, result.stderr
    info = video_stream_info(out)
    assert max(info["width"], info["height"]) <= max_size
    assert abs(display_aspect(info) / display_aspect(video_stream_info(source)) - 1) < 0.002


def test_a_gpu_the_backend_asked_for_and_the_node_lacks_is_a_node_fault(clip: Path, tmp_path: Path) -> None:
    """WORKER_DEVICE=cuda comes from a GPU pool (BatchCompute): without a working GPU the node is at fault, exit 3,
    which the orchestrator retries; the same device given on the command line stays bad input (exit 2)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = identity(str(clip), tmp_path / "o.mp4", env={"WORKER_DEVICE": "cuda"})
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("node error: device cuda was asked for but torch finds no CUDA GPU")
    assert "WORKER_DEVICE=cuda, set by the compute backend" in result.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_a_black_video_comes_out_one_colour(tmp_path: Path) -> None:
    """Through the task command and its compiled network: a black frame was a full-contrast texture (rounding
    amplified by the norms, networks.FLAT_SPREAD)."""
    source = tmp_path / "black.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=160x96:r=25:d=0.2", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", str(source)], check=True)
    out = tmp_path / "o.mp4"
    result = worker("stylize", str(source), str(out), "-s", "7", "--temporal", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["network"].startswith("compiled")
    with av.open(str(out)) as container:
        picture = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(float)
    assert picture.reshape(-1, 3).std(axis=0).max() < 1.5  # x264's rounding of one colour, not a texture


def test_strength_and_preserve_color_change_the_pixels_as_documented(tmp_path: Path) -> None:
    """strength 0 gives the source back, 0.5 lies halfway, and preserve_color keeps the source's chroma under the
    stylized luminance: a swapped mix or a colour option that did nothing used to pass every test."""
    source = sample_clip("carphone_pristine.mp4")  # natural colours: testsrc2's pure ones clip in any mix

    def planes(path: Path) -> np.ndarray:  # [frames, H*3/2, W]: Y, then U and V, as the encoder wrote them
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="yuv420p") for f, _ in zip(container.decode(video=0), range(5),
                                                                             strict=False)]).astype(float)

    def run(*options: str) -> np.ndarray:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}.mp4"
        result = worker("stylize", str(source), str(out), "-s", "7", "--temporal", "0", "--end", "0.2", *options)
        assert result.returncode == 0, result.stderr
        return planes(out)

    original, full, none, half, colour = (planes(source), run(), run("--strength", "0"),
                                          run("--strength", "0.5"), run("--preserve-color"))
    luma, chroma = slice(0, original.shape[1] * 2 // 3), slice(original.shape[1] * 2 // 3, None)
    assert np.abs(full - original).mean() > 20  # style 7 repaints the picture
    assert np.abs(none - original).mean() < 3  # codec noise only
    assert np.abs(half - (original + full) / 2).mean() < 4
    assert np.abs(colour[:, chroma] - original[:, chroma]).mean() < 3
    assert np.abs(colour[:, luma] - full[:, luma]).mean() < 6  # the stylized brightness, not the source's
    assert np.abs(colour[:, luma] - original[:, luma]).mean() > 15


def test_an_output_in_a_missing_folder_is_refused_first(clip: Path, tmp_path: Path) -> None:
    result = identity(str(clip), tmp_path / "nowhere" / "o.mp4")
    assert_bad_input(result, f"the output's folder {tmp_path / 'nowhere'} does not exist")  # was an internal error


def test_repeated_timestamps_keep_the_first_frame_shown_at_each(tmp_path: Path) -> None:
    """A recorder's repeated frame times (28 of 100 frames here) failed the task with an internal error naming a
    hidden temporary file: MP4 cannot store two frames at one time. The first frame at each time is kept."""
    source = tmp_path / "repeats.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=128x72:r=25:d=4", "-vf",
                    "setpts='if(lt(N,20),N/25,if(lt(N,40),0.8+(N-20)/10,2.8+(N-40)/50))/TB'", "-fps_mode",
                    "passthrough", "-c:v", "libx264", "-bf", "2", str(source)], check=True)
    shown = sorted(set(frame_times(source)))
    assert len(shown) < len(frame_times(source))  # the source does repeat times
    out = tmp_path / "o.mp4"
    result = identity(str(source), out)
    assert result.returncode == 0, result.stderr
    assert frame_times(out) == shown


def test_a_range_past_the_last_frame_is_an_empty_segment_when_allowed(clip: Path, tmp_path: Path) -> None:
    """What the pipeline's segment tasks ask for (--allow-empty): the decoder saw the video up to its end before
    the range, so the range is empty, not lost; its segment is a file of 0 bytes, which the stitch leaves out."""
    out = tmp_path / "o.mp4"
    result = identity(str(clip), out, "--start", "50", "--allow-empty", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["frames"] == 0
    assert out.stat().st_size == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"]


@pytest.mark.parametrize(
    ("style", "message"),
    [("26", "style 26 does not exist"), ("3:x", "weight of style 3 must be a number"),
     ("nope.jpg", "style image not found: nope.jpg")],
)
def test_bad_styles(style: str, message: str, clip: Path, tmp_path: Path) -> None:
    result = worker("stylize", str(clip), str(tmp_path / "o.mp4"), "--style", style)
    assert_bad_input(result, message)


@pytest.mark.parametrize(("value", "message"), [("1", "temporal must be between 0 (off) and 0.95, got 1"),
                                               ("lots", "temporal must be a number, got 'lots'")])
def test_bad_temporal(value: str, message: str, clip: Path, tmp_path: Path) -> None:
    result = worker("stylize", str(clip), str(tmp_path / "o.mp4"), "--style", "7", "--temporal", value)
    assert_bad_input(result, message)
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("scorer", ["identity", "style"])
@pytest.mark.parametrize(("device", "message"), [
    ("tpu", "unknown device 'tpu'"), ("cuda", "device cuda was asked for but torch finds no CUDA GPU on this machine")])
def test_bad_devices(scorer: str, device: str, message: str, clip: Path, tmp_path: Path) -> None:
    """Every scorer runs where --device says (the identity scorer too: on a GPU, the device's colour path)."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = worker("stylize", str(clip), str(tmp_path / "o.mp4"), "-s", "7", "--scorer", scorer, "--device", device)
    assert_bad_input(result, message)
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("size", ["2x2", "4x64", "8x8", "64x12", "2048x16"])
def test_tiny_and_thin_videos_keep_every_frame(size: str, tmp_path: Path) -> None:
    """Any frame size the worker accepts is stylized at the default temporal. The networks' 9x9 reflect padding
    needs 5 pixels a side (smaller frames failed with an internal error), so tiny frames are grown by repeating
    their edges and cropped back; the optical flow crashed the worker on frames under 16 pixels tall, so it
    works on them scaled up, and a picture too thin for that is left as stylized."""
    source = make_clip(tmp_path, "bframes", seconds=1, size=size)
    out = tmp_path / "out.mp4"
    result = worker("stylize", str(source), str(out), "-s", "7", "--json")
    assert result.returncode == 0, result.stderr
    assert frame_times(out) == frame_times(source)


def test_style_image_that_is_not_an_image(clip: Path, tmp_path: Path) -> None:
    fake = _write(tmp_path / "painting.png", "<html>not an image</html>")
    result = worker("stylize", str(clip), str(tmp_path / "o.mp4"), "--style", str(fake))
    assert_bad_input(result, "style image painting.png is not an image")


def test_a_style_image_declaring_too_many_pixels_is_refused_before_decoding(clip: Path, tmp_path: Path) -> None:
    """A small PNG declaring 13000x13000 decoded to 2.9 GB in every task (a security review)."""
    from PIL import Image

    huge = tmp_path / "huge.png"
    Image.new("1", (13000, 13000)).save(huge)  # 1 bit a pixel: a small file
    result = worker("stylize", str(clip), str(tmp_path / "o.mp4"), "--style", str(huge))
    assert_bad_input(result, "style image huge.png is 13000x13000: at most 40 megapixels")


def test_probe_prints_json() -> None:
    result = worker("probe", str(sample_clip("carphone_pristine.mp4")))
    info = json.loads(result.stdout)
    assert (info["width"], info["height"], info["sample_aspect_ratio"]) == (176, 144, "128:117")
    assert info["display_width"] == round(176 * 128 / 117)


def test_the_image_build_commands_run_outside_docker(tmp_path: Path) -> None:
    """What gpu_worker/Dockerfile runs at build time and as its smoke command works on a plain Python."""
    import os
    import re

    dockerfile = (REPO / "gpu_worker" / "Dockerfile").read_text()
    assert "python -m gpu_worker prepare-weights" in dockerfile
    assert re.search(r'^CMD \["python", "-m", "gpu_worker", "--help"\]$', dockerfile, re.M)
    assert re.search(r"^USER worker$", dockerfile, re.M)  # not root
    assert "pip install -r /tmp/requirements-image.txt" in dockerfile  # torch's pin lives in requirements.txt only
    env = {**os.environ, "GPU_WORKER_CACHE": str(tmp_path)}
    prepared = subprocess.run([sys.executable, "-m", "gpu_worker", "prepare-weights"], capture_output=True,
                              text=True, cwd=REPO, env=env, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    assert len(list(tmp_path.iterdir())) == 3  # the three networks, converted once
    smoke = worker("--help")
    assert smoke.returncode == 0 and "stylize" in smoke.stdout and "stitch" in smoke.stdout


@pytest.mark.parametrize("case", ["vfr", "mpegts_offset"])
def test_parallel_processes_join_to_the_same_frames(case: str, tmp_path: Path) -> None:
    """--pipelines N: slices in separate processes, joined by stream copy, equal the one-process output."""
    source = make_clip(tmp_path, case, seconds=3, size="64x48")
    times = frame_times(source)
    out = tmp_path / "out.mp4"
    result = identity(str(source), out, "--start", str(float(times[5])), "--pipelines", "3", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert frame_times(out) == [t for t in times if t >= times[5]]
    assert summary["frames"] == len(times) - 5 and summary["processes"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, "out.mp4"])
