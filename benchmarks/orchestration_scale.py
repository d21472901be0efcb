"""Does the orchestration stay small for long videos? History size and replay cost at 100…5000 segments.

    python benchmarks/orchestration_scale.py [--segments 100,1000,3000,5000]

Runs the real `stylize_video` orchestrator in the in-process Durable host with a compute backend that
completes a tenth of the tasks per poll (so the monitor loop ticks ten times) and a probe that reports a
video as long as the segment count needs. Prints, per size: history events and episodes of the last
execution, wall time (activities and timers are instant, so it is mostly replay), and the input size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import function_app
from gpu_worker.media import VideoInfo
from local.durable_host import LocalDurableHost
from pipeline import jobs, runtime
from pipeline.compute import TaskState
from pipeline.jobspec import job_spec, orchestration_input
from pipeline.settings import Settings
from pipeline.storage import LocalStorage


class TenthPerPollCompute:
    """Every task succeeds, a tenth of the submitted ones per poll, and leaves a stand-in output file."""

    def __init__(self, storage: LocalStorage) -> None:
        self.storage = storage
        self.tasks: dict[str, dict[str, TaskState]] = {}
        self.outputs: dict[str, tuple[str, str]] = {}

    def submit(self, job_id: str, tasks: list) -> int:
        known = self.tasks.setdefault(job_id, {})
        new = [t for t in tasks if t.id not in known]
        for task in new:
            known[task.id] = TaskState(task.id, "pending")
            self.outputs[task.id] = (task.output_container, task.output_name)
        return len(new)

    def poll(self, job_id: str) -> dict[str, TaskState]:
        states = self.tasks.get(job_id, {})
        pending = [s for s in states.values() if s.state == "pending"]
        for state in pending[: max(1, len(states) // 10)]:
            state.state, state.summary, state.exit_code = "succeeded", {"frames": 750}, 0
            path = self.storage.path(*self.outputs[state.id])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        return dict(states)

    def cancel(self, job_id: str) -> None:
        pass

    def delete(self, job_id: str) -> None:
        self.tasks.pop(job_id, None)

    def blocker(self) -> str | None:
        return None


def run(segments: int, root: Path) -> dict:
    settings = Settings(storage="local", storage_root=root, poll_seconds=0.01, segment_seconds=30.0,
                        max_segments=10_000, max_duration_seconds=7 * 24 * 3600.0)
    storage = LocalStorage(root)
    runtime._services = jobs.Services(settings, storage, TenthPerPollCompute(storage))
    jobs.probe = lambda source, headers=None: VideoInfo(1920, 1080, 1920, 1080, 0, "1:1", "1/12800", 0.0,
                                                        segments * 30.0, 25.0, segments * 750, "h264", "yuv420p", None)
    (root / "input").mkdir(parents=True, exist_ok=True)
    (root / "input" / "long.mp4").write_bytes(b"0")
    job = job_spec(f"scale-{segments}", "input", "long.mp4", {"style": "7"}, settings)
    with LocalDurableHost(function_app.app, max_workers=8, timer_scale=0) as host:
        started = time.perf_counter()
        host.start("stylize_video", orchestration_input(job, settings), job.job_id)
        status = host.wait(job.job_id, timeout=900)
        wall = time.perf_counter() - started
        history = host.status(job.job_id, show_history=True).get("history") or []
    assert status["runtimeStatus"] == "Completed", status
    episodes = sum(1 for event in history if event.get("EventType") in (12, "OrchestratorStarted"))
    return {"segments": segments, "history_events_last_execution": len(history), "episodes": episodes,
            "wall_seconds": round(wall, 1),
            "submit_activities": -(-segments // jobs.SUBMIT_CHUNK),
            "input_bytes": len(json.dumps(orchestration_input(job, settings)))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", default="100,1000,3000")
    args = parser.parse_args()
    for count in [int(n) for n in args.segments.split(",")]:
        with tempfile.TemporaryDirectory() as root:
            print(json.dumps(run(count, Path(root))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
