"""ONNX straight into a map: an ONNX graph run in onnxruntime as a network nofc maps with.

Flow: ``model.onnx`` -> :class:`OnnxNet` (the classifier, run in onnxruntime) ->
``convert_onnx`` (``nofc.onnx_import``: the same graph, fully convolutional) ->
:class:`OnnxNet` of the converted graph, whose geometry is read from its layers
(:func:`onnx_geometry`) -> ``dense_predict`` / ``tiled_predict`` -> sinks. So
``nofc heatmap model.onnx IMAGE``, ``dense_predict("model.onnx", ...)`` and
``tiled_predict("model.onnx", ...)`` make the same maps as the PyTorch path, tiles, masks
and sinks included, with nothing but onnx and onnxruntime.

The geometry is read layer by layer, as ``nofc.geometry`` reads a PyTorch network: every
``Conv`` and pooling (kernel, stride, pads, dilation, ``auto_pad``, ``ceil_mode``) and
``Pad``; ops that act on each position alone (activations, batch normalisation, adds of
branches, channel concatenation, softmax over the channels) keep the map's geometry; a
global pooling inside the body (squeeze-and-excitation) is global context. A graph with
anything else that touches the map (a reshape into tokens, a resize) is refused in one
line. Where the walk says the map is exact, nine cells of a small map are checked against
the graph on their crops before it is believed.

>>> import torch, nofc
>>> scores = nofc.dense_predict(example_classifier(), torch.randn(1, 20, 16), (1, 8, 8))
>>> scores.shape
torch.Size([1, 3, 13, 9])
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import NofcError, check_input_size
from .layers import conv_output_size
from .onnx_import import convert_onnx, graph_input, load_onnx, verify_onnx
from .tolerance import passes, tolerance_for
from .windows import Geometry

__all__ = ["OnnxNet", "onnx_geometry", "is_onnx", "example_classifier"]

_SLIDING = {"Conv", "MaxPool", "AveragePool", "LpPool"}
_GLOBAL = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
           "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare"}
# ops whose output at each position depends on their inputs at that position only
_POINTWISE = {
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Gelu", "Erf", "Mish", "ThresholdedRelu", "Abs", "Neg", "Exp",
    "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Identity", "Dropout",
    "Cast", "Clip", "Swish", "BatchNormalization", "LRN", "Add", "Sub", "Mul", "Div", "Pow",
    "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Not", "Equal", "Less", "Greater",
    "Softmax", "LogSoftmax", "Hardmax", "Concat",
}
_CHANNEL_AXIS = {"Softmax", "LogSoftmax", "Hardmax", "Concat"}  # keep the map on axis 1 only
_WHOLE_MAP = {"InstanceNormalization", "MeanVarianceNormalization"}  # statistics over H, W


def is_onnx(model) -> bool:
    """An ONNX model nofc can run: an ``.onnx`` path, an ``onnx.ModelProto`` or an
    :class:`OnnxNet`.

    >>> is_onnx("model.onnx"), is_onnx(torch.nn.Identity())
    (True, False)
    """
    if isinstance(model, OnnxNet):
        return True
    if isinstance(model, (str, os.PathLike)):
        return str(model).lower().endswith(".onnx")
    return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")


class OnnxNet(nn.Module):
    """An ONNX graph run in onnxruntime as a module: ``(B, C, H, W)`` float32 in, the
    graph's first output out (``(B, K)`` for a classifier, ``(B, K, h, w)`` for a map).

    A classifier becomes a map with :meth:`converted`; a map states its own geometry
    (:meth:`geometry_for`), read from the graph. The graph travels with the module
    (pickled as bytes, the onnxruntime session made again where it is unpickled, as on a
    Dask worker); its SHA-256 is the buffer ``digest``, so a store's fingerprint knows
    which graph made it. A graph written channels-last (Keras, tf2onnx) is fed
    channels-last: callers always give ``(B, C, H, W)``.

    Args:
        model: a path to an ``.onnx`` file, an ``onnx.ModelProto`` or serialised bytes.
        layout: ``"nchw"`` or ``"nhwc"`` (default: read from a static input shape).
    """

    def __init__(self, model, *, layout: str | None = None):
        super().__init__()
        if isinstance(model, bytes):
            data, name = model, "the ONNX model"
        else:
            data = load_onnx(model).SerializeToString()
            name = Path(model).name if isinstance(model, (str, os.PathLike)) else "the ONNX model"
        self._bytes = data
        self.name = name
        proto = self.proto()
        vi = graph_input(proto.graph)
        self.input_name = vi.name
        self.input_dims = tuple(d.dim_value or None for d in vi.type.tensor_type.shape.dim)
        self.output_name = proto.graph.output[0].name
        self.output_rank = len(proto.graph.output[0].type.tensor_type.shape.dim)
        self.layout = layout or self._layout()
        self.register_buffer("digest", torch.tensor(
            list(hashlib.sha256(data).digest()), dtype=torch.uint8))
        self._session = None
        self._geometries: dict = {}

    def proto(self):
        """The graph as an ``onnx.ModelProto``."""
        return load_onnx_bytes(self._bytes)

    def _layout(self) -> str:
        dims = self.input_dims
        if len(dims) == 4 and dims[3] in (1, 3, 4) and dims[1] not in (None, 1, 3, 4):
            return "nhwc"
        return "nchw"

    def input_size(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` from a static input shape, else None.

        >>> OnnxNet(example_classifier()).input_size()
        (1, 8, 8)
        """
        if len(self.input_dims) != 4:
            return None
        n, *rest = self.input_dims
        c, h, w = (rest[2], rest[0], rest[1]) if self.layout == "nhwc" else rest
        return (c, h, w) if None not in (c, h, w) else None

    # -- running
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_session"] = None  # made again where the module arrives
        return state

    def __setstate__(self, state):
        super().__setstate__(state)

    def _run(self, arr: np.ndarray) -> np.ndarray:
        if self._session is None:
            try:
                import onnxruntime as ort
            except ImportError:
                raise NofcError("running ONNX models needs onnxruntime: pip install "
                                "'nofc[onnx]'") from None
            self._session = ort.InferenceSession(self._bytes,
                                                 providers=["CPUExecutionProvider"])
        if self.layout == "nhwc":
            arr = arr.transpose(0, 2, 3, 1)
        arr = np.ascontiguousarray(arr)
        if self.input_dims and self.input_dims[0] == 1 and arr.shape[0] > 1:
            return np.concatenate([self._run_one(arr[i:i + 1]) for i in range(len(arr))])
        return self._run_one(arr)

    def _run_one(self, arr: np.ndarray) -> np.ndarray:
        return self._session.run([self.output_name], {self.input_name: arr})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise NofcError(f"an ONNX network runs in float32 in onnxruntime, not "
                            f"{str(x.dtype).replace('torch.', '')}; leave dtype at float32")
        out = self._run(x.detach().cpu().numpy())
        return torch.from_numpy(out).to(x.device)

    # -- a classifier into a map
    def converted(self, input_size, *, check: bool = True) -> "OnnxNet":
        """The fully convolutional graph of this classifier (``convert_onnx``), checked
        against it at ``input_size`` in onnxruntime unless ``check`` is False.

        >>> net = OnnxNet(example_classifier()).converted((1, 8, 8))
        >>> net(torch.randn(2, 1, 12, 10)).shape
        torch.Size([2, 3, 5, 3])
        """
        size = check_input_size(input_size)
        if self.output_rank == 4:
            return self  # a map already
        proto = self.proto()
        fcn = convert_onnx(proto, size)
        if check:
            report = verify_onnx(proto, fcn, size)
            if not report.ok:
                raise NofcError(f"the converted ONNX graph of {self.name} differs from it at "
                                f"{size[1]}x{size[2]}: {report}")
        net = OnnxNet(fcn.SerializeToString(), layout=self.layout)
        net.name = self.name
        return net

    def geometry_for(self, input_size) -> Geometry:
        """The map's geometry, read from the graph (:func:`onnx_geometry`), remembered."""
        size = check_input_size(input_size)
        if size not in self._geometries:
            self._geometries[size] = onnx_geometry(self, size)
        return self._geometries[size]


def load_onnx_bytes(data: bytes):
    """An ``onnx.ModelProto`` from serialised bytes."""
    import onnx

    return onnx.load_from_string(data)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Slide:
    """One sliding ONNX op along both axes (a layer of ``Geometry._nodes``)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad_lo: tuple[int, int]
    pad_hi: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool = False
    same: bool = False  # auto_pad SAME_*: ceil(n / stride) cells, pads follow the size

    def out_size(self, n: int, axis: int) -> int:
        if self.same:
            return -(-n // self.stride[axis]) if n > 0 else 0
        return conv_output_size(n, self.kernel[axis], self.stride[axis], self.pad_lo[axis],
                                self.pad_hi[axis], self.dilation[axis], self.ceil_mode)


@dataclass(frozen=True)
class _Field:
    """A map's cells along y and x: spacing ``jump`` and cell 0's field ``[start,
    start + size)`` in image pixels."""

    jump: tuple[int, int] = (1, 1)
    start: tuple[int, int] = (0, 0)
    size: tuple[int, int] = (1, 1)

    def then(self, s: _Slide) -> "_Field":
        return _Field(tuple(self.jump[a] * s.stride[a] for a in (0, 1)),
                      tuple(self.start[a] - s.pad_lo[a] * self.jump[a] for a in (0, 1)),
                      tuple(self.size[a] + (s.kernel[a] - 1) * s.dilation[a] * self.jump[a]
                            for a in (0, 1)))

    @staticmethod
    def union(fields: list["_Field"]) -> "_Field":
        lo = tuple(min(f.start[a] for f in fields) for a in (0, 1))
        hi = tuple(max(f.start[a] + f.size[a] for f in fields) for a in (0, 1))
        return _Field(fields[0].jump, lo, (hi[0] - lo[0], hi[1] - lo[1]))


class _GraphWalk:
    """Every tensor of the graph: a map (its ``_Field``), global (computed from a pooling
    over the whole map), or neither (constants, shapes)."""

    def __init__(self, proto, size, layout: str):
        from onnx import numpy_helper

        self.g = proto.graph
        self.size = size
        self.consts = {t.name: numpy_helper.to_array(t) for t in self.g.initializer}
        self.fields: dict[str, _Field] = {}
        self.ref: dict[str, tuple[int, int]] = {}  # map sizes at the reference size
        self.glob: set[str] = set()
        self.nodes: list = []
        self.reasons: list[str] = []
        self.whole_image: list[str] = []
        self.lattice = False
        inp = graph_input(self.g).name
        self.pre_map = {inp} if layout == "nhwc" else set()  # fed channels-last
        if layout != "nhwc":
            self._map(inp, _Field(), size[1:], ("input", (), None))

    def _map(self, name, field: _Field, ref, record) -> None:
        self.fields[name] = field
        self.ref[name] = tuple(ref)
        self.nodes.append((name, *record))

    def run(self) -> str:
        for node in self.g.node:
            self._node(node)
        out = self.g.output[0].name
        if out not in self.fields:
            raise NofcError("cannot read the geometry of the ONNX graph: its first output is "
                            "not a map (convert the classifier first: nofc.convert_onnx)")
        return out

    def _node(self, node) -> None:
        if node.op_type == "Constant":
            from onnx import numpy_helper

            for a in node.attribute:
                if a.name == "value":
                    self.consts[node.output[0]] = numpy_helper.to_array(a.t)
            return
        ins = [i for i in node.input if i]
        maps = [i for i in ins if i in self.fields]
        label = f"ONNX node '{node.name or node.output[0]}' ({node.op_type})"
        if node.op_type == "Transpose" and ins and ins[0] in self.pre_map:
            if list(_attr(node, "perm", [])) != [0, 3, 1, 2]:
                raise NofcError(f"cannot read the geometry of the ONNX graph: {label} "
                                "transposes the channels-last input in an unexpected order")
            self._map(node.output[0], _Field(), self.size[1:], ("input", (), None))
            return
        if not maps:
            if any(i in self.glob for i in ins) or node.op_type in _GLOBAL:
                self.glob.update(node.output)
            elif node.op_type in _REDUCE and ins and ins[0] in self.glob:
                self.glob.update(node.output)
            return  # constants and shape arithmetic
        if node.op_type == "Shape":
            return  # reads the map's size, is no map
        if node.op_type in _GLOBAL or (node.op_type in _REDUCE and _spatial_axes(node)):
            self._global(node, label)
            return
        if node.op_type in _WHOLE_MAP:
            self._global(node, label)
            self._same(node, maps, label)
            return
        if node.op_type in _SLIDING or node.op_type == "Pad":
            if len(maps) != 1 or maps[0] != ins[0]:
                raise NofcError(f"cannot read the geometry of the ONNX graph: {label} slides "
                                "over a weight computed from the map")
            self._slide(node, ins, label)
            return
        if node.op_type in _POINTWISE:
            if node.op_type in _CHANNEL_AXIS and _attr(node, "axis", 1) not in (1, -3):
                raise NofcError(f"cannot read the geometry of the ONNX graph: {label} works "
                                f"along axis {_attr(node, 'axis', 1)}, not the channels")
            self._same(node, maps, label)
            return
        raise NofcError(f"cannot read the geometry of the ONNX graph: {label} changes the "
                        "map in a way nofc cannot read (it reads Conv, pooling, Pad and ops "
                        "that act on each position alone); convert the PyTorch model instead")

    def _global(self, node, label: str) -> None:
        self.glob.update(node.output)
        self.reasons.append(f"{label} pools over the whole image (global context)")
        self.whole_image.append(self.reasons[-1])

    def _same(self, node, maps: list[str], label: str) -> None:
        fields = [self.fields[m] for m in maps]
        if len({f.jump for f in fields}) > 1:
            raise NofcError(f"cannot read the geometry of the ONNX graph: the inputs of "
                            f"{label} have different strides "
                            f"({', '.join(str(f.jump) for f in fields)})")
        if any(i in self.glob for i in node.input):
            self.reasons.append(f"{label} mixes the map with a pooling over the whole image "
                                "(global context)")
            self.whole_image.append(self.reasons[-1])
        out = node.output[0]
        kind = "merge" if len(maps) > 1 else "same"
        self._map(out, _Field.union(fields), self.ref[maps[0]], (kind, tuple(maps), None))

    def _slide(self, node, ins: list[str], label: str) -> None:
        src = ins[0]
        ref = self.ref[src]
        if node.op_type == "Pad":
            pads = self._const(ins[1] if len(ins) > 1 else None, label) \
                if len(ins) > 1 else _attr(node, "pads", [])
            pads = [int(p) for p in pads]
            if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)):
                raise NofcError(f"cannot read the geometry of the ONNX graph: {label} pads "
                                "other axes than height and width")
            s = _Slide((1, 1), (1, 1), (pads[2], pads[3]), (pads[6], pads[7]), (1, 1))
        else:
            s = self._sliding(node, ins, ref, label)
        self._map(node.output[0], self.fields[src].then(s),
                  (s.out_size(ref[0], 0), s.out_size(ref[1], 1)), ("layer", (src,), s))
        if max(*s.pad_lo, *s.pad_hi) > 0:
            self.reasons.append(f"{label} pads its input")
        if s.ceil_mode:
            self.reasons.append(f"{label} uses ceil_mode (partial windows at the border)")

    def _sliding(self, node, ins, ref, label: str) -> _Slide:
        kernel = _attr(node, "kernel_shape", None)
        if kernel is None and node.op_type == "Conv" and len(ins) > 1 and ins[1] in self.consts:
            kernel = self.consts[ins[1]].shape[2:]
        if kernel is None or len(kernel) != 2:
            raise NofcError(f"cannot read the geometry of the ONNX graph: {label} has no 2-D "
                            "kernel_shape nofc can read")
        k = tuple(int(v) for v in kernel)
        st = tuple(int(v) for v in _attr(node, "strides", [1, 1]))
        d = tuple(int(v) for v in _attr(node, "dilations", [1, 1]))
        pads = [int(v) for v in _attr(node, "pads", [0, 0, 0, 0])]
        auto = _attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        ceil = bool(_attr(node, "ceil_mode", 0))
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            total = [max((-(-ref[a] // st[a]) - 1) * st[a] + (k[a] - 1) * d[a] + 1 - ref[a], 0)
                     for a in (0, 1)]
            small = [t // 2 for t in total]
            lo = small if auto == "SAME_UPPER" else [t - t // 2 for t in total]
            if max(st) > 1:
                self.lattice = True  # its pads follow the size: the same on the lattice
            return _Slide(k, st, tuple(lo), tuple(t - p for t, p in zip(total, lo)), d,
                          ceil, same=True)
        if auto == "VALID":
            pads = [0, 0, 0, 0]
        return _Slide(k, st, (pads[0], pads[1]), (pads[2], pads[3]), d, ceil)

    def _const(self, name, label):
        if name not in self.consts:
            raise NofcError(f"cannot read the geometry of the ONNX graph: {label} pads by "
                            "amounts computed in the graph")
        return self.consts[name].tolist()


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _spatial_axes(node) -> bool:
    axes = _attr(node, "axes", None)
    return axes is None or any(a in (2, 3, -1, -2) for a in axes)


def onnx_geometry(net: OnnxNet, input_size) -> Geometry:
    """The geometry of a fully convolutional ONNX graph, read layer by layer; an exact
    claim is checked on the crops of a 3 x 3 map, the map's size at two image sizes
    against onnxruntime.

    >>> geo = onnx_geometry(OnnxNet(example_classifier()).converted((1, 8, 8)), (1, 8, 8))
    >>> geo.stride, geo.window, geo.exact, geo.receptive_field
    ((1, 1), (8, 8), True, (8, 8))
    """
    size = check_input_size(input_size)
    walk = _GraphWalk(net.proto(), size, net.layout)
    out = walk.run()
    final = walk.fields[out]
    geo = Geometry(final.jump, (0, 0), size[1:], not walk.reasons, final.size, final.start,
                   tuple(dict.fromkeys(walk.reasons)), lattice=walk.lattice,
                   global_context=tuple(dict.fromkeys(walk.whole_image)),
                   _nodes=tuple(walk.nodes), _output=out)
    if geo.network_shape(size[1:]) != (1, 1):
        raise NofcError(f"the ONNX map at the reference size {size[1]}x{size[2]} is "
                        f"{geo.network_shape(size[1:])}, not 1x1: is input_size={size} the "
                        "size the classifier was converted for?")
    return _checked(net, geo, size)


def _checked(net: OnnxNet, geo: Geometry, size) -> Geometry:
    """The map sizes the walk predicts against onnxruntime at two sizes, and an exact
    claim against the graph on the crops of a 3 x 3 map."""
    window, stride = size[1:], geo.stride
    hw = tuple(window[a] + 2 * stride[a] for a in (0, 1))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, size[0], *hw, generator=g)
    with torch.no_grad():
        y = net(x)
        odd = tuple(hw[a] + max(1, stride[a] // 2) for a in (0, 1))
        y_odd = net(torch.zeros(1, size[0], *odd))
    for got, at in ((y, hw), (y_odd, odd)):
        if tuple(got.shape[2:]) != geo.network_shape(at):
            raise NofcError(f"internal: the ONNX geometry predicts {geo.network_shape(at)} "
                            f"cells for a {at[0]}x{at[1]} image, onnxruntime gives "
                            f"{tuple(got.shape[2:])}")
    if not geo.exact or geo.lattice:
        return geo
    cells = [(i, j) for i in range(3) for j in range(3)]
    crops = torch.cat([x[:, :, i * stride[0]:i * stride[0] + window[0],
                         j * stride[1]:j * stride[1] + window[1]] for i, j in cells])
    with torch.no_grad():
        ref = net(crops)[:, :, 0, 0]
    got = torch.stack([y[0, :, i, j] for i, j in cells])
    max_abs, scale = float((ref - got).abs().max()), float(ref.abs().max())
    if passes(*tolerance_for(torch.float32), max_abs, scale):
        return geo
    return Geometry(geo.stride, geo.offset, geo.window, False, geo.receptive_field,
                    geo.rf_offset, (f"map cells differ from the graph on their crops "
                                    f"(measured: max error {max_abs / max(1.0, scale):.1e} "
                                    "of the largest output)",),
                    _nodes=geo._nodes, _output=geo._output)


def example_classifier():
    """A 1x8x8 -> 3 ONNX classifier (Conv 3x3, ReLU, Flatten, Gemm, random weights), for
    examples and tests."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((3, 4 * 6 * 6)).astype(np.float32), "fc")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]),
         helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w, fc])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
