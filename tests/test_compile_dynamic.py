"""torch.compile with dynamic shapes over inputs that are not contiguous with units on dim 1.

Under ``dynamic=True``, or once a new input size makes dynamo mark dims dynamic, the strides are
symbolic: the (A, C, B) view of ``_layout.py`` must still order the dims by memory (channels-last
4-D and 5-D, a transposed ``(N, L, D)`` with units on -1, a sliced input). Each case trains a few
steps on inputs of changing batch and spatial sizes; the loss, the gradient and the state (p and
mu) agree with eager after every step. Compiling is slow, so the cases pair each layout with both
ops and both ways of getting dynamic shapes rather than taking every combination.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import pytest
import torch
from torch import nn

import shade_ops
from shade_ops import ShadeState

from conftest import (FUSED_BACKENDS, SLOW_BACKENDS, assert_compiled_matches_eager,
                      random_activations)

UNITS = 5


def _channels_last(shape):
    return lambda seed: random_activations(shape, seed=seed).to(
        memory_format=torch.channels_last)


def _channels_last_3d(shape):
    return lambda seed: random_activations(shape, seed=seed).to(
        memory_format=torch.channels_last_3d)


def _transposed(shape):  # (N, D, L) stored, seen as (N, L, D) with units on -1
    n, length = shape
    return lambda seed: random_activations((n, UNITS, length), seed=seed).transpose(1, 2)


def _sliced(shape):  # every other column of a wider tensor, past its first image
    n, h, w = shape
    return lambda seed: random_activations((n + 1, UNITS, h, 2 * w + 1),
                                           seed=seed)[1:, :, :, 1::2]


@dataclasses.dataclass(frozen=True)
class Layout:
    make: Callable          # shape -> (seed -> y)
    shapes: tuple           # one per step: batch and spatial sizes change every step
    unit_dim: int = 1


# Within a shape no two sizes are equal, nor equal to UNITS: dynamo would give equal sizes one
# symbol (duck sizing) and compile again for the next shape, whatever the layout code does.
LAYOUTS = {
    "channels_last": Layout(_channels_last, ((2, UNITS, 3, 7), (3, UNITS, 6, 4),
                                             (4, UNITS, 9, 8))),
    "channels_last_3d": Layout(_channels_last_3d, ((2, UNITS, 3, 4, 6), (3, UNITS, 2, 7, 4),
                                                   (4, UNITS, 3, 2, 6))),
    "transposed": Layout(_transposed, ((2, 7), (3, 11), (6, 4)), unit_dim=-1),
    "sliced": Layout(_sliced, ((3, 4, 6), (4, 3, 7), (2, 6, 3))),
}

# (layout, op, dynamic): each layout with both ops and both ways of getting dynamic shapes.
CASES = [
    ("channels_last", "relu_penalty", True), ("channels_last", "penalty", None),
    ("channels_last_3d", "penalty", True), ("channels_last_3d", "relu_penalty", None),
    ("transposed", "relu_penalty", True), ("transposed", "penalty", None),
    ("sliced", "penalty", True), ("sliced", "relu_penalty", None),
]
# The interpreter costs 0.05-2 s a launch: one case of each layout, two steps.
SLOW_CASES = [case for case in CASES if case[2] is True]


def _step(op: str, backend: str, unit_dim: int):
    if op == "penalty":
        def step(y, state):
            return shade_ops.penalty(y, state, unit_dim=unit_dim, backend=backend) * 3.0
    else:
        def step(y, state):  # relu(y) enters the loss: its values and layout are checked too
            out, value = shade_ops.relu_penalty(y, state, unit_dim=unit_dim, backend=backend)
            return value + 0.1 * (out * out).sum()
    return step


def _params():
    for backend in ["reference", *FUSED_BACKENDS]:
        for layout, op, dynamic in SLOW_CASES if backend in SLOW_BACKENDS else CASES:
            mode = "dynamic" if dynamic else "resized"
            yield pytest.param(backend, layout, op, dynamic, id=f"{backend}-{layout}-{op}-{mode}")


@pytest.mark.parametrize("backend, layout, op, dynamic", list(_params()))
def test_compiled_dynamic_shapes_match_eager(backend, layout, op, dynamic):
    """``dynamic=True``: one graph for every size. ``dynamic=None``: the second size compiles a
    dynamic graph, which the third reuses."""
    torch._dynamo.reset()
    spec = LAYOUTS[layout]
    shapes = spec.shapes[:2] if backend in SLOW_BACKENDS else spec.shapes
    step = _step(op, backend, spec.unit_dim)
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic,
                             backend="inductor" if backend == "cpu" else "aot_eager")
    eager_state, compiled_state = ShadeState(UNITS), ShadeState(UNITS)

    def make_y(i):
        y = spec.make(shapes[i])(i)
        assert not y.is_contiguous() and y.shape[spec.unit_dim] == UNITS
        return y

    assert_compiled_matches_eager(step, compiled, eager_state, compiled_state, make_y,
                                  steps=len(shapes))
    assert not torch.equal(compiled_state.mu, ShadeState(UNITS).mu), "the state was never updated"
    # Compiled versions of step, not backend calls (dynamo restarts its first trace once to
    # turn the state's float decay into a symbol, calling the backend twice).
    versions = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(step.__code__))
    assert versions == (1 if dynamic else 2), \
        f"{versions} compiled versions of step for {len(shapes)} sizes"
    torch._dynamo.reset()


# ---- a converted conv stack ---------------------------------------------------------------

def _conv_stack() -> nn.Module:
    relu = nn.ReLU()  # one module at two call sites, as torchvision's BasicBlock has
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), relu, nn.Conv2d(8, 8, 3, padding=1), relu)


def _sites(model: nn.Module) -> list[ShadeState]:
    return [state for m in model.modules() if isinstance(m, shade_ops.ShadeReLU)
            for state in m.states]


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b not in SLOW_BACKENDS])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format],
                         ids=["channels_last", "contiguous"])
def test_compiled_conv_stack_matches_eager(backend, memory_format):
    """A converted Conv-ReLU-Conv-ReLU, compiled with dynamic shapes, on square images of two
    sizes and two batch sizes. Channels-last was the failure: the second conv saves the first
    ShadeReLU's output for its backward, and Inductor could not order the strides of a view of
    the op's output (8 s^2, 1, 8 s, 8) (``_layout.output_view_breaks_inductor``)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = shade_ops.convert(_conv_stack(), backend=backend).to(memory_format=memory_format)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    # Square images (H and W one symbol, the failing case); N is neither H nor a channel count
    for step, (n, size) in enumerate([(2, 6), (2, 10), (5, 10)]):
        x = random_activations((n, 3, size, size), seed=step).to(memory_format=memory_format)
        out_eager, out = eager(x), compiled(x)
        assert out.stride() == out_eager.stride(), f"step {step}: relu(y)'s memory format"
        g = torch.randn(out.shape).to(memory_format=memory_format)
        loss_eager = (out_eager * g).sum() + shade_ops.collect(eager)
        loss = (out * g).sum() + shade_ops.collect(model)
        loss_eager.backward()
        loss.backward()
        _close(loss, loss_eager, f"step {step} loss")
        for (name, p_eager), p in zip(eager.named_parameters(), model.parameters()):
            _close(p.grad, p_eager.grad, f"step {step} grad of {name}")
        sites_eager, sites = _sites(eager), _sites(model)
        assert len(sites) == len(sites_eager) == 2
        for site, (s, s_eager) in enumerate(zip(sites, sites_eager)):
            _close(s.p, s_eager.p, f"step {step} site {site} p")
            _close(s.mu, s_eager.mu, f"step {step} site {site} mu")
    torch._dynamo.reset()


def _close(actual, expected, what):
    # inductor may fuse the convolutions' neighbours in another order: float32 rounding apart
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: {m}")
