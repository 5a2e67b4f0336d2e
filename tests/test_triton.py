"""The Triton backend (shade_ops/_triton.py) and the CPU parts of benchmarks/gpu_check.py.

On CPU tensors the kernels run through TRITON_INTERPRET=1 (tests/conftest.py sets it), 0.05-2 s a
launch, so the shapes are small and odd and chosen to reach every kernel path: units innermost
(B == 1), short runs with many rows (the column walk), long runs (the per-unit walk), several
programs per unit, and more units than one finalize program takes. The oracles are
shade_ops.reference and the C++ CPU ops. The tests named *cuda* run the compiled kernels on a GPU
and skip without one; `make gpu-check` runs them.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shade_ops
from shade_ops import ShadeState, _ops, reference
from shade_ops._layout import units_view

from conftest import TOLERANCES, assert_close, assert_compiled_matches_eager, random_activations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INTERPRETER = "triton" in shade_ops.available_backends("cpu")
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="backend 'triton' cannot run on CPU tensors here: Triton is not "
    "installed, or TRITON_INTERPRET=1 was not set before it was imported")
needs_native = pytest.mark.skipif(_ops.NATIVE_OPS is None,
                                  reason="shade_ops._C (the C++ ops, the second oracle) not built")
HAS_CUDA = torch.cuda.is_available() and "triton" in shade_ops.available_backends("cuda")
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU, Triton and the compiled kernels (TRITON_INTERPRET=0; "
    "`make gpu-check` runs these)" if HAS_CUDA else "needs a CUDA GPU and Triton")

def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _triton():
    from shade_ops import _triton

    return _triton


# ---- cases -------------------------------------------------------------------------------

def _make(name: str, dtype: torch.dtype, seed: int, device: str = "cpu") -> tuple:
    """(y, unit_dim) for one named layout; y is a leaf that requires grad."""
    spec = CASES[name]
    shape, unit_dim = spec["shape"], spec.get("unit_dim", 1)
    layout = spec.get("layout")
    if layout == "sliced":  # every other unit, samples cut at both ends: strides, no copy
        base = random_activations((shape[0], 2 * shape[1], shape[2] + 2), dtype, seed)
        y = base[:, ::2, 1:-1]
    elif layout == "strided":  # every other unit and every other sample
        base = random_activations((shape[0], 2 * shape[1], 2 * shape[2]), dtype, seed)
        y = base[:, ::2, ::2]
    elif layout == "transposed":
        y = random_activations(shape[::-1], dtype, seed).t()
    else:
        y = random_activations(shape, dtype, seed)
        if layout == "channels_last":
            y = y.contiguous(memory_format=torch.channels_last)
    assert tuple(y.shape) == shape
    return y.to(device).detach().requires_grad_(), unit_dim


CASES = {
    "runs": dict(shape=(37, 5, 23)),                     # B > 1, few rows: per-unit walk
    "columns-runs": dict(shape=(131, 3, 5)),             # B > 1, many rows: column walk
    "units-inner": dict(shape=(41, 6)),                  # B == 1
    "units-last": dict(shape=(5, 7, 6), unit_dim=-1),
    "channels-last": dict(shape=(3, 4, 5, 6), layout="channels_last"),
    "sliced-runs": dict(shape=(6, 5, 7), layout="sliced"),
    "strided-columns": dict(shape=(130, 3, 4), layout="strided"),
    "transposed": dict(shape=(19, 11), layout="transposed"),
    "n1": dict(shape=(1, 7, 9)),
    "one-unit": dict(shape=(3, 1, 40)),
    "one-element": dict(shape=(1, 1)),
}


def compare_steps(name: str, dtype: torch.dtype, reduction: str = "mean", steps: int = 3,
                  device: str = "cpu") -> None:
    """Penalty, gradient (random upstream) and state against the reference over `steps`
    training steps."""
    _, unit_dim = _make(name, dtype, 0, device)
    num_units = CASES[name]["shape"][unit_dim]
    state = ShadeState(num_units, device=device)
    expected_state = ShadeState(num_units, device=device)
    for step in range(steps):
        y, _ = _make(name, dtype, step, device)
        y_ref, _ = _make(name, dtype, step, device)
        value = shade_ops.penalty(y, state, unit_dim=unit_dim, reduction=reduction,
                                  backend="triton")
        expected = reference.penalty(y_ref, expected_state, unit_dim=unit_dim,
                                     reduction=reduction)
        where = f"{name} {reduction} step {step}"
        assert value.dtype == expected.dtype and value.dim() == 0, where
        assert_close(value, expected, dtype, "penalty", where)
        upstream = torch.randn((), generator=torch.Generator().manual_seed(step),
                               dtype=value.dtype).to(device)
        (grad,) = torch.autograd.grad(value, y, upstream)
        (grad_ref,) = torch.autograd.grad(expected, y_ref, upstream)
        assert grad.dtype == dtype and grad.shape == y.shape, where
        if CASES[name].get("layout") not in ("sliced", "strided"):  # dense y: its layout back
            assert grad.stride() == y.stride(), where
        assert_close(grad, grad_ref, dtype, "grad", where)
        assert_close(state.p, expected_state.p, torch.float32, "state", where + " p")
        assert_close(state.mu, expected_state.mu, torch.float32, "state", where + " mu")


# ---- the interpreter: agreement with the reference ---------------------------------------

@needs_interpreter
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    compare_steps(name, torch.float32)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("name", ["runs", "columns-runs", "units-inner"])
def test_dtypes_match_reference(name, dtype):
    compare_steps(name, dtype, steps=2)


@needs_interpreter
@pytest.mark.parametrize("name", ["runs", "units-inner"])
def test_sum_reduction_matches_reference(name):
    compare_steps(name, torch.float32, reduction="sum", steps=2)


@needs_interpreter
@pytest.mark.parametrize("name", ["runs", "columns-runs", "channels-last"])
def test_fused_relu_matches_reference(name):
    y, unit_dim = _make(name, torch.float32, 0)
    y_ref, _ = _make(name, torch.float32, 0)
    where = (0, 1) + (2,) * (y.dim() - 2)
    with torch.no_grad():  # NaN passes through relu as NaN
        y[where] = y_ref[where] = float("nan")
    num_units = y.shape[unit_dim]
    state, expected_state = ShadeState(num_units), ShadeState(num_units)
    out, value = shade_ops.relu_penalty(y, state, unit_dim=unit_dim, backend="triton")
    out_ref, value_ref = reference.relu_penalty(y_ref, expected_state, unit_dim=unit_dim)
    assert out.stride() == y.stride()
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(value) and torch.isnan(value_ref)
    g = torch.Generator().manual_seed(1)
    grad_out, grad_value = torch.randn(out.shape, generator=g), torch.randn((), generator=g)
    (grad,) = torch.autograd.grad((out, value), y, (grad_out, grad_value))
    (grad_ref,) = torch.autograd.grad((out_ref, value_ref), y_ref, (grad_out, grad_value))
    finite = ~torch.isnan(grad_ref)
    assert_close(grad[finite], grad_ref[finite], torch.float32, "grad", name)
    assert_close(state.mu, expected_state.mu, torch.float32, "state", "mu")


@needs_interpreter
@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 4, 0), (0, 5)])
def test_empty_batch(shape):
    """K == 0: a penalty of 0, batch sums of 0, the state unchanged, an empty gradient."""
    y = torch.zeros(shape, requires_grad=True)
    state = ShadeState(shape[1])
    value = shade_ops.penalty(y, state, backend="triton")
    assert value.item() == 0.0
    assert torch.equal(state.p, torch.full((2, shape[1]), 0.5))
    assert torch.equal(state.mu, torch.tensor([[-1.0], [1.0]]).expand(2, shape[1]))
    (grad,) = torch.autograd.grad(value, y)
    assert grad.shape == y.shape
    view = units_view(y.detach(), 1)
    _, sums, mu_copy = _triton().penalty_forward(view, state.mu, "mean")
    assert torch.equal(sums, torch.zeros(4, shape[1])) and torch.equal(mu_copy, state.mu)


@needs_interpreter
def test_nan_in_one_unit_keeps_that_units_state():
    y = random_activations((29, 4, 6), torch.float32, 3)
    y[5, 2, 1] = float("nan")
    state, expected_state = ShadeState(4), ShadeState(4)
    value = shade_ops.penalty(y, state, backend="triton")
    expected = reference.penalty(y, expected_state)
    assert torch.isnan(value) and torch.isnan(expected)
    assert torch.equal(state.p[:, 2], torch.full((2,), 0.5))
    assert torch.equal(state.mu[:, 2], torch.tensor([-1.0, 1.0]))
    assert_close(state.p, expected_state.p, torch.float32, "state", "p")
    assert_close(state.mu, expected_state.mu, torch.float32, "state", "mu")


# ---- the interpreter: the launchers against the C++ ops ----------------------------------

def _native_forward(y, mu, reduction):
    return torch.ops.shade_ops.relu_penalty_forward(y, mu, reduction)


@st.composite
def strided_units(draw):
    """An (A, C, B) tensor with arbitrary strides: a slice of a permutation of a bigger one. A
    reaches 130 rows, where short runs take the column walk."""
    A, C, B = (draw(st.sampled_from([1, 2, 5, 9, 130])), draw(st.integers(1, 6)),
               draw(st.integers(1, 9)))
    order = draw(st.permutations([0, 1, 2]))  # memory order of the logical dims, outer first
    step, stepped = draw(st.integers(1, 2)), draw(st.integers(0, 2))
    sizes = [(A, C, B)[d] * (step if d == stepped else 1) for d in range(3)]
    base = random_activations([sizes[d] for d in order], torch.float32,
                              draw(st.integers(0, 1000)))
    y = base.permute([order.index(d) for d in range(3)])
    y = y[tuple(slice(None, None, step) if d == stepped else slice(None) for d in range(3))]
    assert tuple(y.shape) == (A, C, B), (y.shape, (A, C, B))
    return y


@needs_interpreter
@needs_native
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(y=strided_units(), reduction=st.sampled_from(["mean", "sum"]),
       expand_grad=st.booleans())
def test_launchers_match_native_ops_on_strided_views(y, reduction, expand_grad):
    triton_ops = _triton()
    mu = torch.randn(2, y.shape[1], generator=torch.Generator().manual_seed(y.numel()))
    value, sums, out, mu_copy = triton_ops.relu_penalty_forward(y, mu, reduction)
    value_ref, sums_ref, out_ref, _ = _native_forward(y, mu, reduction)
    assert_close(value, value_ref, torch.float32, "penalty", "penalty")
    assert_close(sums, sums_ref, torch.float32, "penalty", "sums")
    assert torch.equal(out, out_ref) and out.is_contiguous() and torch.equal(mu_copy, mu)
    grad_out = (torch.randn(()).expand(y.shape) if expand_grad
                else torch.randn(y.shape[::-1]).permute(2, 1, 0))
    g = torch.tensor(0.7)
    grad = triton_ops.penalty_backward(g, y, mu, reduction, grad_out)
    grad_ref = torch.ops.shade_ops.penalty_backward(g, y, mu, reduction, grad_out)
    assert grad.is_contiguous()
    assert_close(grad, grad_ref, torch.float32, "grad", "grad")


@needs_interpreter
@needs_native
@pytest.mark.parametrize("shape", [
    (1, 2, 40000),   # one row: each unit's run cut into several programs
    (600, 64, 1),    # units innermost, several chunks of rows
    (3, 2100, 1),    # more units than one finalize program takes: a third kernel adds them
    (600, 9, 7),     # short runs, several chunks, partials summed over chunks and runs
], ids=lambda s: "x".join(map(str, s)))
def test_several_programs_bitwise_reproducible(shape):
    """Two runs agree bit for bit (fixed-order reduction, no atomics) and match the C++ op."""
    triton_ops = _triton()
    y = random_activations(shape, torch.float32, 7)
    mu = torch.stack([torch.full((shape[1],), -0.5), torch.full((shape[1],), 1.5)])
    first = triton_ops.penalty_forward(y, mu, "mean")
    second = triton_ops.penalty_forward(y, mu, "mean")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    value_ref, sums_ref, _ = torch.ops.shade_ops.penalty_forward(y, mu, "mean")
    assert_close(first[0], value_ref, torch.float32, "penalty", "penalty")
    assert_close(first[1], sums_ref, torch.float32, "penalty", "sums")


# ---- the interpreter: launch plans, launch count, NaN, reproducibility ---------------------

class _CountLaunches:
    """Wraps every kernel of shade_ops._triton: counts the launches, by kernel name."""

    def __init__(self, monkeypatch) -> None:
        self.launches: list[str] = []
        triton_ops = _triton()
        for name in [n for n in vars(triton_ops) if n.endswith("_kernel")]:
            monkeypatch.setattr(triton_ops, name, self.Kernel(self, name,
                                                              getattr(triton_ops, name)))

    class Kernel:
        def __init__(self, counter, name, kernel) -> None:
            self.counter, self.name, self.kernel = counter, name, kernel

        def __getitem__(self, grid):
            self.counter.launches.append(self.name)
            return self.kernel[grid]


@needs_interpreter
def test_launch_plans_are_cached_per_shape_and_strides():
    triton_ops = _triton()
    triton_ops._PLANS.clear()
    y = random_activations((9, 4, 7))
    mu = torch.zeros(2, 4)
    first = triton_ops.penalty_forward(y, mu, "mean")
    assert len(triton_ops._PLANS) == 1
    (plan,) = triton_ops._PLANS.values()
    second = triton_ops.penalty_forward(y.clone(), mu, "mean")  # same shape and strides
    assert len(triton_ops._PLANS) == 1 and next(iter(triton_ops._PLANS.values())) is plan
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = random_activations((7, 4, 9)).transpose(0, 2)  # same shape, other strides
    assert other.shape == y.shape and other.stride() != y.stride()
    triton_ops.penalty_forward(other, mu, "mean")
    assert len(triton_ops._PLANS) == 2
    triton_ops.penalty_forward(y, mu, "sum")  # another reduction: another plan
    assert len(triton_ops._PLANS) == 3


@needs_interpreter
def test_bad_arguments_make_no_plan():
    triton_ops = _triton()
    triton_ops._PLANS.clear()
    with pytest.raises(RuntimeError, match="mu must have shape"):
        triton_ops.penalty_forward(random_activations((3, 4, 5)), torch.zeros(2, 3), "mean")
    with pytest.raises(RuntimeError, match="reduction"):
        triton_ops.penalty_forward(random_activations((3, 4, 5)), torch.zeros(2, 4), "max")
    assert not triton_ops._PLANS


@needs_interpreter
@pytest.mark.parametrize("shape", [(37, 5, 23), (41, 6), (3, 2100), (1, 2, 40000), (5, 300, 3),
                                   (131, 3, 5)], ids=lambda s: "x".join(map(str, s)))
def test_training_forward_is_two_launches(shape, monkeypatch):
    """The penalty and the batch sums in one launch, the state update in a second; the backward
    in one."""
    count = _CountLaunches(monkeypatch)
    y = random_activations(shape).requires_grad_()
    state = ShadeState(shape[1])
    value = shade_ops.penalty(y, state, backend="triton")
    assert len(count.launches) <= 2, count.launches
    assert count.launches[-1] == "_update_state_kernel", count.launches
    count.launches.clear()
    value.backward()
    assert count.launches == ["_penalty_bwd_kernel"]
    count.launches.clear()
    shade_ops.ShadeReLU(shape[1], backend="triton")(y)
    assert len(count.launches) <= 2, count.launches


@needs_interpreter
@pytest.mark.parametrize("shape", [(29, 4, 6), (41, 6), (5, 3, 200)],
                         ids=lambda s: "x".join(map(str, s)))
def test_nan_propagates_as_in_the_reference(shape):
    """relu(NaN) is NaN, and a NaN reaches the penalty, the gradient and every batch sum of its
    unit (s and q of a NaN are NaN, as relu's and exp's are), as in the reference."""
    triton_ops = _triton()
    y = random_activations(shape, torch.float32, 3)
    y.view(-1)[[5, y.numel() // 2]] = float("nan")
    view = units_view(y, 1)
    C = view.shape[1]
    mu = torch.stack([torch.full((C,), -1.0), torch.full((C,), 1.0)])
    value, sums, out, _ = triton_ops.relu_penalty_forward(y, mu, "mean")
    assert torch.equal(out.isnan(), y.isnan()) and torch.equal(out.nan_to_num(), y.relu().nan_to_num())
    r = view.double().relu()
    s, q = -torch.expm1(-r), torch.exp(-r)
    expected_sums = torch.stack([s.sum((0, 2)), (s * view).sum((0, 2)), (q * view).sum((0, 2))])
    assert torch.equal(sums[:3].isnan(), expected_sums.isnan()), (sums, expected_sums)
    assert value.isnan()
    y_ref = y.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(reference.penalty(y_ref, ShadeState(C)), y_ref)
    grad = triton_ops.penalty_backward(torch.tensor(1.0), y, mu, "mean")
    assert torch.equal(grad.isnan(), grad_ref.isnan())


@needs_interpreter
@pytest.mark.parametrize("shape", [(37, 5, 23), (41, 6)], ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_results_round_to_nearest_even(shape):
    """A bfloat16 gradient is the float32 one rounded to nearest even, as torch rounds it and
    as a GPU converts (the interpreter's own conversion truncates); so is a bfloat16 state."""
    triton_ops = _triton()
    y = random_activations(shape, torch.bfloat16, 5)
    mu = torch.stack([torch.full((shape[1],), -0.7), torch.full((shape[1],), 1.3)])
    g = torch.tensor(0.37)
    grad = triton_ops.penalty_backward(g, y, mu, "mean")
    grad32 = triton_ops.penalty_backward(g, y.float(), mu, "mean")
    assert grad.dtype == torch.bfloat16 and torch.equal(grad, grad32.to(torch.bfloat16))
    _, sums, _ = triton_ops.penalty_forward(y.float(), mu, "mean")
    p16, mu16 = torch.full((2, shape[1]), 0.5, dtype=torch.bfloat16), mu.to(torch.bfloat16)
    p32, mu32 = p16.float(), mu16.float()
    triton_ops.update_state(p16, mu16, sums, 0.8)
    triton_ops.update_state(p32, mu32, sums, 0.8)
    assert torch.equal(p16, p32.to(torch.bfloat16)) and torch.equal(mu16, mu32.to(torch.bfloat16))


@needs_interpreter
@pytest.mark.parametrize("shape", [(600, 9, 7), (3, 2100), (1, 2, 40000), (5, 300, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_consecutive_calls_bitwise_equal(shape):
    """The same input three times, with a call on another shape in between: every result equal
    bit for bit (the fixed-order final sum, and the completion counter back at 0 after each
    call)."""
    triton_ops = _triton()
    y = random_activations(shape, torch.float32, 11)
    mu = torch.stack([torch.full((shape[1],), -0.5), torch.full((shape[1],), 1.5)])
    first = triton_ops.relu_penalty_forward(y, mu, "mean")
    second = triton_ops.relu_penalty_forward(y, mu, "mean")
    triton_ops.penalty_forward(random_activations((7, 3, 5)), torch.zeros(2, 3), "sum")
    third = triton_ops.relu_penalty_forward(y, mu, "mean")
    for result in (second, third):
        assert all(torch.equal(a, b) for a, b in zip(first, result))
    if hasattr(triton_ops, "_COUNTERS"):
        assert all(not counter.any() for counter in triton_ops._COUNTERS.values())


@needs_interpreter
@pytest.mark.parametrize("state_dtype,sums_dtype", [
    (torch.float32, torch.float32), (torch.float64, torch.float64),
    (torch.float32, torch.float64), (torch.bfloat16, torch.float32)],
    ids=["f32", "f64", "f32-state-f64-sums", "bf16-state"])
def test_update_state_matches_reference(state_dtype, sums_dtype):
    """Algorithm 1 and its guards: a NaN unit, an empty unit, and p -> 0 (decay 0)."""
    g = torch.Generator().manual_seed(0)
    C = 7
    p = (torch.rand(2, C, generator=g) * 0.8 + 0.1).to(state_dtype)
    mu = torch.randn(2, C, generator=g).to(state_dtype)
    sums = (torch.rand(4, C, generator=g) * 10).to(sums_dtype)
    sums[3] = 20
    sums[1, 2] = float("nan")        # a NaN in y: the unit keeps its state
    sums[:, 4] = 0                   # no samples: 0 / 0, kept
    sums[0, 5] = 0                   # all samples at or below 0: b1 = 0
    for decay in (0.8, 0.0):         # decay 0 and b1 = 0: the new p1 is 0, mu1 keeps its value
        expected_p, expected_mu = reference.updated_state(p, mu, sums, decay)
        new_p, new_mu = p.clone(), mu.clone()
        torch.ops.shade_ops.triton_update_state(new_p, new_mu, sums, decay)
        # the interpreter rounds float32 -> bfloat16 toward zero: one bfloat16 step apart
        tol = dict(rtol=1e-2, atol=1e-2) if state_dtype == torch.bfloat16 else \
            dict(rtol=TOLERANCES[state_dtype]["state"][0], atol=1e-12)
        torch.testing.assert_close(new_p, expected_p, equal_nan=True, **tol)
        torch.testing.assert_close(new_mu, expected_mu, equal_nan=True, **tol)
        assert torch.equal(new_p[:, 2], p[:, 2]) and torch.equal(new_mu[:, 4], mu[:, 4])


# ---- the interpreter: registration, compile, no host synchronisation ---------------------

def _interpreter_op_args():
    y = random_activations((5, 3, 7), torch.float32, 0).requires_grad_()
    mu = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    state = ShadeState(3)
    return {
        "triton_penalty_forward": (y, mu, "mean"),
        "triton_relu_penalty_forward": (y, mu, "sum"),
        "triton_penalty_backward": (torch.tensor(1.5), y.detach(), mu, "mean",
                                    torch.randn(5, 3, 7)),
        "triton_update_state": (state.p.clone(), state.mu.clone(),
                                torch.rand(4, 3, generator=torch.Generator().manual_seed(1)) + 1,
                                0.8),
    }


@needs_interpreter
@pytest.mark.parametrize("name", ["triton_penalty_forward", "triton_relu_penalty_forward",
                                  "triton_penalty_backward", "triton_update_state"])
def test_opcheck(name):
    op = getattr(torch.ops.shade_ops, name).default
    torch.library.opcheck(op, _interpreter_op_args()[name])


@needs_interpreter
@needs_native
def test_interpreter_op_schemas_are_the_native_ones():
    """The CPU stand-ins take and return what the ops declared in csrc/shade_ops.cpp do."""
    for name in ("penalty_forward", "relu_penalty_forward", "penalty_backward", "update_state"):
        native = str(getattr(torch.ops.shade_ops, name).default._schema)
        ours = str(getattr(torch.ops.shade_ops, f"triton_{name}").default._schema)
        assert ours == native.replace(f"shade_ops::{name}", f"shade_ops::triton_{name}")


@needs_interpreter
def test_compiles_fullgraph():
    """Dynamo traces penalty() with the Triton ops as opaque nodes: no graph break."""
    torch._dynamo.reset()
    state, eager_state = ShadeState(5), ShadeState(5)

    def step(y, state):
        return shade_ops.penalty(y, state, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_compiled_matches_eager(step, compiled, eager_state, state,
                                  lambda seed: random_activations((4, 5, 3), torch.float32, seed))
    torch._dynamo.reset()


def test_module_source_never_reads_device_values():
    """No .item(), .tolist(), .cpu() or synchronize in the kernels' module: the gradient scale is
    read by the kernel through its pointer, and nothing branches on tensor values."""
    pytest.importorskip("triton")
    source = inspect.getsource(_triton())
    for needle in (".item(", ".tolist(", ".cpu(", "synchronize(", ".numpy("):
        assert needle not in source, needle


@needs_interpreter
def test_launchers_never_read_tensor_values(monkeypatch):
    """The same, at run time: reading a value back to Python raises inside every launcher."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a launcher read a tensor value back to Python")

    triton_ops = _triton()
    args = _interpreter_op_args()
    y, mu = args["triton_penalty_forward"][0].detach(), args["triton_penalty_forward"][1]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    triton_ops.penalty_forward(y, mu, "mean")
    triton_ops.relu_penalty_forward(units_view(y, 1), mu, "sum")
    triton_ops.penalty_backward(*args["triton_penalty_backward"])
    triton_ops.update_state(*args["triton_update_state"])


class _Bounds:
    """Every load and store of the Triton kernels under the interpreter, checked against the
    storages of the tensors passed to that launch. The interpreter turns a pointer into a host
    address: an access outside every argument (on a GPU an illegal access, or silent corruption
    of a neighbour) corrupts the heap here, or nothing visible happens at all."""

    def __init__(self, monkeypatch) -> None:
        interpreter = pytest.importorskip("triton.runtime.interpreter")
        builder = interpreter.interpreter_builder
        self.launch, self.storages = "", []
        load, store = builder.create_masked_load, builder.create_masked_store

        def checked_load(ptrs, mask, other, *args):
            self.check("load", ptrs, mask)
            return load(ptrs, mask, other, *args)

        def checked_store(ptrs, value, mask, *args):
            self.check("store", ptrs, mask)
            return store(ptrs, value, mask, *args)

        monkeypatch.setattr(builder, "create_masked_load", checked_load)
        monkeypatch.setattr(builder, "create_masked_store", checked_store)
        triton_ops = _triton()
        for name in [n for n in vars(triton_ops) if n.endswith("_kernel")]:
            kernel = self.Kernel(self, name, getattr(triton_ops, name))
            monkeypatch.setattr(triton_ops, name, kernel)

    class Kernel:
        def __init__(self, bounds, name, kernel) -> None:
            self.bounds, self.name, self.kernel = bounds, name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
                self.bounds.storages = [(t.untyped_storage().data_ptr(),
                                         t.untyped_storage().nbytes()) for t in tensors]
                self.bounds.launch = f"{self.name}{grid} " + ", ".join(
                    f"{tuple(t.shape)}/{t.stride()}" for t in tensors)
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    self.bounds.storages = []
            return launch

    def check(self, what: str, ptrs, mask) -> None:
        import numpy as np

        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64)
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, size in self.storages:
            inside |= (addresses >= start) & (addresses + itemsize <= start + size)
        if not inside.all():  # raised before the access is made, which could crash
            raise AssertionError(f"{what} of {int((~inside).sum())} elements outside every "
                                 f"argument: {self.launch}")


@needs_interpreter
@pytest.mark.parametrize("name", [*CASES, "nchw", "nchw-1x1", "many-units", "long-run"])
def test_kernels_stay_inside_their_tensors(name, monkeypatch):
    """Every launcher on every layout and path (the 3-D view and the (A, C, ...) tensor a
    contiguous y goes as, the fused ReLU, the backward with a grad_out of another layout and an
    expanded one, the update): no load or store outside the launch's tensors, and no input
    written."""
    extra = {"nchw": (2, 4, 8, 8), "nchw-1x1": (2, 16, 1, 1), "many-units": (3, 2100),
             "long-run": (1, 2, 40000)}
    if name in extra:
        y, unit_dim = random_activations(extra[name]), 1
    else:
        y, unit_dim = _make(name, torch.float32, 0)
        y = y.detach()
    views = [units_view(y, unit_dim)]
    if unit_dim == 1 and y.is_contiguous() and y.dim() > 3:
        views.append(y)
    C = views[0].shape[1]
    mu = torch.stack([torch.linspace(-1.5, -0.5, C), torch.linspace(0.5, 1.5, C)])
    _Bounds(monkeypatch)
    triton_ops = _triton()
    for y in views:
        grad_outs = [None, torch.randn(y.shape[::-1]).permute(*reversed(range(y.dim()))),
                     torch.randn(()).expand(y.shape)]
        inputs = [y, mu, *grad_outs[1:]]
        before = [t.clone() for t in inputs]
        for reduction in ("mean", "sum"):
            _, sums, _ = triton_ops.penalty_forward(y, mu, reduction)
            triton_ops.relu_penalty_forward(y, mu, reduction)
            for grad_out in grad_outs:
                triton_ops.penalty_backward(torch.tensor(0.7), y, mu, reduction, grad_out)
        assert all(torch.equal(a, b) for a, b in zip(inputs, before)), "an input was written"
        # the state as ShadeState keeps it, and as (2, C) columns of a wider tensor
        triton_ops.update_state(torch.full((2, C), 0.5), mu.clone(), sums, 0.8)
        triton_ops.update_state(torch.full((C, 3), 0.5)[:, :2].t(),
                                torch.zeros(C, 2).t(), sums, 0.8)


# ---- how the work is cut (plain Python) ---------------------------------------------------

@pytest.mark.parametrize("A,C,B", [(1, 1, 1), (1, 3, 70000), (37, 5, 23), (256, 64, 3136),
                                   (256, 256, 196), (8192, 4096, 1), (65539, 64, 512),
                                   (2 ** 21 + 7, 1024, 1), (5, 100000, 3)])
def test_work_split_covers_every_sample(A, C, B):
    triton_ops = pytest.importorskip("shade_ops._triton")
    programs = triton_ops._sm_count(torch.device("cpu")) * triton_ops._FWD_PER_SM
    if triton_ops._uses_columns(A, B):
        block_r, block_col, units = triton_ops._unit_column_tile(A, C, B)
        assert 1 <= units <= C and units * B <= block_col  # whole units in a block
        col_blocks = -(-C // units)
        per_chunk, chunks = triton_ops._row_chunks(
            A, block_r, col_blocks, A * C * B, programs, triton_ops._MIN_WORK,
            triton_ops._PARTIAL_ROWS)
        assert per_chunk % block_r == 0 and (chunks - 1) * per_chunk < A <= chunks * per_chunk
    else:
        block_r, block_col = triton_ops._run_tile(A, B)
        rows, cols, row_pieces, col_pieces = triton_ops._run_pieces(A, B, C, block_r, block_col,
                                                                    programs)
        assert rows % block_r == 0 and cols % block_col == 0 or cols == B
        assert (row_pieces - 1) * rows < A <= row_pieces * rows
        assert (col_pieces - 1) * cols < B <= col_pieces * cols
        assert C * row_pieces * col_pieces <= max(C, 2 * programs)
    for block in (block_r, block_col):
        assert block & (block - 1) == 0
    assert block_r * block_col <= max(triton_ops._TILE, block_col)
    assert triton_ops._alignment(0, 48, 96) == 16 and triton_ops._alignment(196, 50176) == 4


@pytest.mark.parametrize("shape,fewest,most", [
    ((128, 64, 16, 16), 132, 2 * 132), ((128, 64, 8, 8), 128, 2 * 132),
    ((5, 100000, 3), 132, 1000), ((256, 64, 56, 56), 132, 2 * 132), ((8192, 4096), 132, 2 * 132),
    ((3, 5, 7), 1, 1)], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_forward_grids_fill_the_sms(shape, fewest, most):
    """The forward's grid, from the plan alone (meta tensors, nothing launched): about two
    programs per SM (132 stand-in SMs on the CPU) on large inputs, small inputs split further
    than before (128x64x8x8 was 32 programs), and no longer a program per unit for
    (5, 100000, 3) (was 100,000)."""
    triton_ops = pytest.importorskip("shade_ops._triton")
    y = torch.empty(shape, device="meta")
    plan = triton_ops._forward_plan(y, torch.empty(2, shape[1], device="meta"), "mean", True)
    assert fewest <= plan.grid[0] <= most, plan.grid


def test_launches_go_to_the_tensors_device(monkeypatch):
    """The device guard: none (one shared no-op context) on the CPU or on the current CUDA
    device; torch.cuda.device(y's device) for another one (no GPU needed to build it)."""
    triton_ops = pytest.importorskip("shade_ops._triton")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert triton_ops._on_device(torch.device("cpu")) is triton_ops._NO_GUARD
    assert triton_ops._on_device(torch.device("cuda", 0)) is triton_ops._NO_GUARD
    guard = triton_ops._on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


# ---- the GPU kernels compiled without a GPU -----------------------------------------------

@pytest.mark.slow
def test_gpu_kernels_compile_for_sm90():
    """ptxas compiles every kernel the benchmark shapes and some degenerate ones launch, with no
    spills, and the large shapes get vector loads."""
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    shapes = ["256x64x56x56", "256x256x14x14", "8192x4096", "1x1", "3x1x7", "300x2x3"]
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
               "--compile-only", "--dtype", "float32", "--dtype", "bfloat16"]
    for shape in shapes:
        command += ["--shape", shape]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=ROOT)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("["):])
    kernels = {entry["kernel"] for entry in report}
    assert {"_penalty_fwd_runs_kernel", "_penalty_fwd_columns_kernel", "_penalty_bwd_kernel",
            "_update_state_kernel"} <= kernels
    for entry in report:
        assert entry.get("stack", 0) == 0, entry
        large = math.prod(entry["shape"]) >= 2 ** 20
        if large and entry["kernel"] in ("_penalty_fwd_runs_kernel",
                                         "_penalty_fwd_columns_kernel", "_penalty_bwd_kernel"):
            assert entry["vector_loads"] > 0, entry


# ---- CUDA ----------------------------------------------------------------------------------

CUDA_CASES = {
    "nchw": dict(shape=(16, 32, 28, 28)),
    "nc": dict(shape=(1024, 1000)),
    "ncl-short-runs": dict(shape=(512, 48, 7)),
    "nchw-channels-last": dict(shape=(8, 64, 14, 14), layout="channels_last"),
    "transposed": dict(shape=(4099, 33), layout="transposed"),
}


@needs_cuda
@pytest.mark.parametrize("name", list(CUDA_CASES) + ["runs", "strided-columns", "one-element"])
def test_cuda_matches_reference(name, monkeypatch):
    if name in CUDA_CASES:
        monkeypatch.setitem(CASES, name, CUDA_CASES[name])
    compare_steps(name, torch.float32, device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("name", ["nchw", "nc", "ncl-short-runs"])
def test_cuda_dtypes_match_reference(name, dtype, monkeypatch):
    monkeypatch.setitem(CASES, name, CUDA_CASES[name])
    compare_steps(name, dtype, steps=2, device="cuda")


@needs_cuda
def test_cuda_native_ops_run_the_triton_kernels():
    """One op definition: shade_ops::penalty_forward on CUDA tensors is the Triton launcher, and
    backend='auto' picks it."""
    assert _ops.resolve_backend("auto", torch.device("cuda")) is _ops.NATIVE_OPS
    y = random_activations((64, 12, 33), torch.float32, 0)
    mu = torch.randn(2, 12)
    cpu = torch.ops.shade_ops.relu_penalty_forward(y, mu, "mean")
    cuda = torch.ops.shade_ops.relu_penalty_forward(y.cuda(), mu.cuda(), "mean")
    for a, b, what in zip(cuda, cpu, ("penalty", "sums", "relu", "mu")):
        assert_close(a.cpu(), b, torch.float32, "penalty", what)
    g = torch.tensor(0.3)
    grad = torch.ops.shade_ops.penalty_backward(g.cuda(), y.cuda(), mu.cuda(), "sum")
    assert_close(grad.cpu(), torch.ops.shade_ops.penalty_backward(g, y, mu, "sum"),
                 torch.float32, "grad", "grad")


@needs_cuda
@pytest.mark.parametrize("shape", [(256, 64, 56, 56), (8192, 4096), (2, 3, 300000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_bitwise_reproducible(shape):
    triton_ops = _triton()
    y = units_view(torch.randn(shape, device="cuda", dtype=torch.bfloat16), 1)
    mu = torch.randn(2, y.shape[1], device="cuda")
    first = triton_ops.penalty_forward(y, mu, "mean")
    second = triton_ops.penalty_forward(y, mu, "mean")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _chunked_reference(y: torch.Tensor, mu: torch.Tensor, rows: int):
    """Penalty ("sum") and batch sums of a (A, C, B) tensor in float64, a few rows at a time."""
    total, sums = 0.0, 0.0
    for start in range(0, y.shape[0], rows):
        part = y[start:start + rows].double()
        value, part_sums = reference.batch_statistics(part, mu.double(), 1, "sum")
        total, sums = total + value, sums + part_sums
        del part
    return total, sums


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2 ** 16 + 3, 64, 512), (2 ** 21 + 7, 1024, 1)],
                         ids=["runs", "units-inner"])
def test_cuda_more_than_2_31_elements(shape):
    """64-bit offsets: a bfloat16 tensor of more than 2**31 elements, forward and backward."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2 ** 30:
        pytest.skip("needs 24 GiB of free GPU memory")
    triton_ops = _triton()
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    assert y.numel() > 2 ** 31
    y[-1] = 3.0  # the last rows, beyond 2**31 elements, carry a value nobody else has
    mu = torch.stack([torch.full((shape[1],), -0.5), torch.full((shape[1],), 1.5)]).cuda()
    value, sums, _ = triton_ops.penalty_forward(y, mu, "sum")
    expected, expected_sums = _chunked_reference(y, mu, rows=max(1, 2 ** 27 // (shape[1] *
                                                                           shape[2])))
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(sums.double(), expected_sums, rtol=1e-4, atol=1e-2)
    grad = triton_ops.penalty_backward(torch.tensor(1.0, device="cuda"), y, mu, "sum")
    for rows in (slice(0, 2), slice(-2, None)):  # the first and the last rows
        part = y[rows].float().requires_grad_()
        part_value, _ = reference.batch_statistics(part, mu, 1, "sum")
        (expected_grad,) = torch.autograd.grad(part_value, part)
        assert_close(grad[rows], expected_grad.to(torch.bfloat16), torch.bfloat16, "grad",
                     f"rows {rows}")


@needs_cuda
def test_cuda_graph_captures_a_training_step():
    """Forward, backward and state update in one CUDA graph: nothing syncs with the host."""
    torch.manual_seed(0)
    weight = torch.randn(24, 16, device="cuda", requires_grad=True)
    state, eager_state = ShadeState(24, device="cuda"), ShadeState(24, device="cuda")
    static_x = torch.randn(64, 16, device="cuda")

    def step(x, state):
        value = shade_ops.penalty(x @ weight.t(), state, backend="triton")
        (grad,) = torch.autograd.grad(value, weight)
        return value, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: compiles the kernels outside the capture
        step(static_x, ShadeState(24, device="cuda"))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_value, static_grad = step(static_x, state)
    state.reset_state()
    for seed in range(3):
        x = torch.randn(64, 16, device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(seed))
        static_x.copy_(x)
        graph.replay()
        value, grad = step(x, eager_state)
        assert_close(static_value, value, torch.float32, "penalty", f"replay {seed}")
        assert_close(static_grad, grad, torch.float32, "grad", f"replay {seed}")
        assert_close(state.mu, eager_state.mu, torch.float32, "state", f"replay {seed}")


@needs_cuda
def test_cuda_compile_fullgraph():
    torch._dynamo.reset()
    state, eager_state = ShadeState(32, device="cuda"), ShadeState(32, device="cuda")

    def step(y, state):
        out, value = shade_ops.relu_penalty(y, state, backend="triton")
        return out.sum() + value

    compiled = torch.compile(step, fullgraph=True)
    assert_compiled_matches_eager(
        step, compiled, eager_state, state,
        lambda seed: random_activations((8, 32, 9, 9), torch.float32, seed).cuda())
    torch._dynamo.reset()


@needs_cuda
def test_cuda_runs_on_the_current_stream():
    """The kernels queue behind a long kernel of the current (side) stream: launched on another
    stream they would read y before the copy that writes it, and the values would be wrong."""
    source = random_activations((64, 16, 30)).cuda()
    expected_state = ShadeState(16, device="cuda")
    y_ref = source.clone().requires_grad_()
    expected = reference.penalty(y_ref, expected_state)
    (expected_grad,) = torch.autograd.grad(expected, y_ref)
    state = ShadeState(16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = torch.zeros_like(source).requires_grad_()
        torch.cuda._sleep(100_000_000)  # tens of milliseconds of GPU time
        with torch.no_grad():
            y.copy_(source)
        value = shade_ops.penalty(y, state, backend="triton")
        (grad,) = torch.autograd.grad(value, y)
        done = torch.cuda.Event()
        done.record(side)
    assert not done.query(), "the side stream finished early: nothing here waits for it"
    done.synchronize()
    assert_close(value, expected, torch.float32, "penalty", "side stream")
    assert_close(grad, expected_grad, torch.float32, "grad", "side stream")
    assert_close(state.mu, expected_state.mu, torch.float32, "state", "side stream")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA GPUs")
def test_cuda_launches_on_the_device_of_its_tensors():
    """y on cuda:1 while the current device is 0: the kernels run on cuda:1, on its current
    stream, and agree with the reference."""
    y = random_activations((64, 16, 30)).to("cuda:1").requires_grad_()
    state = ShadeState(16, device="cuda:1")
    with torch.cuda.device(0):
        value = shade_ops.penalty(y, state, backend="triton")
        (grad,) = torch.autograd.grad(value, y)
    y_ref = y.detach().clone().requires_grad_()
    expected = reference.penalty(y_ref, ShadeState(16, device="cuda:1"))
    (expected_grad,) = torch.autograd.grad(expected, y_ref)
    assert value.device == torch.device("cuda:1") and grad.device == torch.device("cuda:1")
    assert_close(value, expected, torch.float32, "penalty", "cuda:1")
    assert_close(grad, expected_grad, torch.float32, "grad", "cuda:1")


# ---- benchmarks/gpu_check.py on the CPU ----------------------------------------------------

def _gpu_check():
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_gpu_check_arguments():
    gc = _gpu_check()
    args = gc.parse_args([])
    assert args.device == "cuda" and args.shapes == gc.SHAPES and args.dtypes == gc.DTYPES
    assert not args.skip_install and not args.dry_run and not args.no_model
    dry = gc.parse_args(["--dry-run", "--shape", "3x4x5", "--dtype", "float32"])
    assert dry.device == "cpu" and dry.skip_install and dry.skip_tests and dry.skip_compile
    assert not dry.no_model  # the dry run goes through the model-level cases too
    assert dry.shapes == [(3, 4, 5)] and dry.dtypes == ["float32"]
    assert gc.parse_shape("256x64x56x56") == (256, 64, 56, 56)
    for bad in ("7", "3xa", "0x4"):
        with pytest.raises(Exception):
            gc.parse_shape(bad)


def test_gpu_check_cases_and_names():
    """The harness cases of the check: Triton only where it agreed with the reference."""
    gc = _gpu_check()
    own = ["--shape", "8x4x3x3", "--shape", "37x9", "--dtype", "float32"]
    penalty, model = gc.cases(gc.parse_args(own + ["--no-suite"]),
                              {((8, 4, 3, 3), "float32"): True})
    assert len(penalty) == 6 and {c.layout for c in penalty} == {"nchw", "nd"}
    assert all(("triton" in c.providers) == (c.shape == (8, 4, 3, 3)) for c in penalty)
    assert all("compile" in c.providers and "reference" in c.providers for c in penalty)
    assert {(c.op, c.layout) for c in model} == {
        ("shade_relu", "nchw"), ("step_resnet20", "nchw"), ("step_resnet20", "channels_last")}
    assert gc.cases(gc.parse_args(["--no-model", "--no-suite"]), {})[1] == []
    # by default the CPU suite's op cases follow, last, on the device; Triton only where agreed
    args = gc.parse_args(own)
    suite = gc.suite_cases(args)
    assert suite and {c.layout for c in suite} == {"nchw", "channels_last", "nd", "nld"}
    agreed = {(c.shape, c.dtype): c.layout != "nld" for c in suite}
    _, rest = gc.cases(args, agreed)
    tail = rest[-len(suite):]
    assert [(c.op, c.shape, c.dtype) for c in tail] == [(c.op, c.shape, c.dtype) for c in suite]
    assert all(("triton" in c.providers) == (c.layout != "nld") for c in tail
               if "triton" in next(s for s in suite if s.shape == c.shape).providers)
    assert gc.suite_cases(gc.parse_args(own + ["--quick"])) == []
    assert gc.suite_cases(gc.parse_args(["--dry-run"])) == []
    assert gc.device_slug("NVIDIA H200") == "nvidia-h200"
    assert gc.result_name("NVIDIA H200").startswith("gpu_check_")
    assert gc.result_name("NVIDIA H200").endswith("_nvidia-h200.json")
    assert gc.pytest_summary("x\n===== 3 passed, 1 skipped in 2.0s =====\n") == \
        "3 passed, 1 skipped in 2.0s"


def test_gpu_check_runs_commands_without_raising():
    gc = _gpu_check()
    done = gc.run_command([sys.executable, "-c", "print('== 2 passed in 0.1s ==')"], 60)
    assert done["returncode"] == 0 and done["summary"] == "2 passed in 0.1s"
    late = gc.run_command([sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert late["returncode"] is None and "timed out" in late["tail"]
    assert gc.succeeded(dict(tests=[done, dict(skipped="time budget")]))
    assert not gc.succeeded(dict(tests=[done, dict(returncode=1)]))
    assert not gc.succeeded(dict(error="RuntimeError: no CUDA device"))
    # on a GPU, the CUDA tests of the Triton backend must have run: all skipped is a failure
    on_gpu = dict(device="cuda", skip_tests=False)
    skipped = dict(returncode=0, summary="40 skipped in 2.0s")
    assert not gc.succeeded(dict(args=on_gpu, tests=[skipped]))
    assert gc.succeeded(dict(args=on_gpu, tests=[dict(returncode=0, summary="3 passed in 1s")]))
    assert not gc.succeeded(dict(args=on_gpu, tests=[]))
    wrong = dict(ok=False, text="WRONG with float64 reference (penalty 3.0e-01)")
    assert not gc.succeeded(dict(tests=[done], agreement=[wrong]))
    assert gc.succeeded(dict(tests=[done], agreement=[{**wrong, "ok": True}]))
    assert not gc.succeeded(dict(tests=[done], errors=["penalty forward nd 37x9: RuntimeError"]))


def test_gpu_check_quick_and_budgets():
    gc = _gpu_check()
    quick = gc.parse_args(["--quick"])
    assert quick.budget == gc.QUICK_BUDGET <= 170
    assert quick.shapes == gc.QUICK_SHAPES
    assert gc.parse_args([]).budget == gc.BUDGET <= 340  # 6 minutes with the start, a rerun fits
    dry = gc.parse_args(["--dry-run"])
    assert dry.out is None and dry.results_dir is None  # writes nowhere in the tree


def test_gpu_check_preflight_names_what_is_missing():
    gc = _gpu_check()
    assert gc.preflight("cpu", after_install=False) is None
    if not torch.cuda.is_available():
        assert "no CUDA device" in gc.preflight("cuda", after_install=False)


def test_gpu_check_agreement_catches_a_wrong_kernel(monkeypatch):
    """The check before timing: a kernel that drifts from the reference is reported WRONG."""
    if "triton" not in shade_ops.available_backends("cpu"):
        pytest.skip("needs the Triton interpreter")
    gc = _gpu_check()
    ok, text = gc.agreement((3, 4, 5), "float32", "cpu")
    assert ok and text.startswith("agrees"), text
    penalty = shade_ops.penalty
    monkeypatch.setattr(shade_ops, "penalty", lambda *a, **k: penalty(*a, **k) * 1.01)
    ok, text = gc.agreement((3, 4, 5), "float32", "cpu")
    assert not ok and text.startswith("WRONG"), text


@needs_interpreter
def test_gpu_check_dry_run(tmp_path, monkeypatch):
    """The whole check on tiny shapes through the interpreter, timed by the harness: the
    penalty, ShadeReLU, a ResNet-8's step, in the harness's results format; saved after every
    case, so a run that dies midway leaves them."""
    gc = _gpu_check()
    saved = []
    write_results = gc.write_results

    def look_then_write(report, args):
        saved.append(len(report.get("rows", [])))
        return write_results(report, args)

    monkeypatch.setattr(gc, "write_results", look_then_write)
    report = gc.main(["--dry-run", "--shape", "3x4x5", "--dtype", "float32",
                      "--out", str(tmp_path / "out"), "--results-dir", str(tmp_path / "results")])
    assert gc.succeeded(report), report.get("error")
    assert len(set(saved)) >= 4  # written as the rows came in
    assert report["agreement"][0]["ok"] and report["schema"] == 1
    rows = report["rows"]
    penalty = {(r["phase"], r["provider"]) for r in rows if r["op"] == "penalty"}
    assert penalty == {(p, i) for p in ("forward", "backward", "forward_backward")
                       for i in ("triton", "reference")}
    assert {(r["op"], r["provider"]) for r in rows if r["op"] != "penalty"} == {
        ("copy", "copy"), ("shade_relu", "triton"), ("shade_relu", "nn_relu"),
        ("step_resnet8", "plain"), ("step_resnet8", "triton")}
    assert {r["memory_format"] for r in rows if r["suite"] == "step"} == \
        {"contiguous", "channels_last"}
    assert all(r["time_ms"] > 0 and r["timer"] == "cpu-perf_counter" for r in rows)
    written = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert written["machine"]["device"] == "cpu" and len(written["rows"]) == len(rows)
    markdown = list((tmp_path / "results").glob("gpu_check_*.md"))
    assert len(markdown) == 1 and len(list((tmp_path / "results").glob("gpu_check_*.json"))) == 1
    text = markdown[0].read_text()
    assert "| penalty | 3x4x5 | float32 | forward | nd | triton |" in text
    assert "| step_resnet8 | 2x3x8x8 | float32 | step | channels_last | triton |" in text
