"""The drop-in calls: ``penalty`` and ``relu_penalty``."""
from __future__ import annotations

import torch

from . import _checkpoint, reference
from .memory import note_relu_output
from ._layout import check_inputs, from_op_output, op_input, output_view_breaks_inductor
from ._ops import NATIVE_OPS, PenaltyOps, resolve_backend
from .state import ShadeState

__all__ = ["penalty", "relu_penalty"]


def apply_update(ops: PenaltyOps | None, state: ShadeState, sums: torch.Tensor) -> None:
    """Algorithm 1's update of ``state`` with a batch's ``(4, C)`` sums, all-reduced first when the
    state is synchronised."""
    sums = state.reduce_batch_sums(sums)
    if ops is None:
        reference.apply_update(state, sums)
    else:
        ops.update(state.p, state.mu, sums, state.decay)


def apply_updates(updates: list[tuple[PenaltyOps | None, ShadeState, torch.Tensor]]) -> None:
    """:func:`apply_update` for each ``(ops, state, sums)`` of a forward; the native CPU ones
    that need no all-reduce in one op call (``update_states``) rather than one each."""
    native = NATIVE_OPS.update if NATIVE_OPS is not None else None
    batch: tuple[list, list, list, list] = ([], [], [], [])

    def flush() -> None:
        if len(batch[0]) == 1:
            native(*(column[0] for column in batch))
        elif batch[0]:
            torch.ops.shade_ops.update_states(*batch)
        for column in batch:
            column.clear()

    for ops, state, sums in updates:  # in their order (a state may be shared by two sites)
        if ops is not None and ops.update is native and not state.sync:
            buffers = state._buffers
            for column, value in zip(batch, (buffers["p"], buffers["mu"], sums, state.decay)):
                column.append(value)
        else:
            flush()
            apply_update(ops, state, sums)
    flush()


def run(y: torch.Tensor, state: ShadeState | None, unit_dim: int, reduction: str,
        update: bool | None, backend: str, relu: bool,
        defer: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(y) if relu else y, penalty)`` for checked inputs, and the state update; with
    ``defer``, the update is appended to it as ``(ops, state, sums)`` for :func:`apply_update`
    to apply later (``modules.py`` applies a model's updates at the end of its forward).

    Inside the recomputation of a ``torch.utils.checkpoint`` segment it computes with the state and
    unit dim of the original call and updates nothing (``state`` may then be None); in the
    segment's first run it leaves them for the recomputation (``_checkpoint.py``).
    """
    ops = resolve_backend(backend, y.device)
    recompute = _checkpoint.recomputation()
    if recompute is not None:
        mu, unit_dim, updates = recompute.mu, recompute.unit_dim, False
    else:
        mu, updates = state.mu, state.should_update(update)
        if updates and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            _checkpoint.refuse_reentrant_checkpoint()
        _checkpoint.remember(mu, unit_dim)
    if ops is None:
        value, sums = reference.batch_statistics(y, mu.clone(), unit_dim, reduction)
        out = torch.relu(y) if relu else y
    elif relu:
        given = op_input(y, unit_dim)
        if output_view_breaks_inductor(y, given):  # relu(y) from ATen, a fresh tensor
            value, sums, _ = ops.forward(given, mu, reduction)
            out = torch.relu(y)
        else:
            value, sums, out, _ = ops.relu_forward(given, mu, reduction)
            out = from_op_output(out, y, given)
    else:
        value, sums, _ = ops.forward(op_input(y, unit_dim), mu, reduction)
        out = y
    if updates:
        if defer is None:
            apply_update(ops, state, sums)
        else:
            defer.append((ops, state, sums))
    if relu:
        note_relu_output(out, y)
    return out, value


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
    return run(y, state, unit_dim, reduction, update, backend, relu=False)[1]


def relu_penalty(y: torch.Tensor, state: ShadeState, *, unit_dim: int = 1,
                 reduction: str = "mean", update: bool | None = None,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(y), penalty(y, state, ...))`` from one pass over ``y``; one pass backward too.

    Arguments, exceptions and the state update are those of :func:`penalty`. ``relu(y)`` has
    y's shape, dtype and memory format.
    """
    check_inputs(y, state, unit_dim, reduction, backend)
    return run(y, state, unit_dim, reduction, update, backend, relu=True)
