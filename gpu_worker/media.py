"""Video I/O on PyAV: open sources safely, probe them, decode an exact half-open time range, encode.

Timestamps are never re-derived from a frame rate: every output frame keeps its source pts in the
source stream's time base, so segments cut at any instants concatenate back to the source's exact
frames and timestamps (B-frames, variable frame rate and all).
"""

from __future__ import annotations

import errno
import math
import os
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import av
import numpy as np

from gpu_worker import colour_tags
from gpu_worker.errors import InputError

# Demuxers we accept. Anything that can make ffmpeg open further resources (hls, dash, concat, image
# sequences, tee, …) is absent, so a playlist or concat list is refused before it is followed.
ALLOWED_FORMATS = (
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,asf,mxf,ogg,mpeg,nut,ivf,yuv4mpegpipe,gif,"
    "h264,hevc,m4v"
)
FILE_PROTOCOLS = "file"
URL_PROTOCOLS = "http,https,tls,tcp"
MAX_SIDE = 8192  # larger frames are refused: no style network can run them and they are usually abuse

# More tracks than this of either kind is refused (issue 16): each audio track the stitch re-encodes holds a
# decoder, a resampler and an encoder, and no real source needs more (Blu-ray allows 32 of each).
MAX_AUDIO_TRACKS = MAX_SUBTITLE_TRACKS = 32
# AVColorSpace codes → swscale matrix names; unspecified sources get the usual guess by height.
_MATRIX_BY_COLORSPACE = {1: "itu709", 5: "itu601", 6: "smpte170m", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


class SourceClosedError(Exception):
    """A read was asked of a :class:`Source` after it was closed.

    Not a RuntimeError: :func:`_seek_before` takes those for PyAV's end of a generator after a seek."""


class Source:
    """An open input container that is never closed under a thread that is reading it.

    A decoder thread can sit inside ffmpeg for up to the read timeout while a network source stalls, and
    ffmpeg cannot be told to stop that read from another thread. Closing the container then frees what the
    read is using, and the thread crashes the process when the read returns (the same class of crash as
    closing the muxer under the encoder thread). So a close that finds a read in progress returns at once
    and leaves the close to the reader, which does it on its way out of ffmpeg; reads started after the
    close raise :class:`SourceClosedError`. Everything else is the PyAV container's own API.
    """

    def __init__(self, container: av.container.InputContainer) -> None:
        self.container = container
        self._lock = threading.Lock()
        self._reads = 0
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        if name == "container":  # not set yet (half-built or being copied): no recursion
            raise AttributeError(name)
        return getattr(self.container, name)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Around every call into ffmpeg that a thread other than the closing one makes."""
        with self._lock:
            if self._closing:
                raise SourceClosedError("the source was closed")
            self._reads += 1
        try:
            yield
        finally:
            with self._lock:
                self._reads -= 1
                last_out = self._closing and self._reads == 0
            if last_out:
                self.container.close()

    def read(self, items: Iterator) -> Iterator:
        """``items`` (a PyAV demux or decode generator), each step taken under :meth:`reading` and none
        while the caller holds a yielded item, so a reader that stops iterating never blocks a close."""
        done = object()
        while True:
            with self.reading():
                item = next(items, done)
            if item is done:
                return
            yield item

    def close(self) -> None:
        with self._lock:
            self._closing = True
            busy = self._reads > 0
        if not busy:
            self.container.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def open_source(source: str, http_headers: Mapping[str, str] | None = None) -> Source:
    """Open a local path or http(s) URL for reading, with protocol and demuxer whitelists.

    Raises :class:`InputError` with a one-line reason for anything that is not a readable video.
    """
    options = {"format_whitelist": ALLOWED_FORMATS}
    if is_url(source):
        options["protocol_whitelist"] = URL_PROTOCOLS
        options["reconnect"] = "1"
        if http_headers:
            options["headers"] = "".join(f"{k}: {v}\r\n" for k, v in http_headers.items())
            # ffmpeg sends these headers on to wherever a redirect points; Blob Storage never redirects a read
            options["max_redirects"] = "0"
        name = PurePosixPath(unquote(urlparse(source).path)).name  # as a local path reads; never the query
    else:
        if "://" in source or source.startswith(("concat:", "subfile,", "pipe:", "data:")):
            raise InputError(f"unsupported source {source.split(':', 1)[0]!r}: give a file path or an "
                             "http(s) URL")
        path = Path(source)
        name = path.name
        if not path.exists():
            raise InputError(f"no such file: {source}")
        if not path.is_file():
            raise InputError(f"not a file: {source}")
        if path.stat().st_size == 0:
            raise InputError(f"{name} is empty")
        options["protocol_whitelist"] = FILE_PROTOCOLS
        source = str(path.resolve())
    try:
        container = av.open(source, mode="r", options=options, timeout=(30.0, 60.0))
    except av.error.HTTPError as exc:
        raise InputError(f"cannot download {name}: {exc.strerror}") from None
    except (av.error.FileNotFoundError, av.error.PermissionError) as exc:
        raise InputError(f"cannot read {name}: {exc.strerror}") from None
    except (av.error.InvalidDataError, av.error.ArgumentError):
        # playlists, concat lists and other indirections fail here too: their demuxers are not whitelisted
        raise InputError(f"{name} is not a video file this service accepts (playlists, concat lists and "
                         "image sequences are refused)") from None
    except (av.error.FFmpegError, OSError) as exc:
        if http_headers and is_url(source) and getattr(exc, "errno", None) == errno.EIO:
            # what ffmpeg says of a redirect it may not follow (and of a connection that broke off)
            raise InputError(f"cannot download {name}: input/output error (a redirect is not followed while a "
                             "storage token is sent)") from None
        raise InputError(f"{name} is not a readable video ({getattr(exc, 'strerror', exc)})") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{name} has no video stream")
    try:
        check_track_counts(container, name)
        declared = container.streams.video[0].codec_context
        if declared.width and declared.height:  # refused before a frame of it is decoded (a tiny file can
            check_size(declared.width, declared.height, name)  # declare 16000x16000: GBs a frame)
    except InputError:
        container.close()
        raise
    container.streams.video[0].thread_type = "AUTO"  # frame threads: decode keeps pace with the GPU
    return Source(container)


def check_track_counts(container: av.container.InputContainer, name: str) -> None:
    """Refuse a source with more audio or subtitle tracks than the service carries, before any work on it."""
    for kind, count, limit in (("audio", len(container.streams.audio), MAX_AUDIO_TRACKS),
                               ("subtitle", len(container.streams.subtitles), MAX_SUBTITLE_TRACKS)):
        if count > limit:
            raise InputError(f"{name} has {count} {kind} tracks; at most {MAX_AUDIO_TRACKS} audio and "
                             f"{MAX_SUBTITLE_TRACKS} subtitle tracks are accepted", field="input")


@dataclass(frozen=True)
class VideoInfo:
    """What planning and stitching need to know about a source (JSON-friendly)."""

    width: int
    height: int
    display_width: int
    display_height: int
    rotation: int
    sample_aspect_ratio: str
    time_base: str
    start_seconds: float
    duration_seconds: float | None
    frame_rate: float | None
    frames: int | None
    codec: str
    pixel_format: str | None
    audio_codec: str | None  # the first audio track's
    audio_tracks: int = 0
    subtitle_tracks: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def probe(source: str, http_headers: Mapping[str, str] | None = None) -> VideoInfo:
    """Read a source's headers and its first frame (for rotation and to prove it decodes)."""
    with open_source(source, http_headers) as container:
        stream = container.streams.video[0]
        first = first_frame(container, stream, source)
        tb = stream.time_base
        start = stream.start_time if stream.start_time is not None else (first.pts or 0)
        duration = None
        if stream.duration:
            duration = float(stream.duration * tb)
        elif container.duration:  # Matroska and others: the container's, which counts every track
            end = _video_end(container, stream)
            duration = float((end - start) * tb) if end is not None else container.duration / av.time_base
        rate = stream.average_rate or stream.guessed_rate
        sar = sample_aspect(stream)
        rotation = orientation(first)[0] * 90
        dw, dh = display_size(first.width, first.height, sar, rotation)
        audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
        return VideoInfo(
            width=first.width, height=first.height, display_width=dw, display_height=dh, rotation=rotation,
            sample_aspect_ratio=f"{sar.numerator}:{sar.denominator}", time_base=str(tb),
            start_seconds=float(start * tb), duration_seconds=duration,
            frame_rate=float(rate) if rate else None, frames=stream.frames or None,
            codec=stream.codec_context.name, pixel_format=first.format.name, audio_codec=audio,
            audio_tracks=len(container.streams.audio), subtitle_tracks=len(container.streams.subtitles),
        )


VIDEO_END_WINDOW_SECONDS = 10
VIDEO_END_READ_LIMIT = 64 * 2**20  # bytes: a header that lies about the duration must not make this read the file


def _video_end(container: Source, stream: av.VideoStream) -> int | None:
    """Where the video's last packet ends (pts, in the stream's time base), read from the packets of the
    container's last seconds (one seek, one short read); None where that finds no video (its video stops
    more than the window before the rest, or the container cannot seek). A container's duration counts its
    audio too: planned by it, a video whose audio runs on got ranges past its last frame and a frame count
    for the progress that it never reached."""
    window = VIDEO_END_WINDOW_SECONDS * av.time_base
    target = (container.start_time or 0) + container.duration - window
    end = None
    read = 0
    try:
        with container.reading():
            container.seek(max(0, target), backward=True, any_frame=False)  # in AV_TIME_BASE units
        for packet in container.read(container.demux(stream)):
            read += packet.size
            if read > VIDEO_END_READ_LIMIT:
                return None  # not the last seconds after all: the container's duration it is
            if packet.pts is not None:
                end = max(end or packet.pts, packet.pts + (packet.duration or 0))
    except av.error.FFmpegError:
        return None
    return end


def first_frame(container: Source, stream: av.VideoStream, name: str) -> av.VideoFrame:
    """Decode the first frame, turning every decoder failure into an :class:`InputError`."""
    try:
        for frame in container.read(container.decode(stream)):
            check_size(frame.width, frame.height, name)
            return frame
    except av.error.FFmpegError as exc:
        raise InputError(f"{Path(name).name} cannot be decoded ({exc.strerror})") from None
    raise InputError(f"{Path(name).name} has no decodable video frames (empty or truncated)")


def check_size(width: int, height: int, name: str) -> None:
    if max(width, height) > MAX_SIDE or min(width, height) < 2:
        raise InputError(f"{Path(name).name} is {width}x{height}: frames must be 2 to {MAX_SIDE} pixels a side")


def sample_aspect(stream: av.VideoStream) -> Fraction:
    """The stream's sample (pixel) aspect ratio; 1 when it is unset or invalid."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return Fraction(sar) if sar and sar > 0 else Fraction(1)


def orientation(frame: av.VideoFrame) -> tuple[int, bool]:
    """(quarter turns, mirrored): what shows a decoded frame as players do: turn it by the display matrix's
    rotation, in quarter turns as PyAV counts them (``frame.rotation``), then, where the matrix mirrors (a negative
    determinant), mirror it left to right, as ffmpeg's autorotate does. PyAV's rotation alone reads a mirror as a
    half turn, which turned mirrored videos upside down."""
    matrix = next((struct.unpack("9i", bytes(data)) for data in frame.side_data
                   if data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX), None)
    if matrix is None:
        return (frame.rotation % 360) // 90, False
    a, b, _, c, d = matrix[:5]
    mirrored = a * d - b * c < 0
    if mirrored:  # the rotation that the mirror follows
        a, c = -a, -c
    degrees = -math.degrees(math.atan2(b / math.hypot(b, d), a / math.hypot(a, c)))  # as av_display_rotation_get
    return round(degrees / 90) % 4, mirrored


def display_size(width: int, height: int, sar: Fraction, rotation: int) -> tuple[int, int]:
    """The size a player shows: SAR applied to the width, then the rotation."""
    dw = round(width * sar)
    return (height, dw) if rotation % 180 == 90 else (dw, height)


def range_pts(start: Fraction, end: Fraction | None, time_base: Fraction) -> tuple[int, int | None]:
    """Integer pts bounds of the half-open range: a frame belongs iff lo <= pts < hi.

    pts*tb >= start  ⇔  pts >= ceil(start/tb), and pts*tb < end ⇔ pts < ceil(end/tb), so neighbouring
    ranges share no frame and miss none, whatever the frame rate.
    """
    lo = math.ceil(start / time_base)
    return lo, (math.ceil(end / time_base) if end is not None else None)


def decode_range(
    container: Source, stream: av.VideoStream, start: Fraction, end: Fraction | None,
    preroll: int = 0, seen: dict[str, int] | None = None,
) -> Iterator[av.VideoFrame]:
    """Yield exactly the frames whose pts lies in [start, end), seeking to the keyframe before start.

    With ``preroll``, up to that many frames before ``start`` come first (a stage that carries state from
    frame to frame warms up on them); the caller tells them apart by ``frame.pts < range_pts(...)[0]``.
    They come only if the range itself has a frame. A frame whose pts is not after the one before it is left
    out. ``seen["before"]``, if given, counts the frames decoded before
    ``start`` (warm-up or not). Safe to run on a thread while another closes ``container`` (see :class:`Source`).
    """
    lo, hi = range_pts(start, end, stream.time_base)
    seek_to = lo
    if preroll:
        rate = stream.average_rate or stream.guessed_rate or 25
        seek_to = max(0, lo - math.ceil((preroll + 2) / (rate * stream.time_base)))  # a little to spare
    frames = _seek_before(container, stream, seek_to)
    before: deque[av.VideoFrame] = deque(maxlen=preroll or 1)
    decoded_to = None  # where the last decoded frame ends
    newest = None  # the largest pts decoded
    try:
        for frame in frames:
            if frame.pts is None:
                raise InputError("the video has frames without timestamps; remux it (e.g. to MP4) first")
            if max(frame.width, frame.height) > MAX_SIDE:  # a stream that grows mid-way: no bigger than its start
                check_size(frame.width, frame.height, "the video")
            if newest is not None and frame.pts <= newest:
                # A frame at a time already shown (a repeated or backward timestamp, as some recorders and
                # edits leave) cannot be stored in MP4, where each frame has its own time: the first one shown
                # at that time is kept, as a player shows it.
                continue
            newest = frame.pts
            if hi is not None and frame.pts >= hi:
                return
            if seen is not None and frame.pts < lo:
                seen["before"] += 1
            decoded_to = frame.pts + (frame.duration or 0)
            if frame.pts >= lo:
                while preroll and before:
                    yield before.popleft()
                yield frame
            elif preroll:
                before.append(frame)
    except av.error.FFmpegError as exc:
        raise InputError(f"the video cannot be decoded past this point ({exc.strerror})") from None
    _check_not_truncated(stream, lo if decoded_to is None else decoded_to, hi)


def _check_not_truncated(stream: av.VideoStream, decoded_to: int, hi: int | None) -> None:
    """The frames ran out before the range's end although the stream's index says there are more: the file was
    cut short (an upload that stopped half way) and would otherwise give a video with its end missing."""
    if not stream.duration:
        return  # no index to compare with (MPEG-TS, most MKV): the frames are all there is
    declared_end = (stream.start_time or 0) + stream.duration
    expected = declared_end if hi is None else min(hi, declared_end)
    rate = float(stream.average_rate or 25)
    tolerance = max(0.25, 3 / rate) / stream.time_base
    if expected - decoded_to > tolerance:
        raise InputError(f"the video stops at {float(decoded_to * stream.time_base):.2f} s but the file says it "
                         f"lasts {float(declared_end * stream.time_base):.2f} s: it is truncated or damaged")


def _seek_before(container: Source, stream: av.VideoStream, lo: int) -> Iterator[av.VideoFrame]:
    """Frames from a keyframe at or before pts ``lo``.

    Some indexes point past the wanted keyframe, and some demuxers (MPEG-TS) cannot seek to their very
    first timestamp; step the target back until the first decoded frame is at or before ``lo``, and
    rewind to the start of the file when the target reaches the start of the stream.
    """
    stream_start = stream.start_time or 0
    step = max(1, int(1 / stream.time_base))  # one second in ticks
    target = lo
    while True:
        at_start = target <= stream_start
        with container.reading():
            if at_start:
                container.seek(0, backward=True, any_frame=False)  # file start, in AV_TIME_BASE units
            else:
                container.seek(target, stream=stream, backward=True, any_frame=False)
        frames = container.read(container.decode(stream))
        try:
            first = next(frames, None)
        except RuntimeError:  # PyAV's generator ends this way after a seek past the last packet
            first = None
        if at_start or (first is not None and first.pts is not None and first.pts <= lo):
            if first is not None:
                yield first
            yield from frames
            return
        target = max(stream_start, target - step)
        step *= 2


def rgb_matrix(frame: av.VideoFrame) -> str:
    """The YUV↔RGB matrix for a frame: its tag, else BT.709 for HD and BT.601 below."""
    return _MATRIX_BY_COLORSPACE.get(frame.colorspace, "itu709" if frame.height >= 720 else "itu601")


def frame_planes(frame: av.VideoFrame, width: int, height: int, rgb: bool = False) -> tuple[str, np.ndarray, bool]:
    """(layout, pixels, full_range) for the scorer's device: the decoder's own I420 planes when they already
    have the wanted size (the common case on a GPU, which converts them itself from half the bytes of
    RGB), else — or whenever ``rgb`` asks for it — full-range RGB converted by swscale (10-bit, 4:4:4, odd
    sizes, scaling, and every frame on the CPU, where swscale's SIMD code is ~10x faster than torch's).
    Rotation is left to the device."""
    full_range = frame.color_range == 2 or frame.format.name == "yuvj420p"
    if (not rgb and frame.format.name in ("yuv420p", "yuvj420p") and (frame.width, frame.height) == (width, height)
            and width % 2 == 0 and height % 2 == 0):
        return "yuv420p", frame.to_ndarray(), full_range
    pixels = frame.to_ndarray(
        width=width, height=height, interpolation="AREA" if width < frame.width else None,
        format="rgb24", src_colorspace=rgb_matrix(frame), dst_colorspace=rgb_matrix(frame),
        src_color_range=2 if full_range else 1, dst_color_range=2,
    )
    return "rgb24", pixels, True


def mp4_timescales(time_base: Fraction) -> dict[str, str]:
    """MP4 muxer options that keep a segment's start time exact.

    A segment that starts at t > 0 gets an edit list whose offset is counted in the movie timescale, 1000 by
    default: 1.5015 s (frame 45 at 29.97 fps) would come back as 1.501 s. Counting in the track's own
    timescale keeps every source timestamp representable.
    """
    scale = time_base.denominator
    while scale < 10000:  # what the muxer would pick for the track anyway
        scale *= 2
    return {"video_track_timescale": str(scale), "movie_timescale": str(scale)}


# x264's rc-lookahead for each preset (its presets table): how far ahead the encoder plans its bits
X264_LOOKAHEAD = {"ultrafast": 0, "superfast": 0, "veryfast": 10, "faster": 20, "fast": 30, "medium": 40,
                  "slow": 50, "slower": 60, "veryslow": 60, "placebo": 60}


class SegmentWriter:
    """Encode I420 frames with their source pts into H.264 MP4, written atomically.

    ``colour`` is the description the stream is tagged with (colour_tags.output_tags: the source's own); its range
    is also the range the frames are in (the full range of a full-range source is kept, not squeezed). Without
    it, what goes with ``matrix`` in limited range.

    Frames go to a hidden temporary file beside ``path``; :meth:`commit` renames it into place and
    :meth:`abort` (or leaving the ``with`` block by an exception) deletes it, so a failed run leaves
    nothing at ``path``. The first frame is an IDR frame, as every fresh x264 stream starts with one.

    A segment that another one follows is committed with ``continues=True``: x264 then plans its last frame as
    if the picture went on (:meth:`commit`), so the join costs what a keyframe costs in a one-piece encode.
    """

    def __init__(
        self, path: Path, *, width: int, height: int, time_base: Fraction, sample_aspect_ratio: Fraction,
        frame_rate: Fraction | None, matrix: str, preset: str = "veryfast", crf: int = 18,
        threads: int = 0, colour: colour_tags.ColourTags | None = None,
    ) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
        # 4:2:0 needs even sides: scale to the next even size and fold the change into the SAR, so the
        # display size is exactly the source's.
        self.width, self.height = width + width % 2, height + height % 2
        self.matrix = matrix
        self.colour = colour or colour_tags.tags_for_matrix(matrix)
        self.full_range = self.colour.full_range
        sar = sample_aspect_ratio * Fraction(width * self.height, height * self.width)
        self.frames = 0
        self._container = av.open(str(self.tmp), mode="w", format="mp4", options=mp4_timescales(time_base))
        stream = self._container.add_stream("libx264", rate=frame_rate or None)
        stream.time_base = time_base
        ctx = stream.codec_context
        ctx.width, ctx.height, ctx.pix_fmt = self.width, self.height, "yuv420p"
        ctx.time_base = time_base
        ctx.sample_aspect_ratio = sar.limit_denominator(65535)
        # x264 writes these into the stream's VUI, where decoders and players read them
        ctx.colorspace, ctx.color_primaries = self.colour.matrix, self.colour.primaries
        ctx.color_trc = self.colour.transfer
        ctx.color_range = self._range = 2 if self.full_range else 1
        ctx.thread_count = threads
        # frame threads, as the ffmpeg command uses: PyAV's default for encoders is slice threads, which made
        # x264 ~1.3x slower per frame at 1080p here
        ctx.thread_type = "AUTO"
        ctx.options = {"preset": preset, "crf": str(crf)}
        self._stream = stream
        self._lookahead = X264_LOOKAHEAD.get(preset, 10)
        # One frame is held back until the next arrives, so that commit(continues=True) can still choose how
        # the last one is coded.
        self._held: av.VideoFrame | None = None
        self._newest_pts: int | None = None  # the largest pts written
        self._step = 1  # the last pts step seen, for the copies commit() adds after the last frame
        self.first_encoded_at: float | None = None  # time.monotonic() when x264 got the first frame

    def write(self, pixels: np.ndarray | av.VideoFrame, pts: int) -> None:
        """One frame with its source pts: I420 planes ([height*3/2, width] uint8, in this stream's range) or an
        I420 frame from :meth:`yuv_frame`. The encoder gets it with the next call, or at :meth:`commit`."""
        if self._held is not None:  # first, as the caller may hand the same frame object in again
            self._encode(self._held)
        frame = pixels if isinstance(pixels, av.VideoFrame) else av.VideoFrame.from_ndarray(pixels, format="yuv420p")
        frame.pts = pts
        frame.color_range = self._range
        if self._newest_pts is not None:
            self._step = max(1, pts - self._newest_pts)
        self._newest_pts = pts if self._newest_pts is None else max(self._newest_pts, pts)
        self._held = frame
        self.frames += 1

    def _encode(self, frame: av.VideoFrame | None, up_to: int | None = None) -> None:
        packets = self._stream.encode(frame)
        if frame is not None and self.first_encoded_at is None:
            self.first_encoded_at = time.monotonic()
        self._container.mux(packets if up_to is None else [p for p in packets if p.pts is None or p.pts <= up_to])

    def yuv_frame(self, rgb: np.ndarray) -> av.VideoFrame:
        """Full-range RGB ([h, w, 3] uint8, any size) converted and scaled by swscale to this stream's I420."""
        # AREA averages each 2x2 block for the chroma: the inverse of the decoder side's nearest-neighbour
        # upsampling, so chroma a model leaves alone comes back unblurred (bilinear: 2.1 levels off, AREA 0.8)
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
            width=self.width, height=self.height, format="yuv420p", interpolation="AREA", src_colorspace=self.matrix,
            dst_colorspace=self.matrix, src_color_range=2, dst_color_range=self._range)

    def commit(self, continues: bool = False) -> None:
        """Finish the stream and move it into place.

        ``continues``: more of the video follows in another segment. A stream's last frames are otherwise coded
        as an end (x264's look-ahead sees nothing after them, so its macroblock tree spends fewer bits there),
        and together with the next segment's opening keyframe that showed as a pulse at each join: 1.05-1.39x
        the same frame pair in a one-piece encode on bikes.mp4, 1.48 / 6.14x on Big Buck Bunny. Here the last
        frame is followed by copies of itself, one look-ahead long, whose packets are dropped, and is coded as
        a P frame so that no frame kept refers forward to a copy (as a B frame would): 1.04-1.22x and
        1.30 / 4.91x, what a keyframe forced at the same place in a one-piece encode measures (1.05-1.23x,
        1.33 / 4.83x). Presets without a look-ahead (ultrafast, superfast) add no copies.
        """
        last = self._held
        tail = self._lookahead if continues and last is not None and self.frames > 1 else 0
        if last is not None:
            if tail:
                last.pict_type = av.video.frame.PictureType.P
            self._encode(last)
        newest = self._newest_pts
        if tail:
            picture = last.reformat(format="yuv420p").to_ndarray()
            for n in range(1, tail + 1):
                copy = av.VideoFrame.from_ndarray(picture, format="yuv420p")
                copy.pts, copy.color_range = newest + n * self._step, self._range
                self._encode(copy, up_to=newest)
        self._encode(None, up_to=newest if tail else None)
        self._container.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with suppress(Exception):
            self._container.close()
        with suppress(FileNotFoundError):
            self.tmp.unlink()

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
