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


_MODIFIED = (
    "shade_ops.recompute_relu: a tensor saved for the backward was modified in place after it was "
    "saved (or a ShadeReLU's input after the ReLU ran), which autograd itself refuses: leave it "
    "unchanged (make the in-place op out of place), or train without recompute_relu.")


class _FromInput:
    """A saved ReLU output, kept as the ReLU's input and that input's version when the ReLU ran."""

    __slots__ = ("y", "version")

    def __init__(self, y: torch.Tensor, version: int) -> None:
        self.y, self.version = y, version


class _Saved:
    """Any other saved tensor, with its version: a saved_tensors_hooks context turns autograd's
    own check of in-place changes off, so the unpack does it."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.version = tensor, tensor._version


def note_relu_output(out: torch.Tensor, y: torch.Tensor) -> None:
    """Called by every ReLU of shade_ops: inside ``recompute_relu``, remember that ``out`` is
    ``relu(y)``, so that whatever saves ``out`` unchanged for the backward keeps ``y`` instead.
    Both are held weakly (the entry goes when ``out`` dies), with their versions now."""
    registry = getattr(_local, "registry", None)
    if registry is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    key = id(out)
    registry[key] = (weakref.ref(out, lambda _, key=key: registry.pop(key, None)), out._version,
                     weakref.ref(y), y._version)


def _pack(registry: dict, tensor: torch.Tensor) -> _FromInput | _Saved:
    entry = registry.get(id(tensor))
    if entry is not None and entry[0]() is tensor and tensor._version == entry[1]:
        y = entry[2]()
        if y is not None and y._version == entry[3]:
            return _FromInput(y, entry[3])
    return _Saved(tensor)


def _unpack(saved: _FromInput | _Saved) -> torch.Tensor:
    if isinstance(saved, _Saved):
        if saved.tensor._version != saved.version:
            raise RuntimeError(_MODIFIED)
        return saved.tensor
    if saved.y._version != saved.version:
        raise RuntimeError(_MODIFIED)
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
    forward (the backward may run outside it). A ReLU output changed in place before a layer
    saves it (``out += x``, an in-place dropout) is saved as it is. Eager mode only: inside a
    ``torch.compile``d function it changes nothing, since the compiler decides what that function
    saves; inside a ``torch.utils.checkpoint`` segment the checkpoint's own hooks apply; and as
    with any such context, an outer one (``save_on_cpu``) does not see the tensors saved inside.

    Raises (at the backward):
        RuntimeError: a tensor saved in the context was modified in place after it was saved, or
            a ShadeReLU's input after the ReLU ran (what autograd itself refuses).
    """
    registry: dict[int, tuple] = {}
    outer = getattr(_local, "registry", None)
    _local.registry = registry
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: _pack(registry, t), _unpack):
            yield
    finally:
        _local.registry = outer
