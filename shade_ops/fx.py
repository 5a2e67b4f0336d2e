"""SHADE on models that apply ReLU as a function: ``convert_fx``.

``convert`` swaps ``nn.ReLU`` modules, which a model written with ``F.relu(x)``, ``torch.relu(x)``
or ``x.relu()`` does not have. ``convert_fx`` traces the model with ``torch.fx`` and puts a
``ShadeReLU`` module of its own at every ReLU call site of the graph, functional or module, as
PyTorch's FX quantization gives every call site its own observer.

The result stays tracked through copies: a GraphModule's ``copy.deepcopy`` and pickling rebuild it
from its graph and drop its forward hooks, so ``convert_fx`` returns a GraphModule of a subclass
that tracks each copy again (and pickles as that subclass).
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules import ShadeReLU, no_relu_message, track

__all__ = ["convert_fx"]

# ReLU as functions and methods: (target, whether it writes into its input).
_FUNCTIONS = {F.relu: False, torch.relu: False, torch.relu_: True, F.relu_: True}
_METHODS = {"relu": False, "relu_": True}


def _relu_call(node: fx.Node, model: fx.GraphModule) -> tuple[bool, bool]:
    """(whether node applies a ReLU, whether in place)."""
    if node.op == "call_function" and node.target in _FUNCTIONS:
        inplace = _FUNCTIONS[node.target] or bool(node.kwargs.get("inplace", False)) or \
            (len(node.args) > 1 and bool(node.args[1]))
        return True, inplace
    if node.op == "call_method" and node.target in _METHODS:
        return True, _METHODS[node.target]
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        if isinstance(module, nn.ReLU):
            return True, module.inplace
    return False, False


class _TrackedGraphModule(fx.GraphModule):
    """A GraphModule whose copies (``copy.deepcopy``, pickle, ``torch.save``) are tracked too."""

    def __deepcopy__(self, memo) -> fx.GraphModule:
        copied = track(super().__deepcopy__(memo), variable_calls=self._shade_ops_variable_calls)
        copied._shade_ops_calls = copy.deepcopy(self._shade_ops_calls, memo)  # its layers' copies
        return copied

    def __reduce__(self):
        rebuild, args = super().__reduce__()
        return (_rebuild_tracked, (rebuild, args, self._shade_ops_variable_calls))


def _tracked_class(graph_model: fx.GraphModule) -> None:
    # GraphModule puts each instance's forward on a class of its own (GraphModuleImpl), made in
    # GraphModule.__new__; recompile() installs the forward on the new one.
    class GraphModuleImpl(_TrackedGraphModule):
        pass

    graph_model.__class__ = GraphModuleImpl
    graph_model.recompile()


def _rebuild_tracked(rebuild, args, variable_calls: bool) -> fx.GraphModule:
    graph_model = rebuild(*args)
    _tracked_class(graph_model)
    return track(graph_model, variable_calls=variable_calls)




def convert_fx(model: nn.Module, *, concrete_args: dict | None = None,
               variable_calls: bool = False, **kwargs) -> fx.GraphModule:
    """A copy of ``model`` as a ``torch.fx.GraphModule`` whose every ReLU call site (``nn.ReLU``
    modules, ``F.relu``, ``torch.relu``, ``x.relu()``, their in-place forms) is a ShadeReLU module
    of its own (``shade_relu``, ``shade_relu_1``, ...), made with ``kwargs``; the returned model is
    tracked (see :func:`shade_ops.track`). Parameters and buffers are shared with ``model``.

    ``concrete_args`` goes to ``torch.fx.symbolic_trace``, for models whose forward branches on
    an argument; ``variable_calls`` to :func:`shade_ops.track` (each ShadeReLU of the graph is
    called once per forward, unless the graph calls a submodule of the model that reuses one).
    Copies of the result (``copy.deepcopy``, pickle, ``torch.save``) are tracked too.

    Raises:
        RuntimeError: the model cannot be traced symbolically (data-dependent control flow); the
            message says what to do instead.
    """
    ShadeReLU(**kwargs)  # bad arguments fail here, before tracing
    try:
        graph_model = fx.symbolic_trace(model, concrete_args=concrete_args)
    except Exception as error:  # fx raises TraceError, TypeError, ... depending on the cause
        raise RuntimeError(
            f"shade_ops.convert_fx: torch.fx cannot trace this {type(model).__name__} ({error}). "
            f"Replace its functional ReLUs with nn.ReLU modules and use shade_ops.convert, or "
            f"pass concrete_args for the arguments it branches on.") from error
    graph = graph_model.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    converted = 0
    for node in list(graph.nodes):
        is_relu, inplace = _relu_call(node, graph_model)
        if not is_relu:
            continue
        name = "shade_relu" if converted == 0 else f"shade_relu_{converted}"
        graph_model.add_submodule(name, ShadeReLU(**kwargs))
        source = node.args[0]
        with graph.inserting_after(node):
            shade = graph.call_module(name, (source,))
        node.replace_all_uses_with(shade)
        if inplace and isinstance(source, fx.Node):
            # an in-place ReLU changed its input: later readers of the input read its output
            for user in list(source.users):
                if user is not shade and order.get(user, -1) > order[node]:
                    user.replace_input_with(source, shade)
        graph.erase_node(node)
        converted += 1
    if converted == 0:
        functions = [getattr(node.target, "__name__", str(node.target)) for node in graph.nodes
                     if node.op in ("call_function", "call_method")]
        warnings.warn(no_relu_message("convert_fx", model, functions) + " (No nn.ReLU, F.relu, "
                      "torch.relu or x.relu() in its traced graph.)", stacklevel=2)
    graph_model.delete_all_unused_submodules()
    graph.lint()
    _tracked_class(graph_model)
    return track(graph_model, variable_calls=variable_calls)
