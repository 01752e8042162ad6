"""The one torch.fx toolkit: tracing, fake-tensor probing, shape recording, node naming.

Every module that reads a network's graph (conversion, receptive, measure, explanation,
dense, tiling, export) goes through these helpers, so a graph is traced, probed and described
the same way everywhere.

>>> import torch.nn as nn
>>> gm = trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()))
>>> probe(gm, (2, 1, 5, 5)).shapes["output"]
(2, 36)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import operator
import pickle
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import NofcError, first_line

__all__ = [
    "remember",
    "ANY_STRIDE", "PROBE_BATCH", "NodeFailure", "ShapeRecorder", "bind", "channels_last_pool",
    "describe_node", "drop_dead_code", "dumps", "fake_mode", "fmt_shape", "get_attr",
    "global_pool", "loads", "output_node", "param_like", "param_stamp", "probe",
    "register_notrace_module", "spatial_size", "trace", "viewed", "written",
]

PROBE_BATCH = 2  # probe batch size: 2, so that a reshape that swallows the batch is seen
ANY_STRIDE = 2 ** 7 * 3 * 5 * 7  # a multiple of every usual network stride (2^k, 3 * 2^k, ...)


def param_like(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the first floating parameter or buffer (CPU float32 if none)."""
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def remember(gm: fx.GraphModule, **attributes) -> None:
    """Set ``attributes`` on ``gm`` so that they survive ``copy.deepcopy`` too (a
    GraphModule's deepcopy keeps only what its ``meta`` names; pickling keeps them all):
    what conversion and dilation record there is what the geometry and ``explain`` read.

    >>> import copy, torch.nn as nn
    >>> gm = fx.symbolic_trace(nn.ReLU())
    >>> remember(gm, _nofc_input_size=(1, 8, 8))
    >>> copy.deepcopy(gm)._nofc_input_size
    (1, 8, 8)
    """
    kept = gm.meta.setdefault("_user_preserved_attributes", {})  # torch.fx's own key
    for name, value in attributes.items():
        setattr(gm, name, value)
        kept[name] = value


def param_stamp(model: nn.Module) -> tuple:
    """Which tensors the parameters and buffers are and how often each was written: a
    cache kept on ``model`` is stale when this changes (``.to()``, a load, an in-place
    update)."""
    return tuple((id(p), p._version) for p in (*model.parameters(), *model.buffers()))


def fmt_shape(shape) -> str:
    """``(2, 512, 7, 7)`` as text; ``?`` for an unknown shape."""
    if shape is None:
        return "?"
    return "(" + ", ".join(str(s) for s in shape) + ")"


def spatial_size(shape, dims=(2, 3)) -> tuple[int, int] | None:
    """The (H, W) of a 4D shape whose spatial axes are at ``dims`` (NCHW: (2, 3)); None
    for no shape or one of another rank.

    >>> spatial_size((2, 8, 5, 7)), spatial_size((2, 5, 7, 8), dims=(1, 2)), spatial_size((2, 8))
    ((5, 7), (5, 7), None)
    """
    if shape is None or len(shape) != 4:
        return None
    return (shape[dims[0]], shape[dims[1]])


class NodeFailure(Exception):
    """A node of the graph raised while probing; carries the node and the original error."""

    def __init__(self, node: fx.Node, exc: Exception):
        super().__init__(str(exc))
        self.node = node
        self.exc = exc


class ShapeRecorder(fx.Interpreter):
    """Runs a graph (on fake tensors) and records every tensor node's shape.

    Non-tensor results are recorded as ``None`` shapes; plain numbers (``x.size(0)``) also
    in ``values``, and the shapes of a tuple of tensors (``x.chunk(2, 1)``) in ``items``.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.values: dict[str, Any] = {}
        self.items: dict[str, list[tuple[int, ...]]] = {}

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
            elif isinstance(result, (tuple, list)) and result and all(
                    isinstance(t, torch.Tensor) for t in result):
                self.items[n.name] = [tuple(t.shape) for t in result]
        return result


@contextlib.contextmanager
def fake_mode():
    """FakeTensorMode that does not log a traceback for an op that fails (we raise instead).

    PyTorch logs ``failed while attempting to run meta`` with a full traceback on stderr
    before re-raising; on the command line that buries the one-line error.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with _quiet_fake_log(), FakeTensorMode(allow_non_fake_inputs=True):
        yield


@contextlib.contextmanager
def _quiet_fake_log():
    log = logging.getLogger("torch._subclasses.fake_tensor")
    drop = logging.Filter("nofc-silenced")  # matches no logger name: drops every record
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # gm -> {key: Probed}


def probe(gm: fx.GraphModule, shape: tuple[int, ...], dtype=None, *,
          partial: bool = False) -> "Probed":
    """Shape-only run of ``gm`` on a fake input of ``shape``; raises NodeFailure.

    The input is made on the network's own device (CPU, CUDA or meta) in ``dtype``
    (default: the network's). With ``partial`` a failing node ends the run quietly and
    the shapes recorded up to it are returned. A successful probe is remembered on
    ``gm`` for the same input, graph and parameter shapes (a DenseNet probe takes a
    second, and geometry, tiling and streaming each ask for the reference size).
    """
    device, own = param_like(gm)
    key = (tuple(shape), dtype or own, device, partial, gm.code,
           tuple((name, tuple(p.shape)) for name, p in gm.named_parameters()))
    cache = _PROBES.setdefault(gm, {})
    if key in cache:
        return cache[key]
    rec = ShapeRecorder(gm)
    with fake_mode(), torch.no_grad():  # shapes only: no autograd graph, even of fakes
        try:
            rec.run(torch.empty(shape, dtype=dtype or own, device=device))
        except NodeFailure:
            if not partial:
                raise
    # only the shapes are kept: the recorder holds the network, which would then never
    # leave the cache (a weak key whose value refers to it)
    cache[key] = Probed(rec.shapes, rec.values, rec.items)
    return cache[key]


@dataclass(frozen=True)
class Probed:
    """What a shape probe found: every node's shape, plain numbers, tuples of tensors."""

    shapes: dict
    values: dict
    items: dict


def describe_node(gm: fx.GraphModule, n: fx.Node) -> str:
    """``'classifier.0' (Linear)`` or ``node 'mean' (method .mean)``: for messages."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        return f"'{n.target}' ({type(mod).__name__})"
    where = _module_path(n)
    where = f" in '{where}'" if where else ""
    if n.op == "call_function":
        name = getattr(n.target, "__name__", str(n.target))
        return f"node '{n.name}' (function {name}{where})"
    if n.op == "call_method":
        return f"node '{n.name}' (method .{n.target}{where})"
    return f"node '{n.name}' ({n.op})"


def _module_path(n: fx.Node) -> str:
    """The module whose forward made ``n`` ('' for the top level or an unknown one)."""
    stack = n.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


# subclasses of torch.nn layers whose forward computes the same thing (timm's Linear only
# casts its weights under TorchScript): kept whole, so that the rules for the base apply
_SAME_AS_BASE = {("timm.layers.linear", "Linear")}
_NOTRACE: set[type] = set()  # module classes traced whole (register_notrace_module)


def register_notrace_module(cls: type) -> type:
    """Trace modules of ``cls`` whole, as one call (timm's decorator of the same name):
    layers nofc writes into graphs, such as ``FullConv2d``, register themselves."""
    _NOTRACE.add(cls)
    return cls


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with the registered modules (nofc's own FullConv2d) kept whole
    like any nn.Conv2d.

    Buffers are read as graph nodes (``proxy_buffer_attributes``), so what the forward
    computes from them stays in the graph: torch.fx would otherwise fold it into a
    constant at trace time, in the dtype and on the device of that moment (CSATv2's
    ``var ** 0.5``: a float32 copy that ``.double()`` and ``.to("cuda")`` leave behind).
    """

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, tuple(_NOTRACE))
                or (type(m).__module__, type(m).__name__) in _SAME_AS_BASE
                or super().is_leaf_module(m, qualname))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


class _Proxy(fx.Proxy):
    """torch.fx's Proxy, with Python's in-place operators traced as the in-place nodes they
    are (``operator.iadd``, ``operator.setitem``).

    fx's own Proxy has no ``__iadd__``, so ``x += y`` is traced as ``x = x + y``: the same
    value, but the write is lost when ``x`` is a view of a map (``v = x[:, :2]; v += 1``)
    or a tensor another name still reads; and ``x[:, :2] *= 2`` cannot be traced at all.
    """

    def __setitem__(self, key, value) -> None:  # x[..., 2] = y: an in-place node
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _in_place_operator(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    method.__name__ = f"__{op.__name__}__"
    return method


_IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
                       operator.iand, operator.ior, operator.ixor, operator.ilshift,
                       operator.irshift)
for _op in _IN_PLACE_OPERATORS:
    setattr(_Proxy, f"__{_op.__name__}__", _in_place_operator(_op))


class _Blocked(Exception):
    """Control flow the reference-size capture cannot decide: which module, and why."""


_UNKNOWN = object()  # a node whose value at the reference size could not be computed


class _ValueProxy(_Proxy):
    """A proxy that knows its value at the reference size (a fake tensor or a number).

    ``len``, ``int`` and ``range`` on a shape entry take that value: the graph keeps the
    shape queries as nodes, but a Python decision is made once, at the reference size.
    """

    def _value(self):
        return self.tracer.value_of(self)

    def __len__(self) -> int:
        return len(self._value())

    def __int__(self) -> int:
        return int(self._value())

    def __index__(self) -> int:
        return int(self._value())

    def __float__(self) -> float:
        return float(self._value())

    def __getattr__(self, k: str):
        if k in ("tracer", "node", "_node", "root", "attr"):  # not set yet: no proxy of them
            raise AttributeError(k)
        # a rank, a device's type or a flag never depends on the input size: known, not
        # traced (a dtype or device stays traced: the module may be cast or moved later)
        value = self.tracer.values.get(self.node, _UNKNOWN)
        if value is not _UNKNOWN and not k.startswith("__"):
            known = getattr(value, k, None)
            if isinstance(known, (str, bool)) or k == "ndim":
                return known
        return _ValueAttribute(self, k)


class _ValueAttribute(_ValueProxy, fx.proxy.Attribute):
    """``x.shape`` and friends, whose node (and value) is made when first used."""

    def __init__(self, root: fx.Proxy, attr: str):
        fx.proxy.Attribute.__init__(self, root, attr)


class _CaptureTracer(_Tracer):
    """Traces ``forward`` while running every op on fake tensors of the reference size.

    Python control flow on a traced value (``if x.shape[-1] < 7``, ``if x.ndim == 4``,
    ``for _ in range(n)``) is decided by that value, so the graph is the forward as it
    runs at the reference size; control flow on tensor contents stays a refusal.
    """

    def __init__(self, example_shape: tuple[int, ...], device, dtype):
        super().__init__()
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        with self.mode:
            self.example = torch.empty(example_shape, device=device, dtype=dtype)
        self.values: dict[fx.Node, Any] = {}
        self.computing = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def where(self) -> str:
        """The innermost module being traced, for messages."""
        if not self.module_stack:
            return type(self.root).__name__
        path, kind = next(reversed(self.module_stack.values()))
        return f"'{path}' ({getattr(kind, '__name__', kind)})" if path else kind.__name__

    def value_of(self, proxy: fx.Proxy):
        value = self.values.get(proxy.node, _UNKNOWN)
        if value is _UNKNOWN or isinstance(value, torch.Tensor) and value.numel() != 1:
            raise _Blocked(f"the control flow in {self.where()} depends on a value nofc "
                           "cannot know before running")
        if isinstance(value, torch.Tensor):  # bool(t) / int(t): the data, not the shape
            raise _Blocked(f"the control flow in {self.where()} depends on tensor values, "
                           "not only on shapes")
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.value_of(obj))

    def iter(self, obj: fx.Proxy):
        return iter([obj[i] for i in range(len(self.value_of(obj)))])

    def call_module(self, m, forward, args, kwargs):
        if self.computing:  # a leaf module calling a submodule while its value is computed
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self.computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        rv = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                  proxy_factory_fn)
        if isinstance(rv, fx.Proxy):
            self.values[rv.node] = self._compute(kind, target, args, kwargs)
        return rv

    def _compute(self, kind, target, args, kwargs):
        """The node's value on the fake reference input (_UNKNOWN when it cannot run)."""
        if kind == "placeholder":
            return self.example if not any(n.op == "placeholder" for n in self.values) \
                else _UNKNOWN
        unknown = []

        def value(a):
            if isinstance(a, fx.Proxy):
                v = self.values.get(a.node, _UNKNOWN)
                if v is _UNKNOWN:
                    unknown.append(a)
                return v
            return a

        a, kw = fx.node.map_aggregate(args, value), fx.node.map_aggregate(kwargs, value)
        if unknown:
            return _UNKNOWN
        self.computing = True
        try:
            with self.mode, _quiet_fake_log():
                if kind == "call_function":
                    return target(*a, **kw)
                if kind == "call_method":
                    return getattr(a[0], target)(*a[1:], **kw)
                if kind == "call_module":
                    return self.root.get_submodule(target)(*a, **kw)
                if kind == "get_attr":
                    return get_attr(self.root, target)
        except Exception:  # noqa: BLE001 - the node stays, its value is unknown
            return _UNKNOWN
        finally:
            self.computing = False
        return _UNKNOWN


_SHAPE_BOOKKEEPING = {getattr, operator.getitem, operator.lt, operator.le, operator.gt,
                      operator.ge, operator.eq, operator.ne, operator.mod, operator.floordiv,
                      operator.and_, operator.or_, operator.not_}


def written(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    """The node whose tensor ``n`` writes into, or None when ``n`` changes none of its
    arguments.

    That is ``x`` of ``x.mul_(g)``, ``torch.relu_(x)``, ``x += y`` (``operator.iadd``),
    ``x[:, :2] = y`` (``operator.setitem``), ``F.relu(x, inplace=True)``,
    ``nn.ReLU(inplace=True)(x)`` and ``torch.add(a, b, out=x)``: a write whose result
    nobody reads still changes what later nodes read from ``x``.

    >>> gm = trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True)))
    >>> [(n.name, written(gm, n).name) for n in gm.graph.nodes if written(gm, n)]
    [('_1', '_0')]
    """
    if isinstance(n.kwargs.get("out"), fx.Node):
        return n.kwargs["out"]
    first = n.args[0] if n.args else None
    if not isinstance(first, fx.Node):
        return None
    if n.op == "call_method":
        name = n.target
    elif n.op == "call_function":
        if n.target is operator.setitem or n.target in _IN_PLACE_OPERATORS:
            return first
        name = getattr(n.target, "__name__", "")
        if _inplace_flag(n):
            return first
    elif n.op == "call_module":
        return first if getattr(gm.get_submodule(n.target), "inplace", False) is True else None
    else:
        return None
    # torch's naming rule: x.add_(y), torch.relu_(x), F.relu_(x) write into x
    return first if name.endswith("_") and not name.startswith("_") else None


def _inplace_flag(n: fx.Node) -> bool:
    """``inplace=True`` given to a function, by name or by position (``F.relu(x, True)``)."""
    if "inplace" in n.kwargs:
        return n.kwargs["inplace"] is True
    try:
        params = list(inspect.signature(n.target).parameters)
    except (TypeError, ValueError):  # a builtin
        return False
    return "inplace" in params and params.index("inplace") < len(n.args) and \
        n.args[params.index("inplace")] is True


# ops whose result may share its memory with their first argument: a write into it is a
# write into that argument (an op listed here that copies only makes the callers careful)
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "permute", "transpose", "t", "narrow", "select", "expand", "expand_as", "as_strided",
    "unfold", "movedim", "moveaxis", "swapaxes", "swapdims", "contiguous", "detach", "diagonal",
    "chunk", "split", "tensor_split", "unbind", "to", "type", "type_as", "float", "double",
    "half", "bfloat16", "view_as_real", "real", "imag",
}
_VIEW_FUNCS = {
    operator.getitem, getattr, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
    torch.permute, torch.transpose, torch.narrow, torch.select, torch.movedim,
    torch.moveaxis, torch.swapaxes, torch.swapdims, torch.chunk, torch.split,
    torch.tensor_split, torch.unbind, torch.t, torch.detach, torch.diagonal,
    torch.as_strided, F.dropout, torch.dropout,
}
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)


def viewed(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    """The node whose tensor ``n``'s result may share memory with (a view, or the tensor
    an in-place op returns), or None: a write into ``n``'s result writes into that one too.

    >>> gm = trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()))
    >>> [(n.name, viewed(gm, n).name) for n in gm.graph.nodes if viewed(gm, n)]
    [('_1', '_0')]
    """
    first = n.args[0] if n.args else None
    if not isinstance(first, fx.Node):
        return None
    if written(gm, n) is not None:  # x.mul_(g) returns x
        return written(gm, n)
    if (n.op == "call_method" and n.target in _VIEW_METHODS
            or n.op == "call_function" and n.target in _VIEW_FUNCS
            or n.op == "call_module" and isinstance(gm.get_submodule(n.target), _VIEW_MODULES)):
        return first
    return None


def drop_dead_code(gm: fx.GraphModule) -> None:
    """Remove the nodes whose results nobody reads, except those that change something:
    an in-place write (see :func:`written`) or what torch.fx calls impure (``setitem``,
    ``torch._assert``, a module marked ``_is_impure``).

    ``fx.Graph.eliminate_dead_code`` alone removes ``x.mul_(g)`` when its result is not
    read (timm's NormFreeBlock), though every later reader of ``x`` needs it.

    >>> class Gain(nn.Module):
    ...     def forward(self, x):
    ...         x.mul_(2.0)
    ...         x.sum()
    ...         return x
    >>> gm = trace(Gain())
    >>> drop_dead_code(gm)
    >>> [n.name for n in gm.graph.nodes]  # the unread sum goes, the unread write stays
    ['x', 'mul_', 'output']
    """
    for n in reversed(list(gm.graph.nodes)):
        if not n.users and not _changes_something(gm, n):
            gm.graph.erase_node(n)


def _changes_something(gm: fx.GraphModule, n: fx.Node) -> bool:
    if written(gm, n) is not None:
        return True
    try:
        return n.is_impure()
    except Exception:  # noqa: BLE001 - a module fx cannot find: keep the node, to be safe
        return True


def _drop_unused_queries(graph: fx.Graph) -> None:
    """Remove shape queries and comparisons only a Python decision read (now made)."""
    for n in reversed(list(graph.nodes)):
        if not n.users and (n.op == "call_function" and n.target in _SHAPE_BOOKKEEPING
                            or n.op == "call_method" and n.target in ("size", "dim")):
            graph.erase_node(n)


def trace(model: nn.Module, input_size=None) -> fx.GraphModule:
    """A GraphModule of ``model`` (which is read, not changed), or a NofcError saying why not.

    torch.fx first; when the forward has Python control flow on traced values (timm's VGG
    head, MobileViT's patch sizes), ``input_size`` ``(C, H, W)`` given, the forward is
    captured as it runs at that size and checked against the model at that size and at
    twice it.

    >>> class Head(nn.Module):
    ...     def forward(self, x):
    ...         return x.mean((2, 3)) if x.shape[-1] > 1 else x.flatten(1)
    >>> [n.target for n in trace(Head(), (4, 8, 8)).graph.nodes]
    ['x', 'mean', 'output']
    """
    try:
        graph = _Tracer().trace(model)
        return fx.GraphModule(model, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001
        error = exc
    why = f"{type(error).__name__}: {first_line(error)}"
    if input_size is None:
        raise NofcError(f"cannot trace {type(model).__name__} with torch.fx ({why}); nofc "
                        "needs a model whose forward has no data-dependent control flow"
                        ) from None
    size = tuple(input_size)
    try:
        gm = _capture(model, size)
        _check_capture(model, gm, size)
    except _Blocked as exc:
        raise NofcError(f"cannot trace {type(model).__name__} with torch.fx ({why}), nor by "
                        f"running it at {size[1]}x{size[2]}: {exc}") from None
    return gm


def _capture(model: nn.Module, size: tuple[int, ...]) -> fx.GraphModule:
    """The forward as it runs at ``size``, traced with :class:`_CaptureTracer` on a copy
    (a forward that caches tensors on its modules would keep proxies there)."""
    model = copy.deepcopy(model)
    device, dtype = param_like(model)
    tracer = _CaptureTracer((PROBE_BATCH, *size), device, dtype)
    name = type(model).__name__
    try:
        graph = tracer.trace(model)
    except _Blocked:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _Blocked(f"{tracer.where()} fails ({type(exc).__name__}: {first_line(exc)})"
                       ) from None
    _drop_unused_queries(graph)
    return fx.GraphModule(tracer.root, graph, name)


def _check_capture(model: nn.Module, gm: fx.GraphModule, size: tuple[int, ...]) -> None:
    """The captured graph must give the model's own output at ``size`` and twice it."""
    device, dtype = param_like(model)
    gen = torch.Generator().manual_seed(0)
    modes = [(m, m.training) for m in (*model.modules(), *gm.modules())]
    model.eval(), gm.eval()
    try:
        for hw in (size[1:], (2 * size[1], 2 * size[2])):
            _compare_at(model, gm, size, hw, torch.randn((1, size[0], *hw), generator=gen)
                        .to(device, dtype))
    finally:
        for m, training in modes:
            m.training = training


def _compare_at(model, gm, size, hw, x) -> None:
    """Model and captured graph on ``x`` (at ``hw``): same shape, same values."""
    outs = []
    for what, fn in (("the model itself", model),
                     (f"the forward captured at {size[1]}x{size[2]}", gm)):
        try:  # fx prints the generated code of a failing GraphModule on stderr: not ours
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                outs.append(fn(x.clone()))  # a forward may write into its input
        except Exception as exc:  # noqa: BLE001
            raise _Blocked(f"{what} fails at {hw[0]}x{hw[1]} ({type(exc).__name__}: "
                           f"{first_line(exc)}), so it is not fully convolutional") from None
    want, got = outs
    same = (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
            and want.shape == got.shape and torch.allclose(
                want, got, rtol=0, atol=1e-4 * max(1.0, float(want.abs().max()))))
    if not same:
        raise _Blocked(f"its control flow depends on the input size (the forward captured "
                       f"at {size[1]}x{size[2]} differs from the model at {hw[0]}x{hw[1]})")


def output_node(gm: fx.GraphModule) -> fx.Node:
    """The node a graph returns (the first item of a returned tuple or list)."""
    src = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    while isinstance(src, (tuple, list)) and src:
        src = src[0]
    return src


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


def _spatial_reduce(n: fx.Node, dims=(2, 3)) -> tuple[str, bool] | None:
    """(kind, keepdim) for a mean/amax/sum over both spatial ``dims`` of a 4D map."""
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
    if {d % 4 if isinstance(d, int) else None for d in dim} != set(dims):
        return None
    return kind, bool(keepdim)


def channels_last_pool(n: fx.Node) -> str | None:
    """``"avg"``, ``"max"`` or ``"sum"`` when ``n`` reduces a ``(B, H, W, C)`` tensor over
    H and W to ``(B, C)`` (MambaOut's and timm's NHWC heads: ``x.mean((1, 2))``).

    Only reductions that drop the dims are recognised: their result is the vector a
    classifier reads.
    """
    reduce = _spatial_reduce(n, dims=(1, 2))
    return reduce[0] if reduce is not None and not reduce[1] else None


def global_pool(gm: fx.GraphModule, n: fx.Node) -> tuple[str, Any] | None:
    """``("avg" | "max" | "sum", output_size)`` when ``n`` is adaptive pooling of a map or a
    reduction over both spatial dims (output size 1); None otherwise.

    One recogniser for conversion (which rewrites it) and receptive (which refuses it).
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


# --------------------------------------------------------------------------- shipping


def dumps(obj) -> bytes:
    """Pickle ``obj`` (a tile runner, a model) so that :func:`loads` never traces.

    torch pickles a GraphModule as its generated code and traces that code again when
    loading it; the tracer replaces ``nn.Module.__call__`` for the whole process while it
    runs, so a model that another thread of the process runs meanwhile (a Dask worker
    computing a tile of another run) fails with ``NameError: module is not installed as a
    submodule``. Here every GraphModule inside ``obj``, nested ones included, travels as
    its graph's nodes and its module dict, and is rebuilt node by node. Objects defined in
    ``__main__`` travel by value where cloudpickle is installed (as Dask ships them).

    >>> gm = trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    >>> x = torch.rand(1, 1, 5, 5)
    >>> torch.equal(loads(dumps(gm))(x), gm(x))
    True
    """
    buf = io.BytesIO()
    _pickler()(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(data: bytes):
    """The object :func:`dumps` pickled; tracing nothing (see there)."""
    return pickle.loads(data)


def _pickler() -> type:
    try:
        from cloudpickle import Pickler as base
    except ImportError:  # pragma: no cover - cloudpickle comes with the scale extra
        base = pickle.Pickler

    class _GraphPickler(base):
        def reducer_override(self, obj):
            if isinstance(obj, fx.GraphModule):
                return _graph_module_reduced(obj)
            parent = getattr(super(), "reducer_override", None)
            return NotImplemented if parent is None else parent(obj)

    return _GraphPickler


class _Ref:
    """A node named in another node's arguments, while the graph travels."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return (_Ref, (self.name,))


_KEPT_META = ("nn_module_stack", "stack_trace")  # read by describe_node / error messages


def _graph_module_reduced(gm: fx.GraphModule) -> tuple:
    body = {k: v for k, v in gm.__dict__.items()
            if k not in ("_graph", "_code", "_lineno_map", "_prologue_start")}
    nodes = [(n.op, n.name, n.target, fx.node.map_arg(n.args, lambda a: _Ref(a.name)),
              fx.node.map_arg(n.kwargs, lambda a: _Ref(a.name)), n.type,
              {k: n.meta[k] for k in _KEPT_META if k in n.meta})
             for n in gm.graph.nodes]
    codegen = gm.graph._codegen
    return (_graph_module_rebuilt, (type(gm).__name__, body, nodes,
                                    None if type(codegen) is fx.graph.CodeGen else codegen))


def _graph_module_rebuilt(class_name: str, body: dict, nodes: list, codegen) -> fx.GraphModule:
    """The GraphModule :func:`_graph_module_reduced` took apart: its graph made node by
    node (no tracing), its module dict (submodules, parameters, buffers, attributes) as
    it was."""
    graph = fx.Graph()
    if codegen is not None:
        graph._codegen = codegen
    env: dict[str, fx.Node] = {}

    def node_of(a):
        return env[a.name] if isinstance(a, _Ref) else a

    for op, name, target, args, kwargs, type_expr, meta in nodes:
        n = graph.create_node(op, target, fx.node.map_aggregate(args, node_of),
                              fx.node.map_aggregate(kwargs, node_of), name=name,
                              type_expr=type_expr)
        n.meta.update(meta)
        env[name] = n
    gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name=class_name)
    gm.__dict__.update(body)
    gm.graph = graph  # recompiles the forward from the nodes
    return gm
