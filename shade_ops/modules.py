"""SHADE on a whole model: ShadeReLU, convert, collect, and attach for layers without a ReLU.

A layer is a call site, not a module object (SPEC section 5): a module called at several places in
one forward (torchvision's ``BasicBlock`` calls its one ``self.relu`` twice) keeps one state and
one penalty per call site. The k-th call of a module within one forward of its model is its call
site k: ``convert`` (or ``track``) gives the model a forward pre-hook that starts the count again
at every forward, and ``collect`` adds the penalties of every call site of the last forward.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from . import _checkpoint
from ._layout import check_choices, check_inputs, check_unit_dim, unit_count_message
from .functional import run as _run
from .state import ShadeState

__all__ = ["ShadePenalty", "ShadeReLU", "attach", "call_sites", "collect", "convert", "track"]


class _ShadeLayer(nn.Module):
    """One state and one penalty per call site of this module in a forward of its model.

    Site 0's state is ``self.state`` (``None`` until the first input when ``num_units`` is None),
    sites 1, 2, ... are ``self.extra_states[0], [1], ...``: a module called once has the keys
    ``state.p``/``state.mu`` in its ``state_dict``, whatever else it could be.
    """

    state: ShadeState | None

    def __init__(self, num_units: int | None = None, decay: float = 0.8,
                 unit_dim: int | None = None, *, sync: bool = False,
                 process_group: dist.ProcessGroup | None = None, reduction: str = "mean",
                 backend: str = "auto") -> None:
        super().__init__()
        if num_units is not None and (isinstance(num_units, bool) or not isinstance(num_units, int)
                                      or num_units < 1):
            raise ValueError(f"num_units must be a positive int or None, got {num_units!r}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        if unit_dim is not None:
            check_unit_dim(unit_dim)
        check_choices(reduction, backend)
        self.num_units, self.decay, self.unit_dim = num_units, float(decay), unit_dim
        self.sync, self.process_group = sync, process_group
        self.reduction, self.backend = reduction, backend
        # Follows .to(device) before the first input, so that lazily made states go there too.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self.state = self._new_state(num_units) if num_units is not None else None
        self.extra_states = nn.ModuleList()
        self._site = 0          # call sites seen so far in this forward of the model
        self._tracked = False   # whether a model's forward pre-hook resets _site (see track)
        self._penalties: list[torch.Tensor] = []
        self._collected = True  # whether the penalties were read (collect or .penalty)

    # ---- the states -----------------------------------------------------------------------

    @property
    def states(self) -> list[ShadeState]:
        """The state of every call site seen so far, in call order."""
        return ([self.state] if self.state is not None else []) + list(self.extra_states)

    def _new_state(self, num_units: int) -> ShadeState:
        # Normal tensors even when the first forward runs under inference_mode, so that training
        # can update them later.
        with torch.inference_mode(False):
            state = ShadeState(num_units, self.decay, sync=self.sync,
                               process_group=self.process_group,
                               device=self._device_anchor.device)
        return state.train(self.training)

    def _resolve_unit_dim(self, y: torch.Tensor, known: int | None) -> int:
        """Where y's units lie: ``unit_dim`` when given; else dim 1 for 2-D, 4-D and 5-D input
        (BatchNorm's convention), and for 3-D input the one of dims 1 and -1 that holds the known
        number of units, if exactly one does."""
        if self.unit_dim is not None:
            check_unit_dim(self.unit_dim, y.dim())
            return self.unit_dim
        if y.dim() < 2:
            raise ValueError(f"{type(self).__name__} needs activations with a batch dim and a "
                             f"unit dim, got shape {tuple(y.shape)}; pass unit_dim")
        if y.dim() != 3:
            return 1
        fits = [d for d in (1, -1) if known is not None and y.shape[d] == known]
        if len(fits) == 1:
            return fits[0]
        raise ValueError(
            f"{type(self).__name__} got 3-D activations of shape {tuple(y.shape)}, whose units "
            f"could lie on dim 1 ((N, C, L), as after a Conv1d) or on dim -1 ((N, L, D), as in a "
            f"transformer or a Linear on a sequence). Say which: unit_dim=1 or unit_dim=-1 (for "
            f"a whole model, shade_ops.convert(model, unit_dim=...) or set .unit_dim on this "
            f"module).")

    def _site_state(self, y: torch.Tensor) -> tuple[ShadeState, int]:
        """The state of this call's site (made at its first input) and the unit dim."""
        site = self._site if self._tracked else 0
        self._site += 1
        states = self.states
        known = states[site].num_units if site < len(states) else self.num_units
        unit_dim = self._resolve_unit_dim(y, known)
        if site == len(states):
            if self.num_units is not None and y.shape[unit_dim] != self.num_units:
                raise ValueError(f"{type(self).__name__}(num_units={self.num_units}) at its call "
                                 f"site {site}: " + unit_count_message(y, unit_dim, self.num_units))
            state = self._new_state(y.shape[unit_dim])
            if site == 0:
                self.state = state
            else:
                self.extra_states.append(state)
            return state, unit_dim
        state = states[site]
        if y.shape[unit_dim] != state.num_units:
            where = f" at its call site {site}" if self._tracked and len(states) > 1 else ""
            raise ValueError(f"{type(self).__name__}{where}: "
                             + unit_count_message(y, unit_dim, state.num_units))
        return state, unit_dim

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A lazy layer takes its sizes from the checkpoint, as LazyBatchNorm does.
        saved = state_dict.get(prefix + "state.p")
        if self.state is None and saved is not None:
            self.state = self._new_state(saved.shape[1])
        site = len(self.extra_states)
        while (saved := state_dict.get(f"{prefix}extra_states.{site}.p")) is not None:
            self.extra_states.append(self._new_state(saved.shape[1]))
            site += 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- the penalties --------------------------------------------------------------------

    def _forward(self, y: torch.Tensor, relu: bool) -> torch.Tensor:
        if not self.training:
            self._penalties = []
            return torch.relu(y) if relu else y
        if torch.jit.is_tracing():
            raise RuntimeError(f"{type(self).__name__} cannot be traced with torch.jit.trace in "
                               "training mode: the trace would drop the penalty. Use "
                               "torch.compile or torch.export, or trace the model in eval mode.")
        if getattr(torch.compiler, "is_exporting", lambda: False)():
            raise RuntimeError(f"{type(self).__name__} cannot be exported by torch.export in "
                               "training mode: the exported program would not update the SHADE "
                               "state. Export the model in eval mode (a plain ReLU there), and "
                               "train with eager or torch.compile.")
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{type(self).__name__} takes a tensor, got {type(y).__name__}")
        if _checkpoint.recomputation() is not None:
            # torch.utils.checkpoint rebuilding saved tensors: same computation as the first
            # run, no new call site, no penalty, no update (functional.run takes care of those)
            return _run(y, None, 0, self.reduction, False, self.backend, relu)[0]
        state, unit_dim = self._site_state(y)
        check_inputs(y, state, unit_dim, self.reduction, self.backend)
        out, value = _run(y, state, unit_dim, self.reduction, None, self.backend, relu)
        if not self._tracked:
            self._penalties = []  # one site: its last call only
        self._penalties.append(value)
        self._collected = False
        return out

    @property
    def penalty(self) -> torch.Tensor | None:
        """The sum of this module's penalties in the last forward, over its call sites (a
        differentiable 0-dim tensor), or None when it had none (eval mode, not called)."""
        penalties = self.penalties
        return _sum(penalties) if penalties else None

    @property
    def penalties(self) -> list[torch.Tensor]:
        """The penalty of each call site in the last forward, in call order."""
        self._collected = True
        if not self._tracked:
            self._site = 0  # read: the next call starts a new forward
        return list(self._penalties)

    def _begin_forward(self) -> None:
        self._site = 0
        self._penalties = []

    def __getstate__(self):
        # copy.deepcopy and pickle (EMA copies, best-model snapshots) at any point of a step: the
        # penalties are non-leaf tensors holding the step's graph, which the copy must not take.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_penalties"] = []
        state["_collected"] = True
        return state

    def extra_repr(self) -> str:
        units = [s.num_units for s in self.states] or self.num_units
        return f"num_units={units}, decay={self.decay}, unit_dim={self.unit_dim}"


def _sum(values: list[torch.Tensor]) -> torch.Tensor:
    return values[0] if len(values) == 1 else torch.stack(values).sum()


class ShadeReLU(_ShadeLayer):
    """``nn.ReLU`` that also computes this layer's SHADE penalty, fused into the same pass.

    In training mode, ``forward`` returns ``relu(y)`` and keeps the penalty (a differentiable
    0-dim float32 tensor) of this call, updating the state of this call site; its backward is one
    pass that adds the penalty's gradient to ReLU's. In eval mode it is a plain ReLU and
    ``penalty`` is None. Add ``beta * shade_ops.collect(model)`` to the loss.

    Args:
        num_units: units along ``unit_dim``; None takes them from the first input.
        decay, sync, process_group: of the :class:`ShadeState`.
        unit_dim: the dim of the units (1 for ``(N, C, ...)``, -1 for ``(..., C)``). None: dim 1
            for 2-D, 4-D and 5-D input; 3-D input, ``(N, C, L)`` or ``(N, L, D)``, is ambiguous
            and refused with an error that asks for it (unless ``num_units`` fits one dim only).
        reduction, backend: as in :func:`shade_ops.penalty`.

    A module called at several places of a forward has a state per call site (see
    :func:`track`, which :func:`convert` calls).
    """

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self._forward(y, relu=True)


class ShadePenalty(_ShadeLayer):
    """The SHADE penalty of another module's output, for layers not followed by a ReLU.

    Made by :func:`attach`, which registers it as a child of that module and calls it from a
    forward hook. ``forward(y)`` returns ``y`` unchanged and keeps the penalty (training mode
    only, like :class:`ShadeReLU`).
    """

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self._forward(y, relu=False)


# ---- the model: call sites, collect -----------------------------------------------------

_TUPLE_MODULES = (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)


def attach(module: nn.Module, *, select: int | Callable[[object], torch.Tensor] | None = None,
           **kwargs) -> ShadePenalty:
    """Put SHADE on ``module``'s output: returns the :class:`ShadePenalty` it added as
    ``module.shade`` (so it is saved with the model); ``collect`` finds it.

    Args:
        module: the layer whose output gets the penalty.
        select: for a module whose output is not a tensor (an ``nn.LSTM``'s ``(out, (h, c))``,
            ``nn.MultiheadAttention``'s ``(out, weights)``): the index of the tensor in the
            output tuple, or a function of the output that returns the tensor.
        kwargs: those of :class:`ShadePenalty` (``num_units``, ``decay``, ``unit_dim``, ...).

    Raises:
        ValueError: ``module`` already has a ``shade`` attribute, or it is a module that returns
            a tuple (RNN, LSTM, GRU, MultiheadAttention) and ``select`` is missing.
    """
    if hasattr(module, "shade"):
        raise ValueError(f"{type(module).__name__} already has an attribute 'shade'")
    if select is None and isinstance(module, _TUPLE_MODULES):
        raise ValueError(f"{type(module).__name__} returns a tuple: say which tensor gets SHADE "
                         f"with attach(module, select=0) (the index in the output, or a function "
                         f"of the output)")
    if select is not None and not (callable(select) or
                                   (isinstance(select, int) and not isinstance(select, bool))):
        raise TypeError(f"select must be an int or a function of the output, got {select!r}")
    shade = ShadePenalty(**kwargs)
    module.add_module("shade", shade)
    shade._select = select
    module.register_forward_hook(_call_shade)
    return shade


def _call_shade(module: nn.Module, inputs, output) -> None:
    select = getattr(module.shade, "_select", None)
    if select is not None:
        output = select(output) if callable(select) else output[select]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"shade_ops.attach: {type(module).__name__} returned a "
                        f"{type(output).__name__}, not a tensor; attach it again with select= "
                        f"(the index of the tensor in the output, or a function that picks it)")
    module.shade(output)


def _shade_layers(model: nn.Module) -> list[_ShadeLayer]:
    return [m for m in model.modules() if isinstance(m, _ShadeLayer)]


def track(model: nn.Module) -> nn.Module:
    """Count call sites per forward of ``model``: a hook at the start of each of its forwards
    starts every SHADE layer's count of calls again, so that a module called at several places
    keeps one state per place. :func:`convert` calls it; call it yourself on a model that you
    built with ShadeReLU / ShadePenalty modules. Returns ``model``.

    Call the model itself, not its parts: a part called on its own does not start a new count.
    Calling ``track`` again after changing the model picks up its new SHADE layers.
    """
    layers = _shade_layers(model)
    for sub in model.modules():
        if sub is not model and getattr(sub, "_shade_ops_layers", None) is not None:
            sub._shade_ops_layers = None  # an inner model tracked before: the outer one counts
    first = not getattr(model, "_shade_ops_hooked", False)
    model._shade_ops_layers = layers
    for layer in layers:
        layer._tracked = True
        layer._begin_forward()
    if first:
        model.register_forward_pre_hook(_begin_forward)
        model.register_forward_hook(_end_forward)
        model._shade_ops_hooked = True
    return model


def _begin_forward(model: nn.Module, args) -> None:
    layers = getattr(model, "_shade_ops_layers", None)
    if layers is None:
        return
    if model.training and not torch.compiler.is_compiling() and \
            not getattr(model, "_shade_ops_warned_uncollected", False) and \
            any(not layer._collected for layer in layers):
        model._shade_ops_warned_uncollected = True
        warnings.warn(
            "shade_ops: a forward of this model starts while the SHADE penalties of its last "
            "training forward were never collected. shade_ops.collect(model) returns the "
            "penalties of the last forward only: with several forwards before one backward "
            "(siamese models, several crops), call collect after each forward and add them up. "
            "(This warning is shown once.)", stacklevel=2)
    for layer in layers:
        layer._begin_forward()


def _end_forward(model: nn.Module, args, output) -> None:
    layers = getattr(model, "_shade_ops_layers", None)
    if layers is None or not model.training or torch.compiler.is_compiling() or \
            getattr(model, "_shade_ops_warned_unused", False):
        return
    if not any(layer._penalties for layer in layers):
        model._shade_ops_warned_unused = True
        warnings.warn(
            f"shade_ops: a training forward of this {type(model).__name__} computed no SHADE "
            f"penalty ({len(layers)} SHADE layers, none called). If the model applies its ReLUs "
            f"as functions (F.relu, torch.relu), shade_ops.convert cannot see them: use "
            f"shade_ops.convert_fx(model). (This warning is shown once.)", stacklevel=2)


def convert(model: nn.Module, **kwargs) -> nn.Module:
    """Replace every ``nn.ReLU`` in ``model`` (nested ones, ``inplace=True`` ones, one instance
    held in several places) with a ``ShadeReLU(**kwargs)``, in place, and :func:`track` the model;
    returns the model (a ShadeReLU when model is a ReLU).

    A ReLU instance held in several places becomes one ShadeReLU in all of them, with a state per
    call site. ``num_units`` is best left None here: each call site takes its size from its first
    input. ReLUs applied as functions (``F.relu``, ``torch.relu``) are not modules and stay
    unregularised: use :func:`shade_ops.convert_fx` for those models (a warning at the first
    training forward that computes no penalty says so).
    """
    if isinstance(model, nn.ReLU):
        return ShadeReLU(**kwargs)
    ShadeReLU(**kwargs)  # bad arguments fail here, before the model is touched
    replaced: dict[int, ShadeReLU] = {}
    _replace_relus(model, kwargs, replaced)
    if not replaced and not _shade_layers(model):
        from .fx import no_relu_message  # fx imports this module
        warnings.warn(no_relu_message("convert", model) + " If it applies ReLU as a function "
                      "(F.relu, torch.relu), use shade_ops.convert_fx(model).", stacklevel=2)
    return track(model)


def _replace_relus(module: nn.Module, kwargs: dict, replaced: dict[int, ShadeReLU],
                   seen: set[int] | None = None) -> None:
    # Through _modules rather than named_children, which skips a module it has already seen: a
    # Sequential holding one ReLU twice has both slots replaced, by one ShadeReLU.
    seen = set() if seen is None else seen
    for name, child in list(module._modules.items()):
        if isinstance(child, nn.ReLU):
            if id(child) not in replaced:
                replaced[id(child)] = ShadeReLU(**kwargs)
            module._modules[name] = replaced[id(child)]
        elif child is not None and id(child) not in seen:
            seen.add(id(child))
            _replace_relus(child, kwargs, replaced, seen)


def collect(model: nn.Module) -> torch.Tensor:
    """The sum of the penalties of every SHADE call site of ``model``'s last forward.

    A 0-dim tensor; 0 when none has a penalty (none ran, or the model is in eval mode).

    Raises:
        RuntimeError: a SHADE layer of a model that :func:`track` (or :func:`convert`) has not
            seen was called more than once in the forward: its call sites would share a state.
    """
    penalties = []
    for layer in _shade_layers(model):
        if not layer._tracked and layer._site > 1:
            calls = layer._site
            layer._site = 0
            raise RuntimeError(
                f"shade_ops.collect: a {type(layer).__name__} was called {calls} times since the "
                f"last collect, in a model that shade_ops does not count call sites of. If it sits "
                f"at several places of one forward, call shade_ops.track(model) (convert does) "
                f"once before training so that each place gets its own state; with several "
                f"forwards before one backward, call collect after each forward.")
        penalties.extend(layer.penalties)
    if not penalties:
        return torch.zeros(())
    return _sum(penalties)


def call_sites(model: nn.Module) -> dict[str, list[int]]:
    """The SHADE layers of ``model`` by name, each with the unit count of every call site seen so
    far (a list of one for a module called once): what ``convert`` put SHADE on."""
    return {name: [s.num_units for s in m.states] for name, m in model.named_modules()
            if isinstance(m, _ShadeLayer)}
