"""What every backend shares: the input checks of SPEC section 6 and the (A, C, B) view of SPEC 1."""
from __future__ import annotations

import math

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
REDUCTIONS = ("mean", "sum")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What every backend sums in (SPEC section 2): float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_choices(reduction: str, backend: str) -> None:
    """ValueError for an unknown ``reduction`` or ``backend``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_unit_dim(unit_dim: int, ndim: int | None = None,
                   shape: tuple[int, ...] | None = None) -> None:
    """TypeError for a ``unit_dim`` that is not an int (a bool, a float, a string); ValueError
    when out of range for ``ndim`` dims (``shape``, when given, is named in the message)."""
    if isinstance(unit_dim, bool) or not isinstance(unit_dim, int):
        raise TypeError(f"unit_dim must be an int, got {unit_dim!r} "
                        f"({type(unit_dim).__name__})")
    if ndim is not None and not -ndim <= unit_dim < ndim:
        raise ValueError(f"unit_dim={unit_dim} is out of range for a tensor of {ndim} dims"
                         + (f" (shape {tuple(shape)})" if shape is not None else ""))


def check_state_buffers(state: torch.nn.Module, units: int) -> None:
    """The state's buffers as ``ShadeState`` makes them, whatever replaced them since: TypeError
    for a buffer that is not a floating-point tensor; ValueError unless ``p`` and ``mu`` share
    one device and one shape ``(2, num_units)`` (``(2, units)`` is named as the expected shape,
    ``units`` being y's). Before any kernel runs, which would fail with a RuntimeError of its own
    (or, for the reference, broadcast). A consistent state of another size is left to the unit
    count check, whose message says which ``unit_dim`` fits."""
    buffers = state._buffers  # one dict lookup each: nn.Module.__getattr__ costs a microsecond
    p, mu = buffers.get("p"), buffers.get("mu")
    for name, buffer in (("p", p), ("mu", mu)):
        if not isinstance(buffer, torch.Tensor) or not buffer.is_floating_point():
            got = buffer.dtype if isinstance(buffer, torch.Tensor) else type(buffer).__name__
            raise TypeError(f"the state's {name} must be a floating-point tensor, got {got}")
    if mu.device != p.device:
        raise ValueError(f"the state's p is on {p.device} but its mu on {mu.device}")
    if p.dim() == 2 and p.shape[0] == 2 and mu.shape == p.shape:
        return
    expected = (2, units)
    wrong = [f"{name} {tuple(t.shape)}" for name, t in (("p", p), ("mu", mu))
             if tuple(t.shape) != expected]
    raise ValueError(f"the state's p and mu must both have shape (2, num_units), here {expected} "
                     f"for y's {units} units; got {' and '.join(wrong)}")


def check_inputs(y: torch.Tensor, state: torch.nn.Module, unit_dim: int, reduction: str,
                 backend: str) -> None:
    """Raise the exception SPEC section 6 names for bad input; never touches the state."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype not in DTYPES:
        if not y.is_floating_point():
            raise TypeError(f"y must be a floating-point tensor, got dtype {y.dtype}")
        raise TypeError(f"y has dtype {y.dtype}; shade_ops takes float16, bfloat16, float32 and "
                        f"float64 (cast float8 activations to bfloat16 first)")
    if not isinstance(state, _state_class()):
        raise TypeError(f"state must be a shade_ops.ShadeState, got {type(state).__name__}")
    check_unit_dim(unit_dim, y.dim(), y.shape)
    units = y.shape[unit_dim]
    check_state_buffers(state, units)
    if units != state.num_units:
        raise ValueError(unit_count_message(y, unit_dim, state.num_units))
    device = state._buffers["mu"].device
    if y.device != device:
        raise ValueError(f"y is on {y.device} but the state is on {device}; move one "
                         f"of them (shade_ops never copies between devices)")
    if reduction not in REDUCTIONS or backend not in BACKENDS:
        check_choices(reduction, backend)


def _state_class() -> type:
    from .state import ShadeState  # state.py is a leaf; imported here to keep this module one

    return ShadeState


def unit_count_message(y: torch.Tensor, unit_dim: int, num_units: int) -> str:
    """Why y does not fit a state of ``num_units`` units, and what to pass instead."""
    message = (f"y has {y.shape[unit_dim]} units along dim {unit_dim} (shape {tuple(y.shape)}) "
               f"but the state has {num_units}.")
    fits = [d for d in (1, -1) if y.dim() > 1 and y.shape[d] == num_units
            and d % y.dim() != unit_dim % y.dim()]
    if fits:
        return message + (f" Dim {fits[0]} has {num_units}: if the units lie there, pass "
                          f"unit_dim={fits[0]} (1 for (N, C, ...) activations, -1 for (..., C) "
                          f"ones such as a transformer's (N, L, D)).")
    return message + (" unit_dim says where the units lie: 1 for (N, C, ...) activations, -1 "
                      "for (..., C) ones such as a transformer's (N, L, D); a layer whose width "
                      "changed needs a new state.")


def op_input(y: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """What the ops receive: ``y`` itself when it is contiguous with its units on dim 1 (the ops
    merge the trailing dims themselves, and autograd needs no view node either way), else
    :func:`units_view`. :func:`from_op_output` undoes it."""
    if y.dim() >= 2 and unit_dim % y.dim() == 1 and y.is_contiguous():
        return y
    return units_view(y, unit_dim)


def from_op_output(t: torch.Tensor, like: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """An op's output of the shape of its input ``given = op_input(like, ...)`` (relu(y)) back to
    ``like``'s shape and memory format."""
    return t if given is like else from_units_view(t, like)


def output_view_breaks_inductor(like: torch.Tensor, given: torch.Tensor) -> bool:
    """Whether :func:`from_op_output` would hand back a view of the op's output while
    ``torch.compile`` traces. Inductor (torch 2.13 and 2.14) cannot compile a graph that saves such
    a view for the backward (a conv after a ShadeReLU saves its input) when the sizes alone do
    not order its strides: channels-last on a square image of dynamic size is (8 s^2, 1, 8 s, 8),
    which graph.py sorts without the shape env ("cannot determine truth value of Relational:
    8*s**2 < 8*s", as in pytorch/pytorch#185510). Dynamo shows symbolic sizes as ints, so this
    looks at the layout only: a contiguous NCHW input is its own op input, and gets no view.
    """
    return given is not like and torch.compiler.is_compiling()


def units_view(y: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """``y`` as ``(A, C, B)``: C units, each with A * B samples, without a copy when y is dense.

    The sample dims are ordered as they lie in memory (so channels-last or transposed inputs
    become a contiguous view), then those before the unit dim merge into A and those after into
    B. Only permute and reshape are used, so autograd maps the gradient back to y's own layout.
    """
    unit_dim = unit_dim % y.dim()
    if y.is_contiguous():  # the common case, without the sort below
        shape = y.shape
        return y.view(math.prod(shape[:unit_dim]), shape[unit_dim],
                      math.prod(shape[unit_dim + 1:]))
    order = _memory_order(y)
    if order != list(range(y.dim())):
        y = y.permute(order)
    u = order.index(unit_dim)
    return y.reshape(math.prod(y.shape[:u]), y.shape[u], math.prod(y.shape[u + 1:]))


def from_units_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Undo :func:`units_view`: a contiguous ``(A, C, B)`` tensor back to ``like``'s shape and
    memory format."""
    if like.is_contiguous():
        return t.view(like.shape)
    order = _memory_order(like)
    t = t.reshape([like.shape[d] for d in order])
    return t if order == list(range(like.dim())) else t.permute(_inverse(order))


def _memory_order(y: torch.Tensor) -> list[int]:
    """The dims of ``y`` from the largest stride to the smallest, ties in dim order.

    An insertion sort by plain ``>`` comparisons rather than ``sorted(key=...)``: under
    ``torch.compile`` with dynamic shapes the strides are symbolic, dynamo cannot sort by them,
    but it can guard on each comparison (a call whose layout orders the dims otherwise compiles
    again). Size-1 dims may land anywhere: view() ignores their strides.
    """
    strides = y.stride()
    order: list[int] = []
    for d in range(y.dim()):
        position = len(order)
        while position > 0 and strides[d] > strides[order[position - 1]]:
            position -= 1
        order.insert(position, d)
    return order


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, d in enumerate(order):
        inverse[d] = position
    return inverse
