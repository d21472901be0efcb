"""HTTP headers for reading sources from Blob Storage with an Entra ID token, without the Azure SDK.

The token never appears on a command line: a local run passes it in the environment, and on an Azure
Batch node it comes from the node's managed identity (see the compute backend). Plain paths and public
URLs need no headers.
"""

from __future__ import annotations

import os

STORAGE_API_VERSION = "2023-11-03"  # blob REST version that accepts bearer tokens and ranged reads


def http_headers(env: dict[str, str] | None = None) -> dict[str, str] | None:
    env = dict(os.environ) if env is None else env
    token = env.get("WORKER_STORAGE_TOKEN")
    if not token:
        return None
    return {"Authorization": f"Bearer {token}", "x-ms-version": STORAGE_API_VERSION}
