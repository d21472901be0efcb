"""The output streams for the tracks a plan keeps (gpu_worker/tracks.py), each turning source packets into output ones.

Every writer keeps its track's timestamps on the source's clock, as the stylized video does, so each track's offset
to the picture is the source's: copied packets keep theirs, re-encoded audio numbers its samples from the track's
own first timestamp, and converted subtitles keep each cue's start and duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from fractions import Fraction
from typing import Any

import av

from gpu_worker.tracks import TrackPlan, dispositions, language, title

# What the container says about itself that MP4 can hold; the muxer writes its own encoder tag.
CONTAINER_TAGS = ("title", "creation_time", "artist", "album", "comment", "copyright", "date", "description", "genre",
                  "composer")
# mov_text's encoder needs an ASS header to read styles from; a text format without one gets ASS's plain default.
_PLAIN_ASS_HEADER = (b"[Script Info]\nScriptType: v4.00+\nPlayResX: 384\nPlayResY: 288\n\n[V4+ Styles]\nFormat: Name, "
                     b"Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, Italic, "
                     b"Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, "
                     b"MarginL, MarginR, MarginV, Encoding\nStyle: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,"
                     b"100,100,0,0,1,1,0,2,10,10,10,0\n\n[Events]\nFormat: Layer, Start, End, Style, Name, MarginL, "
                     b"MarginR, MarginV, Effect, Text\n")


class Writer:
    """One output stream: :meth:`packets` for each source packet of its track, then :meth:`flush` once."""

    stream: Any

    def __init__(self, plan: TrackPlan) -> None:
        self.plan = plan
        self.source = plan.stream
        self.skipped = 0  # source packets that could not be decoded (damaged): left out, counted in the report

    def packets(self, packet: av.Packet) -> Iterator[av.Packet]:
        raise NotImplementedError

    def flush(self) -> Iterator[av.Packet]:
        return iter(())

    def label(self) -> None:
        """Language, title and dispositions, as the source has them."""
        lang, name = language(self.source), title(self.source)
        if lang:
            self.stream.metadata["language"] = lang
        if name:
            self.stream.metadata["title"] = name
        self.stream.disposition = dispositions(self.source)


class Copy(Writer):
    def __init__(self, plan: TrackPlan, out: Any) -> None:
        super().__init__(plan)
        self.stream = out.add_stream_from_template(plan.stream)

    def packets(self, packet: av.Packet) -> Iterator[av.Packet]:
        yield packet  # a missing dts is filled in with every other track's, as the stitch merges them


class AacEncode(Writer):
    def __init__(self, plan: TrackPlan, out: Any) -> None:
        super().__init__(plan)
        settings = plan.aac
        assert settings is not None
        self.stream = out.add_stream("aac", rate=settings.rate)
        ctx = self.stream.codec_context
        ctx.layout, ctx.format, ctx.bit_rate = settings.layout, "fltp", settings.bit_rate
        self.resampler = av.AudioResampler(format="fltp", layout=settings.layout, rate=settings.rate)
        self.tick = Fraction(1, settings.rate)
        self.next_pts: int | None = None

    def packets(self, packet: av.Packet) -> Iterator[av.Packet]:
        try:
            frames = self.source.codec_context.decode(packet)
        except av.error.InvalidDataError:
            self.skipped += 1
            return
        for frame in frames:
            yield from self._encode(frame)

    def flush(self) -> Iterator[av.Packet]:
        with suppress(av.error.EOFError):
            for frame in self.source.codec_context.decode(None):
                yield from self._encode(frame)
        yield from self._encode(None)
        yield from self.stream.encode(None)

    def _encode(self, frame: av.AudioFrame | None) -> Iterator[av.Packet]:
        # Samples are numbered continuously (the encoder needs gapless input) from the track's first timestamp, not
        # from 0: the video keeps its source timestamps, so starting the audio anywhere else would shift it against
        # the picture by the track's start (~1.4 s in a typical MPEG-TS, or the track's own delay).
        if self.next_pts is None and frame is not None:
            self.next_pts = round(frame.pts * frame.time_base / self.tick) if frame.pts is not None else 0
        for chunk in self.resampler.resample(frame):
            chunk.pts, chunk.time_base = self.next_pts or 0, self.tick
            self.next_pts = chunk.pts + chunk.samples
            yield from self.stream.encode(chunk)


class MovText(Writer):
    """Text subtitles re-encoded as MP4 text (mov_text) cues, each at its source time for its source duration."""

    def __init__(self, plan: TrackPlan, out: Any) -> None:
        super().__init__(plan)
        decoder = plan.stream.codec_context
        decoder.open(strict=False)  # the decoder makes the ASS header (its styles) as it opens
        self.stream = out.add_stream("mov_text")
        self.stream.codec_context.subtitle_header = decoder.subtitle_header or _PLAIN_ASS_HEADER

    def packets(self, packet: av.Packet) -> Iterator[av.Packet]:
        if packet.pts is None:
            return
        try:
            cues = self.source.codec_context.decode2(packet)
        except av.error.FFmpegError:
            self.skipped += 1
            return
        if cues is None or len(cues) == 0:
            return
        encoded = self.stream.codec_context.encode_subtitle(cues)
        tb = packet.time_base
        # display times are milliseconds from the packet's pts; an end of "until the next cue" (0 or all ones)
        # leaves the packet's own duration
        start = packet.pts + round(Fraction(cues.start_display_time, 1000) / tb)
        shown = cues.end_display_time - cues.start_display_time
        until_next = cues.end_display_time in (0, 0xFFFFFFFF)
        duration = packet.duration if until_next or shown <= 0 else round(Fraction(shown, 1000) / tb)
        encoded.pts = encoded.dts = start
        encoded.duration = duration or 0
        encoded.time_base = tb
        yield encoded


def open_writers(plans: list[TrackPlan], out: Any) -> dict[int, Writer]:
    """An output stream for each kept track, in the source's order; keyed by the source stream's index."""
    writers: dict[int, Writer] = {}
    for plan in plans:
        if not plan.kept:
            continue
        if plan.action == "copied":
            writer: Writer = Copy(plan, out)
        elif plan.kind == "audio":
            writer = AacEncode(plan, out)
        else:
            writer = MovText(plan, out)
        writer.label()
        writers[plan.stream.index] = writer
    return writers


def carry_container_info(source: Any, out: Any) -> dict:
    """The source's chapters and its title, creation time and the like, onto ``out``; what came, for the report."""
    tags = {key.lower(): value for key, value in source.metadata.items()}
    kept = [key for key in CONTAINER_TAGS if tags.get(key)]
    for key in kept:
        out.metadata[key] = tags[key]
    chapters = source.chapters()
    if chapters:
        out.set_chapters(chapters)
    return {"chapters": len(chapters), "metadata": {key: tags[key] for key in kept}}
