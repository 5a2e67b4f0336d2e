"""shade_ops: the SHADE regulariser (Blot et al., "SHADE: Information-Based Regularization for
Deep Learning") as fused, registered PyTorch ops.

    state = shade_ops.ShadeState(num_units)
    loss = criterion(logits, target) + beta * shade_ops.penalty(activations, state)
"""
from . import reference
from ._ops import available_backends
from .functional import penalty, relu_penalty
from .state import ShadeState

__all__ = ["ShadeState", "available_backends", "penalty", "reference", "relu_penalty"]
__version__ = "0.1.0"
