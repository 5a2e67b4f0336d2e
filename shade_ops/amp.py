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

from dataclasses import dataclass

import torch
from torch import nn

from .modules import _ShadeLayer
from .state import ShadeState


__all__ = ["Snapshot", "restore", "scaler_step", "snapshot"]


@dataclass
class Snapshot:
    """The SHADE states of a model at one moment: copies of every state's buffers, and the
    number of call-site states each SHADE layer had (a lazily sized layer has none before its
    first forward; the states a skipped step made go back to their initial values)."""

    buffers: list[tuple[ShadeState, torch.Tensor, torch.Tensor]]
    sites: list[tuple[_ShadeLayer, int]]


def snapshot(model: nn.Module) -> Snapshot:
    """Copies of every ShadeState's buffers in ``model`` (a few floats per unit)."""
    return Snapshot(buffers=[(m, m.p.detach().clone(), m.mu.detach().clone())
                             for m in model.modules() if isinstance(m, ShadeState)],
                    sites=[(m, len(m.states)) for m in model.modules()
                           if isinstance(m, _ShadeLayer)])


def restore(snap: Snapshot) -> None:
    """Put every state of ``snap`` back as it was when the snapshot was taken; states made since
    then go back to their initial values."""
    with torch.no_grad():
        for state, p, mu in snap.buffers:
            state.p.copy_(p)
            state.mu.copy_(mu)
    for layer, sites in snap.sites:
        for state in layer.states[sites:]:
            state.reset_state()


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
