"""Security review: secrets stay out of the repository, requests, logs and output; HTTP endpoints need a key;
the worker image does not run as root. README.md, "Security and threat model", refers to these checks.

Which test checks which review item (`infra::` is tests/test_infra.py, `auth::` tests/test_source_auth.py,
`worker::` tests/test_worker_cli.py; names without a prefix are in this file):

| Review item | Checked by |
| --- | --- |
| no account key, SAS or function key in repository files | `test_repository_holds_no_keys_sas_or_function_keys` |
| … and that scan can fail | `test_secret_scan_flags_each_kind_of_secret` |
| no keys or SAS in infra, Entra-only storage | `infra::test_no_account_keys_or_sas_anywhere_in_infra` |
| … https only, TLS 1.2, no shared key, no public blobs | `infra::test_storage_accounts_are_keyless_and_private` |
| … identity-based app settings, https only | `infra::test_function_app_flex_consumption_identity_based_settings` |
| … Batch, registry, App Insights without keys | `infra::test_batch_account_allows_entra_id_only`, |
| | `infra::test_registry_and_app_insights_are_keyless` |
| least privilege per identity | `infra::test_each_identity_has_exactly_its_roles` |
| HTTP endpoints need a function key | `test_every_http_function_requires_a_function_key` |
| storage key never logged (storage, job, status API) | `test_blob_storage_and_job_status_never_log_the_account_key` |
| storage token and SAS never reported | `test_remote_reads_never_report_the_token_or_the_sas`, |
| | `auth::test_worker_reads_with_the_token_and_never_prints_it` |
| storage token never sent on to a redirect's address | `auth::test_worker_follows_no_redirect_with_the_token`, |
| | `auth::test_open_url_follows_no_redirect_with_the_token` |
| `stylize status` never shows nor forwards its key | `test_stylize_status_never_shows_or_forwards_the_function_key` |
| Batch tasks carry no token, key or SAS | `test_batch_tasks_carry_no_token_key_or_sas`, |
| | `test_batch_refuses_storage_reached_through_a_sas` |
| worker opens inputs with protocol/format whitelists | `worker::test_other_protocols_are_refused`, |
| | `worker::test_playlists_and_concat_lists_are_refused_not_followed` |
| worker image runs as non-root | `test_worker_image_final_user_is_not_root` |
| Batch tasks run as a non-admin user | `test_batch_tasks_carry_no_token_key_or_sas` |
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import av
import azure.functions as func
import pytest
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.storage.blob import AccountSasPermissions, BlobServiceClient, ResourceTypes, generate_account_sas

import function_app
from gpu_worker.errors import InputError
from gpu_worker.media import probe
from local.durable_host import LocalDurableHost
from pipeline import jobs, runtime
from pipeline.batch_compute import BatchCompute, batch_job_id
from pipeline.compute import Task
from pipeline.jobspec import job_spec
from pipeline.plan import plan_segments
from pipeline.settings import Settings
from pipeline.storage import BlobStorage
from tests import loopback
from tests.conftest import DEV_ACCOUNT, DEV_KEY
from tests.fake_batch import FakeBatch

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- secrets in the repository

# What a committed secret looks like. Each pattern wants a value, not just a name, so code that *talks about*
# keys (regexes, placeholders such as `code=<key>` or `AccountKey={DEV_KEY}`) is not flagged.
SECRET_PATTERNS = {
    "storage account key in a connection string": re.compile(r"AccountKey\s*=\s*[A-Za-z0-9+/]{20,}", re.I),
    # a 64-byte base64 key (storage, Batch); `sha512-…` integrity hashes in package-lock.json have the same shape
    "account key (64 bytes, base64)": re.compile(r"(?<![A-Za-z0-9+/-])[A-Za-z0-9+/]{86}==(?![A-Za-z0-9+/=])"),
    "SAS signature": re.compile(r"[?&;]sig=[A-Za-z0-9%+/]{16,}", re.I),
    "SAS token": re.compile(r"\bsv=\d{4}-\d{2}-\d{2}&[^\s\"']*\bsig=", re.I),
    "SAS connection string": re.compile(r"SharedAccessSignature\s*=\s*[^\s;\"'{}<>$]{8,}", re.I),
    "function key in a URL": re.compile(r"[?&]code=[A-Za-z0-9_\-]{20,}"),
    "function key value": re.compile(
        r"(?:x-functions-key|function[_-]?key)[\"']?\s*[:=,]\s*[\"']?[A-Za-z0-9_\-/+]{20,}", re.I),
    "bearer token (JWT)": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Application Insights key": re.compile(r"InstrumentationKey=(?!0{8}-)[0-9a-fA-F]{8}-"),
}
# Where a secret-shaped value is legitimate: Azurite's published development key (not a secret), which the
# azurite fixture needs to sign requests to the local emulator.
ALLOWED = {("tests/conftest.py", DEV_KEY)}


def find_secrets(text: str) -> list[tuple[str, str]]:
    return [(kind, m.group(0)) for kind, pattern in SECRET_PATTERNS.items() for m in pattern.finditer(text)]


def _repository_files() -> list[str]:
    """Tracked files plus new ones not ignored (about to be committed), as git lists them."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"git ls-files failed: {proc.stderr}"
    return sorted({name for name in proc.stdout.split("\0") if name})


def test_repository_holds_no_keys_sas_or_function_keys() -> None:
    files = _repository_files()
    assert {"function_app.py", "tests/conftest.py", "infra/main.bicep", "tests/test_security.py"} <= set(files)
    found, allowed_used = [], set()
    for name in files:
        path = REPO / name
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for kind, value in find_secrets(text):
            allowed = {entry for entry in ALLOWED if entry[0] == name and entry[1] in value}
            if allowed:
                allowed_used |= allowed
            else:
                found.append(f"{name}: {kind}: {value[:24]}…")
    assert not found, "secrets in repository files:\n" + "\n".join(found)
    assert allowed_used == ALLOWED, f"stale allowlist entries: {ALLOWED - allowed_used}"


def test_secret_scan_flags_each_kind_of_secret() -> None:
    """The scan above can fail: each kind of secret is found, and what merely names one is not. Samples are
    assembled here at run time, so this file does not itself hold them."""
    key = base64.b64encode(secrets.token_bytes(64)).decode()
    token = secrets.token_urlsafe(40).replace("-", "A").replace("_", "B")
    sig = "sig=" + base64.b64encode(secrets.token_bytes(32)).decode().replace("+", "%2B").replace("/", "%2F")
    jwt = ".".join(["eyJ" + secrets.token_urlsafe(16), "eyJ" + secrets.token_urlsafe(32), secrets.token_urlsafe(32)])
    samples = {
        "storage account key in a connection string": "DefaultEndpointsProtocol=https;AccountName=a;Account"
                                                      + f"Key={key}",
        "account key (64 bytes, base64)": f'STORAGE = "{key}"',
        "SAS signature": f"https://a.blob.core.windows.net/c/v.mp4?sp=r&{sig}",
        "SAS token": "token = 'sv=2022-11-02&ss=b&srt=o&sp=r&se=2030-01-01T00:00:00Z&" + sig + "'",
        "SAS connection string": "BlobEndpoint=https://a.b.core.windows.net/;SharedAccess" + "Signature=sv=2022-11-02",
        "function key in a URL": f"curl https://func.azurewebsites.net/api/jobs/x?code={token}",
        "function key value": "x-functions-" + f"key: {token}",
        "bearer token (JWT)": f"Authorization: Bearer {jwt}",
        "private key": "-----BEGIN RSA PRIV" + "ATE KEY-----",
        "Application Insights key": "InstrumentationKey=" + str(uuid.uuid4()) + ";IngestionEndpoint=https://x/",
    }
    assert set(samples) == set(SECRET_PATTERNS)
    for kind, text in samples.items():
        assert kind in {k for k, _ in find_secrets(text)}, (kind, text)
    harmless = [
        "https://<app>/runtime/webhooks/blobs?functionName=Host.Functions.on_video_uploaded&code=<key>",
        'curl "https://$HOST/api/jobs/<job id>?code=$KEY"',
        'f"AccountKey={DEV_KEY};BlobEndpoint=http://127.0.0.1:{port}/"',
        r're.compile(r"[?&](?:sig|se|sv|sp|skoid)=|AccountKey=|SharedAccessSignature", re.I)',
        '"integrity": "sha512-' + key + '"',
        'ss.add_argument("--key", default=os.environ.get("STYLIZE_FUNCTION_KEY"))',
        "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=http://127.0.0.1:9/",
    ]
    for text in harmless:
        assert find_secrets(text) == [], text


# ---------------------------------------------------------------- HTTP endpoints


def test_every_http_function_requires_a_function_key() -> None:
    """What the Functions host reads (each function's binding JSON): no HTTP trigger is anonymous."""
    http_functions = {}
    for function in function_app.app.get_functions():
        bindings = json.loads(function.get_function_json())["bindings"]
        for binding in bindings:
            if binding["type"].lower() == "httptrigger":
                http_functions[function.get_function_name()] = str(binding.get("authLevel")).upper()
    assert {"create_job", "get_job", "list_jobs", "cancel_job"} <= set(http_functions)
    anonymous = {name: level for name, level in http_functions.items() if level not in ("FUNCTION", "ADMIN")}
    assert not anonymous, f"HTTP functions callable without a key: {anonymous}"
    # a route added later without its own auth_level inherits the app's, which demands a key too
    assert str(function_app.app.auth_level).upper().endswith("FUNCTION")


# ---------------------------------------------------------------- secrets never logged


def _containers(connection: str, public: bool = False) -> dict[str, str]:
    prefix = uuid.uuid4().hex[:6]
    service = BlobServiceClient.from_connection_string(connection)
    names = {}
    for kind in ("input", "styles", "output", "work", "logs"):
        names[kind] = f"{prefix}-sec-{kind}"
        service.create_container(names[kind], public_access="blob" if public else None)
    return names


def _assert_no_key_signature(text: str) -> None:
    """No Shared Key request signature, and no account key, in the text."""
    assert DEV_KEY not in text and DEV_KEY[:16] not in text
    assert not re.search(r"SharedKey(?:Lite)? [^\s:'\"]+:[A-Za-z0-9+/]{20,}", text), "a Shared Key signature"


def test_blob_storage_and_job_status_never_log_the_account_key(azurite: str, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture,
                                                               capfd: pytest.CaptureFixture) -> None:
    """Blob Storage configured with a connection string holding the account key: a storage round trip, a job
    that probes a private blob and fails, the status API and the job list. Every log record at DEBUG of every
    logger, and everything written to stdout/stderr, is free of the key and of request signatures."""
    caplog.set_level(logging.DEBUG)
    names = _containers(azurite)
    settings = Settings(storage="blob", blob_connection_string=azurite, storage_root=tmp_path, compute="local",
                        poll_seconds=0.1, input_container=names["input"], styles_container=names["styles"],
                        output_container=names["output"], work_container=names["work"], logs_container=names["logs"])
    svc = runtime.configure(settings)
    try:
        storage = svc.storage
        (tmp_path / "clip.mp4").write_bytes(b"not a video, but the name says so\n" * 10)
        storage.upload_file(tmp_path / "clip.mp4", names["input"], "clip.mp4", {"style": "7"})
        storage.write_json(names["work"], "j/plan.json", {"segments": [["0", None]]})
        assert storage.read_json(names["work"], "j/plan.json") == {"segments": [["0", None]]}
        assert storage.info(names["input"], "clip.mp4").metadata == {"style": "7"}
        assert storage.info(names["input"], "missing.mp4") is None
        with pytest.raises(InputError) as missing:
            storage.download_file(names["input"], "missing.mp4", tmp_path / "missing.mp4")
        storage.download_file(names["input"], "clip.mp4", tmp_path / "copy.mp4")
        assert storage.list_names(names["work"], "j/") == ["j/plan.json"]
        assert storage.delete_prefix(names["work"], "j/") == 1
        replies = [str(missing.value)]
        with LocalDurableHost(function_app.app, max_workers=2) as host:
            body = json.dumps({"input": "clip.mp4", "style": "7"}).encode()
            created = host.invoke_function("create_job", req=func.HttpRequest("POST", "http://localhost/api/jobs",
                                                                               body=body))
            assert created.status_code == 202, created.get_body()
            job_id = json.loads(created.get_body())["id"]
            final = host.wait(job_id, timeout=60)
            assert final["runtimeStatus"] == "Failed", final  # the private blob is not a readable video
            for name, route in (("get_job", {"job_id": job_id}), ("list_jobs", {}), ("get_job", {"job_id": "nope"})):
                reply = host.invoke_function(name, req=func.HttpRequest("GET", "http://localhost/api/jobs", body=b"",
                                                                        route_params=route))
                replies.append(reply.get_body().decode())
            replies.append(json.dumps(final))
    finally:
        svc.compute.close()
    captured = capfd.readouterr()
    # non-vacuous: the SDK's request logging (headers included) was captured, and the failed job said why
    assert "Request headers:" in caplog.text and "'Authorization': 'REDACTED'" in caplog.text
    assert "is not a readable video" in replies[1]
    everything = "\n".join([caplog.text, captured.out, captured.err, *replies,
                            *(repr(r.args) for r in caplog.records)])
    _assert_no_key_signature(everything)
    assert "AccountKey" not in everything


class _EchoServer:
    """A loopback server that records what it is sent and echoes the Authorization header and the query back
    in its answers, as a hostile or misconfigured endpoint might: /list.json → a JSON list naming /denied.mp4,
    /denied.mp4 → 403, anything else → 200 with a text body."""

    def __init__(self, sas: str) -> None:
        self.seen: list[tuple[str, str | None]] = []
        server = self

        class Handler(loopback.Handler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                server.seen.append((self.path, auth))
                echo = f"you sent {auth} with {self.path}"
                path = self.path.split("?")[0]
                if path == "/list.json":
                    status, body = 200, json.dumps([f"{server.url}/denied.mp4?{sas}"])
                elif path == "/denied.mp4":
                    status, body = 403, echo
                else:
                    status, body = 200, echo * 20
                self.reply(status, body)

        self._server = loopback.Server(Handler, "echo-server")
        self.url = self._server.url

    def close(self) -> None:
        self._server.close()


def test_remote_reads_never_report_the_token_or_the_sas(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        capfd: pytest.CaptureFixture) -> None:
    """A source read with a bearer token and a SAS-looking query, from a server that echoes both: the Function
    App's probe (in process, with ffmpeg's own log at DEBUG) and a worker process (token from its environment,
    as LocalCompute hands it over) report neither, in messages, logs or output."""
    token = f"tok-{secrets.token_hex(16)}"
    sig = secrets.token_hex(16)
    sas = "&".join(["sv=2022-11-02", "sp=r", f"sig={sig}"])  # joined here: this file holds no SAS-shaped text
    server = _EchoServer(sas)
    caplog.set_level(logging.DEBUG)
    level = av.logging.get_level()
    av.logging.set_level(av.logging.DEBUG)
    messages = []
    try:
        for path in ("denied.mp4", "text.mp4"):
            with pytest.raises(InputError) as refused:
                probe(f"{server.url}/{path}?{sas}", {"Authorization": f"Bearer {token}", "x-ms-version": "2023-11-03"})
            messages.append(str(refused.value))
        env = {**os.environ, "WORKER_STORAGE_TOKEN": token}
        env.pop("WORKER_STORAGE_AUTH", None)
        worker = subprocess.run([sys.executable, "-m", "gpu_worker", "stitch", "out.mp4", "--list",
                                 f"{server.url}/list.json?{sas}", "--json"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
    finally:
        av.logging.set_level(level)
        server.close()
    assert worker.returncode == 2, worker.stderr
    assert "error: denied.mp4 is not a readable video" in worker.stderr  # it got as far as the listed segment
    # non-vacuous: every request carried the token, and the SAS went to the server
    assert {auth for _, auth in server.seen} == {f"Bearer {token}"} and len(server.seen) >= 4
    assert all(sig in path for path, _ in server.seen)
    captured = capfd.readouterr()
    everything = "\n".join([*messages, worker.stdout, worker.stderr, caplog.text, captured.out, captured.err])
    assert token not in everything and sig not in everything


def _status_server(other: str) -> tuple[loopback.Server, list]:
    """Answers GET /api/jobs/<case>: ok → 200, unauthorized → 401 and boom → 500 echoing the key and all
    headers (an error page that reflects the request), moved → 302 to ``other``."""
    seen = []

    class Handler(loopback.Handler):
        def do_GET(self) -> None:
            key = self.headers.get("x-functions-key")
            seen.append((self.path, key))
            case = self.path.rsplit("/", 1)[-1]
            headers = {}
            if case == "ok":
                status, body = 200, json.dumps({"id": "ok", "runtime_status": "Completed"})
            elif case == "unauthorized":
                status, body = 401, f"key {key!r} is not valid for this function"
            elif case == "moved":
                status, body, headers = 302, "", {"Location": f"{other}/api/jobs/ok"}
            else:
                status, body = 500, "Internal error; request headers were:\n" + str(self.headers)
            self.reply(status, body, headers)

    return loopback.Server(Handler, "status-server"), seen


def test_stylize_status_never_shows_or_forwards_the_function_key(tmp_path: Path) -> None:
    """`stylize status` with a function key (from --key or STYLIZE_FUNCTION_KEY): the key is never printed,
    whatever the server answers, never follows a redirect to another host, and never goes over plain http
    to anything but this machine."""
    key = secrets.token_urlsafe(40)
    elsewhere, elsewhere_seen = _status_server("http://127.0.0.1:9")
    server, seen = _status_server(elsewhere.url.replace("127.0.0.1", "localhost"))
    app = server.url

    def status(job: str, *extra: str, app: str = app, env_key: bool = False) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("STYLIZE_FUNCTION_KEY", None)
        args = ["status", job, "--app", app, "--once", *extra]
        if env_key:
            env["STYLIZE_FUNCTION_KEY"] = key
        else:
            args.append(f"--key={key}")  # one argument: a token that starts with "-" would read as an option
        return subprocess.run([sys.executable, "-m", "local.cli", *args], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path, env=env)

    try:
        ok = status("ok", env_key=True)
        unauthorized = status("unauthorized")
        boom = status("boom", env_key=True)
        moved = status("moved")
        plain = status("ok", app="http://stylize-test.invalid")
    finally:
        server.close()
        elsewhere.close()
    assert ok.returncode == 0 and json.loads(ok.stdout)["runtime_status"] == "Completed", ok.stderr
    assert seen and {k for _, k in seen} == {key}  # the key was sent, as a header, never in the URL
    assert all(key not in path for path, _ in seen)
    assert unauthorized.returncode == 2 and "status endpoint answered 401" in unauthorized.stderr
    assert "***" in unauthorized.stderr  # the echoed key is masked
    assert boom.returncode == 2 and "status endpoint answered 500" in boom.stderr and "***" in boom.stderr
    assert moved.returncode == 2 and "status endpoint answered 302" in moved.stderr
    assert elsewhere_seen == []  # the redirect was not followed, so the other host never saw the key
    assert plain.returncode == 2 and "must be an https:// URL" in plain.stderr
    for result in (ok, unauthorized, boom, moved, plain):
        assert key not in result.stdout + result.stderr, result.args


# ---------------------------------------------------------------- Batch requests


class _BearerPolicy(SansIOHTTPPolicy):
    """The Function App's Entra token for Batch, sent as the bearer policy would (allowed here over http)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def on_request(self, request) -> None:
        request.http_request.headers["Authorization"] = f"Bearer {self.token}"


SAS_QUERY = re.compile(r"[?&](?:sig|sv|se|sp|skoid|st|spr|srt|ss)=", re.I)


@pytest.fixture
def batch(azurite: str, tmp_path: Path) -> Iterator[FakeBatch]:
    fake = FakeBatch(azurite, tmp_path / "nodes", nodes=0)  # no nodes: tasks are recorded, never run
    yield fake
    fake.close()


def _compute(fake: FakeBatch, storage: BlobStorage, logs: str) -> BatchCompute:
    return BatchCompute(fake.url, "stylize-gpu", fake.worker_image, storage, pool_identity=fake.pool_identity,
                        pool_identity_client_id=fake.pool_identity_client_id, logs_container=logs,
                        authentication_policy=_BearerPolicy(fake.bearer_token), polling_interval=0.05)


def _job_services(connection: str, names: dict[str, str], fake: FakeBatch, storage: BlobStorage) -> jobs.Services:
    settings = Settings(storage="blob", blob_connection_string=connection, compute="batch",
                        batch_account_url=fake.url, batch_pool_id="stylize-gpu", batch_worker_image=fake.worker_image,
                        batch_pool_identity=fake.pool_identity,
                        batch_pool_identity_client_id=fake.pool_identity_client_id,
                        input_container=names["input"], styles_container=names["styles"],
                        output_container=names["output"], work_container=names["work"], logs_container=names["logs"])
    return jobs.Services(settings, storage, _compute(fake, storage, names["logs"]))


def _plan(svc: jobs.Services, job) -> None:
    svc.storage.write_json(svc.settings.work_container, jobs.work_name(job.run_id, "plan.json"),
                           {"segments": plan_segments(0.0, 2.0, 1.0, 100)})


def test_batch_tasks_carry_no_token_key_or_sas(azurite: str, batch: FakeBatch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Segment and stitch tasks built by pipeline.jobs, sent through the real Batch SDK, as the fake service
    recorded them: with the storage account key, the Function App's Batch token and secrets in the process
    environment all at hand, the command lines, environment settings and upload destinations hold none of
    them, nor any SAS; tasks run as a non-admin user and authenticate with the pool identity."""
    names = _containers(azurite)
    client_secret = f"client-secret-{secrets.token_hex(8)}"
    local_token = f"local-token-{secrets.token_hex(8)}"
    monkeypatch.setenv("AZURE_CLIENT_SECRET", client_secret)
    monkeypatch.setenv("WORKER_STORAGE_TOKEN", local_token)
    monkeypatch.setenv("DATA_STORAGE_CONNECTION_STRING", azurite)
    storage = BlobStorage(connection_string=azurite)
    svc = _job_services(azurite, names, batch, storage)
    job = job_spec("sec-job-1", names["input"], "clip.mp4", {"style": "painting.jpg"}, svc.settings)
    _plan(svc, job)
    try:
        assert jobs.submit_segments(job, svc, [(0, 0), (1, 0)]) == 2
        assert jobs.submit_stitch(job, svc, 2, 0) == 1
    finally:
        svc.compute.close()
    assert batch.violations == []
    batch_job = batch.job(batch_job_id(job.run_id))
    bodies = [task.body for task in batch_job.tasks.values()]
    assert sorted(b["id"] for b in bodies) == ["seg00000-a0", "seg00001-a0", "stitch-a0"]
    forbidden = [DEV_KEY, DEV_KEY[:16], batch.key, batch.bearer_token, client_secret, local_token, "AccountKey",
                 "SharedAccessSignature", "SharedKey", "Bearer"]
    for body in [*bodies, batch_job.body]:
        text = json.dumps(body)
        assert not [s for s in forbidden if s in text], body.get("id")
    for body in bodies:
        where = body["id"]
        words = body["commandLine"].split()
        assert words[:3] == ["python", "-m", "gpu_worker"], where
        urls = [w.strip("'\"") for w in words if "://" in w]
        urls += [o["destination"]["container"]["containerUrl"] for o in body["outputFiles"]]
        assert urls and not [u for u in urls if urllib.parse.urlsplit(u).query or SAS_QUERY.search(u)], where
        env = {e["name"]: e["value"] for e in body["environmentSettings"]}
        assert env == {"WORKER_STORAGE_AUTH": "imds", "AZURE_CLIENT_ID": batch.pool_identity_client_id,
                       "WORKER_DEVICE": "cpu"}, where  # the fake's pool is of a CPU size
        assert body["userIdentity"] == {"autoUser": {"scope": "task", "elevationLevel": "nonadmin"}}, where
        registry = body["containerSettings"]["registry"]
        assert set(registry) == {"registryServer", "identityReference"}, where  # no username or password
        assert registry["identityReference"]["resourceId"] == batch.pool_identity
        assert {o["destination"]["container"]["identityReference"]["resourceId"] for o in body["outputFiles"]} == \
            {batch.pool_identity}, where
    # the style image and the segments are read by URL: they are on the command lines, without a query
    segment = next(b for b in bodies if b["id"] == "seg00000-a0")["commandLine"]
    assert f"/{names['styles']}/painting.jpg" in segment and f"/{names['input']}/clip.mp4" in segment


def test_batch_refuses_storage_reached_through_a_sas(azurite: str, batch: FakeBatch) -> None:
    """Storage configured with a SAS connection string (it works, against Azurite): a SAS would ride along in
    every blob and container URL. No task is sent: neither its command line nor its upload destinations may
    carry it, and the refusal does not repeat it."""
    names = _containers(azurite)
    endpoint = BlobServiceClient.from_connection_string(azurite).url.rstrip("/")
    sas = generate_account_sas(DEV_ACCOUNT, DEV_KEY, ResourceTypes(container=True, object=True),
                               AccountSasPermissions(read=True, write=True, list=True),
                               expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    sig = urllib.parse.unquote(dict(urllib.parse.parse_qsl(sas))["sig"])
    connection = f"BlobEndpoint={endpoint};SharedAccessSignature={sas}"
    storage = BlobStorage(connection_string=connection)
    svc = _job_services(connection, names, batch, storage)
    job = job_spec("sec-job-2", names["input"], "clip.mp4", {"style": "7"}, svc.settings)
    _plan(svc, job)  # the SAS works: storage itself is reachable with it
    assert "sig=" in storage.reader_url(names["input"], "clip.mp4")
    before = len(batch.requests)
    try:
        with pytest.raises(ValueError, match="must not carry a SAS") as from_args:
            jobs.submit_segments(job, svc, [(0, 0)])
        # a task whose arguments hold no URL at all: its upload destinations would still carry the SAS
        with pytest.raises(ValueError, match="must not carry a SAS") as from_outputs:
            svc.compute.submit(job.job_id, [Task("probe-a0", ["probe", "/data/clip.mp4"], names["work"], "x.mp4")])
    finally:
        svc.compute.close()
    assert batch.requests[before:] == [] and batch.violations == []  # refused before anything was sent
    for refusal in (from_args, from_outputs):
        assert sig not in str(refusal.value) and urllib.parse.quote(sig, safe="") not in str(refusal.value)


# ---------------------------------------------------------------- the worker image


def test_worker_image_final_user_is_not_root() -> None:
    """The last USER of the image's final stage names a user that is not root (by name or uid 0), and the
    image creates that user with a non-zero uid."""
    text = (REPO / "gpu_worker" / "Dockerfile").read_text(encoding="utf-8")
    instructions = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(instructions) if re.match(r"FROM\s", line, re.I))
    final_stage = instructions[last_from:]
    users = [line.split(None, 1)[1].strip() for line in final_stage if re.match(r"USER\s", line, re.I)]
    assert users, "the final stage sets no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user.lower() != "root" and user.lstrip("0") != "", f"USER {users[-1]} runs as root"
    if not user.isdigit():
        created = [line for line in final_stage if re.match(r"RUN\s", line, re.I)
                   and re.search(rf"\b(?:useradd|adduser)\b.*\s{re.escape(user)}\s*(?:&&|$)", line)]
        assert created, f"the image does not create user {user}"
        uid = re.search(r"(?:--uid|-u)\s+(\d+)", created[-1])
        assert uid and int(uid.group(1)) != 0, f"user {user} must get a non-zero uid"
        assert not re.search(r"\s(?:-o|--non-unique)\b", created[-1]), "a non-unique uid could alias root"
