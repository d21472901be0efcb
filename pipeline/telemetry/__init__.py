"""Telemetry to Application Insights: where each job's time went, per stage and per segment, and its failures.

The package, one concern per module:

- ``events``: every record (event names, dimensions, measurements), built from the pipeline's own values.
  Pure; what ``infra/monitoring/*.kql`` reads is defined here.
- ``stages``: the orchestration's stage clock, a pure, replay-safe value the orchestrator keeps in its own
  state (telemetry never writes into it).
- ``hooks``: what the pipeline calls (activities, the compute poll, the orchestrator).
- ``lifecycle``: configure, flush, shutdown, the counters; off unless configured.
- ``exporter``: the only module that imports the SDK (``opencensus-ext-azure``, public API only). Moving
  to the Azure Monitor OpenTelemetry distro means rewriting that module alone (docs/telemetry.md).

Call sites use the names below: ``from pipeline import telemetry`` then ``telemetry.activity(...)``.
"""

from pipeline.telemetry.events import DIMENSIONS, OPERATION_NAME, dimensions
from pipeline.telemetry.hooks import activity, job_canceled, job_completed, job_failed, job_stage, tasks_polled
from pipeline.telemetry.lifecycle import (
    AUTHENTICATION_ENV,
    CONNECTION_ENV,
    configure,
    enabled,
    flush,
    shutdown,
    stats,
)

__all__ = [
    "AUTHENTICATION_ENV",
    "CONNECTION_ENV",
    "DIMENSIONS",
    "OPERATION_NAME",
    "activity",
    "configure",
    "dimensions",
    "enabled",
    "flush",
    "job_canceled",
    "job_completed",
    "job_failed",
    "job_stage",
    "shutdown",
    "stats",
    "tasks_polled",
]
