"""Which input window each cell of a fully convolutional map saw.

Convention. A converted network with reference input size ``(C, H, W)`` gives one map
cell per input window of that size. Cell ``(i, j)`` stands for the window

    ``(y0, x0, y1, x1) = (oy + i*sy, ox + j*sx, oy + i*sy + H, ox + j*sx + W)``

with ``stride = (sy, sx)``, ``offset = (oy, ox)`` and ``window = (H, W)``: the classifier
run on that crop gives the cell's value whenever ``exact`` is True (no padding, no
``ceil_mode`` pooling, no global context such as squeeze-and-excitation). With padding the
cell and the crop differ near the borders the crop does not share with the image; the
grids still line up, so the box is still the crop to compare with, and
``nofc.verify(model, fcn, input_size, image=...)`` measures how far apart they are.

``receptive_field`` and ``rf_offset`` are the region of the input that can influence
cell (0, 0) (``rf_offset`` is negative when padding reaches outside the image); it can be
larger than the window (VGG16: 404 > 224, padding) or smaller (pooling that floors).

Everything is derived from the layers (kernel, stride, padding, dilation, ceil_mode of
every convolution and pooling, walking the torch.fx graph; branches must agree on the
stride) and checked against shape probes on fake tensors at several input sizes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .convert import (
    _check_input_size,
    _describe_node,
    _NodeFailure,
    _param_like,
    _ShapeRecorder,
    _trace,
)
from .errors import NofcError

__all__ = ["geometry", "Geometry"]


@dataclass(frozen=True)
class _Layer:
    """One sliding operation along one axis pair: kernel, stride, padding (lo, hi), ..."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad_lo: tuple[int, int]
    pad_hi: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    def out_size(self, n: int, axis: int) -> int:
        k = self.dilation[axis] * (self.kernel[axis] - 1) + 1
        s = self.stride[axis]
        span = n + self.pad_lo[axis] + self.pad_hi[axis] - k
        if not self.ceil_mode:
            return span // s + 1 if span >= 0 else 0
        # ceil_mode: a window longer than the input still gives a cell when it starts inside
        out = max(0, -(-span // s) + 1)
        # PyTorch: the last window must start inside the input or the left padding
        if (out - 1) * s >= n + self.pad_lo[axis]:
            out -= 1
        return out

    @property
    def padded(self) -> bool:
        return any(self.pad_lo) or any(self.pad_hi)


@dataclass(frozen=True)
class _Axis:
    """Geometry of a node's map along y and x: cell spacing, first cell's field."""

    jump: tuple[int, int] = (1, 1)
    start: tuple[int, int] = (0, 0)  # top-left of cell (0, 0)'s receptive field
    size: tuple[int, int] = (1, 1)  # receptive field size

    def then(self, layer: _Layer) -> "_Axis":
        j, s, r = self.jump, self.start, self.size
        k = [layer.dilation[a] * (layer.kernel[a] - 1) + 1 for a in (0, 1)]
        return _Axis(
            (j[0] * layer.stride[0], j[1] * layer.stride[1]),
            (s[0] - layer.pad_lo[0] * j[0], s[1] - layer.pad_lo[1] * j[1]),
            (r[0] + (k[0] - 1) * j[0], r[1] + (k[1] - 1) * j[1]),
        )


@dataclass(frozen=True)
class Geometry:
    """Stride, offset and window of a fully convolutional map (see the module docstring).

    >>> import torchvision, nofc
    >>> fcn = nofc.convert(torchvision.models.vgg16(), input_size=(3, 224, 224))
    >>> geo = nofc.geometry(fcn, input_size=(3, 224, 224))
    >>> geo.stride, geo.offset, geo.window, geo.exact
    ((32, 32), (0, 0), (224, 224), False)
    >>> geo.output_shape((384, 384))
    (6, 6)
    >>> geo.boxes((384, 384)).shape
    (6, 6, 4)
    """

    stride: tuple[int, int]
    offset: tuple[int, int]
    window: tuple[int, int]
    exact: bool
    receptive_field: tuple[int, int]
    rf_offset: tuple[int, int]
    reasons: tuple[str, ...] = ()  # why not exact
    _nodes: tuple = field(default=(), repr=False, compare=False)
    _output: str = field(default="", repr=False, compare=False)

    def output_shape(self, image_size) -> tuple[int, int]:
        """``(h, w)`` of the map for an ``(H, W)`` image (0 when the image is too small)."""
        hw = _hw(image_size)
        sizes: dict[str, tuple[int, int]] = {}
        for name, kind, srcs, layer in self._nodes:
            if kind == "input":
                sizes[name] = hw
            elif kind == "layer":
                h, w = sizes[srcs[0]]
                sizes[name] = (layer.out_size(h, 0), layer.out_size(w, 1))
            elif kind in ("same", "merge"):
                sizes[name] = sizes[srcs[0]]
        h, w = sizes[self._output]
        return (max(h, 0), max(w, 0))

    def boxes(self, image_size) -> np.ndarray:
        """Integer array ``(h, w, 4)``: the window ``(y0, x0, y1, x1)`` of every map cell.

        Boxes can reach past the image only for networks with padding or ``ceil_mode``
        pooling whose map has cells for windows that do not fit.
        """
        h, w = self.output_shape(image_size)
        y0 = self.offset[0] + self.stride[0] * np.arange(h, dtype=np.int64)
        x0 = self.offset[1] + self.stride[1] * np.arange(w, dtype=np.int64)
        out = np.empty((h, w, 4), dtype=np.int64)
        out[..., 0] = y0[:, None]
        out[..., 1] = x0[None, :]
        out[..., 2] = y0[:, None] + self.window[0]
        out[..., 3] = x0[None, :] + self.window[1]
        return out

    def centers(self, image_size) -> tuple[np.ndarray, np.ndarray]:
        """Window centres ``(ys, xs)`` in pixel coordinates (pixel i spans [i, i+1))."""
        h, w = self.output_shape(image_size)
        ys = self.offset[0] + self.stride[0] * np.arange(h) + self.window[0] / 2
        xs = self.offset[1] + self.stride[1] * np.arange(w) + self.window[1] / 2
        return ys, xs

    def min_size(self) -> tuple[int, int]:
        """The smallest ``(H, W)`` with at least one map cell."""
        return tuple(self.offset[a] + self.window[a] for a in (0, 1))  # type: ignore[return-value]

    def as_dict(self) -> dict:
        """Plain-Python form (for JSON next to saved score maps)."""
        return {
            "stride": list(self.stride), "offset": list(self.offset),
            "window": list(self.window), "exact": self.exact,
            "receptive_field": list(self.receptive_field), "rf_offset": list(self.rf_offset),
            "reasons": list(self.reasons),
            "box_convention": "cell (i, j) -> (y0, x0, y1, x1) = (oy + i*sy, ox + j*sx, "
                              "y0 + window_h, x0 + window_w), pixel rows y0..y1-1",
        }


def _hw(size) -> tuple[int, int]:
    try:
        t = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise NofcError(f"image size must be (H, W) integers, got {size!r}") from None
    if len(t) != 2:
        raise NofcError(f"image size must be (H, W), got {size!r}")
    return t  # type: ignore[return-value]


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _conv_layer(kernel, stride, padding, dilation) -> _Layer:
    k, s, d = _pair(kernel), _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            lo = hi = (0, 0)
        else:  # "same": PyTorch puts the extra pixel at the end
            total = [d[a] * (k[a] - 1) for a in (0, 1)]
            lo = (total[0] // 2, total[1] // 2)
            hi = (total[0] - lo[0], total[1] - lo[1])
    else:
        lo = hi = _pair(padding)
    return _Layer(k, s, lo, hi, d)


def _pool_layer(kernel, stride, padding, dilation=1, ceil_mode=False) -> _Layer:
    k = _pair(kernel)
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride)
    p = _pair(padding)
    return _Layer(k, s, p, p, _pair(dilation), bool(ceil_mode))


def _bind(fn, n: fx.Node) -> dict:
    try:
        sig = inspect.signature(fn)
        return dict(sig.bind(*n.args, **n.kwargs).arguments)
    except (TypeError, ValueError):
        return {}


_PAD_MODULES = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
_GLOBAL_FUNCS = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"}


def _layer_of(gm: fx.GraphModule, n: fx.Node) -> _Layer | None:
    """The sliding-window layer ``n`` is, or None when it is not one."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Conv2d):
            return _conv_layer(m.kernel_size, m.stride, m.padding, m.dilation)
        if isinstance(m, nn.MaxPool2d):
            return _pool_layer(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if isinstance(m, nn.AvgPool2d):
            return _pool_layer(m.kernel_size, m.stride, m.padding, 1, m.ceil_mode)
        if isinstance(m, _PAD_MODULES):
            left, right, top, bottom = m.padding
            return _Layer((1, 1), (1, 1), (top, left), (bottom, right))
        return None
    if n.op != "call_function":
        return None
    if n.target is F.conv2d or n.target is torch.conv2d:
        a = _bind(F.conv2d, n) if n.target is F.conv2d else {}
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        if not a or not isinstance(w, fx.Node) or w.op != "get_attr":
            return None
        kernel = tuple(_get_attr(gm, w.target).shape[2:])
        return _conv_layer(kernel, a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1))
    if n.target in (F.max_pool2d, torch.max_pool2d):
        a = _bind(F.max_pool2d, n)
        if not a:
            return None
        return _pool_layer(a["kernel_size"], a.get("stride"), a.get("padding", 0),
                           a.get("dilation", 1), a.get("ceil_mode", False))
    if n.target in (F.avg_pool2d, torch._C._nn.avg_pool2d):
        a = _bind(F.avg_pool2d, n) if n.target is F.avg_pool2d else {}
        if not a:
            return None
        return _pool_layer(a["kernel_size"], a.get("stride"), a.get("padding", 0), 1,
                           a.get("ceil_mode", False))
    if n.target is F.pad:
        a = _bind(F.pad, n)
        pad = tuple(a.get("pad", ()))
        if len(pad) in (2, 4):
            pad = pad + (0, 0) * ((4 - len(pad)) // 2)
            left, right, top, bottom = pad
            return _Layer((1, 1), (1, 1), (top, left), (bottom, right))
    return None


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_global(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
    if n.op == "call_function":
        return getattr(n.target, "__name__", "") in _GLOBAL_FUNCS
    if n.op == "call_method":
        return n.target in ("mean", "amax", "sum")
    return False


def _probe_on(gm: fx.GraphModule, shape, device, dtype) -> _ShapeRecorder:
    """Shapes of every node for a fake input on the network's own device (CUDA, meta...)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rec = _ShapeRecorder(gm)
    with FakeTensorMode(allow_non_fake_inputs=True):
        rec.run(torch.empty(shape, dtype=dtype, device=device))
    return rec


def _spatial(shape, dims=(2, 3)) -> tuple[int, int] | None:
    """The (H, W) of a 4D shape whose spatial axes are at ``dims`` (NCHW: (2, 3))."""
    if shape is None or len(shape) != 4:
        return None
    return (shape[dims[0]], shape[dims[1]])


def _permuted(n: fx.Node, dims: tuple[int, int]) -> tuple[int, int]:
    """Where the spatial axes ``dims`` of the input go through ``n`` (a permute keeps
    NHWC blocks such as ConvNeXt's understandable); other ops keep them in place."""
    perm = None
    if n.op == "call_method" and n.target == "permute":
        perm = n.args[1:] if len(n.args) > 2 else n.args[1] if len(n.args) > 1 else None
    elif n.op == "call_function" and n.target is torch.permute:
        perm = n.args[1] if len(n.args) > 1 else n.kwargs.get("dims")
    if perm is None or len(perm) != 4 or not all(isinstance(d, int) for d in perm):
        return dims
    perm = [d % 4 for d in perm]
    return (perm.index(dims[0]), perm.index(dims[1]))


def geometry(fcn: nn.Module, input_size) -> Geometry:
    """Derive stride, offset, window and exactness of a converted network.

    Args:
        fcn: the result of ``nofc.convert`` (any fully convolutional module that torch.fx
            can trace works; ``(B, K, h, w)`` output).
        input_size: ``(C, H, W)`` the classifier was trained on.

    Raises:
        NofcError: a layer whose geometry is unknown (upsampling, a reshape of the map,
            ...), branches with different strides, or a map that does not grow with the
            input (global pooling kept).

    >>> import nofc
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
    >>> geo = nofc.geometry(fcn, input_size=(1, 32, 32))
    >>> geo.stride, geo.window, geo.exact, geo.output_shape((64, 40))
    ((4, 4), (32, 32), True, (9, 3))
    """
    size = _check_input_size(input_size)
    gm = fcn if isinstance(fcn, fx.GraphModule) else _trace(fcn)
    record = getattr(fcn, "_nofc_record", None)
    global_context = set(getattr(record, "global_context", []) or [])
    # Probes: the reference size, and two larger sizes the map must follow.
    probe_sizes = [size[1:], (2 * size[1] + 3, 2 * size[2] + 5), (3 * size[1] + 1, 3 * size[2])]
    probes = []
    device, dtype = _param_like(gm)
    for hw in probe_sizes:
        try:
            probes.append(_probe_on(gm, (1, size[0], *hw), device, dtype))
        except _NodeFailure as f:
            raise NofcError(f"cannot derive the geometry: {_describe_node(gm, f.node)} fails on "
                            f"a {size[0]}x{hw[0]}x{hw[1]} input ({str(f.exc).splitlines()[0]})"
                            ) from None

    axes: dict[str, _Axis | None] = {}  # None: no spatial geometry (scalars, global vectors)
    layout: dict[str, tuple[int, int]] = {}  # where H and W are, when not (2, 3)
    nodes: list = []
    reasons: list[str] = []
    out_name = ""
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if axes:
                raise NofcError("cannot derive the geometry of a network with several inputs")
            axes[n.name] = _Axis()
            nodes.append((n.name, "input", (), None))
            continue
        if n.op == "get_attr":
            axes[n.name] = None
            continue
        if n.op == "output":
            src = n.args[0]
            while isinstance(src, (tuple, list)) and src:
                src = src[0]
            if not isinstance(src, fx.Node) or axes.get(src.name) is None:
                raise NofcError("cannot derive the geometry: the network's output is not a map")
            out_name = src.name
            continue
        ins = [a for a in n.all_input_nodes if axes.get(a.name) is not None]
        if not ins:
            axes[n.name] = None
            continue
        label = _describe_node(gm, n)
        name = n.target if n.op == "call_module" else n.name
        if name in global_context or n.name in global_context or (
            _is_global(gm, n) and all(_spatial(p.shapes.get(n.name)) in ((1, 1), None)
                                      for p in probes)
        ):
            if name not in global_context and n.name not in global_context:
                raise NofcError(
                    f"{label} pools over the whole map, so the output does not grow with the "
                    "input; convert with pooling='window' to get one cell per window")
            axes[n.name] = None
            reasons.append(f"{label} pools over the whole image (global context)")
            continue
        layer = _layer_of(gm, n)
        if layer is not None:
            if len(ins) != 1 or layout.get(ins[0].name, (2, 3)) != (2, 3):
                raise NofcError(f"cannot derive the geometry: {label} has several map inputs "
                                "or a channels-last input")
            axes[n.name] = axes[ins[0].name].then(layer)
            nodes.append((n.name, "layer", (ins[0].name,), layer))
            if layer.padded:
                reasons.append(f"{label} pads its input")
            if layer.ceil_mode:
                reasons.append(f"{label} uses ceil_mode (partial windows at the border)")
            continue
        # Anything else must keep the spatial size of its map inputs at every probe size.
        def sp(p, node, dims=None):
            return _spatial(p.shapes.get(node.name), dims or layout.get(node.name, (2, 3)))

        maps = [a for a in ins if all(sp(p, a) is not None for p in probes)]
        spatial_maps = [a for a in maps if any(sp(p, a) != (1, 1) for p in probes)] or maps
        dims = _permuted(n, layout.get(spatial_maps[0].name, (2, 3))) if spatial_maps else (2, 3)
        for p in probes:
            out = sp(p, n, dims)
            if out is None or any(sp(p, a) != out for a in maps
                                  if sp(p, a) != (1, 1) or out == (1, 1)):
                raise NofcError(
                    f"cannot derive the geometry: {label} changes the map in a way nofc does "
                    "not know (only convolutions, pooling, padding, permutes and elementwise "
                    "or concatenating ops are understood)")
        layout[n.name] = dims
        geo = [axes[a.name] for a in spatial_maps]
        if len({g.jump for g in geo}) > 1:
            raise NofcError(
                f"cannot derive the geometry: the inputs of {label} have different strides "
                f"({', '.join(str(g.jump) for g in geo)})")
        lo = tuple(min(g.start[a] for g in geo) for a in (0, 1))
        hi = tuple(max(g.start[a] + g.size[a] for g in geo) for a in (0, 1))
        axes[n.name] = _Axis(geo[0].jump, lo, (hi[0] - lo[0], hi[1] - lo[1]))
        nodes.append((n.name, "merge" if len(spatial_maps) > 1 else "same",
                      tuple(a.name for a in spatial_maps), None))

    final = axes[out_name]
    ref = _spatial(probes[0].shapes.get(out_name), layout.get(out_name, (2, 3)))
    if ref != (1, 1):
        raise NofcError(f"the map at the reference size {size[1]}x{size[2]} is {ref}, not 1x1: "
                        f"is input_size={size} the size the classifier was converted for?")
    stride = final.jump
    offset = (0, 0)  # the grids of crop and image line up when a crop starts at a multiple
    window = (size[1], size[2])
    if record is not None and getattr(record, "global_context", None):
        pass  # reasons already list the pooling layers
    exact = not reasons
    if exact and any(final.start[a] < 0 or final.start[a] + final.size[a] > window[a]
                     for a in (0, 1)):  # pragma: no cover - cannot happen without padding
        exact = False
        reasons.append("the receptive field reaches outside the window")
    geo = Geometry(stride, offset, window, exact, final.size, final.start,
                   tuple(dict.fromkeys(reasons)), tuple(nodes), out_name)
    for hw, p in zip(probe_sizes, probes):
        got = _spatial(p.shapes.get(out_name), layout.get(out_name, (2, 3)))
        if got != geo.output_shape(hw):
            raise NofcError(f"internal: geometry predicts {geo.output_shape(hw)} cells for a "
                            f"{hw[0]}x{hw[1]} input, the network gives {got}")
    return geo

