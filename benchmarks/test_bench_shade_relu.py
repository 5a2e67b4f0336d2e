"""ShadeReLU (relu and the penalty fused, one pass each way) against nn.ReLU alone and against
nn.ReLU followed by the eager reference penalty, float32 at (128, 64, 16, 16).

    pytest benchmarks/test_bench_shade_relu.py --benchmark-json=out.json
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import shade_ops
from shade_ops import ShadeState, reference

from conftest import run_phase

SHAPE = (128, 64, 16, 16)
PHASES = ["forward", "backward", "forward+backward"]


def _forward(implementation: str):
    """A callable returning the (activation, penalty) outputs of one layer, and the upstream."""
    if implementation == "shade_ops":
        act = shade_ops.ShadeReLU(SHAPE[1], backend="cpu")
        return lambda y: (act(y), act.penalty)
    if implementation == "relu":
        relu = nn.ReLU()
        return lambda y: (relu(y),)
    relu, state = nn.ReLU(), ShadeState(SHAPE[1])
    return lambda y: (relu(y), reference.penalty(y, state))


@pytest.mark.skipif("cpu" not in shade_ops.available_backends("cpu"),
                    reason="shade_ops._C is not built")
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("implementation", ["shade_ops", "relu", "relu+eager"])
def test_shade_relu(benchmark, implementation, phase):
    benchmark.group = f"ShadeReLU {'x'.join(map(str, SHAPE))} float32 {phase}"
    benchmark.extra_info.update(op="shade_relu", shape=list(SHAPE), dtype="float32", phase=phase,
                                implementation=implementation)
    y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).requires_grad_()
    grad_out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    forward = _forward(implementation)
    upstream = (grad_out,) if implementation == "relu" else (grad_out, torch.tensor(0.01))
    run_phase(benchmark, phase, lambda: forward(y), upstream)
