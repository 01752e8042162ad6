"""Convert an ONNX classifier into a fully convolutional ONNX graph, with onnx alone.

The head of a classifier exported to ONNX is a Flatten (or a Reshape, or a Squeeze of a
1 x 1 map, or a ReduceMean without keepdims) of a 4D feature map, followed by Gemm or
MatMul + Add layers with activations between them. ``convert_onnx`` rewrites it:

* the first dense layer becomes a ``Conv`` whose kernel is the feature map's H x W;
  a Transpose before the flatten (channels-last origins such as Keras) is read off the
  graph and the weights are permuted to match, so the result is exact either way;
* every later dense layer becomes a 1 x 1 ``Conv``; per-feature constants of Add/Mul/PRelu
  are reshaped to (K, 1, 1); Softmax runs over the channel axis; Reshape, Squeeze,
  Unsqueeze and Flatten that only add or drop axes of size 1 (torch.onnx writes them
  around Gemm) become Identity;
* a global pooling right before the flatten becomes the window it stands for
  (``pooling="window"``) or stays global (``pooling="global"``);
* in the body, a Reshape to a constant shape that only moves a one-channel axis (tf2onnx
  writes the NHWC -> NCHW Transpose of a grayscale input as a Reshape to [-1, 1, H, W])
  becomes that Transpose, so height and width stay free. A flatten whose shape is computed
  by Shape/Gather/Slice/Concat (Keras's Flatten, views of ``x.size(0)``) is read through
  onnx shape inference; that chain is dropped with the flatten.

The result needs only an ONNX runtime: input ``batch x C x height x width``, outputs
``batch x K x h x w``.

It runs in two steps, as ``convert`` does for PyTorch: ``_Planner`` reads a frozen
``_GraphIndex`` of the graph and decides every edit, each with its reason (a ``_Plan``;
nothing is changed and it can be printed), then ``_apply`` makes the edits. Head nodes
are handled by a rule table keyed by op type (``_RULES``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, NoReturn

import numpy as np

from .errors import NofcError, check_input_size, first_line, refuse_overwrite
from .export import save_onnx
from .tolerance import VerifyReport

__all__ = ["convert_onnx", "verify_onnx", "load_onnx", "graph_input", "input_layout"]

_DENSE = {"Gemm", "MatMul"}
# Ops that act on every element alone (constant inputs, if any, are scalars or per-feature).
_ELEMENTWISE = {
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Gelu", "Erf", "Mish", "ThresholdedRelu", "Abs", "Neg", "Exp",
    "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Identity", "Dropout",
    "Cast", "Clip", "Not", "IsNaN", "IsInf", "Swish",
}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"}
_SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}
# Producers whose output is NCHW by the ONNX operator definitions.
_NCHW = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool",
         "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "BatchNormalization",
         "InstanceNormalization", "LRN", "Resize", "Upsample", "DepthToSpace",
         "SpaceToDepth", "DeformConv"}
_GLOBAL_POOL = {"GlobalAveragePool": "AveragePool", "GlobalMaxPool": "MaxPool",
                "ReduceMean": "AveragePool", "ReduceMax": "MaxPool"}
_REDUCE_TO_GLOBAL = {"ReduceMean": "GlobalAveragePool", "ReduceMax": "GlobalMaxPool"}
_REDUCE = ("ReduceMean", "ReduceMax")
# Reshapes that the class scores may pass through unchanged (they become Identity).
_RESHAPE = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}


def _onnx():
    try:
        import onnx
    except ImportError:
        raise NofcError("ONNX conversion needs the onnx extra: pip install 'nofc[onnx]'") from None
    return onnx


def load_onnx(model):
    """An ``onnx.ModelProto`` from a path or a ModelProto (copied: the caller's is kept)."""
    onnx = _onnx()
    if isinstance(model, onnx.ModelProto):
        return copy.deepcopy(model)
    path = Path(model)
    if not path.is_file():
        raise NofcError(f"ONNX model not found: {model}")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001
        first = first_line(exc)
        raise NofcError(f"cannot read {model} as an ONNX model: {first}") from None


def _label(node) -> str:
    return f"'{node.name or node.output[0]}' ({node.op_type})"


def _node_label(node) -> str:
    return f"ONNX node {_label(node)}"


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value) -> None:
    from onnx import helper

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def graph_input(g):
    """The graph's one image input (initializers listed as inputs do not count)."""
    inits = {t.name for t in g.initializer}
    real = [i for i in g.input if i.name not in inits]
    if len(real) != 1:
        names = ", ".join(i.name for i in real)
        raise NofcError(f"the ONNX graph has {len(real)} inputs ({names}); nofc converts "
                        "classifiers with one image input")
    return real[0]


def _set_input_dims(vi, dims) -> None:
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        new = shape.dim.add()
        if isinstance(d, str):
            new.dim_param = d
        else:
            new.dim_value = int(d)


def input_layout(vi, size) -> str:
    """"nhwc" when the input's last axis holds the channels (Keras/TensorFlow), else "nchw"."""
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    if len(dims) == 4 and dims[3] == size[0] and dims[1] != size[0]:
        return "nhwc"
    return "nchw"


def _image_dims(layout: str, n, c, h, w) -> tuple:
    return (n, h, w, c) if layout == "nhwc" else (n, c, h, w)


def _check_input(vi, size, layout) -> None:
    dims = vi.type.tensor_type.shape.dim
    if len(dims) and len(dims) != 4:
        raise NofcError(f"the ONNX input '{vi.name}' has rank {len(dims)}; nofc needs an "
                        "image input N x C x H x W (or N x H x W x C)")
    if not len(dims):
        return
    order = _image_dims(layout, 0, 1, 2, 3)
    axis = [order.index(i) for i in range(4)]  # where N, C, H, W sit in the input
    for i, want, what in zip((1, 2, 3), size, ("channels", "height", "width")):
        have = dims[axis[i]].dim_value
        if have and have != want:
            fit = "x".join(str(dims[axis[j]].dim_value or "?") for j in (1, 2, 3))
            raise NofcError(f"the ONNX input '{vi.name}' has {what} {have}, but input_size "
                            f"says {want}; pass input_size={fit}?")


def _constants(g) -> dict:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Identity" and n.input[0] in out:
            # the TorchScript exporter shares equal initializers through an Identity
            # (VGG's zero biases): the constant under another name
            out[n.output[0]] = out[n.input[0]]
        if n.op_type != "Constant":
            continue
        for a in n.attribute:
            if a.name == "value":
                out[n.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                out[n.output[0]] = np.asarray(_attr(n, a.name))
    return out


def _dims(vi) -> tuple:
    """A value's static shape: a dim without a fixed size is None."""
    return tuple(d.dim_value if d.HasField("dim_value") else None
                 for d in vi.type.tensor_type.shape.dim)


def _inferred(model, input_dims, *, strict: bool = False):
    """A copy of ``model`` whose input has ``input_dims``, shapes inferred (may raise)."""
    onnx = _onnx()
    probe = copy.deepcopy(model)
    del probe.graph.value_info[:]
    _set_input_dims(graph_input(probe.graph), input_dims)
    return onnx.shape_inference.infer_shapes(probe, strict_mode=strict, data_prop=True)


def _shapes(model, size, batch, layout) -> dict:
    """Static shapes of every tensor at the reference size, by onnx shape inference."""
    try:
        g = _inferred(model, _image_dims(layout, batch, *size)).graph
    except Exception as exc:  # noqa: BLE001
        first = first_line(exc)
        raise NofcError(f"onnx shape inference fails at input size "
                        f"{'x'.join(map(str, size))}: {first}") from None
    shapes = {vi.name: _dims(vi) for vi in list(g.input) + list(g.value_info) + list(g.output)
              if vi.type.tensor_type.HasField("shape")}
    shapes.update((t.name, tuple(t.dims)) for t in g.initializer)
    return shapes


def _axes(node, consts) -> tuple | None:
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = consts.get(node.input[1])
        if axes is None:
            return None
        axes = axes.tolist()
    return tuple(int(a) % 4 for a in axes) if axes is not None else None


def _transpose_perm(node) -> list[int]:
    return list(_attr(node, "perm", [3, 2, 1, 0]))  # no perm: reverse the axes


def _feature_axes(shape, k: int) -> tuple[int, ...]:
    """The axes of ``shape`` (batch first) that can hold k features, all others being 1.

    >>> _feature_axes((1, 1, 10), 10), _feature_axes((1, 10, 1, 1), 10), _feature_axes((1, 1), 1)
    ((2,), (1,), (1,))
    >>> _feature_axes((1, 4, 5), 20)
    ()
    """
    if shape is None or len(shape) < 2 or None in shape[1:] or math.prod(shape[1:]) != k:
        return ()
    return tuple(a for a in range(1, len(shape)) if shape[a] == k)


def _axis_move(n, consts, shapes) -> tuple[int, ...] | None:
    """The perm of a constant-shape 4D Reshape that only moves a size-1 axis, else None.

    tf2onnx writes the NHWC <-> NCHW Transpose of a one-channel tensor as a Reshape to a
    constant such as [-1, 1, H, W]: the same values at the reference size, but H and W fixed.
    A reshape keeps the order of the values, so the axes longer than 1 keep theirs.

    >>> _axis_move(_onnx().helper.make_node("Reshape", ["x", "s"], ["y"]),
    ...            {"s": np.array([-1, 1, 5, 7])}, {"x": (1, 5, 7, 1), "y": (1, 1, 5, 7)})
    (0, 3, 1, 2)
    """
    if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in consts:
        return None
    src, out = shapes.get(n.input[0]), shapes.get(n.output[0])
    if not src or not out or len(src) != 4 or len(out) != 4 or None in src + out or \
            src[0] != out[0]:
        return None
    ones = [[a for a in (1, 2, 3) if s[a] == 1] for s in (src, out)]
    rest = [[a for a in (1, 2, 3) if s[a] != 1] for s in (src, out)]
    if len(ones[0]) != 1 or len(ones[1]) != 1 or ones[0] == ones[1] or \
            [src[a] for a in rest[0]] != [out[a] for a in rest[1]]:
        return None
    perm = [0, ones[0][0], 0, 0]
    perm[ones[1][0]] = ones[0][0]
    for a, b in zip(rest[1], rest[0]):
        perm[a] = b
    return tuple(perm)


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class _GraphIndex:
    """What the conversion reads off the graph, gathered once; nothing in it changes.

    Nodes are named by their position in ``nodes`` (NodeProtos are not hashable).
    """

    nodes: tuple  # the graph's NodeProtos, in (topological) order
    producer: Mapping[str, int]  # tensor -> the node that writes it
    consumers: Mapping[str, tuple[int, ...]]  # tensor -> the nodes that read it (per input)
    consts: Mapping[str, np.ndarray]  # initializers and Constant outputs
    shapes: Mapping[str, tuple]  # static shapes at the reference size
    outputs: tuple[str, ...]  # graph output names, in order
    names: frozenset[str]  # taken tensor names (initializers, node outputs)
    size: tuple[int, int, int]  # the reference (C, H, W)
    layout: str  # of the graph input: "nchw" or "nhwc"
    opset: int  # of the default domain
    moves: Mapping[int, tuple[int, ...]]  # Reshapes that are Transposes (see _axis_move)

    @classmethod
    def build(cls, model, size, layout) -> _GraphIndex:
        g = model.graph
        opsets = {o.domain: o.version for o in model.opset_import}
        dims = graph_input(g).type.tensor_type.shape.dim
        batch = dims[0].dim_value if len(dims) and dims[0].dim_value else 1
        consumers: dict[str, list[int]] = {}
        for at, n in enumerate(g.node):
            for i in n.input:
                consumers.setdefault(i, []).append(at)
        consts, shapes = _constants(g), _shapes(model, size, batch, layout)
        moves = {at: _axis_move(n, consts, shapes) for at, n in enumerate(g.node)}
        return cls(
            nodes=tuple(g.node),
            producer=MappingProxyType({o: at for at, n in enumerate(g.node) for o in n.output}),
            consumers=MappingProxyType({k: tuple(v) for k, v in consumers.items()}),
            consts=MappingProxyType(consts),
            shapes=MappingProxyType(shapes),
            outputs=tuple(o.name for o in g.output),
            names=frozenset({t.name for t in g.initializer} | {o for n in g.node
                                                               for o in n.output}),
            size=size, layout=layout, opset=opsets.get("", opsets.get("ai.onnx", 0)),
            moves=MappingProxyType({at: p for at, p in moves.items() if p is not None}))

    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def perm_at(self, at: int) -> list[int] | None:
        """The axis permutation node ``at`` makes: a Transpose, or a Reshape that is one."""
        n = self.nodes[at]
        if n.op_type == "Transpose":
            return _transpose_perm(n)
        return list(self.moves[at]) if at in self.moves else None


def _is_entry(ix: _GraphIndex, n) -> bool:
    """Does ``n`` turn a 4D feature map into (N, features): a flatten or a global pooling?

    A flatten may keep axes of size 1, (N, 1, features) say: torch.onnx squeezes a pooled
    N x C x 1 x 1 map one axis at a time.
    """
    if not n.input:
        return False
    src, out = ix.shape(n.input[0]), ix.shape(n.output[0])
    if src is None or out is None or len(src) != 4 or len(out) not in (2, 3):
        return False
    if n.op_type in ("Flatten", "Reshape", "Squeeze"):
        if n.op_type == "Flatten" and _attr(n, "axis", 1) != 1:
            return False
        return None not in src[1:] and out[0] == src[0] and \
            bool(_feature_axes(out, math.prod(src[1:])))
    if n.op_type in _REDUCE and len(out) == 2:  # global pooling without keepdims
        axes = _axes(n, ix.consts)
        return axes is not None and len(set(axes)) == 2 and 0 not in axes and \
            not _attr(n, "keepdims", 1)
    return False


def _find_entry(ix: _GraphIndex) -> int:
    """The one node where the classifier head starts (see ``_is_entry``)."""
    entries = [at for at, n in enumerate(ix.nodes) if _is_entry(ix, n)]
    if len(entries) == 1:
        return entries[0]
    if len(entries) > 1:
        names = ", ".join(f"'{ix.nodes[at].name or ix.nodes[at].output[0]}'" for at in entries)
        raise NofcError(f"found {len(entries)} flattens of feature maps ({names}); nofc "
                        "converts a graph with one classifier head")
    for n in ix.nodes:  # a flatten of a known map into the wrong number of features
        src = ix.shape(n.input[0]) if n.input else None
        if n.op_type in ("Flatten", "Reshape") and src and len(src) == 4 and None not in src[1:]:
            c, h, w = src[1:]
            out = ix.shape(n.output[0])
            into = f" into {out[1:]}" if out and len(out) > 1 else ""
            raise NofcError(f"{_node_label(n)} flattens a {c}x{h}x{w} feature map "
                            f"({c * h * w} values){into} at input size "
                            f"{'x'.join(map(str, ix.size))}; is input_size the size the "
                            "classifier was trained on?")
    ops = sorted({n.op_type for n in ix.nodes})
    raise NofcError("found no Flatten/Reshape of a 4D feature map into (N, features) "
                    f"in the ONNX graph (its ops: {', '.join(ops)}); is it a "
                    "classifier, and is input_size its training size?")


def _trace_layout(ix: _GraphIndex, entry) -> tuple[list[int], int | None]:
    """Follow the flatten's input back to an NCHW tensor X; returns (perm, pooling).

    ``perm`` is the permutation the graph applied to X before flattening (through
    Transposes and elementwise ops), so that flat = transpose(X, perm).flatten(1);
    ``pooling`` is the index of a global pooling that made X, if any.
    """
    cur, perm = entry.input[0], [0, 1, 2, 3]
    while True:
        at = ix.producer.get(cur)
        if at is None:  # the graph input: NCHW, or NHWC = transpose(NCHW, (0, 2, 3, 1))
            if ix.layout == "nhwc":
                perm = [(0, 2, 3, 1)[i] for i in perm]
            return perm, None
        p = ix.nodes[at]
        op = p.op_type
        q = ix.perm_at(at)
        if q is not None:
            perm = [q[i] for i in perm]
            cur = p.input[0]
        elif op in _ELEMENTWISE or op in _BINARY:
            tensors = [i for i in p.input if i and i not in ix.consts
                       and len(ix.shape(i) or ()) == 4]
            if not tensors:
                return perm, None
            cur = tensors[0]
        elif op in _NCHW or (op == "Concat" and _attr(p, "axis") in (1, -3)):
            return perm, at if op in _GLOBAL_POOL else None
        elif op in _REDUCE and _attr(p, "keepdims", 1) and \
                set(_axes(p, ix.consts) or ()) == {2, 3}:
            return perm, at
        else:
            raise NofcError(
                f"cannot tell which axis of '{cur}' (flattened by {_node_label(entry)}) "
                f"holds the channels: it comes from {_node_label(p)}, which is not a "
                "convolution, pooling, Transpose or elementwise op")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _MapLayout:
    """A flattened C x H x W feature map: flat = transpose(X, perm).flatten(1), X NCHW."""

    c: int
    h: int
    w: int
    perm: tuple[int, ...]


@dataclass(frozen=True)
class _VectorLayout:
    """K values per position: class scores, or a 1 x 1 map (the head keeps them as K x h x w)."""

    k: int


_Layout = _MapLayout | _VectorLayout


@dataclass(frozen=True)
class _Edit:
    """One planned change: a node's new form (None: removed) and why."""

    what: str  # the node it concerns, e.g. "'fc' (Gemm)"
    node: Any  # the NodeProto as it will be, or None
    why: str


@dataclass(frozen=True)
class _Step:
    """What a rule decides for one head node."""

    node: Any  # the node as it will be (a copy; the graph is not touched)
    layout: _Layout  # of its outputs
    why: str
    absorbs: int | None = None  # a node folded into this one (the Add after a MatMul)


@dataclass
class _Plan:
    """Every change the conversion makes, with its reason; the graph is not touched yet.

    >>> from onnx import helper as h, numpy_helper, TensorProto as T
    >>> w = numpy_helper.from_array(np.ones((2 * 3 * 3, 4), np.float32), "w")
    >>> b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    >>> mlp = h.make_model(h.make_graph(
    ...     [h.make_node("Flatten", ["x"], ["f"], name="flat"),
    ...      h.make_node("MatMul", ["f", "w"], ["m"], name="fc"),
    ...      h.make_node("Add", ["m", "b"], ["y"], name="bias"),
    ...      h.make_node("Relu", ["y"], ["r"], name="relu")],
    ...     "mlp", [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 3, 3])],
    ...     [h.make_tensor_value_info("r", T.FLOAT, [1, 4])], [w, b]))
    >>> print(_Planner(_GraphIndex.build(mlp, (2, 3, 3), "nchw"), "window").run())
    'flat' (Flatten): removed: the head reads the 2x3x3 map 'x'
    'fc' (MatMul): becomes Conv 2->4, kernel 3x3 (4x2x3x3 weights), bias from 'bias'
    'bias' (Add): removed: folded into 'fc' (MatMul) as its bias
    'relu' (Relu): kept: it acts on each value alone
    outputs: 'r' (4 channels)
    """

    edits: dict[int, _Edit] = field(default_factory=dict)  # node index -> its edit
    inserted: list[_Edit] = field(default_factory=list)  # new nodes (Transpose, Identity)
    inits: list = field(default_factory=list)  # new initializers (kernels, constants)
    layouts: dict[str, _Layout] = field(default_factory=dict)  # head tensor -> layout
    outputs: list[str] = field(default_factory=list)  # graph outputs that become maps

    def __str__(self) -> str:
        lines = [f"{e.what}: {e.why}" for _, e in sorted(self.edits.items())]
        lines += [f"new {e.what}: {e.why}" for e in self.inserted]
        scores = ", ".join(f"'{o}' ({self.layouts[o].k} channels)" for o in self.outputs)
        return "\n".join(lines + [f"outputs: {scores or '-'}"])


class _Planner:
    """Decides the conversion from a ``_GraphIndex``: ``run()`` returns the ``_Plan``.

    It holds what the steps share (the plan being built, fresh names and constants, the
    shapes head nodes read) and hands each head node to its rule in ``_RULES``.
    """

    def __init__(self, ix: _GraphIndex, pooling: str):
        self.ix = ix
        self.pooling = pooling
        self.plan = _Plan()
        self.taken = set(ix.names)
        self.read_as: dict[str, str] = {}  # src -> the flattened tensor head nodes read it as

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.plan.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def shape(self, name: str) -> tuple | None:
        """The graph's shape of a tensor a head node reads (src: the flattened one)."""
        return self.ix.shape(self.read_as.get(name, name))

    def fail(self, node, why: str) -> NoReturn:
        raise NofcError(f"{_node_label(node)}: {why}")

    def edit(self, at: int, node, why: str) -> None:
        self.plan.edits[at] = _Edit(_label(self.ix.nodes[at]), node, why)

    def insert(self, node, why: str) -> None:
        self.plan.inserted.append(_Edit(_label(node), node, why))

    def run(self) -> _Plan:
        _plan_moves(self)
        flat, src = _plan_entry(self)
        self.plan_head(flat, src)
        return self.plan

    def plan_head(self, flat: str, src: str) -> None:
        """Plan every node downstream of the flatten; they then read ``src`` instead."""
        ix, plan = self.ix, self.plan
        plan.layouts[flat] = plan.layouts[src]
        self.read_as[src] = flat
        if flat in ix.outputs:  # squeezenet: pool, flatten, done
            self.insert(_onnx().helper.make_node("Identity", [src], [flat],
                                                 name=self.fresh(flat + "_map")),
                        f"keeps the graph output '{flat}', now a map")
        # The head: the nodes that read the flattened tensor or what is computed from it.
        # src has a layout too, but a node that reads only src belongs to the body (the
        # Transpose before a flatten may feed both).
        reached = {flat}
        for at, n in enumerate(ix.nodes):
            # planned already: the flatten, an Add folded into its MatMul
            if at in plan.edits or not any(i in reached for i in n.input):
                continue
            node = copy.deepcopy(n)
            del node.input[:]
            node.input.extend(src if i == flat else i for i in n.input)
            layout = next(plan.layouts[i] for i in node.input if i in plan.layouts)
            step = _RULES.get(node.op_type, _plan_unsupported)(self, node, layout)
            self.edit(at, step.node, step.why)
            if step.absorbs is not None:
                self.edit(step.absorbs, None, f"removed: folded into {_label(n)} as its bias")
            for o in step.node.output:
                if o:
                    plan.layouts[o] = step.layout
                    reached.add(o)
        plan.outputs = [o for o in ix.outputs if o in reached]
        for name in plan.outputs:
            if isinstance(plan.layouts[name], _MapLayout):
                raise NofcError(f"the graph output '{name}' is the flattened feature map "
                                "itself, which has no convolutional form")


# --------------------------------------------------------------------------- plan: the body


def _plan_moves(p: _Planner) -> None:
    """Reshapes that only move a one-channel axis become the Transposes they stand for."""
    for at, perm in p.ix.moves.items():
        n = p.ix.nodes[at]
        new = _onnx().helper.make_node("Transpose", [n.input[0]], [n.output[0]],
                                       name=n.name or None, perm=list(perm))
        p.edit(at, new, f"becomes Transpose {list(perm)}: its constant shape only "
                        "moves the one-channel axis, but fixes height and width")


# --------------------------------------------------------------------------- plan: the entry


def _plan_entry(p: _Planner) -> tuple[str, str]:
    """Plan away the flatten; returns (flattened tensor, 4D tensor the head reads)."""
    ix = p.ix
    at = _find_entry(ix)
    entry = ix.nodes[at]
    t = entry.input[0]
    perm, pool = _trace_layout(ix, entry)
    if perm[0] != 0:
        p.fail(entry, f"the flattened tensor moves the batch axis (perm {perm})")
    ts = ix.shape(t)
    xs = tuple(ts[perm.index(j)] for j in range(4))  # (N, C, H, W) of the NCHW source
    if None in xs[1:]:
        p.fail(entry, f"the shape of its input '{t}' is unknown at the reference size")
    src = _nchw(p, t, perm)
    if entry.op_type in _REDUCE:  # pooling and flatten in one
        return entry.output[0], _plan_reduce(p, at, src, xs, perm)
    if pool is not None and p.pooling == "window":
        _window_pool(p, pool)
    p.edit(at, None, f"removed: the head reads the {'x'.join(map(str, xs[1:]))} map '{src}'")
    # a 1 x 1 map flattens to its C channels in any order: plain class-score vector
    p.plan.layouts[src] = _VectorLayout(xs[1]) if xs[2:] == (1, 1) else \
        _MapLayout(*xs[1:], tuple(perm))
    return entry.output[0], src


def _plan_reduce(p: _Planner, at: int, src: str, xs: tuple, perm: list[int]) -> str:
    """A ReduceMean/Max over height and width without keepdims becomes a pooling
    that keeps them; returns the pooled tensor."""
    entry = p.ix.nodes[at]
    if {perm[a] for a in _axes(entry, p.ix.consts)} != {2, 3}:
        p.fail(entry, "it does not reduce over height and width")
    pooled = p.fresh(entry.output[0] + "_map")
    if p.pooling == "window":
        new = _pool_node(entry, src, pooled, xs[2:])
    else:
        new = _onnx().helper.make_node(_REDUCE_TO_GLOBAL[entry.op_type], [src], [pooled],
                                       name=entry.name or None)
    p.edit(at, new, f"becomes {new.op_type}{_kernel_text(new)}, keeping height and width")
    p.plan.layouts[pooled] = _VectorLayout(xs[1])
    return pooled


def _window_pool(p: _Planner, at: int) -> None:
    """Global pooling -> the (h, w) window it covers at the reference size, stride 1."""
    pool = p.ix.nodes[at]
    src = p.ix.shape(pool.input[0])
    if src is None or None in src[2:]:
        p.fail(pool, "its input's height and width are unknown at the reference size")
    new = _pool_node(pool, pool.input[0], pool.output[0], src[2:])
    p.edit(at, new, f"becomes {new.op_type}{_kernel_text(new)}: the window of the "
                    "reference size")


def _pool_node(pool, src: str, out: str, window):
    return _onnx().helper.make_node(_GLOBAL_POOL[pool.op_type], [src], [out],
                                    name=pool.name or None, kernel_shape=list(window),
                                    strides=[1, 1])


def _kernel_text(node) -> str:
    k = _attr(node, "kernel_shape")
    return f", kernel {'x'.join(map(str, k))}, stride 1" if k else ""


def _nchw(p: _Planner, t: str, perm) -> str:
    """The NCHW tensor X with t = transpose(X, perm): t itself, a Transpose's input or
    a new Transpose that undoes ``perm``."""
    if perm == [0, 1, 2, 3]:
        return t
    at = p.ix.producer.get(t)
    if at is not None and p.ix.perm_at(at) == perm:
        return p.ix.nodes[at].input[0]
    src = p.fresh(t + "_nchw")
    p.insert(_onnx().helper.make_node(
        "Transpose", [t], [src], name=src, perm=[perm.index(i) for i in range(4)]),
        f"undoes the permutation {perm} before the flatten")
    return src


# --------------------------------------------------------------------------- plan: head rules

# A rule plans one head node: rule(planner, node, layout) gets the node (a copy that reads
# src where the graph read the flattened tensor) and the layout it reads, and returns what
# the node becomes (a _Step) or refuses.
_Rule = Callable[[_Planner, Any, _Layout], _Step]


def _plan_dense(p: _Planner, n, layout: _Layout) -> _Step:
    """Gemm, or MatMul (with the constant Add after it): a Conv."""
    a, b = n.input[0], n.input[1]
    if a not in p.plan.layouts or b not in p.ix.consts:
        p.fail(n, "nofc needs the features as its first input and constant weights "
                  "as its second")
    w = p.ix.consts[b]
    if w.ndim != 2:
        p.fail(n, f"its weight has shape {w.shape}, not (in, out)")
    if n.op_type == "Gemm":
        (w, bias), fold = _gemm_weight(p, n, w), None
    else:
        w, (fold, bias) = w.T, _matmul_bias(p, n)
    fold_node = None if fold is None else p.ix.nodes[fold]
    bias = _check_bias(p, fold_node or n, bias, w)
    kernel = _kernel(p, n, w, layout)
    base = n.name or n.output[0]
    inputs = [a, p.const(f"{base}_conv_weight", kernel)]
    if bias is not None:
        inputs.append(p.const(f"{base}_conv_bias", bias))
    out_name = (fold_node or n).output[0]
    conv = _onnx().helper.make_node("Conv", inputs, [out_name], name=n.name or None,
                                    kernel_shape=list(kernel.shape[2:]), strides=[1, 1])
    why = (f"becomes Conv {kernel.shape[1]}->{kernel.shape[0]}, kernel "
           f"{'x'.join(map(str, kernel.shape[2:]))} ({'x'.join(map(str, kernel.shape))} "
           "weights)" + (f", bias from '{fold_node.name or out_name}'" if fold_node else ""))
    return _Step(conv, _VectorLayout(kernel.shape[0]), why, absorbs=fold)


def _gemm_weight(p: _Planner, n, w: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A Gemm's weight as (out, in), alpha applied, and its bias C (beta applied)."""
    if _attr(n, "transA", 0):
        p.fail(n, "transA=1 transposes the features; nofc converts transA=0 only")
    w = w if _attr(n, "transB", 0) else w.T  # (out, in)
    w = w * np.asarray(_attr(n, "alpha", 1.0), dtype=w.dtype)
    if len(n.input) < 3 or not n.input[2]:
        return w, None
    if n.input[2] not in p.ix.consts:
        p.fail(n, "its bias C is not a constant")
    return w, p.ix.consts[n.input[2]] * np.asarray(_attr(n, "beta", 1.0), w.dtype)


def _matmul_bias(p: _Planner, n) -> tuple[int | None, np.ndarray | None]:
    """The Add of a constant right after a MatMul: (its index, the constant)."""
    ix, out = p.ix, n.output[0]
    users = ix.consumers.get(out, ())
    if len(users) != 1 or out in ix.outputs:
        return None, None
    add = ix.nodes[users[0]]
    other = [i for i in add.input if i != out]
    rank = len(ix.shape(out) or (0, 0))
    if add.op_type == "Add" and len(other) == 1 and other[0] in ix.consts and \
            ix.consts[other[0]].ndim <= rank:  # broadcasting adds no axes
        return users[0], ix.consts[other[0]]
    return None, None


def _check_bias(p: _Planner, n, bias, w: np.ndarray) -> np.ndarray | None:
    """The bias as one value per output, in the weight's dtype."""
    if bias is None:
        return None
    out = w.shape[0]
    if bias.size == 1:
        bias = np.full(out, bias.reshape(()), dtype=w.dtype)
    elif bias.size != out or bias.shape[-1] != out:  # (out,), (1, out), (1, 1, out)
        p.fail(n, f"its bias has shape {bias.shape}; nofc needs one value per output "
                  f"({out},)")
    return bias.reshape(out).astype(w.dtype)


def _kernel(p: _Planner, n, w: np.ndarray, layout: _Layout) -> np.ndarray:
    """The (out, in) weight as a Conv kernel (out, C, H, W) for the layout it reads."""
    out = w.shape[0]
    if isinstance(layout, _VectorLayout):
        if w.shape[1] != layout.k:
            p.fail(n, f"it expects {w.shape[1]} features but gets {layout.k}")
        return w.reshape(out, layout.k, 1, 1)
    c, h, wd, perm = layout.c, layout.h, layout.w, layout.perm
    if w.shape[1] != c * h * wd:
        p.fail(n, f"it expects {w.shape[1]} features but the feature map is "
                  f"{c}x{h}x{wd} = {c * h * wd}; is input_size the training size?")
    # the weight reads transpose(X, perm) flattened; the kernel reads X itself
    t_dims = [(c, h, wd)[a - 1] for a in perm[1:]]
    return w.reshape(out, *t_dims).transpose([0] + [perm.index(j) for j in (1, 2, 3)])


def _plan_elementwise(p: _Planner, n, layout: _Layout) -> _Step:
    extra = [i for i in n.input[1:] if i]
    consts = p.ix.consts
    if any(i not in consts or consts[i].size != 1 for i in extra):
        p.fail(n, "its extra inputs are not scalar constants")
    return _Step(n, layout, "kept: it acts on each value alone")


def _plan_binary(p: _Planner, n, layout: _Layout) -> _Step:
    """Tensors of the head with the same layout, scalars, or one constant per class."""
    why = "kept: its other inputs are scalars or of the same layout"
    vector = isinstance(layout, _VectorLayout)
    for i, name in enumerate(n.input):
        if name in p.plan.layouts:  # from the head
            if p.plan.layouts[name] != layout:
                p.fail(n, "it combines tensors of different shapes")
            continue
        c = p.ix.consts.get(name)
        if c is None:
            p.fail(n, f"its input '{name}' is neither constant nor from the head")
        if c.size == 1 or (n.op_type == "PRelu" and vector and c.shape == (layout.k, 1, 1)):
            continue
        head = next(t for t in n.input if t in p.plan.layouts)
        if not vector or not _per_class(p, c, head, layout):
            p.fail(n, f"its constant '{name}' has shape {c.shape}; nofc handles "
                      "scalars and one value per feature of the class scores")
        n.input[i] = p.const(f"{name}_per_channel", c.reshape(layout.k, 1, 1))
        why = "its per-class constants become (K, 1, 1)"
    return _Step(n, layout, why)


def _per_class(p: _Planner, c: np.ndarray, head: str, layout: _VectorLayout) -> bool:
    """Is constant ``c`` one value per class of the head tensor ``head`` it meets
    (broadcast from the right, without adding axes)?"""
    axes, rank = _class_axes(p, head, layout)
    off = rank - c.ndim
    return off >= 0 and c.size == layout.k and any(
        a >= off and c.shape[a - off] == layout.k for a in axes)


def _scores_only(p: _Planner, n, layout: _Layout, why: str) -> None:
    if not isinstance(layout, _VectorLayout):
        p.fail(n, why)


def _class_axes(p: _Planner, name: str, layout: _Layout) -> tuple[tuple[int, ...], int]:
    """(the axes of tensor ``name`` that can hold its features, its rank) in the graph;
    a tensor of unknown shape counts as (N, features)."""
    shape = p.shape(name)
    k = layout.k if isinstance(layout, _VectorLayout) else layout.c * layout.h * layout.w
    return (_feature_axes(shape, k), len(shape)) if shape else ((1,), 2)


def _read_text(layout: _Layout) -> str:
    """What a head node with ``layout`` reads, for refusals."""
    return "class scores" if isinstance(layout, _VectorLayout) else "flattened feature map"


def _plan_softmax(p: _Planner, n, layout: _Layout) -> _Step:
    _scores_only(p, n, layout, "it runs on the flattened feature map, not on class scores")
    if p.ix.opset < 13:
        p.fail(n, f"in opset {p.ix.opset} Softmax flattens its input; "
                  "re-export the model with opset 13 or later")
    axes, rank = _class_axes(p, n.input[0], layout)
    if _attr(n, "axis", -1) % rank not in axes:
        p.fail(n, "it does not run over the class axis")
    _set_attr(n, "axis", 1)
    return _Step(n, layout, "runs over the channel axis (axis=1)")


def _plan_batch_norm(p: _Planner, n, layout: _Layout) -> _Step:
    _scores_only(p, n, layout, "it normalises the flattened feature map feature by feature")
    if 1 not in _class_axes(p, n.input[0], layout)[0]:
        p.fail(n, "its channel axis 1 does not hold the class scores")
    return _Step(n, layout, "kept: it normalises each channel")


def _plan_reshape(p: _Planner, n, layout: _Layout) -> _Step:
    """A Reshape, Squeeze, Unsqueeze or Flatten that only adds or drops axes of size 1
    (torch.onnx writes them around Gemm) or keeps the shape: Identity."""
    src, out = p.shape(n.input[0]), p.ix.shape(n.output[0])
    if src is None or out is None or src != out and not (
            src[0] == out[0] and _class_axes(p, n.input[0], layout)[0] and
            _class_axes(p, n.output[0], layout)[0]):
        p.fail(n, f"it changes the shape of the {_read_text(layout)}")
    del n.input[1:]
    del n.attribute[:]
    n.op_type = "Identity"
    return _Step(n, layout, "becomes Identity: the values keep their order and the map "
                            "its K x h x w shape")


def _plan_unsupported(p: _Planner, n, layout: _Layout) -> NoReturn:
    p.fail(n, f"it reads the {_read_text(layout)} and has no fully convolutional form; nofc "
              "converts Gemm, MatMul(+Add), elementwise activations, "
              "BatchNormalization and Softmax there")


# op type -> rule; an op without one is refused (_plan_unsupported)
_RULES: dict[str, _Rule] = {
    **dict.fromkeys(_DENSE, _plan_dense),
    **dict.fromkeys(_ELEMENTWISE, _plan_elementwise),
    **dict.fromkeys(_BINARY, _plan_binary),
    **dict.fromkeys(_SOFTMAX, _plan_softmax),
    "BatchNormalization": _plan_batch_norm,
    **dict.fromkeys(_RESHAPE, _plan_reshape),
}


# --------------------------------------------------------------------------- apply


def _apply(model, plan: _Plan, size, layout) -> None:
    """Make the planned edits in ``model``: nodes, initializers, free dims."""
    g = model.graph
    nodes = [copy.deepcopy(plan.edits[at].node if at in plan.edits else n)
             for at, n in enumerate(g.node)
             if at not in plan.edits or plan.edits[at].node is not None]
    # inserted nodes go right after their input's producer (topological order)
    for extra in plan.inserted:
        at = next((i + 1 for i, n in enumerate(nodes) if extra.node.input[0] in n.output), 0)
        nodes.insert(at, extra.node)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(plan.inits)
    _clean(g)
    del g.value_info[:]
    inp = graph_input(g)  # after _clean, which may rebuild the input list
    dims = inp.type.tensor_type.shape.dim
    batch = dims[0].dim_param if len(dims) and dims[0].dim_param else "batch"
    _set_input_dims(inp, _image_dims(layout, batch, size[0], "height", "width"))
    for o in g.output:
        if o.name in plan.outputs:
            _set_input_dims(o, (batch, plan.layouts[o.name].k, "map_height", "map_width"))


def _clean(g) -> None:
    """Drop nodes whose outputs nobody reads, then initializers nobody reads."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [i for i, n in enumerate(g.node) if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for i in reversed(dead):
            del g.node[i]
    used = {i for n in g.node for i in n.input} | outputs
    keep = [t for t in g.initializer if t.name in used]
    gone = {t.name for t in g.initializer} - {t.name for t in keep}
    del g.initializer[:]
    g.initializer.extend(keep)
    if any(i.name in gone for i in g.input):  # initializers listed as inputs (old exports)
        real = [i for i in g.input if i.name not in gone]
        del g.input[:]
        g.input.extend(real)


def _check_runs(model, size, names, layout) -> dict:
    """Shape inference at the reference size and at twice it; returns output shapes there."""
    found = {}
    for scale in (1, 2):
        c, h, w = size[0], size[1] * scale, size[2] * scale
        try:
            g = _inferred(model, _image_dims(layout, 1, c, h, w), strict=True).graph
        except Exception as exc:  # noqa: BLE001
            first = first_line(exc)
            raise NofcError(f"the converted graph does not run on a {c}x{h}x{w} input: "
                            f"{first}; some node before the head depends on the input "
                            "size") from None
        found.update(((vi.name, scale), _dims(vi)) for vi in list(g.value_info) + list(g.output)
                     if vi.name in names)
    return found


def _check_result(model, size, names, layout, pooling) -> None:
    """The converted graph passes onnx.checker, gives 1 x 1 maps at the reference size and
    (with window pooling) larger maps at twice it."""
    try:
        _onnx().checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        if model.ByteSize() < 2**31:
            first = first_line(exc)
            raise NofcError(f"internal: the converted graph fails onnx.checker: {first}"
                            ) from None
    found = _check_runs(model, size, names, layout)
    for name in names:
        ref = found.get((name, 1))
        if ref is not None and ref[2:] != (1, 1):
            raise NofcError(f"internal: output '{name}' is {ref} at the reference size")
        big = found.get((name, 2))
        if pooling == "window" and big is not None and None not in big and (
                big[0] != 1 or 1 in big[2:]):
            raise NofcError(
                f"on a {size[0]}x{2 * size[1]}x{2 * size[2]} input the converted graph gives "
                f"'{name}' the shape {big}, not a map of windows: a node before the head "
                "fixes the size (a Reshape, Resize or Slice with constant shapes?)")


def convert_onnx(model, input_size, *, output=None, pooling: str = "window",
                 force: bool = False):
    """Rewrite an ONNX classifier as a fully convolutional ONNX model.

    Args:
        model: a path to an ``.onnx`` file or an ``onnx.ModelProto`` (not modified).
        input_size: ``(C, H, W)`` the classifier was trained on.
        output: where to write the result (atomically; an existing file needs ``force``).
        pooling: ``"window"`` turns a global pooling before the flatten into a sliding
            window of the reference feature size; ``"global"`` keeps it global.

    Returns:
        The converted ``onnx.ModelProto``; its input is ``batch x C x height x width``
        (``batch x height x width x C`` when the original input was channels-last) and
        each class-score output ``batch x K x map_height x map_width``.

    >>> import onnx
    >>> from onnx import helper, TensorProto, numpy_helper
    >>> import numpy as np
    >>> w = numpy_helper.from_array(np.ones((10, 3 * 8 * 8), np.float32), "w")
    >>> g = helper.make_graph(
    ...     [helper.make_node("Flatten", ["x"], ["f"]),
    ...      helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)], "head",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [w])
    >>> fcn = convert_onnx(helper.make_model(g), input_size=(3, 8, 8))
    >>> [n.op_type for n in fcn.graph.node]
    ['Conv']
    >>> [d.dim_param or d.dim_value for d in fcn.graph.output[0].type.tensor_type.shape.dim]
    ['batch', 10, 'map_height', 'map_width']
    """
    _onnx()  # a missing extra is the first thing to say
    size = check_input_size(input_size)
    if pooling not in ("window", "global"):
        raise NofcError(f"pooling must be 'window' or 'global', got {pooling!r}")
    if output is not None:
        refuse_overwrite(output, force=force)
    m = load_onnx(model)
    inp = graph_input(m.graph)
    layout = input_layout(inp, size)
    _check_input(inp, size, layout)
    plan = _Planner(_GraphIndex.build(m, size, layout), pooling).run()
    _apply(m, plan, size, layout)
    _check_result(m, size, plan.outputs, layout, pooling)
    if output is not None:
        save_onnx(m, output, force=force)
    return m


def verify_onnx(model, fcn, input_size, *, batch: int = 1, seed: int = 0,
                tolerance: float = 1e-4):
    """Run both ONNX models in onnxruntime on one random input at the reference size.

    Returns a :class:`nofc.VerifyReport` (float32, relative tolerance).

    >>> import numpy as np
    >>> from onnx import helper as h, numpy_helper, TensorProto as T
    >>> eye = numpy_helper.from_array(np.eye(2 * 4 * 4, dtype=np.float32), "eye")  # (in, out)
    >>> mlp = h.make_model(h.make_graph(
    ...     [h.make_node("Flatten", ["x"], ["f"]), h.make_node("MatMul", ["f", "eye"], ["y"])],
    ...     "mlp", [h.make_tensor_value_info("x", T.FLOAT, ["n", 2, 4, 4])],
    ...     [h.make_tensor_value_info("y", T.FLOAT, ["n", 32])], [eye]))
    >>> report = verify_onnx(mlp, convert_onnx(mlp, (2, 4, 4)), (2, 4, 4), batch=3)
    >>> report.ok, report.output_shape
    (True, (3, 32, 1, 1))
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise NofcError("checking ONNX models needs onnxruntime: pip install "
                        "'nofc[onnx]'") from None
    size = check_input_size(input_size)
    a_model, b_model = load_onnx(model), load_onnx(fcn)
    layout = input_layout(graph_input(a_model.graph), size)
    x = np.random.default_rng(seed).standard_normal(_image_dims(layout, batch, *size))
    x = x.astype(np.float32)
    outs = []
    for m in (a_model, b_model):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x})[0])
    a, b = outs
    b2 = b.reshape(b.shape[0], -1) if a.ndim == 2 and b.ndim == 4 and b.shape[2:] == (1, 1) \
        else b
    if a.shape != b2.shape:
        raise NofcError(f"outputs differ in shape at the reference size: model gives "
                        f"{a.shape}, fcn gives {b.shape}")
    max_abs = float(np.abs(a - b2).max()) if a.size else 0.0
    scale = float(np.abs(a).max()) if a.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    return VerifyReport(max_abs, max_rel, "float32", x.shape, b.shape, f"rel {tolerance:g}",
                        bool(max_rel <= tolerance))
