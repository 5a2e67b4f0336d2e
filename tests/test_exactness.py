"""Exact arithmetic whatever the distance between the state's means (SPEC section 5: "the penalty
is a sum of non-negative terms and every backend computes it without cancellation").

Every fused backend, in every input dtype, against a float64 computation of the reference on the
same input values upcast: the penalty within a relative error of 1e-4 (float32 accumulation) and
the gradient within a relative L2 error set by the dtype it is rounded to. The inputs are those
where the old arithmetic, (y - mu1)^2 + q (a y + b), cancelled: y near mu0 with mu1 far away, and
tiny positive y, where s = 1 - exp(-y) computed as 1 - q loses its relative accuracy. Then non-finite
values (±1e30, ±inf, NaN), where every backend must give what the reference gives.
"""
from __future__ import annotations

import pytest
import torch

import shade_ops
from shade_ops import ShadeState, reference

from conftest import SLOW_BACKENDS

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Penalty: relative error; gradient: relative L2 error. Both are computed in float32 from the
# upcast values (float64 for float64), and the gradient is rounded to the input's dtype.
PENALTY_RTOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 1e-4,
                torch.float16: 1e-4}
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2,
             torch.float16: 2e-3}
GAPS = [1.0, 1e2, 1e3, 1e4]  # |mu1 - mu0|


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shapes(backend: str) -> list[tuple]:
    """(A, C) and (A, C, B): units innermost and units with runs, the two walks of every backend
    (the interpreter gets small ones). C = 19 and B = 257 reach the CPU kernel's vector lanes and
    its scalar tail."""
    if backend in SLOW_BACKENDS:
        return [(61, 19), (3, 2, 150)]
    return [(1024, 19), (16, 3, 257)]


def _state(mu: torch.Tensor, dtype: torch.dtype = torch.float32) -> ShadeState:
    state = ShadeState(mu.shape[1], dtype=dtype)
    with torch.no_grad():
        state.mu.copy_(mu)
    return state


def _relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def check_against_float64(backend: str, y: torch.Tensor, mu: torch.Tensor, what: str) -> None:
    """Penalty and gradient of `backend` on y (its own dtype) against the reference in float64 on
    the same values, with mu as (2, C) float32."""
    dtype = y.dtype
    y_fused = y.detach().clone().requires_grad_()
    y_exact = y.detach().double().requires_grad_()
    value = shade_ops.penalty(y_fused, _state(mu), update=False, backend=backend)
    expected = reference.penalty(y_exact, _state(mu, torch.float64), update=False)
    error = abs(value.item() - expected.item()) / expected.item()
    assert error < PENALTY_RTOL[dtype], (
        f"{what}: penalty {value.item():.9g}, float64 reference {expected.item():.9g}, "
        f"relative error {error:.3g}")

    # a random upstream gradient, scaled to make the largest gradient about 100: inside float16's
    # range, and its normal numbers
    (grad_exact,) = torch.autograd.grad(expected, y_exact)
    u = torch.rand((), generator=torch.Generator().manual_seed(y.numel()), dtype=torch.float64)
    upstream = (0.5 + 0.5 * u) * 100 / grad_exact.abs().max()
    grad_exact = grad_exact * upstream
    (grad,) = torch.autograd.grad(value, y_fused, upstream.to(value.dtype))
    assert grad.dtype == dtype
    error = _relative_l2(grad, grad_exact)
    assert error < GRAD_RTOL[dtype], f"{what}: gradient relative L2 error {error:.3g}"


def _near(mu: torch.Tensor, shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """mu (a scalar or one value per unit) plus noise of 0.01, or of a few of the dtype's steps
    where those are larger: bfloat16 would round mu + 0.01 n to mu itself, and the penalty to
    q (y - mu0)^2 with q = exp(-99.5), which float32 cannot hold to 1e-4."""
    mu = mu.double().view(1, -1, *[1] * (len(shape) - 2))
    scale = torch.clamp(2 * torch.finfo(dtype).eps * mu.abs(), min=0.01)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (mu + scale * noise).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_far_apart_means(backend, dtype):
    """mu = (-0.5, -0.5 + gap) and the reverse, y = mu0 + 0.01 n and y = mu1 + 0.01 n: with the
    old arithmetic gap = 1e2 gave a 4% error, 1e3 2.4x, 1e4 a negative penalty."""
    for shape in _shapes(backend):
        C = shape[1]
        for gap in GAPS:
            for order in ("mu0 < mu1", "mu0 > mu1"):
                low, high = -0.5, -0.5 + gap
                mu = torch.tensor([[low] * C, [high] * C] if order == "mu0 < mu1"
                                  else [[high] * C, [low] * C])
                for near in (0, 1):
                    y = _near(mu[near], shape, dtype, seed=int(gap) + near)
                    what = f"{backend} {shape} {_dtype_id(dtype)} gap {gap:g}, {order}, " \
                           f"y near mu{near}"
                    check_against_float64(backend, y, mu, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_tiny_positive_activations(backend, dtype):
    """y in (t, 1.1 t) for t from 1e-6 to 1e-3 with mu1 far: s = 1 - exp(-y) ~ y must keep its
    relative accuracy, as s (y - mu1)^2 is most of the penalty (1 - q loses it: 3% at 1e-6)."""
    for shape in _shapes(backend):
        C = shape[1]
        for mu1 in (1e2, 1e4):
            mu = torch.tensor([[-0.5] * C, [mu1] * C])
            for tiny in (1e-6, 1e-5, 1e-4, 1e-3):
                u = torch.rand(shape, generator=torch.Generator().manual_seed(int(1 / tiny)),
                               dtype=torch.float64)
                y = tiny * (1 + 0.1 * u)
                what = f"{backend} {shape} {_dtype_id(dtype)} mu1 {mu1:g}, y ~ {tiny:g}"
                check_against_float64(backend, y.to(dtype), mu, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
def test_probabilities_keep_their_relative_accuracy(backend, dtype):
    """With one sample per unit the batch sums are s and q y themselves: s = 1 - exp(-y) and
    q = exp(-y) within a few units of the dtype's precision, relative, from y = 1e-30 (where
    1 - q would be 0) through the switch from the small-y form of s (about 0.25-0.35) to 80."""
    y = torch.cat([torch.logspace(-30, -1, 61, dtype=torch.float64),
                   torch.linspace(0.2, 0.4, 81, dtype=torch.float64),
                   torch.linspace(0.5, 80.0, 97, dtype=torch.float64)]).to(dtype)
    units = y.numel()
    ops = shade_ops._ops.resolve_backend(backend, y.device)
    _, sums, _ = ops.forward(y.view(1, units), torch.zeros(2, units, dtype=dtype), "sum")
    exact = y.double()
    bound = 8 * torch.finfo(dtype).eps
    for name, value, expected in (("s", sums[0], -torch.expm1(-exact)),
                                  ("q", sums[2] / y, torch.exp(-exact))):
        error = ((value.double() - expected) / expected).abs()
        assert error.max() <= bound, (
            f"{backend} {_dtype_id(dtype)}: {name} off by {error.max().item():.3g} (relative) "
            f"at y = {y[error.argmax()].item():.9g}")


def _wide_batch(shape, seed: int) -> torch.Tensor:
    """Half the samples of every unit near -0.5, half near 1e4."""
    g = torch.Generator().manual_seed(seed)
    low = -0.5 + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)
    high = 1e4 + 100 * torch.randn(shape, generator=g, dtype=torch.float64)
    return torch.where(torch.rand(shape, generator=g) < 0.5, low, high)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_means_driven_apart_by_data(backend, dtype):
    """Training steps on wide-range activations drive mu1 - mu0 past 1e3 through the backend's
    own update (checked against the reference's); then a batch near mu0 and one of tiny positive
    values are exact against float64."""
    shape = _shapes(backend)[0]
    C = shape[1]
    state, expected_state = ShadeState(C), ShadeState(C)
    for step in range(4):
        y = _wide_batch(shape, seed=step).to(dtype)
        shade_ops.penalty(y, state, backend=backend)
        reference.penalty(y, expected_state)
    torch.testing.assert_close(state.mu, expected_state.mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.p, expected_state.p, rtol=1e-5, atol=1e-5)
    gap = state.mu[1] - state.mu[0]
    assert (gap > 1e3).all(), f"the data did not drive the means apart: {gap}"

    mu = state.mu.detach().clone()
    what = f"{backend} {_dtype_id(dtype)} trained to mu = {mu.tolist()}"
    check_against_float64(backend, _near(mu[0], shape, dtype, seed=10), mu, f"{what}, y ~ mu0")
    tiny = 1e-5 * (1 + torch.rand(shape, generator=torch.Generator().manual_seed(11),
                                  dtype=torch.float64))
    check_against_float64(backend, tiny.to(dtype), mu, f"{what}, tiny y")


def _assert_same_values(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                        what: str) -> None:
    """NaN where the reference has NaN, the same infinities, and the finite values close."""
    actual, expected = actual.detach().double(), expected.detach().double()
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = test(actual) != test(expected)
        assert not differ.any(), (
            f"{what}: {name} at {differ.nonzero().tolist()[:4]} in one and not the other: "
            f"{actual[differ].tolist()[:4]} against the reference's "
            f"{expected[differ].tolist()[:4]}")
    actual, expected = actual[torch.isfinite(expected)], expected[torch.isfinite(expected)]
    rtol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 1.6e-2)
    scale = max([1.0, *expected.abs().max(0, keepdim=True).values.tolist()]) if expected.numel() \
        else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("bad", [1e30, -1e30, float("inf"), -float("inf"), float("nan")],
                         ids=["1e30", "-1e30", "inf", "-inf", "nan"])
def test_non_finite_values_match_reference(backend, dtype, bad):
    """One unit holds a huge or non-finite value: penalty, gradient and the fused ReLU's
    gradient are what the reference gives, NaN and infinities included (1e30 squared overflows
    float32, and 0 * inf is NaN, in the reference as in the kernels)."""
    y = torch.linspace(-2.0, 3.0, 6 * 4 * 5, dtype=torch.float64).view(6, 4, 5)
    y[2, 1, 3] = bad
    y = y.to(dtype)
    mu = torch.tensor([[-0.5, -1.0, 0.25, -2.0], [1.5, 1.0, 3.0, 0.5]])
    for call in ("penalty", "relu_penalty"):
        y_fused, y_ref = y.clone().requires_grad_(), y.clone().requires_grad_()
        state, expected_state = _state(mu), _state(mu)
        fn = getattr(shade_ops, call)
        fn_ref = getattr(reference, call)
        out = fn(y_fused, state, update=False, backend=backend)
        out_ref = fn_ref(y_ref, expected_state, update=False)
        value, value_ref = (out[1], out_ref[1]) if call == "relu_penalty" else (out, out_ref)
        what = f"{backend} {call} {_dtype_id(dtype)} with {bad}"
        _assert_same_values(value, value_ref, dtype, what + " (penalty)")
        upstream = torch.tensor(0.75, dtype=value.dtype)
        if call == "relu_penalty":
            grad_out = torch.linspace(-1, 1, y.numel(), dtype=dtype).view(y.shape)
            (grad,) = torch.autograd.grad(out, y_fused, (grad_out, upstream))
            (grad_ref,) = torch.autograd.grad(out_ref, y_ref, (grad_out, upstream))
        else:
            (grad,) = torch.autograd.grad(value, y_fused, upstream)
            (grad_ref,) = torch.autograd.grad(value_ref, y_ref, upstream)
        _assert_same_values(grad, grad_ref, dtype, what + " (gradient)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_huge_state_means_match_reference(backend, dtype):
    """State means so large that the squared distances overflow float32 while their difference,
    (mu0 - mu1) (d1 + d0), does not (a state no training would reach, but one the state can
    hold): what the reference gives, NaN and inf included."""
    y = torch.linspace(-2.0, 3.0, 6 * 4 * 5, dtype=dtype).view(6, 4, 5)
    mu = torch.tensor([[-0.5, -2e19, 0.25, -2.0], [1.5, 2e19, 3.0, 0.5]])
    y_fused, y_ref = y.clone().requires_grad_(), y.clone().requires_grad_()
    value = shade_ops.penalty(y_fused, _state(mu), update=False, backend=backend)
    value_ref = reference.penalty(y_ref, _state(mu), update=False)
    what = f"{backend} {_dtype_id(dtype)} mu = (-2e19, 2e19)"
    _assert_same_values(value, value_ref, dtype, what + " (penalty)")
    (grad,) = torch.autograd.grad(value, y_fused)
    (grad_ref,) = torch.autograd.grad(value_ref, y_ref)
    _assert_same_values(grad, grad_ref, dtype, what + " (gradient)")
