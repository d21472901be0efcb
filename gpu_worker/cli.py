"""`python -m gpu_worker`: the commands a compute task runs.

Exit status: 0 success, 2 bad input (one line on stderr saying what and how to fix it), 3 a node that cannot run
the task as its backend set it up (no working GPU on a GPU pool: another node may), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from gpu_worker.errors import InputError, NodeError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_NODE = 0, 1, 2, 3
# Set by a compute backend that wants a running task's progress (LocalCompute does): the frames written so far.
PROGRESS_FILE_ENV = "WORKER_PROGRESS_FILE"
PROGRESS_EVERY_SECONDS = 0.5
# Set by a compute backend whose nodes have a GPU (BatchCompute on a GPU pool): a task there must not quietly
# fall back to the CPU when the node's driver fails.
DEVICE_ENV = "WORKER_DEVICE"


def _seconds(text: str) -> Fraction:
    """Seconds as an exact fraction: '12.48' must mean 1248/100, not the nearest binary float."""
    try:
        value = Fraction(Decimal(text))
    except (InvalidOperation, ValueError, OverflowError):  # OverflowError: inf
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"seconds must not be negative: {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and our bad-input exit status."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m gpu_worker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stylize", help="stylize the frames of SOURCE in [start, end) into OUTPUT (H.264 MP4)")
    s.add_argument("source", help="video file path or http(s) URL")
    s.add_argument("output", type=Path, help="output .mp4 path (written atomically)")
    s.add_argument("-s", "--style", required=True, help="7, 3:0.5,12:0.5, or a style image path/URL")
    s.add_argument("--strength", default="1.0", help="0 (original) to 1 (fully stylized); default 1")
    s.add_argument("--preserve-color", action="store_true", help="keep the original colours")
    s.add_argument("--temporal", default=None,
                   help="0 (off) to 0.95: steadies each frame with the previous one, carried along the motion "
                        "(default 0.9 for styles; the identity scorer never blends)")
    s.add_argument("--max-size", type=int, default=0, help="scale so the longer side is at most this (0: keep)")
    s.add_argument("--start", type=_seconds, default=Fraction(0), help="range start in seconds (inclusive)")
    s.add_argument("--end", type=_seconds, default=None, help="range end in seconds (exclusive); default: end")
    s.add_argument("--device", default=None,
                   help=f"auto, cpu or cuda (default: ${DEVICE_ENV}, else auto: the GPU if there is one)")
    s.add_argument("--preset", default=os.environ.get("WORKER_X264_PRESET", "veryfast"), help="x264 preset")
    s.add_argument("--crf", type=int, default=int(os.environ.get("WORKER_X264_CRF", "18")), help="x264 CRF")
    s.add_argument("--pipelines", default=os.environ.get("WORKER_PIPELINES", "auto"),
                   help="worker processes splitting the range, each with its own decoder, model and encoder (auto: 1)")
    s.add_argument("--allow-empty", action="store_true",
                   help="a range the video has no frames in (a gap in a variable-frame-rate video, or past its last "
                        "frame while its audio goes on) writes an empty OUTPUT (0 bytes) instead of failing")
    s.add_argument("--scorer", choices=("style", "identity"), default="style", help=argparse.SUPPRESS)
    s.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")

    p = sub.add_parser("probe", help="print what the pipeline needs to know about a video, as JSON")
    p.add_argument("source")

    t = sub.add_parser("stitch", help="join segments by stream copy and add the source's other tracks")
    t.add_argument("output", type=Path)
    t.add_argument("segments", nargs="*", help="segment files or URLs in order")
    t.add_argument("--list", default=None, help="a JSON array of segment files or URLs (path or URL)")
    t.add_argument("--audio-from", default=None,
                   help="the source video: its audio and subtitle tracks, chapters and title come back (the JSON "
                        "summary lists every track: kept how, or dropped why)")
    t.add_argument("--json", action="store_true")

    sub.add_parser("standby", help="import what a task needs, then run the one task whose command line arrives on "
                                   "stdin as JSON (a local compute backend starts one before it has work)")
    sub.add_parser("prepare-weights", help="convert the shipped networks to torch once (image build time)")
    sub.add_parser("prepare", help="convert the networks and compile them for this machine's CPU (install time)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NodeError as exc:
        print(f"node error: {exc}", file=sys.stderr)
        return EXIT_NODE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("WORKER_DEBUG"):
            raise
        return EXIT_INTERNAL


def _run(args: argparse.Namespace) -> int:
    output = getattr(args, "output", None)
    if args.command in ("stylize", "stitch") and not output.parent.is_dir():  # found only after the work otherwise
        raise InputError(f"the output's folder {output.parent} does not exist", field="output")
    if args.command == "probe":
        from gpu_worker.media import probe

        print(json.dumps(probe(args.source).to_dict()))
    elif args.command == "stitch":
        from gpu_worker.source_auth import http_headers
        from gpu_worker.stitch import stitch

        headers = http_headers()
        segments = list(args.segments) + (_read_list(args.list, headers) if args.list else [])
        result = stitch(segments, args.output, args.audio_from, http_headers=headers)
        _emit(args, result.to_dict(), f"wrote {result.output}: {result.frames} frames, audio {result.audio}"
                                      f"{_dropped(result.tracks)}")
    elif args.command == "standby":
        return _standby()
    elif args.command == "prepare-weights":
        from gpu_worker.weights import prepare_all

        for path in prepare_all():
            print(path)
    elif args.command == "prepare":
        from gpu_worker import compiled
        from gpu_worker.weights import prepare_all

        for path in [*prepare_all(), *compiled.prepare(announce=lambda line: print(line, file=sys.stderr))]:
            print(path)
    else:
        return _stylize(args)
    return EXIT_OK


def _dropped(tracks: list[dict]) -> str:
    """What the one-line report adds about tracks that did not come through."""
    dropped = [f"#{t['index']} {t['type']} {t['codec']}: {t['reason']}" for t in tracks if t["action"] == "dropped"]
    return f"; dropped {'; '.join(dropped)}" if dropped else ""


def _read_list(ref: str, headers: dict | None) -> list[str]:
    import urllib.request

    from gpu_worker.source_auth import open_url

    try:
        if ref.startswith(("http://", "https://")):
            with open_url(urllib.request.Request(ref, headers=headers or {}), timeout=60) as response:
                data = response.read()
        else:
            data = Path(ref).read_bytes()
        items = json.loads(data)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the segment list {ref.split('?')[0]}: {exc}") from None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise InputError("the segment list must be a JSON array of paths or URLs")
    return items


def _standby() -> int:
    """Import torch, PyAV and the pipeline now, then wait for one task on stdin:
    ``{"args": [...], "cwd": "...", "env": {...}}``, run as if it were this process's command line.

    The imports are ~1 s of a task's fixed cost (more from a cold disk); a backend that starts this while it
    is busy elsewhere (``stylize run`` while its host imports) takes that second off the task. The task's
    fixed cost then counts from the hand-off, which is when it began for whoever waits on it.
    """
    import gpu_worker
    from gpu_worker import compiled, runner, scoring, temporal  # noqa: F401  the imports are the point

    line = sys.stdin.readline()
    if not line.strip():
        return EXIT_OK  # closed without work: the backend ended first
    request = json.loads(line)
    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    gpu_worker.STARTED = time.monotonic()
    return main(request["args"])


def _stylize(args: argparse.Namespace) -> int:
    from gpu_worker.runner import EncoderOptions, run_range
    from gpu_worker.style_spec import parse_style

    if args.end is not None and args.end <= args.start:
        raise InputError(f"bad range: --end ({args.end}) must be after --start ({args.start})", field="range")
    from gpu_worker.source_auth import http_headers

    headers = http_headers()
    spec = parse_style(args.style, args.strength, args.preserve_color,
                       *([] if args.temporal is None else [args.temporal]))
    if args.max_size and not 16 <= args.max_size <= 8192:
        raise InputError(f"--max-size must be 0 or 16 to 8192, got {args.max_size}", field="max_size")
    # A device the backend chose (a GPU pool's WORKER_DEVICE) that this machine lacks is the node's fault, not the
    # input's: exit 3, retried (another node may do) and reported as a node fault.
    from_node = args.device is None and bool(os.environ.get(DEVICE_ENV))
    args.device = args.device or os.environ.get(DEVICE_ENV) or "auto"
    try:
        if args.scorer == "identity":
            from gpu_worker.scoring import IdentityScorer

            scorer = IdentityScorer(device=args.device)  # on a GPU, the device's colour path, as a model's
        else:
            from gpu_worker.scoring import StyleScorer

            scorer = StyleScorer(spec, device=args.device, http_headers=headers)
    except InputError as exc:
        if from_node and exc.field == "device":
            raise NodeError(f"{exc} ({DEVICE_ENV}={args.device}, set by the compute backend)") from None
        raise
    progress = _progress_reporter(show=not args.json and sys.stderr.isatty(),
                                  file=os.environ.get(PROGRESS_FILE_ENV))

    pipelines = _pipelines(args.pipelines, scorer)
    if pipelines > 1:
        from gpu_worker.parallel import run_in_processes

        summary = run_in_processes(args, pipelines, headers)
        _emit(args, summary, f"wrote {summary['output']}: {summary['frames']} frames in {summary['seconds']:.1f}s "
                             f"({summary['fps']:.2f} fps, {pipelines} processes)")
        return EXIT_OK
    result = run_range(args.source, args.output, scorer, args.start, args.end,
                       encoder=EncoderOptions(preset=args.preset, crf=args.crf), http_headers=headers,
                       max_size=args.max_size, progress=progress, allow_empty=args.allow_empty,
                       temporal=0.0 if args.scorer == "identity" else spec.temporal)
    _emit(args, result.to_dict(), f"wrote {result.output}: {result.frames} frames in {result.seconds:.1f}s "
                                  f"({result.fps:.2f} fps on {result.device})")
    return EXIT_OK


def _progress_reporter(show: bool, file: str | None) -> Callable[[int], None]:
    """Frames written so far: redrawn on a terminal, and/or written to ``file`` (replaced whole, so a reader
    never sees half a number) for the compute backend that launched the task to read while it runs."""
    last = [0.0]

    def progress(frames: int) -> None:
        if time.monotonic() - last[0] < PROGRESS_EVERY_SECONDS:
            return
        last[0] = time.monotonic()
        if show:
            print(f"\r{frames} frames", end="", file=sys.stderr, flush=True)
        if file:
            partial = f"{file}.partial"
            with suppress(OSError):  # progress is a courtesy: it never fails the task
                Path(partial).write_text(str(frames))
                os.replace(partial, file)

    return progress


def _pipelines(value: str, scorer) -> int:
    if value == "auto":
        return 1  # measured on an H200: see gpu_worker/parallel.py before raising this
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= 16:
        raise InputError(f"--pipelines must be auto or 1 to 16, got {value!r}", field="pipelines")
    return count


def _emit(args: argparse.Namespace, payload: dict, line: str) -> None:
    if args.json:
        print(json.dumps(payload))
    else:
        print(line, file=sys.stderr)
