"""Mixed precision: keep the SHADE states clean when GradScaler skips a step.

Under autocast the penalty is float32 and the state stays float32 by construction (the kernels
accumulate in float32 whatever the activations' dtype). What needs help is GradScaler: it skips
the optimizer step when the scaled gradients hold Inf/NaN, but the forward has already updated
every layer's state. Take a snapshot before the forward and step through :func:`scaler_step`:

    snap = shade_ops.amp.snapshot(model)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = criterion(model(x), target) + beta * shade_ops.collect(model)
    scaler.scale(loss).backward()
    shade_ops.amp.scaler_step(scaler, optimizer, snap)   # step + update; undone if skipped
"""
from __future__ import annotations

import torch
from torch import nn

from .state import ShadeState

__all__ = ["restore", "scaler_step", "snapshot"]

Snapshot = list[tuple[ShadeState, torch.Tensor, torch.Tensor]]


def snapshot(model: nn.Module) -> Snapshot:
    """Copies of every ShadeState's buffers in ``model`` (a few floats per unit)."""
    return [(m, m.p.detach().clone(), m.mu.detach().clone())
            for m in model.modules() if isinstance(m, ShadeState)]


def restore(snap: Snapshot) -> None:
    """Put every state of ``snap`` back as it was when the snapshot was taken."""
    with torch.no_grad():
        for state, p, mu in snap:
            state.p.copy_(p)
            state.mu.copy_(mu)


def scaler_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                snap: Snapshot) -> bool:
    """``scaler.step(optimizer)`` and ``scaler.update()``; when the scaler skipped the step for
    Inf/NaN gradients, restore ``snap`` so that the step leaves no trace in the SHADE states.

    Returns whether the optimizer stepped. The scaler lowers its scale exactly when it skips, which
    is how the skip is seen (GradScaler.step already reads its Inf check on the host).
    """
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    stepped = not (scaler.is_enabled() and scaler.get_scale() < scale)
    if not stepped:
        restore(snap)
    return stepped
