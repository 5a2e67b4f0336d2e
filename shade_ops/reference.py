"""SHADE in plain eager PyTorch: the oracle of every test and the baseline of every benchmark.

Written to be read next to SPEC.md, not to be fast. The gradient is SPEC section 3 in a form that
keeps float32 accuracy whatever the distance between the means (``_penalty_term_gradient``), and the
tests check it against finite differences and against SPEC's formula evaluated in float64.
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

    s, q = _probabilities(samples.detach())  # the penalty's gradient is _PenaltyTerms's
    terms = _PenaltyTerms.apply(samples, s, q, mu0, mu1)

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


def _probabilities(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, q) of SPEC section 2 for samples ``x``."""
    r = torch.relu(x)
    q = torch.exp(-r)     # p(Z=0 | y)
    s = -torch.expm1(-r)  # p(Z=1 | y) = 1 - q, sigma(y) in the paper; 1 - q itself would keep
                          # only an absolute accuracy, and s (y - mu1)^2 needs a relative one
    return s, q


def _penalty_terms(x: torch.Tensor, s: torch.Tensor, q: torch.Tensor, mu0: torch.Tensor,
                   mu1: torch.Tensor) -> torch.Tensor:
    """s (y - mu1)^2 + q (y - mu0)^2 per sample: two non-negative terms, so no cancellation.

    Each probability multiplies its distance before the distance squares it: (s d1) d1, not
    s (d1 d1). Where a square overflows and its probability is 0 (s at y = -1e30, q at y = 1e30)
    the term is then 0 * d * d = 0, not 0 * inf = NaN, and the penalty is +inf where the exact
    one overflows, NaN only from a NaN or infinite y.
    """
    d1, d0 = x - mu1, x - mu0
    return (s * d1) * d1 + (q * d0) * d0


def _penalty_term_gradient(x: torch.Tensor, mu0: torch.Tensor, mu1: torch.Tensor,
                           w: torch.Tensor) -> torch.Tensor:
    """``w`` times d/dy of ``_penalty_terms``: SPEC section 3, in differentiable ops.

    SPEC's s'(y) ((y - mu1)^2 - (y - mu0)^2) is taken as the product 2 (mu0 - mu1) (y - h), with
    h = (mu0 + mu1) / 2 the midpoint: y - h is one rounding from the exact value, so the term
    keeps float32's relative accuracy, where (y - mu1) + (y - mu0) adds two roundings of size
    eps |mu| and, times mu0 - mu1, lost accuracy in proportion to |mu| (5e-3 relative at
    |mu| = 1e5). The rest, 2 (s (y - mu1) + q (y - mu0)), is a convex combination of the two
    distances (s + q = 1): exact to a few roundings of s |y - mu1| + q |y - mu0| for every y
    (y <= 0 gives s = 0, so it is y - mu0 itself). Rewritten as (y - mu0) - s (mu1 - mu0) it
    would lose y - mu1's accuracy where y is near a far mu1.

    The weight multiplies a probability before a distance (q (2 w (mu0 - mu1)) (y - h), then
    s'(y) selects it), so that a probability of 0 times a distance that does not overflow is 0:
    the gradient is finite wherever the exact one is, y = 1e30 included.
    """
    s, q = _probabilities(x)
    d1, d0 = x - mu1, x - mu0
    midpoint = (mu0 + mu1) / 2
    squares = torch.where(x > 0, (q * (2 * w * (mu0 - mu1))) * (x - midpoint), 0.0)
    return squares + (2 * w) * (s * d1 + q * d0)


class _PenaltyTerms(torch.autograd.Function):
    """``_penalty_terms(x, s, q, mu0, mu1)``, s and q those of x, with ``_penalty_term_gradient``
    as its derivative in x: autograd's own, the difference of the squares' derivatives, cancels
    (0.1 relative at |mu| = 1e6 in float32). The backward is made of differentiable ops of x, so
    grad of grad works."""

    @staticmethod
    def forward(x, s, q, mu0, mu1):
        return _penalty_terms(x, s, q, mu0, mu1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, _, mu0, mu1 = inputs
        ctx.save_for_backward(x, mu0, mu1)

    @staticmethod
    def backward(ctx, grad):
        x, mu0, mu1 = ctx.saved_tensors
        return _penalty_term_gradient(x, mu0, mu1, grad), None, None, None, None


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
    count = y.numel() // max(y.shape[1], 1)
    w = grad_penalty.to(acc) / max(count, 1) if reduction == "mean" else grad_penalty.to(acc)
    grad = _penalty_term_gradient(x, mu0, mu1, w)
    if grad_out is not None:
        grad = grad + grad_out.to(acc) * (x > 0)
    return grad.to(y.dtype)
