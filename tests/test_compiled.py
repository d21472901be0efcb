"""Networks compiled once per machine: correct at any frame size, reused by later processes, rebuilt when
what they were built for changes, and never trusted when damaged."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gpu_worker import compiled, weights
from gpu_worker.networks import FrameStylizer
from tests.media_helpers import make_clip

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", compiled.TRANSFORMERS)
@pytest.mark.parametrize("size", [(8, 8), (61, 97), (272, 640)])
def test_the_compiled_network_matches_eager_at_sizes_it_was_not_built_for(name: str, size: tuple[int, int]) -> None:
    """Built once with symbolic height and width (the machine's artifact, as `make` prepares it); frames whose
    sides are not a multiple of 4 are padded and cropped as the network itself does."""
    net = compiled.load(name)
    assert net is not None
    eager = FrameStylizer(weights.build(name))
    condition = torch.rand(compiled.CONDITION_SIZE[name], generator=torch.Generator().manual_seed(1))
    condition /= condition.sum()
    frames = torch.randint(0, 256, (2, *size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got, want = net(frames, condition), eager(frames, condition)
    assert got.shape == want.shape == frames.shape and got.dtype == torch.uint8
    assert (got.int() - want.int()).abs().max().item() <= 1  # float32 noise can flip a rounding, no more
    assert (got.int() - frames.int()).abs().float().mean() > 10  # and it is stylized, not passed through


def test_frames_too_small_for_the_compiled_network_run_eagerly() -> None:
    assert compiled.CompiledNetwork.accepts(8, 8)
    assert not compiled.CompiledNetwork.accepts(6, 640) and not compiled.CompiledNetwork.accepts(16, 8200)


def test_a_second_task_reuses_the_artifact_and_compiles_nothing(tmp_path: Path) -> None:
    clip = make_clip(tmp_path, "bframes", seconds=1, size="96x64")
    artifact = compiled.artifact_path("multistyle26")
    compiled.load("multistyle26")  # present, as after `make`
    before = (artifact.stat().st_mtime_ns, sorted(p.name for p in artifact.parent.iterdir()))
    summaries = []
    for i in range(2):
        done = subprocess.run([sys.executable, "-m", "gpu_worker", "stylize", str(clip), str(tmp_path / f"{i}.mp4"),
                               "-s", "7", "--device", "cpu", "--json"], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert "compiling" not in done.stderr
        summaries.append(json.loads(done.stdout))
    assert [s["network"] for s in summaries] == ["compiled (cached)"] * 2
    assert all(s["frames"] == 25 and s["first_frame_seconds"] > 0 for s in summaries)
    assert (artifact.stat().st_mtime_ns, sorted(p.name for p in artifact.parent.iterdir())) == before


def test_the_artifact_is_keyed_by_torch_cpu_and_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    here = compiled.artifact_path("multistyle26")
    assert compiled.artifact_path("arbitrary_transform") != here
    monkeypatch.setattr(compiled, "cpu_fingerprint", lambda: "x86_64|another cpu|avx2 fma")
    assert compiled.artifact_path("multistyle26") != here
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert compiled.artifact_path("multistyle26") != here
    monkeypatch.undo()
    monkeypatch.setattr(weights, "cache_key", lambda name: f"{name}-other-weights")
    assert compiled.artifact_path("multistyle26") != here


def test_a_damaged_artifact_is_removed_and_the_network_runs_eagerly(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_WORKER_COMPILED", str(tmp_path))
    path = compiled.artifact_path("multistyle26")
    path.write_bytes(b"not a package")
    said: list[str] = []
    assert compiled.load("multistyle26", build=False, announce=said.append) is None
    assert not path.exists()
    assert len(said) == 1 and "could not be loaded" in said[0] and "eagerly" in said[0]


def test_a_failed_build_leaves_nothing_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_WORKER_COMPILED", str(tmp_path))

    def broken(name: str, path: Path) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "_build", broken)
    said: list[str] = []
    assert compiled.load("multistyle26", announce=said.append) is None
    assert said[-1] == "compiling multistyle26 failed (RuntimeError: no C++ compiler); running it eagerly"
    assert not compiled.artifact_path("multistyle26").exists()


def test_processes_racing_to_build_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock is a file lock, so it holds between processes as between these threads."""
    monkeypatch.setenv("GPU_WORKER_COMPILED", str(tmp_path))
    builds: list[str] = []

    def slow_build(name: str, path: Path) -> None:
        builds.append(name)
        time.sleep(0.5)
        path.write_bytes(b"built")

    monkeypatch.setattr(compiled, "_build", slow_build)
    said: list[str] = []
    threads = [threading.Thread(target=compiled.prepare, args=(("multistyle26",), said.append)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == ["multistyle26"]
    assert sum("waiting for another process" in line for line in said) == 2
    assert compiled.artifact_path("multistyle26").read_bytes() == b"built"
