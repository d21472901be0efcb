"""N jobs at once on the local host (N = STYLIZE_LOAD_JOBS, default 3): every output exact, no job touching
another's work files, and memory bounded by the number of worker slots, not by the number of jobs.

Run with ``-s`` to see the figures; `make test` runs it with the default N.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.media_helpers import frame_times, make_clip_with_audio
from tests.processes import worker_processes
from tests.stacks import open_stack

JOBS = int(os.environ.get("STYLIZE_LOAD_JOBS", "3"))
WORKERS = 2


def test_jobs_at_once_are_exact_separate_and_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clips = []
    for i in range(JOBS):  # different lengths and styles: a mix-up shows in the frame count or the manifest
        folder = tmp_path / f"clip{i}"
        folder.mkdir()
        clips.append(make_clip_with_audio(folder, "aac", ".mp4", seconds=1.2 + 0.4 * (i % 4)))
    with open_stack("local", tmp_path, monkeypatch, local_workers=WORKERS) as stack:
        for i, clip in enumerate(clips):
            stack.put(clip, f"load/clip{i}.mp4")
        host = psutil.Process()
        host_before = host.memory_info().rss
        seen = {"workers": 0, "processes": 0, "worker_rss": 0, "host_rss": 0, "foreign": set()}
        job_ids: list[str] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                workers = worker_processes(host)
                seen["workers"] = max(seen["workers"], len(stack.running()))
                seen["processes"] = max(seen["processes"], len(workers))
                seen["worker_rss"] = max(seen["worker_rss"], sum(_rss(w) for w in workers))
                seen["host_rss"] = max(seen["host_rss"], host.memory_info().rss)
                owners = {name.split("/")[0] for name in stack.names("work")}
                seen["foreign"] |= owners - {stack.run_id(job_id) for job_id in list(job_ids)}  # of no known run
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        began = time.monotonic()
        with ThreadPoolExecutor(JOBS) as pool:  # the requests arrive together
            job_ids += pool.map(lambda i: stack.start(f"load/clip{i}.mp4", style=str(i % 26)), range(JOBS))
        sampler.start()
        statuses = [stack.wait(job_id, timeout=120 + 60 * JOBS) for job_id in job_ids]
        done.set()
        sampler.join()
        seconds = time.monotonic() - began

        assert len(set(job_ids)) == JOBS
        for i, (clip, status) in enumerate(zip(clips, statuses, strict=True)):
            assert status["runtimeStatus"] == "Completed", status
            out = stack.download("output", f"load/clip{i}.mp4", tmp_path / f"out{i}.mp4")
            assert frame_times(out) == frame_times(clip)
            manifest = stack.svc.storage.read_json(stack.settings.output_container, f"load/clip{i}.json")
            assert (manifest["job_id"], manifest["style"]) == (job_ids[i], str(i % 26))
        assert seen["foreign"] == set()
        assert stack.names("work") == []
        assert 1 <= seen["workers"] <= WORKERS  # N jobs share the worker slots
        assert seen["processes"] <= WORKERS  # counted as the OS sees them, not as the backend thinks
        mib = 1 << 20
        print(f"\n{JOBS} jobs, {WORKERS} worker slots: {seconds:.1f} s; at most {seen['processes']} workers at once, "
              f"{seen['worker_rss'] / mib:.0f} MiB together; host process {host_before / mib:.0f} → "
              f"{seen['host_rss'] / mib:.0f} MiB")
        # ~290 MiB a worker here (torch and the compiled network): the workers' memory is bounded per slot, and
        # would pass this only with at most WORKERS of them alive at once
        assert seen["worker_rss"] < WORKERS * 700 * mib
        # The host keeps orchestration state only: its growth must not scale with video bytes or job count.
        assert seen["host_rss"] - host_before < 150 * mib


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0
