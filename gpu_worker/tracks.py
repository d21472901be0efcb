"""What becomes of each of the source's streams in the MP4 output, and why: the stitch's plan and its report.

Every stream of the source gets a :class:`TrackPlan`, so nothing is dropped without being listed:

- the first video stream is the one stylized (the segments); other video streams and cover art are dropped;
- every audio track is kept, in order: copied when MP4 players take its codec, else re-encoded to AAC at a
  bitrate for its channel count with its channel layout (and sample rate, where AAC has it);
- text subtitles (SRT, ASS/SSA, WebVTT, mov_text, …) become MP4 text tracks (mov_text, copied if they are
  already); bitmap subtitles (PGS, DVB, VobSub) are dropped, as MP4 has no track type for them;
- data streams and attachments (fonts, timecode, KLV) are dropped.

Language, title and dispositions (default, forced, hearing impaired, …) go with each kept track.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import av

# Audio that MP4 players take as it is. Others the mp4 muxer may accept (PCM, Vorbis, MP2, DTS) play almost
# nowhere from MP4, so they are re-encoded too.
MP4_AUDIO_CODECS = {"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
_AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
# Dispositions MP4 can say (as track flags or 'kind' boxes); cover art and the like are not a track's role.
_DISPOSITIONS = av.stream.Disposition(0)
for _name in ("default", "dub", "original", "comment", "lyrics", "karaoke", "forced", "hearing_impaired",
              "visual_impaired", "clean_effects", "captions", "descriptions"):
    _DISPOSITIONS |= av.stream.Disposition[_name]


@dataclass(frozen=True)
class AacSettings:
    rate: int
    layout: str
    bit_rate: int


@dataclass
class TrackPlan:
    stream: Any  # the source's PyAV stream
    kind: str  # video, audio, subtitle, data, attachment
    codec: str
    action: str  # "stylized", "copied", "re-encoded to aac", "converted to mov_text", "dropped"
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    aac: AacSettings | None = None

    @property
    def kept(self) -> bool:
        """Whether the stitch writes this stream (the stylized video comes from the segments instead)."""
        return self.action not in ("dropped", "stylized")

    def report(self) -> dict:
        """One entry of the job's ``tracks`` list."""
        stream = self.stream
        entry: dict[str, Any] = {"index": stream.index, "type": self.kind, "codec": self.codec,
                                 "language": language(stream), "title": title(stream),
                                 "default": bool(stream.disposition & av.stream.Disposition.default),
                                 "forced": bool(stream.disposition & av.stream.Disposition.forced),
                                 "action": self.action}
        if self.kind == "audio" and getattr(stream, "codec_context", None) is not None:
            ctx = stream.codec_context
            entry.update(channels=ctx.channels, layout=ctx.layout.name, sample_rate=ctx.sample_rate)
        if self.kind == "attachment":
            entry["filename"] = stream.metadata.get("filename")
        if self.aac is not None:
            entry.update(bit_rate=self.aac.bit_rate, out_layout=self.aac.layout, out_sample_rate=self.aac.rate)
        if self.reason:
            entry["reason"] = self.reason
        if self.notes:
            entry["notes"] = self.notes
        return entry


def plan(source: Any) -> list[TrackPlan]:
    """A plan for every stream of ``source`` (an open input container), in the source's order."""
    plans = [_plan(stream, source.streams.video[0]) for stream in source.streams]
    _note_default_tracks(plans)
    return plans


def language(stream: Any) -> str | None:
    lang = stream.metadata.get("language")
    return None if lang in (None, "", "und") else lang


def title(stream: Any) -> str | None:
    # MP4 keeps a track's title in udta 'name', which FFmpeg reads back as "name" rather than "title"
    return stream.metadata.get("title") or stream.metadata.get("name") or None


def dispositions(stream: Any) -> av.stream.Disposition:
    return stream.disposition & _DISPOSITIONS


def _codec_name(stream: Any) -> str:
    if stream.type == "attachment":
        return getattr(stream, "mimetype", None) or "attachment"
    ctx = getattr(stream, "codec_context", None)
    if ctx is None:  # a data stream: PyAV names its codec
        return getattr(stream, "name", None) or "unknown"
    try:
        return ctx.codec.canonical_name  # "dts", "subrip": the format's name, not the decoder's ("dca", "srt")
    except Exception:  # no decoder in this build
        return ctx.name or "unknown"


def _plan(stream: Any, video: Any) -> TrackPlan:
    kind, codec = stream.type, _codec_name(stream)
    if kind == "video":
        if stream.index == video.index:
            return TrackPlan(stream, kind, codec, "stylized", notes=["encoded as h264"])
        if stream.disposition & av.stream.Disposition.attached_pic:
            return TrackPlan(stream, kind, codec, "dropped", "cover art is not carried")
        return TrackPlan(stream, kind, codec, "dropped", "only the first video stream is stylized")
    if kind == "audio":
        return _plan_audio(stream, codec)
    if kind == "subtitle":
        return _plan_subtitle(stream, codec)
    if kind == "attachment":
        return TrackPlan(stream, kind, codec, "dropped",
                         "MP4 cannot carry attachments (fonts are only needed to draw ASS styling)")
    if kind == "data":
        return TrackPlan(stream, kind, codec, "dropped", "data streams (timecode, metadata, chapter text) are not "
                                                        "carried; chapters come through as chapters")
    return TrackPlan(stream, kind, codec, "dropped", f"{kind} streams are not carried")


def _plan_audio(stream: Any, codec: str) -> TrackPlan:
    if codec in MP4_AUDIO_CODECS:
        return TrackPlan(stream, "audio", codec, "copied")
    ctx = stream.codec_context
    if not _has_decoder(ctx):
        return TrackPlan(stream, "audio", codec, "dropped", f"{codec} cannot be decoded here, and MP4 does not take it")
    if not ctx.sample_rate or not ctx.channels:
        return TrackPlan(stream, "audio", codec, "dropped", "its sample rate or channel count cannot be read")
    settings, notes = aac_settings(ctx.sample_rate, ctx.channels, ctx.layout.name)
    return TrackPlan(stream, "audio", codec, "re-encoded to aac", f"MP4 players do not take {codec}", notes, settings)


def _plan_subtitle(stream: Any, codec: str) -> TrackPlan:
    if codec == "mov_text":
        return TrackPlan(stream, "subtitle", codec, "copied")
    ctx = stream.codec_context
    descriptor = ctx.codec if _has_decoder(ctx) else None
    if descriptor is not None and descriptor.text_sub:
        return TrackPlan(stream, "subtitle", codec, "converted to mov_text", "MP4's text track format is mov_text",
                         ["styling beyond bold, italic, underline and colour is lost"] if codec in ("ass", "ssa")
                         else [])
    if descriptor is not None and descriptor.bitmap_sub:
        return TrackPlan(stream, "subtitle", codec, "dropped", "bitmap subtitles cannot be carried in MP4")
    return TrackPlan(stream, "subtitle", codec, "dropped", f"{codec} subtitles cannot be read here")


def _has_decoder(ctx: Any) -> bool:
    try:
        return ctx is not None and ctx.codec is not None and ctx.codec.is_decoder
    except Exception:
        return False


def aac_settings(rate: int, channels: int, layout: str) -> tuple[AacSettings, list[str]]:
    """The AAC encoder's settings for a track, and what differs from the source (said in the report)."""
    notes = []
    out_rate = rate if rate in _AAC_RATES else next((r for r in _AAC_RATES if r >= rate), _AAC_RATES[-1])
    if out_rate != rate:
        notes.append(f"resampled {rate} → {out_rate} Hz")
    out_layout = layout
    if layout.endswith("channels"):  # an unordered layout (PCM in Matroska, WAV): the usual one for the count
        out_layout = _DEFAULT_LAYOUTS.get(channels, "7.1")
    if not _aac_takes(out_layout, out_rate):
        out_layout = _DEFAULT_LAYOUTS.get(channels, "7.1")
    if av.AudioLayout(out_layout).nb_channels != channels:
        notes.append(f"downmixed from {channels} channels to {out_layout}")
    # ~64 kb/s a channel, plus 32 for the first: 96 mono, 160 stereo, 416 for 5.1, at most 512 kb/s
    bit_rate = min(512_000, 64_000 * av.AudioLayout(out_layout).nb_channels + 32_000)
    return AacSettings(out_rate, out_layout, bit_rate), notes


@cache
def _aac_takes(layout: str, rate: int) -> bool:
    try:
        ctx = av.CodecContext.create("aac", "w")
        ctx.layout, ctx.sample_rate, ctx.format = layout, rate, "fltp"
        ctx.open()
        return True
    except (av.error.FFmpegError, ValueError):
        return False


def _note_default_tracks(plans: list[TrackPlan]) -> None:
    """FFmpeg's MP4 muxer enables (and so marks default) the first track of a kind when the source marks none of
    that kind default: said on the track, since a player may then select it by itself."""
    for kind in ("audio", "subtitle"):
        kept = [p for p in plans if p.kind == kind and p.kept]
        if kept and not any(p.stream.disposition & av.stream.Disposition.default for p in kept):
            kept[0].notes.append(f"marked default in the output: MP4 enables the first {kind} track when the "
                                 "source marks none")
