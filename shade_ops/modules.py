"""SHADE on a whole model: ShadeReLU, convert, collect, and attach for layers without a ReLU.

A layer is a call site, not a module object (SPEC section 5): a module called at several places in
one forward (torchvision's ``BasicBlock`` calls its one ``self.relu`` twice) keeps one state and
one penalty per call site. The k-th call of a module within one forward of its model is its call
site k: ``convert`` (or ``track``) gives the model hooks that open a record of each forward, per
thread (``_forward_record.py``), in which the calls are counted, the penalties kept and the state
updates held until the forward ends and every layer's number of calls matched its sites; and
``collect`` adds the penalties of the last forward's record.
"""
from __future__ import annotations

import re
import threading
import warnings
from collections import Counter
from types import MappingProxyType
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from . import _checkpoint, _forward_record
from ._layout import check_choices, check_inputs, check_unit_dim, unit_count_message
from ._ops import PenaltyOps, resolve_backend
from .functional import run as _run
from .state import ShadeState

__all__ = ["ShadePenalty", "ShadeReLU", "attach", "call_sites", "collect", "convert", "track"]

_NEW_SITES = threading.Lock()

# What the fast path asks of every call, looked up once (each is a C function).
_is_compiling = torch.compiler.is_compiling
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_is_tracing = torch._C._is_tracing
_is_grad_enabled = torch.is_grad_enabled
_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks


class _Plan:
    """What a checked call of one call site found, so that the next call of that site with the
    same kind of input can skip the checks (``_ShadeLayer._planned``).

    Made only for the plainest case: eager, a fused backend, ``y`` a contiguous tensor whose units
    lie on dim 1 (so the op takes y itself and returns relu(y) in y's layout), a state that is
    not synchronised. ``fits`` says whether a call is still that case: the same dtype, device,
    number of dims and units, the layer's options unchanged, and the same state with the same
    buffers (``.to()``, ``load_state_dict(assign=True)`` or a new state replaces them: the next
    call is checked, and makes the site a new plan).
    """

    __slots__ = ("dtype", "device", "dim", "units", "unit_dim", "reduction", "backend", "ops",
                 "state", "p", "mu", "name")

    def __init__(self, layer: "_ShadeLayer", y: torch.Tensor, site: int, state: ShadeState,
                 ops: PenaltyOps) -> None:
        self.dtype, self.device, self.dim, self.units = y.dtype, y.device, y.dim(), y.shape[1]
        self.unit_dim, self.reduction, self.backend = layer.unit_dim, layer.reduction, \
            layer.backend
        self.ops, self.state = ops, state
        self.p, self.mu = state._buffers["p"], state._buffers["mu"]
        # where the layer keeps this site's state: "state", or extra_states' str(site - 1)
        self.name = None if site == 0 else str(site - 1)

    def fits(self, layer: "_ShadeLayer", y: torch.Tensor) -> bool:
        state = self.state
        buffers = state._buffers
        modules = layer._modules
        if self.name is None:
            held = modules.get("state")
        else:
            extra = modules.get("extra_states")
            held = extra._modules.get(self.name) if extra is not None else None
        # `is` for the options: unit_dim=True or 1.0 equals 1 but is refused by the checks
        return (y.dtype is self.dtype and y.dim() == self.dim and y.shape[1] == self.units
                and y.is_contiguous() and y.device == self.device
                and layer.unit_dim is self.unit_dim and layer.reduction == self.reduction
                and layer.backend == self.backend and held is state
                and buffers.get("mu") is self.mu and buffers.get("p") is self.p
                and self.mu.device == self.device  # swap_tensors keeps the object, not its device
                and state.training and not state.sync)


class _ShadeLayer(nn.Module):
    """One state and one penalty per call site of this module in a forward of its model.

    Site 0's state is ``self.state`` (``None`` until the first input when ``num_units`` is None),
    sites 1, 2, ... are ``self.extra_states[0], [1], ...``: a module called once has the keys
    ``state.p``/``state.mu`` in its ``state_dict``, whatever else it could be.
    """

    state: ShadeState | None
    # call site -> its plan (see _Plan); the class's empty one for a layer pickled before plans
    _plans: Mapping[int, _Plan] = MappingProxyType({})

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
        # What made the call sites: None (a new call makes one), "checkpoint" (they are the
        # checkpoint's until a forward has run) or "forward" (a completed training forward of a
        # tracked model, which also fixed that model's number of calls; see _forward_record).
        self._sites_from: str | None = None
        # (model type, name in it) once track() saw this layer in a model: a training call with
        # no forward of a tracked model open is then a part called on its own.
        self._tracked: tuple[str, str] | None = None
        self._last: _forward_record.Forward | None = None  # the record of the last training call
        self._alone: torch.Tensor | None = None  # the penalty of the last call outside a record
        self._alone_calls = 0   # calls outside a record since the penalties were last read
        self._plans = {}

    # ---- the states -----------------------------------------------------------------------

    @property
    def states(self) -> list[ShadeState]:
        """The state of every call site seen so far, in call order."""
        return ([self.state] if self.state is not None else []) + list(self.extra_states)

    def _num_sites(self) -> int:
        return (self.state is not None) + len(self.extra_states)

    def _new_state(self, num_units: int) -> ShadeState:
        # Normal tensors even when the first forward runs under inference_mode, so that training
        # can update them later.
        with torch.inference_mode(False):
            state = ShadeState(num_units, self.decay, sync=self.sync,
                               process_group=self.process_group,
                               device=self._device_anchor.device)
        return state.train(self.training)

    def _add_site(self, state: ShadeState) -> None:
        if self.state is None:
            self.state = state
        else:
            self.extra_states.append(state)

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

    def _site_state(self, y: torch.Tensor, site: int,
                    record: _forward_record.Forward | None) -> tuple[ShadeState, int]:
        """The state of call site ``site`` (made at its first input) and the unit dim."""
        if site == 0:
            state = self.state
        else:
            extra = self.extra_states
            state = extra[site - 1] if site <= len(extra) else None
        if state is None:
            if record is not None and not record.variable_calls and (
                    self in record.counts or self._sites_from == "checkpoint"):
                model = record.model
                _forward_record.abandon()
                raise RuntimeError(_forward_record.call_count_message(model, self, site + 1,
                                                                      during=True))
            state = self._new_site(y, site)
        unit_dim = self._resolve_unit_dim(y, state.num_units)
        if y.shape[unit_dim] != state.num_units:
            message = unit_count_message(y, unit_dim, state.num_units)
            if self.extra_states:
                message = (f" at its call site {site} (its call {site + 1} in this "
                           f"forward): {message} Or the number of calls of this module "
                           f"changed from forward to forward, which renumbers its call "
                           f"sites: give each place its own module, or see "
                           f"shade_ops.track(variable_calls=).")
            else:
                message = ": " + message
            raise ValueError(f"{type(self).__name__}{message}")
        return state, unit_dim

    def _new_site(self, y: torch.Tensor, site: int) -> ShadeState:
        unit_dim = self._resolve_unit_dim(y, self.num_units)
        if self.num_units is not None and y.shape[unit_dim] != self.num_units:
            raise ValueError(f"{type(self).__name__}(num_units={self.num_units}) at its call "
                             f"site {site}: " + unit_count_message(y, unit_dim, self.num_units))
        if torch.compiler.is_compiling():
            self._add_site(self._new_state(y.shape[unit_dim]))
            return self.states[site]
        with _NEW_SITES:  # two threads' first forwards: one state per site
            if site == self._num_sites():
                self._add_site(self._new_state(y.shape[unit_dim]))
            return self.states[site]

    def _replicate_for_data_parallel(self):
        # nn.DataParallel's replicas copy __dict__: each gets plans of its own (a plan holds the
        # state of the replica that made it)
        replica = super()._replicate_for_data_parallel()
        replica.__dict__["_plans"] = {}
        return replica

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A layer whose call sites are not fixed yet takes them, and their sizes, from the
        # checkpoint, as LazyBatchNorm takes its size; one whose sites are fixed loads as any
        # module: the checkpoint's other sites are unexpected keys, its missing ones missing.
        if self._sites_from is None:
            while (saved := state_dict.get(_site_key(prefix, self._num_sites()))) is not None:
                self._add_site(self._new_state(saved.shape[1]))
            if _site_key(prefix, 0) in state_dict:
                self._sites_from = "checkpoint"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- the penalties --------------------------------------------------------------------

    def _forward(self, y: torch.Tensor, relu: bool) -> torch.Tensor:
        if not self.training:
            if self._last is not None or self._alone is not None:
                self._last = self._alone = None
            return torch.relu(y) if relu else y
        # (compiled code never reads the plans: dynamo would guard on them)
        if not _is_compiling() and self._plans and type(y) is torch.Tensor:
            out = self._planned(y, relu)
            if out is not None:
                return out
        if torch.jit.is_tracing():
            _forward_record.abandon()
            raise RuntimeError(f"{type(self).__name__} cannot be traced with torch.jit.trace in "
                               "training mode: the trace would drop the penalty. Use "
                               "torch.compile or torch.export, or trace the model in eval mode.")
        if getattr(torch.compiler, "is_exporting", lambda: False)():
            _forward_record.abandon()
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
        opened = _forward_record.THREAD.open
        if not opened:
            if self._tracked is not None:
                raise RuntimeError(self._called_alone_message())
            state, unit_dim = self._site_state(y, 0, None)
            check_inputs(y, state, unit_dim, self.reduction, self.backend)
            out, value = _run(y, state, unit_dim, self.reduction, None, self.backend, relu)
            if self._last is not None:
                self._last = None
            self._alone = value
            self._alone_calls += 1
            self._plan(y, 0, state, unit_dim)
            return out
        record = opened[-1]
        site = record.sites.get(self, 0)
        state, unit_dim = self._site_state(y, site, record)
        check_inputs(y, state, unit_dim, self.reduction, self.backend)
        out, value = _run(y, state, unit_dim, self.reduction, None, self.backend, relu,
                          record.updates)
        record.sites[self] = site + 1
        record.penalties.append((self, value))
        if self._last is not record:
            self._last = record
        self._plan(y, site, state, unit_dim)
        return out

    # ---- the fast path: a call like the last checked one of its site -----------------------

    def _plan(self, y: torch.Tensor, site: int, state: ShadeState, unit_dim: int) -> None:
        """After a checked call: keep its plan when the next calls can take the fast path."""
        if (type(y) is not torch.Tensor or _is_compiling() or not y.is_contiguous()
                or unit_dim % y.dim() != 1 or (y.dim() == 3 and self.unit_dim is None)
                or state.sync):
            return  # (a 3-D input without unit_dim: its unit dim is found anew at every call)
        old = self._plans.get(site)
        if old is not None and old.fits(self, y):
            return
        ops = resolve_backend(self.backend, y.device)
        if ops is not None:
            self.__dict__.setdefault("_plans", {})[site] = _Plan(self, y, site, state, ops)

    def _planned(self, y: torch.Tensor, relu: bool) -> torch.Tensor | None:
        """The call through its site's plan, or None (nothing done) when the call needs the
        checked path: the plan does not fit, or the call runs traced, exported, without grad or
        under saved-tensor hooks (a checkpoint, recompute_relu, save_on_cpu); the caller has
        made sure it is not compiled.

        What it skips is what the checked path found out for this site before: the input checks,
        the unit dim, the backend; what it does is the same, the same op on the same arguments,
        the update applied or deferred to the record and the same bookkeeping."""
        if (_is_tracing() or _is_exporting() or not _is_grad_enabled()
                or _saved_tensors_hooks(False) is not None):
            return None
        opened = _forward_record.THREAD.open
        if opened:
            record = opened[-1]
            site = record.sites.get(self, 0)
        elif self._tracked is None:
            record, site = None, 0
        else:
            return None  # the checked path raises
        plan = self._plans.get(site)
        if plan is None or not plan.fits(self, y):
            return None
        ops = plan.ops
        if relu:
            value, sums, out, _ = ops.relu_forward(y, plan.mu, plan.reduction)
        else:
            value, sums, _ = ops.forward(y, plan.mu, plan.reduction)
            out = y
        # The checked path's bookkeeping, written again: here through __dict__ (nn.Module's
        # __setattr__ costs a microsecond), which the checked path, traced by torch.compile, cannot
        # use; and the update without apply_update's all-reduce (a plan's state is never
        # synchronised) and its nn.Module attribute reads.
        attributes = self.__dict__
        if record is None:
            ops.update(plan.p, plan.mu, sums, plan.state.decay)
            attributes["_last"] = None
            attributes["_alone"] = value
            attributes["_alone_calls"] += 1
        else:
            record.updates.append((ops, plan.state, sums))
            record.sites[self] = site + 1
            record.penalties.append((self, value))
            if self._last is not record:
                attributes["_last"] = record
        return out

    def _called_alone_message(self) -> str:
        owner, name = self._tracked
        return (f"shade_ops: the {type(self).__name__} '{name}' of a tracked {owner} was called "
                f"in training mode outside a forward of that model (a part of it called on its "
                f"own, as in feature extraction or probing a block). Its call sites are counted "
                f"per forward of the model, so this call has none to use. Call the model itself; "
                f"to extract features, put the model in eval mode (model.eval(): a plain ReLU, no "
                f"penalty, no update); to train the part on its own, shade_ops.track(part) and "
                f"add shade_ops.collect(part) to the loss.")

    @property
    def penalty(self) -> torch.Tensor | None:
        """The sum of this module's penalties in the last forward, over its call sites (a
        differentiable 0-dim tensor), or None when it had none (eval mode, not called)."""
        penalties = self.penalties
        return _sum(penalties) if penalties else None

    @property
    def penalties(self) -> list[torch.Tensor]:
        """The penalty of each call site in the last forward, in call order."""
        record = self._last
        if record is None:
            self.__dict__["_alone_calls"] = 0  # read: the next call starts a new forward
            return [] if self._alone is None else [self._alone]
        record.collected = True
        return [value for layer, value in record.penalties if layer is self]

    def __getstate__(self):
        # copy.deepcopy and pickle (EMA copies, best-model snapshots) at any point of a step: the
        # penalties are non-leaf tensors holding the step's graph, which the copy must not take.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.update(_last=None, _alone=None, _alone_calls=0, _plans={})
        return state

    def extra_repr(self) -> str:
        units = [s.num_units for s in self.states] or self.num_units
        return f"num_units={units}, decay={self.decay}, unit_dim={self.unit_dim}"


def _site_key(prefix: str, site: int) -> str:
    return f"{prefix}state.p" if site == 0 else f"{prefix}extra_states.{site - 1}.p"


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


def _check_module(model, name: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"shade_ops.{name} takes the model, an nn.Module, got "
                        f"{type(model).__name__}")


def track(model: nn.Module, *, variable_calls: bool = False) -> nn.Module:
    """Count call sites per forward of ``model``, so that a module called at several places keeps
    one state per place: each forward of ``model`` opens a record in which a SHADE layer's k-th
    call is its call site k, and ``collect(model)`` reads the record of its last forward.
    :func:`convert` calls it; call it yourself on a model that you built with ShadeReLU /
    ShadePenalty modules. Returns ``model``.

    Once a training forward has completed, each layer's number of call sites is fixed: a later
    forward that calls a layer another number of times (a data-dependent number of calls) raises
    RuntimeError and updates no state, instead of training the wrong sites. With
    ``variable_calls=True`` it is accepted: the k-th call of every forward uses call site k's
    state, and a call beyond the known sites makes a new one.

    Call the model itself: a SHADE layer of a tracked model called in training mode outside a
    forward of the model raises (put the model in eval mode to extract features, or track the
    part to train it alone). Calling ``track`` again picks up new SHADE layers.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    _check_module(model, "track")
    for name, layer in model.named_modules():
        if isinstance(layer, _ShadeLayer):
            layer._tracked = (type(model).__name__, name)
    model._shade_ops_variable_calls = bool(variable_calls)
    if not isinstance(getattr(model, "_shade_ops_calls", None), dict):
        model._shade_ops_calls = {}  # see _forward_record.Forward.counts
    if not isinstance(getattr(model, "_shade_ops_last", None), _forward_record.LastForward):
        model._shade_ops_last = _forward_record.LastForward()
    if _forward_record.begin_forward not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_forward_record.begin_forward)
        model.register_forward_hook(_forward_record.forward_returned)
        model.register_forward_hook(_forward_record.end_forward, always_call=True)
    return model


# Activations that are not ReLU (by class or function name), which SHADE leaves alone.
_OTHER_ACTIVATION = re.compile(r"relu6|silu|swish|gelu|mish|elu|sigmoid|tanh|softplus", re.I)


def no_relu_message(finder: str, model: nn.Module, names=()) -> str:
    """What convert / convert_fx say of a model in which they found no ReLU at all, naming the
    other activations it has (module classes, and ``names`` of functions from a graph)."""
    found = Counter(name for name in [*(type(m).__name__ for m in model.modules()), *names]
                    if _OTHER_ACTIVATION.search(name) and name.lower() != "relu")
    text = (f"shade_ops.{finder} found no ReLU in this {type(model).__name__}: nothing in it "
            f"gets SHADE.")
    if found:
        listed = ", ".join(f"{name} (x{count})" for name, count in found.most_common())
        text += (f" Its activations are {listed}: SHADE is defined on ReLU units, and these stay "
                 f"as they are (shade_ops.attach(layer) puts SHADE on a layer's output by hand).")
    return text


def convert(model: nn.Module, *, variable_calls: bool = False, **kwargs) -> nn.Module:
    """Replace every ``nn.ReLU`` in ``model`` (nested ones, ``inplace=True`` ones, one instance
    held in several places) with a ``ShadeReLU(**kwargs)``, in place, and :func:`track` the model
    (with ``variable_calls``); returns the model (a ShadeReLU when model is a ReLU).

    A ReLU instance held in several places becomes one ShadeReLU in all of them, with a state per
    call site. ``num_units`` is best left None here: each call site takes its size from its first
    input. ReLUs applied as functions (``F.relu``, ``torch.relu``) are not modules and stay
    unregularised: use :func:`shade_ops.convert_fx` for those models (a warning at the first
    training forward that computes no penalty says so).
    """
    if isinstance(model, nn.ReLU):
        return ShadeReLU(**kwargs)
    _check_module(model, "convert")
    ShadeReLU(**kwargs)  # bad arguments fail here, before the model is touched
    replaced: dict[int, ShadeReLU] = {}
    _replace_relus(model, kwargs, replaced)
    if not replaced and not _shade_layers(model):
        warnings.warn(no_relu_message("convert", model) + " If it applies ReLU as a function "
                      "(F.relu, torch.relu), use shade_ops.convert_fx(model).", stacklevel=2)
    return track(model, variable_calls=variable_calls)


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
    """The sum of the penalties of every SHADE call site of ``model``'s last forward (in this
    thread, for a tracked model; for a part of one, its layers' penalties in the last forward
    they ran in).

    A 0-dim tensor; 0 when none has a penalty (none ran, or the model is in eval mode).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: a SHADE layer called outside any forward of a tracked model was called
            more than once since the last collect: its call sites would share a state.
    """
    _check_module(model, "collect")
    last = getattr(model, "_shade_ops_last", None)
    if isinstance(last, _forward_record.LastForward):
        # inside the model's own forward (a loss computed in forward): the calls so far
        record = _forward_record.open_record(model) or last.box[0]
        if record is None:
            return torch.zeros(())
        record.collected = True
        penalties = [value for _, value in record.penalties]
    else:
        penalties = []
        for layer in _shade_layers(model):
            if layer._last is None and layer._alone_calls > 1:
                calls, layer._alone_calls = layer._alone_calls, 0
                raise RuntimeError(
                    f"shade_ops.collect: a {type(layer).__name__} was called {calls} times since "
                    f"the last collect, in a model that shade_ops does not count call sites of. "
                    f"If it sits at several places of one forward, call shade_ops.track(model) "
                    f"(convert does) once before training so that each place gets its own state; "
                    f"with several forwards before one backward, call collect after each forward.")
            penalties.extend(layer.penalties)
    if not penalties:
        return torch.zeros(())
    return _sum(penalties)


def call_sites(model: nn.Module) -> dict[str, list[int]]:
    """The SHADE layers of ``model`` by name, each with the unit count of every call site seen so
    far (a list of one for a module called once): what ``convert`` put SHADE on.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    _check_module(model, "call_sites")
    return {name: [s.num_units for s in m.states] for name, m in model.named_modules()
            if isinstance(m, _ShadeLayer)}
