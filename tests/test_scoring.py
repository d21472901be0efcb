"""The scorer layer: the compiled-model wrapper used on CUDA (exercised here on the CPU)."""

from __future__ import annotations

import re

import pytest
import torch

from gpu_worker import weights
from gpu_worker.networks import FrameStylizer
from gpu_worker.scoring import CompiledOnDevice


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return FrameStylizer(weights.build("multistyle26"))


def _frames(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 48, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def test_compiled_model_pads_short_batches_and_matches_eager(net: torch.nn.Module) -> None:
    style = torch.zeros(26)
    style[4] = 1.0
    frames = _frames(3)
    compiled = CompiledOnDevice(net)
    with torch.inference_mode():
        full = compiled(frames, style)
        short = compiled(frames[:2], style)  # the last batch of a task: padded, not recompiled
        eager = net(frames, style)
    assert compiled._compiled is not None
    assert full.shape == (3, 48, 64, 3) and short.shape == (2, 48, 64, 3) and full.dtype == torch.uint8
    assert (full.int() - eager.int()).abs().max() <= 1 and (short.int() - eager[:2].int()).abs().max() <= 1


def test_compiled_model_falls_back_to_eager_when_it_disagrees(net: torch.nn.Module, monkeypatch) -> None:
    # an inductor bug stand-in: the "compiled" model is off by a quarter of the range everywhere
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: lambda f, c: model(f, c) // 4)
    style = torch.zeros(26)
    style[4] = 1.0
    frames = _frames(2)
    compiled = CompiledOnDevice(net)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="running eagerly"):
        out = compiled(frames, style)
    with torch.inference_mode():
        assert torch.equal(out, net(frames, style))
    assert compiled._compiled is None


def _out_of_memory_above(limit: int, calls: list[int]):
    """A scorer's _score that runs out of device memory for pieces over ``limit`` frames, recording each call."""

    def score(frames: torch.Tensor) -> torch.Tensor:
        calls.append(len(frames))
        if len(frames) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return frames.flip(1)  # any per-frame function: the order of the frames is what is checked

    return score


def test_running_out_of_device_memory_halves_the_batch_for_good(monkeypatch) -> None:
    """16 frames where only 4 fit: halved to 8, then 4, with every frame scored once and in order; the next call
    starts at 4 (before, each batch went 16 -> 8 -> 4 again, flushing the allocator every time)."""
    from gpu_worker.scoring import StyleScorer
    from gpu_worker.style_spec import parse_style

    scorer = StyleScorer(parse_style("7", "1", False, 0.0), device="cpu")
    scorer._condition = torch.zeros(26)  # loaded: _score is the stand-in
    scorer.max_batch = 16
    calls: list[int] = []
    monkeypatch.setattr(scorer, "_score", _out_of_memory_above(4, calls))
    frames = _frames(16)
    assert torch.equal(scorer.score(frames), frames.flip(1))
    assert calls == [16, 8, 4, 4, 4, 4] and scorer.max_batch == 4
    calls.clear()
    assert torch.equal(scorer.score(frames[:8]), frames[:8].flip(1))
    assert calls == [4, 4]


def test_one_frame_that_does_not_fit_is_bad_input_not_a_retry(monkeypatch) -> None:
    """An 8K frame on a 16 GB GPU: a one-line reason naming max_size (exit 2), not an internal error that the
    orchestrator retries three times."""
    from gpu_worker.errors import InputError
    from gpu_worker.scoring import StyleScorer
    from gpu_worker.style_spec import parse_style

    scorer = StyleScorer(parse_style("7", "1", False, 0.0), device="cpu")
    scorer._condition = torch.zeros(26)
    monkeypatch.setattr(scorer, "_score", _out_of_memory_above(0, []))
    with pytest.raises(InputError, match="one 64x48 frame does not fit in this GPU's memory") as error:
        scorer.score(_frames(2))
    assert error.value.field == "max_size"


def test_compiled_model_gives_way_to_the_batch_halving_on_out_of_memory(net: torch.nn.Module, monkeypatch) -> None:
    """Out of memory is not a compiler failure: before, it turned torch.compile off for the task, and padded the
    halved batch back up to the size that had not fit."""
    seen: list[int] = []

    def compile_stand_in(model, **kwargs):
        def run(frames, condition):
            seen.append(len(frames))
            if len(frames) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
            return model(frames, condition)
        return run

    monkeypatch.setattr(torch, "compile", compile_stand_in)
    style = torch.zeros(26)
    style[4] = 1.0
    compiled = CompiledOnDevice(net)
    with torch.inference_mode(), pytest.raises(torch.cuda.OutOfMemoryError):
        compiled(_frames(4), style)
    compiled.shrink(2)
    with torch.inference_mode():
        out = compiled(_frames(2), style)
    assert compiled._compiled is not None and seen == [4, 2] and out.shape == (2, 48, 64, 3)


@pytest.mark.parametrize(("device", "capability", "message"), [
    ("cuda:3", (9, 0), "no GPU cuda:3: this machine has 1"),
    ("cuda", (7, 0), "GPU Tesla V100 (compute capability 7.0) is older than this torch build supports (sm_75 and"),
])
def test_a_gpu_that_is_not_there_or_too_old_is_bad_input(device: str, capability: tuple[int, int], message: str,
                                                         monkeypatch) -> None:
    """Both failed later as internal errors, which the orchestrator retries (CUDA 13's torch has no kernels for
    the V100's 7.0: Azure's NCv3 and NDv2 sizes)."""
    from gpu_worker.errors import InputError
    from gpu_worker.scoring import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    with pytest.raises(InputError, match=re.escape(message)):
        resolve_device(device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (8, 9))  # an L4: sm_86 runs on it
    assert resolve_device("cuda") == torch.device("cuda")


def test_processes_sharing_a_gpu_size_their_batches_to_their_share(monkeypatch) -> None:
    """gpu_worker.parallel's processes each measured the free memory at once and each planned for half of it."""
    from gpu_worker.scoring import MEMORY_SHARE_ENV, StyleScorer
    from gpu_worker.style_spec import parse_style

    scorer = StyleScorer(parse_style("7", "1", False, 0.0), device="cpu")
    scorer.torch_device = torch.device("cuda")  # sizing only: nothing runs on it
    scorer.max_batch = 64
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (32 * 2**30, 80 * 2**30))
    alone = scorer.batch_size(1080, 1920)
    monkeypatch.setenv(MEMORY_SHARE_ENV, "4")
    assert scorer.batch_size(1080, 1920) == alone // 4 == 2  # half of 32 GB free over 4 processes, ~2 GB a frame
