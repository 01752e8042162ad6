"""Dilated ("à trous") networks: the map at a step finer than the stride, in one pass.

Shift-and-stitch runs the network ``(stride/step)**2`` times on shifted images and
recomputes the early layers every time. The dilated network computes every intermediate
value once (filter rarefaction in Long et al., d-regularly sparse kernels in Li et al.
arXiv 1412.4526, atrous convolution in DeepLab): from the layer where the accumulated
stride reaches the step, strided layers keep only the stride that still fits in the step,
and every later kernel (convolution, pooling, the converted fc6, the windowed pooling that
replaced a global pool) is dilated by the stride that was removed, its padding too. A
layer whose input map has spacing ``t`` pixels while the original network's has ``J``
(``t = gcd(J, step)`` on every path, so residual branches always agree) runs with

    ``dilation *= J // t``, ``padding *= J // t``, ``stride = gcd(J * stride, step) // t``.

Without padding the dilated map equals shift-and-stitch, and so the classifier on every
crop. With zero padding the two differ at the map's borders, for different reasons:
shift-and-stitch pads each shifted image where the dilated pass sees real pixels.

Two steps, as in ``nofc.conversion``: :func:`plan` reads the graph and the geometry and
decides, layer by layer, what changes (or why it cannot), changing nothing; :func:`apply`
builds a new ``GraphModule`` that shares the parameters of the original.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ._fx import describe_node, get_attr, probe, remember, trace
from .conversion import as_fcn
from .errors import NofcError, check_input_size
from .layers import DilatedPool2d, pair
from .receptive import cached_geometry, spatial_slices
from .windows import Geometry

__all__ = ["dilate", "plan", "apply", "DilationPlan", "fine_pass", "METHODS"]

METHODS = ("auto", "dilate", "shift")


@dataclass(frozen=True)
class Change:
    """One layer of the dilated network: its node, how much it is dilated, its stride."""

    node: str
    label: str
    rate: tuple[int, int]  # kernel dilation and padding are multiplied by this
    stride: tuple[int, int]  # the stride it keeps


@dataclass(frozen=True)
class DilationPlan:
    """What dilating a network for ``step`` changes, or why it cannot (``refusal``).

    ``exact`` is True when the dilated map equals shift-and-stitch to rounding (no
    padding; ``ceil_mode`` is fine); ``differs`` says why not.
    """

    step: tuple[int, int]
    stride: tuple[int, int]  # of the original network
    changes: tuple[Change, ...] = ()
    refusal: str = ""
    differs: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return not self.refusal and not self.differs

    def __str__(self) -> str:
        head = (f"dilated for step {self.step[0]}x{self.step[1]} (network stride "
                f"{self.stride[0]}x{self.stride[1]})")
        if self.refusal:
            return f"{head}: not possible, {self.refusal}"
        rows = [f"  {c.label}: dilation x{c.rate[0]}x{c.rate[1]}, stride "
                f"{c.stride[0]}x{c.stride[1]}" for c in self.changes]
        note = "equals shift-and-stitch" if self.exact else "differs from shift-and-stitch " \
            f"at the borders ({self.differs[0]})"
        return "\n".join([f"{head}, {note}:", *rows])


# --------------------------------------------------------------------------- plan


def plan(gm: fx.GraphModule, geo: Geometry, step) -> DilationPlan:
    """Which layers change, and how, for a map at ``step`` (changes nothing).

    >>> import nofc
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32))
    >>> print(plan(fcn, nofc.geometry(fcn, (1, 32, 32)), 1))
    dilated for step 1x1 (network stride 4x4), equals shift-and-stitch:
      's2' (AvgPool2d): dilation x1x1, stride 1x1
      'c3' (Conv2d): dilation x2x2, stride 1x1
      's4' (AvgPool2d): dilation x2x2, stride 1x1
      'c5' (Conv2d): dilation x4x4, stride 1x1
    """
    steps = geo.check_step(step)
    base = DilationPlan(steps, geo.stride)
    if geo.global_context:
        return _refused(base, "the network pools over the whole image inside its body "
                              "(global context), which one dilated pass cannot split by shift")
    if geo.measured:
        return _refused(base, f"its geometry was measured, not read layer by layer "
                              f"({geo.measured}), so nofc does not know which layers to dilate")
    nodes = {n.name: n for n in gm.graph.nodes}
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    jump: dict[str, tuple[int, int]] = {}
    changes, differs = [], []
    for name, kind, srcs, layer in geo._nodes:
        j = jump.get(srcs[0], (1, 1)) if srcs else (1, 1)
        if kind != "layer":
            jump[name] = j
            refusal = _unknown_window(gm, nodes[name]) if j != (1, 1) else ""
            if refusal:
                return _refused(base, refusal)
            continue
        jump[name] = (j[0] * layer.stride[0], j[1] * layer.stride[1])
        if layer.padded:
            differs.append(f"{describe_node(gm, nodes[name])} pads its input, so one dilated "
                           "pass would differ from it at the borders")
        t = (math.gcd(j[0], steps[0]), math.gcd(j[1], steps[1]))  # spacing of the input
        rate = (j[0] // t[0], j[1] // t[1])
        keep = tuple(math.gcd(jump[name][a], steps[a]) // t[a] for a in (0, 1))
        if keep == layer.stride and (rate == (1, 1) or (
                layer.kernel == (1, 1) and layer.pad_lo == layer.pad_hi == (0, 0))):
            continue  # the same layer: nothing removed from its stride, no kernel to dilate
        n = nodes[name]
        change = Change(name, describe_node(gm, n), rate, keep)  # type: ignore[arg-type]
        refusal = _rule(gm, n)[0](gm, n, change)
        if not refusal and n.op == "call_module" and calls[n.target] > 1:
            refusal = "is called at several places"
        if refusal:
            return _refused(base, f"{change.label} {refusal}")
        changes.append(change)
    return DilationPlan(steps, geo.stride, tuple(changes), "", tuple(differs))


def _refused(base: DilationPlan, why: str) -> DilationPlan:
    return DilationPlan(base.step, base.stride, (), why)


_WINDOW_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.AvgPool2d, nn.Upsample,
                 nn.Unfold, nn.Fold, nn.LPPool2d, nn.FractionalMaxPool2d)
_WINDOW_FUNCS = {F.conv2d, torch.conv2d, F.max_pool2d, torch.max_pool2d, F.avg_pool2d,
                 F.interpolate, F.unfold, F.fold, F.lp_pool2d, F.conv_transpose2d}


def _unknown_window(gm: fx.GraphModule, n: fx.Node) -> str:
    """A node the geometry took as same-size but that looks around each pixel in a way
    nofc cannot dilate (a convolution whose weight is computed, say)."""
    odd = (n.op == "call_module" and isinstance(gm.get_submodule(n.target), _WINDOW_TYPES)
           or n.op == "call_function" and n.target in _WINDOW_FUNCS)
    return f"{describe_node(gm, n)} is a window nofc cannot dilate" if odd else ""


# --------------------------------------------------------------------------- rules
#
# A rule is (check, build): ``check(gm, node, change)`` returns "" or why the layer cannot
# be dilated; ``build(gm, node, change)`` returns the new module (for call_module nodes
# and functions replaced by one) or rewrites the node's arguments in place (None).


def _scaled(pad, rate) -> tuple[int, int]:
    p = pair(pad)
    return (p[0] * rate[0], p[1] * rate[1])


def _check_conv(gm, n, c: Change) -> str:
    m = gm.get_submodule(n.target)
    if m.padding_mode != "zeros" and any(pair(m.padding) if not isinstance(m.padding, str)
                                         else (m.padding == "same",)):
        return f"pads with mode {m.padding_mode!r}, which has no dilated form"
    if isinstance(m.padding, str) and m.padding == "same":
        total = [m.dilation[a] * (m.kernel_size[a] - 1) for a in (0, 1)]
        if any(t % 2 for t in total):
            return "uses asymmetric padding='same'"
    return ""


def _build_conv(gm, n, c: Change) -> nn.Module:
    m = gm.get_submodule(n.target)
    new = copy.copy(m)  # shares the weights
    pad = m.padding
    if isinstance(pad, str):
        pad = (0, 0) if pad == "valid" else tuple(
            m.dilation[a] * (m.kernel_size[a] - 1) // 2 for a in (0, 1))
    new.padding = _scaled(pad, c.rate)
    new.dilation = (m.dilation[0] * c.rate[0], m.dilation[1] * c.rate[1])
    new.stride = c.stride
    return new


def _check_max(gm, n, c: Change) -> str:
    return "returns indices" if gm.get_submodule(n.target).return_indices else ""


def _build_max(gm, n, c: Change) -> nn.Module:
    return _max_pool(gm.get_submodule(n.target), c)


def _max_pool(m: nn.MaxPool2d, c: Change) -> nn.Module:
    kernel, dil = pair(m.kernel_size), pair(m.dilation)
    pad = _scaled(m.padding, c.rate)
    dil = (dil[0] * c.rate[0], dil[1] * c.rate[1])
    if m.ceil_mode or pad[0] > kernel[0] // 2 or pad[1] > kernel[1] // 2:
        return DilatedPool2d("max", kernel, c.stride, pad, dil, m.ceil_mode,
                             ceil_overhang=_overhang(m.stride or kernel, c))
    return nn.MaxPool2d(kernel, c.stride, pad, dil)


def _build_avg(gm, n, c: Change) -> nn.Module:
    return _avg_pool(gm.get_submodule(n.target), c)


def _avg_pool(m: nn.AvgPool2d, c: Change) -> nn.Module:
    return DilatedPool2d("avg", m.kernel_size, c.stride, _scaled(m.padding, c.rate), c.rate,
                         m.ceil_mode, m.count_include_pad, m.divisor_override,
                         ceil_overhang=_overhang(m.stride or m.kernel_size, c))


def _overhang(stride, c: Change) -> tuple[int, int]:
    """How far past its input a ceil_mode window of the dilated pooling may reach: the
    original ``stride - 1``, in pixels of the dilated map (see DilatedPool2d)."""
    s = pair(stride)
    return ((s[0] - 1) * c.rate[0], (s[1] - 1) * c.rate[1])


def _check_pad(gm, n, c: Change) -> str:
    m = gm.get_submodule(n.target)
    return "" if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)) else \
        f"pads by {type(m).__name__}, which has no dilated form"


def _build_pad(gm, n, c: Change) -> nn.Module:
    m = gm.get_submodule(n.target)
    left, right, top, bottom = m.padding
    ry, rx = c.rate
    return nn.ConstantPad2d((left * rx, right * rx, top * ry, bottom * ry), m.value)


def _check_fn_pad(gm, n, c: Change) -> str:
    mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else "constant")
    return "" if mode == "constant" else f"pads with mode {mode!r}, which has no dilated form"


def _build_fn_pad(gm, n, c: Change) -> None:
    pad = list(n.kwargs.get("pad", n.args[1] if len(n.args) > 1 else ()))
    rates = [c.rate[1], c.rate[1], c.rate[0], c.rate[0]]
    _set_arg(n, 1, "pad", tuple(p * r for p, r in zip(pad, rates)))


def _build_slice(gm, n, c: Change) -> None:
    rows, cols = spatial_slices(n.args[1])  # type: ignore[misc]

    def scaled(sl: slice, r: int, keep: int) -> slice:
        stop = None if not sl.stop else sl.stop * r
        return slice((sl.start or 0) * r, stop, keep)

    n.args = (n.args[0], (slice(None), slice(None), scaled(rows, c.rate[0], c.stride[0]),
                          scaled(cols, c.rate[1], c.stride[1])))


def _check_fn_conv(gm, n, c: Change) -> str:
    pad = _fn_arg(n, 4, "padding", 0)
    return "uses padding given as text" if isinstance(pad, str) else ""


def _build_fn_conv(gm, n, c: Change) -> None:
    _set_arg(n, 3, "stride", c.stride)
    _set_arg(n, 4, "padding", _scaled(_fn_arg(n, 4, "padding", 0), c.rate))
    dil = pair(_fn_arg(n, 5, "dilation", 1))
    _set_arg(n, 5, "dilation", (dil[0] * c.rate[0], dil[1] * c.rate[1]))


def _check_fn_max(gm, n, c: Change) -> str:
    if _fn_arg(n, 6, "return_indices", False):
        return "returns indices"
    return "" if n.target is F.max_pool2d else "is called in a form nofc cannot rewrite"


def _build_fn_max(gm, n, c: Change) -> nn.Module:
    kernel = _fn_arg(n, 1, "kernel_size", None)
    stride = _fn_arg(n, 2, "stride", None) or kernel
    m = nn.MaxPool2d(kernel, stride, _fn_arg(n, 3, "padding", 0), _fn_arg(n, 4, "dilation", 1),
                     ceil_mode=_fn_arg(n, 5, "ceil_mode", False))
    return _max_pool(m, c)


def _build_fn_avg(gm, n, c: Change) -> nn.Module:
    kernel = _fn_arg(n, 1, "kernel_size", None)
    m = nn.AvgPool2d(kernel, _fn_arg(n, 2, "stride", None) or kernel,
                     _fn_arg(n, 3, "padding", 0), _fn_arg(n, 4, "ceil_mode", False),
                     _fn_arg(n, 5, "count_include_pad", True), _fn_arg(n, 6, "divisor_override",
                                                                       None))
    return _avg_pool(m, c)


def _check_fn_avg(gm, n, c: Change) -> str:
    return "" if n.target is F.avg_pool2d else "is called in a form nofc cannot rewrite"


def _ok(gm, n, c: Change) -> str:
    return ""


def _fn_arg(n: fx.Node, i: int, name: str, default):
    return n.kwargs.get(name, n.args[i] if len(n.args) > i else default)


def _set_arg(n: fx.Node, i: int, name: str, value) -> None:
    if len(n.args) > i:
        args = list(n.args)
        args[i] = value
        n.args = tuple(args)
    else:
        n.kwargs = {**n.kwargs, name: value}


_Rule = tuple[Callable, Callable]
_MODULE_RULES: list[tuple[type, _Rule]] = [
    (nn.Conv2d, (_check_conv, _build_conv)),  # FullConv2d included
    (nn.MaxPool2d, (_check_max, _build_max)),
    (nn.AvgPool2d, (_ok, _build_avg)),
    ((nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d),
     (_check_pad, _build_pad)),  # type: ignore[list-item]
]
_FUNCTION_RULES: dict = {
    F.conv2d: (_check_fn_conv, _build_fn_conv), torch.conv2d: (_check_fn_conv, _build_fn_conv),
    F.max_pool2d: (_check_fn_max, _build_fn_max), torch.max_pool2d: (_check_fn_max, None),
    F.avg_pool2d: (_check_fn_avg, _build_fn_avg),
    torch._C._nn.avg_pool2d: (_check_fn_avg, None),
    F.pad: (_check_fn_pad, _build_fn_pad),
    operator.getitem: (_ok, _build_slice),
}


def _no_rule(gm, n, c: Change) -> str:
    return "has no dilated form in nofc"


def _rule(gm: fx.GraphModule, n: fx.Node) -> _Rule:
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        for types, rule in _MODULE_RULES:
            if isinstance(m, types):
                return rule
    elif n.op == "call_function" and n.target in _FUNCTION_RULES:
        return _FUNCTION_RULES[n.target]
    return (_no_rule, None)  # type: ignore[return-value]


# --------------------------------------------------------------------------- apply


def apply(gm: fx.GraphModule, p: DilationPlan) -> fx.GraphModule:
    """The dilated network: a new GraphModule sharing the parameters of ``gm``.

    >>> import torch, nofc
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32))
    >>> net = apply(fcn, plan(fcn, nofc.geometry(fcn, (1, 32, 32)), 2))
    >>> net(torch.randn(1, 1, 40, 48)).shape  # one cell every 2 pixels
    torch.Size([1, 10, 5, 9])
    """
    if p.refusal:
        raise NofcError(f"cannot dilate the network: {p.refusal}")
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    nodes = {n.name: n for n in graph.nodes}
    root: dict[str, object] = {}
    for c in p.changes:
        n = nodes[c.node]
        new = _rule(gm, n)[1](gm, n, c)
        if new is None:  # the node's arguments were rewritten
            continue
        target = n.target if n.op == "call_module" else f"nofc_dilated_{n.name}"
        if n.op != "call_module":
            n.op, n.target, n.args, n.kwargs = "call_module", target, (n.args[0],), {}
        root[target] = new
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr") and n.target not in root:
            root[n.target] = (gm.get_submodule(n.target) if n.op == "call_module"
                              else get_attr(gm, n.target))
    graph.lint()
    net = fx.GraphModule(root, graph, f"{type(gm).__name__}Dilated")
    remember(net, _nofc_dilation=p, _nofc_input_size=getattr(gm, "_nofc_input_size", None))
    return net.train(gm.training)


# --------------------------------------------------------------------------- entry points


def dilate(fcn: nn.Module, input_size, step) -> fx.GraphModule:
    """The converted network dilated for ``step``: its output is the map at that step.

    Same window and offset as ``fcn``, stride ``step`` (``nofc.geometry`` says so); it
    shares ``fcn``'s parameters and exports like it (``nofc.to_torchscript``,
    ``export_program``, ``export_onnx``). Without padding its map equals
    ``dense_predict(fcn, image, input_size, step)`` (shift-and-stitch) and so the
    classifier on every crop; with padding the two differ at the borders.

    Raises:
        NofcError: a step that does not divide the stride, or a network with a layer that
            has no dilated form (the message names it).

    >>> import torch, nofc
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
    >>> net = nofc.dilate(fcn, (1, 32, 32), step=1)
    >>> net(torch.randn(1, 1, 40, 48)).shape, nofc.geometry(net, (1, 32, 32)).stride
    (torch.Size([1, 10, 9, 17]), (1, 1))
    """
    size = check_input_size(input_size)
    net = as_fcn(fcn, size)
    entry = _cached(net, size, cached_geometry(net, size).check_step(step))
    if entry.net is None:
        raise NofcError(f"cannot dilate the network for step {step}: {entry.plan.refusal}")
    return entry.net


@dataclass
class _Entry:
    plan: DilationPlan
    net: fx.GraphModule | None
    bytes_per_pixel: float = 0.0  # peak activations per input pixel (float32, batch 1)
    warned: bool = False


def _cached(fcn: nn.Module, size, steps) -> _Entry:
    """The dilated network for ``(input_size, step)``, built once and kept on ``fcn``."""
    cache = fcn.__dict__.setdefault("_nofc_dilated_cache", {})
    key = (tuple(size), tuple(steps))
    if key not in cache:
        geo = cached_geometry(fcn, size)
        gm = fcn if isinstance(fcn, fx.GraphModule) else trace(fcn)
        p = plan(gm, geo, steps)
        entry = _Entry(p, None if p.refusal else apply(gm, p))
        if entry.net is not None:
            entry = _checked(entry, geo, size)
        cache[key] = entry
    return cache[key]


def _checked(entry: _Entry, geo: Geometry, size) -> _Entry:
    """Check the dilated network's geometry (stride = step, every cell shift-and-stitch
    has) and estimate its peak memory per pixel; refuse it if the check fails."""
    net, steps = entry.net, entry.plan.step
    try:
        dgeo = cached_geometry(net, size)
    except NofcError as exc:
        return _Entry(_refused(entry.plan, f"its geometry cannot be derived ({exc})"), None)
    hw = (2 * size[1] + 3 * steps[0] + 1, 2 * size[2] + 2 * steps[1] + 1)
    if dgeo.stride != steps or (dgeo.window, dgeo.offset) != (geo.window, geo.offset) or any(
            a < b for a, b in zip(dgeo.output_shape(hw), geo.output_shape(hw, step=steps))):
        return _Entry(_refused(entry.plan, "the dilated network's map does not line up with "
                                           "shift-and-stitch's"), None)
    rec = probe(net, (1, size[0], *hw))
    sizes = {k: math.prod(s) for k, s in rec.shapes.items() if s is not None}
    peak = max(sizes.get(n.name, 0) + sum(sizes.get(a.name, 0) for a in n.all_input_nodes)
               for n in net.graph.nodes)
    entry.bytes_per_pixel = 4.0 * peak / (hw[0] * hw[1])  # float32
    return entry


def fine_pass(fcn: nn.Module, size, steps, method: str = "auto") -> _Entry | None:
    """The dilated network to run for a map at ``steps`` (None: shift-and-stitch, or no
    finer step is asked). ``"auto"`` takes it when it equals shift-and-stitch; a network
    that cannot be dilated (or, for ``"auto"``, only with different borders) warns once,
    in one line, why it runs shift-and-stitch."""
    if method not in METHODS:
        raise NofcError(f"method must be one of {', '.join(map(repr, METHODS))}, got "
                        f"{method!r}")
    geo = cached_geometry(fcn, size)
    if method == "shift" or geo.factors(steps) == (1, 1):
        return None
    if geo.lattice:
        warnings.warn(f"nofc: step {steps[0]}x{steps[1]} runs shift-and-stitch: the network "
                      "runs only on images of the window plus a multiple of its stride "
                      "(branches that meet only there), which a dilated pass does not keep",
                      stacklevel=3)
        return None
    if callable(getattr(fcn, "geometry_for", None)):  # its own geometry: no layers to dilate
        warned = fcn.__dict__.setdefault("_nofc_shift_warned", set())
        if steps not in warned:
            warned.add(steps)
            warnings.warn(f"nofc: step {steps[0]}x{steps[1]} runs shift-and-stitch: "
                          f"{getattr(fcn, 'name', type(fcn).__name__)} runs as it is in "
                          "onnxruntime, with no dilated pass", stacklevel=3)
        return None
    entry = _cached(fcn, size, steps)
    why = entry.plan.refusal or (entry.plan.differs[0] if method == "auto" and entry.plan.differs
                                 else "")
    if not why:
        return entry
    if not entry.warned:
        entry.warned = True
        hint = " (method='dilate' runs that faster pass anyway)" if not entry.plan.refusal else ""
        warnings.warn(f"nofc: step {steps[0]}x{steps[1]} runs shift-and-stitch: {why}{hint}",
                      stacklevel=3)
    return None
