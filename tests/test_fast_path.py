"""The fast path of a SHADE layer (modules._Plan): a call like the last checked call of its site
skips the checks and runs the same op on the same arguments. Here: it is taken (the checks run
once per site, not once per call), its results are bitwise those of the checked path and agree
with shade_ops.reference, and every change that the checks would see sends the call back through
them (so bad input still gets the checked path's exception). Also the batched state update that
ends a tracked forward (``update_states``)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import shade_ops
from shade_ops import ShadeReLU, ShadeState, modules, reference

from conftest import assert_close, random_activations

pytestmark = pytest.mark.skipif(shade_ops._ops.NATIVE_OPS is None,
                                reason="the fast path runs the native CPU ops")


class Block(nn.Module):
    """torchvision's BasicBlock pattern: one inplace ReLU called twice, a residual add."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        return self.relu(self.conv2(out) + x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.block = Block()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 5 * 5, 7), nn.ReLU(),
                                  nn.Linear(7, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return shade_ops.convert(Net())


def batch(seed: int, n: int = 4) -> torch.Tensor:
    return random_activations((n, 3, 5, 5), seed=seed)


class CheckCount:
    """How many times the checked path's input checks ran."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        original = modules.check_inputs

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(modules, "check_inputs", counted)

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward and backward: the penalty, and the gradients of the input and the weights."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    penalty = shade_ops.collect(model)
    (out.square().sum() + penalty).backward()
    return penalty.detach(), [x.grad] + [p.grad for p in model.parameters()]


def states(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for s in model.modules() if isinstance(s, ShadeState) for t in (s.p, s.mu)]


def sites(model: nn.Module) -> int:
    return sum(len(m.states) for m in model.modules() if isinstance(m, ShadeReLU))


def test_checks_run_once_per_site_then_the_plans_are_taken(monkeypatch):
    count = CheckCount(monkeypatch)
    model = net()
    step(model, batch(0))
    assert count.take() == sites(model) == 4  # stem, the block's relu twice, head
    for seed in range(1, 4):
        step(model, batch(seed))
        assert count.take() == 0
    layer = ShadeReLU()  # a layer called on its own (no tracked model) has the fast path too
    for seed in range(3):
        layer(random_activations((2, 5), seed=seed))
    assert count.take() == 1


def test_planned_steps_equal_checked_steps_bitwise_and_the_reference(monkeypatch):
    fast, checked = net(), net()
    for seed in range(4):
        checked_result = None
        with monkeypatch.context() as patch:
            patch.setattr(modules._ShadeLayer, "_plan", lambda *args: None)  # no plan: all checked
            checked_result = step(checked, batch(seed))
        fast_result = step(fast, batch(seed))
        assert torch.equal(fast_result[0], checked_result[0])
        for a, b in zip(fast_result[1], checked_result[1]):
            assert torch.equal(a, b)
        for a, b in zip(states(fast), states(checked)):
            assert torch.equal(a, b)
    assert all(layer._plans for layer in fast.modules() if isinstance(layer, ShadeReLU))
    assert not any(layer._plans for layer in checked.modules() if isinstance(layer, ShadeReLU))


def test_a_planned_layer_agrees_with_the_reference_call_after_call():
    layer = ShadeReLU(5)
    expected = ShadeState(5)
    for seed in range(4):
        y = random_activations((3, 5, 2, 2), seed=seed).requires_grad_()
        y_ref = y.detach().clone().requires_grad_()
        out = layer(y)
        (out.sum() + layer.penalty).backward()
        value = reference.penalty(y_ref, expected)
        (torch.relu(y_ref).sum() + value).backward()
        assert_close(layer.penalty.detach(), value.detach(), torch.float32, "penalty")
        assert_close(y.grad, y_ref.grad, torch.float32, "grad")
        assert_close(layer.state.mu, expected.mu, torch.float32, "state", "mu")
        assert_close(layer.state.p, expected.p, torch.float32, "state", "p")
    assert layer._plans


def planned_layer(monkeypatch) -> tuple[ShadeReLU, CheckCount]:
    layer = ShadeReLU()
    layer(random_activations((2, 4, 3, 3)))
    count = CheckCount(monkeypatch)
    layer(random_activations((2, 4, 3, 3), seed=1))
    assert count.take() == 0 and layer._plans
    return layer, count


@pytest.mark.parametrize("y, error, match", [
    (torch.randn(2, 5, 3, 3), ValueError, "5 units along dim 1"),
    (torch.ones(2, 4, 3, 3, dtype=torch.int64), TypeError, "floating-point"),
    (torch.randn(2, 4, 3, 3, dtype=torch.float64).to(torch.float8_e4m3fn)
     if hasattr(torch, "float8_e4m3fn") else torch.ones(2, 4, 3, 3, dtype=torch.int8),
     TypeError, "float|floating"),
])
def test_bad_input_after_a_plan_gets_the_checked_paths_exception(monkeypatch, y, error, match):
    layer, count = planned_layer(monkeypatch)
    before = states(layer)
    with pytest.raises(error, match=match):  # messages of the checked path only
        layer(y)
    for a, b in zip(states(layer), before):
        assert torch.equal(a, b)  # nothing updated


def check_against_reference(layer: ShadeReLU, y: torch.Tensor, unit_dim: int = 1) -> None:
    """One call of ``layer`` against the reference from a copy of its state."""
    expected = copy.deepcopy(layer.state)
    out = layer(y)
    value = reference.penalty(y, expected, unit_dim=unit_dim, reduction=layer.reduction)
    assert torch.equal(out, torch.relu(y))
    assert_close(layer.penalty.detach(), value.detach(), y.dtype, "penalty")
    assert_close(layer.state.mu, expected.mu, y.dtype, "state", "mu")


@pytest.mark.parametrize("change", [
    "channels_last", "float64_input", "reduction", "double_module", "assign_load", "new_state",
    "no_grad", "checkpoint", "recompute_relu",
])
def test_a_change_goes_back_through_the_checks(monkeypatch, change):
    layer, count = planned_layer(monkeypatch)
    y = random_activations((2, 4, 3, 3), seed=2)
    if change == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    elif change == "float64_input":
        y = y.double()
    elif change == "reduction":
        layer.reduction = "sum"
    elif change == "double_module":
        layer.double()
        y = y.double()
    elif change == "assign_load":
        saved = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.load_state_dict(saved, assign=True)
    elif change == "new_state":
        layer.state = ShadeState(4)
    if change == "no_grad":
        with torch.no_grad():
            check_against_reference(layer, y)
    elif change == "checkpoint":
        x = y.clone().requires_grad_()
        expected = copy.deepcopy(layer.state)
        out = checkpoint(layer, x, use_reentrant=False)
        (out.sum() + layer.penalty).backward()
        x_ref = y.clone().requires_grad_()
        (torch.relu(x_ref).sum() + reference.penalty(x_ref, expected)).backward()
        assert_close(x.grad, x_ref.grad, torch.float32, "grad")
        assert_close(layer.state.mu, expected.mu, torch.float32, "state")
    elif change == "recompute_relu":
        with shade_ops.recompute_relu():
            check_against_reference(layer, y)
    else:
        check_against_reference(layer, y)
    assert count.take() == 1


def test_eval_mode_and_sync_states_take_no_plan():
    layer = ShadeReLU(4).eval()
    layer(torch.randn(2, 4))
    assert not layer._plans
    synced = ShadeReLU(4, sync=True)
    synced(torch.randn(2, 4))
    assert not synced._plans


def test_three_dims_without_unit_dim_are_checked_every_call(monkeypatch):
    # (N, C, L) with unit_dim=None is resolved from the number of units at every call: a later
    # input whose last dim also has that many units is ambiguous, and must be refused
    layer = ShadeReLU(4)
    layer(torch.randn(2, 4, 3))
    layer(torch.randn(2, 4, 3))
    assert not layer._plans
    with pytest.raises(ValueError, match="unit_dim"):
        layer(torch.randn(2, 4, 4))
    given = ShadeReLU(4, unit_dim=1)
    given(torch.randn(2, 4, 3))
    assert given._plans


def test_copies_and_pickles_start_without_plans():
    model = net()
    step(model, batch(0))
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layers = [m for m in copied.modules() if isinstance(m, ShadeReLU)]
        assert not any(layer._plans for layer in layers)
        before = states(copied)
        step(copied, batch(1))
        step(model, batch(1))
        assert all(layer._plans for layer in layers)
        for a, b in zip(states(copied), states(model)):
            assert torch.equal(a, b)
        assert any(not torch.equal(a, b) for a, b in zip(states(copied), before))
        # the copy's plans hold the copy's states, not the original's
        for layer in layers:
            for plan in layer._plans.values():
                assert any(plan.state is s for s in layer.states)
        model = net()
        step(model, batch(0))


def test_a_layer_pickled_before_plans_existed_still_runs():
    layer = ShadeReLU()
    layer(torch.randn(2, 3))
    del layer.__dict__["_plans"]  # as unpickled from an older shade_ops
    assert not layer._plans  # the class's empty, read-only default
    layer(torch.randn(2, 3))
    assert layer._plans and "_plans" in layer.__dict__
    assert not modules._ShadeLayer._plans


def test_functional_relu_models_keep_their_plans_per_graph_site():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 5)

        def forward(self, x):
            return F.relu(self.b(F.relu(self.a(x))))

    model = shade_ops.convert_fx(Functional())
    for seed in range(3):
        (model(random_activations((4, 3), seed=seed)).sum() + shade_ops.collect(model)).backward()
    layers = [m for m in model.modules() if isinstance(m, ShadeReLU)]
    assert len(layers) == 2 and all(layer._plans for layer in layers)


def test_update_states_is_update_state_for_each():
    torch.manual_seed(0)
    p = [torch.rand(2, 3), torch.rand(2, 4, dtype=torch.float64), torch.rand(2, 2)]
    mu = [torch.randn(2, 3), torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 2)]
    sums = [torch.rand(4, 3) + 1, torch.rand(4, 4, dtype=torch.float64) + 1,
            torch.tensor([[float("nan"), 1.0], [1.0, 1.0], [1.0, 1.0], [2.0, 2.0]])]
    decays = [0.8, 0.5, 0.9]
    expected_p, expected_mu = [t.clone() for t in p], [t.clone() for t in mu]
    for args in zip(expected_p, expected_mu, sums, decays):
        torch.ops.shade_ops.update_state(*args)
    torch.ops.shade_ops.update_states(p, mu, sums, decays)
    for a, b in zip(p + mu, expected_p + expected_mu):
        assert torch.equal(a, b)
    assert torch.equal(p[2][:, 0], expected_p[2][:, 0])  # the non-finite unit kept its state
    with pytest.raises(RuntimeError, match="one entry per state"):
        torch.ops.shade_ops.update_states(p, mu[:2], sums, decays)


@pytest.mark.parametrize("change", ["double_module", "new_state", "reduction"])
def test_after_a_change_the_next_call_is_planned_again(monkeypatch, change):
    layer, count = planned_layer(monkeypatch)
    dtype = torch.float64 if change == "double_module" else torch.float32
    if change == "double_module":
        layer.double()
    elif change == "new_state":
        layer.state = ShadeState(4)
    else:
        layer.reduction = "sum"
    for seed in range(3):
        layer(random_activations((2, 4, 3, 3), dtype, seed=seed))
    assert count.take() == 1  # the first call after the change only
    assert layer._plans[0].state is layer.state and layer._plans[0].dtype is dtype


def test_a_rebuilt_module_list_is_seen():
    # del on an nn.ModuleList rebuilds its _modules: the plans of the sites it held must not
    # keep the states that left it
    layer = ShadeReLU()
    model = shade_ops.track(nn.Sequential(layer, layer, layer))
    for _ in range(2):
        model(torch.randn(2, 3))
        shade_ops.collect(model)
    assert set(layer._plans) == {0, 1, 2}
    dropped = layer.extra_states[1]
    del layer.extra_states[1]
    assert not layer._plans[2].fits(layer, torch.randn(2, 3))
    assert all(plan.state is not dropped for site, plan in layer._plans.items() if site < 2)


def test_a_bool_or_float_unit_dim_is_refused_after_a_plan(monkeypatch):
    layer, _ = planned_layer(monkeypatch)
    for bad in (True, 1.0):
        layer.unit_dim = bad
        with pytest.raises(TypeError, match="unit_dim must be an int"):
            layer(random_activations((2, 4, 3, 3)))


def test_data_parallel_replicas_get_plans_of_their_own():
    layer = ShadeReLU()
    layer(torch.randn(2, 3))
    replica = layer._replicate_for_data_parallel()
    assert replica._plans == {} and replica._plans is not layer._plans
    assert layer._plans


def test_zero_units_and_a_zero_tensor_gradient():
    y = torch.randn(3, 0, 4)
    value, sums, out, _ = torch.ops.shade_ops.relu_penalty_forward(y, torch.zeros(2, 0), "mean")
    assert value.item() == 0 and sums.shape == (4, 0) and out.shape == y.shape
    y = random_activations((2, 3, 4))
    mu = ShadeState(3).mu
    zero = torch._efficientzerotensor((), dtype=torch.float32)
    go = torch.randn(2, 3, 4)
    grad = torch.ops.shade_ops.penalty_backward(zero, y, mu, "mean", go)
    assert torch.equal(grad, torch.where(y > 0, go, 0))
    negated = torch.tensor(0.5)._neg_view()
    grad = torch.ops.shade_ops.penalty_backward(negated, y, mu, "mean", None)
    expected = reference.penalty_grad(torch.tensor(-0.5), y, mu, "mean")
    assert_close(grad, expected, torch.float32, "grad")


def test_updates_keep_their_order_around_a_state_that_is_not_batched():
    # a reference-backend update between two native ones: applied in order
    from shade_ops.functional import apply_updates
    shared = ShadeState(3)
    other = ShadeState(3)
    sums = [torch.rand(4, 3) + 1 for _ in range(3)]
    expected = copy.deepcopy(shared)
    native = shade_ops._ops.NATIVE_OPS
    reference.apply_update(expected, sums[0])
    reference.apply_update(expected, sums[1])
    reference.apply_update(expected, sums[2])
    apply_updates([(native, shared, sums[0]), (None, shared, sums[1]), (native, other, sums[0]),
                   (native, shared, sums[2])])
    assert_close(shared.mu, expected.mu, torch.float32, "state")
    assert_close(shared.p, expected.p, torch.float32, "state")


def checked_steps(model: nn.Module, inputs, monkeypatch) -> list:
    """The same steps through the checked path only (no plans), for comparison."""
    results = []
    with monkeypatch.context() as patch:
        patch.setattr(modules._ShadeLayer, "_plan", lambda *args: None)
        for layer in model.modules():
            if isinstance(layer, ShadeReLU):
                layer.__dict__["_plans"] = {}
        for x in inputs:
            results.append(step(model, x))
    return results


def test_planned_eager_steps_then_torch_compile_with_a_new_input_size(monkeypatch):
    # plans made in eager; then the model compiled (dynamo must neither use nor guard on them)
    # and run at two batch sizes; against the same steps through the checked path
    model = net()
    expected_model = copy.deepcopy(model)
    inputs = [batch(0), batch(1), batch(2, n=6), batch(3, n=3)]
    for x in inputs[:2]:
        step(model, x)
    assert all(layer._plans for layer in model.modules() if isinstance(layer, ShadeReLU))
    compiled = torch.compile(model, dynamic=True)
    results = [step(compiled, x) for x in inputs[2:]]
    expected = checked_steps(expected_model, inputs, monkeypatch)[2:]
    for (value, grads), (expected_value, expected_grads) in zip(results, expected):
        assert_close(value, expected_value, torch.float32, "penalty")
        for g, e in zip(grads, expected_grads):
            assert_close(g, e, torch.float32, "grad")
    for a, b in zip(states(model), states(expected_model)):
        assert_close(a, b, torch.float32, "state")


def test_deepcopy_mid_step_then_both_train_as_the_checked_path(monkeypatch):
    # an EMA-style copy between the forward and the backward of a planned step
    model = net()
    step(model, batch(0))
    x = batch(1).requires_grad_()
    out = model(x)
    copied = copy.deepcopy(model)
    (out.square().sum() + shade_ops.collect(model)).backward()
    for seed in (2, 3):
        step(model, batch(seed))
        step(copied, batch(seed))
    expected_model = net()
    expected = checked_steps(expected_model, [batch(0), batch(1), batch(2), batch(3)],
                             monkeypatch)
    assert_close(shade_ops.collect(model).detach(), expected[-1][0], torch.float32, "penalty")
    for a, b in zip(states(model), states(expected_model)):
        assert_close(a, b, torch.float32, "state")
    # the copy was taken after step 1's forward (its update applied), so it matches too
    for a, b in zip(states(copied), states(expected_model)):
        assert_close(a, b, torch.float32, "state")
