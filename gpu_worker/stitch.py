"""Join scored segments into one MP4 by stream copy and put the source's audio back.

Segments carry their source timestamps, so joining is a remux with no arithmetic on time (beyond decode
times that a demuxer leaves out, filled in as a muxer would): packets are copied as they are, merged with
the source's audio packets in time order. Audio is copied when MP4 can carry it and re-encoded to AAC
otherwise; either way it keeps the source's timestamps, so its offset to the video is the source's. The
output is written atomically with the index up front (faststart) so it plays while downloading.
"""

from __future__ import annotations

import heapq
import itertools
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av

from gpu_worker import media
from gpu_worker.errors import InputError

MP4_AUDIO_CODECS = {"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


@dataclass
class StitchResult:
    output: str
    segments: int
    frames: int
    duration_seconds: float
    audio: str  # "copy", "aac" (re-encoded) or "none"

    def to_dict(self) -> dict:
        return asdict(self)


def stitch(
    segments: Sequence[str | Path], output: str | Path, audio_source: str | None = None,
    http_headers: Mapping[str, str] | None = None,
) -> StitchResult:
    """Concatenate ``segments`` (in order) into ``output``, adding ``audio_source``'s first audio track."""
    if not segments:
        raise InputError("stitch needs at least one segment")
    output = Path(output)
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.partial")
    with ExitStack() as stack:
        inputs = [stack.enter_context(media.open_source(str(p), http_headers)) for p in segments]
        audio_in = None
        if audio_source is not None:
            source = stack.enter_context(media.open_source(audio_source, http_headers))
            audio_in = source.streams.audio[0] if source.streams.audio else None
        timescales = media.mp4_timescales(inputs[0].streams.video[0].time_base)
        out = stack.enter_context(av.open(str(tmp), mode="w", format="mp4",
                                          options={"movflags": "+faststart", **timescales}))
        try:
            result = _remux(inputs, audio_in, out, output)
        except BaseException:
            out.close()
            with suppress(FileNotFoundError):
                tmp.unlink()
            raise
    os.replace(tmp, output)
    return result


def _remux(inputs: list, audio_in, out, output: Path) -> StitchResult:
    template = inputs[0].streams.video[0]
    video_out = out.add_stream_from_template(template)
    audio_mode, audio_out, resampler = "none", None, None
    if audio_in is not None:
        if audio_in.codec_context.name in MP4_AUDIO_CODECS:
            audio_mode, audio_out = "copy", out.add_stream_from_template(audio_in)
        else:
            audio_mode = "aac"
            rate = audio_in.codec_context.sample_rate
            audio_out = out.add_stream("aac", rate=rate)
            layout = audio_in.codec_context.layout.name
            if layout.endswith("channels"):  # unordered layout (e.g. PCM in Matroska): take the default
                layout = _DEFAULT_LAYOUTS.get(audio_in.codec_context.channels, "stereo")
            audio_out.codec_context.layout = layout
            audio_out.codec_context.format = "fltp"
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
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
                yield float(packet.dts * stream.time_base), 0, packet

    def audio_packets() -> Iterator[tuple[float, int, av.Packet]]:
        if audio_in is None:
            return
        if audio_mode == "copy":
            for packet in audio_in.container.demux(audio_in):
                if packet.pts is None and packet.dts is None:
                    continue  # the demuxer's end-of-stream marker
                if packet.dts is None:
                    packet.dts = packet.pts  # audio is never reordered: it decodes when it plays
                yield float(packet.dts * audio_in.time_base), 1, packet
            return
        # Samples are numbered continuously (the encoder needs gapless input) from the source's first audio
        # timestamp, not from 0: the video keeps its source timestamps, so starting the audio anywhere else
        # would shift it against the picture by the source's start time (~1.4 s in a typical MPEG-TS).
        tick = Fraction(1, audio_out.codec_context.sample_rate)
        next_pts = None
        for frame in itertools.chain(audio_in.container.decode(audio_in), [None]):
            if next_pts is None and frame is not None:
                next_pts = round(frame.pts * frame.time_base / tick) if frame.pts is not None else 0
            for chunk in resampler.resample(frame):
                chunk.pts, chunk.time_base = next_pts or 0, tick
                next_pts = chunk.pts + chunk.samples
                yield from _timed(audio_out.encode(chunk))
        yield from _timed(audio_out.encode(None))

    merged = heapq.merge(video_packets(), audio_packets(), key=lambda item: (item[0], item[1]))
    for _, kind, packet in merged:
        packet.stream = video_out if kind == 0 else audio_out
        out.mux(packet)
    if counts["frames"] == 0:
        raise InputError("the segments hold no video frames")
    return StitchResult(output=str(output), segments=len(inputs), frames=counts["frames"],
                        duration_seconds=round(counts["end"], 6), audio=audio_mode)


def _timed(packets: Iterable[av.Packet]) -> Iterator[tuple[float, int, av.Packet]]:
    for packet in packets:
        if packet.dts is None:
            packet.dts = packet.pts  # audio: decode order is presentation order
        yield float(packet.dts * packet.time_base), 1, packet


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
