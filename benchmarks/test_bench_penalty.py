"""shade_ops.penalty (native CPU op) against the eager reference and torch.compile of it.

    make bench            # or: pytest benchmarks/test_bench_penalty.py --benchmark-json=out.json
    python benchmarks/report.py out.json
"""
from __future__ import annotations

import pytest
import torch

import shade_ops
from shade_ops import ShadeState, reference

from conftest import run_phase

SHAPES = [(128, 64, 16, 16), (4096, 1024)]
PHASES = ["forward", "backward", "forward+backward"]

_compiled_reference = torch.compile(reference.penalty, fullgraph=True)


def _implementation(name: str):
    if name == "shade_ops":
        return lambda y, state: shade_ops.penalty(y, state, backend="cpu")
    if name == "eager":
        return reference.penalty
    return _compiled_reference


@pytest.mark.skipif("cpu" not in shade_ops.available_backends("cpu"),
                    reason="shade_ops._C is not built")
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("implementation", ["shade_ops", "eager", "compile"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_penalty(benchmark, shape, implementation, phase):
    benchmark.group = f"penalty {'x'.join(map(str, shape))} float32 {phase}"
    benchmark.extra_info.update(op="penalty", shape=list(shape), dtype="float32", phase=phase,
                                implementation=implementation)
    y = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    state = ShadeState(shape[1])  # training mode: every call also updates the state
    call = _implementation(implementation)
    run_phase(benchmark, phase, lambda: call(y, state), torch.tensor(0.5))
