"""The Function App: an upload trigger and a small HTTP API around the `stylize_video` orchestration.

Thin by design: validation lives in pipeline.jobspec, the work in pipeline.jobs (through the activities),
the orchestration in orchestrators/.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import re
import urllib.request

import azure.durable_functions as df
import azure.functions as func
import azurefunctions.extensions.bindings.blob as blob_sdk
from azure.durable_functions.models.DurableOrchestrationStatus import DurableOrchestrationStatus
from azure.durable_functions.models.RpcManagementOptions import RpcManagementOptions

from activities.job_steps import bp as activities
from gpu_worker.errors import InputError
from orchestrators.stylize_video import bp as orchestrators
from pipeline import jobs, telemetry
from pipeline.jobspec import JobSpec, instance_id, job_spec, orchestration_input, rejected_input
from pipeline.runtime import services
from pipeline.settings import Settings

app = df.DFApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(orchestrators)
app.register_functions(activities)
log = logging.getLogger("stylize.app")
Settings.from_env()  # a bad app setting stops the app here, at start-up, with its name, value and allowed range
telemetry.configure()  # from APPLICATIONINSIGHTS_CONNECTION_STRING; without it, nothing starts

ORCHESTRATION = "stylize_video"
JOB_FIELDS = {"input", "output", "style", "strength", "preserve_color", "temporal", "max_size", "segment_seconds"}
ACTIVE = {"Pending", "Running", "ContinuedAsNew", "Suspended"}  # Suspended: by an operator; resumable, still has work
# What pipeline.jobspec.instance_id makes. Anything else is no job of ours, and goes nowhere near the Durable
# management API, whose URL the SDK builds from the id unquoted (an id with "?" or "/" would add to that URL).
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
CONTINUATION = "x-ms-continuation-token"  # the management API's next-page header


@app.function_name("on_video_uploaded")
@app.blob_trigger(arg_name="blob", path="%INPUT_CONTAINER%/{name}", connection="DataStorage",
                  source=func.BlobSource.EVENT_GRID)
@app.durable_client_input(client_name="starter")
async def on_video_uploaded(blob: blob_sdk.BlobClient, starter: df.DurableOrchestrationClient) -> None:
    """One orchestration per upload; options come from the blob's metadata (style, strength, …)."""
    props = await asyncio.to_thread(blob.get_blob_properties)
    container, name = blob.container_name, blob.blob_name
    job_id = instance_id(container, name, props.etag)
    if await _exists(starter, job_id):
        log.info("upload %s/%s (ETag %s) already has job %s", container, name, props.etag, job_id)
        return
    settings = services().settings
    try:
        job = job_spec(job_id, container, name, props.metadata or {}, settings)
        # Another upload of this name is fine (the older job publishes nothing); another input is not.
        writer = await _writing(starter, job.output_name, except_input=(container, name))
        if writer is not None:
            raise InputError(f"job {writer} is already writing {settings.output_container}/{job.output_name} from "
                             "another input; set the 'output' metadata to another name, or upload again when it "
                             "has finished", field="output")
        payload = orchestration_input(job, settings)
    except InputError as exc:
        payload = rejected_input(container, name, exc)
    await starter.start_new(ORCHESTRATION, job_id, payload)
    log.info("upload %s/%s started job %s", container, name, job_id)


@app.route(route="jobs", methods=["POST"])
@app.durable_client_input(client_name="starter")
async def create_job(req: func.HttpRequest, starter: df.DurableOrchestrationClient) -> func.HttpResponse:
    """POST /api/jobs {"input": "clip.mp4", "style": "7", …} → 202 with the job's URLs."""
    try:
        body = req.get_json()
    except ValueError:
        return _error(400, "the body must be a JSON object", "body")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object", "body")
    unknown = sorted(set(body) - JOB_FIELDS)
    if unknown:
        return _error(400, f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(JOB_FIELDS))}", unknown[0])
    if "input" not in body:
        return _error(400, "input is required: the name of a video in the input container", "input")
    svc = services()
    container = svc.settings.input_container
    options = {k: v for k, v in body.items() if k != "input"}
    try:
        job = job_spec("pending", container, body["input"], options, svc.settings)
        info = await asyncio.to_thread(jobs.check_sources, job, svc)
    except InputError as exc:
        return _error(400, str(exc), exc.field)
    # Same video version and same options → same job: a retried POST does not start a second run.
    options_key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    job_id = instance_id(container, job.input_name, f"{info.etag}/{options_key}")
    job = JobSpec.from_dict({**job.to_dict(), "job_id": job_id})
    if not await _exists(starter, job_id, restartable=True):
        writer = await _writing(starter, job.output_name, except_stale=(job.input_container, job.input_name, info.etag))
        if writer is not None:  # two jobs racing for one path: the later would silently replace the earlier
            return _error(409, f"job {writer} is already writing {svc.settings.output_container}/{job.output_name}; "
                               "wait for it to finish or give this job another \"output\" name", "output")
        try:
            await starter.start_new(ORCHESTRATION, job_id, orchestration_input(job, svc.settings))
        except Exception:  # the same request at the same moment started it first: answer with that job
            if not await _exists(starter, job_id, restartable=True):
                raise
    base = req.url.split("/api/")[0]
    body = {"id": job_id, "status_url": f"{base}/api/jobs/{job_id}", "cancel_url": f"{base}/api/jobs/{job_id}/cancel"}
    return func.HttpResponse(json.dumps(body), status_code=202, mimetype="application/json",
                             headers={"Location": body["status_url"]})


@app.route(route="jobs/{job_id}", methods=["GET"])
@app.durable_client_input(client_name="starter")
async def get_job(req: func.HttpRequest, starter: df.DurableOrchestrationClient) -> func.HttpResponse:
    if not JOB_ID.match(req.route_params["job_id"]):
        return _error(404, f"no job {req.route_params['job_id']!r}", "job_id")
    status = await starter.get_status(req.route_params["job_id"], show_input=True)
    if not status or not status.runtime_status:
        return _error(404, f"no job {req.route_params['job_id']!r}", "job_id")
    view = _view(status)
    job = _job_of(status)
    if job is not None:
        record = await asyncio.to_thread(jobs.end_record, job, services())
        completed = status.runtime_status.name == "Completed"
        if record and record.get("reason") == "canceled" and not completed:  # the terminate may wait an episode
            view["stage"] = "canceled"
        if record and record.get("cleanup", "done") != "done":  # e.g. a Batch job still terminating
            view["cleanup"] = record["cleanup"]
    return _json(200, view)


@app.route(route="jobs", methods=["GET"])
@app.durable_client_input(client_name="starter")
async def list_jobs(req: func.HttpRequest, starter: df.DurableOrchestrationClient) -> func.HttpResponse:
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=7)
    statuses = await _statuses(starter, created_time_from=since)
    views = sorted((_view(s) for s in statuses if s.name == ORCHESTRATION), key=lambda v: v["created"] or "",
                   reverse=True)
    return _json(200, {"jobs": views[:100]})


@app.route(route="jobs/{job_id}/cancel", methods=["POST"])
@app.durable_client_input(client_name="starter")
async def cancel_job(req: func.HttpRequest, starter: df.DurableOrchestrationClient) -> func.HttpResponse:
    """Stop the job: terminate its orchestration, then end its run (tasks stopped, work files removed) now,
    rather than when the orchestration next wakes. On an ended job whose cleanup is not recorded as done (left
    incomplete, or never run: terminated from outside this API, or failed where its own cleanup could not run),
    it does that cleanup, so that no task of it goes on running."""
    job_id = req.route_params["job_id"]
    if not JOB_ID.match(job_id):
        return _error(404, f"no job {job_id!r}", "job_id")
    status = await starter.get_status(job_id, show_input=True)
    if not status or not status.runtime_status:
        return _error(404, f"no job {job_id!r}", "job_id")
    runtime, job, svc = status.runtime_status.name, _job_of(status), services()
    if runtime not in ACTIVE:
        record = job and await asyncio.to_thread(jobs.end_record, job, svc)
        if job is None or (record and record.get("cleanup", "done") == "done"):
            return _error(409, f"job {job_id} is already {runtime}", "job_id")
        reason = (record or {}).get("reason") or ("canceled" if runtime == "Terminated" else runtime.lower())
    else:
        await starter.terminate(job_id, "canceled by request")  # a finished instance: the SDK swallows the 410
        after = await starter.get_status(job_id)
        if after and after.runtime_status and after.runtime_status.name == "Completed":  # it finished meanwhile
            return _error(409, f"job {job_id} is already Completed", "job_id")
        telemetry.job_canceled(job_id)
        reason = "canceled"
    body = {"id": job_id, "stage": "canceled" if reason == "canceled" else runtime.lower(), "cleanup": "done"}
    if job is not None:
        try:
            await asyncio.to_thread(jobs.cleanup, job, svc, reason)
        except Exception as exc:  # recorded in the job's end record: GET shows it, another cancel retries
            log.warning("job %s: cleanup incomplete: %s", job_id, exc)
            body["cleanup"] = f"incomplete: {type(exc).__name__}: {exc}"
    return _json(202, body)


def _job_of(status: df.DurableOrchestrationStatus) -> JobSpec | None:
    """The job an orchestration runs (None for a rejected upload, which has no work to stop)."""
    args = status.input_ if isinstance(status.input_, dict) else json.loads(status.input_ or "{}")
    job = (args or {}).get("job")
    return JobSpec.from_dict(job) if job else None


async def _exists(starter: df.DurableOrchestrationClient, job_id: str, restartable: bool = False) -> bool:
    """True if the id already has an orchestration (for ``restartable``: one still running or completed)."""
    status = await starter.get_status(job_id)
    if not status or not status.runtime_status:
        return False
    return not restartable or status.runtime_status.name in ACTIVE | {"Completed"}


async def _writing(starter: df.DurableOrchestrationClient, output_name: str,
                   except_input: tuple[str, str] | None = None,
                   except_stale: tuple[str, str, str] | None = None) -> str | None:
    """The id of an unfinished job that will write ``output_name``: not one from ``except_input``, nor one from
    ``except_stale``'s input (container, name) that planned its work on another version than ``except_stale``'s
    ETag — the input has been replaced under it, so it will publish nothing (pipeline.jobs.finalize)."""
    running = [df.OrchestrationRuntimeStatus[name] for name in sorted(ACTIVE)]
    for status in await _statuses(starter, runtime_status=running):
        job = _job_of(status)
        if job is None or job.output_name != output_name or (job.input_container, job.input_name) == except_input:
            continue
        if except_stale is not None and (job.input_container, job.input_name) == except_stale[:2]:
            planned = await asyncio.to_thread(jobs.planned_input_etag, job, services())
            if planned is not None and planned != except_stale[2]:
                continue
        return status.instance_id
    return None


async def _statuses(starter: df.DurableOrchestrationClient, **query) -> list[DurableOrchestrationStatus]:
    """Every instance that ``query`` (get_status_by's filters) matches. The extension answers a page at a time
    (100 by default) and says where the next one starts in a header, which the SDK's get_status_by ignores: past
    100 jobs it missed the newest ones and running ones another would overwrite."""
    url = RpcManagementOptions(**query).to_url(starter._orchestration_bindings.rpc_base_url)
    return await asyncio.to_thread(_pages, url)


def _pages(url: str) -> list[DurableOrchestrationStatus]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the host's own endpoint, as the SDK
    found: list[dict] = []
    token = None
    while True:
        headers = {CONTINUATION: token} if token else {}
        with opener.open(urllib.request.Request(url, headers=headers), timeout=60) as response:
            found += json.loads(response.read() or b"[]")
            token = response.headers.get(CONTINUATION)
        if not token or token == "null":
            return [DurableOrchestrationStatus.from_json(item) for item in found]


def _view(status: df.DurableOrchestrationStatus) -> dict:
    custom = dict(status.custom_status) if isinstance(status.custom_status, dict) else {}
    # the job's own start: Azure moves an instance's created time to its latest continue-as-new
    started = custom.pop("started", None) or (status.created_time.isoformat() if status.created_time else None)
    view = {"id": status.instance_id, "runtime_status": status.runtime_status.name, "created": started,
            "updated": status.last_updated_time.isoformat() if status.last_updated_time else None, **custom}
    if status.runtime_status.name in ("Terminated", "Failed", "Completed") and isinstance(view.get("segments"), dict):
        view["segments"] = {**view["segments"], "running": 0}  # an ended job runs nothing, whatever it last showed
    if status.runtime_status.name == "Terminated":
        view["stage"] = "canceled"
    if status.runtime_status.name == "Completed" and isinstance(status.output, dict):
        view["result"] = status.output
    return view


def _json(code: int, body: dict) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(body), status_code=code, mimetype="application/json")


def _error(code: int, message: str, field: str | None) -> func.HttpResponse:
    return _json(code, {"error": message, "field": field})
