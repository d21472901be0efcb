"""The temporal option: steadier output where the picture moves smoothly, nothing carried across a cut, and
segments that join without a pop — with every frame and timestamp of the source, as without it."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from gpu_worker.runner import EncoderOptions, run_range
from gpu_worker.scoring import StyleScorer
from gpu_worker.stitch import stitch
from gpu_worker.style_spec import DEFAULT_TEMPORAL, parse_style
from gpu_worker.temporal import TemporalBlender, warmup_frames
from tests.media_helpers import frame_times

WIDTH, HEIGHT, SHIFT = 160, 96, 3  # the pan moves the picture SHIFT pixels left every frame


def _texture(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like texture: smoothed noise at a few scales, so optical flow and the style both have work."""
    rng = np.random.default_rng(seed)
    picture = np.zeros((height, width, 3), np.float32)
    for scale in (4, 16, 48):
        small = rng.random((height // scale + 2, width // scale + 2, 3), dtype=np.float32)
        picture += cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    picture -= picture.min()
    return (picture / picture.max() * 255).astype(np.uint8)


def _write(path: Path, pictures: list[np.ndarray]) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "12", "g": "25"}
        for i, picture in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def pan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = 50
    texture = _texture(WIDTH + SHIFT * frames, HEIGHT, seed=1)
    return _write(tmp_path_factory.mktemp("pan") / "pan.mp4",
                  [texture[:, SHIFT * i:SHIFT * i + WIDTH] for i in range(frames)])


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)


def _pan_errors(output: np.ndarray) -> np.ndarray:
    """Per frame pair, the mean squared difference of what stays in view, moved by the known shift: how much
    the stylization of the same piece of picture changed (0 for a perfectly steady output)."""
    margin = 16  # the network's own borders
    now = output[1:, margin:-margin, margin:-margin - SHIFT]
    before = output[:-1, margin:-margin, margin + SHIFT:-margin]
    return np.square((now - before) / 255).mean(axis=(1, 2, 3))


def _stylize(source: Path, out: Path, temporal: float, start: Fraction = Fraction(0),
             end: Fraction | None = None) -> Path:
    # lossless x264: what is compared is the stage's output, not the encoder's noise (which depends on the
    # frames before, so two runs that differ earlier differ by a few levels everywhere after)
    run_range(str(source), out, StyleScorer(parse_style("7"), device="cpu"), start, end, temporal=temporal,
              encoder=EncoderOptions(preset="ultrafast", crf=0))
    return out


def test_a_pan_is_steadier_with_temporal_and_keeps_every_frame(pan: Path, tmp_path: Path) -> None:
    per_frame = _stylize(pan, tmp_path / "off.mp4", 0.0)
    steady = _stylize(pan, tmp_path / "on.mp4", 0.8)
    assert frame_times(steady) == frame_times(per_frame) == frame_times(pan)
    off, on = _pan_errors(_frames(per_frame))[5:], _pan_errors(_frames(steady))[5:]
    assert on.mean() < 0.5 * off.mean(), (on.mean(), off.mean())


def test_nothing_is_carried_across_a_scene_cut(tmp_path: Path) -> None:
    first, second = _texture(WIDTH, HEIGHT, seed=2), _texture(WIDTH, HEIGHT, seed=3)
    # a slow drift on each side of the cut, so the blend has something to carry until the cut
    pictures = [np.roll(first, i, axis=1) for i in range(12)] + [np.roll(second, i, axis=1) for i in range(12)]
    source = _write(tmp_path / "cut.mp4", pictures)
    per_frame = _frames(_stylize(source, tmp_path / "off.mp4", 0.0))
    steady = _frames(_stylize(source, tmp_path / "on.mp4", 0.8))
    after_cut = np.abs(steady[12] - per_frame[12]).mean()
    assert after_cut < 0.5, after_cut  # the fresh stylization, but for the colour round trip
    stylized_first = np.abs(per_frame[11] - per_frame[12]).mean()
    assert np.abs(steady[11] - per_frame[11]).mean() > 1.0  # before the cut the blend was at work
    assert stylized_first > 20  # and a blend across the cut would have dragged the first scene in


def test_segments_join_without_a_pop(pan: Path, tmp_path: Path) -> None:
    times = frame_times(pan)
    cut = times[25]
    parts = [_stylize(pan, tmp_path / "a.mp4", 0.8, Fraction(0), cut),
             _stylize(pan, tmp_path / "b.mp4", 0.8, cut, None)]
    joined = tmp_path / "joined.mp4"
    stitch([str(p) for p in parts], joined, None)
    assert frame_times(joined) == times  # exact frames, no warm-up frame written
    errors = _pan_errors(_frames(joined))
    boundary, neighbours = errors[24], np.concatenate([errors[14:24], errors[25:35]])
    assert boundary <= 1.2 * np.median(neighbours), (boundary, np.median(neighbours))  # 1.06x here
    unsplit = _pan_errors(_frames(_stylize(pan, tmp_path / "whole.mp4", 0.8)))
    assert boundary <= 1.1 * unsplit[24], (boundary, unsplit[24])  # the same pair without a join: 1.00x here
    assert warmup_frames(0.8) <= 25  # the second part really did warm up on frames of the first


def test_warmup_covers_the_blend_memory() -> None:
    assert warmup_frames(0) == 0
    for value in (0.5, 0.8, 0.9, 0.95):
        assert value ** warmup_frames(value) <= 0.02 < value ** (warmup_frames(value) - 1)



def test_two_blends_meet_after_the_warm_up_on_a_steady_pan() -> None:
    """A task starting mid-video begins from the fresh stylization; after the warm-up it must be where the task
    that ran from the start is, or the join shows. Rounded to whole levels at each frame, the blend kept a
    difference of up to 0.5 / (1 - temporal) levels for ever: on a slow, steady pan two tasks stayed ~0.5 levels
    apart at the join."""
    temporal, frames, k = DEFAULT_TEMPORAL, 90, warmup_frames(DEFAULT_TEMPORAL)
    texture = _texture(WIDTH + 2 * frames, HEIGHT, seed=4)
    rng = np.random.default_rng(5)
    sources = [np.ascontiguousarray(texture[:, 2 * i:2 * i + WIDTH]) for i in range(frames)]
    # a stylization that shimmers a little: the same picture each time, with a level of fresh noise (more noise
    # would round the old states together by chance: 0.04 levels apart at 6, 0.58 at 1, 0.38 at 0.5)
    stylized = [np.clip(s + rng.normal(0, 1, s.shape), 0, 255).astype(np.uint8) for s in sources]
    whole, late = TemporalBlender(temporal), TemporalBlender(temporal)
    start = frames - 1 - k
    for i in range(frames):
        emitted = whole.blend(sources[i], stylized[i])
        if i >= start:
            joined = late.blend(sources[i], stylized[i])
    margin = 8  # the picture's edges, where what came into view differs
    gap = np.abs(emitted.astype(np.float32) - joined)[margin:-margin, margin:-margin].mean()
    assert gap < 0.1, gap  # 0.01 here
