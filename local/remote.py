"""`stylize submit` and `stylize status`: the two commands that talk to a deployment in Azure."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from gpu_worker.errors import InputError
from gpu_worker.style_spec import parse_style
from pipeline.jobspec import check_blob_name, instance_id

TERMINAL = {"Completed", "Failed", "Terminated"}
# While following a job, this many failed polls in a row (a 5xx, 429, a dropped connection) are waited out: a
# Function App restarting or scaling answers 503 for a moment, and that is no reason to stop following.
TRANSIENT_TRIES = 5
_TRANSIENT_CODES = {429, 500, 502, 503, 504}
LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib sends every header again to wherever a redirect points, the function key included: follow none
    (the status endpoint never redirects; a 3xx is reported like any other unexpected answer)."""

    def redirect_request(self, *args, **kwargs) -> None:
        return None


def submit(args: argparse.Namespace) -> int:
    """Upload with the style as blob metadata (keyless: your az login); the upload trigger starts the job."""
    from azure.identity import DefaultAzureCredential
    from azure.storage.blob import BlobClient

    if not args.video.is_file():
        raise InputError(f"no such file: {args.video}")
    spec = parse_style(args.style, args.strength if args.strength is not None else 1.0, args.preserve_color,
                       *([] if args.temporal is None else [args.temporal]))
    name = check_blob_name(args.name or args.video.name)
    metadata = {"style": args.style, "preserve_color": str(spec.preserve_color).lower()}
    if args.strength is not None:
        metadata["strength"] = str(spec.strength)
    if args.temporal is not None:
        metadata["temporal"] = str(spec.temporal)
    blob = BlobClient(f"https://{args.account}.blob.core.windows.net", "input", name,
                      credential=DefaultAzureCredential())
    with open(args.video, "rb") as data:
        result = blob.upload_blob(data, overwrite=True, metadata=metadata, max_concurrency=4)
    print(instance_id("input", name, result["etag"]))
    return 0


def follow(args: argparse.Namespace) -> int:
    """Poll GET /api/jobs/{id} until the job ends, with a progress line; exit 0 only if it completed."""
    from local.progress_view import ProgressView

    view = ProgressView()
    url = f"{args.app.rstrip('/')}/api/jobs/{args.job_id}"
    parts = urllib.parse.urlsplit(url)
    if args.key and parts.scheme != "https" and parts.hostname not in LOOPBACK:
        raise InputError("--app must be an https:// URL: the function key is never sent over plain http")
    headers = {"x-functions-key": args.key} if args.key else {}  # a header keeps the key out of URLs and logs
    opener = urllib.request.build_opener(_NoRedirect)
    failures = 0
    while True:
        try:
            with opener.open(urllib.request.Request(url, headers=headers), timeout=30) as response:
                status = json.loads(response.read())
            failures = 0
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            if args.key:  # an error page may echo the request's headers
                detail = detail.replace(args.key, "***")
            failures += 1
            if exc.code not in _TRANSIENT_CODES or args.once or failures >= TRANSIENT_TRIES:
                raise InputError(f"status endpoint answered {exc.code}: {detail[:200]}") from None
            time.sleep(args.interval)
            continue
        except (urllib.error.URLError, OSError, ValueError) as exc:  # no connection, a timeout, not JSON
            failures += 1
            if args.once or failures >= TRANSIENT_TRIES:
                reason = getattr(exc, "reason", exc)
                raise InputError(f"cannot read the status endpoint {parts.scheme}://{parts.netloc}: {reason}") from None
            time.sleep(args.interval)
            continue
        runtime = status.get("runtime_status")
        if args.once or runtime in TERMINAL:
            view.close()
            print(json.dumps(status, indent=1))
            error = status.get("error") or {}
            if runtime != "Completed" and error.get("message"):
                print(f"error: {error['message']}", file=sys.stderr)
            return 0 if runtime == "Completed" or args.once else 1
        view.show(status)
        time.sleep(args.interval)
