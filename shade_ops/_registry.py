"""The op registry: the native ops, their fake implementations and autograd formulas.

The schemas live in ``csrc/shade_ops.cpp`` (``TORCH_LIBRARY(shade_ops, m)``), their autograd
formulas in ``csrc/autograd.cpp``; the CPU kernels in ``csrc/penalty_cpu.cpp``; the CUDA kernels
of the same ops are the Triton launchers of ``_triton.py``. Every family of ops gets its fake
registrations from :func:`register_penalty_ops`, and its autograd formulas too when it has none in
C++ (the interpreter ops of ``_triton.py``), so they are written once.

Imports: ``_registry`` <- ``_triton`` <- ``_ops`` (the backend table), a chain without cycles.
"""
from __future__ import annotations

import importlib
import importlib.util
import mmap
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from . import reference
from ._layout import accumulation_dtype

BUILD_HINT = ("build it against this torch, with a C++ compiler: `pip install "
              "--no-build-isolation .` from the shade_ops source (`make build` in a checkout)")
BUILD_INFO_MARK = b"shade_ops-build-info:"


def read_build_info(path: str) -> dict[str, str]:
    """What csrc/shade_ops.cpp wrote into the library at ``path`` (``torch``: the torch it was
    compiled against, ``isa``: its instruction set), read from the file without loading it; empty
    for a library built before it said so."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(BUILD_INFO_MARK)
        if start < 0:
            return {}
        start += len(BUILD_INFO_MARK)
        end = data.find(b"\0", start, start + 256)
        text = data[start:end if end >= 0 else start + 256].decode("ascii", "replace")
    return dict(item.split("=", 1) for item in text.split(";") if "=" in item)


def cpu_kernels_unusable(capability: str) -> str | None:
    """Why CPU kernels compiled for ``capability`` ("avx512", "avx2" or "default") cannot run on
    this CPU, or None when they can. setup.py compiles for the building machine's CPU: run on
    another one, the kernels would die on an illegal instruction."""
    supported = {"avx512": getattr(torch.cpu, "_is_avx512_supported", lambda: True),
                 "avx2": getattr(torch.cpu, "_is_avx2_supported", lambda: True)}
    if capability in supported and not supported[capability]():
        return (f"shade_ops._C was compiled for {capability.upper()}, which this CPU does not "
                f"have: {BUILD_HINT} on this machine, or with SHADE_OPS_NATIVE=0 for any x86-64 "
                f"CPU")
    return None


def torch_mismatch(built_for: str, running: str) -> str | None:
    """Why a library compiled against torch ``built_for`` cannot be loaded by torch ``running``
    (C++ extensions need the same major.minor release), or None."""
    if built_for in ("", "unknown") or built_for.split(".")[:2] == running.split(".")[:2]:
        return None
    return f"shade_ops._C was built for torch {built_for}, and this is torch {running}: {BUILD_HINT}"


def load_native() -> tuple[ModuleType | None, str | None]:
    """shade_ops._C, checked before it is loaded, or None and why it cannot be used."""
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is None or spec.origin is None:
        return None, ("shade_ops._C is not built (installed without a C++ compiler, or a source "
                      f"checkout that was never built); {BUILD_HINT}")
    try:
        info = read_build_info(spec.origin)
    except (OSError, ValueError) as error:  # unreadable, or empty (mmap refuses those)
        return None, f"shade_ops._C could not be read ({error}); {BUILD_HINT}"
    why = torch_mismatch(info.get("torch", ""), torch.__version__) \
        or cpu_kernels_unusable(info.get("isa", ""))
    if why is not None:
        return None, why
    try:
        module = importlib.import_module(f"{__package__}._C")
    except ImportError as error:
        return None, f"shade_ops._C did not load ({error}); {BUILD_HINT}"
    return module, None


# Loading _C registers the schemas and the CPU kernels in torch.ops.shade_ops.
_C, NATIVE_IMPORT_ERROR = load_native()
CPU_KERNELS_ERROR = None if _C is None else cpu_kernels_unusable(_C.CPU_CAPABILITY)


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
