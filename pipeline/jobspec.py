"""What a job is: the input blob, the style and its options, and where the output goes.

Jobs come from three doors — blob metadata (upload trigger), the HTTP API and the local CLI — and all
three go through :func:`job_spec`, so one set of rules says what is valid.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import PurePosixPath

from gpu_worker.errors import InputError
from gpu_worker.style_spec import parse_flag, parse_strength, parse_style
from pipeline.settings import Settings

MAX_BLOB_NAME = 512
# Names the service takes as videos (the worker then probes the file itself): the usual camera, phone, editing and
# distribution containers that its demuxers read (gpu_worker.media.ALLOWED_FORMATS).
_VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".flv", ".wmv", ".asf",
                   ".mpg", ".mpeg", ".vob", ".3gp", ".3g2", ".mxf", ".ogv")


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    input_container: str
    input_name: str
    style: str
    strength: float
    preserve_color: bool
    temporal: float
    max_size: int
    segment_seconds: float
    output_name: str
    manifest_name: str
    # One run of the job: a job restarted under the same id (POST /api/jobs after it failed or was canceled)
    # is a new run, with its own Batch job, work files and end record, so nothing of the old run can touch it.
    run: str = ""

    @property
    def run_id(self) -> str:
        """The key of this run's compute job, work files and end record."""
        return f"{self.job_id}-{self.run}" if self.run else self.job_id

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> JobSpec:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def check_blob_name(name: object, field: str = "input") -> str:
    """A relative blob name with no traversal, control characters or backslashes."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{field} must be a blob name such as clips/holiday.mp4", field=field)
    if len(name) > MAX_BLOB_NAME:
        raise InputError(f"{field} is longer than {MAX_BLOB_NAME} characters", field=field)
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InputError(f"{field} has control characters", field=field)
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise InputError(f"{field} {name!r} must be a relative name without '..', '.', '//' or backslashes",
                         field=field)
    return name


def instance_id(container: str, name: str, etag: str) -> str:
    """One orchestration per upload: the same event delivered twice maps to the same id, a new upload of the
    same name (new ETag) to a new one. Readable prefix, hash for uniqueness (ids allow 100 characters)."""
    digest = hashlib.sha256(f"{container}/{name}\n{etag.strip(chr(34))}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", PurePosixPath(name).stem).strip("-")[:40] or "video"
    return f"{stem}-{digest}"


def job_spec(
    job_id: str, container: str, name: str, options: Mapping[str, object], settings: Settings
) -> JobSpec:
    """Validate a job's options (HTTP body fields or blob metadata) over the app's defaults."""
    check_blob_name(name, "input")
    if not name.lower().endswith(_VIDEO_SUFFIXES):
        raise InputError(f"input {name!r} does not look like a video (expected one of "
                         f"{', '.join(_VIDEO_SUFFIXES[:5])}, …)", field="input")
    options = {k.lower(): v for k, v in options.items()}
    spec = parse_style(
        options.get("style", settings.default_style),
        options.get("strength", settings.default_strength),
        parse_flag(options.get("preserve_color", False), "preserve_color"),
        options.get("temporal", settings.default_temporal),
    )
    if spec.image is not None:
        if spec.image.startswith(("http://", "https://")):
            # a URL would let any uploader make the workers fetch from anywhere; styles live in storage
            raise InputError(f"style images are names in the '{settings.styles_container}' container, not URLs",
                             field="style")
        check_blob_name(spec.image, "style")
    max_size = _integer(options.get("max_size", settings.default_max_size), "max_size")
    if max_size and not 64 <= max_size <= 8192:
        raise InputError(f"max_size must be 0 (keep the resolution) or 64 to 8192 pixels, got {max_size}",
                         field="max_size")
    segment_seconds = _positive(options.get("segment_seconds", settings.segment_seconds), "segment_seconds")
    output = options.get("output") or f"{PurePosixPath(name).with_suffix('')}.mp4"
    check_blob_name(output, "output")
    if not str(output).lower().endswith(".mp4"):
        raise InputError(f"output must name an .mp4 blob in the '{settings.output_container}' container, got "
                         f"{output!r}", field="output")
    stem = str(PurePosixPath(output).with_suffix(""))
    # one spelling of the suffix: "x.MP4" and "x.mp4" would be two videos sharing one manifest, x.json, so
    # neither the clash check nor a failed publish's clean-up could tell them apart
    output = f"{stem}.mp4"
    return JobSpec(
        job_id=job_id, input_container=container, input_name=name, style=spec.describe(),
        strength=parse_strength(spec.strength), preserve_color=spec.preserve_color, temporal=spec.temporal,
        max_size=max_size,
        segment_seconds=segment_seconds, output_name=output, manifest_name=f"{stem}.json",
    )


def _integer(value: object, field: str) -> int:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{field} must be a whole number, got {value!r}", field=field) from None
    if isinstance(value, bool) or number != int(number):
        raise InputError(f"{field} must be a whole number, got {value!r}", field=field)
    return int(number)


def _positive(value: object, field: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{field} must be a number of seconds, got {value!r}", field=field) from None
    if isinstance(value, bool) or not 1.0 <= number <= 3600.0:
        raise InputError(f"{field} must be between 1 and 3600 seconds, got {value!r}", field=field)
    return number


def orchestration_input(job: JobSpec, settings: Settings) -> dict:
    """The orchestration's input: the job (as a new run) plus the knobs that must not change while it replays."""
    return {"job": replace(job, run=uuid.uuid4().hex[:8]).to_dict(),
            "options": {"max_attempts": settings.max_attempts, "poll_seconds": settings.poll_seconds,
                        "activity_attempts": settings.activity_attempts,
                        "activity_retry_seconds": settings.activity_retry_seconds,
                        "queue_check_minutes": settings.queue_check_minutes}}


def rejected_input(container: str, name: str, error: InputError) -> dict:
    """For an upload whose options are invalid: an orchestration that fails at once with the reason, so the
    uploader sees a Failed job instead of nothing."""
    return {"rejected": {"input": f"{container}/{name}", "message": str(error), "field": error.field}}
