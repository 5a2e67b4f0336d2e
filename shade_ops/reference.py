"""SHADE in plain eager PyTorch: the oracle of every test and the baseline of every benchmark.

Written to be read next to SPEC.md, not to be fast. Autograd differentiates it, so the gradient of
SPEC section 3 is checked against an independent derivation.
"""
from __future__ import annotations

import torch

from ._layout import accumulation_dtype, check_inputs
from .state import ShadeState

__all__ = ["penalty", "relu_penalty", "batch_statistics", "updated_state", "apply_update",
           "penalty_grad"]


def batch_statistics(y: torch.Tensor, mu: torch.Tensor, unit_dim: int = 1,
                     reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """The penalty of SPEC section 2 and the ``(4, C)`` batch sums (sum s, sum s*y, sum q*y, K).

    ``mu`` is the ``(2, C)`` state before this batch's update; it gets no gradient.
    """
    acc = accumulation_dtype(y.dtype)
    num_units = y.shape[unit_dim]
    samples = y.movedim(unit_dim, -1).reshape(-1, num_units).to(acc)  # (K, C)
    count = samples.shape[0]
    mu0, mu1 = mu.detach().to(acc)

    r = torch.relu(samples)
    q = torch.exp(-r)     # p(Z=0 | y)
    s = -torch.expm1(-r)  # p(Z=1 | y) = 1 - q, sigma(y) in the paper; 1 - q itself would keep
                          # only an absolute accuracy, and s (y - mu1)^2 needs a relative one
    terms = s * (samples - mu1) ** 2 + q * (samples - mu0) ** 2

    if count == 0:
        penalty = terms.sum()  # an empty batch costs nothing
    elif reduction == "mean":
        penalty = (terms.sum(0) / count).sum()  # sum over units of omega[c]
    else:
        penalty = terms.sum()
    sums = torch.stack([
        s.sum(0),
        (s * samples).sum(0),
        (q * samples).sum(0),
        torch.full((num_units,), float(count), dtype=acc, device=y.device),
    ]).detach()
    return penalty, sums


def updated_state(p: torch.Tensor, mu: torch.Tensor, sums: torch.Tensor,
                  decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 with the guards of SPEC section 4: the new ``(p, mu)``, inputs untouched."""
    compute = torch.promote_types(p.dtype, sums.dtype)
    sums, old_p, old_mu = sums.to(compute), p.to(compute), mu.to(compute)
    count = sums[3]
    b1 = sums[0] / count
    b0 = 1 - b1
    m1 = sums[1] / count
    m0 = sums[2] / count

    new_p = torch.stack([decay * old_p[0] + (1 - decay) * b0,
                         decay * old_p[1] + (1 - decay) * b1])
    new_mu = torch.stack([decay * old_mu[0] + (1 - decay) * m0 / new_p[0],
                          decay * old_mu[1] + (1 - decay) * m1 / new_p[1]])
    new_mu = torch.where(new_p != 0, new_mu, old_mu)  # where p_z is 0, mu_z keeps its value

    finite = torch.isfinite(b1) & torch.isfinite(m0) & torch.isfinite(m1)
    return (torch.where(finite, new_p, old_p).to(p.dtype),
            torch.where(finite, new_mu, old_mu).to(mu.dtype))


def apply_update(state: ShadeState, sums: torch.Tensor) -> None:
    """Write Algorithm 1's update of ``state`` by the batch sums ``sums`` into its buffers."""
    new_p, new_mu = updated_state(state.p, state.mu, sums, state.decay)
    with torch.no_grad():
        state.p.copy_(new_p)
        state.mu.copy_(new_mu)


def penalty(y: torch.Tensor, state: ShadeState, *, unit_dim: int = 1, reduction: str = "mean",
            update: bool | None = None, backend: str = "reference") -> torch.Tensor:
    """Same signature and meaning as :func:`shade_ops.penalty`; ``backend`` is only checked."""
    check_inputs(y, state, unit_dim, reduction, backend)
    mu = state.mu.clone()  # the state before this batch's update
    value, sums = batch_statistics(y, mu, unit_dim, reduction)
    if state.should_update(update):
        apply_update(state, state.reduce_batch_sums(sums))
    return value


def relu_penalty(y: torch.Tensor, state: ShadeState, *, unit_dim: int = 1,
                 reduction: str = "mean", update: bool | None = None,
                 backend: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(y), penalty(y, state, ...))``: what the fused ShadeReLU computes."""
    value = penalty(y, state, unit_dim=unit_dim, reduction=reduction, update=update,
                    backend=backend)
    return torch.relu(y), value


def penalty_grad(grad_penalty: torch.Tensor, y: torch.Tensor, mu: torch.Tensor, reduction: str,
                 grad_out: torch.Tensor | None = None) -> torch.Tensor:
    """SPEC section 3 written out, in differentiable ops: ``grad_penalty`` times d penalty / d y,
    plus ``grad_out * (y > 0)`` when given (ReLU's backward, as the fused ShadeReLU's).

    ``y`` is ``(A, C, ...)`` as the ops receive it. The fused backends use this for double
    backward (``create_graph=True``), where autograd differentiates it once more.
    """
    acc = accumulation_dtype(y.dtype)
    x = y.to(acc)
    per_unit = (1, y.shape[1]) + (1,) * (y.dim() - 2)
    mu0, mu1 = (m.to(acc).reshape(per_unit) for m in mu.detach())
    r = torch.relu(x)
    q = torch.exp(-r)
    s = -torch.expm1(-r)  # 1 - q to a relative accuracy, as in batch_statistics
    ds = torch.where(x > 0, q, torch.zeros_like(q))  # s'(y), 0 at y == 0
    d1, d0 = x - mu1, x - mu0
    count = y.numel() // max(y.shape[1], 1)
    w = grad_penalty.to(acc) / max(count, 1) if reduction == "mean" else grad_penalty.to(acc)
    # (y - mu1)^2 - (y - mu0)^2 as a product: no cancellation between large squares
    grad = w * (ds * (mu0 - mu1) * (d1 + d0) + 2 * (s * d1 + q * d0))
    if grad_out is not None:
        grad = grad + grad_out.to(acc) * (x > 0)
    return grad.to(y.dtype)
