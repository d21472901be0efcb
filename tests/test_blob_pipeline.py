"""The upload path against Azurite: blob trigger → orchestration → workers reading and writing Blob Storage.

The containers are readable anonymously here because Azurite cannot verify Entra ID tokens over plain HTTP;
in Azure the workers send a managed-identity token instead (gpu_worker.source_auth).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import av
import pytest
from azure.storage.blob import BlobClient, BlobServiceClient

import function_app
from local.durable_host import LocalDurableHost
from pipeline import runtime
from pipeline.jobspec import instance_id
from pipeline.settings import Settings
from tests.media_helpers import frame_times, make_clip_with_audio


@pytest.fixture
def blob_app(azurite: str, tmp_path: Path) -> Iterator[tuple[LocalDurableHost, runtime.Services, str]]:
    prefix = uuid.uuid4().hex[:6]  # containers of their own per test on the shared Azurite
    names = {k: f"{prefix}-{k}" for k in ("input", "styles", "output", "work")}
    service = BlobServiceClient.from_connection_string(azurite)
    for name in names.values():
        service.create_container(name, public_access="blob")
    settings = Settings(storage="blob", blob_connection_string=azurite, storage_root=tmp_path, compute="local",
                        local_workers=2, poll_seconds=0.2, segment_seconds=1.0,
                        input_container=names["input"], styles_container=names["styles"],
                        output_container=names["output"], work_container=names["work"])
    svc = runtime.configure(settings)
    with LocalDurableHost(function_app.app, max_workers=4) as host:
        yield host, svc, azurite
    svc.compute.close()


def upload(connection: str, container: str, name: str, path: Path, metadata: dict) -> BlobClient:
    blob = BlobClient.from_connection_string(connection, container, name)
    with open(path, "rb") as data:
        blob.upload_blob(data, overwrite=True, metadata=metadata)
    return blob


def test_upload_runs_one_job_per_upload(blob_app, tmp_path: Path) -> None:
    host, svc, connection = blob_app
    s = svc.settings
    clip = make_clip_with_audio(tmp_path, "aac", ".mp4", seconds=2.0)
    blob = upload(connection, s.input_container, "clips/holiday.mp4", clip, {"style": "5", "strength": "0.9"})

    host.invoke_function("on_video_uploaded", blob=blob)
    job_id = instance_id(s.input_container, "clips/holiday.mp4", blob.get_blob_properties().etag)
    status = host.wait(job_id, timeout=180)
    assert status["runtimeStatus"] == "Completed", status

    output = tmp_path / "downloaded.mp4"
    svc.storage.download_file(s.output_container, "clips/holiday.mp4", output)
    assert frame_times(output) == frame_times(clip)
    with av.open(str(output)) as container:
        assert container.streams.audio, "audio kept"
    manifest = svc.storage.read_json(s.output_container, "clips/holiday.json")
    assert (manifest["style"], manifest["strength"], manifest["job_id"]) == ("5", 0.9, job_id)
    assert svc.storage.list_names(s.work_container) == []

    host.invoke_function("on_video_uploaded", blob=blob)  # Event Grid delivers the same event again
    assert [i["instanceId"] for i in host.list_instances()] == [job_id]

    again = upload(connection, s.input_container, "clips/holiday.mp4", clip, {"style": "6"})
    host.invoke_function("on_video_uploaded", blob=again)  # a new upload of the same name
    second = instance_id(s.input_container, "clips/holiday.mp4", again.get_blob_properties().etag)
    assert second != job_id and host.wait(second, timeout=180)["runtimeStatus"] == "Completed"
    assert svc.storage.read_json(s.output_container, "clips/holiday.json")["style"] == "6"


@pytest.mark.parametrize(("name", "metadata", "message"), [
    ("bad.mp4", {"style": "99"}, "style 99 does not exist: built-in styles are 0-25"),
    ("shaky.mp4", {"style": "3", "temporal": "-0.2"}, "temporal must be between 0 (off) and 0.95, got -0.2"),
])
def test_upload_with_bad_metadata_fails_visibly(blob_app, tmp_path: Path, name: str, metadata: dict,
                                                message: str) -> None:
    host, svc, connection = blob_app
    s = svc.settings
    clip = make_clip_with_audio(tmp_path, "aac", ".mp4", seconds=1.0)
    blob = upload(connection, s.input_container, name, clip, metadata)
    host.invoke_function("on_video_uploaded", blob=blob)
    status = host.wait(instance_id(s.input_container, name, blob.get_blob_properties().etag), timeout=60)
    assert status["runtimeStatus"] == "Failed"
    assert status["customStatus"]["error"] == {"kind": "input", "message": message}
    assert svc.storage.list_names(s.output_container) == []
    assert svc.storage.info(s.input_container, name) is not None  # the input is untouched
