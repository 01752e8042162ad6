"""The one torch.fx toolkit: tracing, fake-tensor probing, shape recording, node naming.

Every module that reads a network's graph (conversion, windows, explanation, dense,
tiling, export) goes through these helpers, so a graph is traced, probed and described
the same way everywhere.

>>> import torch.nn as nn
>>> gm = trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()))
>>> probe(gm, (2, 1, 5, 5)).shapes["output"]
(2, 36)
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import NofcError, first_line

__all__ = [
    "PROBE_BATCH", "NodeFailure", "ShapeRecorder", "bind", "describe_node", "fake_mode",
    "fmt_shape", "get_attr", "global_pool", "pair", "param_like", "probe", "trace",
]

PROBE_BATCH = 2  # probe batch size: 2, so that a reshape that swallows the batch is seen


def param_like(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the first floating parameter or buffer (CPU float32 if none)."""
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def fmt_shape(shape) -> str:
    """``(2, 512, 7, 7)`` as text; ``?`` for an unknown shape."""
    if shape is None:
        return "?"
    return "(" + ", ".join(str(s) for s in shape) + ")"


class NodeFailure(Exception):
    """A node of the graph raised while probing; carries the node and the original error."""

    def __init__(self, node: fx.Node, exc: Exception):
        super().__init__(str(exc))
        self.node = node
        self.exc = exc


class ShapeRecorder(fx.Interpreter):
    """Runs a graph (on fake tensors) and records every tensor node's shape.

    Non-tensor results are recorded as ``None`` shapes; plain numbers (``x.size(0)``) also
    in ``values``.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except NofcError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the node's context
            raise NodeFailure(n, exc) from None
        if isinstance(result, torch.Tensor):
            self.shapes[n.name] = tuple(result.shape)
        else:
            self.shapes[n.name] = None
            if isinstance(result, (int, float, bool)):
                self.values[n.name] = result
        return result


@contextlib.contextmanager
def fake_mode():
    """FakeTensorMode that does not log a traceback for an op that fails (we raise instead).

    PyTorch logs ``failed while attempting to run meta`` with a full traceback on stderr
    before re-raising; on the command line that buries the one-line error.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    log = logging.getLogger("torch._subclasses.fake_tensor")
    drop = logging.Filter("nofc-silenced")  # matches no logger name: drops every record
    log.addFilter(drop)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        log.removeFilter(drop)


def probe(gm: fx.GraphModule, shape: tuple[int, ...], dtype=None, *,
          partial: bool = False) -> ShapeRecorder:
    """Shape-only run of ``gm`` on a fake input of ``shape``; raises NodeFailure.

    The input is made on the network's own device (CPU, CUDA or meta) in ``dtype``
    (default: the network's). With ``partial`` a failing node ends the run quietly and
    the shapes recorded up to it are returned.
    """
    device, own = param_like(gm)
    rec = ShapeRecorder(gm)
    with fake_mode():
        try:
            rec.run(torch.empty(shape, dtype=dtype or own, device=device))
        except NodeFailure:
            if not partial:
                raise
    return rec


def describe_node(gm: fx.GraphModule, n: fx.Node) -> str:
    """``'classifier.0' (Linear)`` or ``node 'mean' (method .mean)``: for messages."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        return f"'{n.target}' ({type(mod).__name__})"
    if n.op == "call_function":
        name = getattr(n.target, "__name__", str(n.target))
        return f"node '{n.name}' (function {name})"
    if n.op == "call_method":
        return f"node '{n.name}' (method .{n.target})"
    return f"node '{n.name}' ({n.op})"


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with nofc's own FullConv2d kept whole like any nn.Conv2d."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .layers import FullConv2d

        return isinstance(m, FullConv2d) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """A GraphModule of ``model`` (which is read, not changed), or a NofcError saying why not."""
    try:
        graph = _Tracer().trace(model)
        return fx.GraphModule(model, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001
        raise NofcError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
            f"{first_line(exc)}); nofc needs a model whose forward has no data-dependent "
            "control flow"
        ) from None


def pair(v, like: tuple[int, int] | None = None) -> tuple[int, int]:
    """An int or 1- or 2-sequence as ``(a, b)``; ``None`` entries take ``like``'s value.

    >>> pair(3), pair((2,)), pair((None, 5), like=(7, 7)), pair(None, like=(4, 6))
    ((3, 3), (2, 2), (7, 5), (4, 6))
    """
    if v is None:
        if like is None:
            raise NofcError("internal: pair(None) needs like=")
        return like
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) == 1:
        v = (v[0], v[0])
    return tuple(like[i] if a is None and like is not None else int(a)  # type: ignore[misc]
                 for i, a in enumerate(v[:2]))


def bind(fn, n: fx.Node) -> dict:
    """The arguments of a call_function node by parameter name ({} when they do not bind)."""
    try:
        return dict(inspect.signature(fn).bind(*n.args, **n.kwargs).arguments)
    except (TypeError, ValueError):
        return {}


def get_attr(gm: fx.GraphModule, target: str) -> Any:
    """The object a ``get_attr`` node's dotted target names."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_ADAPTIVE_FUNCS = {"adaptive_avg_pool2d": "avg", "adaptive_max_pool2d": "max",
                   "adaptive_max_pool2d_with_indices": "max"}
_REDUCE_METHODS = {"mean": "avg", "amax": "max", "sum": "sum"}
_REDUCE_FUNCS = {torch.mean: "avg", torch.amax: "max", torch.sum: "sum"}


def _spatial_reduce(n: fx.Node) -> tuple[str, bool] | None:
    """(kind, keepdim) for a mean/amax/sum over both spatial dims of a 4D map."""
    if n.op == "call_method" and n.target in _REDUCE_METHODS:
        kind = _REDUCE_METHODS[n.target]
    elif n.op == "call_function" and n.target in _REDUCE_FUNCS:
        kind = _REDUCE_FUNCS[n.target]
    else:
        return None
    args = list(n.args[1:])
    dim = n.kwargs.get("dim", args[0] if args else None)
    keepdim = n.kwargs.get("keepdim", args[1] if len(args) > 1 else False)
    if isinstance(dim, int):
        dim = (dim,)
    if not isinstance(dim, (tuple, list)):
        return None
    if {d % 4 if isinstance(d, int) else None for d in dim} != {2, 3}:
        return None
    return kind, bool(keepdim)


def global_pool(gm: fx.GraphModule, n: fx.Node) -> tuple[str, Any] | None:
    """``("avg" | "max" | "sum", output_size)`` when ``n`` is adaptive pooling of a map or a
    reduction over both spatial dims (output size 1); None otherwise.

    One recogniser for conversion (which rewrites it) and windows (which refuses it).
    Pooling that also returns indices is not recognised: its output is a tuple.
    """
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            return "avg", mod.output_size
        if isinstance(mod, nn.AdaptiveMaxPool2d) and not mod.return_indices:
            return "max", mod.output_size
        return None
    if n.op == "call_function":
        kind = _ADAPTIVE_FUNCS.get(getattr(n.target, "__name__", ""))
        if kind is not None:
            if n.kwargs.get("return_indices", len(n.args) > 2 and n.args[2]):
                return None
            return kind, n.kwargs.get("output_size", n.args[1] if len(n.args) > 1 else None)
    reduce = _spatial_reduce(n)
    return None if reduce is None else (reduce[0], 1)
