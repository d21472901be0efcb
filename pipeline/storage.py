"""Where videos, segments and outputs live: a local folder, or Azure Blob Storage (Azurite in tests).

Both implementations give the same guarantees: names are validated, uploads are all-or-nothing for
readers (rename into place locally; a blob upload commits atomically), and a worker can open what
:meth:`reader_url` returns directly (a path, or an https URL read with an Entra ID token).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gpu_worker.errors import InputError
from pipeline.jobspec import check_blob_name

PUBLISH_TIMEOUT_SECONDS = 600  # same-account copies take seconds; a stuck one is retried by the activity


@dataclass(frozen=True)
class BlobInfo:
    size: int
    etag: str
    metadata: dict[str, str]


class Storage(Protocol):
    def reader_url(self, container: str, name: str) -> str: ...
    def reader_headers(self) -> dict[str, str] | None: ...
    def info(self, container: str, name: str) -> BlobInfo | None: ...
    def upload_file(self, path: Path, container: str, name: str, metadata: Mapping[str, str] | None = None) -> None: ...
    def download_file(self, container: str, name: str, path: Path) -> None: ...
    def write_json(self, container: str, name: str, data: object) -> None: ...
    def read_json(self, container: str, name: str) -> object: ...
    def list_names(self, container: str, prefix: str = "") -> list[str]: ...
    def sizes(self, container: str, prefix: str = "") -> dict[str, int]:
        """Each blob's size in bytes, by name, for the names that start with ``prefix``."""
        ...
    def delete(self, container: str, name: str) -> None:
        """Remove one blob; a missing one is fine."""
        ...
    def delete_prefix(self, container: str, prefix: str) -> int: ...
    def publish(self, container: str, name: str, to_container: str, to_name: str) -> None:
        """Make a finished file appear under another name in one step; the source stays until cleanup, so a
        retried publish does the same again."""
        ...


class LocalStorage:
    """Containers are folders under ``root``; metadata sits in a hidden sidecar JSON file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, container: str, name: str) -> Path:
        check_blob_name(container, "container")
        check_blob_name(name, "name")
        return self.root / container / name

    def reader_url(self, container: str, name: str) -> str:
        return str(self.path(container, name))

    def reader_headers(self) -> dict[str, str] | None:
        return None

    def _meta_path(self, container: str, name: str) -> Path:
        path = self.path(container, name)
        return path.with_name(f".{path.name}.meta.json")

    def info(self, container: str, name: str) -> BlobInfo | None:
        path = self.path(container, name)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        meta_path = self._meta_path(container, name)
        metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return BlobInfo(size=stat.st_size, etag=f"{stat.st_mtime_ns:x}-{stat.st_size:x}", metadata=metadata)

    def upload_file(self, path: Path, container: str, name: str, metadata: Mapping[str, str] | None = None) -> None:
        target = self.path(container, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
        shutil.copyfile(path, tmp)
        if metadata is not None:
            self._meta_path(container, name).write_text(json.dumps(dict(metadata)))
        os.replace(tmp, target)

    def download_file(self, container: str, name: str, path: Path) -> None:
        source = self.path(container, name)
        if not source.exists():
            raise InputError(f"{container}/{name} does not exist")
        shutil.copyfile(source, path)

    def write_json(self, container: str, name: str, data: object) -> None:
        target = self.path(container, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, target)

    def read_json(self, container: str, name: str) -> object:
        return json.loads(self.path(container, name).read_text())

    def list_names(self, container: str, prefix: str = "") -> list[str]:
        base = self.root / container
        names = []
        for folder, _, files in os.walk(base):  # unlike rglob, fine with folders other jobs delete meanwhile
            rel = Path(folder).relative_to(base)
            names += [(rel / f).as_posix() for f in files if not f.startswith(".")]
        return sorted(n for n in names if n.startswith(prefix))

    def sizes(self, container: str, prefix: str = "") -> dict[str, int]:
        sizes = {}
        for name in self.list_names(container, prefix):
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                sizes[name] = self.path(container, name).stat().st_size
        return sizes

    def delete(self, container: str, name: str) -> None:
        self.path(container, name).unlink(missing_ok=True)
        self._meta_path(container, name).unlink(missing_ok=True)

    def delete_prefix(self, container: str, prefix: str) -> int:
        names = self.list_names(container, prefix)
        for name in names:
            self.delete(container, name)
        if prefix.endswith("/"):
            shutil.rmtree(self.root / container / prefix, ignore_errors=True)
        return len(names)

    def publish(self, container: str, name: str, to_container: str, to_name: str) -> None:
        source, target = self.path(container, name), self.path(to_container, to_name)
        if not source.exists():
            raise FileNotFoundError(f"{container}/{name} does not exist")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            os.link(source, tmp)  # same folder tree: no copy of the video
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        tmp.unlink(missing_ok=True)  # rename between two links to one file is a no-op that leaves tmp behind


class BlobStorage:
    """Azure Blob Storage: keyless (DefaultAzureCredential) in Azure, a connection string for Azurite."""

    def __init__(self, account_url: str | None = None, connection_string: str | None = None,
                 credential: object | None = None) -> None:
        from azure.storage.blob import BlobServiceClient

        self._credential = None
        if connection_string:
            self.service = BlobServiceClient.from_connection_string(connection_string)
        elif account_url:
            if credential is None:
                from azure.identity import DefaultAzureCredential

                credential = DefaultAzureCredential()
            self.service = BlobServiceClient(account_url, credential=credential)
            self._credential = credential
        else:
            raise ValueError("BlobStorage needs DATA_STORAGE_ACCOUNT_URL (or a connection string for Azurite)")

    def _blob(self, container: str, name: str):
        check_blob_name(name, "name")
        return self.service.get_blob_client(container, name)

    def reader_url(self, container: str, name: str) -> str:
        return self._blob(container, name).url

    def reader_headers(self) -> dict[str, str] | None:
        """What this process (the Function App probing a source) sends to read blobs by URL: an Entra ID
        token from its own identity. Workers get theirs themselves (gpu_worker.source_auth)."""
        if self._credential is None or not hasattr(self._credential, "get_token"):
            return None
        from gpu_worker.source_auth import STORAGE_API_VERSION

        token = self._credential.get_token("https://storage.azure.com/.default").token
        return {"Authorization": f"Bearer {token}", "x-ms-version": STORAGE_API_VERSION}

    def info(self, container: str, name: str) -> BlobInfo | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            props = self._blob(container, name).get_blob_properties()
        except ResourceNotFoundError:
            return None
        return BlobInfo(size=props.size, etag=props.etag, metadata=dict(props.metadata or {}))

    def upload_file(self, path: Path, container: str, name: str, metadata: Mapping[str, str] | None = None) -> None:
        with open(path, "rb") as data:
            self._blob(container, name).upload_blob(data, overwrite=True, metadata=dict(metadata or {}),
                                                    max_concurrency=4)

    def download_file(self, container: str, name: str, path: Path) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            with open(path, "wb") as out:
                self._blob(container, name).download_blob(max_concurrency=4).readinto(out)
        except ResourceNotFoundError:
            Path(path).unlink(missing_ok=True)
            raise InputError(f"{container}/{name} does not exist") from None

    def write_json(self, container: str, name: str, data: object) -> None:
        from azure.storage.blob import ContentSettings

        self._blob(container, name).upload_blob(
            json.dumps(data, indent=1).encode(), overwrite=True,
            content_settings=ContentSettings(content_type="application/json"),
        )

    def read_json(self, container: str, name: str) -> object:
        return json.loads(self._blob(container, name).download_blob().readall())

    def list_names(self, container: str, prefix: str = "") -> list[str]:
        client = self.service.get_container_client(container)
        return sorted(b.name for b in client.list_blobs(name_starts_with=prefix or None))

    def sizes(self, container: str, prefix: str = "") -> dict[str, int]:
        client = self.service.get_container_client(container)
        return {b.name: b.size for b in client.list_blobs(name_starts_with=prefix or None)}

    def publish(self, container: str, name: str, to_container: str, to_name: str) -> None:
        # A server-side copy within the account: the same Entra ID token authorizes reading the source.
        from azure.core.exceptions import ResourceNotFoundError

        target = self._blob(to_container, to_name)
        try:
            copy = target.start_copy_from_url(self._blob(container, name).url)
        except ResourceNotFoundError:
            raise FileNotFoundError(f"{container}/{name} does not exist") from None
        status, deadline = copy["copy_status"], time.monotonic() + PUBLISH_TIMEOUT_SECONDS
        while status == "pending" and time.monotonic() < deadline:
            time.sleep(0.5)
            status = target.get_blob_properties().copy.status
        if status != "success":
            if status == "pending":
                target.abort_copy(copy["copy_id"])
            raise RuntimeError(f"copying {container}/{name} to {to_container}/{to_name} ended {status}")

    def delete(self, container: str, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        with contextlib.suppress(ResourceNotFoundError):
            self._blob(container, name).delete_blob()

    def delete_prefix(self, container: str, prefix: str) -> int:
        names = self.list_names(container, prefix)
        client = self.service.get_container_client(container)
        for start in range(0, len(names), 256):  # the batch API takes at most 256 blobs a request
            client.delete_blobs(*names[start:start + 256])
        return len(names)
