"""Settings from the environment (Function App settings in Azure, the CLI's choices locally).

Every knob has a default that works on one machine with no cloud: a local folder for storage and local
worker processes for compute.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from gpu_worker.errors import InputError
from gpu_worker.style_spec import DEFAULT_TEMPORAL, parse_style

# Segment length weighs what the reference architecture weighs. Each task pays a fixed start-up (container
# start, model load, decoder seek: ~5–15 s on a GPU node), and a failure reruns one whole segment. At about
# 300 fps on an H100, 30 s of 30 fps video is ~3 s of scoring: long enough that start-up stays a minority,
# short enough that a 10-minute video spreads over 20 GPUs and a retry costs seconds.
DEFAULT_SEGMENT_SECONDS = 30.0
_CONTAINER = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


class SettingsError(InputError):
    """An app setting with a value the app cannot run with; the message names it and what is allowed."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        super().__init__(f"setting {name}={value!r}: {reason}", field=name)


@dataclass(frozen=True)
class Settings:
    # storage: "local" (a folder) or "blob" (Azure Blob Storage / Azurite)
    storage: str = "local"
    storage_root: Path = Path(".stylize")
    blob_account_url: str | None = None  # https://<account>.blob.core.windows.net, keyless
    blob_connection_string: str | None = None  # Azurite and local development only
    input_container: str = "input"
    styles_container: str = "styles"
    output_container: str = "output"
    work_container: str = "work"
    logs_container: str = "logs"
    # compute: "local" (worker processes here) or "batch" (Azure Batch)
    compute: str = "local"
    local_workers: int = 1
    batch_account_url: str | None = None
    batch_pool_id: str | None = None
    batch_worker_image: str | None = None
    batch_pool_identity: str | None = None  # resource id of the pool's user-assigned identity
    batch_pool_identity_client_id: str | None = None  # its client id: workers ask the node's IMDS for its tokens
    # jobs
    segment_seconds: float = DEFAULT_SEGMENT_SECONDS
    max_segments: int = 5000
    max_attempts: int = 3  # per segment task and per stitch
    activity_attempts: int = 4  # per activity call: storage or Batch API hiccups are retried, bad input is not
    activity_retry_seconds: float = 5.0
    poll_seconds: float = 5.0
    # tasks waiting this long with none of the job's running: ask the compute backend whether they can start at all
    queue_check_minutes: float = 15.0
    task_timeout_minutes: int = 60
    max_duration_seconds: float = 4 * 3600.0
    max_frame_side: int = 7680  # 8K UHD; the worker itself refuses anything over 8192
    # frames a second: with the side and the duration, what bounds a job's work (a 930 KB upload of 2 s at 500 fps
    # and 8K asked for 1000 frames of 8K)
    max_frame_rate: float = 240.0
    default_style: str = "0"
    default_strength: float = 1.0
    default_temporal: float = DEFAULT_TEMPORAL
    default_max_size: int = 0  # 0 keeps the source's resolution

    def __post_init__(self) -> None:
        for name, (env, lo, hi) in _RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise SettingsError(env, value, f"must be {lo:g} to {hi:g}")
        for name, env, allowed in (("storage", "STYLIZE_STORAGE", ("local", "blob")),
                                   ("compute", "STYLIZE_COMPUTE", ("local", "batch"))):
            if getattr(self, name) not in allowed:
                raise SettingsError(env, getattr(self, name), f"must be {' or '.join(allowed)}")
        for kind in ("input", "styles", "output", "work", "logs"):
            name = getattr(self, f"{kind}_container")
            if not _CONTAINER.match(name) or "--" in name:
                raise SettingsError(f"{kind.upper()}_CONTAINER", name, "must be a container name: 3-63 lower-case "
                                    "letters, digits and single hyphens, starting with a letter or digit")
        if self.default_max_size and not 64 <= self.default_max_size <= 8192:
            raise SettingsError("DEFAULT_MAX_SIZE", self.default_max_size, "must be 0 (full resolution) or 64 to 8192")
        try:
            parse_style(self.default_style, self.default_strength, False, self.default_temporal)
        except InputError as exc:
            env = {"strength": "DEFAULT_STRENGTH", "temporal": "DEFAULT_TEMPORAL"}.get(exc.field or "", "DEFAULT_STYLE")
            raise SettingsError(env, getattr(self, env.lower()), str(exc)) from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the app settings (names are the ones infra/ sets on the Function App) and check each one;
        a bad one raises :class:`SettingsError` naming it, its value and what is allowed."""
        env = os.environ if env is None else env
        base = cls()

        def get(name: str, default, kind=str):
            value = env.get(name, "").strip()
            if value == "":
                return default
            try:
                return kind(value)
            except ValueError:
                allowed = "must be " + {int: "a whole number", float: "a number"}.get(kind, "a path")
                bounds = next(((lo, hi) for env_name, lo, hi in _RANGES.values() if env_name == name), None)
                raise SettingsError(name, value, f"{allowed} from {bounds[0]:g} to {bounds[1]:g}" if bounds
                                    else allowed) from None

        return replace(
            base,
            storage=get("STYLIZE_STORAGE", base.storage),
            storage_root=get("STYLIZE_STORAGE_ROOT", base.storage_root, Path),
            blob_account_url=get("DATA_STORAGE_ACCOUNT_URL", None),
            blob_connection_string=get("DATA_STORAGE_CONNECTION_STRING", None),
            input_container=get("INPUT_CONTAINER", base.input_container),
            styles_container=get("STYLES_CONTAINER", base.styles_container),
            output_container=get("OUTPUT_CONTAINER", base.output_container),
            work_container=get("WORK_CONTAINER", base.work_container),
            logs_container=get("LOGS_CONTAINER", base.logs_container),
            compute=get("STYLIZE_COMPUTE", base.compute),
            local_workers=get("LOCAL_WORKERS", base.local_workers, int),
            batch_account_url=get("BATCH_ACCOUNT_URL", None),
            batch_pool_id=get("BATCH_POOL_ID", None),
            batch_worker_image=get("BATCH_WORKER_IMAGE", None),
            batch_pool_identity=get("BATCH_POOL_IDENTITY_RESOURCE_ID", None),
            batch_pool_identity_client_id=get("BATCH_POOL_IDENTITY_CLIENT_ID", None),
            segment_seconds=get("SEGMENT_SECONDS", base.segment_seconds, float),
            max_segments=get("MAX_SEGMENTS", base.max_segments, int),
            max_attempts=get("MAX_ATTEMPTS", base.max_attempts, int),
            activity_attempts=get("ACTIVITY_ATTEMPTS", base.activity_attempts, int),
            activity_retry_seconds=get("ACTIVITY_RETRY_SECONDS", base.activity_retry_seconds, float),
            poll_seconds=get("POLL_SECONDS", base.poll_seconds, float),
            queue_check_minutes=get("QUEUE_CHECK_MINUTES", base.queue_check_minutes, float),
            task_timeout_minutes=get("TASK_TIMEOUT_MINUTES", base.task_timeout_minutes, int),
            max_duration_seconds=get("MAX_DURATION_SECONDS", base.max_duration_seconds, float),
            max_frame_side=get("MAX_FRAME_SIDE", base.max_frame_side, int),
            max_frame_rate=get("MAX_FRAME_RATE", base.max_frame_rate, float),
            default_style=get("DEFAULT_STYLE", base.default_style),
            default_strength=get("DEFAULT_STRENGTH", base.default_strength, float),
            default_temporal=get("DEFAULT_TEMPORAL", base.default_temporal, float),
            default_max_size=get("DEFAULT_MAX_SIZE", base.default_max_size, int),
        )


# Numeric settings: field → (app setting, lowest, highest). Durable retries need a first interval above zero;
# the rest keep a typo (minutes for seconds, a stray zero) from making every job fail or never finish.
_RANGES = {
    "local_workers": ("LOCAL_WORKERS", 1, 64),
    "segment_seconds": ("SEGMENT_SECONDS", 1.0, 3600.0),
    "max_segments": ("MAX_SEGMENTS", 1, 100_000),
    "max_attempts": ("MAX_ATTEMPTS", 1, 10),
    "activity_attempts": ("ACTIVITY_ATTEMPTS", 1, 20),
    "activity_retry_seconds": ("ACTIVITY_RETRY_SECONDS", 0.1, 3600.0),
    "poll_seconds": ("POLL_SECONDS", 0.01, 300.0),
    "queue_check_minutes": ("QUEUE_CHECK_MINUTES", 0.001, 24 * 60.0),
    "task_timeout_minutes": ("TASK_TIMEOUT_MINUTES", 1, 7 * 24 * 60),
    "max_duration_seconds": ("MAX_DURATION_SECONDS", 1.0, 7 * 24 * 3600.0),
    "max_frame_side": ("MAX_FRAME_SIDE", 64, 8192),
    "max_frame_rate": ("MAX_FRAME_RATE", 1.0, 1000.0),
}
