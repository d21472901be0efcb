"""`stylize`: run the whole pipeline on this machine, or talk to a deployment.

`stylize run` goes through exactly what runs in Azure — the Function App's HTTP API, the real Durable
orchestrator and activities — hosted in-process by :class:`local.durable_host.LocalDurableHost`, with a
local folder for storage and worker processes for compute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stylize", description="Stylize whole videos with neural style transfer.")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="stylize a video on this machine")
    r.add_argument("video", type=Path)
    r.add_argument("-s", "--style", required=True, help="0-25, a blend like 3:0.5,12:0.5, or a painting's image file")
    r.add_argument("-o", "--output", type=Path, required=True, help="output .mp4 (written only when complete)")
    r.add_argument("--strength", type=float, default=None,
                   help="0 (original) to 1 (fully stylized); default DEFAULT_STRENGTH, else 1")
    r.add_argument("--preserve-color", action="store_true", help="keep the video's own colours")
    r.add_argument("--temporal", default=None,
                   help="0 (off) to 0.95: how much each frame is steadied by the previous one (default 0.9)")
    r.add_argument("--max-size", type=int, default=None,
                   help="longer side in pixels (default DEFAULT_MAX_SIZE, else the full resolution)")
    r.add_argument("--segment-seconds", type=float, default=None, help="seconds of video per worker task")
    r.add_argument("--workers", type=int, default=1, help="worker processes at a time (default 1)")
    r.add_argument("--work-dir", type=Path, default=None, help="where work files go (default: a temp folder)")
    r.add_argument("--json", action="store_true", help="print one JSON summary object")

    st = sub.add_parser("styles", help="list the built-in styles and write a contact sheet PNG")
    st.add_argument("--image", type=Path, default=None, help="picture to stylize (default: a Big Buck Bunny frame)")
    st.add_argument("-o", "--output", type=Path, default=Path("styles.png"))

    su = sub.add_parser("submit", help="upload a video to a deployment's input container")
    su.add_argument("video", type=Path)
    su.add_argument("-s", "--style", required=True)
    su.add_argument("--account", required=True, help="data storage account name")
    su.add_argument("--strength", default=None)
    su.add_argument("--preserve-color", action="store_true")
    su.add_argument("--temporal", default=None)
    su.add_argument("--name", default=None, help="blob name (default: the file name)")

    ss = sub.add_parser("status", help="follow a job through a deployment's status endpoint")
    ss.add_argument("job_id")
    ss.add_argument("--app", required=True, help="https://<function app>.azurewebsites.net")
    ss.add_argument("--key", default=os.environ.get("STYLIZE_FUNCTION_KEY"), help="function key (or env)")
    ss.add_argument("--once", action="store_true", help="print the status once and exit")
    ss.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gpu_worker.errors import InputError

    try:
        if args.command == "run":
            return run(args)
        if args.command == "styles":
            from local.styles_sheet import write_contact_sheet

            path = write_contact_sheet(args.output, args.image)
            print(f"wrote {path}: the original and the 26 built-in styles (use -s N)", file=sys.stderr)
            return EXIT_OK
        from local import remote

        return remote.submit(args) if args.command == "submit" else remote.follow(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(args: argparse.Namespace) -> int:
    from gpu_worker.errors import InputError

    video: Path = args.video
    if not video.is_file():
        raise InputError(f"no such file: {video}")
    if args.output.suffix.lower() != ".mp4":
        raise InputError(f"output must be an .mp4 file, got {args.output.name}")
    _check_writable(args.output)  # before the work, not after it
    if args.segment_seconds is not None and not 1 <= args.segment_seconds <= 3600:
        raise InputError(f"--segment-seconds must be 1 to 3600, got {args.segment_seconds:g}")
    if not 1 <= args.workers <= 64:
        raise InputError(f"--workers must be 1 to 64, got {args.workers}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="stylize-"))
    from pipeline import compute

    compute.start_standby(workers=args.workers)  # it imports torch while this process imports the host
    # Being told to stop (kill, timeout, a closed terminal) is a Ctrl-C: the job is canceled and its files go.
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, _interrupt)
    try:
        return _run_job(args, work)
    finally:
        compute.stop_standbys()
        from pipeline import telemetry

        telemetry.shutdown()  # send what the run recorded (bounded wait); a no-op without a connection string
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _run_job(args: argparse.Namespace, work: Path) -> int:
    from dataclasses import replace

    import azure.functions as func

    from pipeline import runtime
    from pipeline.settings import Settings

    # Limits and defaults come from the same settings as in Azure (MAX_DURATION_SECONDS, …); where work runs
    # is this machine, whatever the environment says. Polling every 0.1 s costs nothing here (LocalCompute's
    # poll blocks until a task changes) and lets the job end sooner: the stitch loop sleeps before it polls.
    settings = replace(Settings.from_env(), storage="local", storage_root=work, compute="local",
                       local_workers=args.workers, poll_seconds=0.1,
                       **({} if args.segment_seconds is None else {"segment_seconds": args.segment_seconds}))
    runtime.configure(settings)
    # The video and a style image are linked into the local "containers", never copied.
    _link(args.video, work / settings.input_container / args.video.name)
    style = args.style
    if Path(style).suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"):
        if not Path(style).is_file():
            from gpu_worker.errors import InputError

            if "://" in style:  # the worker reads URLs, but here the image is linked into the local styles folder
                raise InputError(f"style image {style}: stylize run takes an image file on this machine; download it "
                                 "first")
            raise InputError(f"style image not found: {style}")
        _link(Path(style), work / settings.styles_container / Path(style).name)
        style = Path(style).name
    body = {"input": args.video.name, "style": style, "preserve_color": args.preserve_color}
    for field in ("strength", "max_size"):  # unset: the settings' defaults apply, as for the API and uploads
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.temporal is not None:
        body["temporal"] = args.temporal
    if args.segment_seconds is not None:
        body["segment_seconds"] = args.segment_seconds

    import function_app
    from local.durable_host import LocalDurableHost

    with LocalDurableHost(function_app.app, max_workers=4) as host:
        request = func.HttpRequest("POST", "http://localhost:7071/api/jobs", body=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
        response = host.invoke_function("create_job", req=request)
        reply = json.loads(response.get_body())
        if response.status_code != 202:
            print(f"error: {reply['error']}", file=sys.stderr)
            return EXIT_BAD_INPUT
        job_id = reply["id"]
        try:
            status = _follow(host, job_id)
        except KeyboardInterrupt:  # the same cancel as the API's: the orchestration stops, its run ends
            host.invoke_function("cancel_job", req=func.HttpRequest(
                "POST", f"http://localhost:7071/api/jobs/{job_id}/cancel", body=b"", route_params={"job_id": job_id}))
            raise
    if status["runtimeStatus"] != "Completed":
        error = (status.get("customStatus") or {}).get("error")
        error = error or {"kind": "internal", "message": str(status.get("output"))}
        print(f"error: {error['message']}", file=sys.stderr)
        return EXIT_BAD_INPUT if error.get("kind") == "input" else EXIT_FAILED
    result = status["output"]
    produced = work / settings.output_container / result["output"]
    _move_into_place(produced, args.output)
    summary = {"job_id": job_id, "output": str(args.output), "frames": result["frames"],
               "segments": result["segments"], "seconds": result["seconds"],
               "fps": round(result["frames"] / result["seconds"], 2) if result["seconds"] else None,
               "audio": result.get("audio"), "retries": result.get("retries", 0),
               # per source track: kept how, or dropped why; the video's colour and what was converted (issue 16)
               "tracks": result.get("tracks", []), "video": result.get("video"),
               "chapters": result.get("chapters", 0), "metadata": result.get("metadata", {})}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.output}: {summary['frames']} frames in {summary['seconds']} s "
              f"({summary['fps']} fps, {summary['segments']} segments, audio: {summary['audio'] or 'none'})",
              file=sys.stderr)
        for track in summary["tracks"]:
            if track["action"] == "dropped":
                print(f"  dropped track {track['index']} ({track['type']}, {track['codec']}): {track['reason']}",
                      file=sys.stderr)
        for change in (summary["video"] or {}).get("converted", []):
            print(f"  video converted: {change}", file=sys.stderr)
    return EXIT_OK


def _follow(host, job_id: str) -> dict:
    """Wait for the job, showing its progress on stderr (the --json summary goes to stdout)."""
    from local.progress_view import ProgressView

    view = ProgressView()
    while True:
        try:  # wakes the moment the job ends, else redraws the progress four times a second
            status = host.wait(job_id, timeout=0.25)
        except TimeoutError:
            view.show((host.status(job_id) or {}).get("customStatus") or {})
            continue
        view.show(status.get("customStatus") or {})  # how it ended: a short last stage may fall between redraws
        view.close()
        return status


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    target.symlink_to(source.resolve())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_writable(output: Path) -> None:
    from gpu_worker.errors import InputError

    if output.is_dir():
        raise InputError(f"-o {output}: is a folder; give a file name ending in .mp4")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"-o {output}: cannot make its folder ({exc.strerror})") from None
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise InputError(f"-o {output}: its folder is not writable")


def _move_into_place(produced: Path, output: Path) -> None:
    """Atomically: a partial file next to the output, then rename, so OUT is never half-written."""
    from gpu_worker.errors import InputError

    partial = output.with_name(f".{output.name}.partial")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(produced, partial)
        os.replace(partial, output)
    except OSError as exc:
        raise InputError(f"cannot write {output} ({exc.strerror})") from None
    finally:
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
