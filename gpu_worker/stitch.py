"""Join scored segments into one MP4 by stream copy and put back the source's other tracks, chapters and tags.

Segments carry their source timestamps, so joining is a remux with no arithmetic on time (beyond decode
times that a demuxer leaves out, filled in as a muxer would): packets are copied as they are, merged with
the source's other tracks in time order. Every audio track is kept, copied when MP4 players take its codec and
re-encoded to AAC otherwise; text subtitles become MP4 text tracks; what MP4 cannot carry is dropped and said so
(gpu_worker/tracks.py plans it, gpu_worker/track_writers.py writes it). Every track keeps the source's
timestamps, so its offset to the video is the source's. The output is written atomically with the index up
front (faststart) so it plays while downloading.
"""

from __future__ import annotations

import heapq
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av

from gpu_worker import colour_tags, media, tracks
from gpu_worker.errors import InputError
from gpu_worker.track_writers import Writer, carry_container_info, open_writers


@dataclass
class StitchResult:
    output: str
    segments: int
    frames: int
    duration_seconds: float
    audio: str  # "copy", "aac" (re-encoded), "copy+aac" (some of each) or "none"
    tracks: list[dict] = field(default_factory=list)  # every source stream: what became of it, and why
    video: dict | None = None  # the output video: size, pixel format, colour description, what was converted
    chapters: int = 0
    metadata: dict = field(default_factory=dict)  # the container tags carried (title, creation_time, …)
    seconds: float = 0.0  # wall time, from the first segment's open to the output in place

    def to_dict(self) -> dict:
        return asdict(self)


def stitch(
    segments: Sequence[str | Path], output: str | Path, audio_source: str | None = None,
    http_headers: Mapping[str, str] | None = None,
) -> StitchResult:
    """Concatenate ``segments`` (in order) into ``output``, adding ``audio_source``'s tracks, chapters and tags."""
    if not segments:
        raise InputError("stitch needs at least one segment")
    segments = [s for s in segments if not _empty_file(s)]  # ranges that held no frames (runner.run_range)
    if not segments:
        raise InputError("the segments hold no video frames")
    began = time.perf_counter()
    output = Path(output)
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.partial")
    with ExitStack() as stack:
        # The first segment stays open for the output stream's template; the others are opened one at a time as
        # their turn comes (thousands at once ran out of file descriptors, after all the scoring).
        first = stack.enter_context(media.open_source(str(segments[0]), http_headers))
        inputs = _opened_in_turn(first, segments[1:], http_headers)
        # opening the source refuses one with too many tracks (media.check_track_counts) before anything is written
        source = None if audio_source is None else stack.enter_context(media.open_source(audio_source, http_headers))
        timescales = media.mp4_timescales(first.streams.video[0].time_base)
        out = stack.enter_context(av.open(str(tmp), mode="w", format="mp4",
                                          options={"movflags": "+faststart", **timescales}))
        try:
            result = _remux(first, inputs, len(segments), source, out, output)
        except BaseException:
            out.close()
            with suppress(FileNotFoundError):
                tmp.unlink()
            raise
    os.replace(tmp, output)
    result.seconds = round(time.perf_counter() - began, 3)
    return result


def _opened_in_turn(first, rest: Sequence[str | Path], http_headers: Mapping[str, str] | None) -> Iterator:
    """``first``, then each of ``rest`` opened as it is reached and closed once the next is wanted."""
    yield first
    for path in rest:
        with media.open_source(str(path), http_headers) as container:
            yield container


def _remux(first, inputs: Iterable, count: int, source, out, output: Path) -> StitchResult:
    template = first.streams.video[0]
    video_out = out.add_stream_from_template(template)
    plans = tracks.plan(source) if source is not None else []
    carried = carry_container_info(source, out) if source is not None else {"chapters": 0, "metadata": {}}
    writers = open_writers(plans, out)
    counts = {"frames": 0, "last_dts": None, "end": 0.0}

    def video_packets() -> Iterator[tuple[float, int, av.Packet]]:
        for container in inputs:
            stream = container.streams.video[0]
            for packet in _with_decode_times(container.demux(stream)):
                # B-frame reordering delay can make the first dts of a segment collide with the last
                # dts of the one before; nudge it forward (pts, and so display, is untouched).
                if counts["last_dts"] is not None and packet.dts <= counts["last_dts"]:
                    packet.dts = counts["last_dts"] + 1
                    if packet.pts is not None and packet.pts < packet.dts:
                        packet.dts = packet.pts  # cannot nudge past display time; let the muxer judge
                counts["last_dts"] = packet.dts
                counts["frames"] += 1
                if packet.pts is not None:
                    counts["end"] = max(counts["end"], float((packet.pts + packet.duration) * stream.time_base))
                packet.stream = video_out
                yield float(packet.dts * stream.time_base), 0, packet

    def track_packets() -> Iterator[tuple[float, int, av.Packet]]:
        """The kept tracks' packets, from one pass over the source in file order (roughly time order: the muxer's
        interleaving puts them in exact order, within its 10 s window, and sparse subtitles need that window)."""
        if not writers:
            return
        for packet in source.demux(*(writer.source for writer in writers.values())):
            if packet.pts is None and packet.dts is None:
                continue  # the demuxer's end-of-stream marker
            writer = writers[packet.stream.index]
            yield from _timed(writer.packets(packet), writer)
        for writer in writers.values():
            yield from _timed(writer.flush(), writer)

    merged = heapq.merge(video_packets(), track_packets(), key=lambda item: (item[0], item[1]))
    for _, _, packet in merged:
        out.mux(packet)
    if counts["frames"] == 0:
        raise InputError("the segments hold no video frames")
    reports = [plan.report() for plan in plans]
    for plan, report in zip(plans, reports, strict=True):
        writer = writers.get(plan.stream.index)
        if writer is not None and writer.skipped:
            report.setdefault("notes", []).append(f"{writer.skipped} damaged packets left out")
    modes = {"copy" if w.plan.action == "copied" else "aac" for w in writers.values() if w.plan.kind == "audio"}
    return StitchResult(
        output=str(output), segments=count, frames=counts["frames"], duration_seconds=round(counts["end"], 6),
        audio="+".join(m for m in ("copy", "aac") if m in modes) or "none", tracks=reports,
        video=colour_tags.describe(source.streams.video[0] if source is not None else template, video_out),
        chapters=carried["chapters"], metadata=carried["metadata"])


def _empty_file(segment: str | Path) -> bool:
    """A local segment of 0 bytes: a range the video had no frames in. (The pipeline leaves those out of a
    stitch's list itself, so a URL is never one.)"""
    path = Path(segment)
    return not media.is_url(str(segment)) and path.is_file() and path.stat().st_size == 0


def _timed(packets: Iterable[av.Packet], writer: Writer) -> Iterator[tuple[float, int, av.Packet]]:
    for packet in packets:
        if packet.dts is None:
            packet.dts = packet.pts  # audio and text: decode order is presentation order
        packet.stream = writer.stream
        yield float(packet.dts * packet.time_base), writer.stream.index, packet


def _with_decode_times(packets: Iterable[av.Packet]) -> Iterator[av.Packet]:
    """``packets`` in decode order, each with a dts, without the demuxer's end-of-stream markers.

    MP4 stores a decode time for every sample, but Matroska and NUT store only presentation times and the
    demuxer derives decode times from them once it knows the B-frame reordering delay, so the first packets
    of a stream with B-frames come with a pts and no dts. Those take the decode times just before the first
    known one, a packet duration apart (what ffmpeg's own remux gives them): increasing, and before every pts.
    Packets that never reach a known dts (a stream shorter than that delay, or one with no decode times at
    all) get their sorted presentation times, lagged by the fewest packets that keeps each dts at or before
    its pts: the reordering delay, measured.
    """
    pending: list[av.Packet] = []
    for packet in packets:
        if packet.dts is None and packet.pts is None:
            continue  # the demuxer's end-of-stream marker
        if packet.dts is None:
            pending.append(packet)
            continue
        dts = packet.dts
        for early in reversed(pending):
            dts -= max(1, early.duration or packet.duration or 1)
            early.dts = dts
        yield from pending
        pending.clear()
        yield packet
    if pending:
        _decode_times_from_pts(pending)
        yield from pending


def _decode_times_from_pts(packets: list[av.Packet]) -> None:
    order = sorted(p.pts for p in packets)
    step = max(1, min((p.duration for p in packets if p.duration), default=1))
    for shift in range(len(packets) + 1):
        dts = [order[i - shift] if i >= shift else order[0] - (shift - i) * step for i in range(len(packets))]
        if all(d <= p.pts for d, p in zip(dts, packets, strict=True)):
            break  # shift == len(packets) always gets here: every dts then lies before the earliest pts
    for packet, value in zip(packets, dts, strict=True):
        packet.dts = value
