"""The geometry of a map, measured by running the network: for graphs with a layer
``nofc.receptive`` cannot read (a reshape into tokens and back, an upsampling to a computed
size, a weight computed in the graph).

Map sizes come from shape-only runs, the stride from the map at the window plus a large
multiple of every usual stride, the receptive field from the input pixels with a nonzero
gradient for a middle cell, and exactness from a crop check: the cells of a small map
against the network on their crops.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from ._fx import (ANY_STRIDE, NodeFailure, describe_node, output_node, param_like, probe,
                  spatial_size)
from .errors import NofcError, first_line
from .tolerance import passes, tolerance_for
from .windows import Geometry

__all__ = ["measured_geometry"]


def measured_geometry(gm: fx.GraphModule, size, *, why: str, context: list[str]) -> Geometry:
    """Geometry measured by running the network, for graphs with a layer nofc cannot read
    (a reshape into tokens and back, an upsampling to a computed size, a weight computed in
    the graph).

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
    out = output_node(gm)
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
    whole_image = tuple(reasons)  # so far, every reason is global context
    if not reasons and (min(rf_offset) < 0 or any(rf_offset[a] + rf[a] > window[a]
                                                   for a in (0, 1))):
        reasons.append(f"the receptive field (measured: {rf[0]}x{rf[1]} from "
                       f"{rf_offset[0]},{rf_offset[1]}) reaches outside the window")
    if not reasons:
        net, dtype = _runnable(gm, size)
        max_abs, scale = _crop_error(net, size, window, stride, dtype)
        if not passes(*tolerance_for(dtype), max_abs, scale):
            reasons.append(f"map cells differ from the network on their crops (measured: max "
                           f"error {max_abs / max(1.0, scale):.1e} of the largest output), "
                           f"and {why}")
    return Geometry(stride, (0, 0), window, not reasons, rf, rf_offset, tuple(reasons),
                    measured=why, global_context=whole_image, _output=out.name,
                    _shape_of=shape_of)


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
            got = spatial_size(rec.shapes.get(self.out_name)) or (0, 0)
            self.known[hw] = got
        return self.known[hw]


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
    backward pass kept.

    Gradients in a context of their own, whatever the caller's (``torch.no_grad()``,
    ``torch.inference_mode()``): the images are made in it, and a network whose tensors
    were made in inference mode is measured on a copy (autograd cannot save them).
    """
    with torch.inference_mode(False), torch.enable_grad():
        if _holds_inference_tensors(net):
            net = copy.deepcopy(net)  # a clone outside inference mode is a normal tensor
        return _gradient_field(net, channels, hw, stride)


def _holds_inference_tensors(net: nn.Module) -> bool:
    """A parameter, buffer or tensor constant of ``net`` made in inference mode."""
    return any(isinstance(t, torch.Tensor) and t.is_inference() for m in net.modules()
               for t in (*m.parameters(recurse=False), *m.buffers(recurse=False),
                         *vars(m).values()))


def _gradient_field(net, channels: int, hw, stride):
    """``_dependence`` where gradients are enabled."""
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
