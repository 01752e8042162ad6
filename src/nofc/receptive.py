"""The geometry of a map, derived from its layers: ``nofc.geometry``.

Everything is derived from the layers (kernel, stride, padding, dilation, ceil_mode of
every convolution and pooling, the factor and mode of every upsampling, walking the
torch.fx graph; branches must agree on the stride) and checked against shape probes on
fake tensors at several input sizes. An upsampling by ``f`` puts cells ``stride / f``
apart that repeat each coarse cell ``f`` times; the map is a lattice of one stride again
once a stride as coarse as the coarse map's follows (HRNet's fused branches).

The walk gives every node with a spatial map its receptive fields (``_Axis``) and records
the layers it went through (``Geometry._nodes``), which ``node_axes`` replays for parts of
the network (``nofc.streaming``'s stages). Where a node's effect on the map cannot be read
from its arguments, the geometry is measured instead (``nofc.measure``). The result is a
``nofc.windows.Geometry``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ._fx import (ANY_STRIDE, NodeFailure, bind, describe_node, get_attr, global_pool,
                  output_node, param_like, probe, spatial_size, trace, viewed, written)
from .errors import NofcError, check_input_size, first_line
from .layers import DilatedPool2d, conv_output_size, pair
from .measure import measured_geometry
from .windows import Geometry

__all__ = ["geometry", "cached_geometry", "node_axes", "spatial_slices"]


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
class _Upsample:
    """An upsampling by whole factors: every cell becomes ``factor`` cells, copies of it
    (``nearest``) or interpolated between it and its neighbour (``linear``: bilinear with
    ``align_corners=False``)."""

    factor: tuple[int, int]
    linear: bool

    def out_size(self, n: int, axis: int) -> int:
        return n * self.factor[axis]


_Fields = tuple[tuple[int, int], ...]  # per phase, a field [lo, hi) along one axis


@dataclass(frozen=True)
class _Axis:
    """Geometry of a node's map along y and x: cell spacing and the cells' fields.

    Cell ``i``'s receptive field is ``fields[a][i % phases]`` moved by ``i * jump``: one
    phase where the map is a lattice (every cell the same computation a jump further);
    more after an upsampling, whose ``f`` cells per coarse cell each see it from another
    place, until a stride as coarse as the coarse map's brings the lattice back.
    ``period`` is the jump times the phases: the shift of the image that shifts the map
    by whole repeats of its pattern.

    >>> coarse = _Axis().then(_Layer((4, 4), (4, 4), (0, 0), (0, 0)))  # 4x4, stride 4
    >>> up = coarse.upsampled(_Upsample((2, 2), linear=False))
    >>> up.jump, up.period, up.fields[0]  # cells 2 pixels apart, in pairs of copies
    ((2, 2), (4, 4), ((0, 4), (-2, 2)))
    >>> back = up.then(_Layer((2, 2), (2, 2), (0, 0), (0, 0)))  # a lattice again
    >>> back.jump, back.period, back.start, back.size
    ((4, 4), (4, 4), (0, 0), (4, 4))
    """

    jump: tuple[int, int] = (1, 1)
    fields: tuple[_Fields, _Fields] = (((0, 1),), ((0, 1),))

    @property
    def start(self) -> tuple[int, int]:
        """Top-left of the field of cell (0, 0), the earliest of its phases."""
        return tuple(min(lo for lo, _ in f) for f in self.fields)  # type: ignore[return-value]

    @property
    def size(self) -> tuple[int, int]:
        """Size of the field, from ``start`` to the last pixel any phase sees."""
        return tuple(max(hi for _, hi in f) - s
                     for f, s in zip(self.fields, self.start))  # type: ignore[return-value]

    @property
    def period(self) -> tuple[int, int]:
        return (self.jump[0] * len(self.fields[0]), self.jump[1] * len(self.fields[1]))

    def then(self, layer: _Layer) -> "_Axis":
        """Through a sliding window: output cell ``i`` reads input cells ``i * stride -
        pad + t * dilation`` for the kernel's taps ``t``."""
        axes = [_slide(self.jump[a], self.fields[a], layer.stride[a],
                       [-layer.pad_lo[a] + t * layer.dilation[a]
                        for t in range(layer.kernel[a])]) for a in (0, 1)]
        return _Axis((axes[0][0], axes[1][0]), (axes[0][1], axes[1][1]))

    def upsampled(self, up: _Upsample) -> "_Axis":
        """Through an upsampling; the jump must divide by its factor (the caller checks)."""
        axes = [_upsample_axis(self.jump[a], self.fields[a], up.factor[a], up.linear)
                for a in (0, 1)]
        return _Axis((axes[0][0], axes[1][0]), (axes[0][1], axes[1][1]))

    @staticmethod
    def union(axes: list["_Axis"]) -> "_Axis":
        """The field of a node that merges maps of one stride: the union of theirs, phase
        by phase (over the least common multiple of their periods)."""
        jump = axes[0].jump
        fields = []
        for a in (0, 1):
            phases = math.lcm(*(len(g.fields[a]) for g in axes))
            fields.append(tuple(
                (min(g.fields[a][m % len(g.fields[a])][0] for g in axes),
                 max(g.fields[a][m % len(g.fields[a])][1] for g in axes))
                for m in range(phases)))
        return _Axis(jump, (fields[0], fields[1]))


def _cover(jump: int, fields: _Fields, cells, origin: int) -> tuple[int, int]:
    """The union of the fields of input ``cells``, relative to pixel ``origin``."""
    p = len(fields)
    return (min(c * jump + fields[c % p][0] for c in cells) - origin,
            max(c * jump + fields[c % p][1] for c in cells) - origin)


def _slide(jump: int, fields: _Fields, stride: int, taps: list[int]) -> tuple[int, _Fields]:
    """One axis through a sliding window whose cell 0 reads the input cells ``taps``."""
    out_jump = jump * stride
    phases = math.lcm(jump * len(fields), out_jump) // out_jump
    return out_jump, tuple(_cover(jump, fields, [m * stride + t for t in taps], m * out_jump)
                           for m in range(phases))


def _upsample_axis(jump: int, fields: _Fields, f: int, linear: bool) -> tuple[int, _Fields]:
    """One axis through an upsampling by ``f``: fine cell ``m`` is coarse cell ``m // f``
    (nearest), or interpolates between coarse cells ``c`` and ``c + 1`` around the source
    position ``(m + 1/2) / f - 1/2`` (bilinear, ``align_corners=False``)."""
    out_jump = jump // f
    out = []
    for m in range(len(fields) * f):
        if linear:
            c = (2 * m + 1 - f) // (2 * f)
            # the second cell's weight is the distance past c: zero only on a coarse cell
            cells = [c] if (2 * m + 1 - f) % (2 * f) == 0 else [c, c + 1]
        else:
            cells = [m // f]
        out.append(_cover(jump, fields, cells, m * out_jump))
    return out_jump, tuple(out)


def node_axes(nodes, start: str | None = None) -> dict[str, _Axis]:
    """Every map node's field relative to node ``start`` (None: the image), replaying the
    walk's record (``Geometry._nodes``: name, kind, inputs, layer). Nodes that do not
    descend from ``start``, or that have no field from it (an upsampling of cells fewer
    pixels apart than its factor; a merge of maps of other strides), are left out.

    >>> import nofc
    >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
    >>> ax = node_axes(geo._nodes)[geo._output]
    >>> ax.jump, ax.start, ax.size
    ((4, 4), (0, 0), (32, 32))
    """
    ax: dict[str, _Axis] = {}
    for name, kind, srcs, layer in nodes:
        if (start is None and kind == "input") or name == start:
            ax[name] = _Axis()
        elif kind == "input" or not srcs or any(s not in ax for s in srcs):
            continue
        elif kind == "layer":
            ax[name] = ax[srcs[0]].then(layer)
        elif kind == "upsample":
            if all(ax[srcs[0]].jump[a] % layer.factor[a] == 0 for a in (0, 1)):
                ax[name] = ax[srcs[0]].upsampled(layer)
        else:  # "same" or "merge": the union of the inputs' fields (the walk's rule)
            geo = [ax[s] for s in srcs]
            if len({g.jump for g in geo}) == 1:
                ax[name] = _Axis.union(geo)
    return ax


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
    index = _index4(index)
    if index is None or not all(isinstance(i, slice) for i in index):
        return None
    if index[0] != slice(None) or index[1] != slice(None):
        return None
    for sl in index[2:]:
        if not all(v is None or isinstance(v, int) for v in (sl.start, sl.stop, sl.step)):
            return None
        if (sl.start or 0) < 0 or (sl.stop is not None and sl.stop > 0) or (sl.step or 1) < 1:
            return None
    return index[2], index[3]


def _index4(index) -> tuple | None:
    """``x[index]``'s index on a 4D tensor as four entries (``...`` and missing ones as
    ``:``); None for an index nofc does not read (a tensor, ``None``, several ``...``)."""
    if not isinstance(index, tuple):
        index = (index,)
    if index.count(Ellipsis) == 1:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (5 - len(index)) + index[at + 1:]
    index = index + (slice(None),) * (4 - len(index))
    if len(index) != 4 or not all(isinstance(i, (slice, int)) for i in index):
        return None
    return index


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


def _interpolate_args(gm: fx.GraphModule, n: fx.Node) -> dict | None:
    """The arguments of an upsampling node (``nn.Upsample``, ``F.interpolate``), None for
    any other node."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if not isinstance(m, nn.Upsample):  # UpsamplingNearest2d and Bilinear2d too
            return None
        return {"size": m.size, "scale_factor": m.scale_factor, "mode": m.mode,
                "align_corners": m.align_corners}
    if n.op == "call_function" and n.target is F.interpolate:
        return bind(F.interpolate, n) or {"size": "unknown"}
    return None


def _whole_power_of_two(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1
            and float(v).is_integer() and int(v) & (int(v) - 1) == 0)


def _upsampling(a: dict, label: str) -> _Upsample:
    """The upsampling with arguments ``a`` (``_interpolate_args``), or ``_Unreadable`` for
    one whose cells follow no rule nofc reads (then the geometry is measured).

    Read: ``nearest`` (and ``nearest-exact``) and ``bilinear`` with
    ``align_corners=False``, by a power of two (where PyTorch's sampling positions,
    ``(i + 1/2) / f - 1/2``, are exact in floating point).

    >>> _upsampling({"scale_factor": 4.0, "mode": "bilinear"}, "'up'")
    _Upsample(factor=(4, 4), linear=True)
    """
    if a.get("size") is not None:
        raise _Unreadable(f"{label} resizes the map to a given size, not by a fixed factor")
    sf = a.get("scale_factor")
    factors = tuple(sf) if isinstance(sf, (tuple, list)) else (sf, sf)
    if len(factors) != 2 or not all(_whole_power_of_two(f) for f in factors):
        raise _Unreadable(f"{label} scales the map by {sf}, not by a power of two (the "
                          "factors whose sampling positions nofc reads exactly)")
    mode = a.get("mode", "nearest")
    if mode not in ("nearest", "nearest-exact", "bilinear"):
        raise _Unreadable(f"{label} upsamples with mode {mode!r} (nofc reads 'nearest' and "
                          "'bilinear')")
    if a.get("align_corners"):
        raise _Unreadable(f"{label} upsamples with align_corners=True: where its cells "
                          "sample the map depends on the map's size, so they follow no "
                          "fixed stride")
    if a.get("antialias"):
        raise _Unreadable(f"{label} upsamples with antialias=True (nofc reads plain "
                          "interpolation)")
    return _Upsample((int(factors[0]), int(factors[1])), mode == "bilinear")


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
            can trace works; ``(B, K, h, w)`` output). A network that states its own
            geometry (``geometry_for(input_size)``, as ``nofc.crops.CropNet``) is taken
            at its word.
        input_size: ``(C, H, W)`` the classifier was trained on.

    Raises:
        NofcError: a layer whose geometry is unknown (a reshape of the map, an upsampling
            to a computed size, ...) where measuring it fails too, branches with different
            strides, or a map that does not grow with the input (global pooling kept).

    >>> import nofc
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
    >>> geo = nofc.geometry(fcn, input_size=(1, 32, 32))
    >>> geo.stride, geo.window, geo.exact, geo.output_shape((64, 40))
    ((4, 4), (32, 32), True, (9, 3))
    """
    size = check_input_size(input_size)
    own = getattr(fcn, "geometry_for", None)
    if callable(own):
        return own(size)
    gm = fcn if isinstance(fcn, fx.GraphModule) else trace(fcn)
    record = getattr(fcn, "_nofc_record", None)
    dilated = getattr(fcn, "_nofc_dilation", None)
    plan = getattr(record, "plan", None)
    fixed = any(r.kind == "fixed_pad" for r in getattr(plan, "replacements", ()))
    # a dilated network is probed from a stride of the original network past the window;
    # at the window itself it has a cell too (its ceil_mode pooling keeps PyTorch's rule:
    # no window starts past the input), and more where padding or ceil_mode pooling give
    # cells past the window, which ``_Walk.result`` allows
    sizes, probes, lattice = _probe_sizes(gm, size, dilated.stride if dilated else (0, 0),
                                          fixed_pads=fixed)
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
        geo = measured_geometry(gm, size, why=str(unreadable), context=context)
        if unreadable.inexact:  # the write is at fixed places of the map, not per window
            geo = replace(geo, exact=False, reasons=(*geo.reasons, f"{unreadable}: cells "
                                                     "depend on where their window lies"))
        return replace(geo, lattice=lattice)
    geo = replace(walk.result(size, dilated=dilated is not None), lattice=lattice)
    for hw, p in zip(sizes, probes):
        got = walk.spatial(p, walk.out_name)
        if got != geo.network_shape(hw):
            raise NofcError(f"internal: geometry predicts {geo.network_shape(hw)} cells for a "
                            f"{hw[0]}x{hw[1]} input, the network gives {got}")
    return geo


def cached_geometry(fcn: nn.Module, size) -> Geometry:
    """geometry() remembered on the module, so repeated calls do not re-probe."""
    cache = fcn.__dict__.setdefault("_nofc_geometry_cache", {})
    if size not in cache:
        cache[size] = geometry(fcn, size)
    return cache[size]


def _probe_sizes(gm: fx.GraphModule, size, extra=(0, 0), *,
                 fixed_pads: bool = False) -> tuple[list, list, bool]:
    """Shapes of every node at the reference size (plus ``extra``) and at two larger sizes
    the map must follow: odd ones, so that a layer that needs even sizes shows itself; for
    a network that only runs at multiples of its stride (residual adds of stride-2
    branches, window attention, patch reshapes), multiples of the reference size; for one
    that only runs at the reference size plus a multiple of its stride (branches that
    TensorFlow "same" padding keeps in step), such sizes. True with the last two: the
    network runs on a lattice of sizes (``Geometry.lattice``).

    A network whose input-size-dependent pads ``convert`` fixed at the reference size's
    amounts (``fixed_pads``: TensorFlow "same" padding, DaViT's pad to even sizes) is the
    original only on the lattice, though it may run off it with other pads than the
    original's: it is probed on the lattice only, and is a lattice network."""
    ref = (size[1] + extra[0], size[2] + extra[1])
    failure = None
    for i, larger in enumerate((
                   [(2 * size[1] + 3, 2 * size[2] + 5), (3 * size[1] + 1, 3 * size[2])],
                   [(2 * size[1], 3 * size[2]), (3 * size[1], 2 * size[2])],
                   [(ref[0] + ANY_STRIDE, ref[1] + 2 * ANY_STRIDE),
                    (ref[0] + 2 * ANY_STRIDE, ref[1] + ANY_STRIDE)])):
        if fixed_pads and i == 0:
            continue
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
    then measured instead (``measured_geometry``). ``inexact``: the node itself makes cells
    depend on where their window lies (a write into a fixed part of the map, as padding
    does), whatever a measurement on a few cells shows."""

    def __init__(self, message: str, *, inexact: bool = False):
        super().__init__(message)
        self.inexact = inexact


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
        self.whole_image: list[str] = []  # the reasons that are global context
        self.upsamplings: list[str] = []  # their labels, for a map they leave no lattice
        self.out_name = ""
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def spatial(self, p, name: str, dims=None) -> tuple[int, int] | None:
        """(H, W) of node ``name`` in probe ``p``; of every item of a tuple of maps
        (``chunk``, ``split``) when they share it."""
        dims = dims or self.layout.get(name, (2, 3))
        if name in p.items:
            hw = {spatial_size(s, dims) for s in p.items[name]}
            return hw.pop() if len(hw) == 1 else None
        return spatial_size(p.shapes.get(name), dims)

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
        src = output_node(self.gm)
        if not isinstance(src, fx.Node) or self.axes.get(src.name) is None:
            raise NofcError("cannot derive the geometry: the network's output is not a map")
        final = self.axes[src.name]
        if final.period != final.jump:
            p = (final.period[0] // final.jump[0], final.period[1] // final.jump[1])
            ups = self.upsamplings
            raise _Unreadable(
                f"{' and '.join(ups[:2])} upsample{'s' if len(ups) == 1 else ''} a coarser "
                f"map, and the output's cells come in groups of {p[0]}x{p[1]} that see the "
                "image from different places (no single stride)")
        self.out_name = src.name

    def _node(self, n: fx.Node) -> None:
        self._result(n)
        target = written(self.gm, n)
        if target is not None and self.axes.get(target.name) is not None:
            self._in_place(n, target)

    def _result(self, n: fx.Node) -> None:
        """The ``_Axis`` of ``n``'s result, from its inputs."""
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
            self._one_map(ins, label)
            self.axes[n.name] = self.axes[ins[0].name].then(layer)
            self.nodes.append((n.name, "layer", (ins[0].name,), layer))
            if layer.padded:
                self.reasons.append(f"{label} pads its input")
            if layer.ceil_mode:
                self.reasons.append(f"{label} uses ceil_mode (partial windows at the border)")
            return
        args = _interpolate_args(self.gm, n)
        # a resize to the map's own size (size=x.shape[2:], a factor 1) changes nothing:
        # the rule for any op that keeps the size takes it
        if args is not None and not (len(ins) == 1 and all(
                self.spatial(p, n.name) == self.spatial(p, ins[0].name) for p in self.probes)):
            self._upsample(n, ins, _upsampling(args, label), label)
            return
        self._same_size(n, ins, label)

    def _one_map(self, ins: list, label: str) -> None:
        """A layer's input must be one map, channels first."""
        if len(ins) != 1 or self.layout.get(ins[0].name, (2, 3)) != (2, 3):
            raise _Unreadable(f"{label} has several map inputs or a channels-last input")

    def _upsample(self, n: fx.Node, ins: list, up: _Upsample, label: str) -> None:
        """Cells ``jump / f`` pixels apart: whole pixels, and ``f`` times the input's
        cells at every probe size."""
        self._one_map(ins, label)
        axis = self.axes[ins[0].name]
        if any(axis.jump[a] % up.factor[a] for a in (0, 1)):
            raise _Unreadable(f"{label} upsamples a map of stride {axis.jump[0]}x"
                              f"{axis.jump[1]} by {up.factor[0]}x{up.factor[1]}: its cells "
                              "would not be whole pixels apart")
        for p in self.probes:
            hw = self.spatial(p, ins[0].name)
            if hw is None or self.spatial(p, n.name) != (up.out_size(hw[0], 0),
                                                         up.out_size(hw[1], 1)):
                raise _Unreadable(f"{label} changes the map in a way nofc cannot read from "
                                  "its arguments")
        self.axes[n.name] = axis.upsampled(up)
        self.nodes.append((n.name, "upsample", (ins[0].name,), up))
        self.upsamplings.append(label)
        if up.linear:
            self.reasons.append(f"{label} interpolates bilinearly, repeating the border cells "
                                "at the map's edges (as padding does)")

    def _in_place(self, n: fx.Node, target: fx.Node) -> None:
        """``n`` writes into the map ``target`` (``x.mul_(g)``, ``x[:, :2] += y``): nodes
        that read that map (or a view of it) after ``n`` see the write, though the graph
        links them to the map as it was before it.

        That changes nothing the walk records when the write keeps the map's geometry (a
        gain, an in-place ReLU, channels): otherwise, when such a later reader exists, the
        write is a part of the map (the field is no longer the same everywhere) or brings
        in a wider field, and the geometry is measured.
        """
        root, part = target, False
        while (parent := viewed(self.gm, root)) is not None and \
                self.axes.get(parent.name) is not None:
            part = part or self.axes[root.name] != self.axes[parent.name]  # a crop's view
            root = parent
        if n.op == "call_function" and n.target is operator.setitem:
            dims = self.layout.get(target.name, (2, 3))
            index = _index4(n.args[1]) if len(n.args) > 1 else None
            part = part or index is None or any(index[d] != slice(None) for d in dims)
            value = n.args[2] if len(n.args) > 2 else None
            brought = ([self.axes[value.name]] if isinstance(value, fx.Node)
                       and self.axes.get(value.name) is not None else [])
        else:
            brought = [self.axes[n.name]] if self.axes.get(n.name) is not None else []
        field = [self.axes[root.name], *brought]
        if not part and len({g.jump for g in field}) == 1 and \
                _Axis.union(field) == self.axes[root.name]:
            return  # the map keeps its geometry
        later = [u for u in self._aliases(root, n) if self.order[u] > self.order[n]]
        if later:
            what = "a part of the map" if part else "the map"
            raise _Unreadable(f"{describe_node(self.gm, n)} writes in place into {what} "
                              f"{root.name!r}, which {describe_node(self.gm, later[0])} reads "
                              "later", inexact=part)

    def _aliases(self, root: fx.Node, skip: fx.Node) -> list[fx.Node]:
        """The nodes that read ``root`` or a view of it (not through ``skip``)."""
        seen, todo, readers = {root}, [root], []
        while todo:
            for u in todo.pop().users:
                if u is skip or u in seen:
                    continue
                seen.add(u)
                readers.append(u)
                if viewed(self.gm, u) is not None:
                    todo.append(u)
        return readers

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
        self.whole_image.append(self.reasons[-1])
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
        least 1 x 1 for a dilated network, whose padding or ceil_mode pooling can give more
        cells there)."""
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
                        _output=self.out_name,
                        global_context=tuple(dict.fromkeys(self.whole_image)))
