"""Which call site a SHADE call is: the forward record of a tracked model.

A tracked model's forward opens a record in the calling thread (its forward pre-hook, which
``modules.track`` registers). A SHADE layer called while it is open takes call site k on its k-th
call in that record, leaves its penalty there and defers its state update to it. The model's
forward hook closes the record: when every layer was called as many times as in the model's
first training forward (or the model accepts a variable number of calls), the updates are applied
and the record becomes the model's last forward, which ``collect`` reads; otherwise none is
applied and a RuntimeError names the layer. Deferring changes no value: each call site is called
once per forward, its penalty uses its state from before the forward either way, and the batch
sums an update takes do not depend on the state.

Everything lives in the calling thread (``threading.local``), so two threads running one model
number their calls apart, and in plain attributes and module-level hooks, which ``copy.deepcopy``
and pickling keep (``fx.py`` keeps them for a GraphModule, whose copies drop the hooks).
"""
from __future__ import annotations

import threading
import warnings

import torch
from torch import nn

from . import _checkpoint
from .functional import apply_update, apply_updates

__all__ = ["Forward", "LastForward", "Part", "THREAD", "abandon", "begin_forward",
           "end_forward", "forward_returned"]


class _Thread(threading.local):
    def __init__(self) -> None:
        # The forward record open in this thread, in a list: torch.compile keeps a list's
        # changes across graph breaks, not those of a thread-local's attributes.
        self.open: list[Forward] = []


THREAD = _Thread()
# One forward's updates go in together, so that threads updating one state do not interleave
# within a unit (eager only: compiled code applies them in its graph).
_UPDATES = threading.Lock()


class Forward:
    """One forward of a tracked model in one thread.

    ``sites[layer]``: the layer's calls so far (its k-th call is call site k); ``penalties``:
    ``(layer, penalty)`` in call order; ``updates``: ``(ops, state, sums)`` to apply at the end.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model: nn.Module | None = model
        self.variable_calls: bool = model._shade_ops_variable_calls
        # the model's number of calls of each layer, fixed by its first training forward
        self.counts: dict[nn.Module, int] = model._shade_ops_calls
        self.sites: dict[nn.Module, int] = {}
        self.penalties: list[tuple[nn.Module, torch.Tensor]] = []
        self.updates: list[tuple] = []
        self.returned = False    # the model's forward returned, set by forward_returned
        self.collected = False


class Part:
    """The forward of a tracked model inside the forward of another one, which owns its calls:
    the penalties made while it ran."""

    def __init__(self, record: Forward) -> None:
        self.record, self.start, self.stop = record, len(record.penalties), None
        self.collected = False

    @property
    def penalties(self) -> list[tuple[nn.Module, torch.Tensor]]:
        return self.record.penalties[self.start:self.stop]


class LastForward(threading.local):
    """A tracked model's last forward (a Forward or a Part), per thread. A copy of the model
    starts with none: the last forward's penalties hold that step's graph."""

    def __init__(self) -> None:
        self.box: list[Forward | Part | None] = [None]  # a list, as _Thread.open

    def __reduce__(self):
        return (LastForward, ())

    def __deepcopy__(self, memo) -> LastForward:
        return LastForward()


def open_record(model: nn.Module) -> Forward | None:
    """The record of ``model``'s forward if it is running in this thread, else None."""
    for record in THREAD.open:
        if record.model is model:
            return record
    return None


def begin_forward(model: nn.Module, args) -> None:
    """Forward pre-hook of a tracked model: open its record, unless a forward of another tracked
    model is open in this thread, which then owns the calls. Not in the recomputation of a
    torch.utils.checkpoint segment, which computes no penalty and updates nothing (the SHADE
    layers see to that): the model's last forward stays the first run's."""
    if _checkpoint.recomputing():
        return
    opened = THREAD.open
    if opened:
        if opened[-1].model is not model:
            model._shade_ops_last.box[0] = Part(opened[-1])
            return
        # Its own record still open: a forward of this model raised where no hook sees it (in
        # compiled code, under torch.export). That forward updates nothing.
        opened.clear()
    last = model._shade_ops_last.box[0]
    if model.training and last is not None and not last.collected and last.penalties and \
            not torch.compiler.is_compiling() and \
            not getattr(model, "_shade_ops_warned_uncollected", False):
        model._shade_ops_warned_uncollected = True
        warnings.warn(
            "shade_ops: a forward of this model starts while the SHADE penalties of its last "
            "training forward were never collected. shade_ops.collect(model) returns the "
            "penalties of the last forward only: with several forwards before one backward "
            "(siamese models, several crops), call collect after each forward and add them up. "
            "(This warning is shown once.)", stacklevel=2)
    opened.append(Forward(model))


def abandon() -> None:
    """Drop the record open in this thread, before raising from inside a forward: under
    torch.export and in compiled code no hook sees the exception."""
    for record in THREAD.open:
        record.model._shade_ops_last.box[0] = None
    THREAD.open.clear()


def forward_returned(model: nn.Module, args, output) -> None:
    """Forward hook: the model's forward returned (end_forward, which runs on exceptions too,
    applies the updates only then)."""
    if _checkpoint.recomputing():
        return
    opened = THREAD.open
    if opened and opened[-1].model is model:
        opened[-1].returned = True


def end_forward(model: nn.Module, args, output) -> None:
    """Forward hook (``always_call``): close the record; check every layer's number of calls
    against its call sites, then apply every update, or none and raise."""
    if _checkpoint.recomputing():
        return
    opened = THREAD.open
    if not opened:
        return
    record = opened[-1]
    if record.model is not model:
        part = model._shade_ops_last.box[0]
        if isinstance(part, Part) and part.record is record and part.stop is None:
            part.stop = len(record.penalties)
        return
    opened.pop()
    record.model = None
    last = model._shade_ops_last.box
    last[0] = None
    if not record.returned:  # an exception in the forward: it updates nothing
        return
    if not record.variable_calls:
        for layer, calls in record.sites.items():
            fixed = record.counts.get(layer)
            if fixed is None and layer._sites_from == "checkpoint":
                fixed = layer._num_sites()
            if fixed is not None and calls != fixed:
                raise RuntimeError(call_count_message(model, layer, calls, during=False))
        for layer, calls in record.sites.items():  # the model's first forward with it fixes it
            record.counts.setdefault(layer, calls)
    for layer in record.sites:
        if layer._sites_from != "forward":
            layer._sites_from = "forward"
    if torch.compiler.is_compiling():
        for update in record.updates:
            apply_update(*update)
    elif record.updates:
        with _UPDATES:
            apply_updates(record.updates)
    record.updates = []
    last[0] = record
    if not record.penalties and model.training and not torch.compiler.is_compiling() and \
            not getattr(model, "_shade_ops_warned_unused", False):
        model._shade_ops_warned_unused = True
        layers = [m for m in model.modules() if hasattr(m, "_num_sites")]
        if not layers and isinstance(model, torch.fx.GraphModule):
            advice = ("convert_fx found no ReLU call in its graph (its warning named the "
                      "activations it has): it trains without SHADE; shade_ops.attach(layer) "
                      "puts SHADE on a layer's output by hand.")
        else:
            advice = ("If the model applies its ReLUs as functions (F.relu, torch.relu), "
                      "shade_ops.convert cannot see them: use shade_ops.convert_fx(model).")
        warnings.warn(
            f"shade_ops: a training forward of this {type(model).__name__} computed no SHADE "
            f"penalty ({len(layers)} SHADE layers, none called). {advice} (This warning is shown "
            f"once.)", stacklevel=2)


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def qualified_name(model: nn.Module | None, layer: nn.Module) -> str:
    if model is not None:
        for name, module in model.named_modules():
            if module is layer:
                return name
    return "?"


def call_count_message(model: nn.Module, layer: nn.Module, calls: int, during: bool) -> str:
    """Why a forward whose number of calls of ``layer`` differs from its call sites is refused,
    and what to do."""
    fixed = model._shade_ops_calls.get(layer)
    if fixed is not None:
        reason = f"the first training forward of this model called it {_times(fixed)}"
    else:
        reason = f"it has the {layer._num_sites()} call sites of the checkpoint it was loaded from"
    called = f"more than {_times(fixed or layer._num_sites())}" if during else _times(calls)
    return (
        f"shade_ops: in this forward of the {type(model).__name__}, its "
        f"{type(layer).__name__} '{qualified_name(model, layer)}' was called {called}, but "
        f"{reason}. A layer is a call site: when the number of calls changes, the k-th call is "
        f"not the same layer each time and would train another layer's state, so this forward "
        f"updated no state. Give each place its own module (an nn.ReLU() per place), use "
        f"shade_ops.convert_fx(model) where the forward traces (a ShadeReLU per call site of "
        f"the graph), or accept it with shade_ops.track(model, variable_calls=True) (or "
        f"convert(..., variable_calls=True)): the k-th call of every forward then uses call "
        f"site k's state.")
