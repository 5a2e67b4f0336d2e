"""Exact arithmetic whatever the distance between the state's means (SPEC section 5: "the penalty
is a sum of non-negative terms and every backend computes it without cancellation").

Every fused backend, in every input dtype, against a float64 computation of the reference on the
same input values upcast: the penalty within a relative error of 1e-4 (float32 accumulation) and
the gradient within a relative L2 error set by the dtype it is rounded to. The inputs are those
where the old arithmetic, (y - mu1)^2 + q (a y + b), cancelled: y near mu0 with mu1 far away, and
tiny positive y, where s = 1 - exp(-y) computed as 1 - q loses its relative accuracy. Then non-finite
values (±1e30, ±inf, NaN), where every backend must give what the reference gives.

Last, every backend and the reference itself against SPEC's formulas as written, evaluated in
numpy's extended precision: the gradient at |mu| up to 1e6 (where d1 + d0 times mu0 - mu1 lost
accuracy in proportion to |mu|), and values that overflow float32 (a penalty that overflows is
+inf, not NaN; a gradient that fits is finite).
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

import shade_ops
from shade_ops import ShadeState, reference

from conftest import FUSED_BACKENDS, SLOW_BACKENDS, random_activations

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


# ---- against SPEC in extended precision: far-apart means, overflow -------------------------

ALL_BACKENDS = ["reference", *FUSED_BACKENDS]
SCALES = [1e2, 1e3, 1e4, 1e5, 1e6]  # mu = (-s, s) and its variants
# max |grad - exact| / max |exact|. A 16-bit gradient is the float32 one rounded: within half its
# step, eps / 2 of the largest gradient, of it.
MAX_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12,
            torch.bfloat16: torch.finfo(torch.bfloat16).eps / 2 + 1e-5,
            torch.float16: torch.finfo(torch.float16).eps / 2 + 1e-5}
EXTENDED = np.longdouble
EXTENDED_EPS = float(np.finfo(EXTENDED).eps)
# (shape, unit_dim): NCHW (runs of 259: the CPU kernel's vector lanes and scalar tail) and units
# last (19 units), then smaller ones for the interpreter
LAYOUTS = {"nchw": (((4, 3, 7, 37), 1), ((2, 3, 5, 7), 1)),
           "units-last": (((29, 5, 19), -1), ((3, 5, 19), -1))}


def _layout(name: str, backend: str) -> tuple[tuple, int]:
    return LAYOUTS[name][backend in SLOW_BACKENDS]


def _spec_in_extended(y: torch.Tensor, mu: torch.Tensor, unit_dim: int, reduction: str,
                      upstream: float, grad_out: torch.Tensor | None = None):
    """(penalty, upstream * d penalty / d y [+ grad_out * (y > 0)]) of SPEC sections 2 and 3 as
    written, in numpy's extended precision (a 64-bit significand on x86, where 1e30 squared is
    finite), the difference of squares in exact arithmetic, as a float and float64 tensors (the
    penalty may be over float32's largest value)."""
    x = y.detach().double().movedim(unit_dim, -1).numpy().astype(EXTENDED)  # (..., C)
    mu0, mu1 = mu.detach().double().numpy().astype(EXTENDED)
    r = np.maximum(x, 0)
    q, s = np.exp(-r), -np.expm1(-r)
    ds = np.where(x > 0, q, 0)
    d1, d0 = x - mu1, x - mu0
    count = x.size // x.shape[-1]
    terms = s * d1 ** 2 + q * d0 ** 2
    w = EXTENDED(upstream) / count if reduction == "mean" else EXTENDED(upstream)
    penalty = terms.sum() / count if reduction == "mean" else terms.sum()
    grad = w * (ds * _difference_of_squares(x, mu0, mu1) + 2 * (s * d1 + q * d0))
    if grad_out is not None:
        grad = grad + grad_out.double().movedim(unit_dim, -1).numpy().astype(EXTENDED) * (x > 0)
    grad = torch.from_numpy(grad.astype(np.float64)).movedim(-1, unit_dim)
    return float(penalty), grad


def _difference_of_squares(x: np.ndarray, mu0: np.ndarray, mu1: np.ndarray) -> np.ndarray:
    """(x - mu1)^2 - (x - mu0)^2 in exact rational arithmetic, rounded: at |mu| = 1e20 the
    squares are 1e40, and even a 64-bit significand leaves them an error of 1e21."""
    exact = [float((Fraction(float(v)) - Fraction(float(m1))) ** 2
                   - (Fraction(float(v)) - Fraction(float(m0))) ** 2)
             for v, m0, m1 in zip(x.flat, np.broadcast_to(mu0, x.shape).flat,
                                  np.broadcast_to(mu1, x.shape).flat)]
    return np.array(exact, dtype=EXTENDED).reshape(x.shape)


def _value_and_grad(backend: str, y: torch.Tensor, mu: torch.Tensor, unit_dim: int, relu: bool,
                    upstream: float, reduction: str = "mean", grad_out=None):
    y_ = y.detach().clone().requires_grad_()
    state = _state(mu)
    if relu:
        out, value = shade_ops.relu_penalty(y_, state, unit_dim=unit_dim, reduction=reduction,
                                            update=False, backend=backend)
        (grad,) = torch.autograd.grad((out, value), y_,
                                      (grad_out, torch.tensor(upstream, dtype=value.dtype)))
    else:
        value = shade_ops.penalty(y_, state, unit_dim=unit_dim, reduction=reduction,
                                  update=False, backend=backend)
        (grad,) = torch.autograd.grad(value, y_, torch.tensor(upstream, dtype=value.dtype))
    assert grad.dtype == y.dtype
    return value, grad


def _far_means(scale: float, C: int) -> dict[str, torch.Tensor]:
    """mu = (-s, s), its reverse, and an asymmetric pair whose midpoint float32 rounds."""
    pairs = {"(-s, s)": (-scale, scale), "(s, -s)": (scale, -scale),
             "(-0.6 s - 0.3, 1.3 s + 0.37)": (-0.6 * scale - 0.3, 1.3 * scale + 0.37)}
    return {name: torch.tensor([[mu0] * C, [mu1] * C]) for name, (mu0, mu1) in pairs.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("relu", [False, True], ids=["penalty", "relu_penalty"])
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"s{s:.0e}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_at_far_apart_means(backend, dtype, scale, relu, layout):
    """y ~ N(0, 3^2), mu = (-s, s) and variants, s up to 1e6: max |grad - exact| within 1e-5 of
    max |exact| in float32 (the sum (y - mu1) + (y - mu0) times mu0 - mu1 gave 5e-3 at s = 1e5 and
    up to 0.1 at 1e6, the reference's autograd as much), with a random upstream gradient of the
    penalty and, for the fused ReLU, a random grad_out."""
    if dtype == torch.float64 and EXTENDED_EPS > 1e-18:
        pytest.skip("numpy's longdouble is float64 here: no oracle for a float64 gradient")
    shape, unit_dim = _layout(layout, backend)
    gen = torch.Generator().manual_seed(int(scale) + relu)
    y = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    u = torch.rand((), generator=gen, dtype=torch.float64).item()
    grad_out = torch.randn(shape, generator=gen).to(dtype) if relu else None
    bound = MAX_RTOL[dtype]
    if backend == "reference" and relu and dtype in (torch.bfloat16, torch.float16):
        bound += torch.finfo(dtype).eps / 2  # autograd adds ReLU's gradient in the dtype: rounded twice
    for name, mu in _far_means(scale, shape[unit_dim]).items():
        mu = _state(mu).mu  # the float32 values the backends compute with
        _, exact = _spec_in_extended(y, mu, unit_dim, "mean", 1.0)
        # a random upstream gradient that makes the penalty's largest gradient about 100 (float16)
        upstream = (0.5 + 0.5 * u) * 100 / exact.abs().max().item()
        exact = upstream * exact
        if relu:
            exact = exact + grad_out.double() * (y > 0)
        _, grad = _value_and_grad(backend, y, mu, unit_dim, relu, upstream, grad_out=grad_out)
        error = (grad.double() - exact).abs()
        worst = error.argmax()
        relative = (error.max() / exact.abs().max()).item()
        assert relative <= bound, (
            f"{backend} {_dtype_id(dtype)} {layout} mu = {name}, s = {scale:g}: max |grad - exact|"
            f" / max |exact| = {relative:.3g}; worst at y = {y.flatten()[worst].item():.9g}: "
            f"{grad.flatten()[worst].item():.9g} against {exact.flatten()[worst].item():.9g}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reference_gradient_matches_finite_differences(reduction):
    """The reference's gradient is written out (autograd's own cancels at far means): gradcheck
    and gradgradcheck in float64 check it, and its derivative, against finite differences."""
    y = random_activations((5, 3, 4), torch.float64, seed=3, zeros=0).requires_grad_()
    state = ShadeState(3, dtype=torch.float64)
    state.mu.copy_(torch.tensor([[-0.5, 0.2, -30.0], [1.5, 0.7, 40.0]], dtype=torch.float64))
    for call in (reference.penalty, reference.relu_penalty):
        def fn(t, call=call):
            return call(t, state, update=False, reduction=reduction)
        assert torch.autograd.gradcheck(fn, (y,))
        assert torch.autograd.gradgradcheck(fn, (y,))


def _with_values(shape, unit_dim: int, values: dict) -> torch.Tensor:
    """y = linspace(-2, 3) of `shape`, with values[index] at those indices."""
    y = torch.linspace(-2.0, 3.0, torch.Size(shape).numel(), dtype=torch.float64).view(shape)
    for index, value in values.items():
        y[index] = value
    return y.float()


# y with values whose squared distances overflow float32, and the state: (y, unit_dim, mu, upstream)
OVERFLOW_CASES = {
    "2x2 1e30": ([[1e30, 1.0], [2.0, 3.0]], 1, (-1.0, 1.0), 0.75),
    "2x2 -1e30": ([[-1e30, 1.0], [2.0, 3.0]], 1, (-1.0, 1.0), 0.75),
    "2x2 mu +-1e20": ([[0.5, 1.0], [-2.0, 3.0]], 1, (-1e20, 1e20), 0.75),
    "2x2 1e30, mu +-1e20": ([[1e30, 1.0], [-1e30, 3.0]], 1, (-1e20, 1e20), 0.75),
    "2x2 -1e30, mu -+1e20": ([[-1e30, 1.0], [1e30, 3.0]], 1, (1e20, -1e20), 0.75),
    # a GradScaler's 2^16: the CPU kernel's common loop bounds y and mu by the weight too
    "2x2 4e18, mu +-1e18, upstream 2^16": ([[4e18, 1.0], [2.0, -3.0]], 1, (-1e18, 1e18), 2.0**16),
    # in the CPU kernel's vector lanes and its scalar tail, both layouts
    "nchw +-1e30": (((3, 2, 37), {(1, 0, 5): 1e30, (2, 1, 35): -1e30, (0, 1, 3): 1e30}), 1,
                    (-1.0, 1.0), 0.75),
    "units-last +-1e30, mu +-1e20": (((37, 19), {(5, 3): 1e30, (36, 18): 1e30, (9, 0): -1e30}),
                                     -1, (-1e20, 1e20), 0.75),
}


def _overflow_case(name: str):
    values, unit_dim, (mu0, mu1), upstream = OVERFLOW_CASES[name]
    if isinstance(values, tuple):
        y = _with_values(*values[:1], unit_dim, values[1])
    else:
        y = torch.tensor(values)
    C = y.shape[unit_dim]
    return y, unit_dim, torch.tensor([[mu0] * C, [mu1] * C]), upstream


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("relu", [False, True], ids=["penalty", "relu_penalty"])
@pytest.mark.parametrize("case", list(OVERFLOW_CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_overflow_is_inf_and_a_gradient_that_fits_is_finite(backend, case, relu, reduction):
    """Squared distances beyond float32 (y = ±1e30, mu = ±1e20): the penalty is +inf where the
    exact one overflows (it was NaN: a probability of 0 times an infinite square), else within
    1e-5 of it; the gradient is finite wherever the exact one is (it was NaN at y = 1e30), within
    1e-5 of the largest exact gradient of its unit."""
    y, unit_dim, mu, upstream = _overflow_case(case)
    grad_out = torch.linspace(-1, 1, y.numel()).view(y.shape) if relu else None
    value, grad = _value_and_grad(backend, y, mu, unit_dim, relu, upstream, reduction, grad_out)
    exact_value, exact = _spec_in_extended(y, mu, unit_dim, reduction, upstream, grad_out)
    what = f"{backend} {case} {'relu_penalty' if relu else 'penalty'} {reduction}"
    if exact_value > torch.finfo(torch.float32).max:
        assert value.item() == float("inf"), f"{what}: penalty {value.item()}, exact {exact_value:.6g}"
    else:
        assert abs(value.item() - exact_value) <= 1e-5 * exact_value, (
            f"{what}: penalty {value.item():.9g}, exact {exact_value:.9g}")
    fits = exact.abs() <= torch.finfo(torch.float32).max
    assert fits.all(), f"{what}: the case's exact gradient should fit float32"
    bad = ~torch.isfinite(grad)
    assert not bad.any(), (f"{what}: gradient {grad[bad].tolist()[:4]} at y = "
                           f"{y[bad].tolist()[:4]}, exact {exact[bad].tolist()[:4]}")
    unit_scale = exact.abs().movedim(unit_dim, -1).reshape(-1, y.shape[unit_dim]).amax(0)
    unit_scale = unit_scale.view([-1 if d == unit_dim % y.dim() else 1 for d in range(y.dim())])
    error = (grad.double() - exact).abs() / unit_scale
    worst = error.argmax()
    assert error.max() <= 1e-5, (
        f"{what}: gradient {grad.flatten()[worst].item():.9g} at y = "
        f"{y.flatten()[worst].item():.9g}, exact {exact.flatten()[worst].item():.9g}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_state_guards_with_overflowing_values(backend):
    """The state's guards (SPEC section 4) are those of the statistics, not of the penalty: a unit
    whose batch statistics stay finite (y = 1e30: m1 = 1e30 / K) is updated as the reference
    updates it, though its penalty is +inf; units whose sums overflow (two 3e38) or hold inf or
    NaN keep their state."""
    y = torch.linspace(-2.0, 3.0, 6 * 5, dtype=torch.float64).view(6, 5).float()
    y[2, 0] = 1e30                        # finite statistics
    y[1, 1], y[4, 1] = 3e38, 3e38         # sum s y overflows
    y[3, 2] = float("inf")
    y[0, 3] = float("nan")
    state, expected = ShadeState(5), ShadeState(5)
    for s in (state, expected):
        with torch.no_grad():
            s.mu.copy_(torch.tensor([[-0.5, -1.0, 0.25, -2.0, -1.0], [1.5, 1.0, 3.0, 0.5, 2.0]]))
    before_p, before_mu = state.p.clone(), state.mu.clone()
    shade_ops.penalty(y, state, backend=backend)
    reference.penalty(y, expected)
    kept = torch.tensor([False, True, True, True, False])
    torch.testing.assert_close(state.p, expected.p, rtol=1e-6, atol=0)
    torch.testing.assert_close(state.mu, expected.mu, rtol=1e-6, atol=0)
    assert torch.equal(state.p[:, kept], before_p[:, kept])
    assert torch.equal(state.mu[:, kept], before_mu[:, kept])
    assert (state.mu[:, ~kept] != before_mu[:, ~kept]).all()
    assert torch.isfinite(state.mu).all() and torch.isfinite(state.p).all()
