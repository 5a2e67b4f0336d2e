"""shade_ops: the SHADE regulariser (Blot et al., "SHADE: Information-Based Regularization for
Deep Learning") as fused, registered PyTorch ops.

    state = shade_ops.ShadeState(num_units)
    loss = criterion(logits, target) + beta * shade_ops.penalty(activations, state)

or, on a whole model:

    model = shade_ops.convert(model)            # every nn.ReLU becomes a ShadeReLU
    loss = criterion(model(x), target) + beta * shade_ops.collect(model)
"""
from . import amp, reference
from ._ops import available_backends
from .functional import penalty, relu_penalty
from .modules import ShadePenalty, ShadeReLU, attach, collect, convert
from .state import ShadeState

__all__ = ["ShadePenalty", "ShadeReLU", "ShadeState", "attach", "available_backends", "collect",
           "convert", "penalty", "reference", "relu_penalty", "amp"]
__version__ = "0.1.0"
