"""``recompute_relu``: SHADE at the memory cost of a plain ReLU.

A ReLU keeps only its output for the backward, and the layer after it (a convolution, a linear
layer) saves that same output: one tensor held per layer. SHADE's gradient needs the ReLU's input
y as well (where y <= 0 too), so a ``ShadeReLU`` holds y *and*, through the next layer, relu(y):
one more activation-sized tensor per layer (+47% of the activations a CIFAR ResNet-20 step
holds). Inside ``recompute_relu()``, a saved tensor that is the output of a ``ShadeReLU`` (or of
``relu_penalty``) is kept as a reference to its input instead, and rebuilt as ``relu(y)`` when the
backward needs it: the step holds what the plain step holds, at the cost of one ReLU in the
backward. Gradients are bitwise those without it.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator

import torch

__all__ = ["recompute_relu"]

_local = threading.local()


class _FromInput:
    """A saved ReLU output, kept as the ReLU's input and the input's version at the save."""

    __slots__ = ("y", "version")

    def __init__(self, y: torch.Tensor) -> None:
        self.y, self.version = y, y._version


def note_relu_output(out: torch.Tensor, y: torch.Tensor) -> None:
    """Called by every ReLU of shade_ops: inside ``recompute_relu``, remember that ``out`` is
    ``relu(y)``, so that whatever saves ``out`` for the backward keeps ``y`` instead."""
    registry = getattr(_local, "registry", None)
    if registry is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    registry[id(out)] = (weakref.ref(out), y)


def _unpack(saved):
    if not isinstance(saved, _FromInput):
        return saved
    if saved.y._version != saved.version:
        raise RuntimeError(
            "shade_ops.recompute_relu: the input of a ShadeReLU was modified in place after the "
            "ReLU ran, so its output, which the backward rebuilds from that input, cannot be "
            "rebuilt. Leave the ReLU's input unchanged, or train without recompute_relu.")
    return torch.relu(saved.y)


@contextlib.contextmanager
def recompute_relu() -> Iterator[None]:
    """Within this context, the outputs of SHADE's ReLUs that later layers save for the backward
    are kept as the ReLU's input (which SHADE's backward keeps anyway) and recomputed in the
    backward: a step with SHADE holds the memory of the same step without it.

        with shade_ops.recompute_relu():
            loss = criterion(model(x), target) + beta * shade_ops.collect(model)
        loss.backward()

    Like ``torch.autograd.graph.save_on_cpu``, it is a ``saved_tensors_hooks`` context: wrap the
    forward (the backward may run outside it). Eager mode only: inside a ``torch.compile``d
    function it changes nothing, since the compiler decides what that function saves; inside a
    ``torch.utils.checkpoint`` segment the checkpoint's own hooks apply.

    Raises (at the backward):
        RuntimeError: a ShadeReLU's input was modified in place after the ReLU ran.
    """
    registry: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def pack(tensor: torch.Tensor):
        entry = registry.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return _FromInput(entry[1])
        return tensor

    outer = getattr(_local, "registry", None)
    _local.registry = registry
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        _local.registry = outer
