"""The op registry: the native ops, their fake implementations and autograd formulas.

The schemas live in ``csrc/shade_ops.cpp`` (``TORCH_LIBRARY(shade_ops, m)``), their autograd
formulas in ``csrc/autograd.cpp``; the CPU kernels in ``csrc/penalty_cpu.cpp``; the CUDA kernels
of the same ops are the Triton launchers of ``_triton.py``. Every family of ops gets its fake
registrations from :func:`register_penalty_ops`, and its autograd formulas too when it has none in
C++ (the interpreter ops of ``_triton.py``), so they are written once.

Imports: ``_registry`` <- ``_triton`` <- ``_ops`` (the backend table), a chain without cycles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from ._layout import accumulation_dtype

try:
    from . import _C  # noqa: F401  (loads the schemas and the CPU kernels into torch.ops.shade_ops)
except ImportError as error:  # not built: only the reference is available
    NATIVE_IMPORT_ERROR: ImportError | None = error
else:
    NATIVE_IMPORT_ERROR = None

BUILD_HINT = ("build it from the project root with `make build` "
              "(or `pip install --no-build-isolation -e .`)")


def cpu_kernels_unusable(capability: str) -> str | None:
    """Why CPU kernels compiled for ``capability`` ("avx512", "avx2" or "default") cannot run on
    this CPU, or None when they can. setup.py compiles for the building machine's CPU: run on
    another one, the kernels would die on an illegal instruction."""
    supported = {"avx512": getattr(torch.cpu, "_is_avx512_supported", lambda: True),
                 "avx2": getattr(torch.cpu, "_is_avx2_supported", lambda: True)}
    if capability in supported and not supported[capability]():
        return (f"shade_ops._C was compiled for {capability.upper()}, which this CPU does not "
                f"have: {BUILD_HINT} on this machine")
    return None


CPU_KERNELS_ERROR = cpu_kernels_unusable(getattr(_C, "CPU_CAPABILITY", "default")) \
    if NATIVE_IMPORT_ERROR is None else None


@dataclass(frozen=True)
class PenaltyOps:
    """One backend's ops, all taking y as ``(A, C, B)`` or ``(A, C, ...)``."""

    forward: Callable        # (y, mu, reduction) -> (penalty, sums, copy of mu)
    relu_forward: Callable   # (y, mu, reduction) -> (penalty, sums, relu(y), copy of mu)
    backward: Callable       # (grad_penalty, y, mu, reduction, grad_out) -> grad_y
    update: Callable         # (p, mu, sums, decay) -> None, in place


def register_penalty_ops(forward, relu_forward, backward, *, autograd: bool = True) -> None:
    """Fake implementations and autograd formulas for one family of penalty ops.

    ``autograd=False``: the ops have their formulas already (the native ops have them in C++,
    ``csrc/autograd.cpp``, with the same meaning as the Python ones here).
    """

    def fake_forward(y, mu, reduction):
        acc = accumulation_dtype(y.dtype)
        return (y.new_empty((), dtype=acc), y.new_empty((4, y.shape[1]), dtype=acc),
                torch.empty_like(mu, memory_format=torch.contiguous_format))

    def fake_relu_forward(y, mu, reduction):
        value, sums, mu_copy = fake_forward(y, mu, reduction)
        return value, sums, y.new_empty(y.shape), mu_copy

    def fake_backward(grad_penalty, y, mu, reduction, grad_out=None):
        return y.new_empty(y.shape)

    def setup_context(ctx, inputs, output):
        y, _, reduction = inputs
        mu_copy = output[-1]  # not mu: the update that follows writes into mu
        ctx.save_for_backward(y, mu_copy)
        ctx.reduction = reduction
        ctx.mark_non_differentiable(output[1], mu_copy)
        ctx.set_materialize_grads(False)  # as in C++: an unused output costs no backward work

    def grad_y(grad_penalty, y, mu, reduction, grad_out):
        # create_graph=True: the fused kernel has no derivative of its own; the same gradient
        # from differentiable ops makes grad of grad exact (as csrc/autograd.cpp does)
        if torch.is_grad_enabled():
            return reference.penalty_grad(grad_penalty, y, mu, reduction, grad_out)
        return backward(grad_penalty, y, mu, reduction, grad_out)

    def backward_penalty(ctx, grad_penalty, grad_sums, grad_mu_copy):
        if grad_penalty is None:
            return None, None, None
        y, mu = ctx.saved_tensors
        return grad_y(grad_penalty, y, mu, ctx.reduction, None), None, None

    def backward_relu_penalty(ctx, grad_penalty, grad_sums, grad_out, grad_mu_copy):
        y, mu = ctx.saved_tensors
        if grad_penalty is None:  # the ReLU's backward alone
            grad = None if grad_out is None else torch.ops.aten.threshold_backward(grad_out, y, 0)
            return grad, None, None
        return grad_y(grad_penalty, y, mu, ctx.reduction, grad_out), None, None

    torch.library.register_fake(forward)(fake_forward)
    torch.library.register_fake(relu_forward)(fake_relu_forward)
    torch.library.register_fake(backward)(fake_backward)
    if not autograd:
        return
    torch.library.register_autograd(forward, backward_penalty, setup_context=setup_context)
    torch.library.register_autograd(relu_forward, backward_relu_penalty,
                                    setup_context=setup_context)


if NATIVE_IMPORT_ERROR is None:
    # what csrc/autograd.cpp calls for double backward: SPEC section 3 in differentiable ops
    torch.library.impl("shade_ops::differentiable_penalty_backward",
                       "CompositeImplicitAutograd")(reference.penalty_grad)
    register_penalty_ops(torch.ops.shade_ops.penalty_forward.default,
                         torch.ops.shade_ops.relu_penalty_forward.default,
                         torch.ops.shade_ops.penalty_backward.default, autograd=False)
    NATIVE_OPS: PenaltyOps | None = PenaltyOps(
        forward=torch.ops.shade_ops.penalty_forward.default,
        relu_forward=torch.ops.shade_ops.relu_penalty_forward.default,
        backward=torch.ops.shade_ops.penalty_backward.default,
        update=torch.ops.shade_ops.update_state.default,
    )
else:
    NATIVE_OPS = None
