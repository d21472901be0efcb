"""The process-wide services (storage, compute) built from settings, once, on first use.

The Function App builds them from its app settings; the local CLI and tests call :func:`configure` first
to choose a folder, a worker count or Azurite.
"""

from __future__ import annotations

import threading

from pipeline.compute import ComputeBackend, LocalCompute
from pipeline.jobs import Services
from pipeline.settings import Settings
from pipeline.storage import BlobStorage, LocalStorage, Storage

_lock = threading.Lock()
_services: Services | None = None


def build_storage(settings: Settings) -> Storage:
    if settings.storage == "local":
        return LocalStorage(settings.storage_root)
    if settings.storage == "blob":
        return BlobStorage(settings.blob_account_url, settings.blob_connection_string)
    raise ValueError(f"STYLIZE_STORAGE must be local or blob, not {settings.storage!r}")


def build_compute(settings: Settings, storage: Storage) -> ComputeBackend:
    if settings.compute == "local":
        scratch = settings.storage_root / ".scratch"
        return LocalCompute(storage, scratch, workers=settings.local_workers,
                            timeout_seconds=settings.task_timeout_minutes * 60)
    if settings.compute == "batch":
        from pipeline.batch_compute import BatchCompute

        return BatchCompute.from_settings(settings, storage)
    raise ValueError(f"STYLIZE_COMPUTE must be local or batch, not {settings.compute!r}")


def configure(settings: Settings) -> Services:
    """Replace the services (closing a previous local compute backend's workers)."""
    global _services
    with _lock:
        if _services is not None and hasattr(_services.compute, "close"):
            _services.compute.close()
        storage = build_storage(settings)
        _services = Services(settings, storage, build_compute(settings, storage))
        return _services


def services() -> Services:
    """The configured services; in the Function App, built from the app settings on first use."""
    global _services
    with _lock:
        if _services is None:
            settings = Settings.from_env()
            storage = build_storage(settings)
            _services = Services(settings, storage, build_compute(settings, storage))
        return _services
