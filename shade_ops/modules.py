"""SHADE on a whole model: ShadeReLU, convert, collect, and attach for layers without a ReLU."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .functional import penalty as _penalty
from .functional import relu_penalty as _relu_penalty
from .state import ShadeState

__all__ = ["ShadePenalty", "ShadeReLU", "attach", "collect", "convert"]


class _ShadeLayer(nn.Module):
    """A layer's :class:`ShadeState` (made from the first input when ``num_units`` is None) and
    its last penalty."""

    penalty: torch.Tensor | None

    def __init__(self, num_units: int | None = None, decay: float = 0.8, unit_dim: int = 1, *,
                 sync: bool = False, process_group: dist.ProcessGroup | None = None,
                 reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        self.decay, self.unit_dim, self.sync = float(decay), unit_dim, sync
        self.process_group, self.reduction, self.backend = process_group, reduction, backend
        self.state: ShadeState | None = None
        if num_units is not None:
            self._make_state(num_units, device=None)
        self.penalty = None

    def _make_state(self, num_units: int, device: torch.device | None) -> None:
        self.state = ShadeState(num_units, self.decay, sync=self.sync,
                                process_group=self.process_group, device=device)
        self.state.train(self.training)

    def _state_for(self, y: torch.Tensor) -> ShadeState:
        if self.state is None:
            if not -y.dim() <= self.unit_dim < y.dim():
                raise ValueError(f"unit_dim={self.unit_dim} is out of range for a tensor of "
                                 f"{y.dim()} dims")
            self._make_state(y.shape[self.unit_dim], y.device)
        return self.state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A lazy layer takes its size from the checkpoint, as LazyBatchNorm does.
        saved = state_dict.get(prefix + "state.p")
        if self.state is None and saved is not None:
            self._make_state(saved.shape[1], saved.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        units = self.state.num_units if self.state is not None else None
        return f"num_units={units}, decay={self.decay}, unit_dim={self.unit_dim}"


class ShadeReLU(_ShadeLayer):
    """``nn.ReLU`` that also computes this layer's SHADE penalty, fused into the same pass.

    In training mode, ``forward`` returns ``relu(y)`` and keeps the penalty (a differentiable
    0-dim float32 tensor) in ``self.penalty``, updating the state; its backward is one pass that
    adds the penalty's gradient to ReLU's. In eval mode it is a plain ReLU and ``penalty`` is None.
    Add ``beta * shade_ops.collect(model)`` to the loss.

    Args:
        num_units: units along ``unit_dim``; None takes them from the first input.
        decay, sync, process_group: of the :class:`ShadeState`.
        unit_dim: the dim of the units (1 for ``(N, C, ...)``, -1 for ``(..., C)``).
        reduction, backend: as in :func:`shade_ops.penalty`.
    """

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.penalty = None
            return torch.relu(y)
        out, self.penalty = _relu_penalty(y, self._state_for(y), unit_dim=self.unit_dim,
                                          reduction=self.reduction, backend=self.backend)
        return out


class ShadePenalty(_ShadeLayer):
    """The SHADE penalty of another module's output, for layers not followed by a ReLU.

    Made by :func:`attach`, which registers it as a child of that module and calls it from a
    forward hook. ``forward(y)`` returns ``y`` unchanged and keeps the penalty in ``self.penalty``
    (training mode only, like :class:`ShadeReLU`).
    """

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.penalty = None
            return y
        self.penalty = _penalty(y, self._state_for(y), unit_dim=self.unit_dim,
                                reduction=self.reduction, backend=self.backend)
        return y


def attach(module: nn.Module, **kwargs) -> ShadePenalty:
    """Put SHADE on ``module``'s output: returns the :class:`ShadePenalty` it added as
    ``module.shade`` (so it is saved with the model); ``collect`` finds it.

    ``kwargs`` are those of :class:`ShadePenalty` (``num_units``, ``decay``, ``unit_dim``, ...).
    """
    if hasattr(module, "shade"):
        raise ValueError(f"{type(module).__name__} already has an attribute 'shade'")
    shade = ShadePenalty(**kwargs)
    module.add_module("shade", shade)
    module.register_forward_hook(_call_shade)
    return shade


def _call_shade(module: nn.Module, inputs, output: torch.Tensor) -> None:
    module.shade(output)


def convert(model: nn.Module, **kwargs) -> nn.Module:
    """Replace every ``nn.ReLU`` in ``model`` (nested ones, ``inplace=True`` ones too) with a
    ``ShadeReLU(**kwargs)``, in place; returns the model (a ShadeReLU when model is a ReLU).

    ``num_units`` is best left None here: each ShadeReLU takes its size from its first input.
    """
    if isinstance(model, nn.ReLU):
        return ShadeReLU(**kwargs)
    for name, child in model.named_children():
        replaced = convert(child, **kwargs)
        if replaced is not child:
            setattr(model, name, replaced)
    return model


def collect(model: nn.Module) -> torch.Tensor:
    """The sum of the last penalties of every ShadeReLU and ShadePenalty in ``model``.

    A 0-dim tensor; 0 when none has a penalty (none ran, or the model is in eval mode).
    """
    penalties = [m.penalty for m in model.modules()
                 if isinstance(m, _ShadeLayer) and m.penalty is not None]
    if not penalties:
        return torch.zeros(())
    return torch.stack(penalties).sum() if len(penalties) > 1 else penalties[0]
