"""Convert an ONNX classifier into a fully convolutional ONNX graph, with onnx alone.

The head of a classifier exported to ONNX is a Flatten (or a Reshape, or a Squeeze of a
1 x 1 map, or a ReduceMean without keepdims) of a 4D feature map, followed by Gemm or
MatMul + Add layers with activations between them. ``convert_onnx`` rewrites it:

* the first dense layer becomes a ``Conv`` whose kernel is the feature map's H x W;
  a Transpose before the flatten (channels-last origins such as Keras) is read off the
  graph and the weights are permuted to match, so the result is exact either way;
* every later dense layer becomes a 1 x 1 ``Conv``; per-feature constants of Add/Mul/PRelu
  are reshaped to (K, 1, 1); Softmax runs over the channel axis;
* a global pooling right before the flatten becomes the window it stands for
  (``pooling="window"``) or stays global (``pooling="global"``).

The result needs only an ONNX runtime: input ``batch x C x height x width``, outputs
``batch x K x h x w``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np

from .errors import NofcError, check_input_size, first_line, refuse_overwrite

__all__ = ["convert_onnx", "verify_onnx"]

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


def _onnx():
    try:
        import onnx
    except ImportError:
        raise NofcError("ONNX conversion needs the onnx extra: pip install 'nofc[onnx]'") from None
    return onnx


def _load(model):
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


def _node_label(node) -> str:
    return f"ONNX node '{node.name or node.output[0]}' ({node.op_type})"


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


def _graph_input(g):
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


def _input_layout(vi, size) -> str:
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
        if n.op_type != "Constant":
            continue
        for a in n.attribute:
            if a.name == "value":
                out[n.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                out[n.output[0]] = np.asarray(_attr(n, a.name))
    return out


def _shapes(model, size, batch, layout) -> dict:
    """Static shapes of every tensor at the reference size, by onnx shape inference."""
    onnx = _onnx()
    probe = copy.deepcopy(model)
    del probe.graph.value_info[:]
    _set_input_dims(_graph_input(probe.graph), _image_dims(layout, batch, *size))
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        first = first_line(exc)
        raise NofcError(f"onnx shape inference fails at input size "
                        f"{'x'.join(map(str, size))}: {first}") from None
    shapes = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in t.shape.dim)
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def _axes(node, consts) -> tuple | None:
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = consts.get(node.input[1])
        if axes is None:
            return None
        axes = axes.tolist()
    return tuple(int(a) % 4 for a in axes) if axes is not None else None


class _Converter:
    def __init__(self, model, size, pooling, layout):
        self.model = model
        self.layout = layout
        self.g = model.graph
        self.size = size
        self.pooling = pooling
        opsets = {o.domain: o.version for o in model.opset_import}
        self.opset = opsets.get("", opsets.get("ai.onnx", 0))
        self.consts = _constants(self.g)
        dims = _graph_input(self.g).type.tensor_type.shape.dim
        batch = dims[0].dim_value if len(dims) and dims[0].dim_value else 1
        self.batch = batch
        self.shapes = _shapes(model, size, batch, layout)
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.kind: dict[str, tuple] = {}  # tensor -> ("map", C, H, W, perm) | ("vec", K)
        self.new_inits = []
        self.drop: set[tuple] = set()  # (op_type, first output) of nodes to remove
        self.extra_nodes = []  # Transposes before the first Conv, Identity to an output
        self.names = {t.name for t in self.g.initializer} | {o for n in self.g.node
                                                            for o in n.output}

    # ------------------------------------------------------------------ helpers

    def shape(self, name):
        return self.shapes.get(name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def fail(self, node, why: str):
        raise NofcError(f"{_node_label(node)}: {why}")

    # ------------------------------------------------------------------ the entry

    def _is_entry(self, n) -> bool:
        if not n.input:
            return False
        src, out = self.shape(n.input[0]), self.shape(n.output[0])
        if src is None or out is None or len(src) != 4 or len(out) != 2:
            return False
        if n.op_type in ("Flatten", "Reshape", "Squeeze"):
            if n.op_type == "Flatten" and _attr(n, "axis", 1) != 1:
                return False
            return None not in src[1:] and out[1] == math.prod(src[1:])
        if n.op_type in ("ReduceMean", "ReduceMax"):  # global pooling without keepdims
            axes = _axes(n, self.consts)
            return axes is not None and len(set(axes)) == 2 and 0 not in axes and \
                not _attr(n, "keepdims", 1)
        return False

    def find_entry(self):
        entries = [n for n in self.g.node if self._is_entry(n)]
        near = [n for n in self.g.node if n.op_type in ("Flatten", "Reshape") and n.input
                and len(self.shape(n.input[0]) or ()) == 4 and None not in self.shape(
                    n.input[0])[1:]]
        if not entries and near:
            c, h, w = self.shape(near[0].input[0])[1:]
            out = self.shape(near[0].output[0])
            into = f" into {out[1:]}" if out and len(out) > 1 else ""
            raise NofcError(f"{_node_label(near[0])} flattens a {c}x{h}x{w} feature map "
                            f"({c * h * w} values){into} at input size "
                            f"{'x'.join(map(str, self.size))}; is input_size the size the "
                            "classifier was trained on?")
        if not entries:
            ops = sorted({n.op_type for n in self.g.node})
            raise NofcError("found no Flatten/Reshape of a 4D feature map into (N, features) "
                            f"in the ONNX graph (its ops: {', '.join(ops)}); is it a "
                            "classifier, and is input_size its training size?")
        if len(entries) > 1:
            names = ", ".join(f"'{n.name or n.output[0]}'" for n in entries)
            raise NofcError(f"found {len(entries)} flattens of feature maps ({names}); nofc "
                            "converts a graph with one classifier head")
        return entries[0]

    def trace_layout(self, entry):
        """Follow the flatten's input back to an NCHW tensor; returns (X, perm, pool node).

        ``perm`` is the permutation the graph applied to X before flattening (through
        Transposes and elementwise ops), so that flat = transpose(X, perm).flatten(1).
        """
        cur, perm = entry.input[0], [0, 1, 2, 3]
        while True:
            p = self.producer.get(cur)
            if p is None:  # the graph input: NCHW, or NHWC = transpose(NCHW, (0, 2, 3, 1))
                if self.layout == "nhwc":
                    perm = [(0, 2, 3, 1)[i] for i in perm]
                return cur, perm, None
            op = p.op_type
            if op == "Transpose":
                q = list(_attr(p, "perm", [3, 2, 1, 0]))
                perm = [q[i] for i in perm]
                cur = p.input[0]
            elif op in _ELEMENTWISE or op in _BINARY:
                tensors = [i for i in p.input if i and i not in self.consts
                           and len(self.shape(i) or ()) == 4]
                if not tensors:
                    return cur, perm, None
                cur = tensors[0]
            elif op in _NCHW or (op == "Concat" and _attr(p, "axis") in (1, -3)):
                return cur, perm, p if op in _GLOBAL_POOL else None
            elif op in ("ReduceMean", "ReduceMax") and _attr(p, "keepdims", 1) and \
                    set(_axes(p, self.consts) or ()) == {2, 3}:
                return cur, perm, p
            else:
                raise NofcError(
                    f"cannot tell which axis of '{cur}' (flattened by {_node_label(entry)}) "
                    f"holds the channels: it comes from {_node_label(p)}, which is not a "
                    "convolution, pooling, Transpose or elementwise op")

    def window_pool(self, pool) -> None:
        """Global pooling -> the (h, w) window it covers at the reference size, stride 1."""
        from onnx import helper

        src = self.shape(pool.input[0])
        if src is None or None in src[2:]:
            self.fail(pool, "its input's height and width are unknown at the reference size")
        kind = _GLOBAL_POOL[pool.op_type]
        new = helper.make_node(kind, [pool.input[0]], [pool.output[0]],
                               name=pool.name or None, kernel_shape=list(src[2:]),
                               strides=[1, 1])
        pool.CopyFrom(new)

    # ------------------------------------------------------------------ the head

    def run(self):
        entry = self.find_entry()
        t, flat = entry.input[0], entry.output[0]
        x, perm, pool = self.trace_layout(entry)
        if perm[0] != 0:
            self.fail(entry, f"the flattened tensor moves the batch axis (perm {perm})")
        ts = self.shape(t)
        xs = tuple(ts[perm.index(j)] for j in range(4))  # (N, C, H, W) of the NCHW source
        if None in xs[1:]:
            self.fail(entry, f"the shape of its input '{t}' is unknown at the reference size")
        src = self.nchw(t, perm)
        if entry.op_type in ("ReduceMean", "ReduceMax"):  # pooling and flatten in one
            if {perm[a] for a in _axes(entry, self.consts)} != {2, 3}:
                self.fail(entry, "it does not reduce over height and width")
            pooled = self.fresh(flat + "_map")
            entry.CopyFrom(_onnx().helper.make_node(
                {"ReduceMean": "GlobalAveragePool", "ReduceMax": "GlobalMaxPool"}[entry.op_type],
                [src], [pooled],
                name=entry.name or None))
            if self.pooling == "window":
                self.shapes[src] = xs  # src may be a new Transpose that inference never saw
                self.window_pool(entry)
            self.kind[pooled] = ("vec", xs[1])
            return self.propagate(flat, pooled)
        if pool is not None and self.pooling == "window":
            self.window_pool(pool)
        self.drop.add((entry.op_type, entry.output[0]))
        # a 1 x 1 map flattens to its C channels in any order: plain class-score vector
        self.kind[src] = ("vec", xs[1]) if xs[2:] == (1, 1) else ("map", *xs[1:], perm)
        return self.propagate(flat, src)

    def nchw(self, t: str, perm) -> str:
        """The NCHW tensor X with t = transpose(X, perm): t itself, a Transpose's input or
        a new Transpose that undoes ``perm``."""
        if perm == [0, 1, 2, 3]:
            return t
        p = self.producer.get(t)
        if p is not None and p.op_type == "Transpose" and list(_attr(p, "perm")) == perm:
            return p.input[0]
        src = self.fresh(t + "_nchw")
        self.extra_nodes.append(_onnx().helper.make_node(
            "Transpose", [t], [src], name=src, perm=[perm.index(i) for i in range(4)]))
        return src

    def propagate(self, flat: str, src: str):
        """Rewrite every node downstream of the flatten; they then read ``src`` instead."""
        self.kind[flat] = self.kind[src]
        if flat in {o.name for o in self.g.output}:  # squeezenet: pool, flatten, done
            self.extra_nodes.append(_onnx().helper.make_node("Identity", [src], [flat],
                                                             name=self.fresh(flat + "_map")))
        vector = {flat}  # src itself may also feed the body (the Transpose before a flatten)
        for n in list(self.g.node):
            if (n.op_type, n.output[0]) in self.drop or not any(i in vector for i in n.input):
                continue
            ins = [src if i == flat else i for i in n.input]
            del n.input[:]
            n.input.extend(ins)
            self.head_node(n, vector | {src})
            vector.update(o for o in n.output if o)
        g_out = {o.name for o in self.g.output}
        for name in vector & g_out:
            if self.kind[name][0] == "map":
                raise NofcError(f"the graph output '{name}' is the flattened feature map "
                                "itself, which has no convolutional form")
        return [o for o in self.g.output if o.name in vector]

    def head_node(self, n, vector):
        op = n.op_type
        kinds = [self.kind.get(i) for i in n.input if i in vector]
        k = kinds[0]
        if op in _DENSE:
            return self.dense(n, k)
        if op in _ELEMENTWISE:
            extra = [i for i in n.input[1:] if i]
            if any(i not in self.consts or self.consts[i].size != 1 for i in extra):
                self.fail(n, "its extra inputs are not scalar constants")
        elif op in _BINARY:
            return self.binary(n, vector, k)
        elif op in _SOFTMAX:
            if k[0] != "vec":
                self.fail(n, "it runs on the flattened feature map, not on class scores")
            if self.opset < 13:
                self.fail(n, f"in opset {self.opset} Softmax flattens its input; "
                             "re-export the model with opset 13 or later")
            if _attr(n, "axis", -1 if self.opset >= 13 else 1) not in (1, -1):
                self.fail(n, "it does not run over the class axis")
            _set_attr(n, "axis", 1)
        elif op == "BatchNormalization":
            if k[0] != "vec":
                self.fail(n, "it normalises the flattened feature map feature by feature")
        elif op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
            if k[0] != "vec" or self.shape(n.output[0]) != self.shape(n.input[0]):
                self.fail(n, "it changes the shape of the class scores")
            del n.input[1:]
            del n.attribute[:]
            n.op_type = "Identity"
        else:
            what = "class scores" if k[0] == "vec" else "flattened feature map"
            self.fail(n, f"it reads the {what} and has no fully convolutional form; nofc "
                         "converts Gemm, MatMul(+Add), elementwise activations, "
                         "BatchNormalization and Softmax there")
        for o in n.output:
            self.kind[o] = k

    def dense(self, n, k):
        from onnx import helper

        a, b = n.input[0], n.input[1]
        if a not in self.kind or b not in self.consts:
            self.fail(n, "nofc needs the features as its first input and constant weights "
                         "as its second")
        w = self.consts[b]
        if w.ndim != 2:
            self.fail(n, f"its weight has shape {w.shape}, not (in, out)")
        bias, out_name, fold = None, n.output[0], None
        if n.op_type == "Gemm":
            if _attr(n, "transA", 0):
                self.fail(n, "transA=1 transposes the features; nofc converts transA=0 only")
            w = w if _attr(n, "transB", 0) else w.T  # (out, in)
            w = w * np.asarray(_attr(n, "alpha", 1.0), dtype=w.dtype)
            if len(n.input) > 2 and n.input[2]:
                if n.input[2] not in self.consts:
                    self.fail(n, "its bias C is not a constant")
                bias = self.consts[n.input[2]] * np.asarray(_attr(n, "beta", 1.0), w.dtype)
        else:
            w = w.T
            users = self.consumers.get(n.output[0], [])
            if len(users) == 1 and users[0].op_type == "Add" and \
                    n.output[0] not in {o.name for o in self.g.output}:
                other = [i for i in users[0].input if i != n.output[0]]
                if len(other) == 1 and other[0] in self.consts:
                    bias, out_name, fold = self.consts[other[0]], users[0].output[0], users[0]
        out = w.shape[0]
        if bias is not None:
            if bias.size == 1:
                bias = np.full(out, bias.reshape(()), dtype=w.dtype)
            elif bias.shape not in ((out,), (1, out)):
                self.fail(fold or n, f"its bias has shape {bias.shape}; nofc needs one "
                                     f"value per output ({out},)")
            bias = bias.reshape(out).astype(w.dtype)
        if k[0] == "map":
            _, c, h, wd, perm = k
            if w.shape[1] != c * h * wd:
                self.fail(n, f"it expects {w.shape[1]} features but the feature map is "
                             f"{c}x{h}x{wd} = {c * h * wd}; is input_size the training size?")
            t_dims = [(c, h, wd)[p - 1] for p in perm[1:]]
            kernel = w.reshape(out, *t_dims).transpose([0] + [perm.index(j) for j in (1, 2, 3)])
        else:
            if w.shape[1] != k[1]:
                self.fail(n, f"it expects {w.shape[1]} features but gets {k[1]}")
            kernel, h, wd = w.reshape(out, k[1], 1, 1), 1, 1
        base = n.name or n.output[0]
        inputs = [a, self.const(f"{base}_conv_weight", kernel)]
        if bias is not None:
            inputs.append(self.const(f"{base}_conv_bias", bias))
        conv = helper.make_node("Conv", inputs, [out_name], name=n.name or None,
                                kernel_shape=[h, wd], strides=[1, 1])
        n.CopyFrom(conv)
        self.kind[out_name] = ("vec", out)
        if fold is not None:
            self.drop.add((fold.op_type, fold.output[0]))

    def binary(self, n, vector, k):
        for i, name in enumerate(n.input):
            if name in vector:
                if self.kind[name][:2] != k[:2]:
                    self.fail(n, "it combines tensors of different shapes")
                continue
            c = self.consts.get(name)
            if c is None:
                self.fail(n, f"its input '{name}' is neither constant nor from the head")
            if c.size == 1:
                continue
            if k[0] == "vec" and c.shape in ((k[1],), (1, k[1])):
                new = self.const(f"{name}_per_channel", c.reshape(k[1], 1, 1))
                n.input[i] = new
            elif n.op_type == "PRelu" and k[0] == "vec" and c.shape == (k[1], 1, 1):
                continue
            else:
                self.fail(n, f"its constant '{name}' has shape {c.shape}; nofc handles "
                             "scalars and one value per feature of the class scores")
        for o in n.output:
            self.kind[o] = k


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
    onnx = _onnx()
    found = {}
    for scale in (1, 2):
        probe = copy.deepcopy(model)
        _set_input_dims(_graph_input(probe.graph), _image_dims(
            layout, 1, size[0], size[1] * scale, size[2] * scale))
        try:
            inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True,
                                                         data_prop=True)
        except Exception as exc:  # noqa: BLE001
            first = first_line(exc)
            raise NofcError(f"the converted graph does not run on a {size[0]}x"
                            f"{size[1] * scale}x{size[2] * scale} input: {first}; some node "
                            "before the head depends on the input size") from None
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            if vi.name in names:
                found[(vi.name, scale)] = tuple(d.dim_value if d.HasField("dim_value")
                                                else None
                                                for d in vi.type.tensor_type.shape.dim)
    return found


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
    onnx = _onnx()
    size = check_input_size(input_size)
    if pooling not in ("window", "global"):
        raise NofcError(f"pooling must be 'window' or 'global', got {pooling!r}")
    if output is not None:
        refuse_overwrite(output, force=force)
    m = _load(model)
    g = m.graph
    inp = _graph_input(g)
    layout = _input_layout(inp, size)
    _check_input(inp, size, layout)
    conv = _Converter(m, size, pooling, layout)
    outs = conv.run()
    nodes = [copy.deepcopy(n) for n in g.node if (n.op_type, n.output[0]) not in conv.drop]
    # inserted nodes go right after their input's producer (topological order)
    for extra in conv.extra_nodes:
        at = next((i + 1 for i, n in enumerate(nodes) if extra.input[0] in n.output), 0)
        nodes.insert(at, extra)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(conv.new_inits)
    _clean(g)
    del g.value_info[:]
    dims = inp.type.tensor_type.shape.dim
    batch = dims[0].dim_param if len(dims) and dims[0].dim_param else "batch"
    _set_input_dims(inp, _image_dims(layout, batch, size[0], "height", "width"))
    for o in outs:
        _set_input_dims(o, (batch, conv.kind[o.name][1], "map_height", "map_width"))
    try:
        onnx.checker.check_model(m)
    except Exception as exc:  # noqa: BLE001
        if m.ByteSize() < 2**31:
            first = first_line(exc)
            raise NofcError(f"internal: the converted graph fails onnx.checker: {first}"
                            ) from None
    found = _check_runs(m, size, {o.name for o in outs}, layout)
    for o in outs:
        ref = found.get((o.name, 1))
        if ref is not None and ref[2:] != (1, 1):
            raise NofcError(f"internal: output '{o.name}' is {ref} at the reference size")
        big = found.get((o.name, 2))
        if pooling == "window" and big is not None and None not in big and (
                big[0] != 1 or 1 in big[2:]):
            raise NofcError(
                f"on a {size[0]}x{2 * size[1]}x{2 * size[2]} input the converted graph gives "
                f"'{o.name}' the shape {big}, not a map of windows: a node before the head "
                "fixes the size (a Reshape, Resize or Slice with constant shapes?)")
    if output is not None:
        from .export import save_onnx

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
    from .verification import VerifyReport

    try:
        import onnxruntime as ort
    except ImportError:
        raise NofcError("checking ONNX models needs onnxruntime: pip install "
                        "'nofc[onnx]'") from None
    size = check_input_size(input_size)
    a_model, b_model = _load(model), _load(fcn)
    layout = _input_layout(_graph_input(a_model.graph), size)
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
