"""The steps of a job, as plain functions: the activities call these, and unit tests call them directly.

Everything a step needs beyond its small JSON input is in storage (`work/<job>/plan.json`) or in the
compute backend, so orchestration history only ever carries names and counts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TypeVar

from gpu_worker.errors import InputError
from gpu_worker.media import probe
from gpu_worker.style_spec import parse_style
from pipeline import telemetry
from pipeline.compute import ComputeBackend, JobCanceled, Task
from pipeline.jobspec import JobSpec
from pipeline.plan import plan_segments
from pipeline.settings import Settings
from pipeline.storage import BlobInfo, Storage

SUBMIT_CHUNK = 100  # tasks per submit activity: one Batch add-collection request
T = TypeVar("T")


class JobEnded(JobCanceled):
    """The run has ended (completed, failed or canceled): it may not create tasks or files any more."""


@dataclass(frozen=True)
class Services:
    """What the steps run against; built once per process from the settings (see pipeline.runtime)."""

    settings: Settings
    storage: Storage
    compute: ComputeBackend


def work_name(run_id: str, name: str) -> str:
    return f"{run_id}/{name}"


def segment_name(run_id: str, index: int) -> str:
    return work_name(run_id, f"segments/{index:05d}.mp4")


def segment_task_id(index: int, attempt: int) -> str:
    return f"seg{index:05d}-a{attempt}"


def stitched_name(run_id: str) -> str:
    """The stitched video waits here until finalize publishes it: outputs appear whole, with their manifest."""
    return work_name(run_id, "stitched.mp4")


def end_record_name(run_id: str) -> str:
    """Where a run's end is recorded, in the logs container: kept (30 days in Azure) after its work files go."""
    return f"ended/{run_id}.json"


def stitch_task_id(attempt: int) -> str:
    return f"stitch-a{attempt}"


def prepare(job: JobSpec, svc: Services) -> dict:
    """Check the input and style exist, probe the video, plan the segments and store the plan."""
    return while_running(job, svc, lambda: _prepare(job, svc))


def _prepare(job: JobSpec, svc: Services) -> dict:
    s = svc.settings
    source = check_sources(job, svc)
    if source.size == 0:  # a local file says so itself; a URL would only read as "not a video"
        raise InputError(f"{PurePosixPath(job.input_name).name} is empty", field="input")
    info = probe(svc.storage.reader_url(job.input_container, job.input_name), svc.storage.reader_headers())
    duration = info.duration_seconds
    # The limit and the plan hold only if the length is known and not understated: a header can say 0.001 s for
    # 600 s of frames, and with no length at all the whole video was one open-ended task. The frame count says
    # how long it is too; the longer of the two is taken.
    if info.frames and info.frame_rate:
        duration = max(duration or 0.0, info.frames / info.frame_rate)
    if not duration:
        raise InputError(f"{PurePosixPath(job.input_name).name} does not say how long it is (a raw stream or a live "
                         "recording); remux it to MP4 first", field="input")
    if duration > s.max_duration_seconds:
        raise InputError(f"the video is {_span(duration)} long; the limit is {_span(s.max_duration_seconds)}",
                         field="input")
    if info.frame_rate and info.frame_rate > s.max_frame_rate:
        raise InputError(f"the video runs at {info.frame_rate:g} frames a second; up to {s.max_frame_rate:g} are "
                         "accepted", field="input")
    if max(info.width, info.height) > s.max_frame_side:
        raise InputError(f"the video is {info.width}x{info.height}; frames up to {s.max_frame_side} pixels a side "
                         "are accepted", field="input")
    segments = plan_segments(info.start_seconds, duration, job.segment_seconds, s.max_segments)
    frames = info.frames or (round(duration * info.frame_rate) if duration and info.frame_rate else None)
    svc.storage.write_json(s.work_container, work_name(job.run_id, "plan.json"),
                           {"segments": segments, "video": info.to_dict(), "input_etag": source.etag})
    return {"segments": len(segments), "frames_total": frames, "duration_seconds": duration,
            "width": info.display_width, "height": info.display_height, "audio": info.audio_codec}


def check_sources(job: JobSpec, svc: Services) -> BlobInfo:
    """The input's blob info, once it and the style image (if any) are known to exist."""
    source = svc.storage.info(job.input_container, job.input_name)
    if source is None:
        raise InputError(f"input {job.input_name!r} is not in the '{job.input_container}' container", field="input")
    image = _style_image(job)
    styles = svc.settings.styles_container
    if image is not None and svc.storage.info(styles, image) is None:
        raise InputError(f"style image {image!r} is not in the '{styles}' container", field="style")
    return source


def _span(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} minutes"


def _style_image(job: JobSpec) -> str | None:
    """The style image's name in the styles container, or None for built-in styles (the spec parser decides)."""
    return parse_style(job.style).image


def _worker_style_args(job: JobSpec, svc: Services) -> list[str]:
    image = _style_image(job)
    style = job.style if image is None else svc.storage.reader_url(svc.settings.styles_container, image)
    args = ["--style", style, "--strength", str(job.strength), "--temporal", str(job.temporal)]
    if job.preserve_color:
        args.append("--preserve-color")
    if job.max_size:
        args += ["--max-size", str(job.max_size)]
    return args


def submit_segments(job: JobSpec, svc: Services, segments: list[tuple[int, int]]) -> int:
    """Submit (segment index, attempt) pairs as worker tasks; returns how many tasks were new."""
    return while_running(job, svc, lambda: _submit_segments(job, svc, segments))


def _submit_segments(job: JobSpec, svc: Services, segments: list[tuple[int, int]]) -> int:
    s = svc.settings
    plan = svc.storage.read_json(s.work_container, work_name(job.run_id, "plan.json"))["segments"]
    source = svc.storage.reader_url(job.input_container, job.input_name)
    style_args = _worker_style_args(job, svc)
    tasks = []
    for index, attempt in segments:
        start, end = plan[index]
        # a range can hold no frames (a gap in a variable frame rate, or past the last frame while the audio goes
        # on, where the container's duration planned it): its segment is then empty, and the stitch leaves it out
        args = ["stylize", source, "out.mp4", *style_args, "--start", start, "--allow-empty", "--json"]
        if end is not None:
            args += ["--end", end]
        tasks.append(Task(segment_task_id(index, attempt), args, s.work_container, segment_name(job.run_id, index)))
    return svc.compute.submit(job.run_id, tasks)


def poll(job: JobSpec, svc: Services, total: int, attempts: dict[str, int], stitch_attempt: int | None) -> dict:
    """Where the job's tasks stand, for the segments' current attempts (and the stitch, once submitted)."""
    states = svc.compute.poll(job.run_id)
    telemetry.tasks_polled(job.job_id, states)  # each finished task's figures or failure, once
    succeeded, running, frames = 0, 0, 0
    failed = []
    for index in range(total):
        attempt = attempts.get(str(index), 0)
        state = states.get(segment_task_id(index, attempt))
        if state is None or state.state == "pending":
            continue
        if state.state in ("running", "succeeded"):  # a running task's summary, where its backend has one, is
            frames += int((state.summary or {}).get("frames", 0))  # its progress so far
            running += state.state == "running"
            succeeded += state.state == "succeeded"
        else:
            failed.append({"segment": index, "attempt": attempt, "exit_code": state.exit_code, "error": state.error})
    result = {"succeeded": succeeded, "running": running, "failed": failed, "frames_done": frames}
    if stitch_attempt is not None:
        stitch = states.get(stitch_task_id(stitch_attempt))
        result["stitch"] = stitch.to_dict() if stitch else {"state": "pending"}
    return result


def compute_blocker(job: JobSpec, svc: Services) -> str | None:
    """Why the job's waiting tasks cannot start (the compute backend's answer), or None."""
    return while_running(job, svc, svc.compute.blocker)


def submit_stitch(job: JobSpec, svc: Services, total: int, attempt: int) -> int:
    """The stitch runs as a compute task too: long ffmpeg work does not belong inside a Function."""
    return while_running(job, svc, lambda: _submit_stitch(job, svc, total, attempt))


def _submit_stitch(job: JobSpec, svc: Services, total: int, attempt: int) -> int:
    s = svc.settings
    sizes = svc.storage.sizes(s.work_container, work_name(job.run_id, "segments/"))
    names = [segment_name(job.run_id, i) for i in range(total)]
    listing = [svc.storage.reader_url(s.work_container, name) for name in names if sizes.get(name) != 0]
    list_name = work_name(job.run_id, "segments.json")
    svc.storage.write_json(s.work_container, list_name, listing)
    task = Task(
        stitch_task_id(attempt),
        ["stitch", "out.mp4", "--list", svc.storage.reader_url(s.work_container, list_name),
         "--audio-from", svc.storage.reader_url(job.input_container, job.input_name), "--json"],
        s.work_container, stitched_name(job.run_id),
    )
    return svc.compute.submit(job.run_id, [task])


def finalize(job: JobSpec, svc: Services, summary: dict) -> dict:
    """Publish the stitched video with its JSON manifest, unless the input changed meanwhile.

    Every segment read the input by name, so a newer upload of the same name during the job could have mixed
    two videos; and its own job will write the same output. Either way this job must not publish.
    The manifest is written first and the video's one-step publish is the commit point: a video never appears
    without its manifest, and a failed publish takes the manifest back.
    """
    s = svc.settings

    def unpublish() -> None:
        svc.storage.delete(s.output_container, job.output_name)
        svc.storage.delete(s.output_container, job.manifest_name)

    def publish() -> dict:
        planned = svc.storage.read_json(s.work_container, work_name(job.run_id, "plan.json"))["input_etag"]
        current = svc.storage.info(job.input_container, job.input_name)
        if current is None or current.etag != planned:
            what = "deleted" if current is None else "replaced by a newer upload"
            raise InputError(f"input {job.input_container}/{job.input_name} was {what} while this job ran; "
                             "nothing was published", field="input")
        manifest = {
            "job_id": job.job_id,
            "input": f"{job.input_container}/{job.input_name}",
            "output": f"{s.output_container}/{job.output_name}",
            "style": job.style, "strength": job.strength, "preserve_color": job.preserve_color,
            "temporal": job.temporal,
            "max_size": job.max_size, "segment_seconds": job.segment_seconds,
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **summary,
        }
        svc.storage.write_json(s.output_container, job.manifest_name, manifest)
        try:
            svc.storage.publish(s.work_container, stitched_name(job.run_id), s.output_container, job.output_name)
        except Exception:
            svc.storage.delete(s.output_container, job.manifest_name)
            raise
        return manifest

    return while_running(job, svc, publish, undo=unpublish)


def cleanup(job: JobSpec, svc: Services, reason: str = "ended") -> int:
    """End the run: record that it ended, then stop its tasks and delete its work files. Returns how many work
    blobs were removed. The record comes first, so that a step of this run still in flight (an activity the
    Durable extension had already queued) finds it and creates nothing; see :func:`while_running`. Work is
    removed even when the record cannot be written, and the cleanup then fails so that it is tried again."""
    logs, name = svc.settings.logs_container, end_record_name(job.run_id)

    def record(cleanup: str) -> None:
        ended = {"run_id": job.run_id, "reason": reason, "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        svc.storage.write_json(logs, name, {**(earlier or ended), "cleanup": cleanup})

    unrecorded, earlier = None, None
    try:
        earlier = end_record(job, svc)  # a second cleanup (cancel, then the orchestration's own) keeps the reason
        record("running")
    except Exception as exc:
        unrecorded = exc
    try:
        removed = _remove_work(job, svc)
    except Exception as exc:  # visible in the job's status until a later cleanup finishes the work
        if unrecorded is None:
            record(f"incomplete: {type(exc).__name__}: {exc}")
        raise
    if unrecorded is not None:
        raise unrecorded
    record("done")
    return removed


def planned_input_etag(job: JobSpec, svc: Services) -> str | None:
    """The input's ETag when the run planned its work (None before that): a run whose input has changed since
    will publish nothing (finalize)."""
    name = work_name(job.run_id, "plan.json")
    if svc.storage.info(svc.settings.work_container, name) is None:
        return None
    plan = svc.storage.read_json(svc.settings.work_container, name)
    return plan.get("input_etag") if isinstance(plan, dict) else None


def end_record(job: JobSpec, svc: Services) -> dict | None:
    """How the run ended ({"reason", "at", "cleanup"}), or None while it has not."""
    name = end_record_name(job.run_id)
    if svc.storage.info(svc.settings.logs_container, name) is None:
        return None
    record = svc.storage.read_json(svc.settings.logs_container, name)
    return record if isinstance(record, dict) else {"reason": "ended"}


def while_running(job: JobSpec, svc: Services, step: Callable[[], T], undo: Callable[[], None] | None = None) -> T:
    """Run a step that creates tasks or files, unless the run has ended; if it ends while the step runs, take
    back what the step made. :func:`cleanup` records the end before it removes anything, so either this
    second look sees the record, or the cleanup started after the step had finished and removes what it made:
    whatever order activities run in, and after a restart of the app, nothing of an ended run survives."""
    _refuse_if_ended(job, svc)
    result = step()
    try:
        _refuse_if_ended(job, svc)
    except JobEnded:
        if undo is not None:
            undo()
        _remove_work(job, svc)
        raise
    return result


def _refuse_if_ended(job: JobSpec, svc: Services) -> None:
    record = end_record(job, svc)
    if record is not None:
        raise JobEnded(f"job {job.job_id} has ended ({record.get('reason', 'ended')}); nothing more runs for it")


def _remove_work(job: JobSpec, svc: Services) -> int:
    svc.compute.delete(job.run_id)
    return svc.storage.delete_prefix(svc.settings.work_container, f"{job.run_id}/")
