"""The experiments' architectures under convert + collect: SHADE on every layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import shade_ops
from shade_ops.experiments.models import MODELS, build_model


def _small(name: str) -> dict:
    return {"width": 8} if name in ("mlp", "alexnet", "inception") else {"width": 4}


@pytest.mark.parametrize("in_shape", [(3, 28, 28), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", MODELS)
def test_convert_puts_shade_on_every_layer(name, in_shape):
    torch.manual_seed(0)
    model = build_model(name, in_shape, **_small(name))
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert relus >= 3
    shade_ops.convert(model)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, shade_ops.ShadeReLU)]
    assert len(layers) == relus

    x = torch.randn(5, *in_shape)
    logits = model(x)
    assert logits.shape == (5, 10)
    assert all(layer.penalty is not None for layer in layers), "a ShadeReLU did not run"
    penalty = shade_ops.collect(model)
    assert penalty.dim() == 0 and torch.isfinite(penalty) and penalty.item() > 0
    (nn.functional.cross_entropy(logits, torch.arange(5)) + 0.01 * penalty).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        model(x)
    assert shade_ops.collect(model).item() == 0


@pytest.mark.parametrize("name", MODELS)
def test_dropout_layers(name):
    assert not any(isinstance(m, nn.Dropout) for m in build_model(name, **_small(name)).modules())
    with_dropout = build_model(name, dropout=0.5, **_small(name))
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in with_dropout.modules())


def test_penalty_gradient_reaches_first_layer():
    torch.manual_seed(0)
    model = shade_ops.convert(build_model("mlp", (1, 28, 28), width=16))
    model(torch.randn(8, 1, 28, 28))
    shade_ops.collect(model).backward()
    assert model.net[1].weight.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="alexnet"):
        build_model("vgg")
    with pytest.raises(ValueError, match="dropout"):
        build_model("mlp", dropout=1.0)
