"""HTTP headers for reading sources from Blob Storage with an Entra ID token, without the Azure SDK.

The token never appears on a command line or in a log line. Two ways to get one:

- ``WORKER_STORAGE_TOKEN``: a token handed over in the environment (local runs);
- ``WORKER_STORAGE_AUTH=imds``: on an Azure Batch node, ask the node's Instance Metadata Service for a token
  of the pool's user-assigned managed identity (``AZURE_CLIENT_ID`` picks it), audience Blob Storage. The
  compute backend (pipeline.batch_compute) sets both variables as task environment settings.

Plain paths and public URLs need no headers: with neither variable set this returns None.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

STORAGE_API_VERSION = "2023-11-03"  # blob REST version that accepts bearer tokens and ranged reads
STORAGE_RESOURCE = "https://storage.azure.com/"
IMDS_TOKEN_URL = "http://169.254.169.254/metadata/identity/oauth2/token"
IMDS_API_VERSION = "2018-02-01"
# IMDS answers 429 when asked too often and 5xx (or 404 while an identity is still being attached) now and
# then; a task start-up can afford a few seconds of retries before it gives up (the orchestrator retries it).
IMDS_ATTEMPTS = 5
IMDS_TIMEOUT_SECONDS = 10.0
_RETRY_STATUS = {404, 408, 410, 429, 500, 502, 503, 504}


class TokenError(RuntimeError):
    """No storage token could be had; the message never contains a token."""


class _RefuseRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib's signature
        raise urllib.error.HTTPError(req.full_url, code, "a redirect, not followed with a storage token", headers, fp)


def open_url(request: urllib.request.Request, timeout: float) -> http.client.HTTPResponse:
    """``urllib.request.urlopen``, except that a request carrying a storage token follows no redirect: urllib
    would send its Authorization header on to wherever the redirect points. Blob Storage never redirects a read.
    (media.open_source does the same for ffmpeg's own HTTP client.)"""
    if not request.has_header("Authorization"):
        return urllib.request.urlopen(request, timeout=timeout)
    return urllib.request.build_opener(_RefuseRedirect).open(request, timeout=timeout)


def http_headers(env: dict[str, str] | None = None) -> dict[str, str] | None:
    env = dict(os.environ) if env is None else env
    token = env.get("WORKER_STORAGE_TOKEN")
    if not token and env.get("WORKER_STORAGE_AUTH", "").lower() == "imds":
        token = imds_token(env)
    elif not token and env.get("WORKER_STORAGE_AUTH"):
        raise TokenError(f"WORKER_STORAGE_AUTH={env['WORKER_STORAGE_AUTH']!r} is not supported (use 'imds')")
    if not token:
        return None
    return {"Authorization": f"Bearer {token}", "x-ms-version": STORAGE_API_VERSION}


def imds_token(env: dict[str, str], sleep=time.sleep) -> str:
    """A Blob Storage access token for the node's managed identity, from IMDS (plain urllib, no proxy).

    ``WORKER_IMDS_ENDPOINT`` replaces the well-known address; only tests set it (a loopback stand-in).
    """
    query = {"api-version": IMDS_API_VERSION, "resource": STORAGE_RESOURCE}
    if env.get("AZURE_CLIENT_ID"):
        query["client_id"] = env["AZURE_CLIENT_ID"]
    url = f"{env.get('WORKER_IMDS_ENDPOINT') or IMDS_TOKEN_URL}?{urllib.parse.urlencode(query)}"
    request = urllib.request.Request(url, headers={"Metadata": "true"})
    # IMDS must be reached directly: an HTTP(S)_PROXY in the environment would swallow the request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    problem = "no answer"
    for attempt in range(IMDS_ATTEMPTS):
        if attempt:
            sleep(min(2.0 ** (attempt - 1), 8.0))
        try:
            with opener.open(request, timeout=IMDS_TIMEOUT_SECONDS) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code} {_imds_reason(exc)}".strip()
            if exc.code in _RETRY_STATUS:
                continue
            break
        except (OSError, ValueError) as exc:  # unreachable, timed out, or not JSON
            problem = f"{type(exc).__name__}: {exc}"
            continue
        token = body.get("access_token") if isinstance(body, dict) else None
        if isinstance(token, str) and token:
            return token
        problem = "the answer has no access_token"
        break
    client = f"client id {env['AZURE_CLIENT_ID']}" if env.get("AZURE_CLIENT_ID") else "the default identity"
    raise TokenError(f"cannot get a storage token from the node's managed identity ({client}) through IMDS: "
                     f"{problem}")


def _imds_reason(exc: urllib.error.HTTPError) -> str:
    """IMDS's own error text (an OAuth error object), never anything that could hold a token."""
    try:
        body = json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return ""
    if not isinstance(body, dict):
        return ""
    return " ".join(str(body[k]) for k in ("error", "error_description") if isinstance(body.get(k), str))[:300]
