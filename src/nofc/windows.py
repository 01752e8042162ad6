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

Steps. A map computed with a step finer than the stride (shift-and-stitch) keeps the same
windows, ``step`` pixels apart. ``Geometry`` is the one place that knows what a step does:
``check_step`` validates it, and ``output_shape``, ``boxes``, ``centers`` and ``extent``
take ``step=`` (default: the stride).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ._fx import (
    ANY_STRIDE,
    NodeFailure,
    bind,
    describe_node,
    get_attr,
    global_pool,
    pair,
    param_like,
    probe,
    trace,
)
from .errors import NofcError, check_input_size, first_line
from .layers import DilatedPool2d, conv_output_size

__all__ = ["geometry", "Geometry", "parse_step"]


@dataclass(frozen=True)
class _Layer:
    """One sliding operation along one axis pair: kernel, stride, padding (lo, hi), ..."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad_lo: tuple[int, int]
    pad_hi: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False
    ceil_overhang: tuple[int, int] | None = None  # DilatedPool2d's; None: stride - 1

    def out_size(self, n: int, axis: int) -> int:
        reach = None if self.ceil_overhang is None else self.ceil_overhang[axis]
        return conv_output_size(n, self.kernel[axis], self.stride[axis], self.pad_lo[axis],
                                self.pad_hi[axis], self.dilation[axis], self.ceil_mode, reach)

    @property
    def padded(self) -> bool:
        """Padding adds pixels; a crop (``x[:, :, 1:-1]``: negative padding) does not."""
        return max(*self.pad_lo, *self.pad_hi) > 0


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

    @staticmethod
    def union(axes: list["_Axis"]) -> "_Axis":
        """The field of a node that merges maps of one stride: the union of theirs."""
        lo = tuple(min(g.start[a] for g in axes) for a in (0, 1))
        hi = tuple(max(g.start[a] + g.size[a] for g in axes) for a in (0, 1))
        return _Axis(axes[0].jump, lo, (hi[0] - lo[0], hi[1] - lo[1]))


def parse_step(step) -> tuple[int, int]:
    """A positive int or ``(sy, sx)`` as a pair of positive ints, or a NofcError.

    >>> parse_step(4), parse_step((2, 8))
    ((4, 4), (2, 8))
    """
    try:
        steps = (int(step), int(step)) if np.ndim(step) == 0 else tuple(int(s) for s in step)
    except (TypeError, ValueError):
        steps = ()
    if len(steps) != 2 or min(steps) < 1:
        raise NofcError(f"step must be a positive integer or (sy, sx), got {step!r}")
    return steps  # type: ignore[return-value]


def _hw(size) -> tuple[int, int]:
    try:
        t = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise NofcError(f"image size must be (H, W) integers, got {size!r}") from None
    if len(t) != 2:
        raise NofcError(f"image size must be (H, W), got {size!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class Geometry:
    """Stride, offset and window of a fully convolutional map (see the module docstring).

    >>> import torchvision, nofc
    >>> fcn = nofc.convert(torchvision.models.vgg16(), input_size=(3, 224, 224))
    >>> geo = nofc.geometry(fcn, input_size=(3, 224, 224))
    >>> geo.stride, geo.offset, geo.window, geo.exact
    ((32, 32), (0, 0), (224, 224), False)
    >>> geo.output_shape((384, 384)), geo.output_shape((384, 384), step=16)
    ((6, 6), (11, 11))
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
    measured: str = ""  # why the layers could not be read and the geometry was measured
    # the network runs only on images of the window plus a multiple of the stride (stride-2
    # branches that meet in an add, as in DLA, or that TensorFlow "same" padding kept in
    # step): every run is cropped to the largest such size (``fit``), losing no map cell
    lattice: bool = False
    _nodes: tuple = field(default=(), repr=False, compare=False)
    _output: str = field(default="", repr=False, compare=False)
    _shape_of: Any = field(default=None, repr=False, compare=False)  # measured geometry

    # -- steps
    def check_step(self, step=None) -> tuple[int, int]:
        """``(sy, sx)`` for ``step`` (None: the stride); a step must divide the stride.

        >>> import nofc
        >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
        >>> geo.check_step(), geo.check_step(2)
        ((4, 4), (2, 2))
        """
        if step is None:
            return self.stride
        steps = parse_step(step)
        for s, stride, axis in zip(steps, self.stride, "yx"):
            if stride % s:
                good = [d for d in range(1, stride + 1) if stride % d == 0]
                raise NofcError(
                    f"step {s} ({axis}) does not divide the network stride {stride}: steps "
                    f"that work are {', '.join(map(str, good))} (shift-and-stitch for the "
                    "smaller ones)")
        return steps

    def factors(self, step=None) -> tuple[int, int]:
        """How many shifted passes per axis a step needs: ``stride // step``."""
        steps = self.check_step(step)
        return (self.stride[0] // steps[0], self.stride[1] // steps[1])

    # -- sizes and places
    def output_shape(self, image_size, *, step=None) -> tuple[int, int]:
        """``(h, w)`` of the map for an ``(H, W)`` image (0 when the image is too small).

        With a step finer than the stride, the map is what every shifted pass fills:
        pass ``k`` (the image shifted by ``k`` steps) gives the cells ``k, k + f, ...``.
        """
        hw = _hw(image_size)
        steps = self.check_step(step)
        f = self.factors(steps)
        if f == (1, 1):
            return self._coarse_shape(hw)
        h = min(self._coarse_shape((hw[0] - k * steps[0], hw[1]))[0] * f[0] + k
                for k in range(f[0]))
        w = min(self._coarse_shape((hw[0], hw[1] - k * steps[1]))[1] * f[1] + k
                for k in range(f[1]))
        return (max(h, 0), max(w, 0))

    def _coarse_shape(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The map at the network stride, layer by layer (the nodes the walk recorded), or
        by a shape-only run where the geometry was measured; on the image ``fit`` keeps."""
        hw = self.fit(hw)
        if self._shape_of is not None:
            return self._shape_of(hw)
        h, w = self._sizes(hw)[self._output]
        return (max(h, 0), max(w, 0))

    def _sizes(self, hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Every map node's ``(H, W)`` for an ``hw`` image, layer by layer."""
        sizes: dict[str, tuple[int, int]] = {}
        for name, kind, srcs, layer in self._nodes:
            if kind == "input":
                sizes[name] = tuple(hw)
            elif kind == "layer":
                h, w = sizes[srcs[0]]
                sizes[name] = (layer.out_size(h, 0), layer.out_size(w, 1))
            else:  # "same" or "merge": the size of its map inputs
                sizes[name] = sizes[srcs[0]]
        return sizes

    def _starts(self, image_size, step) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.output_shape(image_size, step=step)
        sy, sx = self.check_step(step)
        return (self.offset[0] + sy * np.arange(h, dtype=np.int64),
                self.offset[1] + sx * np.arange(w, dtype=np.int64))

    def boxes(self, image_size, *, step=None) -> np.ndarray:
        """Integer array ``(h, w, 4)``: the window ``(y0, x0, y1, x1)`` of every map cell.

        Boxes can reach past the image only for networks with padding or ``ceil_mode``
        pooling whose map has cells for windows that do not fit.
        """
        y0, x0 = self._starts(image_size, step)
        out = np.empty((len(y0), len(x0), 4), dtype=np.int64)
        out[..., 0] = y0[:, None]
        out[..., 1] = x0[None, :]
        out[..., 2] = y0[:, None] + self.window[0]
        out[..., 3] = x0[None, :] + self.window[1]
        return out

    def centers(self, image_size, *, step=None) -> tuple[np.ndarray, np.ndarray]:
        """Window centres ``(ys, xs)`` in pixel coordinates (pixel i spans [i, i+1))."""
        y0, x0 = self._starts(image_size, step)
        return y0 + self.window[0] / 2, x0 + self.window[1] / 2

    def extent(self, map_shape, *, step=None) -> tuple[float, float, float, float]:
        """matplotlib ``extent`` (left, right, bottom, top) of an ``(h, w)`` map in pixels:
        each cell a ``step``-sized square centred on its window's centre. Any step works
        here: a map drawn every f-th cell has ``f`` times the step it was computed with.

        >>> import nofc
        >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
        >>> geo.extent((9, 3))
        (14.0, 26.0, 50.0, 14.0)
        """
        h, w = map_shape
        ty, tx = self.stride if step is None else parse_step(step)
        cy0 = self.offset[0] + self.window[0] / 2
        cx0 = self.offset[1] + self.window[1] / 2
        return (cx0 - tx / 2, cx0 + (w - 1) * tx + tx / 2,
                cy0 + (h - 1) * ty + ty / 2, cy0 - ty / 2)

    def span(self, axis: int, a: int, b: int, n: int, *, step=None) -> tuple[int, int, int]:
        """Input pixels ``[p0, p1)`` along ``axis`` (0: rows, 1: columns) from which the map
        cells ``a..b-1`` at ``step`` are computed exactly, in an image ``n`` pixels long,
        and the index of cell ``a`` in the map of that span (``skip``).

        ``p0`` is a multiple of the stride, so every layer's grid lines up with the whole
        image's; the span reaches as far as the receptive field of cell ``b - 1`` (clipped
        to the image, where the network's own padding takes over as on the whole image).
        With a step finer than the stride (shift-and-stitch) it keeps ``stride - step``
        more pixels before and a stride more after, for the shifted passes.

        >>> import nofc
        >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
        >>> geo.span(0, 8, 16, 100), geo.span(0, 8, 16, 100, step=2)
        ((32, 92, 0), (12, 66, 2))
        """
        stride, step_ = self.stride[axis], self.check_step(step)[axis]
        fine = stride // step_
        # from the start of cell a's field or window, whichever is first, to the end of
        # cell b-1's, whichever is last (a field can be smaller than the window: the
        # network still needs the whole window to give the cell)
        first = a * step_ + min(0, self.rf_offset[axis])
        last = (b - 1) * step_ + max(self.rf_offset[axis] + self.receptive_field[axis],
                                     self.window[axis])
        if fine > 1:
            first -= stride - step_
            last += stride
        p0 = max(0, (first // stride) * stride)
        if self.lattice:  # the span's length on the lattice too: window + k strides
            last = p0 + self.window[axis] + max(0, -(-(last - p0 - self.window[axis])
                                                     // stride)) * stride
        return p0, min(n, last), a - (p0 // stride) * fine

    def fit(self, image_size) -> tuple[int, int]:
        """The ``(H, W)`` the network runs on for an image of ``image_size``: the image
        itself, or for a ``lattice`` network the largest window plus a multiple of the
        stride inside it (the same map cells; the rows and columns past the last window
        reach only its receptive field, which a crop would pad).

        >>> import nofc
        >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
        >>> geo.fit((50, 41)), replace(geo, lattice=True).fit((50, 41))
        ((50, 41), (48, 40))
        """
        hw = _hw(image_size)
        if not self.lattice:
            return hw
        return tuple(hw[a] if hw[a] < self.window[a] else
                     self.window[a] + (hw[a] - self.window[a]) // self.stride[a] * self.stride[a]
                     for a in (0, 1))  # type: ignore[return-value]

    def min_size(self) -> tuple[int, int]:
        """The smallest ``(H, W)`` with at least one map cell."""
        return tuple(self.offset[a] + self.window[a] for a in (0, 1))  # type: ignore[return-value]

    def check_fits(self, image_size, what: str = "image") -> None:
        """Raise when an ``(H, W)`` image is smaller than one window."""
        hw, need = _hw(image_size), self.min_size()
        if hw[0] < need[0] or hw[1] < need[1]:
            raise NofcError(f"{what} is {hw[0]}x{hw[1]}, smaller than the {need[0]}x{need[1]} "
                            f"window; pad or resize it to at least {need[0]}x{need[1]}")

    def as_dict(self) -> dict:
        """Plain-Python form (for JSON next to saved score maps)."""
        return {
            "stride": list(self.stride), "offset": list(self.offset),
            "window": list(self.window), "exact": self.exact,
            "receptive_field": list(self.receptive_field), "rf_offset": list(self.rf_offset),
            "reasons": list(self.reasons), "measured": self.measured,
            "lattice": self.lattice,
            "box_convention": "cell (i, j) -> (y0, x0, y1, x1) = (oy + i*sy, ox + j*sx, "
                              "y0 + window_h, x0 + window_w), pixel rows y0..y1-1",
        }


# --------------------------------------------------------------------------- layer rules


def _conv_layer(kernel, stride, padding, dilation) -> _Layer:
    k, s, d = pair(kernel), pair(stride), pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            lo = hi = (0, 0)
        else:  # "same": PyTorch puts the extra pixel at the end
            total = [d[a] * (k[a] - 1) for a in (0, 1)]
            lo = (total[0] // 2, total[1] // 2)
            hi = (total[0] - lo[0], total[1] - lo[1])
    else:
        lo = hi = pair(padding)
    return _Layer(k, s, lo, hi, d)


def _pool_layer(kernel, stride, padding, dilation=1, ceil_mode=False) -> _Layer:
    k = pair(kernel)
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else pair(stride)
    p = pair(padding)
    return _Layer(k, s, p, p, pair(dilation), bool(ceil_mode))


def _pad_layer(left, right, top, bottom) -> _Layer:
    return _Layer((1, 1), (1, 1), (top, left), (bottom, right))


def spatial_slices(index) -> tuple[slice, slice] | None:
    """The (rows, columns) slices of ``x[index]`` on a 4D map when ``index`` keeps batch and
    channels whole and crops each spatial axis by a fixed amount at either end (start >= 0,
    stop None or negative, step >= 1): a crop that does not depend on the image size.

    >>> spatial_slices((slice(None), slice(None), slice(1, -1), slice(1, -1)))
    (slice(1, -1, None), slice(1, -1, None))
    >>> spatial_slices((Ellipsis, slice(2, None, 2))), spatial_slices((slice(0, 5),))
    ((slice(None, None, None), slice(2, None, 2)), None)
    """
    if not isinstance(index, tuple):
        index = (index,)
    if index.count(Ellipsis) == 1:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (5 - len(index)) + index[at + 1:]
    index = index + (slice(None),) * (4 - len(index))
    if len(index) != 4 or not all(isinstance(i, slice) for i in index):
        return None
    if index[0] != slice(None) or index[1] != slice(None):
        return None
    for sl in index[2:]:
        if not all(v is None or isinstance(v, int) for v in (sl.start, sl.stop, sl.step)):
            return None
        if (sl.start or 0) < 0 or (sl.stop is not None and sl.stop > 0) or (sl.step or 1) < 1:
            return None
    return index[2], index[3]


def _slice_layer(index) -> _Layer | None:
    """A fixed crop ``x[:, :, a:-b:s]``: a 1x1 window with negative padding and stride s."""
    sl = spatial_slices(index)
    if sl is None:
        return None
    return _Layer((1, 1), tuple(s.step or 1 for s in sl), tuple(-(s.start or 0) for s in sl),
                  tuple(s.stop or 0 for s in sl))


_PAD_MODULES = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)


def _module_layer(m: nn.Module) -> _Layer | None:
    if isinstance(m, nn.Conv2d):
        return _conv_layer(m.kernel_size, m.stride, m.padding, m.dilation)
    if isinstance(m, nn.MaxPool2d):
        return _pool_layer(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if isinstance(m, nn.AvgPool2d):
        return _pool_layer(m.kernel_size, m.stride, m.padding, 1, m.ceil_mode)
    if isinstance(m, DilatedPool2d):
        layer = _pool_layer(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        return replace(layer, ceil_overhang=m.ceil_overhang)
    if isinstance(m, _PAD_MODULES):
        return _pad_layer(*m.padding)
    return None


def _conv2d_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d's arguments (a builtin: ``inspect`` cannot read them)."""


def _avg_pool2d_signature(input, kernel_size, stride=None, padding=0, ceil_mode=False,
                          count_include_pad=True, divisor_override=None):
    """F.avg_pool2d's arguments (a builtin too)."""


def _function_layer(gm: fx.GraphModule, n: fx.Node) -> _Layer | None:
    if n.target is F.conv2d or n.target is torch.conv2d:
        a = bind(_conv2d_signature, n)
        w = a.get("weight")
        if not a or not isinstance(w, fx.Node) or w.op != "get_attr":
            return None
        kernel = tuple(get_attr(gm, w.target).shape[2:])
        return _conv_layer(kernel, a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1))
    if n.target in (F.max_pool2d, torch.max_pool2d):
        a = bind(F._max_pool2d, n)  # F.max_pool2d's own signature is (*args, **kwargs)
        if not a:
            return None
        return _pool_layer(a["kernel_size"], a.get("stride"), a.get("padding", 0),
                           a.get("dilation", 1), a.get("ceil_mode", False))
    if n.target in (F.avg_pool2d, torch._C._nn.avg_pool2d):
        a = bind(_avg_pool2d_signature, n)
        if not a:
            return None
        return _pool_layer(a["kernel_size"], a.get("stride"), a.get("padding", 0), 1,
                           a.get("ceil_mode", False))
    if n.target is operator.getitem:
        return _slice_layer(n.args[1] if len(n.args) > 1 else None)
    if n.target is F.pad:
        pad = tuple(bind(F.pad, n).get("pad", ()))
        if len(pad) in (2, 4):
            return _pad_layer(*(pad + (0, 0) * ((4 - len(pad)) // 2)))
    return None


def _computed(layer: _Layer) -> bool:
    """True when a kernel, stride or padding is a value computed in the graph (a pad to
    the next multiple of a window size), not a number nofc can read."""
    return not all(isinstance(v, (int, bool)) for f in (layer.kernel, layer.stride,
                   layer.pad_lo, layer.pad_hi, layer.dilation) for v in f)


def _layer_of(gm: fx.GraphModule, n: fx.Node) -> _Layer | None:
    """The sliding-window layer ``n`` is, or None when it is not one."""
    if n.op == "call_module":
        return _module_layer(gm.get_submodule(n.target))
    if n.op == "call_function":
        return _function_layer(gm, n)
    return None


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


# --------------------------------------------------------------------------- geometry()


def geometry(fcn: nn.Module, input_size) -> Geometry:
    """Derive stride, offset, window and exactness of a converted network.

    Three phases: probe the network's shapes at three input sizes, walk the graph layer
    by layer, and check the result against the probes.

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
    size = check_input_size(input_size)
    gm = fcn if isinstance(fcn, fx.GraphModule) else trace(fcn)
    record = getattr(fcn, "_nofc_record", None)
    dilated = getattr(fcn, "_nofc_dilation", None)
    # a dilated network may have no cell at the window size itself (ceil_mode pooling):
    # probe it a stride of the original network larger
    sizes, probes, lattice = _probe_sizes(gm, size, dilated.stride if dilated else (0, 0))
    walk = _Walk(gm, probes, set(getattr(record, "global_context", []) or []))
    try:
        walk.run()
    except _Unreadable as unreadable:
        if dilated is not None:
            raise NofcError(f"cannot derive the geometry of a dilated network: {unreadable}") \
                from None
        plan = getattr(record, "plan", None)
        context = [plan.context_reason(name) if plan else f"'{name}' pools over the whole "
                   "image" for name in sorted(walk.global_context)]
        geo = _measured(gm, size, sizes, probes, why=str(unreadable), context=context)
        return replace(geo, lattice=lattice)
    geo = replace(walk.result(size, dilated=dilated is not None), lattice=lattice)
    for hw, p in zip(sizes, probes):
        got = walk.spatial(p, walk.out_name)
        if got != geo.output_shape(hw):
            raise NofcError(f"internal: geometry predicts {geo.output_shape(hw)} cells for a "
                            f"{hw[0]}x{hw[1]} input, the network gives {got}")
    return geo


def cached_geometry(fcn: nn.Module, size) -> Geometry:
    """geometry() remembered on the module, so repeated calls do not re-probe."""
    cache = fcn.__dict__.setdefault("_nofc_geometry_cache", {})
    if size not in cache:
        cache[size] = geometry(fcn, size)
    return cache[size]


def _probe_sizes(gm: fx.GraphModule, size, extra=(0, 0)) -> tuple[list, list, bool]:
    """Shapes of every node at the reference size (plus ``extra``) and at two larger sizes
    the map must follow: odd ones, so that a layer that needs even sizes shows itself; for
    a network that only runs at multiples of its stride (residual adds of stride-2
    branches, window attention, patch reshapes), multiples of the reference size; for one
    that only runs at the reference size plus a multiple of its stride (branches that
    TensorFlow "same" padding keeps in step), such sizes. True with the last two: the
    network runs on a lattice of sizes (``Geometry.lattice``)."""
    ref = (size[1] + extra[0], size[2] + extra[1])
    failure = None
    for i, larger in enumerate((
                   [(2 * size[1] + 3, 2 * size[2] + 5), (3 * size[1] + 1, 3 * size[2])],
                   [(2 * size[1], 3 * size[2]), (3 * size[1], 2 * size[2])],
                   [(ref[0] + ANY_STRIDE, ref[1] + 2 * ANY_STRIDE),
                    (ref[0] + 2 * ANY_STRIDE, ref[1] + ANY_STRIDE)])):
        sizes = [ref, *larger]
        probes = []
        for hw in sizes:
            try:
                probes.append(probe(gm, (1, size[0], *hw), param_like(gm)[1]))
            except NodeFailure as f:
                failure = failure or (f, hw)
                break
        else:
            return sizes, probes, i > 0
    f, hw = failure
    raise NofcError(f"cannot derive the geometry: {describe_node(gm, f.node)} fails on "
                    f"a {size[0]}x{hw[0]}x{hw[1]} input ({first_line(f.exc)})") from None


class _Unreadable(Exception):
    """A node whose effect on the map nofc cannot read from its arguments: geometry is
    then measured instead (``_measured``)."""


class _Walk:
    """Walks the graph once, giving every node with a spatial map its ``_Axis``."""

    def __init__(self, gm: fx.GraphModule, probes: list, global_context: set[str]):
        self.gm = gm
        self.probes = probes
        self.global_context = global_context
        self.axes: dict[str, _Axis | None] = {}  # None: no spatial geometry
        self.layout: dict[str, tuple[int, int]] = {}  # where H and W are, when not (2, 3)
        self.nodes: list = []
        self.reasons: list[str] = []
        self.out_name = ""

    def spatial(self, p, name: str, dims=None) -> tuple[int, int] | None:
        """(H, W) of node ``name`` in probe ``p``; of every item of a tuple of maps
        (``chunk``, ``split``) when they share it."""
        dims = dims or self.layout.get(name, (2, 3))
        if name in p.items:
            hw = {_spatial(s, dims) for s in p.items[name]}
            return hw.pop() if len(hw) == 1 else None
        return _spatial(p.shapes.get(name), dims)

    def run(self) -> None:
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                if self.axes:
                    raise NofcError("cannot derive the geometry of a network with several "
                                    "inputs")
                self.axes[n.name] = _Axis()
                self.nodes.append((n.name, "input", (), None))
            elif n.op == "get_attr":
                self.axes[n.name] = None
            elif n.op == "output":
                self._output(n)
            else:
                self._node(n)

    def _output(self, n: fx.Node) -> None:
        src = _output_node(self.gm)
        if not isinstance(src, fx.Node) or self.axes.get(src.name) is None:
            raise NofcError("cannot derive the geometry: the network's output is not a map")
        self.out_name = src.name

    def _node(self, n: fx.Node) -> None:
        ins = [a for a in n.all_input_nodes if self.axes.get(a.name) is not None]
        if not ins:
            self.axes[n.name] = None
            return
        if all(p.shapes.get(n.name) is None and n.name not in p.items for p in self.probes):
            self.axes[n.name] = None  # x.ndim, x.shape, x.size(): reads the map, is no map
            return
        label = describe_node(self.gm, n)
        if self._global(n, label):
            return
        try:
            layer = _layer_of(self.gm, n)
        except (TypeError, KeyError, ValueError, AttributeError):
            raise _Unreadable(f"{label} slides by amounts computed from the input size") \
                from None
        if layer is not None and _computed(layer):
            raise _Unreadable(f"{label} slides by amounts computed from the input size")
        if layer is not None:
            if len(ins) != 1 or self.layout.get(ins[0].name, (2, 3)) != (2, 3):
                raise _Unreadable(f"{label} has several map inputs or a channels-last input")
            self.axes[n.name] = self.axes[ins[0].name].then(layer)
            self.nodes.append((n.name, "layer", (ins[0].name,), layer))
            if layer.padded:
                self.reasons.append(f"{label} pads its input")
            if layer.ceil_mode:
                self.reasons.append(f"{label} uses ceil_mode (partial windows at the border)")
            return
        self._same_size(n, ins, label)

    def _global(self, n: fx.Node, label: str) -> bool:
        """Global pooling: kept on purpose (squeeze-and-excitation) or a refusal."""
        name = n.target if n.op == "call_module" else n.name
        kept = name in self.global_context or n.name in self.global_context
        if not kept and not (global_pool(self.gm, n) is not None and all(
                self.spatial(p, n.name) in ((1, 1), None) for p in self.probes)):
            return False
        if not kept:
            raise NofcError(
                f"{label} pools over the whole map, so the output does not grow with the "
                "input; convert with pooling='window' to get one cell per window")
        self.axes[n.name] = None
        self.reasons.append(f"{label} pools over the whole image (global context)")
        return True

    def _same_size(self, n: fx.Node, ins: list, label: str) -> None:
        """Any other op must keep the spatial size of its map inputs at every probe size."""
        maps = [a for a in ins if all(self.spatial(p, a.name) is not None for p in self.probes)]
        spatial_maps = [a for a in maps
                        if any(self.spatial(p, a.name) != (1, 1) for p in self.probes)] or maps
        dims = (_permuted(n, self.layout.get(spatial_maps[0].name, (2, 3)))
                if spatial_maps else (2, 3))
        for p in self.probes:
            out = self.spatial(p, n.name, dims)
            if out is None or any(self.spatial(p, a.name) != out for a in maps
                                  if self.spatial(p, a.name) != (1, 1) or out == (1, 1)):
                raise _Unreadable(f"{label} changes the map in a way nofc cannot read from "
                                  "its arguments")
        self.layout[n.name] = dims
        geo = [self.axes[a.name] for a in spatial_maps]
        if len({g.jump for g in geo}) > 1:
            raise _Unreadable(f"the inputs of {label} have different strides "
                              f"({', '.join(str(g.jump) for g in geo)})")
        self.axes[n.name] = _Axis.union(geo)
        self.nodes.append((n.name, "merge" if len(spatial_maps) > 1 else "same",
                           tuple(a.name for a in spatial_maps), None))

    def result(self, size, dilated: bool = False) -> Geometry:
        """The Geometry of the output, once the map is 1 x 1 at the reference size (at
        least 1 x 1 for a dilated network, whose padding can give more cells there)."""
        final = self.axes[self.out_name]
        ref = self.spatial(self.probes[0], self.out_name)
        if ref != (1, 1) and not (dilated and ref is not None and min(ref) >= 1):
            raise NofcError(f"the map at the reference size {size[1]}x{size[2]} is {ref}, not "
                            f"1x1: is input_size={size} the size the classifier was converted "
                            "for?")
        # the grids of crop and image line up when a crop starts at a multiple of the stride
        window = (size[1], size[2])
        reasons = self.reasons
        exact = not reasons
        if exact and any(final.start[a] < 0 or final.start[a] + final.size[a] > window[a]
                         for a in (0, 1)):  # pragma: no cover - cannot happen without padding
            exact = False
            reasons = [*reasons, "the receptive field reaches outside the window"]
        return Geometry(final.jump, (0, 0), window, exact, final.size, final.start,
                        tuple(dict.fromkeys(reasons)), _nodes=tuple(self.nodes),
                        _output=self.out_name)


# --------------------------------------------------------------------------- measured


def _measured(gm: fx.GraphModule, size, sizes: list, probes: list, *, why: str,
              context: list[str]) -> Geometry:
    """Geometry measured by running the network, for graphs with a layer nofc cannot read
    (a reshape into tokens and back, an upsampling branch, a weight computed in the graph).

    * map sizes: a shape-only run at each image size asked for (``_ProbedShape``);
    * stride: from the map sizes at the window plus a large multiple of every usual
      stride, checked at the window plus 1 and 5 strides;
    * receptive field: the input pixels with a nonzero gradient for a middle cell, over
      two random images in the network's dtype, on images of 3 windows a side and then at
      least ``_FIELD`` pixels (where the activations fit ``_MEMORY``); a field that fills
      the whole input at two sizes, or that cannot be bounded, is global context;
    * exactness: the cells of a 3 x 3 map against the network on their crops, in float64
      where the network runs in it (as ``verify`` does).
    """
    out = _output_node(gm)
    shape_of = _ProbedShape(gm, size[0], out.name)
    window = (size[1], size[2])
    if shape_of(window) != (1, 1):
        raise NofcError(f"cannot derive the geometry: {why}, and the map at the reference "
                        f"size {size[1]}x{size[2]} is {shape_of(window)}, not 1x1")
    try:
        far = shape_of((window[0] + ANY_STRIDE, window[1] + ANY_STRIDE))
    except NofcError as exc:  # attention in blocks of several strides (HaloNet), ...
        raise NofcError(f"cannot derive the geometry: {why}, and {exc}: that is the window "
                        f"plus {ANY_STRIDE} pixels, a multiple of every usual stride, so the "
                        "network needs image sizes in coarser steps than nofc can map"
                        ) from None
    if far == (1, 1):
        raise NofcError(f"cannot derive the geometry: {why}, and the map stays 1x1 at any "
                        "input size (a global pooling: convert with pooling='window')")
    stride = tuple(ANY_STRIDE // (far[a] - 1)
                   if far[a] > 1 and ANY_STRIDE % (far[a] - 1) == 0 else 0 for a in (0, 1))
    try:
        grows = min(stride) >= 1 and all(
            shape_of((window[0] + k * stride[0], window[1] + k * stride[1])) == (1 + k, 1 + k)
            for k in (1, 5))
    except NofcError as exc:  # MobileViT's 2x2 patches of the last map: steps of 2 strides
        raise NofcError(f"cannot derive the geometry: {why}, and {exc}: that is the window "
                        f"plus whole strides ({stride[0]}x{stride[1]}), so the network needs "
                        "image sizes in coarser steps than its stride, which nofc cannot map"
                        ) from None
    if not grows:
        raise NofcError(f"cannot derive the geometry: {why}, and the map does not grow by "
                        f"one cell per fixed number of pixels (at "
                        f"{window[0] + ANY_STRIDE}x{window[1] + ANY_STRIDE} it is "
                        f"{far[0]}x{far[1]})")
    reasons = [f"{c} (global context)" for c in context[:3]]
    if len(context) > 3:
        reasons.append(f"and {len(context) - 3} more layers with global context")
    margin = tuple(-(-window[a] // stride[a]) for a in (0, 1))  # strides in a window
    touched = []  # borders of the image the field touches, per size tried
    for grow in (1, max(2, -(-_FIELD // (2 * max(window))))):  # 3 windows, then 5 or more
        # with global context known from the layers, the field is the whole image
        # anyway: measure it on a 3 x 3 map, not on 3 windows (SAM2's 896-pixel Hiera)
        cells = (3, 3) if reasons else tuple(2 * grow * margin[a] + 1 for a in (0, 1))
        wanted = tuple(window[a] + (cells[a] - 1) * stride[a] for a in (0, 1))
        if touched and saved * wanted[0] * wanted[1] / (hw[0] * hw[1]) > _MEMORY:
            break  # measuring further would need more memory than a geometry should
        hw = wanted
        (rf_offset, rf), edges, saved = _dependence(gm, size[0], hw, stride)
        touched.append(edges)
        if reasons or not edges:  # global context known already, or the whole field seen
            break
    if not reasons and touched[-2:] == [4, 4]:
        reasons.append(f"{why}: every map cell depends on every input pixel (measured at "
                       f"{hw[0]}x{hw[1]} and smaller), so cells see the whole image "
                       "(global context)")
    elif not reasons and touched[-1]:
        reasons.append(f"{why}: the receptive field reaches past a {hw[0]}x{hw[1]} image, "
                       "so nofc cannot bound it and treats it as global context")
    if not reasons and (min(rf_offset) < 0 or any(rf_offset[a] + rf[a] > window[a]
                                                   for a in (0, 1))):
        reasons.append(f"the receptive field (measured: {rf[0]}x{rf[1]} from "
                       f"{rf_offset[0]},{rf_offset[1]}) reaches outside the window")
    if not reasons:
        from .verification import _DEFAULT_TOL, _passes  # verify's rule (it imports us)

        net, dtype = _runnable(gm, size)
        max_abs, scale = _crop_error(net, size, window, stride, dtype)
        if not _passes(*_DEFAULT_TOL.get(dtype, _DEFAULT_TOL[torch.float32]), max_abs, scale):
            reasons.append(f"map cells differ from the network on their crops (measured: max "
                           f"error {max_abs / max(1.0, scale):.1e} of the largest output), "
                           f"and {why}")
    return Geometry(stride, (0, 0), window, not reasons, rf, rf_offset, tuple(reasons),
                    measured=why, _output=out.name, _shape_of=shape_of)


_MEMORY = 3e9  # bytes of activations a measurement may keep for its backward pass
_FIELD = 1024  # receptive fields up to about this many pixels are measured, even for a
# small window; larger ones, like attention over the whole image, count as global context


class _ProbedShape:
    """The map size for any image size, by a shape-only run of the network (remembered);
    a NofcError for a size the network does not run at."""

    def __init__(self, gm: fx.GraphModule, channels: int, out_name: str):
        self.gm, self.channels, self.out_name = gm, channels, out_name
        self.known: dict[tuple[int, int], tuple[int, int]] = {}

    def __call__(self, hw: tuple[int, int]) -> tuple[int, int]:
        hw = (int(hw[0]), int(hw[1]))
        if hw not in self.known:
            try:
                rec = probe(self.gm, (1, self.channels, *hw))
            except NodeFailure as f:
                raise NofcError(f"the network does not run on a {hw[0]}x{hw[1]} image: "
                                f"{describe_node(self.gm, f.node)} fails "
                                f"({first_line(f.exc)})") from None
            got = _spatial(rec.shapes.get(self.out_name)) or (0, 0)
            self.known[hw] = got
        return self.known[hw]


def _output_node(gm: fx.GraphModule) -> fx.Node:
    src = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    while isinstance(src, (tuple, list)) and src:
        src = src[0]
    return src


def _runnable(gm: fx.GraphModule, size):
    """A float64 copy of the network and float64 where it runs in float64, else the
    network itself and its dtype."""
    device, dtype = param_like(gm)
    try:
        net = copy.deepcopy(gm).double().eval()
        with torch.no_grad():
            net(torch.zeros(1, *size, dtype=torch.float64, device=device))
        return net, torch.float64
    except Exception:  # noqa: BLE001 - e.g. a float32 constant in the graph: measure as is
        return gm.eval(), dtype


def _first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _dependence(net, channels: int, hw, stride):
    """((rf_offset), (rf)) of the middle cell, measured by gradients over two random
    images, how many of the image's four borders that field touches, and the bytes the
    backward pass kept."""
    device, dtype = param_like(net)
    seen = torch.zeros(hw, dtype=torch.bool, device=device)
    cell = (0, 0)
    saved = [0]

    def count(t):
        saved[0] += t.numel() * t.element_size()
        return t

    for seed in (0, 1):
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(1, channels, *hw, generator=g, dtype=dtype).to(device).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            y = _first(net(x))
        cell = (y.shape[2] // 2, y.shape[3] // 2)
        y[0, :, cell[0], cell[1]].sum().backward()
        seen |= (x.grad[0] != 0).any(0)
    rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
    if len(rows) == 0:
        return ((0, 0), (1, 1)), 0, saved[0] // 2
    lo = (int(rows[0]), int(cols[0]))
    hi = (int(rows[-1]) + 1, int(cols[-1]) + 1)
    edges = (lo[0] == 0) + (lo[1] == 0) + (hi[0] == hw[0]) + (hi[1] == hw[1])
    start = (cell[0] * stride[0], cell[1] * stride[1])
    return ((lo[0] - start[0], lo[1] - start[1]), (hi[0] - lo[0], hi[1] - lo[1])), edges, \
        saved[0] // 2


def _crop_error(net, size, window, stride, dtype) -> tuple[float, float]:
    """Largest difference between the cells of a 3 x 3 map and the network on their
    crops, and the largest |crop output| (the scale verify's tolerance rule takes)."""
    device, _ = param_like(net)
    hw = (window[0] + 2 * stride[0], window[1] + 2 * stride[1])
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(1, size[0], *hw, generator=g, dtype=dtype).to(device)
    with torch.no_grad():
        y = _first(net(x))
        cells = [(i, j) for i in range(y.shape[2]) for j in range(y.shape[3])]
        crops = torch.cat([x[:, :, i * stride[0]:i * stride[0] + window[0],
                             j * stride[1]:j * stride[1] + window[1]] for i, j in cells])
        ref = _first(net(crops))[:, :, 0, 0]
        got = torch.stack([y[0, :, i, j] for i, j in cells])
    return float((ref - got).abs().max()), float(ref.abs().max())
