"""Shared test helpers: the backends to test, a per-dtype tolerance table, and comparisons that say
where and by how much two results differ."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton backend runs on CPU tensors through its interpreter, which must be
# chosen before Triton is imported (shade_ops imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import shade_ops  # noqa: E402

# Fused backends that run on CPU tensors here ("cpu" needs the built extension; "triton" needs
# Triton and the interpreter).
FUSED_BACKENDS = [b for b in shade_ops.available_backends("cpu") if b != "reference"]
# The interpreter costs 0.05-2 s a launch: Triton gets the small shapes only.
SLOW_BACKENDS = {"triton"}

# (rtol, atol relative to the largest magnitude of the expected tensor) per input dtype. The
# penalty and state are accumulated in float32 (float64) from the same upcast values, so they
# are tight; the gradient is rounded to the input's dtype.
TOLERANCES = {
    torch.float64: {"penalty": (1e-10, 1e-12), "grad": (1e-10, 1e-12), "state": (1e-10, 1e-12)},
    torch.float32: {"penalty": (2e-5, 1e-6), "grad": (2e-5, 1e-6), "state": (2e-5, 1e-6)},
    torch.bfloat16: {"penalty": (2e-5, 1e-6), "grad": (1.6e-2, 8e-3), "state": (2e-5, 1e-6)},
    torch.float16: {"penalty": (2e-5, 1e-6), "grad": (2e-3, 1e-3), "state": (2e-5, 1e-6)},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str,
                 what: str = "") -> None:
    """assert_close with the tolerance table; the failure message names the worst element."""
    rtol, atol = TOLERANCES[dtype][kind]
    scale = expected.detach().abs().nan_to_num(0, 0, 0).max().item() if expected.numel() else 0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(scale, 1.0),
                               equal_nan=True, msg=lambda m: f"{what} ({kind}, {dtype}): {m}")


def assert_compiled_matches_eager(step, compiled, eager_state, compiled_state, make_y,
                                  steps: int = 2) -> None:
    """Training steps of ``step`` (eager) and ``compiled`` on equal inputs ``make_y(i)``, each on
    its own state: value, gradient and state (p and mu) agree after every step, so the state a
    step updates is what the next step's forward and backward use. Both get ``make_y(i)``'s
    exact strides (sliced inputs included), so both trace the same layout."""
    for i in range(steps):
        y_eager = make_y(i).detach().requires_grad_()
        y_compiled = same_layout_copy(y_eager).requires_grad_()
        value_eager = step(y_eager, eager_state)
        value_compiled = compiled(y_compiled, compiled_state)
        assert_close(value_compiled, value_eager, torch.float32, "penalty", f"step {i}")
        (grad_eager,) = torch.autograd.grad(value_eager, y_eager)
        (grad_compiled,) = torch.autograd.grad(value_compiled, y_compiled)
        assert_close(grad_compiled, grad_eager, torch.float32, "grad", f"step {i}")
        assert_close(compiled_state.mu, eager_state.mu, torch.float32, "state", f"step {i}")
        assert_close(compiled_state.p, eager_state.p, torch.float32, "state", f"step {i}")


def same_layout_copy(y: torch.Tensor) -> torch.Tensor:
    """A copy of ``y`` with its exact strides; ``clone()`` makes a sliced tensor dense."""
    return torch.empty_strided(y.shape, y.stride(), dtype=y.dtype,
                               device=y.device).copy_(y.detach())


def random_activations(shape, dtype=torch.float32, seed=0, scale=2.0,
                       zeros=0.05) -> torch.Tensor:
    """Activations with both signs, a fraction of exact zeros (where relu'(0) = 0 must hold) and
    a spread like pre-activations."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.3
    y[torch.rand(shape, generator=g) < zeros] = 0.0
    return y.to(dtype)


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request) -> str:
    return request.param


def fake_cifar10(root: Path, per_batch: int, test: int) -> Path:
    """A CIFAR-10 folder under ``root`` with random images: ``per_batch`` in each of the five
    training batches, ``test`` in the test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    counts = {**{f"data_batch_{i}": per_batch for i in range(1, 6)}, "test_batch": test}
    for name, count in counts.items():
        batch = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, count).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def fake_mnist_m(root: Path, train: int, test: int) -> Path:
    """An MNIST-M folder under ``root`` with ``train`` and ``test`` random 28x28 PNGs."""
    from skimage.io import imsave

    folder = root / "mnist_m"
    rng = np.random.default_rng(0)
    for part, count in (("train", train), ("test", test)):
        (folder / f"mnist_m_{part}").mkdir(parents=True)
        lines = []
        for i in range(count):
            imsave(folder / f"mnist_m_{part}" / f"{i:08d}.png",
                   rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), check_contrast=False)
            lines.append(f"{i:08d}.png {i % 10}\n")
        (folder / f"mnist_m_{part}_labels.txt").write_text("".join(lines))
    return root
