"""SHADE on models written the way torchvision, timm and transformers write theirs.

Every test runs the unconverted model (same weights) under a TorchFunctionMode that records the
input of every ReLU call, functional or module, and checks that ``collect`` of the converted
model equals the sum over those call sites of ``shade_ops.reference.penalty`` (each site with its
own reference state), with the same parameter gradients and the same per-site states: at the
first step and after the states have moved, in eager and compiled form.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import shade_ops
from shade_ops import ShadeState, reference

from conftest import assert_close

RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu,
                  torch.Tensor.relu_}


class ReluInputs(TorchFunctionMode):
    """Records the input of every ReLU call (before an in-place one overwrites it)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in RELU_FUNCTIONS:
            self.inputs.append(args[0].clone())
        return func(*args, **(kwargs or {}))


# ---- the models ---------------------------------------------------------------------------

def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one inplace ReLU module called twice, a residual add."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: one ReLU module called three times at three widths' worth of
    layers."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = conv3x3(3, 8), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(Bottleneck(8, 4, 12, stride=2))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def shared_relu_sequential() -> nn.Sequential:
    relu = nn.ReLU()
    return nn.Sequential(nn.Linear(4, 6), relu, nn.Linear(6, 5), relu, nn.Linear(5, 3))


class EncoderBlock(nn.Module):
    """A transformer encoder block: (N, L, D) activations, units last."""

    def __init__(self, d: int = 8, heads: int = 2, hidden: int = 12) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def forward(self, x):
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.mlp(x))


class FunctionalCNN(nn.Module):
    """ReLUs as functions: F.relu, torch.relu, Tensor.relu_ in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        y = self.fc(x.flatten(1))
        y.relu_()
        return y


def resnet_input(step: int, size: int = 8) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(step))


def mlp_input(step: int) -> torch.Tensor:
    return torch.randn(7, 4, generator=torch.Generator().manual_seed(step)) * 2


def sequence_input(step: int) -> torch.Tensor:
    length = (5, 7, 6)[step % 3]  # a new sequence length at every step
    return torch.randn(3, length, 8, generator=torch.Generator().manual_seed(step))


# ---- the check ----------------------------------------------------------------------------

def site_states(model: nn.Module) -> list[ShadeState]:
    """Every call site's state, module by module (call order, in these models)."""
    return [s for m in model.modules() if isinstance(m, (shade_ops.ShadeReLU,
                                                           shade_ops.ShadePenalty))
            for s in m.states]


def assert_matches_reference(make_model, convert, make_input, unit_dim=1, steps=3,
                             compile_model=False, expected_sites=None):
    """Train-mode steps of the converted model against the unconverted one plus the reference
    penalty at every recorded ReLU call site, each with its own reference state: collect, the
    parameter gradients and the per-site states agree at every step."""
    torch.manual_seed(0)
    plain = make_model()
    converted = convert(copy.deepcopy(plain))
    run = torch.compile(converted, fullgraph=True) if compile_model else converted
    reference_states: list[ShadeState] = []

    def close(actual, expected, kind, what):
        if not compile_model:
            return assert_close(actual, expected, torch.float32, kind, what)
        # inductor fuses the convolutions and norms in another order: float32 rounding apart
        scale = max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m: f"{what}: {m}")

    for step in range(steps):
        x = make_input(step)
        with ReluInputs() as recorder:
            out_plain = plain(x)
        sites = recorder.inputs
        while len(reference_states) < len(sites):
            reference_states.append(ShadeState(sites[len(reference_states)].shape[unit_dim]))
        expected = sum(reference.penalty(y, state, unit_dim=unit_dim)
                       for y, state in zip(sites, reference_states))
        out = run(x)
        total = shade_ops.collect(converted)
        close(out, out_plain, "grad", f"step {step} output")
        close(total, expected, "penalty", f"step {step} collect")
        (out_plain.square().mean() + 0.5 * expected).backward()
        (out.square().mean() + 0.5 * total).backward()
        for (name, a), b in zip(converted.named_parameters(), plain.parameters()):
            close(a.grad, b.grad, "grad", f"step {step} {name}")
        states = site_states(converted)
        assert len(states) == len(reference_states), "a state per call site"
        for i, (state, ref) in enumerate(zip(states, reference_states)):
            close(state.mu, ref.mu, "state", f"step {step} site {i} mu")
            close(state.p, ref.p, "state", f"step {step} site {i} p")
    if expected_sites is not None:
        assert len(reference_states) == expected_sites
    return converted


# ---- shared activations ---------------------------------------------------------------------

@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_resnet_blocks_reusing_one_relu(compile_model):
    """torchvision's pattern: 7 ReLU modules serve 1 + 2 * 2 + 3 = 8 call sites."""
    torch._dynamo.reset()
    model = assert_matches_reference(TinyResNet, shade_ops.convert, resnet_input,
                                     compile_model=compile_model, expected_sites=8)
    sites = shade_ops.call_sites(model)
    assert sites["layer1.0.relu"] == [8, 8] and sites["layer2.0.relu"] == [4, 4, 12]


@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_sequential_holding_one_relu_twice(compile_model):
    torch._dynamo.reset()
    model = assert_matches_reference(shared_relu_sequential, shade_ops.convert, mlp_input,
                                     compile_model=compile_model, expected_sites=2)
    assert model[1] is model[3] and isinstance(model[1], shade_ops.ShadeReLU)
    assert shade_ops.call_sites(model)["1"] == [6, 5]  # two widths, no unit-count error
    assert set(model.state_dict()) >= {"1.state.mu", "1.extra_states.0.mu"}


@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_functional_relus_through_convert_fx(compile_model):
    torch._dynamo.reset()
    model = assert_matches_reference(FunctionalCNN, shade_ops.convert_fx, resnet_input,
                                     compile_model=compile_model, expected_sites=3)
    assert list(shade_ops.call_sites(model).values()) == [[6], [4], [3]]


def test_convert_fx_gives_each_module_call_its_own_shade_relu():
    model = shade_ops.convert_fx(TinyResNet())
    layers = [m for m in model.modules() if isinstance(m, shade_ops.ShadeReLU)]
    assert len(layers) == 8 and not any(type(m) is nn.ReLU for m in model.modules())
    assert_matches_reference(TinyResNet, shade_ops.convert_fx, resnet_input, expected_sites=8)


def test_convert_on_functional_relus_warns_instead_of_training_without_shade():
    model = FunctionalCNN()
    with pytest.warns(UserWarning, match="convert_fx"):
        shade_ops.convert(model)
    with pytest.warns(UserWarning, match="computed no SHADE penalty"):
        model(resnet_input(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(resnet_input(1))  # once


def test_convert_fx_refuses_an_untraceable_model_with_advice():
    class Branchy(nn.Module):
        def forward(self, x):
            return F.relu(x) if x.sum() > 0 else x

    with pytest.raises(RuntimeError, match="concrete_args"):
        shade_ops.convert_fx(Branchy())


# ---- units last ---------------------------------------------------------------------------

@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_transformer_block_units_last_over_changing_lengths(compile_model):
    torch._dynamo.reset()
    assert_matches_reference(EncoderBlock, lambda m: shade_ops.convert(m, unit_dim=-1),
                             sequence_input, unit_dim=-1, compile_model=compile_model,
                             expected_sites=1)


def test_ambiguous_3d_activations_are_refused_with_both_choices():
    model = shade_ops.convert(EncoderBlock())
    with pytest.raises(ValueError, match=r"unit_dim=1 or unit_dim=-1") as error:
        model(sequence_input(0))
    assert "(N, L, D)" in str(error.value) and "(N, C, L)" in str(error.value)
    assert shade_ops.call_sites(model) == {"mlp.1": []}  # nothing made


def test_changed_unit_count_names_unit_dim():
    state = ShadeState(16)
    with pytest.raises(ValueError, match="pass unit_dim=-1"):
        shade_ops.penalty(torch.randn(2, 24, 16), state)


def test_known_width_decides_3d_units():
    act = shade_ops.ShadeReLU(num_units=8)
    act(torch.randn(2, 5, 8))
    act(torch.randn(2, 7, 8))
    assert act.state.num_units == 8


def test_given_width_holds_at_every_call_site():
    class TwoWidths(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 6)
            self.act = shade_ops.ShadeReLU(num_units=8)

        def forward(self, x):
            return self.act(self.fc2(self.act(self.fc1(x))))  # a second call site, 6 wide

    model = shade_ops.track(TwoWidths())
    with pytest.raises(ValueError, match="num_units=8"):
        model(torch.randn(2, 4))


# ---- several forwards, one backward ---------------------------------------------------------

def test_several_forwards_before_one_backward_collect_after_each():
    """Siamese models and multi-crop: collect returns the last forward's penalties, so collect
    after each forward and add them; the state is updated by each forward, in order."""
    torch.manual_seed(0)
    model = shade_ops.convert(shared_relu_sequential())
    states = [ShadeState(6), ShadeState(5)]
    a, b = mlp_input(0), mlp_input(1)
    total = 0
    for x in (a, b):
        model(x)
        total = total + shade_ops.collect(model)
    expected = 0
    with ReluInputs() as recorder:
        for x in (a, b):
            model.eval()
            model(x)  # eval: a plain model, to record the site inputs
    model.train()
    for i, y in enumerate(recorder.inputs):
        expected = expected + reference.penalty(y, states[i % 2])
    assert_close(total, expected, torch.float32, "penalty")
    for state, ref in zip(site_states(model), states):
        assert_close(state.mu, ref.mu, torch.float32, "state")


def test_forward_without_collect_is_warned_about_once():
    model = shade_ops.convert(shared_relu_sequential())
    model(mlp_input(0))
    with pytest.warns(UserWarning, match="never collected"):
        model(mlp_input(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(mlp_input(2))


def test_untracked_layer_called_twice_is_an_error_at_collect():
    class HandBuilt(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(4, 6), nn.Linear(6, 6), shade_ops.ShadeReLU()

        def forward(self, x):
            return self.act(self.fc2(self.act(self.fc1(x))))

    model = HandBuilt()
    model(mlp_input(0))
    with pytest.raises(RuntimeError, match="shade_ops.track"):
        shade_ops.collect(model)
    shade_ops.track(model)
    model(mlp_input(1))
    assert len(shade_ops.collect(model).shape) == 0
    assert shade_ops.call_sites(model) == {"act": [6, 6]}
