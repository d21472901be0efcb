"""Bad input, case by case, through both doors a person uses: a job (HTTP API → orchestration, as in Azure) and
`stylize run` on one machine. Every case must give one clear line — the job's Failed status and the CLI's
`error:` line say the same thing — leave the input as it was, and publish nothing.

The worker's own refusals (ranges, protocols, playlists fetched over HTTP) are in test_worker_cli.py; the
blob-metadata door is in test_blob_pipeline.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.media_helpers import FFMPEG, RangeFileServer, make_clip, make_clip_with_audio
from tests.stacks import Stack, open_stack

REPO = Path(__file__).resolve().parents[1]
LIMITS = {"max_duration_seconds": 3.0, "max_frame_side": 1000}  # what this file's "too long/too big" exceed
NOT_A_VIDEO = "is not a video file this service accepts (playlists, concat lists and image sequences are refused)"


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path, Path], Path]  # (folder, a good clip) → the bad file
    message: str  # the whole reason, as the user reads it (a regular expression when `pattern`)
    style: str = "7"
    pattern: bool = False

    def matches(self, text: str) -> bool:
        return re.fullmatch(self.message if self.pattern else re.escape(self.message), text) is not None


def _text(name: str, text: str) -> Callable[[Path, Path], Path]:
    def make(folder: Path, clip: Path) -> Path:
        (folder / name).write_text(text)
        return folder / name

    return make


def _cut(name: str, fraction: float, faststart: bool) -> Callable[[Path, Path], Path]:
    """An upload that stopped part way; with the index at the front, the file still claims its full length."""

    def make(folder: Path, clip: Path) -> Path:
        whole = folder / f"whole-{name}"
        subprocess.run([FFMPEG, "-loglevel", "error", "-y", "-i", str(clip), "-c", "copy",
                        *(["-movflags", "+faststart"] if faststart else []), str(whole)], check=True)
        data = whole.read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * fraction)])
        return folder / name

    return make


def _audio_only(folder: Path, clip: Path) -> Path:
    subprocess.run([FFMPEG, "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine", "-t", "1",
                    str(folder / "tone.mp4")], check=True)
    return folder / "tone.mp4"


def _clip(case: str, name: str, **kwargs) -> Callable[[Path, Path], Path]:
    def make(folder: Path, clip: Path) -> Path:
        return make_clip(folder, case, **kwargs).rename(folder / name)

    return make


def _good(folder: Path, clip: Path) -> Path:
    return Path(shutil.copy(clip, folder / "good.mp4"))


CASES = [
    Case("not-a-video", _text("notes.mp4", "meeting notes\n" * 40), f"notes.mp4 {NOT_A_VIDEO}"),
    Case("empty", _text("empty.mp4", ""), "empty.mp4 is empty"),
    Case("truncated", _cut("cut.mp4", 0.5, faststart=False), f"cut.mp4 {NOT_A_VIDEO}"),
    Case("truncated-index-first", _cut("cutfs.mp4", 0.6, faststart=True),
         r"the video stops at 1\.\d\d s but the file says it lasts 2\.00 s: it is truncated or damaged", pattern=True),
    Case("no-video-stream", _audio_only, "tone.mp4 has no video stream"),
    Case("too-wide", _clip("bframes", "wide.mp4", seconds=1, size="1280x64"),
         "the video is 1280x64; frames up to 1000 pixels a side are accepted"),
    Case("too-long", _clip("bframes", "long.mp4", seconds=4, size="64x48"),
         "the video is 4.0 s long; the limit is 3.0 s"),
    Case("hls-playlist", _text("list.mp4", "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{url}/secret.mp4\n"
                                           "#EXT-X-ENDLIST\n"), f"list.mp4 {NOT_A_VIDEO}"),
    Case("concat-list", _text("concat.mp4", "ffconcat version 1.0\nfile '/etc/hostname'\n"),
         f"concat.mp4 {NOT_A_VIDEO}"),
    Case("style-image-not-an-image", _good,
         "style image painting.jpg is not an image this service can read (use JPEG, PNG or WebP)",
         style="painting.jpg"),
]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip_with_audio(tmp_path_factory.mktemp("clip"), "aac", ".mp4", seconds=2.0)


@pytest.fixture(scope="module", params=["local", "batch"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The app on local compute, and on the cloud path: Blob Storage (Azurite) and Batch (the fake)."""
    azurite = request.getfixturevalue("azurite") if request.param == "batch" else None
    with pytest.MonkeyPatch.context() as monkeypatch, \
            open_stack(request.param, tmp_path_factory.mktemp("stack"), monkeypatch, azurite, **LIMITS) as stack:
        yield stack


@pytest.fixture(scope="module")
def other_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RangeFileServer]:
    """A server a playlist points at: it must never be asked for anything."""
    root = tmp_path_factory.mktemp("other-host")
    (root / "secret.mp4").write_bytes(b"\0" * 1000)
    server = RangeFileServer(root)
    yield server
    server.close()
    assert server.bytes_sent == 0


def _bad_file(case: Case, folder: Path, clip: Path, other_host: RangeFileServer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = case.make(folder, clip)
    if path.suffix and "{url}" in path.read_text(errors="ignore"):
        path.write_text(path.read_text().replace("{url}", other_host.url))
    if case.style.endswith(".jpg"):
        (folder / case.style).write_text("<html>not an image</html>")
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_job_fails_with_the_reason(case: Case, stack: Stack, clip: Path, other_host: RangeFileServer,
                                   tmp_path: Path) -> None:
    source = _bad_file(case, tmp_path, clip, other_host)
    name = stack.put(source, f"{case.id}/{source.name}")
    if case.style.endswith(".jpg"):
        stack.svc.storage.upload_file(tmp_path / case.style, stack.settings.styles_container, case.style)
    before = source.read_bytes()
    job_id = stack.start(name, style=case.style)
    status = stack.wait(job_id, timeout=120)
    assert status["runtimeStatus"] == "Failed"
    error = status["customStatus"]["error"]
    assert error["kind"] == "input" and case.matches(error["message"]), error
    code, view = stack.call("get_job", route={"job_id": job_id})
    assert code == 200 and view["stage"] == "failed" and view["error"] == error
    assert stack.download("input", name, tmp_path / "input-after").read_bytes() == before  # untouched
    assert stack.names("output") == [] and stack.names("work") == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_stylize_run_says_the_same_in_one_line(case: Case, clip: Path, other_host: RangeFileServer,
                                               tmp_path: Path) -> None:
    source = _bad_file(case, tmp_path / "in", clip, other_host)
    before = source.read_bytes()
    out = tmp_path / "out" / "result.mp4"
    style = str(tmp_path / "in" / case.style) if case.style.endswith(".jpg") else case.style
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "MAX_DURATION_SECONDS": "3", "MAX_FRAME_SIDE": "1000",
           "GPU_WORKER_CACHE": os.environ["GPU_WORKER_CACHE"], "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, "-m", "local.cli", "run", str(source), "-s", style, "-o", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and case.matches(errors[0].removeprefix("error: ")), result.stderr
    assert source.read_bytes() == before
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


BAD_REQUESTS = [
    # (id, body, field, the whole error; {input}, {styles} and {output} are the container names)
    ("not-json", b"{not json", "body", "the body must be a JSON object"),
    ("not-an-object", [1, 2], "body", "the body must be a JSON object"),
    ("no-input", {"style": "7"}, "input", "input is required: the name of a video in the input container"),
    ("unknown-field", {"input": "good.mp4", "colour": "red"}, "colour",
     "unknown field 'colour'; allowed: input, max_size, output, preserve_color, segment_seconds, strength, style, "
     "temporal"),
    ("style-out-of-range", {"input": "good.mp4", "style": "42"}, "style",
     "style 42 does not exist: built-in styles are 0-25"),
    ("strength-out-of-range", {"input": "good.mp4", "strength": 1.5}, "strength", None),
    ("temporal-out-of-range", {"input": "good.mp4", "temporal": 1}, "temporal",
     "temporal must be between 0 (off) and 0.95, got 1"),
    ("temporal-not-a-number", {"input": "good.mp4", "temporal": "smooth"}, "temporal",
     "temporal must be a number, got 'smooth'"),
    ("preserve-color-not-a-flag", {"input": "good.mp4", "preserve_color": "maybe"}, "preserve_color", None),
    ("style-url", {"input": "good.mp4", "style": "https://example.org/p.jpg"}, "style",
     "style images are names in the '{styles}' container, not URLs"),
    ("style-image-missing", {"input": "good.mp4", "style": "missing.png"}, "style",
     "style image 'missing.png' is not in the '{styles}' container"),
    ("path-traversal", {"input": "../secrets.mp4"}, "input",
     "input '../secrets.mp4' must be a relative name without '..', '.', '//' or backslashes"),
    ("absolute-path", {"input": "/etc/passwd.mp4"}, "input", None),
    ("control-characters", {"input": "clip\x07.mp4"}, "input", "input has control characters"),
    ("not-a-video-name", {"input": "list.m3u8"}, "input", None),
    ("output-not-mp4", {"input": "good.mp4", "output": "result.avi"}, "output",
     "output must name an .mp4 blob in the '{output}' container, got 'result.avi'"),
    ("output-traversal", {"input": "good.mp4", "output": "../result.mp4"}, "output", None),
    ("missing-input", {"input": "missing.mp4"}, "input", "input 'missing.mp4' is not in the '{input}' container"),
]


@pytest.mark.parametrize(("body", "field", "message"), [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS])
def test_bad_request_is_400_naming_the_field(body, field: str, message: str | None, stack: Stack, clip: Path) -> None:
    stack.put(clip, "good.mp4")
    jobs_before = stack.host.list_instances()
    code, reply = stack.call("create_job", "POST", body)
    assert code == 400 and reply["field"] == field, reply
    if message is not None:
        message = message.format(input=stack.settings.input_container, styles=stack.settings.styles_container,
                                 output=stack.settings.output_container)
    assert "\n" not in reply["error"] and (message is None or reply["error"] == message), reply["error"]
    assert stack.host.list_instances() == jobs_before  # nothing started


def test_a_tiny_file_declaring_huge_frames_is_refused_before_a_frame_is_decoded(tmp_path: Path) -> None:
    """43 bytes of GIF declaring a 16000x16000 screen: probing it (in the Function App, 2 GB) decoded one
    1 GB frame before refusing it. The declared size is now checked first."""
    import struct
    import subprocess
    import sys

    gif = (b"GIF89a" + struct.pack("<HHBBB", 16000, 16000, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
           + b"\x21\xf9\x04\x00\x02\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
           + b"\x02\x02\x44\x01\x00" + b"\x3b")
    bomb = tmp_path / "bomb.gif"
    bomb.write_bytes(gif)
    code = ("import resource, sys\nfrom gpu_worker import media\ntry:\n    media.probe(sys.argv[1])\n"
            "except media.InputError as e:\n    print(e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    done = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    message, peak_mb = done.stdout.splitlines()
    assert message == "bomb.gif is 16000x16000: frames must be 2 to 8192 pixels a side"
    assert int(peak_mb) < 600, peak_mb  # over 1 GB before
