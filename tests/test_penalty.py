"""Every fused backend against shade_ops.reference: penalty, gradient and state, over shapes,
layouts, dtypes and reductions."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shade_ops
from shade_ops import ShadeState, reference

from conftest import FUSED_BACKENDS, SLOW_BACKENDS, assert_close, random_activations


@dataclass(frozen=True)
class Case:
    """An activation tensor to test: its shape, units dim and memory layout."""

    name: str
    shape: tuple
    unit_dim: int = 1
    layout: str = "contiguous"  # contiguous, channels_last, sliced, transposed

    def make(self, dtype: torch.dtype, seed: int) -> torch.Tensor:
        if self.layout == "sliced":  # every other unit, every third sample: strides, no copy
            base_shape = (self.shape[0], 2 * self.shape[1], 3 * self.shape[2])
            y = random_activations(base_shape, dtype, seed)[:, ::2, ::3]
        elif self.layout == "transposed":  # (C, N) stored, (N, C) seen
            y = random_activations(self.shape[::-1], dtype, seed).t()
        else:
            y = random_activations(self.shape, dtype, seed)
            if self.layout == "channels_last":
                fmt = torch.channels_last if y.dim() == 4 else torch.channels_last_3d
                y = y.contiguous(memory_format=fmt)
        assert tuple(y.shape) == self.shape, (y.shape, self.shape)
        return y.detach().requires_grad_()

    @property
    def num_units(self) -> int:
        return self.shape[self.unit_dim]


SMALL_CASES = [
    Case("ncl", (37, 5, 23)),                                # units with runs (B > 1)
    Case("nc", (61, 33)),                                    # units innermost (B == 1)
    Case("nchw", (3, 5, 4, 6)),
    Case("nchw-channels-last", (3, 5, 4, 6), layout="channels_last"),
    Case("ncdhw", (2, 3, 4, 3, 5)),
    Case("ncdhw-channels-last", (2, 3, 4, 3, 5), layout="channels_last"),
    Case("seq-units-last", (4, 6, 7, 3), unit_dim=-1),
    Case("n1", (1, 7, 9)),
    Case("sliced", (6, 5, 7), layout="sliced"),
    Case("transposed", (19, 11), layout="transposed"),
    Case("one-element", (1, 1)),
    Case("units-first", (7, 4), unit_dim=0),
]
LARGE_CASES = [
    Case("nc-many-chunks", (517, 37)),
    Case("nc-wide", (40, 1000)),
    Case("ncl-long-runs", (64, 19, 1500)),
    Case("one-unit", (3, 1, 7000)),
    Case("nchw-channels-last-big", (16, 24, 15, 13), layout="channels_last"),
    Case("nchw-big", (8, 16, 33, 17)),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def compare_steps(backend: str, case: Case, dtype: torch.dtype, reduction: str = "mean",
                  steps: int = 3) -> None:
    """Penalty, gradient (random upstream) and state after each of `steps` updates."""
    fused_state, reference_state = ShadeState(case.num_units), ShadeState(case.num_units)
    for step in range(steps):
        y_fused, y_ref = case.make(dtype, step), case.make(dtype, step)
        fused = shade_ops.penalty(y_fused, fused_state, unit_dim=case.unit_dim,
                                  reduction=reduction, backend=backend)
        expected = reference.penalty(y_ref, reference_state, unit_dim=case.unit_dim,
                                     reduction=reduction)
        where = f"{backend} {case.name} step {step}"
        assert fused.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert fused.dim() == 0
        assert_close(fused, expected, dtype, "penalty", where)

        upstream = torch.randn((), dtype=fused.dtype, generator=torch.Generator().manual_seed(step))
        (grad_fused,) = torch.autograd.grad(fused, y_fused, upstream)
        (grad_ref,) = torch.autograd.grad(expected, y_ref, upstream)
        assert grad_fused.dtype == dtype and grad_fused.shape == y_fused.shape
        if case.layout != "sliced":  # a dense y gets its own memory format back
            assert grad_fused.stride() == y_fused.stride(), where
        assert_close(grad_fused, grad_ref, dtype, "grad", where)

        assert_close(fused_state.p, reference_state.p, dtype, "state", where + " p")
        assert_close(fused_state.mu, reference_state.mu, dtype, "state", where + " mu")


def _cases_for(backend: str) -> list[Case]:
    return SMALL_CASES if backend in SLOW_BACKENDS else SMALL_CASES + LARGE_CASES


@pytest.mark.parametrize("case", SMALL_CASES + LARGE_CASES, ids=lambda c: c.name)
def test_float32_matches_reference(backend, case):
    if case not in _cases_for(backend):
        pytest.skip(f"{backend} is tested on the small shapes only")
    compare_steps(backend, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", [SMALL_CASES[0], SMALL_CASES[3], LARGE_CASES[0],
                                  LARGE_CASES[2], LARGE_CASES[4]], ids=lambda c: c.name)
def test_other_dtypes_match_reference(backend, case, dtype):
    if case not in _cases_for(backend):
        pytest.skip(f"{backend} is tested on the small shapes only")
    compare_steps(backend, case, dtype)


@pytest.mark.parametrize("case", [SMALL_CASES[0], SMALL_CASES[1]], ids=lambda c: c.name)
def test_sum_reduction_matches_reference(backend, case):
    compare_steps(backend, case, torch.float32, reduction="sum", steps=2)


@pytest.mark.parametrize("case", [SMALL_CASES[0], SMALL_CASES[3], SMALL_CASES[6]],
                         ids=lambda c: c.name)
def test_fused_relu_matches_reference(backend, case):
    """relu_penalty: relu(y) and the penalty from one pass, one backward for both outputs."""
    fused_state, reference_state = ShadeState(case.num_units), ShadeState(case.num_units)
    for step in range(2):
        y_fused, y_ref = case.make(torch.float32, step), case.make(torch.float32, step)
        out, value = shade_ops.relu_penalty(y_fused, fused_state, unit_dim=case.unit_dim,
                                            backend=backend)
        out_ref, value_ref = reference.relu_penalty(y_ref, reference_state,
                                                    unit_dim=case.unit_dim)
        assert out.stride() == y_fused.stride()
        assert_close(out, out_ref, torch.float32, "grad", "relu(y)")
        assert_close(value, value_ref, torch.float32, "penalty")
        g = torch.Generator().manual_seed(step)
        grad_out = torch.randn(out.shape, generator=g)
        grad_value = torch.randn((), generator=g)
        (grad,) = torch.autograd.grad((out, value), y_fused, (grad_out, grad_value))
        (grad_ref,) = torch.autograd.grad((out_ref, value_ref), y_ref, (grad_out, grad_value))
        assert_close(grad, grad_ref, torch.float32, "grad", f"{backend} {case.name}")
        assert_close(fused_state.mu, reference_state.mu, torch.float32, "state")


@st.composite
def activations(draw):
    dims = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=dims, max_size=dims)))
    unit_dim = draw(st.integers(-dims, dims - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**16))
    return random_activations(shape, torch.float32, seed, scale), unit_dim


@pytest.mark.parametrize("fused_backend", FUSED_BACKENDS)
def test_property_random_shapes_and_values(fused_backend):
    examples = 8 if fused_backend in SLOW_BACKENDS else 60

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(activations(), st.sampled_from(["mean", "sum"]))
    def check(sample, reduction):
        y, unit_dim = sample
        y_fused, y_ref = y.clone().requires_grad_(), y.clone().requires_grad_()
        states = [ShadeState(y.shape[unit_dim]) for _ in range(2)]
        fused = shade_ops.penalty(y_fused, states[0], unit_dim=unit_dim, reduction=reduction,
                                  backend=fused_backend)
        expected = reference.penalty(y_ref, states[1], unit_dim=unit_dim, reduction=reduction)
        assert_close(fused, expected, torch.float32, "penalty")
        (grad,) = torch.autograd.grad(fused, y_fused)
        (grad_ref,) = torch.autograd.grad(expected, y_ref)
        assert_close(grad, grad_ref, torch.float32, "grad")
        assert_close(states[0].mu, states[1].mu, torch.float32, "state")
        assert_close(states[0].p, states[1].p, torch.float32, "state")

    check()


def test_gradcheck_float64(backend):
    # no exact zeros: finite differences across relu's kink disagree with any derivative
    y = random_activations((5, 3, 4), torch.float64, seed=3, zeros=0).requires_grad_()
    state = ShadeState(3, dtype=torch.float64)
    state.mu.copy_(torch.tensor([[-0.5, 0.2, -1.0], [1.5, 0.7, 2.0]], dtype=torch.float64))
    for reduction in ("mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda t: shade_ops.penalty(t, state, update=False, reduction=reduction,
                                        backend=backend), (y,))
        assert torch.autograd.gradcheck(
            lambda t: shade_ops.relu_penalty(t, state, update=False, reduction=reduction,
                                             backend=backend), (y,))


def test_reference_gradient_is_spec_section_3():
    """The reference's autograd gradient equals SPEC section 3's closed form."""
    y = random_activations((23, 4, 5), torch.float64, seed=5).requires_grad_()
    state = ShadeState(4, dtype=torch.float64)
    value = reference.penalty(y, state, update=False)
    (grad,) = torch.autograd.grad(value, y)
    mu0, mu1 = (state.mu[z].view(1, 4, 1) for z in (0, 1))
    q = torch.exp(-torch.relu(y))
    s = 1 - q
    ds = torch.where(y > 0, torch.exp(-y), torch.zeros_like(y))
    closed = (ds * ((y - mu1) ** 2 - (y - mu0) ** 2) + 2 * (s * (y - mu1) + q * (y - mu0))) / 115
    torch.testing.assert_close(grad, closed.detach())


# ---- bad input: one exception type per kind of mistake, before any kernel runs ---------------

def _replaced(name: str, value: torch.Tensor) -> ShadeState:
    """A 3-unit state with buffer ``name`` replaced (what a load or a hand edit can do)."""
    state = ShadeState(3)
    setattr(state, name, value)
    return state


BAD_STATES = [  # (the state, the exception, the message)
    (lambda: _replaced("mu", torch.zeros(5, 3)), ValueError,
     r"must both have shape \(2, num_units\), here \(2, 3\) for y's 3 units; got mu \(5, 3\)"),
    (lambda: _replaced("mu", torch.zeros(2, 5)), ValueError, r"got mu \(2, 5\)"),
    (lambda: _replaced("mu", torch.zeros(6)), ValueError, r"got mu \(6,\)"),
    (lambda: _replaced("p", torch.full((2, 5), 0.5)), ValueError,  # ShadeReLU: its site's count
     r"got p \(2, 5\)|y has 3 units along dim 1 .* but the state has 5"),
    (lambda: _replaced("mu", torch.zeros(2, 3, dtype=torch.int64)), TypeError,
     "the state's mu must be a floating-point tensor, got torch.int64"),
    (lambda: _replaced("p", torch.zeros(2, 3, device="meta")), ValueError,
     "the state's p is on meta but its mu on cpu"),
    (lambda: ShadeState(5), ValueError, "y has 3 units along dim 1 .* but the state has 5"),
]


@pytest.mark.parametrize("make_state, error, message", BAD_STATES,
                         ids=["mu-5x3", "mu-2x5", "mu-1d", "p-2x5", "mu-int", "p-meta",
                              "another-size"])
@pytest.mark.parametrize("call", ["penalty", "relu_penalty", "reference", "ShadeReLU"])
def test_a_state_of_the_wrong_shape_is_a_value_error_and_stays_unchanged(backend, make_state,
                                                                          error, message, call):
    """Not the kernel's RuntimeError (or, for the reference, a broadcast): the Python checks
    catch it, and the state is left as it was."""
    state = make_state()
    before = {name: t.clone() for name, t in state.named_buffers()}
    y = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(error, match=message):
        if call == "penalty":
            shade_ops.penalty(y, state, backend=backend)
        elif call == "relu_penalty":
            shade_ops.relu_penalty(y, state, backend=backend)
        elif call == "reference":
            reference.penalty(y, state)
        else:
            act = shade_ops.ShadeReLU(3, backend=backend)
            act.state = state
            act(y)
    for name, t in state.named_buffers():
        assert t.device.type == "meta" or torch.equal(t, before[name]), f"{name} changed"


@pytest.mark.parametrize("unit_dim", ["1", 1.0, True, None, torch.tensor(1)],
                         ids=["str", "float", "bool", "None", "tensor"])
def test_a_unit_dim_of_the_wrong_type_is_a_type_error_everywhere(unit_dim):
    y = torch.randn(4, 3)
    state = ShadeState(3)
    before = {name: t.clone() for name, t in state.named_buffers()}
    for call in (shade_ops.penalty, shade_ops.relu_penalty, reference.penalty,
                 reference.relu_penalty):
        with pytest.raises(TypeError, match=r"unit_dim must be an int, got"):
            call(y, state, unit_dim=unit_dim)
    if unit_dim is not None:  # None is ShadeReLU's "choose for me"
        with pytest.raises(TypeError, match="unit_dim must be an int"):
            shade_ops.ShadeReLU(unit_dim=unit_dim)
        act = shade_ops.ShadeReLU(3)
        act.unit_dim = unit_dim  # set after construction: checked at the forward
        with pytest.raises(TypeError, match="unit_dim must be an int"):
            act(y)
    for name, t in state.named_buffers():
        assert torch.equal(t, before[name])


def test_a_unit_dim_out_of_range_stays_a_value_error():
    with pytest.raises(ValueError, match=r"unit_dim=2 is out of range for a tensor of 2 dims "
                                         r"\(shape \(4, 3\)\)"):
        shade_ops.penalty(torch.randn(4, 3), ShadeState(3), unit_dim=2)
