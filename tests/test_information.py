"""shade_ops.experiments.information: the binned entropy estimator on distributions whose entropies are
known, and layer_information on real models (every call site, baseline and SHADE alike)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import shade_ops
from shade_ops.experiments.information import binned_entropies, layer_information
from shade_ops.experiments.models import build_model


def test_uniform_on_k_bins_has_entropy_ln_k():
    k, classes = 8, 4
    y = torch.arange(k).repeat(400).double()[:, None]           # each bin equally often
    labels = torch.arange(len(y)) % classes
    e = binned_entropies(y, labels, bins=k)
    assert e["h_y"].item() == pytest.approx(math.log(k), abs=1e-9)


def test_class_determines_y_exactly():
    classes = 5
    labels = torch.arange(5000) % classes
    y = (labels.double() * 3.0 + 1.0)[:, None]                  # Y = f(C), one bin per class
    e = binned_entropies(y, labels, bins=classes)
    assert e["h_y_given_c"].item() == pytest.approx(0.0, abs=1e-12)
    assert e["i_y_c"].item() == pytest.approx(math.log(classes), abs=1e-9)
    assert e["h_y"].item() == pytest.approx(math.log(classes), abs=1e-9)


def test_independent_y_and_c_share_no_information():
    g = torch.Generator().manual_seed(0)
    samples, bins, classes = 200_000, 20, 10
    y = torch.randn(samples, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(classes, (samples,), generator=g)
    e = binned_entropies(y, labels, bins=bins, num_classes=classes)
    # plug-in bias of I: about (bins - 1) (classes - 1) / (2 samples) nats
    assert e["i_y_c"].abs().max().item() < 3 * (bins - 1) * (classes - 1) / (2 * samples)
    assert torch.allclose(e["h_y"], e["h_y_given_c"], atol=2e-3)


def test_mixture_partly_informative():
    # Y is C's bin with probability 1/2, else uniform on 4 bins: H(Y|C) and I known in closed form
    g = torch.Generator().manual_seed(1)
    samples, k = 400_000, 4
    labels = torch.randint(k, (samples,), generator=g)
    noise = torch.randint(k, (samples,), generator=g)
    y = torch.where(torch.rand(samples, generator=g) < 0.5, labels, noise).double()[:, None]
    e = binned_entropies(y, labels, bins=k)
    p = torch.tensor([0.5 + 0.5 / k] + [0.5 / k] * (k - 1))
    expected = -(p * p.log()).sum().item()
    assert e["h_y_given_c"].item() == pytest.approx(expected, abs=5e-3)
    assert e["i_y_c"].item() == pytest.approx(math.log(k) - expected, abs=5e-3)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="samples"):
        binned_entropies(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))


class TwoSites(nn.Module):
    """One ReLU module called at two places: two layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.b(self.relu(self.b.weight.new_ones(1) * self.relu(self.a(x))[:, :5]))


@pytest.mark.parametrize("shade", [False, True], ids=["baseline", "shade"])
def test_every_call_site_is_a_layer(shade):
    torch.manual_seed(0)
    model = TwoSites()
    x, labels = torch.randn(300, 6), torch.randint(3, (300,))
    if shade:
        shade_ops.convert(model, backend="reference")
        model.train()
        model(x[:50])                       # make the states of both call sites
        shade_ops.collect(model)
    rows = layer_information(model, (x, labels), bins=10, batch_size=64)
    assert [r["name"] for r in rows] == ["relu", "relu#1"]
    assert [r["units"] for r in rows] == [5, 5] and all(r["samples"] == 300 for r in rows)
    for r in rows:
        assert r["h_y"] == pytest.approx(r["h_y_given_c"] + r["i_y_c"])
        assert 0 <= r["h_y_given_c"] <= r["h_y"] + 1e-9 <= 5 * math.log(10) + 1e-9
        assert r["var_y_given_z"] > 0
        assert (r["penalty"] is not None) == shade
    assert model.training                   # the mode it was in, restored


def test_pre_activation_is_measured_and_penalty_matches_shade():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), num_classes=3, width=7)
    shade_ops.convert(model, backend="reference")
    x, labels = torch.randn(200, 1, 4, 4), torch.randint(3, (200,))
    model.train()
    model(x)
    shade_ops.collect(model)
    rows = layer_information(model, (x, labels), bins=8)
    assert [r["units"] for r in rows] == [7, 7, 7]
    # the penalty column is SHADE's own (mean reduction) on the same pre-activations, eval mode
    model.eval()
    pre = model.net[1](x.flatten(1))
    state = model.net[2].state
    expected = shade_ops.reference.penalty(pre, state, update=False)
    assert rows[0]["penalty"] == pytest.approx(expected.item(), rel=1e-6)


def test_conv_units_are_channels_and_samples_are_capped():
    torch.manual_seed(0)
    model = build_model("alexnet", (3, 12, 12), width=4)
    x, labels = torch.randn(40, 3, 12, 12), torch.randint(10, (40,))
    rows = layer_information(model, (x, labels), max_samples=1000)
    assert [r["units"] for r in rows] == [4, 8, 8, 32]
    # 10 samples per class and bin: ~1000 kept samples -> 10 bins, 40 images x 3x3 -> 3, the
    # 40-image fully-connected layer -> the least, 2
    assert [r["bins"] for r in rows] == [10, 10, 3, 2]
    assert rows[0]["samples"] <= 1000 + 40 and rows[-1]["samples"] == 40


def test_training_records_information_each_epoch():
    from shade_ops.experiments.data import Dataset, Split
    from shade_ops.experiments.training import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(256, (60, 1, 8, 8), generator=g, dtype=torch.uint8),
                  torch.arange(60) % 3)
    data = Dataset("toy", split, split, split, num_classes=3)
    metrics = train(TrainConfig(model="mlp", width=6, regularizer="shade", epochs=2,
                                batch_size=20, information=True, backend="reference"), data)
    info = metrics["information"]
    assert [r["step"] for r in info] == [0, 3, 6]
    assert all(len(r["layers"]) == 3 for r in info)
    assert "information" not in train(TrainConfig(model="mlp", width=6, epochs=1), data)
