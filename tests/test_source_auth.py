"""The worker's storage token: from the environment, or from the node's IMDS (a loopback stand-in here)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from gpu_worker import source_auth
from gpu_worker.source_auth import STORAGE_API_VERSION, TokenError, http_headers, imds_token
from tests import loopback
from tests.fake_batch import FakeImds

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.stand-in-token.signature"


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    server = FakeImds(CLIENT_ID, TOKEN)
    yield server
    server.close()


def imds_env(imds: FakeImds, **extra: str) -> dict[str, str]:
    return {"WORKER_STORAGE_AUTH": "imds", "AZURE_CLIENT_ID": CLIENT_ID, "WORKER_IMDS_ENDPOINT": imds.url, **extra}


def test_no_token_settings_means_no_headers() -> None:
    assert http_headers({}) is None


def test_token_from_the_environment() -> None:
    assert http_headers({"WORKER_STORAGE_TOKEN": "abc"}) == {"Authorization": "Bearer abc",
                                                             "x-ms-version": STORAGE_API_VERSION}


def test_imds_token_for_the_pool_identity(imds: FakeImds, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy in the environment must not see IMDS requests (urllib would otherwise send them there).
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    assert http_headers(imds_env(imds)) == {"Authorization": f"Bearer {TOKEN}", "x-ms-version": STORAGE_API_VERSION}
    [request] = imds.requests
    assert request["metadata"] == "true" and request["path"] == "/metadata/identity/oauth2/token"
    assert request["query"] == {"api-version": "2018-02-01", "resource": "https://storage.azure.com/",
                                "client_id": CLIENT_ID}


def test_imds_is_retried_when_busy(imds: FakeImds) -> None:
    imds.failures = [429, 500]
    waits: list[float] = []
    assert imds_token(imds_env(imds), sleep=waits.append) == TOKEN
    assert len(imds.requests) == 3 and waits == [1.0, 2.0]


def test_unknown_identity_fails_at_once_without_the_token(imds: FakeImds) -> None:
    with pytest.raises(TokenError) as caught:
        imds_token(imds_env(imds, AZURE_CLIENT_ID="99999999-0000-0000-0000-000000000000"), sleep=lambda s: None)
    assert "client id 99999999" in str(caught.value) and "Identity not found" in str(caught.value)
    assert TOKEN not in str(caught.value) and len(imds.requests) == 1


def test_unreachable_imds_gives_up_after_a_few_tries() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}/metadata/identity/oauth2/token"
    waits: list[float] = []
    with pytest.raises(TokenError, match=r"cannot get a storage token .* through IMDS: URLError"):
        imds_token({"WORKER_STORAGE_AUTH": "imds", "WORKER_IMDS_ENDPOINT": endpoint}, sleep=waits.append)
    assert len(waits) == source_auth.IMDS_ATTEMPTS - 1


def test_unknown_auth_mode_is_refused() -> None:
    with pytest.raises(TokenError, match="WORKER_STORAGE_AUTH='sas' is not supported"):
        http_headers({"WORKER_STORAGE_AUTH": "sas"})


def test_worker_reads_with_the_token_and_never_prints_it(imds: FakeImds, tmp_path) -> None:
    """The worker fetches the token and sends it with its reads of the source; neither its output nor its error
    shows it. The stand-in for Blob Storage refuses the read as it refuses a token without read rights."""
    seen: list[dict[str, str | None]] = []

    class Blob(loopback.Handler):
        def do_GET(self) -> None:
            seen.append({name: self.headers.get(name) for name in ("Authorization", "x-ms-version")})
            self.reply(403, "<?xml version=\"1.0\"?><Error><Code>AuthorizationPermissionMismatch</Code></Error>",
                       {"Content-Type": "application/xml", "x-ms-error-code": "AuthorizationPermissionMismatch"})

    blob = loopback.Server(Blob, "blob")
    env = {**os.environ, **imds_env(imds)}
    env.pop("WORKER_STORAGE_TOKEN", None)
    try:
        proc = subprocess.run([sys.executable, "-m", "gpu_worker", "stylize", f"{blob.url}/input/clip.mp4",
                               "out.mp4", "-s", "0", "--scorer", "identity", "--json"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        blob.close()
    assert proc.returncode != 0 and len(imds.requests) == 1
    assert seen and all(h == {"Authorization": f"Bearer {TOKEN}", "x-ms-version": STORAGE_API_VERSION} for h in seen)
    assert TOKEN not in proc.stdout + proc.stderr and "stand-in-token" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out.mp4").exists()


@pytest.fixture
def redirect() -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    """An address that redirects (302) to another loopback server; what each server saw, with its Authorization."""
    seen: list[tuple[str, str | None]] = []

    class Elsewhere(loopback.Handler):
        def do_GET(self) -> None:
            seen.append(("elsewhere", self.headers.get("Authorization")))
            self.reply(200, b"{}")

    elsewhere = loopback.Server(Elsewhere, "elsewhere")

    class Redirecting(loopback.Handler):
        def do_GET(self) -> None:
            seen.append(("storage", self.headers.get("Authorization")))
            self.reply(302, "", {"Location": f"{elsewhere.url}{self.path}"})

    storage = loopback.Server(Redirecting, "redirecting")
    yield storage.url, seen
    storage.close()
    elsewhere.close()


def test_worker_follows_no_redirect_with_the_token(redirect, tmp_path) -> None:
    """ffmpeg sends the Authorization header on to wherever a redirect points; with the storage token it is not
    let to follow one (Blob Storage never redirects a read): the task fails, naming why."""
    url, seen = redirect
    env = {**os.environ, "WORKER_STORAGE_TOKEN": TOKEN}
    proc = subprocess.run([sys.executable, "-m", "gpu_worker", "stylize", f"{url}/input/clip.mp4", "out.mp4", "-s",
                           "0", "--scorer", "identity"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: cannot download clip.mp4: input/output error (a redirect "
                                                    "is not followed while a storage token is sent)")
    assert seen == [("storage", f"Bearer {TOKEN}")]  # nothing reached the other address
    assert TOKEN not in proc.stdout + proc.stderr and not (tmp_path / "out.mp4").exists()



def test_open_url_follows_no_redirect_with_the_token(redirect) -> None:
    """The worker's other reads (a style image, the stitch's segment list) go through source_auth.open_url: urllib
    too would send the token on."""
    url, seen = redirect
    request = urllib.request.Request(f"{url}/styles/s.png", headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError, match="not followed with a storage token"):
        source_auth.open_url(request, timeout=10)
    assert seen == [("storage", f"Bearer {TOKEN}")]
    seen.clear()
    with source_auth.open_url(urllib.request.Request(f"{url}/public.png"), timeout=10) as response:
        assert response.status == 200  # without a token, a redirect is followed as before
    assert seen == [("storage", None), ("elsewhere", None)]
