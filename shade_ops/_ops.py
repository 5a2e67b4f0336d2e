"""The backend table: which backend runs where, and the ops each one uses.

``resolve_backend`` maps a backend name and a device to the :class:`PenaltyOps` of ``_registry``
(the native CPU ops) or of ``_triton`` (its CUDA and interpreter ops), imported on first use.
"""
from __future__ import annotations

import os
import warnings

import torch

from ._registry import (BUILD_HINT, CPU_KERNELS_ERROR, NATIVE_IMPORT_ERROR, NATIVE_OPS,
                        PenaltyOps, cpu_kernels_unusable)

__all__ = ["BUILD_HINT", "CPU_KERNELS_ERROR", "NATIVE_IMPORT_ERROR", "NATIVE_OPS", "PenaltyOps",
           "available_backends", "cpu_kernels_unusable", "resolve_backend"]


# ---- backends ---------------------------------------------------------------------------

def _triton_module():
    """shade_ops._triton, or the reason it cannot be used."""
    try:
        from . import _triton
    except ImportError as error:
        return None, f"Triton is not installed ({error}); `pip install triton`"
    return _triton, None


def _why_unavailable(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on tensors of `device`, else what is missing."""
    if name == "reference":
        return None
    if name == "cpu":
        if NATIVE_OPS is None:
            return NATIVE_IMPORT_ERROR  # what is missing and how to build it
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, and y is on {device}"
        return CPU_KERNELS_ERROR
    if name == "triton":
        module, why = _triton_module()
        if module is None:
            return why
        if device.type == "cuda":
            return None if module.CUDA_OPS is not None else module.CUDA_UNAVAILABLE
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1" and module.INTERPRETER_OPS is not None:
                return None
            return "backend 'triton' runs on CUDA tensors, or on CPU tensors only under " \
                   "TRITON_INTERPRET=1 (set before Triton is imported)"
        return f"backend 'triton' cannot run on {device}"
    if name == "cuda":
        return "the CUDA C++ kernels are not part of this build; use backend='triton' for " \
               "CUDA tensors"
    raise ValueError(f"unknown backend {name!r}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run here, for tensors on ``device`` (any device when None)."""
    devices = [torch.device(device)] if device is not None else \
        [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    names = []
    for name in ("reference", "cpu", "triton", "cuda"):
        if any(_why_unavailable(name, d) is None for d in devices):
            names.append(name)
    return names


_warned_fallback = False


def resolve_backend(backend: str, device: torch.device) -> PenaltyOps | None:
    """The ops of ``backend`` for tensors on ``device``; None means the eager reference."""
    global _warned_fallback
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpu"
        why = _why_unavailable(backend, device)
        if why is not None:
            if not _warned_fallback:
                _warned_fallback = True
                warnings.warn(f"shade_ops: no fused backend for {device} tensors: {why}. Using "
                              f"the eager reference backend (correct, much slower).",
                              stacklevel=3)
            return None
    else:
        why = _why_unavailable(backend, device)
        if why is not None:
            raise RuntimeError(f"shade_ops backend {backend!r} is not available: {why}")
    if backend == "reference":
        return None
    if backend == "cpu":
        return NATIVE_OPS
    module, _ = _triton_module()
    return module.CUDA_OPS if device.type == "cuda" else module.INTERPRETER_OPS


# The Triton launchers are the CUDA kernels of the ops above: register them now, so that calling
# torch.ops.shade_ops.* directly, or loading an exported program, finds them.
if NATIVE_OPS is not None and torch.cuda.is_available():
    _triton_module()
