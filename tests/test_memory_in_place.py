"""recompute_relu and in-place changes made after a layer saved a tensor: what docs/usage.md
says, checked against plain autograd."""
import contextlib

import pytest
import torch
from torch import nn

import shade_ops
from shade_ops.modules import ShadeReLU


def _step(context: str, change: str):
    """One forward and backward where, after the linear layer saved the ReLU's output ``out``,
    ``change`` modifies a tensor in place: ``out`` itself, or ``h``, a tensor that is no ReLU
    output (saved by ``h * h``). ``context``: "plain", "recompute" (inside recompute_relu) or
    "copy" (plain, the layer given a copy of ``out``: the gradients of the forward as it ran).
    Returns the gradients and the state, or the RuntimeError's message."""
    torch.manual_seed(0)
    relu, linear = ShadeReLU(), nn.Linear(6, 3)
    y = torch.randn(4, 6, requires_grad=True)
    with shade_ops.recompute_relu() if context == "recompute" else contextlib.nullcontext():
        out = relu(y)
        z = linear(out.clone() if context == "copy" else out)
        h = y * 3
        square = h * h
        (out if change == "out" else h).mul_(2)
        loss = z.sum() + out.sum() + square.sum() + shade_ops.collect(relu)
    try:
        loss.backward()
    except RuntimeError as error:
        return str(error)
    return [y.grad, linear.weight.grad, linear.bias.grad, *relu.state.buffers()]


def test_a_relu_output_changed_after_it_was_saved_keeps_the_gradients_of_the_forward():
    """Plain autograd refuses it; inside recompute_relu the saved output is rebuilt from the
    ReLU's input, unchanged, so the backward runs with the gradients of the forward as it ran
    (those of the layer given a copy), bit for bit."""
    assert "modified by an inplace operation" in _step("plain", "out")
    inside, copied = _step("recompute", "out"), _step("copy", "out")
    assert not isinstance(inside, str), inside
    for a, b in zip(inside, copied):
        assert torch.equal(a, b)


@pytest.mark.parametrize("context", ["plain", "recompute"])
def test_any_other_saved_tensor_changed_after_it_was_saved_is_an_error(context):
    message = _step(context, "h")
    assert isinstance(message, str) and "modified" in message
