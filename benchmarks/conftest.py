"""Benchmarks share one harness: forward, backward and both, each timed with pytest-benchmark's
pedantic mode so that the backward is timed without its forward."""
from __future__ import annotations

import pytest
import torch


def run_phase(benchmark, phase: str, forward, upstream, rounds: int = 30) -> None:
    """Time `forward()` (a scalar or a tuple of tensors to backprop with `upstream`)."""

    def backward(outputs):
        torch.autograd.backward(outputs, upstream)

    warmup = 3
    if phase == "forward":
        benchmark.pedantic(forward, rounds=rounds, warmup_rounds=warmup)
    elif phase == "backward":
        benchmark.pedantic(backward, setup=lambda: ((forward(),), {}), rounds=rounds,
                           warmup_rounds=warmup)
    else:
        benchmark.pedantic(lambda: backward(forward()), rounds=rounds, warmup_rounds=warmup)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
