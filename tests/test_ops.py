"""The registered ops (opcheck, torch.compile), the state's rules (guards, modes, checkpoints),
bad input, reproducibility and the fallback without the extension."""
from __future__ import annotations

import warnings

import pytest
import torch

import shade_ops
from shade_ops import ShadeState, _ops, reference

from conftest import FUSED_BACKENDS, assert_close, assert_compiled_matches_eager, random_activations

native = pytest.mark.skipif(_ops.NATIVE_OPS is None, reason="shade_ops._C is not built")


def snapshot(state: ShadeState) -> dict:
    return {k: v.clone() for k, v in state.state_dict().items()}


def assert_same_state(state: ShadeState, before: dict) -> None:
    for key, value in state.state_dict().items():
        assert torch.equal(value, before[key]), f"state {key} changed"


# ---- opcheck ----------------------------------------------------------------------------

@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 5, 7), (9, 4, 1), (4, 3, 2, 3), (7, 6)])
def test_opcheck_penalty_ops(shape, dtype):
    _opcheck_penalty_ops(random_activations(shape, dtype, seed=1).requires_grad_(), dtype)


@native
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "transposed"])
def test_opcheck_penalty_ops_on_layouts(layout):
    """Non-contiguous y (the ops read any strides; what _layout.py hands them is contiguous): the
    fake implementations give the real kernels' shapes and strides."""
    if layout == "channels_last":
        y = random_activations((3, 4, 5, 6), seed=2).to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        y = random_activations((3, 4, 2, 5, 3), seed=2).to(memory_format=torch.channels_last_3d)
    else:
        y = random_activations((6, 7, 5), seed=2).transpose(1, 2)
    assert not y.is_contiguous()
    _opcheck_penalty_ops(y.requires_grad_(), torch.float32)


def _opcheck_penalty_ops(y, dtype):
    mu = ShadeState(y.shape[1]).mu.clone()
    ops = torch.ops.shade_ops
    for reduction in ("mean", "sum"):
        torch.library.opcheck(ops.penalty_forward.default, (y, mu, reduction))
        torch.library.opcheck(ops.relu_penalty_forward.default, (y, mu, reduction))
        grad_penalty = torch.tensor(0.7, dtype=torch.float64 if dtype == torch.float64
                                    else torch.float32)
        torch.library.opcheck(ops.penalty_backward.default,
                              (grad_penalty, y.detach(), mu, reduction, None))
        torch.library.opcheck(ops.penalty_backward.default,
                              (grad_penalty, y.detach(), mu, reduction, torch.randn_like(y)))


def test_ops_take_trailing_dims_as_their_merged_view(backend):
    """(A, C, ...) is (A, C, B) with the trailing dims merged: same results, outputs in y's shape
    (what spares a contiguous NCHW tensor a view and its autograd node)."""
    ops = _ops.resolve_backend(backend, torch.device("cpu"))
    y = random_activations((3, 5, 2, 3), seed=7)
    g = torch.randn(3, 5, 2, 3)
    mu = ShadeState(5).mu.clone()
    flat = y.view(3, 5, 6)
    for reduction in ("mean", "sum"):
        value, sums, out, _ = ops.relu_forward(y, mu, reduction)
        value3, sums3, out3, _ = ops.relu_forward(flat, mu, reduction)
        assert torch.equal(value, value3) and torch.equal(sums, sums3)
        assert out.shape == y.shape and torch.equal(out.view(3, 5, 6), out3)
        assert torch.equal(ops.forward(y, mu, reduction)[0], value3)
        grad_penalty = torch.tensor(0.3)
        grad = ops.backward(grad_penalty, y, mu, reduction, g)
        grad3 = ops.backward(grad_penalty, flat, mu, reduction, g.view(3, 5, 6))
        assert grad.shape == y.shape and torch.equal(grad.view(3, 5, 6), grad3)
    with pytest.raises(RuntimeError, match=r"\(A, C, \.\.\.\)"):
        ops.forward(torch.randn(5), mu[:, :1].contiguous(), "mean")


@native
def test_opcheck_update_state():
    sums = torch.tensor([[3.0, 1.0], [2.0, -1.0], [-4.0, -6.0], [5.0, 5.0]])
    state = ShadeState(2)
    torch.library.opcheck(torch.ops.shade_ops.update_state.default,
                          (state.p.clone(), state.mu.clone(), sums, 0.8))


# ---- torch.compile ----------------------------------------------------------------------

def test_compile_fullgraph_matches_eager(backend):
    """Two training steps: the state updated by step 1 is what step 2's backward must use."""
    torch._dynamo.reset()

    def step(y, state):
        return shade_ops.penalty(y, state, backend=backend) * 3.0

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if backend == "cpu"
                             else "aot_eager")
    eager_state, compiled_state = ShadeState(5), ShadeState(5)
    assert_compiled_matches_eager(step, compiled, eager_state, compiled_state,
                                  lambda i: random_activations((7, 5, 3), seed=i), steps=3)
    assert not torch.equal(compiled_state.mu, ShadeState(5).mu), "the state was never updated"


# ---- bad input --------------------------------------------------------------------------

BAD_INPUTS = [
    (lambda: torch.ones(4, 3, dtype=torch.int64), {}, TypeError, "floating-point"),
    (lambda: torch.ones(4, 3, dtype=torch.bool), {}, TypeError, "floating-point"),
    (lambda: torch.ones(4, 3, dtype=torch.complex64), {}, TypeError, "floating-point"),
    (lambda: [[1.0, 2.0, 3.0]], {}, TypeError, "torch.Tensor"),
    (lambda: torch.ones(4, 5), {}, ValueError, "5 units"),
    (lambda: torch.ones(4, 3), {"unit_dim": 2}, ValueError, "out of range"),
    (lambda: torch.ones(4, 3), {"unit_dim": -3}, ValueError, "out of range"),
    (lambda: torch.ones(()), {"unit_dim": 0}, ValueError, "out of range"),
    (lambda: torch.ones(4, 3), {"reduction": "max"}, ValueError, "reduction"),
    (lambda: torch.ones(4, 3), {"backend": "fast"}, ValueError, "backend"),
    (lambda: torch.ones(3, 4), {"unit_dim": 0.5}, TypeError, "unit_dim"),
]


@pytest.mark.parametrize("call", [shade_ops.penalty, shade_ops.relu_penalty, reference.penalty])
@pytest.mark.parametrize("make_y, kwargs, error, message", BAD_INPUTS)
def test_bad_input_raises_and_keeps_state(call, make_y, kwargs, error, message):
    state = ShadeState(3)
    before = snapshot(state)
    with pytest.raises(error, match=message):
        call(make_y(), state, **kwargs)
    assert_same_state(state, before)


def test_state_on_another_device_raises():
    state = ShadeState(3, device="meta")
    with pytest.raises(ValueError, match="meta"):
        shade_ops.penalty(torch.ones(4, 3), state)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_decay_raises(decay):
    with pytest.raises(ValueError, match="decay"):
        ShadeState(3, decay=decay)


@pytest.mark.parametrize("num_units", [0, -2, 2.5, True])
def test_bad_num_units_raises(num_units):
    with pytest.raises(ValueError, match="num_units"):
        ShadeState(num_units)


def test_unavailable_backend_names_what_is_missing():
    with pytest.raises(RuntimeError, match="CUDA C"):
        shade_ops.penalty(torch.ones(4, 3), ShadeState(3), backend="cuda")


# ---- the state's rules ------------------------------------------------------------------

@pytest.mark.parametrize("call_backend", ["reference", *FUSED_BACKENDS])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_unit_keeps_its_state(call_backend, bad):
    y = random_activations((6, 4, 5), seed=2)
    y[3, 2, 1] = bad
    state = ShadeState(4)
    before = snapshot(state)
    value = shade_ops.penalty(y, state, backend=call_backend)
    assert not torch.isfinite(value)  # NaN/Inf reaches the loss, as in any loss
    assert torch.equal(state.p[:, 2], before["p"][:, 2])
    assert torch.equal(state.mu[:, 2], before["mu"][:, 2])
    for unit in (0, 1, 3):
        assert not torch.equal(state.mu[:, unit], before["mu"][:, unit])
    expected = ShadeState(4)
    reference.penalty(y, expected)
    assert_close(state.mu, expected.mu, torch.float32, "state")


@pytest.mark.parametrize("call_backend", ["reference", *FUSED_BACKENDS])
@pytest.mark.parametrize("shape", [(0, 3, 4), (5, 3, 0), (0, 3)])
def test_empty_batch_costs_nothing_and_keeps_state(call_backend, shape):
    y = torch.empty(shape, requires_grad=True)
    state = ShadeState(3)
    before = snapshot(state)
    value = shade_ops.penalty(y, state, backend=call_backend)
    assert value.item() == 0.0
    assert_same_state(state, before)
    (grad,) = torch.autograd.grad(value, y)
    assert grad.shape == y.shape


def test_zero_probability_keeps_mu():
    """decay 0 and no positive sample: p1 becomes 0 and mu1 keeps its value."""
    state = ShadeState(2, decay=0.0)
    shade_ops.penalty(-torch.rand(8, 2) - 0.1, state)
    assert torch.equal(state.p[1], torch.zeros(2))
    assert torch.equal(state.mu[1], torch.ones(2))
    assert torch.all(state.mu[0] < 0)


def test_eval_mode_and_update_override(backend):
    y = random_activations((8, 3, 2), seed=4)
    state = ShadeState(3).eval()
    before = snapshot(state)
    shade_ops.penalty(y, state, backend=backend)
    assert_same_state(state, before)  # eval: no update, as BatchNorm's running stats
    shade_ops.penalty(y, state, backend=backend, update=True)
    assert not torch.equal(state.mu, before["mu"])
    state.train()
    before = snapshot(state)
    shade_ops.penalty(y, state, backend=backend, update=False)
    assert_same_state(state, before)


def test_penalty_uses_state_before_update(backend):
    y = random_activations((8, 3, 2), seed=5)
    state, frozen = ShadeState(3), ShadeState(3)
    value = shade_ops.penalty(y, state, backend=backend)
    assert torch.equal(value, shade_ops.penalty(y, frozen, backend=backend, update=False))


def test_no_gradient_flows_into_the_state(backend):
    y = random_activations((8, 3, 2), seed=6).requires_grad_()
    state = ShadeState(3)
    shade_ops.penalty(y, state, backend=backend).backward()
    assert not state.mu.requires_grad and state.mu.grad is None


def test_state_dict_round_trip(backend):
    state = ShadeState(4, decay=0.7)
    for i in range(3):
        shade_ops.penalty(random_activations((5, 4, 3), seed=i), state, backend=backend)
    restored = ShadeState(4, decay=0.7)
    restored.load_state_dict(state.state_dict())
    assert_same_state(restored, snapshot(state))
    y = random_activations((5, 4, 3), seed=9)
    assert torch.equal(shade_ops.penalty(y, state, backend=backend),
                       shade_ops.penalty(y, restored, backend=backend))
    assert_same_state(restored, snapshot(state))
    assert set(state.state_dict()) == {"p", "mu"}


def test_initial_state_is_algorithm_1():
    state = ShadeState(3)
    assert torch.equal(state.p, torch.full((2, 3), 0.5))
    assert torch.equal(state.mu, torch.tensor([[-1.0] * 3, [1.0] * 3]))
    assert state.decay == 0.8 and state.p.dtype == torch.float32


def test_update_is_algorithm_1_by_hand():
    """One update of one unit, worked out from SPEC section 4 with plain floats."""
    import math

    values = [-1.0, 0.5, 2.0]
    q = [math.exp(-max(v, 0.0)) for v in values]
    s = [1 - x for x in q]
    b1, m1 = sum(s) / 3, sum(a * v for a, v in zip(s, values)) / 3
    m0 = sum(a * v for a, v in zip(q, values)) / 3
    p1 = 0.8 * 0.5 + 0.2 * b1
    p0 = 0.8 * 0.5 + 0.2 * (1 - b1)
    expected_mu = [0.8 * -1 + 0.2 * m0 / p0, 0.8 * 1 + 0.2 * m1 / p1]
    for call_backend in ["reference", *FUSED_BACKENDS]:
        state = ShadeState(1, dtype=torch.float64)
        shade_ops.penalty(torch.tensor(values, dtype=torch.float64).view(3, 1), state,
                          backend=call_backend)
        torch.testing.assert_close(state.p[:, 0].tolist(), [p0, p1])
        torch.testing.assert_close(state.mu[:, 0].tolist(), expected_mu)


# ---- reproducibility --------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 24, 300), (700, 40), (16, 8, 12, 12)])
def test_two_runs_bitwise_equal(backend, shape):
    if backend != "cpu" and shape[0] > 16:
        pytest.skip("large shapes on the native backend only")
    results = []
    for _ in range(2):
        state = ShadeState(shape[1])
        y = random_activations(shape, seed=11).requires_grad_()
        value = shade_ops.penalty(y, state, backend=backend)
        (grad,) = torch.autograd.grad(value, y)
        results.append((value, grad, state.p.clone(), state.mu.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@native
@pytest.mark.parametrize("shape", [(64, 24, 300), (700, 40)])
def test_same_bits_whatever_the_thread_count(shape):
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            state = ShadeState(shape[1])
            value = shade_ops.penalty(random_activations(shape, seed=12), state, backend="cpu")
            results.append((value, state.mu.clone()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ---- the native exp, and gradients left undefined ---------------------------------------

@native
@pytest.mark.parametrize("units", [4096 + 5, 1])
def test_native_exp_within_2_ulp(units):
    """With one sample per unit, the sum of q*y is q*y itself: q = exp(-y) within 2 ulp (the
    kernel's exp is within 1.3 ulp, and the product and this division round once each), on the
    vector lanes and on the scalar tail, from 0 up to 87 (below that exp is subnormal)."""
    y = torch.linspace(1e-6, 87.0, units) if units > 1 else torch.tensor([3.7])
    _, sums, _ = torch.ops.shade_ops.penalty_forward(y.view(1, units, 1),
                                                      ShadeState(units).mu, "sum")
    q = sums[2].double() / y.double()
    expected = torch.exp(-y.double())
    ulp = torch.finfo(torch.float32).eps * expected  # relative spacing of float32, 2**-23
    assert ((q - expected).abs() <= 2 * ulp).all(), ((q - expected).abs() / ulp).max()
    s_error = (sums[0].double() - (1 - expected)).abs()
    assert (s_error <= 2 * torch.finfo(torch.float32).eps).all()


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


BACKWARD_OPS = {"cpu": "shade_ops::penalty_backward",
                "triton": "shade_ops::triton_penalty_backward"}


def test_relu_gradient_alone_when_the_penalty_is_left_out(backend):
    """Autograd does not materialise the penalty's gradient: a ShadeReLU whose penalty is not in
    the loss costs only ReLU's backward, and gives exactly its gradient."""
    y = random_activations((6, 5, 7), seed=3).requires_grad_()
    g = torch.randn(6, 5, 7)
    act = shade_ops.ShadeReLU(unit_dim=1, backend=backend)
    out = act(y)
    grads = []
    ran = _ops_run(lambda: grads.append(torch.autograd.grad(out, y, g)[0]))
    (expected,) = torch.autograd.grad(torch.relu(y), y, g)
    assert torch.equal(grads[0], expected)
    assert BACKWARD_OPS[backend] not in ran


def test_penalty_gradient_alone_when_the_output_is_left_out(backend):
    y = random_activations((6, 5, 7), seed=4).requires_grad_()
    act = shade_ops.ShadeReLU(unit_dim=1, backend=backend)
    act(y)
    grads = []
    ran = _ops_run(lambda: grads.append(torch.autograd.grad(act.penalty, y)[0]))
    (expected,) = torch.autograd.grad(shade_ops.penalty(y, ShadeState(5), backend=backend), y)
    assert torch.equal(grads[0], expected)
    assert BACKWARD_OPS[backend] in ran


def test_kernels_built_for_missing_instructions_are_refused(monkeypatch):
    """setup.py compiles for the building CPU; on a CPU without those instructions the kernels
    would die on an illegal instruction, so the cpu backend says so instead."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    why = _ops.cpu_kernels_unusable("avx512")
    assert why is not None and "AVX512" in why and "make build" in why
    assert _ops.cpu_kernels_unusable("default") is None
    monkeypatch.setattr(_ops, "CPU_KERNELS_ERROR", why)
    assert "cpu" not in shade_ops.available_backends("cpu")
    with pytest.raises(RuntimeError, match="AVX512"):
        shade_ops.penalty(random_activations((5, 3), seed=1), ShadeState(3), backend="cpu")


# ---- without the extension --------------------------------------------------------------

def test_without_extension_auto_warns_once_and_cpu_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ops, "NATIVE_OPS", None)
    monkeypatch.setattr(_ops, "NATIVE_IMPORT_ERROR", "shade_ops._C is not built; " + _ops.BUILD_HINT)
    monkeypatch.setattr(_ops, "_warned_fallback", False)
    y = random_activations((5, 3), seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = shade_ops.penalty(y, ShadeState(3))
        shade_ops.penalty(y, ShadeState(3))
    assert len([w for w in caught if "eager reference" in str(w.message)]) == 1
    assert torch.equal(value, reference.penalty(y, ShadeState(3)))
    with pytest.raises(RuntimeError, match="make build"):
        shade_ops.penalty(y, ShadeState(3), backend="cpu")
    assert "cpu" not in shade_ops.available_backends("cpu")


def test_available_backends():
    names = shade_ops.available_backends()
    assert names[0] == "reference"
    assert ("cpu" in names) == (_ops.NATIVE_OPS is not None)


# ---- 64-bit offsets ---------------------------------------------------------------------

@native
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 1, 2**31 + 11), (2**30 + 5, 2, 1)])
def test_more_than_2_31_elements(shape):
    """bfloat16 zeros but for the last element: every sum is known in closed form, and only
    64-bit offsets reach that element. (On a GPU the same size runs in the CUDA tests.)"""
    y = torch.zeros(shape, dtype=torch.bfloat16)
    y.view(-1)[-1] = 2.0
    unit = (y.numel() - 1) % shape[1]
    mu = ShadeState(shape[1]).mu
    value, sums, _ = torch.ops.shade_ops.penalty_forward(y, mu, "sum")
    q = torch.exp(torch.tensor(-2.0)).item()
    count = y.numel() // shape[1]
    assert sums[3, unit].item() == torch.tensor(float(count)).item()  # K as a float32
    torch.testing.assert_close(sums[0, unit].item(), 1 - q)
    torch.testing.assert_close(sums[1, unit].item(), 2 * (1 - q))
    torch.testing.assert_close(sums[2, unit].item(), 2 * q)
    grad = torch.ops.shade_ops.penalty_backward(torch.tensor(1.0), y, mu, "sum", None)
    # y = 2, mu0 = -1, mu1 = 1: ds ((y-mu1)^2 - (y-mu0)^2) + 2 (s (y-mu1) + q (y-mu0))
    expected = q * (1 - 9) + 2 * ((1 - q) * 1 + q * 3)
    torch.testing.assert_close(grad.view(-1)[-1].float().item(), expected, rtol=1e-2, atol=1e-2)
    del grad


# ---- the lanes loops and the run loops --------------------------------------------------

# Runs (B) on both sides of the switch between the CPU loops (lanes below a float vector's
# length, 8 or 16; runs walked unit by unit for batches of at most 16, in memory order above:
# A = 20), runs longer than the 1024-element tile of float16 / bfloat16 output (B = 1500), a
# sample count that makes several chunks (A = 1500) and one past the single-thread bound
# (A = 6000, 144k elements).
@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 2), (3, 7, 3), (2, 9, 4), (1, 4, 7), (2, 3, 8),
                                   (2, 6, 9), (3, 5, 15), (2, 4, 16), (2, 3, 17), (2, 2, 31),
                                   (2, 3, 33), (20, 3, 40), (2, 2, 1500), (1500, 3, 4),
                                   (6000, 2, 12)])
def test_short_and_long_runs_match_the_reference(shape, dtype):
    y = random_activations(shape, dtype, seed=sum(shape))
    state = ShadeState(shape[1])
    with torch.no_grad():
        state.mu.copy_(torch.randn(2, shape[1]))
    grad_out = torch.randn(shape, dtype=dtype)
    grad_penalty = torch.tensor(0.7, dtype=torch.float64 if dtype == torch.float64
                                else torch.float32)
    for reduction in ("mean", "sum"):
        value, sums, out, _ = torch.ops.shade_ops.relu_penalty_forward(y, state.mu, reduction)
        expected_value, expected_sums = reference.batch_statistics(y, state.mu.clone(), 1,
                                                                   reduction)
        assert_close(value, expected_value, dtype, "penalty", f"{reduction} penalty")
        assert_close(sums, expected_sums, dtype, "penalty", f"{reduction} sums")
        assert torch.equal(out, torch.relu(y))
        for go in (None, grad_out):
            grad = torch.ops.shade_ops.penalty_backward(grad_penalty, y, state.mu, reduction, go)
            expected = reference.penalty_grad(grad_penalty, y, state.mu, reduction, go)
            assert_close(grad, expected, dtype, "grad", f"{reduction} grad")


@native
@pytest.mark.parametrize("shape", [(6000, 3, 4), (20000, 2, 3)])
def test_short_runs_same_bits_whatever_the_thread_count(shape):
    threads = torch.get_num_threads()
    results = []
    y = random_activations(shape, seed=13)
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            state = ShadeState(shape[1])
            value = shade_ops.penalty(y, state, backend="cpu")
            (grad,) = torch.autograd.grad(shade_ops.penalty(y.requires_grad_(), ShadeState(
                shape[1]), backend="cpu"), y)
            results.append((value, state.mu.clone(), state.p.clone(), grad))
    finally:
        torch.set_num_threads(threads)
        y.requires_grad_(False)
    for a, b in zip(*results):
        assert torch.equal(a, b)
