"""The per-unit running statistics of SHADE (Algorithm 1 of the paper)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ShadeState"]


class ShadeState(nn.Module):
    """Moving averages of p(Z=z) and E(Y | Z=z) for every unit of one layer.

    Like BatchNorm's running statistics these are buffers: ``state_dict()`` saves them,
    ``.to()`` moves them, and ``.train()`` / ``.eval()`` decide whether :func:`shade_ops.penalty`
    updates them.

    Args:
        num_units: number of units (channels, features) of the layer.
        decay: the moving-average factor lambda of Algorithm 1, in [0, 1).
        sync: all-reduce the batch sums across ``process_group`` before every update, as
            SyncBatchNorm does, so that every rank holds the same state.
        process_group: the group to reduce over; ``None`` is the default group.
        device, dtype: of the buffers (float32 by default, whatever the activations' dtype).

    Buffers:
        p: ``(2, num_units)``, row ``z`` estimates p(Z=z); starts at 0.5.
        mu: ``(2, num_units)``, row ``z`` estimates E(Y | Z=z); starts at (-1, +1).
    """

    p: torch.Tensor
    mu: torch.Tensor

    def __init__(self, num_units: int, decay: float = 0.8, *, sync: bool = False,
                 process_group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1:
            raise ValueError(f"num_units must be a positive int, got {num_units!r}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"the state's dtype must be floating point, got {dtype}")
        self.decay = float(decay)
        self.sync = bool(sync)
        self.process_group = process_group
        self.register_buffer("p", torch.empty(2, num_units, device=device, dtype=dtype))
        self.register_buffer("mu", torch.empty(2, num_units, device=device, dtype=dtype))
        self.reset_state()

    def _apply(self, fn, recurse=True):
        # .to(device) moves the state; .half(), .to(torch.bfloat16), model.double() leave its
        # dtype alone (the moving averages stay in the dtype they were made with, float32 by
        # default), as they would otherwise lose the precision that the kernels accumulate in.
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            if moved.dtype == t.dtype:
                return moved
            return t.to(device=moved.device)

        return super()._apply(keep_dtype, recurse)

    @property
    def num_units(self) -> int:
        return self.p.shape[1]

    def reset_state(self) -> None:
        """Back to the initial estimates: p = (0.5, 0.5), mu = (-1, +1) for every unit."""
        with torch.no_grad():
            self.p.fill_(0.5)
            self.mu[0].fill_(-1.0)
            self.mu[1].fill_(1.0)

    def should_update(self, update: bool | None) -> bool:
        """Whether a penalty call updates the state: ``update`` when given, else training mode."""
        return self.training if update is None else bool(update)

    def reduce_batch_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """All-reduce the ``(4, C)`` batch sums across ranks when ``sync`` is on (SPEC section 4)."""
        if not (self.sync and dist.is_available() and dist.is_initialized()):
            return sums
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return sums
        # functional collective: traceable by torch.compile and does not write into `sums`
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(sums, "sum", group)

    def extra_repr(self) -> str:
        extra = f"{self.num_units}, decay={self.decay}"
        if self.sync:
            extra += ", sync=True"
        return extra
