"""Activities: thin adapters from orchestration payloads (small JSON) to the steps in pipeline.jobs.

The orchestrator retries every activity that raises (a storage or Batch API hiccup), so an error that
retrying cannot fix — bad input — comes back as a result instead of an exception.
"""

from __future__ import annotations

import azure.durable_functions as df

from gpu_worker.errors import InputError
from pipeline import jobs, telemetry
from pipeline.jobspec import JobSpec
from pipeline.runtime import services

bp = df.Blueprint()


@bp.activity_trigger(input_name="job")
def prepare_job(job: dict) -> dict:
    """The plan's summary, or ``{"input_error": message}`` when the input cannot be processed."""
    spec, svc = JobSpec.from_dict(job), services()
    try:
        with telemetry.activity(spec.job_id, "prepare_job", "probing",
                                bytes_read=lambda: svc.storage.info(spec.input_container, spec.input_name).size):
            return jobs.prepare(spec, svc)
    except InputError as exc:  # recorded as the activity's failure, returned as its result
        return {"input_error": str(exc)}


@bp.activity_trigger(input_name="request")
def submit_segments(request: dict) -> int:
    pairs = [(int(index), int(attempt)) for index, attempt in request["segments"]]
    spec = JobSpec.from_dict(request["job"])
    with telemetry.activity(spec.job_id, "submit_segments", "scoring"):
        return jobs.submit_segments(spec, services(), pairs)


@bp.activity_trigger(input_name="request")
def poll_tasks(request: dict) -> dict:
    spec = JobSpec.from_dict(request["job"])
    with telemetry.activity(spec.job_id, "poll_tasks", "scoring", quiet=True):  # every tick: failures only
        return jobs.poll(spec, services(), request["total"], request["attempts"], request["stitch_attempt"])


@bp.activity_trigger(input_name="request")
def check_compute(request: dict) -> dict:
    """``{"blocked": reason}`` when the job's waiting tasks cannot start at all, else ``{"blocked": None}``."""
    spec = JobSpec.from_dict(request["job"])
    with telemetry.activity(spec.job_id, "check_compute", "scoring"):
        return {"blocked": jobs.compute_blocker(spec, services())}


@bp.activity_trigger(input_name="request")
def submit_stitch(request: dict) -> int:
    spec = JobSpec.from_dict(request["job"])
    with telemetry.activity(spec.job_id, "submit_stitch", "stitching"):
        return jobs.submit_stitch(spec, services(), request["total"], request["attempt"])


@bp.activity_trigger(input_name="request")
def finalize_job(request: dict) -> dict:
    """The manifest, or ``{"input_error": message}`` when the input changed while the job ran."""
    spec, svc = JobSpec.from_dict(request["job"]), services()
    output = svc.settings.output_container
    try:
        with telemetry.activity(spec.job_id, "finalize_job", "finishing",
                                bytes_written=lambda: svc.storage.info(output, spec.output_name).size):
            return jobs.finalize(spec, svc, request["summary"])
    except InputError as exc:
        return {"input_error": str(exc)}


@bp.activity_trigger(input_name="request")
def cleanup_job(request: dict) -> int:
    spec = JobSpec.from_dict(request["job"])
    with telemetry.activity(spec.job_id, "cleanup_job", "cleanup"):
        return jobs.cleanup(spec, services(), request["reason"])
