"""Activities: thin adapters from orchestration payloads (small JSON) to the steps in pipeline.jobs."""

from __future__ import annotations

import azure.durable_functions as df

from pipeline import jobs
from pipeline.jobspec import JobSpec
from pipeline.runtime import services

bp = df.Blueprint()


@bp.activity_trigger(input_name="job")
def prepare_job(job: dict) -> dict:
    return jobs.prepare(JobSpec.from_dict(job), services())


@bp.activity_trigger(input_name="request")
def submit_segments(request: dict) -> int:
    pairs = [(int(index), int(attempt)) for index, attempt in request["segments"]]
    return jobs.submit_segments(JobSpec.from_dict(request["job"]), services(), pairs)


@bp.activity_trigger(input_name="request")
def poll_tasks(request: dict) -> dict:
    return jobs.poll(JobSpec.from_dict(request["job"]), services(), request["total"], request["attempts"],
                     request["stitch_attempt"])


@bp.activity_trigger(input_name="request")
def submit_stitch(request: dict) -> int:
    return jobs.submit_stitch(JobSpec.from_dict(request["job"]), services(), request["total"], request["attempt"])


@bp.activity_trigger(input_name="request")
def finalize_job(request: dict) -> dict:
    return jobs.finalize(JobSpec.from_dict(request["job"]), services(), request["summary"])


@bp.activity_trigger(input_name="job")
def cleanup_job(job: dict) -> int:
    return jobs.cleanup(JobSpec.from_dict(job), services())
