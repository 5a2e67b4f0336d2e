"""SHADE under ``torch.utils.checkpoint``: the recomputation updates nothing and sees the state of
the original forward.

A checkpointed segment runs twice: once in the forward, once more in the backward to rebuild the
tensors its backward needs. A SHADE layer in it must update its state in the first run only, and
the second run must compute with the state as the first one saw it, or the gradient would be taken
against another state than the penalty.

Non-reentrant checkpoint (``use_reentrant=False``) marks both runs with its saved-tensor hooks:
the first run packs every saved tensor into a holder of its ``_CheckpointFrame``; the recomputation
counts the tensors it saves again, in the same order. The number of tensors the segment saved
before a SHADE call is therefore the same in both runs: with the frame, it names the call, and the
first run leaves the state it used under that name for the second.

Reentrant checkpoint (``use_reentrant=True``) runs the segment under ``no_grad`` and sends only the
segment's outputs' gradients back through the recomputation: a penalty computed inside can never
get its gradient. It is refused with an error that says to use ``use_reentrant=False``.

The hooks and the frame are internals of ``torch.utils.checkpoint``; ``tests/test_recipes.py``
checks that they are still found, so a torch version that changes them fails in CI, not in
training.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch

__all__ = ["Recompute", "recomputation", "refuse_reentrant_checkpoint", "remember"]

# On the _CheckpointFrame: {tensors saved before the call: [Recompute, ...]}
_FRAME_ATTRIBUTE = "_shade_ops_calls"


@dataclass(frozen=True)
class Recompute:
    """A SHADE call inside the recomputation of a checkpointed segment: compute with the state
    and unit dim of the original call (``mu``, ``unit_dim``), update nothing, record nothing."""

    mu: torch.Tensor
    unit_dim: int


def _closure_variable(fn, name: str):
    fn = inspect.unwrap(fn)  # the recomputation's hook is wrapped by torch._dynamo.disable
    code = getattr(fn, "__code__", None)
    if code is None or name not in code.co_freevars:
        return None
    return fn.__closure__[code.co_freevars.index(name)].cell_contents


def _checkpoint_hooks():
    """("_checkpoint_hook" or "_recomputation_hook", pack hook) when the innermost saved-tensor
    hooks are a checkpoint's, else None."""
    if torch.compiler.is_compiling():
        return None  # compiled code recomputes in its own graph, without these hooks
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return None
    name = getattr(inspect.unwrap(hooks[0]), "__qualname__", "")
    for owner in ("_checkpoint_hook", "_recomputation_hook"):
        if name.startswith(owner + "."):
            return owner, hooks[0]
    return None


def recomputing() -> bool:
    """Whether this runs inside the recomputation of a non-reentrant checkpoint segment."""
    found = _checkpoint_hooks()
    return found is not None and found[0] == "_recomputation_hook"


def _unknown_internals() -> RuntimeError:
    return RuntimeError(
        "shade_ops: a SHADE layer runs inside torch.utils.checkpoint, but the checkpoint's "
        f"internals are not the ones shade_ops knows (torch {torch.__version__}), so it cannot "
        "keep the recomputation from updating the state again. Checkpoint a part of the model "
        "without SHADE layers, or use a torch version that tests/test_recipes.py passes on.")


def remember(mu: torch.Tensor, unit_dim: int) -> None:
    """In the first run of a checkpointed segment, leave the state this call computes with for
    its recomputation; elsewhere nothing."""
    found = _checkpoint_hooks()
    if found is None or found[0] != "_checkpoint_hook":
        return
    frame = _closure_variable(found[1], "frame")
    if frame is None or not hasattr(frame, "weak_holders"):
        raise _unknown_internals()
    calls = frame.__dict__.setdefault(_FRAME_ATTRIBUTE, {})
    # Calls that save nothing in between (y without grad) share an index: a list keeps each one.
    calls.setdefault(len(frame.weak_holders), []).append(Recompute(mu.detach().clone(), unit_dim))


def recomputation() -> Recompute | None:
    """What the first run left for this call when it runs in a checkpoint's recomputation, else
    None."""
    found = _checkpoint_hooks()
    if found is None or found[0] != "_recomputation_hook":
        return None
    frame_ref = _closure_variable(found[1], "target_frame_ref")
    group = _closure_variable(found[1], "gid")
    frame = frame_ref() if frame_ref is not None else None
    calls = getattr(frame, _FRAME_ATTRIBUTE, None)
    counter = getattr(frame, "recomp_counter", None)
    if calls is None or counter is None or counter[group] not in calls:
        raise _unknown_internals()
    same_index = calls[counter[group]]
    taken = frame.__dict__.setdefault(_FRAME_ATTRIBUTE + "_taken", {})
    position = taken.get((group, counter[group]), 0)
    taken[(group, counter[group])] = position + 1
    return same_index[min(position, len(same_index) - 1)]


def refuse_reentrant_checkpoint() -> None:
    """Raise when called from the forward of a reentrant ``torch.utils.checkpoint``. Only worth
    asking when grad is off in a training forward: the stack walk costs a few microseconds."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_filename.endswith(
                ("torch/utils/checkpoint.py", "torch\\utils\\checkpoint.py")):
            raise RuntimeError(
                "shade_ops: a SHADE layer runs inside torch.utils.checkpoint with "
                "use_reentrant=True, which runs the segment without grad and sends back only "
                "the gradients of its outputs: the penalty could never get its gradient. Use "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False), which shade_ops "
                "supports (same gradients and state as without checkpointing).")
        frame = frame.f_back
