"""Score one time range of a video: decode → batch → score → encode, overlapped through bounded queues.

Model-agnostic: anything with the :class:`Scorer` shape plugs in. Decoding and encoding run on their
own threads (PyAV releases the GIL in ffmpeg), so on a GPU node the network never waits for the CPU
codecs unless they are the bottleneck, and memory stays bounded by the queue sizes whatever the
length of the range.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av
import numpy as np
import torch

import gpu_worker
from gpu_worker import colour, colour_tags, media, networks
from gpu_worker.errors import InputError


class Scorer(Protocol):
    """A batch model over video frames: [N,H,W,3] uint8 RGB on ``torch_device`` in, the same out.

    The runner does everything else — decoding, colour conversion, rotation, batching, encoding — so a new
    model only implements this; bytes at both ends, as video frames are, so a model converts to its own
    input type where it can fuse that into its first layer.
    """

    name: str
    device: str  # a label for reports, e.g. "cuda (NVIDIA H100 80GB HBM3)"
    torch_device: torch.device

    def batch_size(self, height: int, width: int) -> int:
        """How many frames of this size one :meth:`score` call should take (fits memory)."""
        ...

    def score(self, frames: torch.Tensor) -> torch.Tensor: ...

    def peak_device_memory_mb(self) -> float | None: ...


@dataclass
class RangeResult:
    output: str
    frames: int
    seconds: float
    fps: float
    device: str
    scorer: str
    batch_size: int
    decode_seconds: float
    score_seconds: float
    encode_seconds: float
    peak_rss_mb: float
    peak_device_memory_mb: float | None
    first_pts_seconds: float | None
    last_pts_seconds: float | None
    latency_ms: dict[str, float]  # per frame, decoded → encoded: p50, p95, max (a distribution, not a log)
    node: str
    network: str  # how the model ran: "compiled (cached)", "eager", …
    first_frame_seconds: float | None  # from the worker process's start to its first frame encoded

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class EncoderOptions:
    preset: str = "veryfast"
    crf: int = 18
    threads: int = 0


_DONE = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def run_range(
    source: str,
    output: Path,
    scorer: Scorer,
    start: Fraction = Fraction(0),
    end: Fraction | None = None,
    *,
    encoder: EncoderOptions | None = None,
    http_headers: Mapping[str, str] | None = None,
    max_size: int = 0,
    progress: Callable[[int], None] | None = None,
    temporal: float = 0.0,
    allow_empty: bool = False,
) -> RangeResult:
    """Write the frames of ``source`` whose pts lies in [start, end), scored, to ``output``.

    ``max_size`` (0: off) scales frames down so that their longer side is at most that many pixels.
    ``temporal`` (0: off, up to 1) blends each scored frame with the previous output carried along the
    source's motion (:mod:`gpu_worker.temporal`); the range then starts with frames before ``start`` that
    are scored and blended but not written, so neighbouring ranges meet in the same state.

    A range with no frames is bad input (:class:`InputError`), unless ``allow_empty`` and the decoder saw the
    video before the range and then its end or a frame after it: the range then lies in a gap of a variable
    frame rate or past the last frame (a container's duration counts the audio too), and ``output`` is
    written empty (0 bytes), which the stitch leaves out. A seek that found nothing fails as before.
    """
    if start < 0 or (end is not None and end <= start):
        raise InputError(f"bad range [{start}, {end}): need 0 <= start < end", field="range")
    encoder = encoder or EncoderOptions()
    result, _ = _run_single(source, output, scorer, start, end, encoder, http_headers, max_size, progress,
                            allow_empty=allow_empty, temporal=temporal)
    return result


def _run_single(
    source: str, output: Path, scorer: Scorer, start: Fraction, end: Fraction | None, encoder: EncoderOptions,
    http_headers: Mapping[str, str] | None, max_size: int, progress: Callable[[int], None] | None,
    allow_empty: bool = False, temporal: float = 0.0,
) -> tuple[RangeResult, list[float]]:
    began = time.perf_counter()
    timing = {"decode": 0.0, "score": 0.0, "encode": 0.0}
    stop = threading.Event()
    with media.open_source(source, http_headers) as container:
        stream = container.streams.video[0]
        probe_frame = media.first_frame(container, stream, source)
        height, width = _scaled(probe_frame.height, probe_frame.width, max_size)
        # HDR is tone-mapped to SDR BT.709 as it is decoded (colour_tags.SdrConverter); anything else keeps its
        # colour description, which the encoder is tagged with.
        to_sdr = colour_tags.SdrConverter() if colour_tags.is_hdr(probe_frame) else None
        matrix = "itu709" if to_sdr else media.rgb_matrix(probe_frame)
        tags = colour_tags.SDR_BT709 if to_sdr else colour_tags.output_tags(probe_frame, matrix)
        turns, mirrored = media.orientation(probe_frame)
        out_h, out_w = (width, height) if turns % 2 else (height, width)
        batch = max(1, scorer.batch_size(out_h, out_w))
        frames_in: queue.Queue = queue.Queue(maxsize=2 * batch + 2)
        scored: queue.Queue = queue.Queue(maxsize=2)
        writer = media.SegmentWriter(
            output, width=out_w, height=out_h, time_base=stream.time_base,
            sample_aspect_ratio=_stored_sar(stream, turns, (probe_frame.height, probe_frame.width), (height, width)),
            frame_rate=stream.average_rate,
            matrix=matrix, preset=encoder.preset, crf=encoder.crf, threads=encoder.threads, colour=tags,
        )
        pts_seen: list[int] = []
        decoded_at: dict[int, float] = {}  # pts → when the frame left the decoder
        latencies: list[float] = []
        to_device = _Uploader(scorer.torch_device, matrix, turns, writer, mirrored)
        first_pts = media.range_pts(start, end, stream.time_base)[0]  # earlier frames only warm a stage up
        blender = None
        if temporal > 0:
            from gpu_worker.temporal import TemporalBlender, warmup_frames

            blender = TemporalBlender(temporal)
        after = _Finisher(blender, first_pts)
        seen = {"before": 0}  # frames the decoder gave before the range: the seek found the video

        def decode() -> None:
            if yield_cores:
                _lower_codec_priority(decoder_threads=True)
            try:
                t0 = time.perf_counter()
                preroll = warmup_frames(temporal) if blender else 0
                for frame in media.decode_range(container, stream, start, end, preroll=preroll, seen=seen):
                    if to_sdr is not None:
                        frame = to_sdr(frame)
                    # one size for the whole range, even if the stream changes size mid-way
                    item = (frame.pts, *media.frame_planes(frame, width, height,
                                                            rgb=not to_device.colour_on_device))
                    now = time.perf_counter()
                    if frame.pts >= first_pts:
                        decoded_at[frame.pts] = now
                    timing["decode"] += now - t0
                    if not _put(frames_in, item, stop):
                        return
                    t0 = time.perf_counter()
                _put(frames_in, _DONE, stop)
            except BaseException as exc:
                _put(frames_in, _Failed(exc), stop)

        def encode() -> None:
            if yield_cores:
                _lower_codec_priority()  # before the encoder opens: x264's threads inherit it
            try:
                while (item := _get(scored, stop)) is not _DONE and item is not None:
                    pts_list, planes = item
                    t0 = time.perf_counter()
                    for pts, frame_planes in zip(pts_list, planes, strict=True):
                        writer.write(frame_planes, pts)
                        latencies.append(time.perf_counter() - decoded_at.pop(pts, t0))
                    timing["encode"] += time.perf_counter() - t0
                    pts_seen.extend(pts_list)
                    if progress:
                        progress(len(pts_seen))
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        errors: list[BaseException] = []
        yield_cores = scorer.torch_device.type == "cpu"
        threads = [threading.Thread(target=decode, name="decoder", daemon=True),
                   threading.Thread(target=encode, name="encoder", daemon=True)]
        for thread in threads:
            thread.start()
        try:
            finished = False
            while not finished:
                pending: list = []
                while len(pending) < batch:
                    item = _get(frames_in, stop)
                    if isinstance(item, _Failed):
                        raise item.error
                    if item is _DONE or item is None:
                        finished = True
                        break
                    if pending and (item[1], item[3]) != (pending[0][1], pending[0][3]):
                        # a batch holds one pixel layout and one range: on a GPU it is converted as one
                        _score_batch(pending, to_device, scorer, after, scored, stop, timing, errors)
                        pending = []
                    pending.append(item)
                if errors:
                    raise errors[0]
                if pending:
                    _score_batch(pending, to_device, scorer, after, scored, stop, timing, errors)
            _put(scored, _DONE, stop)
            threads[1].join()
            if errors:
                raise errors[0]
            if not pts_seen and allow_empty and seen["before"]:
                writer.abort()
                _write_empty(output)
                return _empty_result(output, scorer), []
            if not pts_seen:
                raise InputError(f"no video frames in [{float(start)}, {_fmt(end)}) s of {Path(source).name}",
                                 field="range")
            t0 = time.perf_counter()
            writer.commit(continues=end is not None)  # a range with an end meets the next one's there
            timing["encode"] += time.perf_counter() - t0
        except BaseException:
            stop.set()
            # The encoder may be inside the muxer: closing it under its feet crashes, so wait for it. The
            # decoder may be stuck in a network read, and need not be waited for: media.Source closes itself
            # when that read returns.
            threads[1].join(timeout=10)
            writer.abort()
            raise
        finally:
            stop.set()
            threads[1].join(timeout=10)
    seconds = time.perf_counter() - began
    tb = stream.time_base
    result = RangeResult(
        output=str(output), frames=len(pts_seen), seconds=seconds, fps=len(pts_seen) / seconds,
        device=scorer.device, scorer=scorer.name, batch_size=batch,
        decode_seconds=timing["decode"], score_seconds=timing["score"], encode_seconds=timing["encode"],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_device_memory_mb=scorer.peak_device_memory_mb(),
        first_pts_seconds=float(pts_seen[0] * tb) if pts_seen else None,
        last_pts_seconds=float(pts_seen[-1] * tb) if pts_seen else None,
        latency_ms=_distribution_ms(latencies), node=socket.gethostname(),
        network=getattr(scorer, "network", "none"),
        first_frame_seconds=writer.first_encoded_at - gpu_worker.STARTED if writer.first_encoded_at else None,
    )
    return result, latencies


CODEC_NICE = 10


def _lower_codec_priority(decoder_threads: bool = False) -> None:
    """On the CPU, let the network's threads have the cores first and the codec fill the gaps.

    Torch's OpenMP threads meet at a barrier after every kernel, so a codec thread that takes one of their
    cores stalls the other as well: the network ran ~1.3x slower per frame inside the task than alone.
    With the codec threads at a lower priority they run while the network's threads wait, and the queues
    between the stages keep the codec from falling behind (bikes task 19.0 -> 16.8 s; the identity pass and
    two workers sharing two cores unchanged). Linux only, where a priority belongs to one thread; threads
    inherit it, and ffmpeg's decoder threads (named ``av:…``), started earlier, are found by name.
    """
    if sys.platform != "linux":
        return
    own = [0]
    if decoder_threads:
        own += [int(t.name) for t in Path("/proc/self/task").iterdir() if _thread_name(t).startswith("av:")]
    for tid in own:
        with contextlib.suppress(OSError):  # a thread may end meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, max(CODEC_NICE, os.getpriority(os.PRIO_PROCESS, tid)))


def _thread_name(task: Path) -> str:
    try:
        return (task / "comm").read_text()
    except OSError:  # the thread ended since the folder was listed
        return ""


def split_range(source: str, http_headers: Mapping[str, str] | None, start: Fraction, end: Fraction | None,
                count: int) -> list[tuple[Fraction, Fraction | None]]:
    """Equal time slices of [start, end) for parallel workers; an open end stays open on the last slice and
    is measured by the stream's duration (one slice if that is unknown)."""
    if end is None:
        with media.open_source(source, http_headers) as container:
            stream = container.streams.video[0]
            if stream.duration:
                end = (Fraction(stream.start_time or 0) + stream.duration) * stream.time_base
            elif container.duration:  # Matroska and others give only the container's duration
                end = Fraction(container.start_time or 0, av.time_base) + Fraction(container.duration, av.time_base)
            else:
                return [(start, None)]
        if end <= start:
            return [(start, None)]
        cuts = [start + (end - start) * k / count for k in range(1, count)]
        return list(zip([start, *cuts], [*cuts, None], strict=True))  # the last slice stays open-ended
    cuts = [start + (end - start) * k / count for k in range(1, count)]
    return list(zip([start, *cuts], [*cuts, end], strict=True))


def _write_empty(output: Path) -> None:
    """An empty segment: a file of 0 bytes, put in place atomically as segments are."""
    partial = output.with_name(f".{output.name}.empty.partial")
    partial.write_bytes(b"")
    os.replace(partial, output)


def _empty_result(output: Path, scorer: Scorer) -> RangeResult:
    return RangeResult(output=str(output), frames=0, seconds=0.0, fps=0.0, device=scorer.device, scorer=scorer.name,
                       batch_size=0, decode_seconds=0.0, score_seconds=0.0, encode_seconds=0.0, peak_rss_mb=0.0,
                       peak_device_memory_mb=None, first_pts_seconds=None, last_pts_seconds=None, latency_ms={},
                       node=socket.gethostname(), network=getattr(scorer, "network", "none"),
                       first_frame_seconds=None)


def _distribution_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def quantile(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50": quantile(0.5), "p95": quantile(0.95), "max": quantile(1.0)}


class _Uploader:
    """Moves decoded frames to the scorer's device as RGB bytes and back: colour conversion, rotation, even sizes.

    On the CPU swscale's SIMD code converts, into RGB in the decoder's thread and back to YUV in the scoring
    thread, leaving the encoder's thread to x264. On a GPU the codec's I420 planes travel (half the bytes of
    RGB) and are converted there, sparing the node's CPUs, which decode and encode.
    """

    def __init__(self, device: torch.device, matrix: str, turns: int, writer: media.SegmentWriter,
                 mirrored: bool = False) -> None:
        self.device, self.matrix, self.turns, self.writer, self.mirrored = device, matrix, turns, writer, mirrored
        self.pin = device.type == "cuda"
        self.colour_on_device = device.type != "cpu"
        if not self.colour_on_device:
            # frames are MBs each: without this every buffer is a fresh mmap, page-faulted in again
            networks.tune_glibc_malloc()

    def to_rgb(self, layout: str, arrays: list[np.ndarray], full_range: bool) -> torch.Tensor:
        """[N,H,W,3] uint8 RGB on the scorer's device, display orientation."""
        batch = torch.from_numpy(np.stack(arrays))
        if self.pin:
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        rgb = colour.to_bytes(colour.yuv420_to_rgb(batch, self.matrix, full_range)) if layout == "yuv420p" else batch
        rgb = torch.rot90(rgb, self.turns, dims=(1, 2)) if self.turns else rgb
        return torch.flip(rgb, dims=(2,)) if self.mirrored else rgb

    def to_frames(self, rgb: torch.Tensor) -> list:
        """Each scored frame ready for the encoder: an I420 VideoFrame (swscale) or I420 planes (device)."""
        if not self.colour_on_device:
            return [self.writer.yuv_frame(frame) for frame in rgb.numpy()]
        size = (self.writer.height, self.writer.width)
        planes = colour.rgb_to_yuv420(colour.to_floats(rgb), self.matrix, size, full_range=self.writer.full_range)
        return list(planes.cpu().numpy())


class _Finisher:
    """After the model: the temporal stage (if on), then only the frames of the range go on to the encoder."""

    def __init__(self, blender, first_pts: int) -> None:
        self.blender, self.first_pts = blender, first_pts

    def __call__(self, pts: list[int], source: torch.Tensor, scored: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        if self.blender is not None:
            blended = [self.blender.blend(a, b) for a, b in zip(source.cpu().numpy(), scored.cpu().numpy(),
                                                                 strict=True)]
            scored = torch.from_numpy(np.stack(blended)).to(scored.device)
        keep = [i for i, p in enumerate(pts) if p >= self.first_pts]
        if len(keep) < len(pts):
            scored = scored[keep]
        return [pts[i] for i in keep], scored


def _score_batch(pending: list, uploader: _Uploader, scorer: Scorer, after: _Finisher, scored: queue.Queue,
                 stop: threading.Event, timing: dict, errors: list) -> None:
    t0 = time.perf_counter()
    with torch.inference_mode():
        rgb = uploader.to_rgb(pending[0][1], [item[2] for item in pending], pending[0][3])
        pts, frames = after([item[0] for item in pending], rgb, scorer.score(rgb))
        planes = uploader.to_frames(frames) if pts else []
    timing["score"] += time.perf_counter() - t0
    if pts and not _put(scored, (pts, planes), stop):
        raise errors[0]


def _scaled(height: int, width: int, max_size: int) -> tuple[int, int]:
    if not max_size or max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(2, round(height * scale)), max(2, round(width * scale))


def _stored_sar(stream, turns: int, size: tuple[int, int], scaled: tuple[int, int]) -> Fraction:
    """The output's sample aspect ratio: the source's, with what rounding the scaled sides changed folded in (a
    2048x16 video at --max-size 160 is 160x2, whose pixels are then 1.6 times as wide), so the display aspect
    is the source's."""
    (height, width), (scaled_height, scaled_width) = size, scaled
    sar = media.sample_aspect(stream) * Fraction(width * scaled_height, height * scaled_width)
    return 1 / sar if turns % 2 else sar  # a quarter turn swaps which axis the pixels stretch


def _fmt(end: Fraction | None) -> str:
    return "end" if end is None else str(float(end))


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put unless the run is stopping; never blocks forever on a queue whose consumer died."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> object:
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return None
