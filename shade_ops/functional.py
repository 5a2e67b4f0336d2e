"""The drop-in calls: ``penalty`` and ``relu_penalty``."""
from __future__ import annotations

import torch

from . import reference
from ._layout import check_inputs, from_op_output, op_input
from ._ops import PenaltyOps, resolve_backend
from .state import ShadeState

__all__ = ["penalty", "relu_penalty"]


def _update(ops: PenaltyOps, state: ShadeState, sums: torch.Tensor, update: bool | None) -> None:
    if state.should_update(update):
        ops.update(state.p, state.mu, state.reduce_batch_sums(sums), state.decay)


def penalty(y: torch.Tensor, state: ShadeState, *, unit_dim: int = 1, reduction: str = "mean",
            update: bool | None = None, backend: str = "auto") -> torch.Tensor:
    """The SHADE penalty of one layer's activations, and the update of its state.

    Args:
        y: the activations, units along ``unit_dim`` (``(N, C)``, ``(N, C, H, W)``, ...). Any
            floating dtype and memory layout.
        state: the layer's :class:`ShadeState`, on y's device.
        unit_dim: the dim of the units; ``-1`` for ``(..., C)`` layouts.
        reduction: ``"mean"`` (the paper's sum over units of the per-unit conditional variance)
            or ``"sum"`` (the sum over all elements).
        update: update the state with this batch; ``None`` follows ``state.training``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        A 0-dim float32 tensor (float64 for float64 ``y``), differentiable with respect to ``y``,
        computed with the state as it was before this call's update.

    Raises:
        TypeError: ``y`` is not a floating-point tensor.
        ValueError: a bad ``unit_dim``, unit count, device, ``reduction`` or ``backend``.
        RuntimeError: the backend asked for cannot run here (the message says what is missing).
    """
    check_inputs(y, state, unit_dim, reduction, backend)
    ops = resolve_backend(backend, y.device)
    if ops is None:
        return reference.penalty(y, state, unit_dim=unit_dim, reduction=reduction,
                                 update=update, backend=backend)
    value, sums, _ = ops.forward(op_input(y, unit_dim), state.mu, reduction)
    _update(ops, state, sums, update)
    return value


def relu_penalty(y: torch.Tensor, state: ShadeState, *, unit_dim: int = 1,
                 reduction: str = "mean", update: bool | None = None,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(y), penalty(y, state, ...))`` from one pass over ``y``; one pass backward too.

    Arguments, exceptions and the state update are those of :func:`penalty`. ``relu(y)`` has
    y's shape, dtype and memory format.
    """
    check_inputs(y, state, unit_dim, reduction, backend)
    ops = resolve_backend(backend, y.device)
    if ops is None:
        return reference.relu_penalty(y, state, unit_dim=unit_dim, reduction=reduction,
                                      update=update, backend=backend)
    given = op_input(y, unit_dim)
    value, sums, out, _ = ops.relu_forward(given, state.mu, reduction)
    _update(ops, state, sums, update)
    return from_op_output(out, y, given), value
