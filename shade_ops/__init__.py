"""shade_ops: the SHADE regulariser (Blot et al., "SHADE: Information-Based Regularization for
Deep Learning") as fused, registered PyTorch ops.

    state = shade_ops.ShadeState(num_units)
    loss = criterion(logits, target) + beta * shade_ops.penalty(activations, state)

or, on a whole model:

    model = shade_ops.convert(model)            # every nn.ReLU becomes a ShadeReLU
    loss = criterion(model(x), target) + beta * shade_ops.collect(model)

(``shade_ops.convert_fx(model)`` for models that call ``F.relu``/``torch.relu``). Every call site
of a ReLU is a layer with its own state and penalty, also when one module is called at several
places.
"""
from . import amp, reference
from ._ops import available_backends
from .functional import penalty, relu_penalty
from .memory import recompute_relu
from .fx import convert_fx
from .modules import ShadePenalty, ShadeReLU, attach, call_sites, collect, convert, track
from .state import ShadeState

__all__ = ["ShadePenalty", "ShadeReLU", "ShadeState", "amp", "attach", "available_backends",
           "call_sites", "collect", "convert", "convert_fx", "penalty", "recompute_relu",
           "reference", "relu_penalty", "track"]
__version__ = "0.1.0"
