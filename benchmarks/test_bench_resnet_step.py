"""What SHADE on every layer adds to a training step: a CIFAR ResNet-20 (three stages of three
basic blocks, 19 ReLUs), batch 64 of 3x32x32 float32, SGD; the same step without SHADE, with the
fused ShadeReLU, and with ShadeReLU on the eager reference.

    pytest benchmarks/test_bench_resnet_step.py --benchmark-json=out.json
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import shade_ops
from shade_ops.models import build_model

BATCH, SIZE = 64, 32
BACKENDS = {"shade_ops": "cpu", "shade-eager": "reference"}


@pytest.mark.skipif("cpu" not in shade_ops.available_backends("cpu"),
                    reason="shade_ops._C is not built")
@pytest.mark.parametrize("implementation", ["shade_ops", "no-shade", "shade-eager"])
def test_resnet_training_step(benchmark, implementation):
    benchmark.group = "ResNet-20 training step"
    benchmark.extra_info.update(op="resnet20_step", shape=[BATCH, 3, SIZE, SIZE],
                                dtype="float32", phase="training step",
                                implementation=implementation)
    torch.manual_seed(0)
    model = build_model("resnet", (3, SIZE, SIZE), 10, blocks=3)
    if implementation != "no-shade":
        shade_ops.convert(model, backend=BACKENDS[implementation])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    target = torch.randint(0, 10, (BATCH,))

    def step():
        loss = nn.functional.cross_entropy(model(x), target) + 1e-3 * shade_ops.collect(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    benchmark.pedantic(step, rounds=8, warmup_rounds=2)
